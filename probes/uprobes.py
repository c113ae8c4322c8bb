"""Attach probe sites to running processes and turn their hits into spans.

Two ways to see every thread of a target, because a per-task perf event sees only its
own thread (``docs/performance.md`` has the measurement that chose between them):

``thread``
    One ring per thread. Its owner is a software *dummy* event with ``task`` records on,
    so the kernel tells us at once when that thread creates another (``PERF_RECORD_FORK``)
    and when it exits; ``/proc/PID/task`` is also rescanned periodically. Probes are
    installed only in the target's address space. A thread that makes calls in the few
    hundred microseconds before it is attached loses those calls.
``cpu``
    One ring per CPU, events for all tasks, filtered by PID here. Nothing is missed
    however short-lived a thread is, but the breakpoint is installed in every process
    that maps the probed file, so it is only chosen automatically (``auto``) when no
    other process maps it.

Four pieces, the last two shared with the eBPF backend (:mod:`probes.bpf.session`): this
module reads the rings and follows threads; :mod:`probes.pairing` (pure) pairs the decoded records
into spans, counting what cannot pair (a return read before its entry from another
CPU's ring waits one read for it; entries of a thread that exits, or that sit before a
loss in the same ring, are dropped, as are calls a ``longjmp`` abandoned);
:mod:`probes.delivery` hands the spans to an asyncio loop (:meth:`UprobeSession.deliver`,
:meth:`UprobeSession.batches`) or a synchronous caller (:meth:`UprobeSession.poll`);
:mod:`probes.workers` opens new threads' rings and closes retired ones off the loop.
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from probes.delivery import DeliveredSession
from probes.errors import PerfOpenError, ProbeError, TargetExitedError
from probes.pairing import ArgValue, EventLayout, Span, SpanPairer
from probes.perf import (
    ARG_REGISTERS,
    PERF_RECORD_EXIT,
    PERF_RECORD_FORK,
    PERF_RECORD_LOST,
    REG_SP,
    RETURN_REGISTER,
    EventSpec,
    PerfRing,
    Sample,
    disable,
    online_cpus,
    open_ring_owner,
    open_uprobe,
    registers_for,
)
from probes.placement import ProbeSite
from probes.target import Target
from probes.workers import Closer, Opener, SessionStats

__all__ = ["ArgValue", "SessionStats", "Span", "UprobeSession", "attach", "processes_mapping"]
"""The session's public names; ``Span`` and ``ArgValue`` live in :mod:`probes.pairing`."""

WATCHER_PAGES = 16  # room for ~1,100 fork/exit records between two reads


def _read_count(fd: int) -> int:
    """The event's counter: how many times the probe fired (0 if unreadable)."""
    try:
        raw = os.read(fd, 8)
    except OSError:
        return 0
    return int.from_bytes(raw, "little") if len(raw) == 8 else 0


def processes_mapping(inodes: set[int], exclude: set[int]) -> set[int]:
    """PIDs (outside ``exclude``) that map a file with one of ``inodes``."""
    found: set[int] = set()
    needles = {f" {i} " for i in inodes}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            with open(f"/proc/{entry}/maps") as f:
                text = f.read()
        except OSError:
            continue
        if any(n in text for n in needles):
            found.add(int(entry))
    return found


