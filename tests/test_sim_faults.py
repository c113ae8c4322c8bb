"""Fault injectors against real processes: a Python child reports its own loop speed.

The child is pinned to one CPU and prints how many loop rounds it completed in each
100 ms; a fault that takes CPU away from it shows up as a lower count.
"""

from __future__ import annotations

import os
import queue
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from prism_sim.control import ControlBlock
from prism_sim.errors import SimError
from prism_sim.faults import (
    FaultContext,
    Injector,
    cleanup_session,
    control_value,
    make_injector,
    stop_all,
    throttle_mechanism,
)
from prism_sim.scenario import FAULT_TYPES, FaultSpec
from tests.conftest import wait_until

SPEED_CHILD = textwrap.dedent("""
    import time
    while True:
        n, end = 0, time.monotonic() + 0.1
        while time.monotonic() < end:
            for _ in range(1000):
                pass
            n += 1
        print(n, flush=True)
""")


class SpeedChild:
    """A child process reporting loop rounds per 100 ms; a thread collects the reports."""

    def __init__(self, cpu: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", SPEED_CHILD],
                                     stdout=subprocess.PIPE, text=True)
        os.sched_setaffinity(self.proc.pid, {cpu})
        self.pid = self.proc.pid
        self.reports: queue.Queue[int] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.reports.put(int(line))

    def rate(self, n: int = 6) -> float:
        """Median rounds per 100 ms over the next ``n`` fresh reports (first one dropped)."""
        while not self.reports.empty():
            self.reports.get_nowait()
        self.reports.get(timeout=5)  # a report that may straddle the change
        return statistics.median(self.reports.get(timeout=5) for _ in range(n))

    def state(self) -> str:
        """The process state letter from /proc (R, S, T...)."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0]

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()
        self._reader.join(2)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def child() -> Iterator[SpeedChild]:
    c = SpeedChild(cpu=0)
    c.rate(2)  # warmed up
    yield c
    c.close()


@pytest.fixture
def control() -> Iterator[ControlBlock]:
    block = ControlBlock.create(f"test-faults-{os.getpid()}-{uuid.uuid4().hex[:8]}", 3)
    yield block
    block.close()
    block.unlink()


@pytest.fixture
def session() -> Iterator[str]:
    name = f"prismtest-{uuid.uuid4().hex[:8]}"
    yield name
    cleanup_session(name)


def _gone(pid: int) -> bool:
    """True when ``pid`` no longer exists (or is a zombie nobody waits for)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _measure_slowdown(child: SpeedChild, inj: Injector, what: str, cycles: int = 5,
                      during: Callable[[], None] | None = None) -> None:
    """Toggle ``inj`` ``cycles`` times; each on-rate is compared with the off-rates around it.

    Pairing measurements close in time keeps other load on the machine (other test
    sessions) from passing for the fault or hiding it.
    """
    offs = [child.rate(2)]
    ons: list[float] = []
    for _ in range(cycles):
        inj.start()
        if during is not None:
            during()
        ons.append(child.rate(2))
        inj.stop()
        offs.append(child.rate(2))
    slow = statistics.median(1 - on / ((a + b) / 2)
                             for on, a, b in zip(ons, offs, offs[1:], strict=False))
    recovered = statistics.median(b / on for on, b in zip(ons, offs[1:], strict=True))
    print(f"{what}: off {[round(x) for x in offs]}, on {[round(x) for x in ons]} "
          f"rounds/100 ms: {slow:.0%} slower while on")
    assert slow >= 0.2, f"{what} slowed the child only {slow:.0%}"
    assert recovered >= 1.2, f"{what} still slows it after stop"


# --------------------------------------------------------------------------- host faults


def test_cpu_squeeze_slows_the_rank_and_its_children_die_on_stop(
        child: SpeedChild, control: ControlBlock, session: str) -> None:
    ctx = FaultContext(control, {0: child.pid}, session)
    inj = make_injector(FaultSpec("cpu_squeeze", 0, 10, 0, FAULT_TYPES["cpu_squeeze"]), ctx)
    hogs: list[int] = []

    def check() -> None:
        pids = list(inj.pids)  # type: ignore[attr-defined]
        # root here: one real-time hog pinned to each CPU (else 4 x intensity 1 fair)
        cpus = os.sched_getaffinity(0)
        assert inj.mode == "rt" and len(pids) == len(cpus)  # type: ignore[attr-defined]
        assert [os.sched_getaffinity(pid) for pid in pids] == [{c} for c in sorted(cpus)]
        assert all(os.sched_getscheduler(pid) == os.SCHED_FIFO for pid in pids)
        hogs.extend(pids)

    _measure_slowdown(child, inj, "cpu_squeeze", during=check)
    assert hogs and all(_gone(pid) for pid in hogs)
    effect = inj.effect()
    assert effect["mode"] == "rt" and effect["fault_cpu_ms_per_s"] > 300, effect
    inj.stop()  # idempotent


