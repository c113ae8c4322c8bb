"""Real uprobes on the real C target: counts, arguments, nesting, threads, loss, cleanup."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import select
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from prism_tui.engine.iterations import IterationBuilder
from probes.catalog import Profile, parse_profile
from probes.errors import SymbolNotFoundError
from probes.placement import ProbeSite, place_profile, place_symbol
from probes.target import Target
from probes.uprobes import Span, UprobeSession
from tests.conftest import CTARGET_PROFILE, CTarget, open_fds

MODES = ["thread", "cpu"]


ESCAPE_PROFILE = """
[profile]
name = "escape"
description = "the C target's probed functions that never return normally"

[[library]]
id = "exe"
soname = ["ctarget*"]

[[probe]]
id = "escape"
library = "exe"
symbol = "pl_escape"
stage = "host"
ret = true
[probe.args]
depth = "arg1"

[[probe]]
id = "quit"
library = "exe"
symbol = "pl_quit"
stage = "host"
ret = true
"""


@pytest.fixture(scope="module")
def profile() -> Profile:
    return parse_profile(CTARGET_PROFILE, "ctarget.toml")


@pytest.fixture(scope="module")
def escape_profile() -> Profile:
    return parse_profile(ESCAPE_PROFILE, "escape.toml")


def sites_for(target: CTarget, profile: Profile, *probe_ids: str,
              level: str = "deepdive") -> list[ProbeSite]:
    placement = place_profile(Target(target.pid), profile, level)
    return [s for s in placement.sites if not probe_ids or s.probe in probe_ids]


def run(session: UprobeSession, target: CTarget, command: str, settle: float = 0.05
        ) -> list[Span]:
    """Run one target command while attached; return every span it produced."""
    spans = session.read()
    assert spans == [], "the target was idle: nothing should have been recorded"
    target.cmd(command)
    time.sleep(settle)
    return session.read()


def run_polling(session: UprobeSession, target: CTarget, command: str) -> list[Span]:
    """Run a command in another thread while this one polls, as the monitor does."""
    import threading

    spans: list[Span] = []
    worker = threading.Thread(target=target.cmd, args=(command,))
    worker.start()
    while worker.is_alive():
        spans += session.poll(0.01)
    time.sleep(0.1)
    return spans + session.read()


@pytest.mark.parametrize("mode", MODES)
def test_exact_call_counts(ctarget: CTarget, profile: Profile, mode: str) -> None:
    with UprobeSession([Target(ctarget.pid)], sites_for(ctarget, profile, "work"),
                       mode=mode) as session:
        assert session.mode == mode
        spans = run(session, ctarget, "work 1000")
    assert len(spans) == 1000
    assert {s.probe for s in spans} == {"work"}
    assert all(s.pid == ctarget.pid and s.tid == ctarget.pid for s in spans)
    assert all(s.end_ns == s.start_ns for s in spans)  # entry-only probe: instants
    starts = [s.start_ns for s in spans]
    assert starts == sorted(starts)
    assert abs(starts[-1] - time.monotonic_ns()) < 10e9  # CLOCK_MONOTONIC


def test_integer_arguments_from_registers(ctarget: CTarget, profile: Profile) -> None:
    with UprobeSession([Target(ctarget.pid)], sites_for(ctarget, profile, "args6")) as session:
        spans = run(session, ctarget, "args6 11 22 33 44 55 -66")
    [span] = spans
    assert [span.args[k] for k in "abcde"] == [11, 22, 33, 44, 55]
    assert span.args["f"] == 2**64 - 66  # registers are read as unsigned 64-bit
    assert span.args["sum"] == 11 + 22 + 33 + 44 + 55 - 66
    assert span.duration_ns > 0
    with pytest.raises(TypeError):
        span.args["a"] = 1  # type: ignore[index]


def test_span_is_immutable() -> None:
    span = Span("work", 1, 1, 10, 20)
    with pytest.raises(dataclasses.FrozenInstanceError):
        span.end_ns = 30  # type: ignore[misc]
    assert span.duration_ns == 10


def test_struct_passed_by_value_read_from_stack(ctarget: CTarget, profile: Profile) -> None:
    with UprobeSession([Target(ctarget.pid)], sites_for(ctarget, profile, "struct")) as session:
        spans = run(session, ctarget, "struct 7 -8 9000000000")
    [span] = spans
    assert dict(span.args) == {"sa": 7, "sb": -8, "sc": 9000000000}


@pytest.mark.parametrize("mode", MODES)
def test_nested_calls_pair_inside_their_parent(ctarget: CTarget, profile: Profile,
                                               mode: str) -> None:
    sites = sites_for(ctarget, profile, "outer", "inner")
    with UprobeSession([Target(ctarget.pid)], sites, mode=mode) as session:
        spans = run(session, ctarget, "nested 50")
    outer = [s for s in spans if s.probe == "outer"]
    inner = [s for s in spans if s.probe == "inner"]
    assert len(outer) == 1 and len(inner) == 50
    assert all(outer[0].start_ns < s.start_ns <= s.end_ns < outer[0].end_ns for s in inner)
    assert session.stats.orphan_returns == 0 and session.stats.unfinished == 0


def test_recursive_calls_pair_lifo(ctarget: CTarget, profile: Profile) -> None:
    with UprobeSession([Target(ctarget.pid)], sites_for(ctarget, profile, "recurse")) as session:
        spans = run(session, ctarget, "recurse 20")
    assert len(spans) == 21
    by_depth = sorted(spans, key=lambda s: s.args["depth"], reverse=True)  # 20 .. 0
    assert [s.args["depth"] for s in by_depth] == list(range(20, -1, -1))
    for outer, inner in itertools.pairwise(by_depth):
        assert outer.start_ns < inner.start_ns and inner.end_ns < outer.end_ns


@pytest.mark.parametrize("mode", MODES)
def test_returns_that_never_come_are_counted_not_paired(ctarget: CTarget,
                                                        escape_profile: Profile,
                                                        mode: str) -> None:
    """A longjmp out of probed calls abandons their entries: the kernel never fires
    their uretprobes. Those entries are counted as unfinished, and never paired with the
    return of another activation (here an outer one of the same function)."""
    sites = sites_for(ctarget, escape_profile, "escape")
    with UprobeSession([Target(ctarget.pid)], sites, mode=mode) as session:
        # one call that jumps straight back to main
        assert run(session, ctarget, "escape 0 1") == []
        # depths 5..0; depth 0 jumps back into depth 3, which returns, then 4 and 5 do
        spans = run(session, ctarget, "escape 5 3")
        by_depth = sorted(spans, key=lambda s: s.args["depth"], reverse=True)
        assert [s.args["depth"] for s in by_depth] == [5, 4, 3]
        for outer, inner in itertools.pairwise(by_depth):
            assert outer.start_ns < inner.start_ns and inner.end_ns < outer.end_ns
        # later calls that all return pair as usual
        later = run(session, ctarget, "escape 3 0")
        stats = session.stats
    by_depth = sorted(later, key=lambda s: s.args["depth"], reverse=True)
    assert [s.args["depth"] for s in by_depth] == [3, 2, 1, 0]
    for outer, inner in itertools.pairwise(by_depth):
        assert outer.start_ns < inner.start_ns and inner.end_ns < outer.end_ns
    assert stats.unfinished == 1 + 3  # the call of `escape 0 1`, depths 2..0 of `escape 5 3`
    assert stats.orphan_returns == 0 and stats.lost == 0


@pytest.mark.parametrize("mode", MODES)
def test_threads_that_exit_inside_a_call_leave_unfinished_entries(
        ctarget: CTarget, escape_profile: Profile, mode: str) -> None:
    """pthread_exit inside a probed call: no return ever comes; the entry is counted
    unfinished once the thread is gone, and no span is made of it."""
    sites = sites_for(ctarget, escape_profile, "quit")
    with UprobeSession([Target(ctarget.pid)], sites, mode=mode) as session:
        spans = run_polling(session, ctarget, "quit 3")
        deadline = time.monotonic() + 5
        while session.stats.unfinished < 3 and time.monotonic() < deadline:
            spans += session.poll(0.05)
        stats = session.stats
    assert spans == []
    assert stats.hits["quit"] == 3 and stats.unfinished == 3
    assert stats.orphan_returns == 0


@pytest.mark.parametrize("mode", MODES)
def test_threads_are_followed(ctarget: CTarget, profile: Profile, mode: str) -> None:
    with UprobeSession([Target(ctarget.pid)], sites_for(ctarget, profile, "work"),
                       mode=mode, ring_pages=1024) as session:
        spans = run_polling(session, ctarget, "threads 4 1000 1000")
        stats = session.stats
    tids = Counter(s.tid for s in spans)
    assert ctarget.pid not in tids  # the main thread made no call
    assert stats.lost == 0
    if mode == "cpu":
        assert len(spans) == 4000 and len(tids) == 4  # per-CPU events miss nothing
    else:
        # thread creation is reported at once, but a thread runs a little before it is
        # attached: its first calls can be missed (bench/thread_modes.py measures it).
        # The four threads are attached one after the other: on a quiet host each
        # missed 2-6 of its calls (one a ms), on a loaded one 78, 145, 204 and 257 of
        # 300. Followed = attached in the first half of its ~1 s life
        assert len(tids) == 4 and min(tids.values()) >= 500, sorted(tids.values())
        assert stats.threads_attached >= 1 + len(tids)
        assert stats.threads_exited >= len(tids)


@pytest.mark.parametrize("mode", MODES)
def test_a_read_never_delivers_a_call_before_an_earlier_one_of_another_thread(
        ctarget: CTarget, profile: Profile, mode: str) -> None:
    """Two threads take turns (``pl_inner`` on one, then the anchor ``pl_work`` on the
    other), as a request's steps hop between an engine's worker threads. The rings are
    read one after the other, so without holding back what ended during a read, an
    anchor read from a ring drained late closed its iteration while the other thread's
    earlier call sat unread in a ring drained early (a late span: an iteration without
    its sampling call, the flake of tests/test_llama_cpp.py). Every batch must hold
    everything that ended before its last span, so each iteration has its one call."""
    rounds = 3000
    sites = sites_for(ctarget, profile, "work", "inner")
    builder = IterationBuilder(ctarget.pid, "work", {"work": "host", "inner": "inner"})
    iterations = []
    with UprobeSession([Target(ctarget.pid)], sites, mode=mode, ring_pages=1024) as session:
        worker = threading.Thread(target=ctarget.cmd, args=(f"relay {rounds}",))
        worker.start()
        while worker.is_alive():
            iterations += builder.add(session.read())
        time.sleep(0.1)
        iterations += builder.add(session.read())
        lost = session.stats.lost
    assert lost == 0
    assert builder.late_spans == 0
    # the threads are attached during their 50-ms wait; the first anchor opens the first
    assert len(iterations) == rounds - 1
    assert Counter(it.features.get("calls.inner", 0) for it in iterations) == \
        {1: rounds - 1}


def test_exited_threads_are_closed_off_the_reader_and_nothing_leaks(
        ctarget: CTarget, profile: Profile) -> None:
    """Closing a uprobe event takes tens of ms: the reader hands an exited thread's ring
    and watcher to the session's closer thread, and close() waits for it. The threads
    live ~1 s each: one attached later than its life (30 ms of calls, as this test had)
    would never be seen, and a loaded host has attached threads up to ~0.26 s late."""
    before = open_fds()
    session = UprobeSession([Target(ctarget.pid)], sites_for(ctarget, profile, "work"),
                            mode="thread")
    session.open()
    spans = run_polling(session, ctarget, "threads 4 1000 1000")
    deadline = time.monotonic() + 10
    while session.stats.threads_exited < 4 and time.monotonic() < deadline:
        spans += session.poll(0.05)
    assert session.stats.threads_exited >= 4 and len({s.tid for s in spans}) == 4
    assert session.stats.closes_queued >= 2 * 4  # a ring and a watcher per thread
    session.close()
    assert session.stats.closes_done == session.stats.closes_queued
    assert open_fds() == before


def test_target_already_running_before_attach(ctarget: CTarget, profile: Profile) -> None:
    ctarget.cmd("spin_start 1000")  # a background thread calls pl_work every ~1 ms
    time.sleep(0.1)
    with UprobeSession([Target(ctarget.pid)], sites_for(ctarget, profile, "work"),
                       mode="thread") as session:
        spans: list[Span] = []
        deadline = time.monotonic() + 5
        while len(spans) < 50 and time.monotonic() < deadline:
            spans += session.poll(0.05)
    assert len(spans) >= 50
    assert {s.tid for s in spans} != {ctarget.pid}


def test_ring_overflow_counts_losses_and_later_events_are_right(
        ctarget: CTarget, profile: Profile) -> None:
    sites = sites_for(ctarget, profile, "args6")
    with UprobeSession([Target(ctarget.pid)], sites, mode="thread", ring_pages=1,
                       drain_interval_s=3600) as session:
        for _ in range(400):  # ~20 KB of records into a 4 KB ring, never drained
            ctarget.proc.stdin.write("args6 1 2 3 4 5 6\n")  # type: ignore[union-attr]
        ctarget.proc.stdin.flush()  # type: ignore[union-attr]
        for _ in range(400):
            ctarget.proc.stdout.readline()  # type: ignore[union-attr]
        first = session.read()
        assert 0 < len(first) < 400
        # records read: each span's entry and return, and perhaps one entry whose return
        # did not fit (the ring holds whatever whole records fit, not whole pairs)
        read = session.stats.hits["args6"]
        assert read - 2 * len(first) in (0, 1)
        # the kernel's own hit counters know the loss before any PERF_RECORD_LOST
        assert session.dropped() == 2 * 400 - read  # records: entry + return per call
        # the kernel writes PERF_RECORD_LOST once space is free, before the next record
        later = run(session, ctarget, "args6 9 8 7 6 5 4")
        assert session.stats.lost == 2 * 400 - read
    assert len(later) == 1
    assert [later[0].args[k] for k in "abcdef"] == [9, 8, 7, 6, 5, 4]
    assert later[0].args["sum"] == 39
    assert all(s.duration_ns >= 0 for s in first)


def test_target_exit_ends_the_session(ctarget: CTarget, profile: Profile) -> None:
    with UprobeSession([Target(ctarget.pid)], sites_for(ctarget, profile, "work")) as session:
        spans = run(session, ctarget, "work 10")
        ctarget.proc.stdin.write("exit\n")  # type: ignore[union-attr]
        ctarget.proc.stdin.flush()  # type: ignore[union-attr]
        ctarget.proc.wait()
        deadline = time.monotonic() + 5
        while not session.all_exited and time.monotonic() < deadline:
            session.poll(0.05)
        assert session.all_exited
    assert len(spans) == 10


def _text_at(pid: int, site: ProbeSite) -> int:
    """The byte the target executes at ``site`` now (0xCC while a uprobe sits there)."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        span, perms, offset, _dev, inode, *_ = line.split()
        start, end = (int(x, 16) for x in span.split("-"))
        file_start = int(offset, 16)
        if (int(inode) == site.inode and "x" in perms
                and file_start <= site.offset < file_start + end - start):
            with open(f"/proc/{pid}/mem", "rb") as mem:
                mem.seek(start + site.offset - file_start)
                return mem.read(1)[0]
    raise AssertionError(f"{site.symbol} is not mapped executable")


