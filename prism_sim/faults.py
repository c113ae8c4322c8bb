"""Fault injectors: each turns one :class:`~prism_sim.scenario.FaultSpec` on and off.

Faults are as real as the host allows. Host faults act from outside the rank processes:
CPU hogs and a memory churner are separate processes (killed with the orchestrator, even
on SIGKILL, through ``PR_SET_PDEATHSIG``), and a CPU throttle is a cgroup quota or a
SIGSTOP/SIGCONT duty cycle. Device and in-process faults are fields of the shared-memory
control block that the fake runtime and the rank loops read on every work item.
``stop()`` is idempotent and restores everything ``start()`` changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prism_sim.control import ControlBlock
from prism_sim.errors import SimError
from prism_sim.scenario import FAULT_INFO, FaultSpec

__all__ = [
    "MEMORY_PRESSURE_BYTES_PER_INTENSITY",
    "MEMORY_PRESSURE_MAX_BYTES",
    "THROTTLE_MECHANISMS",
    "ControlFault",
    "CpuSqueeze",
    "CpuThrottle",
    "FaultContext",
    "Injector",
    "MemoryPressure",
    "cgroup_homes",
    "cleanup_session",
    "control_value",
    "make_injector",
    "memory_pressure_bytes",
    "stop_all",
    "throttle_mechanism",
]

MEMORY_PRESSURE_BYTES_PER_INTENSITY = 2 << 30
"""Bytes the memory churner cycles through at intensity 1."""

MEMORY_PRESSURE_MAX_BYTES = 4 << 30
"""Hard cap on the churner's memory, whatever the intensity (and half of MemAvailable)."""

THROTTLE_MECHANISMS = ("cgroup2", "cgroup1", "signal")
"""cpu_throttle mechanisms, in the order ``auto`` tries them."""

READY_TIMEOUT_S = 15.0
"""How long ``start()`` waits for a child process to say it is running. Generous: on a
2-vCPU host with a load average of 15-20 a memory churner took over 5 s to start its
interpreter and touch its first chunk, and a timeout here ends the whole run."""

SQUEEZE_DUTY = 0.8
"""Share of each targeted CPU a real-time cpu_squeeze or memory_pressure child takes at
intensity 1 (measured in bench/fault_bite.py: every trial slowed the simulator's
iterations; see docs/scenarios.md)."""

MAX_DUTY = 0.9
"""Largest share of a CPU a real-time child takes, whatever the intensity: the rest is
left to everything else on that CPU (the kernel's own real-time limit is 95 %)."""

HOG_PERIOD_S = 0.02
"""Duty-cycle period of the real-time children."""

PAUSE_PERIOD_US = 200_000
"""Period of the ``pause`` fault's SIGSTOP/SIGCONT cycle (stopped ``intensity`` of it)."""


