"""``BpfSession``: probe sites as eBPF uprobes whose spans are paired in the kernel.

The perf backend (:mod:`probes.uprobes`) reads every entry and every return into
Python, per thread ring, and pairs them there; a target with many threads costs one ring
and one set of uprobe events per thread, and each event's close waits for its own RCU
grace period (~80 ms). Here one program (``spans.bpf.c``) is attached with one
``uprobe_multi`` link per (target, file, entry or return), filtered to the target's pid
so every thread, old or new, is covered; the kernel pairs each return with its entry
and writes one record per span into a single BPF ring buffer, waking the reader only
for the urgent (anchor) probe or the record that fills the ring past half. Closing the
links detaches every uprobe in one grace period per link.

The session offers what the monitor uses of :class:`~probes.uprobes.UprobeSession`
(:meth:`read`, :meth:`detach_site`, :meth:`reattach_site`, :meth:`kernel_hits`,
:meth:`dropped`, ``stats``) and gives the same :class:`~probes.uprobes.Span` objects;
:meth:`poll`, :meth:`deliver` and :meth:`batches` are the perf session's own code
(:class:`~probes.delivery.DeliveredSession`), and a detached site's links close on the
same kind of closer thread (:class:`~probes.workers.Closer`).
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import struct
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from probes.bpf.loader import BpfUnavailableError, SpanProgram
from probes.delivery import DeliveredSession
from probes.errors import ProbeError
from probes.pairing import ArgValue, Span
from probes.perf import ring_positions
from probes.placement import ProbeSite
from probes.target import Target
from probes.workers import Closer, SessionStats

# must match spans.bpf.c
STACK_BYTES = 32
COOKIE_URGENT = 1 << 32
COOKIE_PAIRED = 1 << 33
COOKIE_STACK = 1 << 34
COOKIE_RETURN = 1 << 35
STAT_LOST, STAT_ORPHANS, STAT_OVERWRITTEN = 1, 2, 3
MAX_SITES = 1024
WAKE_GAP_NS = 0
"""The `wake` map's key of the urgent wake-ups' least gap (spans.bpf.c)."""
CLOSE_THREADS = 64
"""Links closed at once by :meth:`BpfSession.close` (each waits for a grace period)."""
# ring buffer record: 8-byte header (length with BUSY/DISCARD bits, page offset), then
# struct span_record: site, tid, pid, flags, start, end, args[6], ret, stack[32]
RECORD = struct.Struct(f"<IIIIIIQQ6QQ{STACK_BYTES}s")
RINGBUF_BUSY = 1 << 31
RINGBUF_DISCARD = 1 << 30
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class _Decode:
    """How to turn one site's record into span arguments."""

    probe: str
    regs: tuple[tuple[str, int], ...]  # (name, index into args[6])
    ret: tuple[str, ...]  # names of return-value captures
    stack: tuple[tuple[str, int, int, Callable[[bytes], ArgValue]], ...]
    paired: bool


