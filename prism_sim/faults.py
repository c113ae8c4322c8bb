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
from typing import Protocol

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

READY_TIMEOUT_S = 5.0
"""How long ``start()`` waits for a child process to say it is running."""

_CHUNK = 64 << 20  # the churner releases and re-touches memory in chunks this big

# The program every injector child runs (``python -I -S -c``). argv: role, parent pid,
# CPU list, role argument. It asks the kernel to SIGKILL it when its parent dies, checks
# the parent is still there (it could have died before the prctl), pins itself, says
# "ready" on stdout and works until killed; it also exits if it finds itself orphaned.
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
if role == "hog":
    os.write(1, b"ready\n")
    x, y = 1.000001, 0.5
    while True:
        for _ in range(200000):
            y = y * 0.9999997 + x * 1.0000003  # dense floating-point multiply-add
            x = x * 0.9999999 + 1e-9
        if os.getppid() != parent:
            os._exit(0)
elif role == "mem":
    size, chunk, page = int(sys.argv[4]), int(sys.argv[5]), mmap.PAGESIZE
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    spans = [(off, min(chunk, size - off)) for off in range(0, size, chunk)]
    fill = {n: b"\x5a" * n for _, n in spans}
    first = True
    while True:  # release a chunk, then write all of it back: page faults and a full
        for off, n in spans:  # memory-bandwidth stream, chunk after chunk
            if not first:
                buf.madvise(mmap.MADV_DONTNEED, off, n)
            buf[off:off + n] = fill[n]
            if first and off == 0:
                os.write(1, b"ready\n")
        first = False
        if os.getppid() != parent:
            os._exit(0)
"""


@dataclass
class FaultContext:
    """What injectors need to reach a run: its control block, rank processes and names.

    Attributes:
        control: the run's shared-memory control block.
        rank_pids: rank -> pid of the rank process.
        session: unique prefix for names this run creates (cgroups).
        throttle: cpu_throttle mechanism: ``auto`` (first that works of
            :data:`THROTTLE_MECHANISMS`) or one of them.
        throttle_period_us: cgroup quota period and SIGSTOP duty-cycle period.
    """

    control: ControlBlock
    rank_pids: dict[int, int]
    session: str
    throttle: str = "auto"
    throttle_period_us: int = 20_000


class Injector(Protocol):
    """One fault window's effect: ``start()`` turns it on, ``stop()`` turns it off."""

    spec: FaultSpec

    def start(self) -> None:
        """Switch the fault on; SimError if it cannot be."""
        ...

    def stop(self) -> None:
        """Switch it off: idempotent, kills every child, restores every setting."""
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
        for rank in _targets(self.spec, self.ctx):
            self._saved[rank] = getattr(self.ctx.control.get(rank), self.field)
            self.ctx.control.set(rank, **{self.field: self.value})

    def stop(self) -> None:
        """Put the old values back (idempotent; a closed block is left alone)."""
        saved, self._saved = self._saved, {}
        for rank, old in saved.items():
            with contextlib.suppress(Exception):
                self.ctx.control.set(rank, **{self.field: old})


# --------------------------------------------------------------------------- child processes