# The program every injector child runs (``python -I -S -c``). argv: role, parent pid,
# CPU list, role arguments (hog: duty, period; mem: bytes, duty, period). It asks the
# kernel to SIGKILL it when its parent dies, checks the parent is still there (it could
# have died before the prctl), pins itself, switches to SCHED_FIFO when its duty is above
# 0 and that is allowed, says "ready rt" or "ready fair" on stdout and works until killed
# (busy ``duty`` of every period under SCHED_FIFO, all the time otherwise); it also exits
# if it finds itself orphaned.
_CHILD = r"""
import ctypes, mmap, os, sys
role, parent, cpus = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
except Exception:
    pass
if os.getppid() != parent:
    os._exit(0)
if cpus:
    os.sched_setaffinity(0, [int(c) for c in cpus.split(",")])
def realtime(duty, period):  # SCHED_FIFO when allowed; "rt" or "fair" in the ready line
    if duty <= 0:
        return b"fair"
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        return b"rt"
    except (OSError, AttributeError):
        return b"fair"
def duty_cycle(mode, duty, period, work):  # busy `duty` of every period, or always
    import time
    if mode == b"fair":
        while True:
            work()
            if os.getppid() != parent:
                os._exit(0)
    rest = (1 - duty) * period  # what the CPU's other tasks (the ranks) run in
    due = time.monotonic()
    while True:
        end = due + duty * period
        while time.monotonic() < end:
            work()
        # a piece of work that ran past the busy part stretches the period, never eats
        # its idle part: without one, the ranks ran only in the kernel's real-time
        # throttling window (50 ms a second), whole iterations at full speed
        now = time.monotonic()
        due = max(due + period, now + rest)
        time.sleep(due - now)
        if os.getppid() != parent:
            os._exit(0)
if role == "hog":
    duty, period = float(sys.argv[4]), float(sys.argv[5])
    mode = realtime(duty, period)
    os.write(1, b"ready " + mode + b"\n")
    state = [1.000001, 0.5]
    def work():
        x, y = state
        for _ in range(2000):
            y = y * 0.9999997 + x * 1.0000003  # dense floating-point multiply-add
            x = x * 0.9999999 + 1e-9
        state[0], state[1] = x, y
    duty_cycle(mode, duty, period, work)
elif role == "mem":
    size, duty, period = int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    piece = min(size, 1 << 20)
    fill = memoryview(b"\x5a" * piece)
    step = [0]
    def work():  # release a 1 MiB piece, then write all of it back: page faults and a
        off = step[0] * piece % size  # memory-bandwidth stream, piece after piece
        n = min(piece, size - off)
        buf.madvise(mmap.MADV_DONTNEED, off, n)
        buf[off:off + n] = fill[:n]
        step[0] += 1
    work()
    mode = realtime(duty, period)
    os.write(1, b"ready " + mode + b"\n")
    duty_cycle(mode, duty, period, work)
"""


@dataclass
class FaultContext:
    """What injectors need to reach a run: its control block, rank processes and names.

    Attributes:
        control: the run's shared-memory control block (None outside the simulator:
            the control-block faults then cannot start).
        rank_pids: rank -> pid of the rank process.
        session: unique prefix for names this run creates (cgroups).
        throttle: cpu_throttle mechanism: ``auto`` (first that works of
            :data:`THROTTLE_MECHANISMS`) or one of them.
        throttle_period_us: cgroup quota period and SIGSTOP duty-cycle period.
        realtime: let cpu_squeeze and memory_pressure children run under SCHED_FIFO
            where allowed (False: always the fair fallback).
    """

    control: ControlBlock | None
    rank_pids: dict[int, int]
    session: str
    throttle: str = "auto"
    throttle_period_us: int = 20_000
    realtime: bool = True


class Injector(Protocol):
    """One fault window's effect: ``start()`` turns it on, ``stop()`` turns it off."""

    spec: FaultSpec

    def start(self) -> None:
        """Switch the fault on; SimError if it cannot be."""
        ...

    def stop(self) -> None:
        """Switch it off: idempotent, kills every child, restores every setting."""
        ...

    def effect(self) -> dict[str, Any]:
        """What it did in its last window (mode, CPU its children took, time stopped)."""
        ...


def _targets(spec: FaultSpec, ctx: FaultContext) -> tuple[int, ...]:
    """Ranks the fault acts on (every rank of the run for ``rank = None``)."""
    if spec.rank is not None:
        return (spec.rank,)
    if ctx.rank_pids:
        return tuple(sorted(ctx.rank_pids))
    nranks = getattr(ctx.control, "nranks", 0)
    return tuple(range(int(nranks)))


def _pid_of(ctx: FaultContext, rank: int, what: str) -> int:
    """The pid of ``rank``, or SimError naming the fault."""
    pid = ctx.rank_pids.get(rank)
    if pid is None:
        raise SimError(f"{what}: no process for rank {rank} "
                       f"(ranks: {', '.join(map(str, sorted(ctx.rank_pids))) or 'none'})")
    return pid


def _cpus_of(pids: Iterable[int], what: str) -> list[int]:
    """Union of the CPU affinities of ``pids`` (SimError if one is gone)."""
    cpus: set[int] = set()
    for pid in pids:
        try:
            cpus |= os.sched_getaffinity(pid)
        except ProcessLookupError:
            raise SimError(f"{what}: process {pid} is gone") from None
    return sorted(cpus)


# --------------------------------------------------------------------------- control block


