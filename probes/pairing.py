"""Pair decoded probe records into spans: the pure part of a uprobe session.

A probe backend (perf rings in :mod:`probes.uprobes`) reads and decodes records; this
module turns them into :class:`Span` objects and does nothing else: no file, no ring,
no clock, no loop. The backend tells it which event id is which site's entry or return
(:class:`EventLayout`) and when a thread's pending calls can no longer finish (a loss in
its ring, the thread's exit, a detached site).

Entries and returns are paired per (thread, site) with a stack, so nested and recursive
calls pair correctly. Records of one ordered stream (a thread's ring) go to
:meth:`SpanPairer.feed`; records merged from several rings (one per CPU), where a return
can be read before its entry, go to :meth:`SpanPairer.feed_merged`, which lets a return
with no entry wait one call for it before dropping and counting it.

Returns that never come (a ``longjmp`` or an exception unwinding out of a probed call):
the kernel drops such a call's uretprobe without firing it. Every event of an
entry+return site records the stack pointer, and an entry is judged abandoned by the
kernel's own rule (``arch_uretprobe_is_alive``): a call still running sits higher up the
stack than any later call or return of the thread. So an entry whose stack pointer is at
or below a new entry's, or below the frame of a return, is dropped and counted as
unfinished, and a return pairs only with the entry of its own frame (x86-64: the probe
fires before the callee touches the stack, so the return's stack pointer is the entry's
plus the 8-byte return address).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

ArgValue = int | float
RETURN_ADDRESS_BYTES = 8
"""x86-64 ``call`` pushes the return address: a return's stack pointer is its entry's + 8."""

Record = tuple[int, int, int, int, tuple[int, ...], "bytes | None"]
"""A decoded record: (event id, pid, tid, time ns, register values, stack bytes or None).

The same shape as :data:`probes.perf.Sample`; another backend emits it as well.
"""

_Pending = tuple[int, "int | None", dict[str, ArgValue]]
"""An entry waiting for its return: (time ns, stack pointer or None, captured args)."""


@dataclass(frozen=True)
class Span:
    """One call of a probed function: who, when, and the arguments captured.

    Entry-only probes give instant spans (``end_ns == start_ns``). Times are
    CLOCK_MONOTONIC nanoseconds, comparable with ``time.monotonic_ns()``.
    """

    probe: str
    pid: int
    tid: int
    start_ns: int
    end_ns: int
    args: Mapping[str, ArgValue] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def duration_ns(self) -> int:
        """``end_ns - start_ns``."""
        return self.end_ns - self.start_ns


@dataclass(frozen=True)
class EventLayout:
    """What one event id's records carry: whose entry or return, and where each value is."""

    site: int
    """Index of the site in the pairer's ``sites``."""
    is_return: bool
    reg_slots: tuple[tuple[str, int], ...] = ()
    """(arg name, index into the record's register tuple) for register captures."""
    stack_slots: tuple[tuple[str, int, int, Callable[[bytes], ArgValue]], ...] = ()
    """(arg name, offset, size, decoder) for captures from the record's stack bytes."""
    sp_slot: int | None = None
    """Index of the stack pointer in the register tuple (entry+return sites)."""


def _start_of(entry: _Pending) -> int:
    return entry[0]


class PairedSite(Protocol):
    """What the pairer needs of a probe site (:class:`probes.placement.ProbeSite` fits)."""

    @property
    def probe(self) -> str:
        """The probe id spans are named after."""

    @property
    def ret(self) -> bool:
        """True when the site has a return event (its entries wait for it)."""


class PairingCounters(Protocol):
    """Counters the pairer updates (:class:`probes.uprobes.SessionStats` fits)."""

    hits: Counter[str]
    unfinished: int
    orphan_returns: int


@dataclass
class PairingStats:
    """The pairer's own counters when no session's are given."""

    hits: Counter[str] = field(default_factory=Counter)
    """Records paired or counted, per probe."""
    unfinished: int = 0
    """Entries dropped without a return (abandoned, lost, thread gone, site detached)."""
    orphan_returns: int = 0
    """Returns dropped without an entry."""


