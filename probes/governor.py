"""Overhead governor: what a probe hit costs on this host, and which probes to drop.

At start-up :func:`calibrate` measures the cost of one hit on this very kernel and CPU:
it writes two tiny functions as raw x86-64 machine code to a file (no compiler needed),
maps it executable, and times ctypes calls with and without a uprobe on each. One
function starts with ``push %rbp`` (emulated by the kernel), the other with ``mov``
(single-stepped), which are the two cost classes of :func:`probes.symbols.classify_site`.

:class:`OverheadGovernor` then counts hits per probe, estimates the time they add to the
target, and detaches (or duty-cycles) the costliest probes while the estimate exceeds
the budget (default 0.5 %), recording every decision.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import tempfile
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

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
    measured: bool = True
    note: str = ""

    def site_cost_ns(self, site: str, ret: bool) -> float:
        """Cost of one call of a function probed at a site of class ``site``."""
        entry = self.emulated_ns if site == "emulated" else self.single_step_ns
        return entry + (self.return_ns if ret else 0.0)


#: Used when calibration cannot run; the figures measured on the development VM.
DEFAULT_COSTS = HitCosts(1000.0, 10500.0, 900.0, measured=False,
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


def calibrate(calls: int = 3000, rounds: int = 3) -> HitCosts:
    """Measure the cost of a uprobe hit (emulated, single-stepped, and a return) here.

    Takes some tens of milliseconds. Falls back to :data:`DEFAULT_COSTS` (with a note
    saying why) when the code cannot be mapped executable or perf refuses the probe.
    """
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
        return HitCosts(**{**DEFAULT_COSTS.__dict__, "note": f"calibration skipped: {exc}"})
    addr = None
    try:
        os.write(fd, code.ljust(size, b"\xcc"))
        addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_EXEC, mmap.MAP_PRIVATE, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap PROT_EXEC refused (noexec mount?)")
        proto = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long)
        emulated = proto(addr)
        single = proto(addr + _SECOND_OFFSET)
        tid = threading.get_native_id()

        def probed(offset: int, with_return: bool, fn: Callable[[int], int], n: int) -> float:
            with PerfRing(64) as ring:
                for is_return in (False, True) if with_return else (False,):
                    spec = EventSpec(path, offset, is_return)
                    ring.add(open_uprobe(spec, tid, -1), spec)
                best = float("inf")
                for _ in range(rounds):
                    best = min(best, _time_calls(fn, n))
                    ring.read_raw()
                return best

        def bare(fn: Callable[[int], int], n: int) -> float:
            return min(_time_calls(fn, n) for _ in range(rounds))

        base_e = bare(emulated, calls)
        base_s = bare(single, calls // 10)
        hit_e = probed(0, False, emulated, calls) - base_e
        hit_s = probed(_SECOND_OFFSET, False, single, calls // 10) - base_s
        # a return probe is measured with its entry probe, as sites use it
        hit_r = probed(0, True, emulated, calls) - base_e - hit_e
        return HitCosts(max(hit_e, 1.0), max(hit_s, 1.0), max(hit_r, 1.0))
    except (OSError, ProbeError) as exc:
        return HitCosts(**{**DEFAULT_COSTS.__dict__, "note": f"calibration failed: {exc}"})
    finally:
        if addr not in (None, ctypes.c_void_p(-1).value):
            libc.munmap(addr, size)
        os.close(fd)
        os.unlink(path)


@dataclass(frozen=True)
class GovernorDecision:
    """One decision about one probe, kept for the report and the dashboard."""

    at_s: float
    probe: str
    action: str  # "keep" | "detach" | "duty-cycle"
    hits_per_s: float
    cost_ns: float
    overhead: float  # estimated fraction of the target's time this probe costs
    reason: str


@dataclass
class _SiteState:
    hits_at_window_start: int = 0
    detached: bool = False
    cycling: bool = False  # duty-cycled: attached for ``duty`` of every period
    duty: float = 1.0
    off_until: float = 0.0
    on_until: float = 0.0


@dataclass
class OverheadGovernor:
    """Keeps the estimated probe overhead on a target under ``budget``.

    The estimate for a window is ``Σ hits × cost / wall time``: the time probe hits add
    to the target's threads, as a share of the window, as if all hits fell on one
    thread (an upper bound on any one thread's slow-down, which is what iteration
    latency feels). Sites in ``protected`` (the iteration anchor, say) are never dropped.

    Args:
        sites: the session's probe sites, in its order (index = site index).
        costs: measured hit costs.
        detach: callback removing a site (``UprobeSession.detach_site``).
        reattach: callback restoring a site (``UprobeSession.reattach_site``).
        budget: allowed overhead fraction (0.005 = 0.5 %).
        action: ``detach`` (for good) or ``duty-cycle`` (on for a share of each period).
        period_s: duty-cycle period.
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
    clock: Callable[[], float] = time.monotonic
    decisions: list[GovernorDecision] = field(default_factory=list)
    _state: dict[int, _SiteState] = field(default_factory=dict)
    _window_start: float | None = None
    last_overhead: float = 0.0

    def site_cost_ns(self, index: int) -> float:
        """Estimated cost of one call of site ``index``."""
        site = self.sites[index]
        return self.costs.site_cost_ns(site.site, site.ret)

    def update(self, hits: dict[str, int]) -> list[GovernorDecision]:
        """Feed cumulative hit counts per probe id; returns the decisions of this call.

        Hits are counted per entry and per return (``SessionStats.hits``); a site's calls
        are its entry hits.
        """
        now = self.clock()
        made: list[GovernorDecision] = []
        if self._window_start is None:
            self._window_start = now
            for i, site in enumerate(self.sites):
                self._state[i] = _SiteState(hits.get(site.probe, 0))
            return made
        for i, st in self._state.items():
            if st.cycling and st.detached and now >= st.off_until:
                self.reattach(i)
                st.detached = False
                st.on_until = now + self.period_s * st.duty
            elif st.cycling and not st.detached and now >= st.on_until:
                self.detach(i)
                st.detached = True
                st.off_until = now + self.period_s * (1 - st.duty)
        wall = now - self._window_start
        if wall <= 0:
            return made
        per_site: list[tuple[float, int, float]] = []
        total = 0.0
        by_probe: dict[str, list[int]] = {}
        for i, site in enumerate(self.sites):
            by_probe.setdefault(site.probe, []).append(i)
        for probe, indices in by_probe.items():
            count = hits.get(probe, 0)
            first = self._state[indices[0]]
            delta = max(0, count - first.hits_at_window_start)
            first.hits_at_window_start = count
            calls = delta / (2 if self.sites[indices[0]].ret else 1)
            cost = self.site_cost_ns(indices[0])
            overhead = calls * cost / (wall * 1e9)
            total += overhead
            per_site.append((overhead, indices[0], calls / wall))
        self._window_start = now
        self.last_overhead = total
        if total <= self.budget:
            return made
        for overhead, i, rate in sorted(per_site, reverse=True):
            if total <= self.budget:
                break
            site, st = self.sites[i], self._state[i]
            if site.probe in self.protected or st.detached or st.cycling or overhead <= 0:
                continue  # a cycling site's hits already reflect its duty
            siblings = by_probe[site.probe]
            if self.action == "duty-cycle":
                others = total - overhead
                st.duty = max(0.0, min(1.0, (self.budget - others) / overhead))
                if st.duty <= 0.0:
                    action = "detach"
                else:
                    action = "duty-cycle"
                    st.off_until = now + self.period_s * (1 - st.duty)
            else:
                action = "detach"
            cycling = action == "duty-cycle"
            for j in siblings:
                self.detach(j)
                sib = self._state[j]
                sib.detached, sib.cycling = True, cycling
                sib.duty = st.duty if cycling else 0.0
                sib.off_until = st.off_until
            total -= overhead * (1 - (st.duty if action == "duty-cycle" else 0.0))
            reason = (f"estimated {overhead:.2%} of the target's time "
                      f"({rate:.0f} calls/s x {self.site_cost_ns(i) / 1000:.1f} us, "
                      f"{site.site} site); total {self.last_overhead:.2%} > budget "
                      f"{self.budget:.2%}")
            if action == "duty-cycle":
                reason += f"; on {st.duty:.0%} of every {self.period_s:g} s"
            made.append(GovernorDecision(now, site.probe, action, rate,
                                         self.site_cost_ns(i), overhead, reason))
        self.decisions.extend(made)
        return made

    def report(self) -> list[GovernorDecision]:
        """Every decision so far, plus a ``keep`` line for each probe never touched."""
        touched = {d.probe for d in self.decisions}
        first_site = {s.probe: s for s in reversed(self.sites)}
        keep = [GovernorDecision(self.clock(), probe, "keep", 0.0,
                                 self.costs.site_cost_ns(s.site, s.ret), 0.0, "within budget")
                for probe, s in first_site.items() if probe not in touched]
        return self.decisions + keep

