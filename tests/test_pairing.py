"""The span pairer on its own: decoded records in, spans out, no ring and no process.

The records are built here the way the kernel writes them (an entry+return site's
events carry the stack pointer; a return's is its entry's + 8), so the properties hold
for any interleaving of threads, nesting, recursion, lost returns and ring losses.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.pairing import (
    RETURN_ADDRESS_BYTES,
    EventLayout,
    PairingStats,
    Record,
    Span,
    SpanPairer,
)

PID = 4242
STACK_TOP = 0x7FFF_0000_0000
FRAME_BYTES = 128


@dataclass(frozen=True)
class Site:
    """A probe site as the pairer sees one."""

    probe: str
    ret: bool


SITES = (Site("outer", True), Site("inner", True), Site("mark", False))
ENTRY_EID = {0: 10, 1: 20, 2: 30}
RETURN_EID = {0: 11, 1: 21}
ENTRY_EIDS = frozenset(ENTRY_EID.values())


def layouts() -> dict[int, EventLayout]:
    """Entries carry (sp, arg1) and a u32 from the stack; returns (sp, return value)."""
    u32 = struct.Struct("<I")
    out = {}
    for site, eid in ENTRY_EID.items():
        ret = SITES[site].ret
        out[eid] = EventLayout(site, False, (("n", 1),),
                               (("s", 0, 4, lambda b: u32.unpack(b)[0]),),
                               0 if ret else None)
    for site, eid in RETURN_EID.items():
        out[eid] = EventLayout(site, True, (("r", 1),), (), 0)
    return out


def new_pairer(**options: object) -> SpanPairer:
    pairer = SpanPairer(SITES, **options)  # type: ignore[arg-type]
    pairer.events.update(layouts())
    return pairer


def entry(site: int, tid: int, t: int, depth: int, n: int, pid: int = PID) -> Record:
    sp = STACK_TOP - FRAME_BYTES * depth
    return (ENTRY_EID[site], pid, tid, t, (sp, n), struct.pack("<I", n * 3))


def ret(site: int, tid: int, t: int, depth: int, r: int, pid: int = PID) -> Record:
    sp = STACK_TOP - FRAME_BYTES * depth + RETURN_ADDRESS_BYTES
    return (RETURN_EID[site], pid, tid, t, (sp, r), None)


def key(span: Span) -> tuple[object, ...]:
    return (span.probe, span.tid, span.start_ns, span.end_ns, tuple(sorted(span.args.items())))


# ---------------------------------------------------------------------- examples
def test_nested_and_entry_only_calls_pair() -> None:
    pairer = new_pairer()
    spans = pairer.feed([entry(0, 1, 100, 0, 7), entry(1, 1, 110, 1, 8),
                         entry(2, 1, 115, 2, 9), ret(1, 1, 120, 1, 80),
                         ret(0, 1, 130, 0, 70)])
    assert [key(s) for s in spans] == [
        ("mark", 1, 115, 115, (("n", 9), ("s", 27))),
        ("inner", 1, 110, 120, (("n", 8), ("r", 80), ("s", 24))),
        ("outer", 1, 100, 130, (("n", 7), ("r", 70), ("s", 21))),
    ]
    assert pairer.stats.hits == {"outer": 2, "inner": 2, "mark": 1}
    assert pairer.pending_entries() == 0


def test_recursion_pairs_each_return_with_its_own_frame() -> None:
    pairer = new_pairer()
    spans = pairer.feed([entry(0, 1, 1, 0, 1), entry(0, 1, 2, 1, 2), entry(0, 1, 3, 2, 3),
                         ret(0, 1, 4, 2, 0), ret(0, 1, 5, 1, 0), ret(0, 1, 6, 0, 0)])
    assert [(s.start_ns, s.end_ns) for s in spans] == [(3, 4), (2, 5), (1, 6)]


def test_a_return_with_no_entry_is_an_orphan() -> None:
    pairer = new_pairer()
    assert pairer.feed([ret(0, 1, 5, 0, 0)]) == []
    assert pairer.stats.orphan_returns == 1


def test_a_longjmp_past_a_call_drops_its_entry_as_unfinished() -> None:
    pairer = new_pairer()
    # inner never returns: outer's next call at the same depth shows it was abandoned
    spans = pairer.feed([entry(0, 1, 1, 0, 1), entry(1, 1, 2, 1, 2),
                         entry(1, 1, 3, 1, 3), ret(1, 1, 4, 1, 0), ret(0, 1, 5, 0, 0)])
    assert [(s.probe, s.start_ns, s.end_ns) for s in spans] == [("inner", 3, 4),
                                                                 ("outer", 1, 5)]
    assert pairer.stats.unfinished == 1


def test_a_return_drops_the_deeper_entries_a_longjmp_left() -> None:
    pairer = new_pairer()
    spans = pairer.feed([entry(0, 1, 1, 0, 1), entry(0, 1, 2, 1, 2), entry(0, 1, 3, 2, 3),
                         ret(0, 1, 4, 0, 0)])
    assert [(s.start_ns, s.end_ns) for s in spans] == [(1, 4)]
    assert pairer.stats.unfinished == 2


def test_merged_reads_hold_a_return_one_read_for_its_entry() -> None:
    pairer = new_pairer()
    assert pairer.feed_merged([ret(0, 1, 20, 0, 5)]) == []
    assert pairer.held_returns() == 1 and pairer.stats.hits["outer"] == 0
    spans = pairer.feed_merged([entry(0, 1, 10, 0, 4)])
    assert [(s.start_ns, s.end_ns) for s in spans] == [(10, 20)]
    # a return whose entry never comes is dropped after one more read
    pairer.feed_merged([ret(1, 1, 30, 1, 0)])
    pairer.feed_merged([])
    assert pairer.stats.orphan_returns == 1 and pairer.held_returns() == 0


def test_max_depth_drops_the_oldest_entry() -> None:
    pairer = new_pairer(max_depth=2)
    pairer.feed([entry(0, 1, t, t, 0) for t in range(1, 5)])
    assert pairer.pending_entries() == 2 and pairer.stats.unfinished == 2


def test_drops_count_what_they_drop() -> None:
    pairer = new_pairer()
    pairer.feed([entry(0, 1, 1, 0, 0), entry(1, 1, 2, 1, 0), entry(0, 2, 3, 0, 0)])
    assert pairer.pending_threads() == {1, 2}
    assert pairer.drop_site(1) == 1
    assert pairer.drop_thread(2) == 1
    assert pairer.drop_all() == 1
    assert pairer.stats.unfinished == 3 and pairer.pending_entries() == 0
    assert pairer.feed([ret(0, 1, 4, 0, 0)]) == []  # its entry was dropped


def test_pid_filter_and_unknown_events_are_ignored() -> None:
    pairer = new_pairer()
    pairer.pid_filter = {PID}
    records = [entry(2, 1, 1, 0, 0, pid=PID + 1), (99, PID, 1, 2, (), None),
               entry(2, 1, 3, 0, 0)]
    assert [s.start_ns for s in pairer.feed(records)] == [3]
    assert sum(pairer.stats.hits.values()) == 1


def test_counters_can_be_a_sessions() -> None:
    stats = PairingStats()
    pairer = SpanPairer(SITES, stats=stats)
    pairer.events.update(layouts())
    pairer.feed([ret(0, 1, 1, 0, 0)])
    assert stats.orphan_returns == 1


def test_a_short_stack_capture_is_left_out() -> None:
    pairer = new_pairer()
    eid, pid, tid, t, regs, _stack = entry(2, 1, 1, 0, 5)
    (span,) = pairer.feed([(eid, pid, tid, t, regs, b"\x01")])
    assert dict(span.args) == {"n": 5}


# ---------------------------------------------------------------------- properties
@dataclass
class Call:
    """One simulated call: its records' places in the thread's list, and its fate."""

    site: int
    tid: int
    depth: int
    n: int
    entry_at: int
    return_at: int | None = None


@dataclass
class Thread:
    """A thread's records in program order, with the calls they make up."""

    tid: int
    records: list[tuple[str, Call]] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    abandoned: int = 0