def test_close_unregisters_every_uprobe_and_closes_every_fd(ctarget: CTarget) -> None:
    """Many sites (every ``pl_*`` function, entry and return): while attached each one's
    first instruction in the target is the kernel's breakpoint; after close() the target
    runs its own bytes again at every site (no uprobe left registered) and no fd stays
    open. Asserted, not timed: bench/detach_cost.py measures how long closing takes."""
    sites = place_symbol(Target(ctarget.pid), "ctarget", "pl_*", ret=True)
    assert len(sites) >= 8
    own = {}
    for site in sites:
        with open(site.open_path, "rb") as f:
            f.seek(site.offset)
            own[site.offset] = f.read(1)[0]
    assert all(byte != 0xCC for byte in own.values())
    before = open_fds()
    session = UprobeSession([Target(ctarget.pid)], sites, mode="thread").open()
    try:
        assert {_text_at(ctarget.pid, site) for site in sites} == {0xCC}
    finally:
        session.close()
    assert {s.offset: _text_at(ctarget.pid, s) for s in sites} == own
    assert open_fds() == before
    assert ctarget.cmd("work 3") >= 0  # the target runs on


def test_close_is_idempotent_and_releases_every_fd(ctarget: CTarget, profile: Profile) -> None:
    before = open_fds()
    session = UprobeSession([Target(ctarget.pid)], sites_for(ctarget, profile), mode="thread")
    session.open()
    assert session.stats.events_open > 0
    assert len(open_fds()) > len(before)
    session.close()
    session.close()
    assert open_fds() == before
    assert session.read() == []