def test_cpu_squeeze_falls_back_to_fair_hogs_without_realtime(
        child: SpeedChild, control: ControlBlock, session: str) -> None:
    """``realtime=False`` (what a host without CAP_SYS_NICE gets): 4 normal hogs per CPU."""
    ctx = FaultContext(control, {0: child.pid}, session, realtime=False)
    inj = make_injector(FaultSpec("cpu_squeeze", 0, 10, 0, 1.0), ctx)
    inj.start()
    try:
        pids = list(inj.pids)  # type: ignore[attr-defined]
        assert inj.mode == "fair" and len(pids) == 4  # type: ignore[attr-defined]
        assert all(os.sched_getscheduler(pid) == os.SCHED_OTHER for pid in pids)
    finally:
        inj.stop()
    assert all(_gone(pid) for pid in pids)


@pytest.mark.parametrize("mechanism", ["auto", "signal"])
def test_cpu_throttle_slows_the_rank_and_leaves_it_running(
        child: SpeedChild, control: ControlBlock, session: str, mechanism: str) -> None:
    cgroup_before = Path(f"/proc/{child.pid}/cgroup").read_text()
    ctx = FaultContext(control, {0: child.pid}, session, throttle=mechanism)
    # 0.75 rather than the default 0.5: a quarter of a CPU stays measurably slower than
    # the half a CPU the child still gets when another test session shares its CPU.
    inj = make_injector(FaultSpec("cpu_throttle", 0, 10, 0, 0.75), ctx)
    used: list[str] = []

    def check() -> None:
        used.append(inj.mechanism)  # type: ignore[attr-defined]
        if used[-1].startswith("cgroup"):
            assert f"/{session}-r0" in Path(f"/proc/{child.pid}/cgroup").read_text()

    _measure_slowdown(child, inj, f"cpu_throttle ({mechanism})", during=check)
    assert set(used) == {throttle_mechanism() if mechanism == "auto" else "signal"}
    inj.stop()  # idempotent
    time.sleep(0.05)
    assert child.state() in ("R", "S"), "left stopped"
    assert Path(f"/proc/{child.pid}/cgroup").read_text() == cgroup_before
    leftovers = [p for m in ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/unified")
                 for p in Path(m).glob(f"{session}-r*")]
    assert not leftovers


def test_cleanup_session_removes_a_crashed_runs_cgroups(
        child: SpeedChild, control: ControlBlock, session: str) -> None:
    if throttle_mechanism() == "signal":
        pytest.skip("no writable cgroup hierarchy here: cpu_throttle uses signals")
    before = Path(f"/proc/{child.pid}/cgroup").read_text()
    inj = make_injector(FaultSpec("cpu_throttle", 0, 10, 0, 0.5),
                        FaultContext(control, {0: child.pid}, session))
    inj.start()  # ... and the orchestrator dies without stopping it
    cleanup_session(session)
    assert Path(f"/proc/{child.pid}/cgroup").read_text() == before
    assert not Path("/sys/fs/cgroup/cpu", f"{session}-r0").exists()
    inj.stop()  # still harmless


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_memory_pressure_child_churns_memory_and_dies_on_stop(
        child: SpeedChild, control: ControlBlock, session: str) -> None:
    inj = make_injector(FaultSpec("memory_pressure", 0, 10, 0, 0.1),
                        FaultContext(control, {0: child.pid}, session))
    inj.start()
    pids = list(inj.pids)  # type: ignore[attr-defined]  # one per CPU (real-time here)
    assert {frozenset(os.sched_getaffinity(p)) for p in pids} >= {frozenset({0})}
    first = sum(_rss_kib(p) for p in pids)
    wait_until(lambda: sum(_rss_kib(p) for p in pids) > first + 32 * 1024, timeout=10)
    inj.stop()
    assert all(_gone(p) for p in pids)


# --------------------------------------------------------------------------- control block


CONTROL_TYPES = ["device_slowdown", "straggler", "interconnect_squeeze", "device_preemption",
                 "gc_storm", "gil_contention"]


@pytest.mark.parametrize("fault_type", CONTROL_TYPES)
def test_control_faults_set_and_restore_their_field(
        control: ControlBlock, session: str, fault_type: str) -> None:
    ctx = FaultContext(control, {0: 1, 1: 1, 2: 1}, session)
    control.set(2, speed=0.9, gc_storm=1)  # someone else's setting on another rank
    spec = FaultSpec(fault_type, 0, 10, 1, FAULT_TYPES[fault_type])
    field, value = control_value(spec)
    expected = {"device_slowdown": ("speed", 0.5), "straggler": ("speed", 0.5),
                "interconnect_squeeze": ("link", 0.3), "device_preemption": ("preempt", 0.5),
                "gc_storm": ("gc_storm", 50), "gil_contention": ("gil_contention", 3)}
    assert (field, value) == pytest.approx(expected[fault_type])
    before = [control.get(r) for r in range(3)]
    inj = make_injector(spec, ctx)
    inj.start()
    assert getattr(control.get(1), field) == pytest.approx(value)
    assert control.get(0) == before[0] and control.get(2) == before[2]
    inj.stop()
    inj.stop()
    assert [control.get(r) for r in range(3)] == before