def simulate(tid: int, actions: list[int], allow_longjmp: bool) -> Thread:
    """Run ``actions`` as a call stack machine: call a site, return, or longjmp out.

    Action ``a < len(SITES)`` calls site ``a``; ``len(SITES)`` returns from the top call;
    ``len(SITES) + 1`` abandons the top call (its return never comes, as after a
    longjmp or an exception unwinding through it).
    """
    thread = Thread(tid)
    stack: list[Call] = []
    for action in actions:
        if action < len(SITES):
            if len(stack) >= 6:
                continue
            call = Call(action, tid, len(stack), len(thread.calls), len(thread.records))
            thread.calls.append(call)
            thread.records.append(("entry", call))
            if SITES[action].ret:
                stack.append(call)
            else:
                call.return_at = call.entry_at
        elif not stack:
            continue
        elif action == len(SITES) or not allow_longjmp:
            call = stack.pop()
            call.return_at = len(thread.records)
            thread.records.append(("return", call))
        else:
            stack.pop()
            thread.abandoned += 1
    return thread


def interleave(threads: list[Thread], order: list[int]) -> list[tuple[int, str, Call]]:
    """Merge the threads' records, taking the next of thread ``order[i] % n`` each step."""
    cursors = [0] * len(threads)
    out: list[tuple[int, str, Call]] = []
    picks = iter(order)
    while any(c < len(t.records) for c, t in zip(cursors, threads, strict=True)):
        pick = next(picks, 0) % len(threads)
        while cursors[pick] >= len(threads[pick].records):
            pick = (pick + 1) % len(threads)
        kind, call = threads[pick].records[cursors[pick]]
        out.append((cursors[pick], kind, call))
        cursors[pick] += 1
    return out