def test_detach_one_site_keeps_the_others(ctarget: CTarget, profile: Profile) -> None:
    sites = sites_for(ctarget, profile, "work", "outer")
    with UprobeSession([Target(ctarget.pid)], sites) as session:
        work_index = next(i for i, s in enumerate(sites) if s.probe == "work")
        session.detach_site(work_index)
        spans = run(session, ctarget, "work 5")
        assert spans == []
        spans = run(session, ctarget, "nested 3")
        assert [s.probe for s in spans] == ["outer"]
        session.reattach_site(work_index)
        assert len(run(session, ctarget, "work 5")) == 5


def test_profile_decisions_name_what_is_missing(ctarget: CTarget, profile: Profile) -> None:
    placement = place_profile(Target(ctarget.pid), profile, "sentinel")
    by_id = {d.probe: d for d in placement.decisions}
    assert "inner" not in by_id  # deepdive only
    assert by_id["missing"].status == "missing"
    assert "pl_does_not_exist" in by_id["missing"].reason
    work = by_id["work"].sites[0]
    assert work.offset == work.function_offset + 4  # placed after endbr64
    assert work.site == "emulated"  # push %rbp follows


def test_probe_in_a_deleted_executable(ctarget_exe: Path, tmp_path: Path,
                                       profile: Profile) -> None:
    copy = tmp_path / "ctarget-copy"
    copy.write_bytes(ctarget_exe.read_bytes())
    copy.chmod(0o755)
    target = CTarget(copy)
    try:
        copy.unlink()
        mapped = [f for f in Target(target.pid).mapped_files() if f.name == "ctarget-copy"]
        assert mapped and mapped[0].deleted and "/map_files/" in mapped[0].open_path
        sites = place_symbol(Target(target.pid), "ctarget-copy", "pl_work", ret=True)
        with UprobeSession([Target(target.pid)], sites) as session:
            assert len(run(session, target, "work 25")) == 25
    finally:
        target.close()