class UprobeSession(DeliveredSession):
    """Uprobes on one or more targets, read as spans. One owner of every fd and mmap.

    Use as a context manager or call :meth:`close` (idempotent). Synchronous callers use
    :meth:`poll`; asyncio callers use :meth:`deliver` or iterate :meth:`batches` (both
    from :class:`~probes.delivery.DeliveredSession`).
    """

    backend = "perf"
    """Which backend this is (the governor costs its hits with ``HitCosts.for_backend``)."""

    def __init__(self, targets: Sequence[Target], sites: Sequence[ProbeSite], *,
                 mode: str = "auto", ring_pages: int = 64, urgent: Collection[str] = (),
                 drain_interval_s: float = 0.02, rescan_interval_s: float = 0.25,
                 max_depth: int = 512) -> None:
        """Prepare a session; nothing is opened until :meth:`open`.

        Args:
            targets: processes to watch.
            sites: probe sites (from :mod:`probes.placement`).
            mode: ``thread``, ``cpu`` or ``auto`` (cpu when no other process maps the
                probed files, else thread).
            ring_pages: data pages per ring (a power of two).
            urgent: probe ids whose spans wake the reader as they complete (the
                return of an entry+return site, the entry of an entry-only one), so a
                finished iteration reaches the engine within a millisecond; each such
                wake-up costs the target 10–14 µs, so name only per-iteration probes.
                Other records wait for the next drain or for a ring half full.
            drain_interval_s: how often rings are drained without a wake-up.
            rescan_interval_s: how often ``/proc`` is read for new or exited threads and
                targets (thread mode learns of threads at once from FORK/EXIT records;
                the rescan is the safety net, and reading ``/proc`` every drain cost the
                monitor's loop ~2 % of a core per target).
            max_depth: most pending entries per (thread, probe) (runaway recursion guard).
        """
        if mode not in ("auto", "thread", "cpu"):
            raise ValueError(f"unknown mode {mode!r}")
        self.targets = list(targets)
        self.pids = {t.pid for t in self.targets}
        self.sites = list(sites)
        self.requested_mode = mode
        self.mode = mode
        self.ring_pages = ring_pages
        self.urgent = set(urgent)
        self.drain_interval_s = drain_interval_s
        self.rescan_interval_s = rescan_interval_s
        self.max_depth = max_depth
        self.stats = SessionStats()
        self.detached_sites: set[int] = set()
        self.exited_pids: set[int] = set()
        self._event_fds: dict[int, list[tuple[PerfRing, int]]] = {}  # site → (ring, fd)
        self._rings: dict[tuple[int, int], PerfRing] = {}  # (tid or -1, cpu or -1) → ring
        self._ring_pid: dict[int, int] = {}  # id(ring) → target pid (thread mode)
        self._watchers: dict[int, PerfRing] = {}  # tid → ring of its FORK/EXIT records
        self._closed_counts: Counter[str] = Counter()  # kernel hit counts of closed fds
        # pairs the decoded records into spans; counts into this session's stats
        self.pairer = SpanPairer(self.sites, max_depth=max_depth, stats=self.stats)
        self._last_rescan = 0.0
        self._opened = False
        self._closed = False
        self._held: list[Span] = []  # spans that ended while the last read was draining
        super().__init__()  # watches the rings on an asyncio loop, hands the spans over
        self._closer: Closer | None = None
        self._opener: Opener[_BuiltRing] | None = None
        self._opening: set[int] = set()  # tids whose rings the opener is building

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> UprobeSession:
        """Open every event; raises a :class:`ProbeError` subclass on setup failure."""
        if self._opened:
            return self
        self._opened = True
        try:
            if self.mode == "auto":
                inodes = {s.inode for s in self.sites}
                others = processes_mapping(inodes, self.pids | {os.getpid()})
                self.mode = "thread" if others else "cpu"
            if self.mode == "cpu":
                self.pairer.pid_filter = self.pids  # per-CPU rings see every process
                for cpu in online_cpus():
                    self._open_ring(-1, cpu, pid=-1)
            else:
                for target in self.targets:
                    try:
                        tids = target.threads()
                    except TargetExitedError:
                        self.exited_pids.add(target.pid)
                        continue
                    for tid in tids:
                        self._attach_thread(target.pid, tid)
                if self.exited_pids == self.pids:
                    raise TargetExitedError("every target exited before probes were attached")
        except BaseException:
            self.close()
            raise
        self._last_rescan = time.monotonic()
        return self

    def __enter__(self) -> UprobeSession:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Detach every probe, unmap every ring, close every fd (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for ring in [*self._rings.values(), *self._watchers.values()]:
            if ring.fds:
                self._delivery.unwatch(ring.owner_fd)
            ring.close()
        self._rings.clear()
        self._watchers.clear()
        self._event_fds.clear()
        self.pairer.events.clear()
        self.stats.events_open = 0
        if self._opener is not None:
            self._opener.finish()
            for _pid, _tid, built in self._opener.finished():
                if not isinstance(built, BaseException):
                    built.close()
        self._opening.clear()
        if self._closer is not None:
            self._closer.finish()  # nothing stays registered once close returns

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    # ------------------------------------------------------------------ opening
    def _open_ring(self, tid: int, cpu: int, *, pid: int) -> PerfRing:
        return self._install_ring(tid, cpu, pid, self._build_ring(tid, cpu))

    def _build_ring(self, tid: int, cpu: int) -> _BuiltRing:
        """Open a ring and its events; touches no session state (runs on the opener)."""
        ring = PerfRing(self.ring_pages)
        watcher = PerfRing(WATCHER_PAGES) if tid != -1 else None
        events: list[tuple[int, int, int, EventSpec]] = []
        try:
            ring.add(open_ring_owner(tid, cpu, task_events=False,
                                     watermark_bytes=ring.data_bytes // 2), EventSpec("", 0))
            if watcher is not None:
                # thread creation and exit must be seen at once: a tiny ring of its own
                # that wakes on every record (they are rare)
                watcher.add(open_ring_owner(tid, cpu, task_events=True, watermark_bytes=1),
                            EventSpec("", 0))
            for index, site in enumerate(self.sites):
                if index not in self.detached_sites:
                    events += self._open_site_events(ring, index, site, tid, cpu)
        except BaseException:
            ring.close()
            if watcher is not None:
                watcher.close()
            raise
        return _BuiltRing(ring, watcher, events)

    def _install_ring(self, tid: int, cpu: int, pid: int, built: _BuiltRing) -> PerfRing:
        """Make a built ring part of the session (on the reader's thread)."""
        ring, watcher = built.ring, built.watcher
        for index, _eid, fd, _spec in built.events:
            if index in self.detached_sites:  # detached while the ring was being built
                self._retire_fd(ring, fd)
        self._register_events(ring, [e for e in built.events if e[0] not in self.detached_sites])
        self._rings[(tid, cpu)] = ring
        self._ring_pid[id(ring)] = pid
        if watcher is not None:
            self._watchers[tid] = watcher
        self._delivery.watch(ring.owner_fd)
        if watcher is not None:
            self._delivery.watch(watcher.owner_fd)
        return ring

    def _open_site_events(self, ring: PerfRing, index: int, site: ProbeSite, tid: int,
                          cpu: int) -> list[tuple[int, int, int, EventSpec]]:
        """Open one site's events into ``ring``: (site index, event id, fd, spec) each."""
        entry_args = site.entry_registers
        # an entry+return site records the stack pointer too: it tells which entry a
        # return belongs to, and which entries were abandoned (longjmp)
        sp = (REG_SP,) if site.ret else ()
        entry = EventSpec(site.open_path, site.offset, False,
                          tuple(sorted({*registers_for(entry_args), *sp})),
                          site.stack_bytes)
        specs = [entry]
        if site.ret:
            specs.append(EventSpec(
                site.open_path, site.offset, True,
                tuple(sorted({*registers_for((), site.wants_return_value), *sp}))))
        # an urgent site wakes the reader with the record that completes its span (the
        # return, when there is one): the entry's wake-up would find nothing to judge
        last = specs[-1] if site.probe in self.urgent else None
        opened = []
        for spec in specs:
            fd = open_uprobe(spec, tid, cpu, wakeup_events=1 if spec is last else 0)
            opened.append((index, ring.add(fd, spec), fd, spec))
        return opened

    def _register_events(self, ring: PerfRing,
                         opened: Iterable[tuple[int, int, int, EventSpec]]) -> None:
        """Make events opened into ``ring`` known to the reader (decoding, counts)."""
        for index, eid, fd, spec in opened:
            self.pairer.events[eid] = self._event_layout(index, self.sites[index], spec)
            self._event_fds.setdefault(index, []).append((ring, fd))
            self.stats.events_open += 1

    def _retire_fd(self, ring: PerfRing, fd: int) -> None:
        """Stop one event now (no record from here on) and close it on the closer."""
        with contextlib.suppress(PerfOpenError):
            disable(fd)
        if ring.release(fd):
            self._close_later(functools.partial(os.close, fd))

    @staticmethod
    def _event_layout(index: int, site: ProbeSite, spec: EventSpec) -> EventLayout:
        """Where an event's records carry each captured value (its registers' order)."""
        order = {reg: i for i, reg in enumerate(spec.registers)}
        regs: list[tuple[str, int]] = []
        stack: list[tuple[str, int, int, Callable[[bytes], ArgValue]]] = []
        for cap in site.captures:
            if spec.is_return:
                if cap.source == "ret":
                    regs.append((cap.name, order[RETURN_REGISTER]))
            elif cap.source == "reg" and cap.register is not None:
                regs.append((cap.name, order[ARG_REGISTERS[cap.register]]))
            elif cap.source == "stack" and cap.stack_offset is not None:
                stack.append((cap.name, cap.stack_offset, cap.size, cap.decode))
        return EventLayout(index, spec.is_return, tuple(regs), tuple(stack), order.get(REG_SP))

    def _attach_thread(self, pid: int, tid: int) -> None:
        """Attach a thread's events: at once before the loop runs, else on the opener.

        Opening costs ~3 ms per event here (a uprobe is registered per thread): a new
        thread of a target with 20 probe events would stall the reader's loop, and every
        alert waiting on it, for 60 ms. The opener builds the ring in a thread of its own
        and :meth:`read` installs it; the thread's calls before that are missed either
        way.
        """
        if (tid, -1) in self._rings or tid in self._opening:
            return
        loop = self._delivery.loop
        if loop is None:
            try:
                built = self._build_ring(tid, -1)
            except PerfOpenError as exc:
                self._attach_failed(pid, tid, exc)
                return
            self._install_ring(tid, -1, pid, built)
            self.stats.threads_attached += 1
            return
        if self._opener is None:
            self._opener = Opener("uprobe-opener", loop, self._delivery.on_readable)
        self._opening.add(tid)
        self._opener.build(pid, tid, functools.partial(self._build_ring, tid, -1))

    def _attach_failed(self, pid: int, tid: int, exc: PerfOpenError) -> None:
        if "exited" in str(exc) or not os.path.exists(f"/proc/{pid}/task/{tid}"):
            self.stats.thread_attach_failures += 1  # the thread was gone already
            return
        raise exc

    def _install_opened(self) -> None:
        """Install the rings the opener finished (on the reader's thread)."""
        if self._opener is None:
            return
        for pid, tid, built in self._opener.finished():
            self._opening.discard(tid)
            if isinstance(built, BaseException):
                if isinstance(built, PerfOpenError):
                    self._attach_failed(pid, tid, built)
                    continue
                raise built
            if self._closed or pid in self.exited_pids or (tid, -1) in self._rings:
                self._close_later(built.close)
                continue
            self._install_ring(tid, -1, pid, built)
            self.stats.threads_attached += 1

    def _close_later(self, what: Callable[[], None]) -> None:
        """Run ``what`` (closing a ring or an fd) on the session's closer thread.

        Closing a uprobe event unregisters it and waits for the kernel (~80 ms per event
        on this VM, docs/performance.md): a thread that exits with 20 events would stall
        the reader's loop, and with it every alert, for over a second.
        """
        if self._closer is None:
            self._closer = Closer("uprobe-closer", self.stats)
        self._closer.close(what)

    def _detach_thread(self, tid: int, spans: list[Span]) -> None:
        ring = self._rings.pop((tid, -1), None)
        if ring is None:
            return
        self._read_thread_ring(tid, ring, spans)
        for index, pairs in self._event_fds.items():
            for r, fd in pairs:
                if r is ring:
                    self._closed_counts[self.sites[index].probe] += _read_count(fd)
        watcher = self._watchers.pop(tid, None)
        self._delivery.unwatch(ring.owner_fd, *([watcher.owner_fd] if watcher else []))
        if watcher is not None:
            self._close_later(watcher.close)
        for index, pairs in self._event_fds.items():
            self._event_fds[index] = [(r, fd) for r, fd in pairs if r is not ring]
        self.stats.events_open -= len(ring.fds) - 1
        self._close_later(ring.close)
        self.pairer.drop_thread(tid)
        self.stats.threads_exited += 1

    def detach_site(self, index: int) -> None:
        """Remove one probe site from every thread/CPU (the governor's lever)."""
        if index in self.detached_sites:
            return
        self.detached_sites.add(index)
        for ring, fd in self._event_fds.pop(index, []):
            self._closed_counts[self.sites[index].probe] += _read_count(fd)
            self._retire_fd(ring, fd)
            self.stats.events_open -= 1
        self.pairer.drop_site(index)

    def reattach_site(self, index: int) -> None:
        """Put a detached site back on every thread/CPU (for duty cycling)."""
        if index not in self.detached_sites:
            return
        self.detached_sites.discard(index)
        for (tid, cpu), ring in list(self._rings.items()):
            try:
                opened = self._open_site_events(ring, index, self.sites[index], tid, cpu)
            except PerfOpenError:
                continue
            self._register_events(ring, opened)

    def kernel_hits(self) -> Counter[str]:
        """Hits per probe as the kernel counted them (entries plus returns).

        Unlike ``stats.hits`` (records read), this includes records the ring dropped,
        even those whose PERF_RECORD_LOST the kernel has not written yet; the difference
        is the true loss.
        """
        counts = Counter(self._closed_counts)
        for index, pairs in self._event_fds.items():
            probe = self.sites[index].probe
            for _ring, fd in pairs:
                counts[probe] += _read_count(fd)
        return counts

    def dropped(self) -> int:
        """Records the kernel produced that were never read (lost or not yet written).

        Per-CPU events forced onto a file other processes map count their hits too, so
        there only the kernel's PERF_RECORD_LOST counts are used.
        """
        if self.mode == "cpu" and self.requested_mode != "auto":
            return self.stats.lost
        kernel = sum(self.kernel_hits().values())
        return max(self.stats.lost, kernel - sum(self.stats.hits.values()))

    # ------------------------------------------------------------------ threads
    def rescan(self) -> list[Span]:
        """Attach new threads and release exited ones (thread mode); note exited targets."""
        spans: list[Span] = []
        self._last_rescan = time.monotonic()
        if self._closed:
            return spans
        for target in self.targets:
            if target.pid in self.exited_pids:
                continue
            if not target.alive():
                self.exited_pids.add(target.pid)
                if self.mode == "thread":
                    for (tid, _cpu), ring in list(self._rings.items()):
                        if self._ring_pid.get(id(ring)) == target.pid:
                            self._detach_thread(tid, spans)
                continue
            if self.mode != "thread":
                continue
            try:
                live = set(target.threads())
            except TargetExitedError:
                continue
            for tid in live:
                self._attach_thread(target.pid, tid)
            for (tid, _cpu), ring in list(self._rings.items()):
                if self._ring_pid.get(id(ring)) == target.pid and tid not in live:
                    self._detach_thread(tid, spans)
        if self.mode == "cpu":
            gone = {tid for tid in self.pairer.pending_threads()
                    if not os.path.exists(f"/proc/{tid}")}
            self.pairer.drop(lambda tid, _site: tid in gone)
        return spans

    @property
    def all_exited(self) -> bool:
        """True once every target process has exited."""
        return self.exited_pids >= self.pids

    # ------------------------------------------------------------------ reading
    def read(self) -> list[Span]:
        """Drain every ring now and return the spans completed (never blocks).

        The rings are read one after the other, so a call that ends while they are read
        may be seen in a ring read late while an earlier call of another thread (the
        same request's previous step on another worker thread) sits in a ring read
        early, unseen. Only spans that ended before the first ring was read are
        complete in every ring: the others are held for the next read (the wake-up
        their records caused), so an iteration never closes without a span of another
        thread that ended inside it.
        """
        if self._closed:
            return []
        complete_before = time.monotonic_ns()  # the records' clock (CLOCK_MONOTONIC)
        spans: list[Span] = self._held
        self._held = []
        if self.mode == "cpu":
            batch: list[Sample] = []
            for ring in list(self._rings.values()):
                batch.extend(ring.read(self._on_lost_cpu))
            self.pairer.feed_merged(batch, spans)
        else:
            self._install_opened()
            self._follow_threads(spans)
            for (tid, _cpu), ring in list(self._rings.items()):
                if not ring.closed:
                    self._read_thread_ring(tid, ring, spans)
        if time.monotonic() - self._last_rescan >= self.rescan_interval_s:
            spans.extend(self.rescan())
        if not self.all_exited:  # once every target exited, nothing more can come
            spans = self._hold_late(spans, complete_before)
        self.stats.spans += len(spans)
        return spans

    def _hold_late(self, spans: list[Span], complete_before: int) -> list[Span]:
        """Return the spans that ended before ``complete_before``; hold the others."""
        if not spans or max(s.end_ns for s in spans) < complete_before:
            return spans
        ready = [s for s in spans if s.end_ns < complete_before]
        self._held = [s for s in spans if s.end_ns >= complete_before]
        return ready

    def _on_lost_cpu(self, lost: int) -> None:
        self.stats.lost += lost
        # which threads lost what is unknown: every pending entry is suspect
        self.pairer.drop_all()

    def _read_thread_ring(self, tid: int, ring: PerfRing, spans: list[Span]) -> None:
        """Read a thread's ring: pair its samples, follow the threads it created.

        A loss in the ring drops that thread's pending entries (their returns may be
        among the lost records), so a later return never pairs with a wrong entry.
        """
        segments: list[list[Sample]] = [[]]

        def on_lost(lost: int) -> None:
            self.stats.lost += lost
            segments.append([])  # samples after the loss start a new segment

        data = ring.read_raw()
        samples = ring.decode(data, on_lost)
        if len(segments) == 1:
            self.pairer.feed(samples, spans)
        else:
            # decode again, split at each loss, so pending entries die at the loss
            segments = [[]]
            ring.stats.lost -= self._lost_in(data)
            ring.stats.samples -= len(samples)
            for i, part in enumerate(self._split_at_losses(ring, data)):
                if i:
                    self.pairer.drop_thread(tid)
                self.pairer.feed(part, spans)

    def _follow_threads(self, spans: list[Span]) -> None:
        """Attach threads the watchers saw created; release those they saw exit."""
        born: list[tuple[int, int]] = []
        died: list[int] = []

        def on_task(kind: int, pid: int, tid: int) -> None:
            if kind == PERF_RECORD_FORK:
                born.append((pid, tid))
            elif kind == PERF_RECORD_EXIT:
                died.append(tid)

        lost_before = self.stats.thread_records_lost

        def on_lost(lost: int) -> None:
            self.stats.thread_records_lost += lost

        for watcher in list(self._watchers.values()):
            watcher.read(on_lost, on_task)
        if self.stats.thread_records_lost != lost_before:
            self._last_rescan = 0.0  # fork records were lost: rescan /proc at once
        for pid, tid in born:
            if pid in self.pids and pid not in self.exited_pids:
                self._attach_thread(pid, tid)
        for tid in died:
            if tid in self._watchers:
                self._detach_thread(tid, spans)

    @staticmethod
    def _lost_in(data: bytes) -> int:
        total, pos = 0, 0
        while pos + 8 <= len(data):
            rtype, _misc, rsize = struct.unpack_from("<IHH", data, pos)
            if rsize < 8:
                break
            if rtype == PERF_RECORD_LOST:
                total += struct.unpack_from("<Q", data, pos + 16)[0]
            pos += rsize
        return total

    @staticmethod
    def _split_at_losses(ring: PerfRing, data: bytes) -> list[list[Sample]]:
        """Samples of ``data`` in runs separated by PERF_RECORD_LOST records."""
        parts: list[list[Sample]] = []
        pos, start = 0, 0
        while pos + 8 <= len(data):
            rtype, _misc, rsize = struct.unpack_from("<IHH", data, pos)
            if rsize < 8:
                break
            if rtype == PERF_RECORD_LOST:
                parts.append(ring.decode(data[start:pos]))
                start = pos
            pos += rsize
        parts.append(ring.decode(data[start:]))
        return parts

    # ------------------------------------------------------------------ waiting
    def fds(self) -> list[int]:
        """The fds to poll: one per ring."""
        return [r.owner_fd for r in [*self._rings.values(), *self._watchers.values()] if r.fds]


@dataclass
class _BuiltRing:
    """A thread's ring, its watcher and its events, opened but not yet in the session."""

    ring: PerfRing
    watcher: PerfRing | None
    events: list[tuple[int, int, int, EventSpec]]  # (site index, event id, fd, spec)

    def close(self) -> None:
        self.ring.close()
        if self.watcher is not None:
            self.watcher.close()


def attach(targets: Sequence[Target], sites: Sequence[ProbeSite], **options: Any) -> UprobeSession:
    """Open a :class:`UprobeSession` (a context manager) on ``targets`` for ``sites``."""
    if not sites:
        raise ProbeError("no probe site to attach")
    return UprobeSession(targets, sites, **options).open()