def to_records(merged: list[tuple[int, str, Call]]) -> tuple[list[Record], dict[int, int]]:
    """Records with times in merge order; the time of each (tid, index in thread)."""
    records: list[Record] = []
    times: dict[int, int] = {}
    for t, (_index, kind, call) in enumerate(merged, start=1):
        if kind == "entry":
            records.append(entry(call.site, call.tid, t, call.depth, call.n))
            times[id(call)] = t
        else:
            records.append(ret(call.site, call.tid, t, call.depth, call.n + 1))
            times[-id(call)] = t
    return records, times


def expected_key(call: Call, times: dict[int, int]) -> tuple[object, ...]:
    start = times[id(call)]
    args = {"n": call.n, "s": call.n * 3}
    if SITES[call.site].ret:
        args["r"] = call.n + 1
        end = times[-id(call)]
    else:
        end = start
    return (SITES[call.site].probe, call.tid, start, end, tuple(sorted(args.items())))


ACTIONS = st.lists(st.integers(0, len(SITES) + 1), max_size=60)
THREADS = st.lists(ACTIONS, min_size=1, max_size=4)
ORDER = st.lists(st.integers(0, 3), max_size=300)


@settings(max_examples=300, deadline=None)
@given(THREADS, ORDER)
def test_any_interleaving_pairs_every_call_that_returned(actions: list[list[int]],
                                                         order: list[int]) -> None:
    threads = [simulate(tid, a, allow_longjmp=True) for tid, a in enumerate(actions, 1)]
    records, times = to_records(interleave(threads, order))
    pairer = new_pairer()
    spans = pairer.feed(records)

    returned = [c for t in threads for c in t.calls if c.return_at is not None]
    assert sorted(key(s) for s in spans) == sorted(expected_key(c, times) for c in returned)
    assert pairer.stats.orphan_returns == 0
    never_returned = sum(len(t.calls) for t in threads) - len(returned)
    assert pairer.stats.unfinished + pairer.pending_entries() == never_returned
    assert sum(pairer.stats.hits.values()) == len(records)