def test_unknown_symbol_suggests_near_names(ctarget: CTarget) -> None:
    with pytest.raises(SymbolNotFoundError) as err:
        place_symbol(Target(ctarget.pid), "ctarget", "pl_wrok", ret=False)
    assert "pl_work" in err.value.near


@pytest.mark.anyio
async def test_async_batches_until_the_target_exits(ctarget: CTarget, profile: Profile) -> None:
    import anyio

    sites = sites_for(ctarget, profile, "outer")
    session = UprobeSession([Target(ctarget.pid)], sites, urgent={"outer"}, mode="thread")
    got: list[Span] = []
    with session:
        async def drive() -> None:
            await anyio.sleep(0.1)
            for _ in range(5):
                await anyio.to_thread.run_sync(ctarget.cmd, "nested 2")
            await anyio.to_thread.run_sync(ctarget.close)

        async with anyio.create_task_group() as tg:
            tg.start_soon(drive)
            with anyio.fail_after(20):
                async for batch in session.batches():
                    got.extend(batch)
    assert [s.probe for s in got] == ["outer"] * 5


def test_urgent_site_wakes_the_reader_with_its_return_not_its_entry(ctarget: CTarget) -> None:
    """An urgent entry+return site's entry is in the ring without making it readable (no
    wake-up: nothing to judge yet, and each costs the target 10-14 µs); its return wakes
    the reader at once. The call sleeps 1.5 s, so "in the ring, not readable" is checked
    while the call is surely still running."""
    sites = place_symbol(Target(ctarget.pid), "ctarget", "pl_sleep_us", ret=True)
    with UprobeSession([Target(ctarget.pid)], sites, urgent={sites[0].probe},
                       mode="thread") as session:
        [ring] = [r for (tid, _cpu), r in session._rings.items() if tid == ctarget.pid]
        poller = select.poll()
        poller.register(ring.owner_fd, select.POLLIN)
        call = threading.Thread(target=ctarget.cmd, args=("sleep 1500000 1",))
        call.start()
        deadline = time.monotonic() + 1.0
        while ring.pending_bytes() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        entered = ring.pending_bytes() > 0
        readable_on_entry = poller.poll(0)
        call.join(30)
        readable_on_return = poller.poll(5000)
        spans = session.read()
    assert entered and not readable_on_entry
    assert readable_on_return
    assert [s.probe for s in spans] == [sites[0].probe]


