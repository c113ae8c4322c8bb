"""Overhead governor: what a probe hit costs on this host, and which probes to drop.

At start-up :func:`calibrate` measures the cost of one hit on this very kernel and CPU:
it writes two tiny functions as raw x86-64 machine code to a file (no compiler needed),
maps it executable, and times ctypes calls with and without a uprobe on each. One
function starts with ``push %rbp`` (emulated by the kernel), the other with ``mov``
(single-stepped), which are the two cost classes of :func:`probes.symbols.classify_site`;
a third run opens the probe with ``wakeup_events=1`` to time the wake-up each record of
an urgent probe (the iteration anchor) adds. ``calibrate(bpf=True)`` times the same hits
through the eBPF backend's program too (``HitCosts.bpf``), so a bpf session is costed
with its own hits (:meth:`HitCosts.for_backend`).

:class:`OverheadGovernor` then counts hits per probe, estimates the time they add to the
target (hits/s × cost per hit, wake-ups included), detaches or duty-cycles the costliest
probes while the estimate exceeds the budget (default 0.5 %), never the anchor, and
restores them once they fit again, with hysteresis; every decision is recorded.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from probes.bpf.loader import SpanProgram
from probes.bpf.session import COOKIE_PAIRED, COOKIE_RETURN, COOKIE_URGENT, BpfRing
from probes.errors import ProbeError
from probes.perf import EventSpec, PerfRing, open_uprobe
from probes.placement import ProbeSite

# push %rbp; mov %rsp,%rbp; mov %rdi,%rax; pop %rbp; ret   (emulated first instruction)
_EMULATED = bytes.fromhex("55 48 89 e5 48 89 f8 5d c3".replace(" ", ""))
# mov %rdi,%rax; ret                                       (single-stepped first instruction)
_SINGLE_STEP = bytes.fromhex("48 89 f8 c3".replace(" ", ""))
_SECOND_OFFSET = 64


@dataclass(frozen=True)
class HitCosts:
    """Nanoseconds one probe hit adds to the probed thread, by site class."""

    emulated_ns: float
    single_step_ns: float
    return_ns: float
    wakeup_ns: float = 13500.0
    """What one record of an urgent probe adds by waking the reader (``wakeup_events=1``)."""
    measured: bool = True
    note: str = ""
    backend: str = "perf"
    """The probe backend whose hits these are (``perf`` or ``bpf``)."""
    bpf: HitCosts | None = None
    """The same hits through the eBPF backend (``calibrate(bpf=True)``; None: not timed)."""

    def site_cost_ns(self, site: str, ret: bool, urgent: bool = False) -> float:
        """Cost of one call of a function probed at a site of class ``site``; an urgent
        probe's call adds one wake-up of the reader on either backend: perf wakes it with
        the record that completes the span (the return, when there is one), bpf writes one
        record per span."""
        entry = self.emulated_ns if site == "emulated" else self.single_step_ns
        return (entry + (self.return_ns if ret else 0.0)
                + (self.wakeup_ns if urgent else 0.0))

    def for_backend(self, backend: str) -> HitCosts:
        """The costs a session of ``backend`` (``perf`` or ``bpf``) adds per hit.

        For bpf: :attr:`bpf` when it was timed, else these hits with bpf's one wake-up
        per span, marked not measured (the traps are the same uprobes either way).
        """
        if backend != "bpf" or self.backend == "bpf":
            return self
        if self.bpf is not None:
            return self.bpf
        return replace(self, backend="bpf", measured=False,
                       note="bpf hits not timed: perf's hit costs, one wake-up per span")


#: Used when calibration cannot run; the figures measured on the development VM
#: (docs/performance.md, "Probe cost per hit": the wake-up with a reader asleep).
DEFAULT_COSTS = HitCosts(1000.0, 10500.0, 900.0, 13500.0, measured=False,
                         note="not measured here: defaults from the development host")


def _exec_dir() -> str:
    for d in (os.environ.get("PRISM_CACHE_DIR"), tempfile.gettempdir(),
              os.path.expanduser("~/.cache/latencyprism"), os.getcwd()):
        if d and os.path.isdir(d) and os.access(d, os.W_OK):
            return d
    raise ProbeError("no writable directory for the calibration code")


def _time_calls(fn: Callable[[int], int], n: int) -> float:
    t0 = time.perf_counter_ns()
    for i in range(n):
        fn(i)
    return (time.perf_counter_ns() - t0) / n


def wakeups(calls: float, seconds: float, gap_s: float) -> float:
    """Wake-ups of the reader by ``calls`` records of an urgent probe over ``seconds``:
    one each, or with a wake gap (the bpf backend's) at most one per ``gap_s``."""
    return calls if gap_s <= 0 else min(calls, seconds / gap_s)


def calibrate(calls: int = 3000, rounds: int = 3, *, bpf: bool = False) -> HitCosts:
    """Measure the cost of a uprobe hit (emulated, single-stepped, a return, a wake-up) here.

    Takes some tens of milliseconds. Falls back to :data:`DEFAULT_COSTS` (with a note
    saying why) when the code cannot be mapped executable or perf refuses the probe.
    With ``bpf``, the same hits are timed through the eBPF program as well, into
    :attr:`HitCosts.bpf` (its own defaults and note when the program cannot load).
    """
    perf = _calibrate("perf", calls, rounds)
    return replace(perf, bpf=_calibrate("bpf", calls, rounds)) if bpf else perf


@contextmanager
def _perf_probe(path: str, offset: int, with_return: bool, wakeup: bool) -> Iterator[
        Callable[[], object]]:
    """Perf uprobes on the calling thread at ``offset`` of ``path``; yields the drain."""
    tid = threading.get_native_id()
    with PerfRing(64) as ring:
        for is_return in (False, True) if with_return else (False,):
            spec = EventSpec(path, offset, is_return)
            ring.add(open_uprobe(spec, tid, -1, wakeup_events=int(wakeup)), spec)
        yield ring.read_raw


@contextmanager
def _bpf_probe(path: str, offset: int, with_return: bool, wakeup: bool) -> Iterator[
        Callable[[], object]]:
    """The eBPF span program on this process at ``offset`` of ``path``, as
    :class:`~probes.bpf.session.BpfSession` links a site; yields the drain."""
    ring_bytes = 64 * mmap.PAGESIZE
    program = SpanProgram(ring_bytes)
    links: list[int] = []
    try:
        ring = BpfRing(program.ring_fd, ring_bytes)
        try:
            for is_return in (False, True) if with_return else (False,):
                cookie = (COOKIE_PAIRED if with_return else 0) | (
                    COOKIE_RETURN if is_return else 0)
                if wakeup and (is_return or not with_return):
                    cookie |= COOKIE_URGENT
                links.append(program.link(path, [offset], [cookie], os.getpid(), is_return))
            yield ring.read
        finally:
            ring.close()
    finally:
        for fd in links:
            os.close(fd)
        program.close()


def _calibrate(backend: str, calls: int, rounds: int) -> HitCosts:
    """:func:`calibrate` for one backend (``perf`` or ``bpf``)."""
    defaults = replace(DEFAULT_COSTS, backend=backend)
    attach = _bpf_probe if backend == "bpf" else _perf_probe
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    code = _EMULATED.ljust(_SECOND_OFFSET, b"\xcc") + _SINGLE_STEP
    size = mmap.PAGESIZE
    try:
        fd, path = tempfile.mkstemp(prefix="prism-calibrate-", dir=_exec_dir())
    except (OSError, ProbeError) as exc:
        return replace(defaults, note=f"calibration skipped: {exc}")
    addr = None
    try:
        os.write(fd, code.ljust(size, b"\xcc"))
        addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_EXEC, mmap.MAP_PRIVATE, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap PROT_EXEC refused (noexec mount?)")
        proto = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long)
        emulated = proto(addr)
        single = proto(addr + _SECOND_OFFSET)

        def probed(offset: int, with_return: bool, fn: Callable[[int], int], n: int,
                   wakeup: bool = False) -> float:
            with attach(path, offset, with_return, wakeup) as drain:
                best = float("inf")
                for _ in range(rounds):
                    best = min(best, _time_calls(fn, n))
                    drain()
                return best

        def bare(fn: Callable[[int], int], n: int) -> float:
            return min(_time_calls(fn, n) for _ in range(rounds))

        base_e = bare(emulated, calls)
        base_s = bare(single, calls // 10)
        hit_e = probed(0, False, emulated, calls) - base_e
        hit_s = probed(_SECOND_OFFSET, False, single, calls // 10) - base_s
        # a return probe is measured with its entry probe, as sites use it
        hit_r = probed(0, True, emulated, calls) - base_e - hit_e
        # no reader sleeps on this ring: the wake-up's lower bound (a reader asleep on
        # another CPU adds ~3 us more on the development VM, docs/performance.md)
        wake = probed(0, False, emulated, calls // 10, wakeup=True) - base_e - hit_e
        return HitCosts(max(hit_e, 1.0), max(hit_s, 1.0), max(hit_r, 1.0), max(wake, 1.0),
                        backend=backend)
    except (OSError, ProbeError) as exc:
        what = "calibration" if backend == "perf" else f"{backend} calibration"
        return replace(defaults, note=f"{what} failed: {exc}")
    finally:
        if addr not in (None, ctypes.c_void_p(-1).value):
            libc.munmap(addr, size)
        os.close(fd)
        os.unlink(path)


_SLACK = 1e-9
"""Relative tolerance of budget comparisons (a duty computed to fit exactly fits)."""

ACTIONS = ("detach", "duty-cycle")
"""What the governor may do to a probe over budget (``probe.governor_action``)."""

STATUS_OF = {"detach": "detached", "duty-cycle": "duty-cycled", "restore": "restored",
             "keep": "kept"}
"""The past-tense word of each decision, as the dashboard, JSON and history show it."""


@dataclass(frozen=True)
class GovernorDecision:
    """One decision about one probe, kept for the report, the dashboard and the history."""

    at_s: float
    probe: str
    action: str  # "keep" | "detach" | "duty-cycle" | "restore"
    hits_per_s: float
    """Calls per second of the probed function (measured, or estimated while detached)."""
    cost_ns: float
    """Estimated cost of one call to the target, wake-ups included."""
    overhead: float
    """Estimated fraction of the target's time this probe costs when attached."""
    reason: str

    @property
    def status(self) -> str:
        """``detached`` | ``duty-cycled`` | ``restored`` | ``kept``."""
        return STATUS_OF[self.action]


@dataclass
class _ProbeState:
    """What the governor knows of one probe id (all its sites move together)."""

    indices: list[int]
    cost_ns: float
    ret: bool
    wake_ns: float = 0.0  # the part of cost_ns that is a wake-up (urgent probes)
    hits_seen: int = 0
    governed: str = ""  # "" | "detach" | "duty-cycle"
    attached: bool = True
    duty: float = 1.0
    switch_at: float = 0.0  # when a duty-cycled probe is next attached or detached
    calls_per_s: float = 0.0  # last rate measured over a window it was attached throughout
    per_anchor: float | None = None  # its calls per anchor call at that time
    since: float = 0.0  # when it was last governed
    restores: int = 0  # each doubles the hold of the next time it is governed


@dataclass
class OverheadGovernor:
    """Keeps the estimated probe overhead on a target under ``budget``.

    Each :meth:`update` closes a window. A probe attached throughout it has its rate
    measured; a detached one's rate is estimated as its calls per anchor call (when last
    measured) × the anchor's rate now, else its last rate. The estimate is ``Σ calls/s ×
    cost per call``, as a share of wall time, as if all hits fell on one thread (an
    upper bound on any one thread's slow-down, which is what iteration latency feels);
    the cost of a call is its entry hit, its return hit, and for an urgent probe one
    reader wake-up (with the record that completes its span).

    Over budget, the costliest probes not in ``protected`` (nor the ``anchor``) are
    detached, or duty-cycled (attached for the share of each ``period_s`` that fits the
    budget; below ``min_duty`` they are detached), until the estimate fits. A governed
    probe is restored, one per update, cheapest first, once ``hold_s`` has passed since
    it was governed and the estimate with it fully attached stays at or below
    ``restore_below`` × budget; each time a restored probe must be governed again its
    hold doubles (up to ``max_hold_s``). Those two margins are the hysteresis.

    Args:
        sites: the session's probe sites, in its order (index = site index).
        costs: hit costs (measured by :func:`calibrate`, or its defaults).
        detach: callback removing a site (``UprobeSession.detach_site``).
        reattach: callback restoring a site (``UprobeSession.reattach_site``).
        budget: allowed overhead fraction (0.005 = 0.5 %).
        action: ``detach`` or ``duty-cycle``.
        period_s: duty-cycle period.
        protected: probe ids never touched.
        anchor: the iteration anchor: never touched, and the rate detached probes'
            estimates follow.
        urgent: probe ids whose records wake the reader.
        wake_gap_s: the least time between two of their wake-ups (the bpf backend's
            ``probe.wake_gap_ms``; 0: every record wakes it), so an urgent probe costs
            ``min(rate, 1 / wake_gap_s)`` wake-ups a second, not ``rate``.
        hold_s: least time a probe stays governed before it may be restored.
        restore_below: share of the budget the estimate must stay under to restore.
        clock: monotonic seconds (injected for tests).
    """

    sites: list[ProbeSite]
    costs: HitCosts
    detach: Callable[[int], None]
    reattach: Callable[[int], None]
    budget: float = 0.005
    action: str = "detach"
    period_s: float = 10.0
    protected: Collection[str] = ()
    anchor: str | None = None
    urgent: Collection[str] = ()
    wake_gap_s: float = 0.0
    hold_s: float = 30.0
    max_hold_s: float = 600.0
    restore_below: float = 0.5
    min_duty: float = 0.05
    clock: Callable[[], float] = time.monotonic
    decisions: list[GovernorDecision] = field(default_factory=list)
    last_overhead: float = 0.0
    """The estimate after the last update's decisions (what the probes cost now)."""
    estimates: dict[str, float] = field(default_factory=dict)
    """Per probe, the overhead it would cost fully attached (last update)."""
    _probes: dict[str, _ProbeState] = field(default_factory=dict)
    _window_start: float | None = None
    _anchor_rate: float | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown governor action {self.action!r} (one of {ACTIONS})")
        if not 0 < self.budget < 1:
            raise ValueError(f"overhead budget must be in (0, 1), got {self.budget!r}")
        for i, site in enumerate(self.sites):
            st = self._probes.get(site.probe)
            if st is None:
                self._probes[site.probe] = _ProbeState(
                    [i], self.site_cost_ns(i), site.ret,
                    self.costs.wakeup_ns if site.probe in self.urgent else 0.0)
            else:
                st.indices.append(i)

    def site_cost_ns(self, index: int) -> float:
        """Estimated cost of one call of site ``index``, wake-ups included."""
        site = self.sites[index]
        return self.costs.site_cost_ns(site.site, site.ret, site.probe in self.urgent)

    def _untouchable(self, probe: str) -> bool:
        return probe == self.anchor or probe in self.protected

    def governed(self) -> dict[str, str]:
        """Probes governed now: probe id → ``detach`` or ``duty-cycle``."""
        return {p: st.governed for p, st in self._probes.items() if st.governed}

    def update(self, hits: dict[str, int]) -> list[GovernorDecision]:
        """Feed cumulative hit counts per probe id (entries plus returns, as the kernel
        counts them); returns the decisions of this call."""
        now = self.clock()
        if self._window_start is None:
            self._window_start = now
            for probe, st in self._probes.items():
                st.hits_seen = hits.get(probe, 0)
            return []
        wall = now - self._window_start
        if wall <= 0:
            return []
        self._window_start = now
        self._measure(hits, wall)
        full = self._full_overheads()
        self.estimates = dict(full)
        total = sum(self._share(st) * full[p] for p, st in self._probes.items())
        made: list[GovernorDecision] = []
        if total > self.budget * (1 + _SLACK):
            total = self._cut(now, full, total, made)
        elif total <= self.restore_below * self.budget:
            total = self._restore(now, full, total, made)
        self._cycle(now)
        self.last_overhead = total
        self.decisions.extend(made)
        return made

    def _measure(self, hits: dict[str, int], wall: float) -> None:
        """Rates of the probes attached throughout the window just closed."""
        anchor_rate = None
        for probe, st in self._probes.items():
            count = hits.get(probe, 0)
            delta = max(0, count - st.hits_seen)
            st.hits_seen = count
            if st.attached:
                st.calls_per_s = delta / (2 if st.ret else 1) / wall
                if probe == self.anchor:
                    anchor_rate = st.calls_per_s
        self._anchor_rate = anchor_rate if self.anchor in self._probes else None
        if anchor_rate:
            for st in self._probes.values():
                if st.attached:
                    st.per_anchor = st.calls_per_s / anchor_rate

    def _rate(self, st: _ProbeState) -> float:
        """Calls per second of the probed function, measured or estimated."""
        if not st.attached and st.per_anchor is not None and self._anchor_rate is not None:
            return st.per_anchor * self._anchor_rate
        return st.calls_per_s

    def _full_overheads(self) -> dict[str, float]:
        return {p: self._overhead(st) for p, st in self._probes.items()}

    def _overhead(self, st: _ProbeState) -> float:
        """The share of the target's time a probe costs fully attached: its hits, and
        its wake-ups at most one per wake gap."""
        rate = self._rate(st)
        return (rate * (st.cost_ns - st.wake_ns)
                + wakeups(rate, 1.0, self.wake_gap_s) * st.wake_ns) / 1e9

    @staticmethod
    def _share(st: _ProbeState) -> float:
        """The share of time a probe is attached in steady state."""
        if st.governed == "detach":
            return 0.0
        return st.duty if st.governed == "duty-cycle" else 1.0

    def _decision(self, now: float, probe: str, action: str, overhead: float,
                  reason: str) -> GovernorDecision:
        st = self._probes[probe]
        return GovernorDecision(now, probe, action, self._rate(st), st.cost_ns, overhead,
                                reason)

    def _cut(self, now: float, full: dict[str, float], total: float,
             made: list[GovernorDecision]) -> float:
        """Detach or duty-cycle the costliest probes until the estimate fits the budget."""
        before = total
        order = sorted(self._probes, key=lambda p: self._share(self._probes[p]) * full[p],
                       reverse=True)
        for probe in order:
            if total <= self.budget * (1 + _SLACK):
                break
            st, overhead = self._probes[probe], full[probe]
            current = self._share(st) * overhead
            if self._untouchable(probe) or current <= 0:
                continue
            duty = 0.0
            if self.action == "duty-cycle":
                duty = (self.budget - (total - current)) / overhead
                duty = 0.0 if duty < self.min_duty else min(1.0, duty)
                if st.governed == "duty-cycle" and duty >= st.duty * (1 - _SLACK):
                    continue  # its share already fits what the others leave
            action = "duty-cycle" if duty > 0 else "detach"
            why = (f"estimated {overhead:.2%} of the target's time ({self._rate(st):.0f} "
                   f"calls/s x {st.cost_ns / 1000:.1f} us, {self._site_words(st)}); "
                   f"total {before:.2%} > budget {self.budget:.2%}")
            st.governed, st.duty, st.since = action, duty, now
            if action == "duty-cycle":
                why += f"; on {duty:.0%} of every {self.period_s:g} s"
                if st.attached:
                    self._set_attached(st, False)
                st.switch_at = now + self.period_s * (1 - duty)
            elif st.attached:  # a duty-cycled probe may be in its off period
                self._set_attached(st, False)
            total -= current - self._share(st) * overhead
            made.append(self._decision(now, probe, action, overhead, why))
        return total

    def _hold(self, st: _ProbeState) -> float:
        return min(self.max_hold_s, self.hold_s * (1 << st.restores))

    def _restore(self, now: float, full: dict[str, float], total: float,
                 made: list[GovernorDecision]) -> float:
        """Restore the cheapest governed probe that fits under the restore level."""
        level = self.restore_below * self.budget
        waiting = [p for p, st in self._probes.items()
                   if st.governed and now - st.since >= self._hold(st)]
        for probe in sorted(waiting, key=lambda p: full[p]):
            st, overhead = self._probes[probe], full[probe]
            after = total - self._share(st) * overhead + overhead
            if after > level:
                continue
            why = (f"estimated {overhead:.2%} ({self._rate(st):.0f} calls/s x "
                   f"{st.cost_ns / 1000:.1f} us); total with it {after:.2%} <= "
                   f"{level:.2%} ({self.restore_below:.0%} of the budget)")
            made.append(self._decision(now, probe, "restore", overhead, why))
            st.governed, st.duty = "", 1.0
            st.restores += 1
            if not st.attached:
                self._set_attached(st, True)
            return after
        return total

    def _cycle(self, now: float) -> None:
        """Attach or detach duty-cycled probes whose on or off time is over."""
        for st in self._probes.values():
            if st.governed != "duty-cycle" or now < st.switch_at:
                continue
            self._set_attached(st, not st.attached)
            on = self.period_s * st.duty
            st.switch_at = now + (on if st.attached else self.period_s - on)

    def _set_attached(self, st: _ProbeState, attached: bool) -> None:
        lever = self.reattach if attached else self.detach
        for i in st.indices:
            lever(i)
        st.attached = attached

    def _site_words(self, st: _ProbeState) -> str:
        site = self.sites[st.indices[0]]
        words = f"{site.site} site" + (", entry+return" if site.ret else "")
        return words + (", wakes the reader" if site.probe in self.urgent else "")

    def report(self) -> list[GovernorDecision]:
        """Every decision so far, plus a ``keep`` line for each probe never touched."""
        touched = {d.probe for d in self.decisions}
        keep = [GovernorDecision(self.clock(), probe, "keep", st.calls_per_s, st.cost_ns,
                                 self.estimates.get(probe, 0.0), "within budget")
                for probe, st in self._probes.items() if probe not in touched]
        return self.decisions + keep