def control_value(spec: FaultSpec) -> tuple[str, float | int]:
    """The control-block field a device or in-process fault sets, and its value."""
    i = spec.intensity
    if spec.type in ("device_slowdown", "straggler"):
        return "speed", round(1.0 - i, 6)
    if spec.type == "interconnect_squeeze":
        return "link", round(1.0 - i, 6)
    if spec.type == "device_preemption":
        return "preempt", min(0.9, i)
    if spec.type == "gc_storm":
        return "gc_storm", max(1, round(i * 100))
    if spec.type == "gil_contention":
        return "gil_contention", 1 + round(i * 3)
    raise SimError(f"{spec.type} is not a control-block fault")


class ControlFault:
    """A fault that is one field of the control block on the targeted ranks."""

    def __init__(self, spec: FaultSpec, ctx: FaultContext) -> None:
        """Prepare; nothing changes until :meth:`start`."""
        self.spec = spec
        self.ctx = ctx
        self.field, self.value = control_value(spec)
        self._saved: dict[int, float | int] = {}

    def start(self) -> None:
        """Set the field on every targeted rank, remembering the old values."""
        if self._saved:
            return
        control = self.ctx.control
        if control is None:
            raise SimError(f"{self.spec.type} needs the simulator's control block: it "
                           "acts inside the target")
        for rank in _targets(self.spec, self.ctx):
            self._saved[rank] = getattr(control.get(rank), self.field)
            control.set(rank, **{self.field: self.value})

    def stop(self) -> None:
        """Put the old values back (idempotent; a closed block is left alone)."""
        saved, self._saved = self._saved, {}
        for rank, old in saved.items():
            with contextlib.suppress(Exception):
                assert self.ctx.control is not None
                self.ctx.control.set(rank, **{self.field: old})

    def effect(self) -> dict[str, Any]:
        """The field and value it set: the fake runtime obeys it exactly."""
        return {"mode": "control", self.field: self.value}


# --------------------------------------------------------------------------- child processes