@pytest.mark.anyio
async def test_deliver_hands_spans_over_inside_the_reader_callback(
        ctarget: CTarget, profile: Profile) -> None:
    """deliver() runs the consumer in the ring's wake-up callback itself (no task, no
    queue between the kernel's wake-up and the engine), ends when the target exits, and
    raises what the consumer raised."""
    import anyio

    sites = sites_for(ctarget, profile, "outer")
    got: list[Span] = []
    in_task: list[bool] = []

    def on_spans(spans: list[Span]) -> None:
        in_task.append(asyncio.current_task() is not None)
        got.extend(spans)

    with UprobeSession([Target(ctarget.pid)], sites, urgent={"outer"},
                       mode="thread") as session:
        async def drive() -> None:
            await anyio.sleep(0.1)
            for _ in range(5):
                await anyio.to_thread.run_sync(ctarget.cmd, "nested 2")
                await anyio.sleep(0.05)
            await anyio.to_thread.run_sync(ctarget.close)

        async with anyio.create_task_group() as tg:
            tg.start_soon(drive)
            with anyio.fail_after(20):
                await session.deliver(on_spans)
    assert [s.probe for s in got] == ["outer"] * 5
    assert in_task and not any(in_task)  # every call came from a loop callback


@pytest.mark.anyio
async def test_deliver_raises_what_the_consumer_raised(ctarget: CTarget,
                                                       profile: Profile) -> None:
    import anyio

    def on_spans(spans: list[Span]) -> None:
        raise RuntimeError(f"engine broke on {len(spans)} spans")

    with UprobeSession([Target(ctarget.pid)], sites_for(ctarget, profile, "outer"),
                       urgent={"outer"}, mode="thread") as session:
        async def drive() -> None:
            await anyio.sleep(0.1)
            await anyio.to_thread.run_sync(ctarget.cmd, "nested 1")

        async with anyio.create_task_group() as tg:
            tg.start_soon(drive)
            with anyio.fail_after(20), pytest.raises(RuntimeError, match="engine broke on 1"):
                await session.deliver(on_spans)
        assert session.fds()  # nothing else changed: still attached, readers removed