def test_control_fault_on_all_ranks(control: ControlBlock, session: str) -> None:
    inj = make_injector(FaultSpec("device_slowdown", 0, 10, None, 0.25),
                        FaultContext(control, {0: 1, 1: 1, 2: 1}, session))
    inj.start()
    assert [control.get(r).speed for r in range(3)] == [0.75] * 3
    inj.stop()
    assert [control.get(r).speed for r in range(3)] == [1.0] * 3


def test_control_fault_stop_survives_a_closed_block(session: str) -> None:
    block = ControlBlock.create(f"test-faults-{uuid.uuid4().hex[:8]}", 1)
    try:
        inj = make_injector(FaultSpec("gc_storm", 0, 1, 0, 0.5),
                            FaultContext(block, {0: 1}, session))
        inj.start()
        block.close()
        stop_all([inj])
    finally:
        block.unlink()


# --------------------------------------------------------------------------- exit paths


class _Exploding:
    spec = FaultSpec("gc_storm", 0, 1, 0, 0.5)

    def __init__(self) -> None:
        self.stopped = 0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.stopped += 1
        raise RuntimeError("boom")

    def effect(self) -> dict[str, Any]:
        return {}


def test_stop_all_never_raises_even_after_processes_died(
        control: ControlBlock, session: str) -> None:
    victim = SpeedChild(cpu=1)
    try:
        ctx = FaultContext(control, {0: victim.pid}, session)
        injectors: list[Injector] = [
            make_injector(FaultSpec("cpu_squeeze", 0, 1, 0, 1.0), ctx),
            make_injector(FaultSpec("cpu_throttle", 0, 1, 0, 0.5), ctx),
            make_injector(FaultSpec("memory_pressure", 0, 1, 0, 0.05), ctx),
            make_injector(FaultSpec("device_slowdown", 0, 1, 0, 0.5), ctx),
        ]
        bad = _Exploding()
        for inj in injectors:
            inj.start()
        children = [p for inj in injectors for p in getattr(inj, "pids", [])]
        victim.proc.kill()
        victim.proc.wait()
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        stop_all([bad, *injectors])
        stop_all([bad, *injectors])
        assert bad.stopped == 2
        assert all(_gone(pid) for pid in children)
        assert control.get(0).speed == 1.0

        def broken() -> Iterator[Injector]:
            yield injectors[0]
            raise RuntimeError("iterator failed")

        stop_all(broken())
    finally:
        victim.close()


def test_start_on_a_gone_process_says_so(control: ControlBlock, session: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    for fault_type in ("cpu_squeeze", "cpu_throttle", "memory_pressure"):
        inj = make_injector(FaultSpec(fault_type, 0, 1, 0, 0.5),
                            FaultContext(control, {0: proc.pid}, session))
        with pytest.raises(SimError, match=f"{fault_type}: .*gone"):
            inj.start()
        inj.stop()
    inj = make_injector(FaultSpec("cpu_squeeze", 0, 1, 1, 0.5),
                        FaultContext(control, {0: proc.pid}, session))
    with pytest.raises(SimError, match="no process for rank 1"):
        inj.start()
    with pytest.raises(SimError, match="unknown fault type"):
        make_injector(FaultSpec("nope", 0, 1, 0, 0.5), FaultContext(control, {}, session))


ORPHANING_PARENT = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    from prism_sim.faults import FaultContext, make_injector
    from prism_sim.scenario import FaultSpec
    ctx = FaultContext(None, {0: os.getpid()}, "orphan-test")
    hogs = make_injector(FaultSpec("cpu_squeeze", 0, 60, 0, 1.0), ctx)
    hogs.start()
    mem = make_injector(FaultSpec("memory_pressure", 0, 60, 0, 0.05), ctx)
    mem.start()
    print(" ".join(map(str, hogs.pids + mem.pids)), flush=True)
    time.sleep(60)
""")


def test_sigkill_of_the_injecting_process_leaves_no_child_behind() -> None:
    root = str(Path(__file__).resolve().parent.parent)
    parent = subprocess.Popen([sys.executable, "-c", ORPHANING_PARENT, root],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) >= 2 and not any(_gone(p) for p in pids)
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    wait_until(lambda: all(_gone(p) for p in pids), timeout=3)