class _ChildFault:
    """Base of faults carried out by child processes; tracks and kills them."""

    role = ""

    def __init__(self, spec: FaultSpec, ctx: FaultContext) -> None:
        """Prepare; nothing runs until :meth:`start`."""
        self.spec = spec
        self.ctx = ctx
        self.children: list[subprocess.Popen[bytes]] = []

    @property
    def pids(self) -> list[int]:
        """Pids of the children this injector started (running or not)."""
        return [c.pid for c in self.children]

    def _spawn(self, cpus: list[int], *extra: str) -> subprocess.Popen[bytes]:
        """Start one child running :data:`_CHILD` with this injector's role."""
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _CHILD, self.role, str(os.getpid()),
             ",".join(map(str, cpus)), *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            close_fds=True)
        self.children.append(proc)
        return proc

    def _wait_ready(self) -> None:
        """Wait until every child printed ``ready`` (SimError after READY_TIMEOUT_S)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        waiting = {c.stdout.fileno(): c for c in self.children if c.stdout is not None}
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise SimError(f"{self.spec.type}: a child process did not start within "
                               f"{READY_TIMEOUT_S:g} s")
            ready, _, _ = select.select(list(waiting), [], [], left)
            for fd in ready:
                child = waiting.pop(fd)
                line = os.read(fd, 64)
                if not line.startswith(b"ready"):
                    self.stop()
                    raise SimError(f"{self.spec.type}: child process {child.pid} exited "
                                   f"at start (rc={child.poll()})")
        for c in self.children:
            if c.stdout is not None:
                c.stdout.close()

    def stop(self) -> None:
        """Kill and reap every child (idempotent)."""
        children, self.children = self.children, []
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
    """Processes running dense floating-point loops on the targeted ranks' CPUs."""

    role = "hog"

    def start(self) -> None:
        """Start ``max(1, round(4 × intensity × CPUs))`` hogs pinned to the ranks' CPUs.

        Four per CPU at full intensity: with one, the scheduler lets a rank thread that
        wakes from a device wait preempt the hog at once, and a host loop that mostly
        waits hardly notices it (measured: 4 %; two per CPU: 20–25 %; three: 25–50 %).
        """
        if self.children:
            return
        pids = [_pid_of(self.ctx, r, "cpu_squeeze") for r in _targets(self.spec, self.ctx)]
        cpus = _cpus_of(pids, "cpu_squeeze")
        count = max(1, round(4 * self.spec.intensity * len(cpus)))
        for _ in range(count):
            self._spawn(cpus)
        self._wait_ready()


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
    """One process that keeps faulting in ``intensity × 2 GiB`` of anonymous memory."""

    role = "mem"

    def start(self) -> None:
        """Start the churner on the targeted ranks' CPUs; returns once it touched it all."""
        if self.children:
            return
        pids = [_pid_of(self.ctx, r, "memory_pressure")
                for r in _targets(self.spec, self.ctx)]
        cpus = _cpus_of(pids, "memory_pressure")
        # churners on every CPU of the ranks (four per CPU at full intensity, as for
        # cpu_squeeze): page faults and memory traffic compete with the host loops
        count = max(1, round(4 * self.spec.intensity * len(cpus)))
        for _ in range(count):
            self._spawn(cpus, str(memory_pressure_bytes(self.spec.intensity) // count),
                        str(_CHUNK))
        self._wait_ready()


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

    def undo(self) -> None:
        """Move every process back to where the rank was, then remove the cgroup."""
        _empty_and_remove(self.path, self.original, self.root)


def _empty_and_remove(path: Path, home: Path, root: Path) -> None:
    """Move ``path``'s processes to ``home`` (else ``root``) and rmdir it; never raises."""
    for _ in range(50):
        try:
            pids = (path / "cgroup.procs").read_text().split()
        except OSError:
            pids = []
        for pid in pids:
            for dest in (home, root):
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

    def start(self) -> None:
        """Throttle every targeted rank with the first mechanism that works."""
        if self.mechanism:
            return
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
                self._halt.wait(max(0.0, due + off - time.monotonic()))
                _signal_all(self._pids, signal.SIGCONT)
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
        self._undo_groups()
        self.mechanism = ""


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    """Send ``sig`` to each pid, ignoring ones that are gone."""
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def cleanup_session(session: str) -> None:
    """Remove cgroups ``<session>-r*`` a crashed run left behind; never raises."""
    with contextlib.suppress(Exception):
        for root in _cgroup_mounts():
            if root is None:
                continue
            for path in root.glob(f"{session}-r*"):
                if path.is_dir():
                    _empty_and_remove(path, root, root)


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
}
assert set(_FACTORIES) == set(FAULT_INFO), "every fault type needs an injector"


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