@pytest.mark.anyio
async def test_async_reader_follows_new_threads_from_the_opener(
        ctarget: CTarget, profile: Profile) -> None:
    """Under a loop, new threads' events are opened on the session's opener thread (a
    uprobe per thread costs ms to register) and installed by the reader; exited ones go
    to the closer. Every thread is seen, and nothing is left open.

    A thread runs a little before it is attached (see ``test_threads_are_followed``): with
    200 calls a thread, a clean-clone suite run missed 116 of 800 calls in all (1 run in
    5). Each thread now lives ~1 s and must be followed from the first half of it."""
    import anyio

    before = open_fds()
    session = UprobeSession([Target(ctarget.pid)], sites_for(ctarget, profile, "work"),
                            mode="thread")
    got: list[Span] = []
    with session:
        async def drive() -> None:
            await anyio.sleep(0.1)
            await anyio.to_thread.run_sync(ctarget.cmd, "threads 4 1000 1000")
            await anyio.sleep(0.5)

        async def read() -> None:
            async for batch in session.batches():
                got.extend(batch)

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            with anyio.fail_after(20):
                await drive()
                while session.stats.threads_exited < 4:
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        stats = session.stats
    tids = Counter(s.tid for s in got)
    assert len(tids) == 4 and min(tids.values()) >= 500, sorted(tids.values())
    assert stats.threads_attached >= 1 + 4 and stats.closes_queued >= 2 * 4
    assert stats.closes_done == stats.closes_queued
    assert open_fds() == before


def test_records_that_straddle_the_ring_end_decode_correctly(
        ctarget: CTarget, profile: Profile) -> None:
    # 80-byte records (header, id/tid/time, 32 bytes of stack) in a 4096-byte ring: the
    # ring wraps five times, and records are split across its end (4096 % 80 != 0)
    sites = sites_for(ctarget, profile, "struct")
    with UprobeSession([Target(ctarget.pid)], sites, mode="thread", ring_pages=1,
                       drain_interval_s=3600) as session:
        spans: list[Span] = []
        for batch in range(15):
            for i in range(20):
                ctarget.cmd(f"struct {batch} {i} {batch * 1000 + i}")
            spans += session.read()
        ring = next(iter(session._rings.values()))
        assert ring.stats.bytes > 5 * ring.data_bytes  # wrapped five times
    assert session.stats.lost == 0
    assert [(s.args["sa"], s.args["sb"], s.args["sc"]) for s in spans] == [
        (b, i, b * 1000 + i) for b in range(15) for i in range(20)]