class SpanPairer:
    """Turns decoded entry and return records into spans; holds the calls in progress.

    Pure: what it returns depends only on what it was fed. One pairer per session;
    not thread-safe (the session's reader owns it).
    """

    def __init__(self, sites: Sequence[PairedSite], *, max_depth: int = 512,
                 stats: PairingCounters | None = None) -> None:
        """Pair records of ``sites``.

        Args:
            sites: the probe sites, indexed by :attr:`EventLayout.site`.
            max_depth: most pending entries per (thread, site), a runaway recursion
                guard: the oldest is dropped and counted beyond it.
            stats: counters to update (hits, unfinished, orphan returns); by default the
                pairer's own :class:`PairingStats`.
        """
        self.sites = sites
        self.max_depth = max_depth
        self.stats: PairingCounters = stats if stats is not None else PairingStats()
        self.events: dict[int, EventLayout] = {}
        """Event id → layout; records of an unknown event id are ignored."""
        self.pid_filter: Collection[int] | None = None
        """When set, records of other processes are ignored (per-CPU rings see all)."""
        self._pending: dict[tuple[int, int], list[_Pending]] = {}  # (tid, site) → stack
        self._orphans: list[Record] = []  # returns waiting one merged read for an entry

    # ------------------------------------------------------------------ feeding
    def feed(self, records: Iterable[Record], out: list[Span] | None = None) -> list[Span]:
        """Pair the records of one ordered stream; returns the spans they complete.

        A return whose entry is not pending is dropped and counted
        (``orphan_returns``). Spans are appended to ``out`` when given.
        """
        spans = [] if out is None else out
        self._pair(records, spans, hold_orphans=False)
        return spans

    def feed_merged(self, records: Iterable[Record],
                    out: list[Span] | None = None) -> list[Span]:
        """Pair records merged from several rings, in time order with those held back.

        A return with no pending entry may have been read before its entry (from
        another CPU's ring): it is held until the next call, then dropped and counted.
        An entry read after later entries of its thread is stacked beneath them, and a
        return passes over entries from after it.
        """
        spans = [] if out is None else out
        batch = list(records)
        retried = self._orphans
        if retried:
            batch.extend(retried)
            self._orphans = []
        batch.sort(key=lambda r: r[3])
        self._pair(batch, spans, hold_orphans=True, retried=retried)
        return spans

    def _pair(self, records: Iterable[Record], spans: list[Span], *,
              hold_orphans: bool, retried: Collection[Record] = ()) -> None:
        events = self.events
        pending = self._pending
        pids = self.pid_filter
        stats = self.stats
        hits = stats.hits
        sites = self.sites
        for record in records:
            eid, pid, tid, t, regs, stack = record
            if pids is not None and pid not in pids:
                continue
            info = events.get(eid)
            if info is None:
                continue
            site = sites[info.site]
            hits[site.probe] += 1
            sp = regs[info.sp_slot] if info.sp_slot is not None and regs else None
            if not info.is_return:
                args: dict[str, ArgValue] = {}
                if regs:
                    for name, i in info.reg_slots:
                        args[name] = regs[i]
                if stack is not None:
                    for name, off, size, decode in info.stack_slots:
                        chunk = stack[off:off + size]
                        if len(chunk) == size:
                            args[name] = decode(chunk)
                if site.ret:
                    stack_list = pending.setdefault((tid, info.site), [])
                    if sp is not None:
                        self._drop_abandoned(stack_list, t, sp)
                    if len(stack_list) >= self.max_depth:
                        stack_list.pop(0)
                        stats.unfinished += 1
                    if stack_list and stack_list[-1][0] > t:
                        # read late (another CPU's ring): below the calls it came before
                        bisect.insort(stack_list, (t, sp, args), key=_start_of)
                    else:
                        stack_list.append((t, sp, args))
                else:
                    spans.append(Span(site.probe, pid, tid, t, t, MappingProxyType(args)))
                continue
            waiting = pending.get((tid, info.site))
            entry = self._entry_of_return(waiting, t, sp) if waiting else None
            if entry is not None:
                start, _sp, args = entry
                if info.reg_slots and regs:
                    args = dict(args)
                    for name, i in info.reg_slots:
                        args[name] = regs[i]
                spans.append(Span(site.probe, pid, tid, start, t, MappingProxyType(args)))
            elif hold_orphans and record not in retried and record not in self._orphans:
                self._orphans.append(record)
                hits[site.probe] -= 1  # counted again when retried
            else:
                stats.orphan_returns += 1

    def _drop_abandoned(self, waiting: list[_Pending], t: int, sp: int) -> None:
        """Drop (and count) entries a new entry at ``sp`` (time ``t``) shows were abandoned.

        A call still running is higher up the stack than any call made after it, so a
        pending entry from before ``t`` at or below ``sp`` was left by a longjmp: its
        return never comes. Entries from after ``t`` (read earlier, from another CPU's
        ring) are kept, and the ones beneath them judged.
        """
        top = len(waiting)
        while top and waiting[top - 1][0] > t:
            top -= 1
        while top:
            entry_sp = waiting[top - 1][1]
            if entry_sp is None or entry_sp > sp:
                return
            top -= 1
            del waiting[top]
            self.stats.unfinished += 1

    def _entry_of_return(self, waiting: list[_Pending], t: int,
                         sp: int | None) -> _Pending | None:
        """Take the pending entry a return at ``sp`` (time ``t``) closes, if it is there.

        Entries from after ``t`` (read earlier, from another CPU's ring) are passed over.
        Entries below the returning frame were abandoned (a longjmp out of them into this
        call): dropped and counted. ``None`` when the entry is an outer call: this
        return's own entry was not seen (lost, or not read yet). Without stack pointers,
        the last entry from before ``t`` is taken.
        """
        top = len(waiting)
        while top and waiting[top - 1][0] > t:
            top -= 1
        while top:
            entry_sp = waiting[top - 1][1]
            if sp is None or entry_sp is None:
                return waiting.pop(top - 1)
            frame = entry_sp + RETURN_ADDRESS_BYTES
            if frame == sp:
                return waiting.pop(top - 1)
            if frame > sp:
                return None
            top -= 1
            del waiting[top]  # below the returning frame: abandoned
            self.stats.unfinished += 1
        return None

    # ------------------------------------------------------------------ dropping
    def drop(self, which: Callable[[int, int], bool]) -> int:
        """Drop (and count as unfinished) the pending entries of each (tid, site) chosen.

        Called when their returns can no longer be trusted to come: a loss in the
        thread's ring, the thread's exit, a detached site. Returns how many were dropped.
        """
        dropped = 0
        for key in [k for k in self._pending if which(*k)]:
            dropped += len(self._pending.pop(key))
        self.stats.unfinished += dropped
        return dropped

    def drop_thread(self, tid: int) -> int:
        """Drop one thread's pending entries (it exited, or its ring lost records)."""
        return self.drop(lambda t, _site: t == tid)

    def drop_site(self, site: int) -> int:
        """Drop one site's pending entries (it was detached)."""
        return self.drop(lambda _tid, s: s == site)

    def drop_all(self) -> int:
        """Drop every pending entry (a loss whose thread is unknown)."""
        return self.drop(lambda _tid, _site: True)

    def pending_threads(self) -> set[int]:
        """Threads with an entry waiting for its return."""
        return {tid for tid, _site in self._pending}

    def pending_entries(self) -> int:
        """How many entries wait for their return."""
        return sum(len(stack) for stack in self._pending.values())

    def held_returns(self) -> int:
        """Returns held by :meth:`feed_merged` for the next call."""
        return len(self._orphans)