@settings(max_examples=200, deadline=None)
@given(THREADS, ORDER, st.data())
def test_a_ring_loss_never_pairs_across_it(actions: list[list[int]], order: list[int],
                                          data: st.DataObject) -> None:
    """Records lost from a thread's ring, then its pending entries dropped at the loss:
    exactly the calls wholly before or wholly after the lost window pair."""
    threads = [simulate(tid, a, allow_longjmp=False) for tid, a in enumerate(actions, 1)]
    merged = interleave(threads, order)
    records, times = to_records(merged)
    windows = {}
    for t in threads:
        lo = data.draw(st.integers(0, len(t.records)))
        windows[t.tid] = (lo, data.draw(st.integers(lo, len(t.records))))
    pairer = new_pairer()
    spans: list[Span] = []
    for (index, _kind, call), record in zip(merged, records, strict=True):
        lo, hi = windows[call.tid]
        if lo <= index < hi:
            continue  # lost
        if index == hi and hi > lo:
            pairer.drop_thread(call.tid)  # the loss record comes before this one
        pairer.feed([record], spans)

    def outside(call: Call) -> bool:
        lo, hi = windows[call.tid]
        assert call.return_at is not None
        return call.return_at < lo or call.entry_at >= hi or lo == hi

    kept = [c for t in threads for c in t.calls if c.return_at is not None and outside(c)]
    assert sorted(key(s) for s in spans) == sorted(expected_key(c, times) for c in kept)


@settings(max_examples=200, deadline=None)
@given(THREADS, ORDER, st.data())
def test_merged_reads_pair_entries_read_one_read_late(actions: list[list[int]],
                                                      order: list[int],
                                                      data: st.DataObject) -> None:
    """Per-CPU rings: records cut into reads, some entries read one read late.

    Without longjmps: a return read before the entry of its own call, when an abandoned
    call of the same frame is still pending, is indistinguishable from that call's."""
    threads = [simulate(tid, a, allow_longjmp=False) for tid, a in enumerate(actions, 1)]
    records, times = to_records(interleave(threads, order))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(records) - 1)), max_size=6)))
    reads = [records[a:b] for a, b in zip([0, *cuts], [*cuts, len(records)], strict=True)]
    late_reads: list[list[Record]] = [[] for _ in reads]
    for i in range(len(reads) - 1):  # each entry at most one read late
        late = data.draw(st.sets(st.integers(0, max(0, len(reads[i]) - 1)), max_size=3))
        late_reads[i + 1] = [r for j, r in enumerate(reads[i])
                             if j in late and r[0] in ENTRY_EIDS]
        reads[i] = [r for r in reads[i] if r not in late_reads[i + 1]]
    reads = [late + batch for late, batch in zip(late_reads, reads, strict=True)]
    pairer = new_pairer()
    spans: list[Span] = []
    for batch in reads:
        pairer.feed_merged(batch, spans)
    pairer.feed_merged([], spans)

    returned = [c for t in threads for c in t.calls if c.return_at is not None]
    assert sorted(key(s) for s in spans) == sorted(expected_key(c, times) for c in returned)
    assert pairer.stats.orphan_returns == 0 and pairer.held_returns() == 0


@pytest.mark.parametrize("depth", [1, 64])
def test_deep_recursion_pairs_lifo(depth: int) -> None:
    pairer = new_pairer()
    records = [entry(0, 1, d + 1, d, d) for d in range(depth)]
    records += [ret(0, 1, 1000 + i, depth - 1 - i, 0) for i in range(depth)]
    spans = pairer.feed(records)
    assert [(s.start_ns, s.end_ns) for s in spans] == [
        (depth - i, 1000 + i) for i in range(depth)]