def _child_cpu_ns(pid: int) -> int:
    """CPU time a child process has used so far, from its schedstat (0 if it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


class _ChildFault:
    """Base of faults carried out by child processes; tracks and kills them.

    Where the kernel allows it (root, or CAP_SYS_NICE), there is one child per CPU (of
    the targets and of this process), pinned to it and running under ``SCHED_FIFO`` for
    :attr:`duty` of every
    :data:`HOG_PERIOD_S`: it preempts every normal thread on that CPU at once, whatever
    the scheduler's fairness would give them, so the fault bites every time. Elsewhere
    the children are normal processes, :attr:`fair_per_cpu` per CPU at intensity 1,
    busy all the time, and bite only as much as the scheduler lets them.
    """

    role = ""
    fair_per_cpu = 4.0

    def __init__(self, spec: FaultSpec, ctx: FaultContext) -> None:
        """Prepare; nothing runs until :meth:`start`."""
        self.spec = spec
        self.ctx = ctx
        self.children: list[subprocess.Popen[bytes]] = []
        self.mode = ""
        self._started_ns = 0
        self._effect: dict[str, Any] = {}

    @property
    def duty(self) -> float:
        """Share of each CPU a real-time child takes: ``SQUEEZE_DUTY × intensity``."""
        return min(MAX_DUTY, max(0.05, SQUEEZE_DUTY * self.spec.intensity))

    @property
    def pids(self) -> list[int]:
        """Pids of the children this injector started (running or not)."""
        return [c.pid for c in self.children]

    def _args(self, count: int, duty: float) -> list[str]:
        """The role's arguments after the CPU list, for ``count`` children."""
        return [str(duty), str(HOG_PERIOD_S)]

    def start(self) -> None:
        """Start the children on the targeted ranks' CPUs: real-time if allowed, else fair."""
        if self.children:
            return
        what = self.spec.type
        pids = [_pid_of(self.ctx, r, what) for r in _targets(self.spec, self.ctx)]
        cpus = _cpus_of(pids, what)
        self._started_ns = time.monotonic_ns()
        self._effect = {}
        if self.ctx.realtime:
            # every CPU this process may use, not only the targets': a real-time child on
            # the targets' CPUs alone makes the scheduler move other load off them, and a
            # pinned target on a loaded host then ran faster under it (measured: -10 %)
            every = sorted(set(cpus) | os.sched_getaffinity(0))
            for cpu in every:
                self._spawn([cpu], *self._args(len(every), self.duty))
            if self._wait_ready() == {"rt"}:
                self.mode = "rt"
                return
            self.stop()  # not allowed here: the fair fallback
        count = max(1, round(self.fair_per_cpu * self.spec.intensity * len(cpus)))
        for _ in range(count):
            self._spawn(cpus, *self._args(count, 0.0))
        self._wait_ready()
        self.mode = "fair"

    def _spawn(self, cpus: list[int], *extra: str) -> subprocess.Popen[bytes]:
        """Start one child running :data:`_CHILD` with this injector's role."""
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _CHILD, self.role, str(os.getpid()),
             ",".join(map(str, cpus)), *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            close_fds=True)
        self.children.append(proc)
        return proc

    def _wait_ready(self) -> set[str]:
        """Wait until every child printed ``ready MODE``; the modes (SimError on timeout)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        waiting = {c.stdout.fileno(): c for c in self.children if c.stdout is not None}
        modes: set[str] = set()
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise SimError(f"{self.spec.type}: a child process did not start within "
                               f"{READY_TIMEOUT_S:g} s")
            ready, _, _ = select.select(list(waiting), [], [], left)
            for fd in ready:
                child = waiting.pop(fd)
                line = os.read(fd, 64).split()
                if not line or line[0] != b"ready":
                    self.stop()
                    raise SimError(f"{self.spec.type}: child process {child.pid} exited "
                                   f"at start (rc={child.poll()})")
                modes.add(line[1].decode() if len(line) > 1 else "fair")
        for c in self.children:
            if c.stdout is not None:
                c.stdout.close()
        return modes

    def effect(self) -> dict[str, Any]:
        """What the children did in the last window: mode and CPU time per second."""
        return dict(self._effect)

    def stop(self) -> None:
        """Kill and reap every child (idempotent), first noting the CPU they used."""
        children, self.children = self.children, []
        if children and self._started_ns:
            window_s = max(1e-9, (time.monotonic_ns() - self._started_ns) / 1e9)
            used = sum(_child_cpu_ns(c.pid) for c in children)
            self._effect = {"mode": self.mode, "children": len(children),
                            "fault_cpu_ms_per_s": round(used / 1e6 / window_s, 1)}
        for c in children:
            with contextlib.suppress(OSError):
                c.kill()
        for c in children:
            with contextlib.suppress(Exception):
                c.wait(timeout=5)
            if c.stdout is not None:
                with contextlib.suppress(OSError):
                    c.stdout.close()


class CpuSqueeze(_ChildFault):
    """Processes running dense floating-point loops on the targeted ranks' CPUs.

    Real-time (the default as root): one per CPU, busy ``SQUEEZE_DUTY × intensity`` of
    every :data:`HOG_PERIOD_S`. Fair fallback: ``max(1, round(4 × intensity × CPUs))``
    always-busy normal processes; on 6.x EEVDF a rank thread that mostly waits gets its
    fair share at once against them, so they often barely delay it (measured: 0.97× to
    2×), which is why the real-time hogs are preferred.
    """

    role = "hog"


def memory_pressure_bytes(intensity: float) -> int:
    """Bytes the churner cycles through: intensity × 2 GiB, within the caps."""
    want = int(intensity * MEMORY_PRESSURE_BYTES_PER_INTENSITY)
    avail = _mem_available()
    cap = MEMORY_PRESSURE_MAX_BYTES if avail is None else min(MEMORY_PRESSURE_MAX_BYTES,
                                                              avail // 2)
    page = os.sysconf("SC_PAGE_SIZE")
    return max(page, min(want, cap) // page * page)


def _mem_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None if unreadable)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class MemoryPressure(_ChildFault):
    """Processes that keep faulting in ``intensity × 2 GiB`` of anonymous memory between them.

    Each releases a 1 MiB piece and writes it back, piece after piece (page faults and a
    memory-bandwidth stream), on the targeted ranks' CPUs, real-time with a duty cycle
    as for cpu_squeeze where allowed, so its page faults and memory traffic happen while
    the ranks wait for the CPU rather than only when the scheduler lets it run.
    """

    role = "mem"

    def _args(self, count: int, duty: float) -> list[str]:
        """Each child's share of the memory, then its duty cycle."""
        page = os.sysconf("SC_PAGE_SIZE")
        share = max(page, memory_pressure_bytes(self.spec.intensity) // count // page * page)
        return [str(share), str(duty), str(HOG_PERIOD_S)]


# --------------------------------------------------------------------------- cpu_throttle


def _cgroup_mounts() -> tuple[Path | None, Path | None]:
    """(cgroup v2 mount, cgroup v1 ``cpu`` controller mount), each None when absent."""
    v2 = v1 = None
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 4:
                    continue
                if parts[2] == "cgroup2" and v2 is None:
                    v2 = Path(parts[1])
                elif parts[2] == "cgroup" and "cpu" in parts[3].split(",") and v1 is None:
                    v1 = Path(parts[1])
    except OSError:
        pass
    return v2, v1


def _cgroup_of(pid: int, v2: bool) -> str:
    """The pid's cgroup path (relative to the hierarchy's mount) for v2 or v1 ``cpu``."""
    with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
        for line in f:
            hid, controllers, path = line.rstrip("\n").split(":", 2)
            if v2 and hid == "0" and controllers == "":
                return path
            if not v2 and "cpu" in controllers.split(","):
                return path
    return "/"


def throttle_mechanism(requested: str = "auto") -> str:
    """The cpu_throttle mechanism that would be tried first on this host."""
    if requested != "auto":
        return requested
    v2, v1 = _cgroup_mounts()
    if v2 is not None and _v2_has_cpu(v2) and os.access(v2, os.W_OK):
        return "cgroup2"
    if v1 is not None and os.access(v1, os.W_OK):
        return "cgroup1"
    return "signal"


def _v2_has_cpu(root: Path) -> bool:
    """True when the v2 hierarchy offers the cpu controller."""
    try:
        return "cpu" in (root / "cgroup.controllers").read_text().split()
    except OSError:
        return False


def _cpu_usage(pids: list[int], window_s: float) -> dict[int, float]:
    """CPUs each process used over ``window_s`` (utime + stime delta / wall time)."""
    tick = os.sysconf("SC_CLK_TCK")

    def cpu(pid: int) -> float | None:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = text[text.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / tick

    before = {pid: cpu(pid) for pid in pids}
    t0 = time.monotonic()
    time.sleep(window_s)
    wall = time.monotonic() - t0
    out = {}
    for pid, b in before.items():
        a = cpu(pid)
        if a is not None and b is not None:
            out[pid] = (a - b) / wall
    return out


class _CgroupThrottle:
    """One rank moved into its own cgroup with a CPU quota; ``undo`` moves it back."""

    def __init__(self, v2: bool, root: Path, name: str, pid: int, quota_us: int,
                 period_us: int) -> None:
        """Create the cgroup, set the quota and move the process (OSError if refused)."""
        self.v2, self.root, self.pid = v2, root, pid
        self.original = root / _cgroup_of(pid, v2).lstrip("/")
        self.path = root / name
        if v2:
            sub = (root / "cgroup.subtree_control").read_text().split()
            if "cpu" not in sub:
                (root / "cgroup.subtree_control").write_text("+cpu")
        self.path.mkdir(exist_ok=True)
        try:
            if v2:
                (self.path / "cpu.max").write_text(f"{quota_us} {period_us}")
            else:
                (self.path / "cpu.cfs_period_us").write_text(str(period_us))
                (self.path / "cpu.cfs_quota_us").write_text(str(quota_us))
            (self.path / "cgroup.procs").write_text(str(pid))
        except OSError:
            self.undo()
            raise

    def throttled_ns(self) -> int:
        """Time the cgroup spent throttled so far (``cpu.stat``; 0 if unreadable)."""
        try:
            if self.v2:
                for line in (self.path / "cpu.stat").read_text().splitlines():
                    if line.startswith("throttled_usec "):
                        return int(line.split()[1]) * 1000
            else:
                for line in (self.path / "cpu.stat").read_text().splitlines():
                    if line.startswith("throttled_time "):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            return 0
        return 0

    def undo(self) -> None:
        """Move every process back to where the rank was, then remove the cgroup."""
        _empty_and_remove(self.path, self.original, self.root)


def _empty_and_remove(path: Path, home: Path, root: Path,
                      homes: dict[int, Path] | None = None) -> None:
    """Move ``path``'s processes to ``homes[pid]``, else ``home``, else ``root``, and rmdir it.

    Never raises.
    """
    for _ in range(50):
        try:
            pids = (path / "cgroup.procs").read_text().split()
        except OSError:
            pids = []
        for pid in pids:
            own = (homes or {}).get(int(pid))
            for dest in (*((own,) if own is not None else ()), home, root):
                try:
                    (dest / "cgroup.procs").write_text(pid)
                    break
                except OSError:
                    continue
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


def cgroup_homes(pids: Iterable[int]) -> dict[int, Path]:
    """Where each process lives now in the cgroup hierarchy a throttle would use.

    Given to the guard of ``prism inject``, which moves them back there if it has to clean
    up after a killed injector. Processes that are gone are left out.
    """
    v2, v1 = _cgroup_mounts()
    mech = throttle_mechanism()
    root = v2 if mech == "cgroup2" else v1 if mech == "cgroup1" else None
    out: dict[int, Path] = {}
    if root is None:
        return out
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            out[pid] = root / _cgroup_of(pid, mech == "cgroup2").lstrip("/")
    return out


class CpuThrottle:
    """The targeted ranks get ``1 − intensity`` of a CPU each.

    A cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us`` quota where the host lets us
    create cgroups; otherwise a thread here stops each rank with SIGSTOP for
    ``intensity`` of every period and continues it with SIGCONT.
    """

    def __init__(self, spec: FaultSpec, ctx: FaultContext) -> None:
        """Prepare; nothing changes until :meth:`start`."""
        self.spec = spec
        self.ctx = ctx
        self.mechanism = ""
        self._groups: list[_CgroupThrottle] = []
        self._pids: list[int] = []
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_ns = 0
        self._stopped_ns = 0
        self._effect: dict[str, Any] = {}

    def start(self) -> None:
        """Throttle every targeted rank with the first mechanism that works."""
        if self.mechanism:
            return
        self._started_ns = time.monotonic_ns()
        self._stopped_ns = 0
        self._effect = {}
        ranks = _targets(self.spec, self.ctx)
        pids = [_pid_of(self.ctx, r, "cpu_throttle") for r in ranks]
        for pid in pids:
            if not Path(f"/proc/{pid}").exists():
                raise SimError(f"cpu_throttle: process {pid} is gone")
        choice = self.ctx.throttle
        if choice not in ("auto", *THROTTLE_MECHANISMS):
            raise SimError(f"cpu_throttle: unknown mechanism {choice!r} "
                           f"(auto, {', '.join(THROTTLE_MECHANISMS)})")
        order = THROTTLE_MECHANISMS if choice == "auto" else (choice,)
        errors: list[str] = []
        for mech in order:
            try:
                if mech == "signal":
                    self._start_signal(pids)
                else:
                    self._start_cgroup(mech == "cgroup2", ranks, pids)
            except (OSError, SimError) as exc:
                errors.append(f"{mech}: {exc}")
                continue
            self.mechanism = mech
            return
        raise SimError("cpu_throttle: no mechanism works here (" + "; ".join(errors) + ")")

    def _start_cgroup(self, v2: bool, ranks: tuple[int, ...], pids: list[int]) -> None:
        """One cgroup ``<session>-r<rank>`` per rank, quota ``(1 − i) ×`` its current use.

        A quota of a fixed share of a CPU never binds on a process that uses less than
        that share (a rank waiting on its device mostly does), unlike the frequency
        reduction it stands for, which slows every instruction. So the quota is the CPU
        time the rank was using, over the last 0.3 s, scaled by ``1 − intensity``.
        """
        mount_v2, mount_v1 = _cgroup_mounts()
        root = mount_v2 if v2 else mount_v1
        if root is None:
            raise SimError(f"no cgroup {'v2' if v2 else 'v1 cpu'} hierarchy mounted")
        if v2 and not _v2_has_cpu(root):
            raise SimError(f"the cpu controller is not available in {root}")
        period = self.ctx.throttle_period_us
        usage = _cpu_usage(pids, 0.3)
        try:
            for rank, pid in zip(ranks, pids, strict=True):
                share = min(1.0, max(0.05, usage.get(pid, 1.0)))
                quota = max(1000, round((1.0 - self.spec.intensity) * share * period))
                self._groups.append(_CgroupThrottle(
                    v2, root, f"{self.ctx.session}-r{rank}", pid, quota, period))
        except OSError:
            self._undo_groups()
            raise

    def _undo_groups(self) -> None:
        groups, self._groups = self._groups, []
        for g in groups:
            g.undo()

    def _start_signal(self, pids: list[int]) -> None:
        """Start the SIGSTOP/SIGCONT duty-cycle thread."""
        for pid in pids:
            os.kill(pid, 0)  # PermissionError / ProcessLookupError if we cannot signal it
        self._pids = pids
        self._halt.clear()
        self._thread = threading.Thread(target=self._duty_cycle, name="prism-cpu-throttle",
                                        daemon=True)
        self._thread.start()

    def _duty_cycle(self) -> None:
        """Stopped for ``intensity`` of every period, running for the rest (no drift)."""
        period = self.ctx.throttle_period_us / 1e6
        off = self.spec.intensity * period
        due = time.monotonic()
        try:
            while not self._halt.is_set():
                _signal_all(self._pids, signal.SIGSTOP)
                stopped = time.monotonic_ns()
                self._halt.wait(max(0.0, due + off - time.monotonic()))
                _signal_all(self._pids, signal.SIGCONT)
                self._stopped_ns += time.monotonic_ns() - stopped
                due += period
                now = time.monotonic()
                if due < now - period:  # fell behind (a long pause here): start afresh
                    due = now
                if self._halt.wait(max(0.0, due - now)):
                    break
        finally:
            _signal_all(self._pids, signal.SIGCONT)

    def stop(self) -> None:
        """Lift the throttle: processes back home and cgroups removed, or SIGCONT."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._pids:
            _signal_all(self._pids, signal.SIGCONT)
            self._pids = []
        if self.mechanism:
            window_s = max(1e-9, (time.monotonic_ns() - self._started_ns) / 1e9)
            held = self._stopped_ns + sum(g.throttled_ns() for g in self._groups)
            key = "stopped_ms_per_s" if self.mechanism == "signal" else "throttled_ms_per_s"
            self._effect = {"mode": self.mechanism, key: round(held / 1e6 / window_s, 1)}
        self._undo_groups()
        self.mechanism = ""

    def effect(self) -> dict[str, Any]:
        """Mechanism, and how long per second the ranks were stopped or throttled."""
        return dict(self._effect)


class Pause(CpuThrottle):
    """The target stopped with SIGSTOP for ``intensity`` of every :data:`PAUSE_PERIOD_US`.

    A whole-process stall (a stop-the-world pause, a debugger, a swap-in storm) rather
    than a throttle: always by signal, with a period long enough to stall whole requests.
    """

    def __init__(self, spec: FaultSpec, ctx: FaultContext) -> None:
        """Prepare; nothing changes until :meth:`start`."""
        super().__init__(spec, dataclasses.replace(ctx, throttle="signal",
                                                   throttle_period_us=PAUSE_PERIOD_US))


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    """Send ``sig`` to each pid, ignoring ones that are gone."""
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def cleanup_session(session: str, homes: dict[int, Path] | None = None) -> None:
    """Remove cgroups ``<session>-r*`` a crashed run left behind; never raises.

    Their processes go back to ``homes[pid]`` where given, else to the hierarchy's root.
    """
    with contextlib.suppress(Exception):
        for root in _cgroup_mounts():
            if root is None:
                continue
            for path in root.glob(f"{session}-r*"):
                if path.is_dir():
                    _empty_and_remove(path, root, root, homes)


# --------------------------------------------------------------------------- factory


_FACTORIES: dict[str, Callable[[FaultSpec, FaultContext], Injector]] = {
    "cpu_squeeze": CpuSqueeze,
    "cpu_throttle": CpuThrottle,
    "memory_pressure": MemoryPressure,
    "device_slowdown": ControlFault,
    "straggler": ControlFault,
    "interconnect_squeeze": ControlFault,
    "device_preemption": ControlFault,
    "gc_storm": ControlFault,
    "gil_contention": ControlFault,
    "pause": Pause,
}
assert set(FAULT_INFO) <= set(_FACTORIES), "every fault type needs an injector"

HOST_FAULTS = ("cpu_squeeze", "cpu_throttle", "memory_pressure", "pause")
"""Faults that act on a process from outside, with no cooperation from it (``prism inject``)."""

PAUSE_DEFAULT, PAUSE_MAX = 0.5, 0.95
"""Default and largest intensity of ``pause`` (an inject-only kind)."""


def make_injector(spec: FaultSpec, ctx: FaultContext) -> Injector:
    """The injector for ``spec`` (not started); SimError for an unknown type."""
    factory = _FACTORIES.get(spec.type)
    if factory is None:
        raise SimError(f"unknown fault type {spec.type!r}")
    return factory(spec, ctx)


def stop_all(injectors: Iterable[Injector]) -> None:
    """Stop every injector; never raises (it runs on every exit path)."""
    try:
        items = list(injectors)
    except Exception:  # an exit path must not fail
        return
    for inj in items:
        with contextlib.suppress(Exception):
            inj.stop()


# --------------------------------------------------------------------------- measured effect


def _sched_of(pids: Iterable[int]) -> dict[int, tuple[int, int]]:
    """Thread id -> (CPU ns, run-queue delay ns) of every thread of ``pids`` (schedstat)."""
    out: dict[int, tuple[int, int]] = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                fields = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
                out[int(tid)] = (int(fields[0]), int(fields[1]))
            except (OSError, ValueError, IndexError):
                continue
    return out


@dataclass(frozen=True)
class _Snapshot:
    at_ns: int
    threads: dict[int, tuple[int, int]]


def _rates(before: _Snapshot, after: _Snapshot) -> dict[str, Any]:
    """The targets' CPU and run-queue delay per second between two snapshots.

    Threads are matched by id; one that started in between counts from zero, one that
    ended in between is lost (its last figures are gone with it).
    """
    window_s = max(1e-9, (after.at_ns - before.at_ns) / 1e9)
    cpu = delay = 0
    for tid, (c, d) in after.threads.items():
        c0, d0 = before.threads.get(tid, (0, 0))
        cpu += max(0, c - c0)
        delay += max(0, d - d0)
    return {"window_s": round(window_s, 3), "threads": len(after.threads),
            "cpu_ms_per_s": round(cpu / 1e6 / window_s, 1),
            "run_delay_ms_per_s": round(delay / 1e6 / window_s, 1)}


class EffectMeter:
    """Measures what faults did to the target processes, from their threads' schedstat.

    For each fault window: the targets' CPU time and run-queue delay per second while it
    was on, and the same over the last stretch with no fault on before it (the
    baseline), so that a window where the fault did not bite shows as such in the labels.
    """

    def __init__(self, pids: Iterable[int]) -> None:
        """Start the first quiet stretch now."""
        self.pids = list(pids)
        self._quiet = self._snapshot()
        self._on = 0
        self._lock = threading.Lock()

    def _snapshot(self) -> _Snapshot:
        return _Snapshot(time.monotonic_ns(), _sched_of(self.pids))

    def fault_on(self) -> tuple[_Snapshot, dict[str, Any] | None]:
        """Call as a fault starts; the token for :meth:`fault_off`."""
        now = self._snapshot()
        with self._lock:
            baseline = _rates(self._quiet, now) if self._on == 0 else None
            self._on += 1
        return now, baseline

    def fault_off(self, token: tuple[_Snapshot, dict[str, Any] | None],
                  injector: dict[str, Any] | None = None) -> dict[str, Any]:
        """Call as the fault ended: the label's ``effect`` (targets, baseline, injector)."""
        start, baseline = token
        now = self._snapshot()
        with self._lock:
            self._on = max(0, self._on - 1)
            if self._on == 0:
                self._quiet = now
        effect: dict[str, Any] = {"target": _rates(start, now)}
        if baseline is not None and baseline["window_s"] >= 0.2:
            effect["baseline"] = baseline
        if injector:
            effect["injector"] = injector
        return effect