class BpfRing:
    """The consumer side of a BPF ring buffer map, read through ``mmap`` (no libbpf).

    Page 0 is the consumer position (ours to write), page 1 the producer position, then
    the data, mapped twice in a row so a record that wraps reads as one slice.
    """

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.mask = size - 1
        self._consumer = mmap.mmap(fd, PAGE, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(fd, PAGE + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                                   offset=PAGE)
        # single 8-byte accesses: a position the kernel reads half written loses records
        self._consumer_pos = ring_positions(self._consumer, 0, 1)
        self._producer_pos = ring_positions(self._producer, 0, 1)

    def read(self) -> list[tuple[Any, ...]]:
        """Every committed record since the last read, decoded as :data:`RECORD` tuples."""
        cons = self._consumer_pos[0]
        prod = self._producer_pos[0]
        if cons >= prod:
            return []
        start = PAGE + (cons & self.mask)
        chunk = self._producer[start:start + (prod - cons)]
        out: list[tuple[int, ...]] = []
        pos, size = 0, RECORD.size
        for rec in RECORD.iter_unpack(chunk[:len(chunk) - len(chunk) % size]):
            header = rec[0]
            if header & RINGBUF_BUSY:
                break
            length = header & ~(RINGBUF_BUSY | RINGBUF_DISCARD)
            if length + 8 != size:  # not ours: stop rather than misread
                break
            pos += size
            if not header & RINGBUF_DISCARD:
                out.append(rec)
        self._consumer_pos[0] = cons + pos
        return out

    def close(self) -> None:
        self._consumer_pos.release()
        self._producer_pos.release()
        self._consumer.close()
        self._producer.close()


class BpfSession(DeliveredSession):
    """eBPF uprobes on one or more targets, read as spans; one owner of links and maps.

    Use as a context manager or call :meth:`close` (idempotent; every uprobe is
    unregistered when it returns).
    """

    mode = "bpf"
    backend = "bpf"
    """Which backend this is (the governor costs its hits with ``HitCosts.for_backend``)."""

    def __init__(self, targets: Sequence[Target], sites: Sequence[ProbeSite], *,
                 ring_pages: int = 64, urgent: Collection[str] = (),
                 drain_interval_s: float = 0.02, rescan_interval_s: float = 0.25,
                 wake_gap_s: float = 0.0) -> None:
        """Prepare a session; nothing is loaded until :meth:`open`.

        Args:
            targets: processes to watch.
            sites: probe sites (from :mod:`probes.placement`).
            ring_pages: pages of the one ring buffer (rounded up to a power of two).
            urgent: probe ids whose spans wake the reader at once (the anchor).
            drain_interval_s: how often the ring is drained without a wake-up.
            rescan_interval_s: how often targets are checked for having exited.
            wake_gap_s: the least time between two wake-ups by urgent spans (0: each
                wakes the reader); those held back are read by the next wake-up, or by
                the delivery's follow-up read 1.5 gaps after the last one.
        """
        if len(sites) > MAX_SITES:
            raise BpfUnavailableError(f"{len(sites)} probe sites: the BPF program "
                                      f"counts at most {MAX_SITES}")
        for site in sites:
            if site.stack_bytes > STACK_BYTES:
                raise BpfUnavailableError(f"probe {site.probe} reads {site.stack_bytes} "
                                          f"stack bytes; the BPF program reads {STACK_BYTES}")
        self.targets = list(targets)
        self.pids = {t.pid for t in self.targets}
        self.sites = list(sites)
        self.urgent = set(urgent)
        self.ring_bytes = PAGE * (1 << max(0, ring_pages - 1).bit_length())
        self.drain_interval_s = drain_interval_s
        self.rescan_interval_s = rescan_interval_s
        self.wake_gap_s = wake_gap_s
        self.stats = SessionStats()
        self.detached_sites: set[int] = set()
        self.exited_pids: set[int] = set()
        self._decode = [self._decoder(s) for s in self.sites]
        self._program: SpanProgram | None = None
        self._ring: BpfRing | None = None
        self._links: dict[tuple[int, int, bool], int] = {}  # (pid, site, return) → fd
        self._closer: Closer | None = None
        self._last_rescan = 0.0
        self._opened = False
        self._closed = False
        super().__init__()  # watches the ring on an asyncio loop, hands the spans over

    @staticmethod
    def _decoder(site: ProbeSite) -> _Decode:
        regs = tuple((c.name, c.register - 1) for c in site.captures
                     if c.source == "reg" and c.register is not None)
        ret = tuple(c.name for c in site.captures if c.source == "ret")
        stack = tuple((c.name, c.stack_offset, c.size, c.decode) for c in site.captures
                      if c.source == "stack" and c.stack_offset is not None)
        return _Decode(site.probe, regs, ret if site.ret else (), stack, site.ret)

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> BpfSession:
        """Load the program and attach every site; raises a :class:`ProbeError` subclass
        (:class:`BpfUnavailableError` when this host cannot run the backend)."""
        if self._opened:
            return self
        self._opened = True
        try:
            self._program = SpanProgram(self.ring_bytes)
            self._ring = BpfRing(self._program.ring_fd, self.ring_bytes)
            self._program.set_u64(self._program.wake_fd, WAKE_GAP_NS,
                                  int(self.wake_gap_s * 1e9))
            for target in self.targets:
                for index in range(len(self.sites)):
                    self._attach_site(target.pid, index)
        except BaseException:
            self.close()
            raise
        self.stats.events_open = len(self._links)
        self._last_rescan = time.monotonic()
        return self

    def _attach_site(self, pid: int, index: int) -> None:
        """One link for the site's entry, one for its return (when it has one).

        A link per site, not per file: the governor detaches one site by closing its
        links, never by replacing a shared link (a replacement would run beside, or
        after, the old one: calls seen twice or not at all).
        """
        assert self._program is not None
        site = self.sites[index]
        for is_return in (False, True) if site.ret else (False,):
            cookie = index
            if site.probe in self.urgent and (is_return or not site.ret):
                cookie |= COOKIE_URGENT
            if site.ret:
                cookie |= COOKIE_PAIRED
            if site.stack_bytes:
                cookie |= COOKIE_STACK
            if is_return:
                cookie |= COOKIE_RETURN
            self._links[(pid, index, is_return)] = self._program.link(
                site.open_path, [site.offset], [cookie], pid, is_return)

    def __enter__(self) -> BpfSession:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Detach every uprobe (the links, closed at once), free the maps (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._ring is not None:
            self._delivery.unwatch(self._ring.fd)
        links = list(self._links.values())
        self._links.clear()
        if self._closer is not None:
            self._closer.finish()
        if len(links) > 1:  # each close waits for a grace period: wait for them together
            with ThreadPoolExecutor(min(len(links), CLOSE_THREADS),
                                    thread_name_prefix="bpf-closer") as pool:
                list(pool.map(_close_quietly, links))
        else:
            for fd in links:
                _close_quietly(fd)
        self.stats.events_open = 0
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self._program is not None:
            self._program.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    # ------------------------------------------------------------------ governor levers
    def detach_site(self, index: int) -> None:
        """Remove one probe site (the governor's lever): its links close on a background
        thread (a grace period each), never on the reader's loop."""
        if index in self.detached_sites or self._closed:
            return
        self.detached_sites.add(index)
        if self._closer is None:
            self._closer = Closer("bpf-closer", self.stats)
        for key in [k for k in self._links if k[1] == index]:
            self._closer.close(functools.partial(os.close, self._links.pop(key)))
        self.stats.events_open = len(self._links)

    def reattach_site(self, index: int) -> None:
        """Put a detached site back (duty cycling)."""
        if index not in self.detached_sites or self._closed:
            return
        self.detached_sites.discard(index)
        for target in self.targets:
            if target.pid not in self.exited_pids:
                with contextlib.suppress(ProbeError):
                    self._attach_site(target.pid, index)
        self.stats.events_open = len(self._links)

    def kernel_hits(self) -> Counter[str]:
        """Hits per probe as the BPF program counted them (entries plus returns)."""
        counts: Counter[str] = Counter()
        if self._program is None or self._closed:
            return counts
        for index, site in enumerate(self.sites):
            counts[site.probe] += self._program.lookup_u64(self._program.hits_fd, index)
        return counts

    def dropped(self) -> int:
        """Spans the kernel could not write (the ring was full)."""
        if self._program is not None and not self._closed:
            self.stats.lost = self._program.lookup_u64(self._program.stats_fd, STAT_LOST)
        return self.stats.lost

    # ------------------------------------------------------------------ reading
    @property
    def all_exited(self) -> bool:
        """True once every target process has exited."""
        return self.exited_pids >= self.pids

    def read(self) -> list[Span]:
        """Drain the ring now and return the spans in it (never blocks)."""
        if self._closed or self._ring is None:
            return []
        spans: list[Span] = []
        hits = self.stats.hits
        decode = self._decode
        pids = self.pids
        for (_h, _p, site, tid, pid, _f, start, end, a1, a2, a3, a4, a5, a6, ret,
             stack) in self._ring.read():
            if pid not in pids or site >= len(decode):
                continue
            d = decode[site]
            args: dict[str, ArgValue] = {}
            if d.regs:
                regs = (a1, a2, a3, a4, a5, a6)
                for name, i in d.regs:
                    args[name] = regs[i]
            for name in d.ret:
                args[name] = ret
            for name, off, size, dec in d.stack:
                args[name] = dec(stack[off:off + size])
            hits[d.probe] += 2 if d.paired else 1
            spans.append(Span(d.probe, pid, tid, start, end, MappingProxyType(args)))
        if time.monotonic() - self._last_rescan >= self.rescan_interval_s:
            self._rescan()
        self.stats.spans += len(spans)
        return spans

    def _rescan(self) -> None:
        self._last_rescan = time.monotonic()
        for target in self.targets:
            if target.pid not in self.exited_pids and not target.alive():
                self.exited_pids.add(target.pid)
        if self._program is not None:
            get = self._program.lookup_u64
            self.stats.orphan_returns = get(self._program.stats_fd, STAT_ORPHANS)
            self.stats.unfinished = get(self._program.stats_fd, STAT_OVERWRITTEN)

    # ------------------------------------------------------------------ waiting
    def fds(self) -> list[int]:
        """The fd to poll: the ring buffer map."""
        return [self._ring.fd] if self._ring is not None and not self._closed else []


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


