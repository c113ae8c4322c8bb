"""Tests of probes.telemetry against real processes, the real /proc and the real NVML loader."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probes.telemetry import (
    FIRST_SAMPLE,
    PROCESS_EXITED,
    HostSample,
    HostSampler,
    NvmlSampler,
    ProcSample,
    ProcSampler,
    Reading,
    RunQueueReader,
    decode_clock_event_reasons,
    thread_runqueue_ns,
)
from tests.conftest import nvml_loadable

HAS_NVML = nvml_loadable()

# Two threads spin, one sleeps in short naps and prints its TID; the main thread sleeps.
CHILD = """
import threading, time
def spin():
    while True:
        pass
def nap():
    print(threading.get_native_id(), flush=True)
    while True:
        time.sleep(0.002)
for _ in range(2):
    threading.Thread(target=spin, daemon=True).start()
threading.Thread(target=nap, daemon=True).start()
time.sleep(60)
"""


@pytest.fixture
def child() -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A real child process with 4 threads; yields it and the TID of its sleeping thread."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        napper = int(proc.stdout.readline())
        yield proc, napper
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _assert_invariant(readings: dict[str, Reading]) -> None:
    for name, r in readings.items():
        assert (r.value is None) == (r.reason is not None), name
        if r.reason is not None:
            assert r.reason.strip(), name


def _assert_sample_invariant(s: ProcSample | HostSample) -> None:
    _assert_invariant(s.readings())
    if isinstance(s, ProcSample):
        for t in s.threads:
            _assert_invariant(t.readings())


# -- Reading ----------------------------------------------------------------------------------


@given(value=st.none() | st.floats(allow_nan=False) | st.integers(),
       reason=st.none() | st.text(min_size=1))
def test_reading_has_a_reason_iff_value_is_missing(value: float | None, reason: str | None) -> None:
    if (value is None) == (reason is not None):
        r = Reading(value, "u", reason)
        assert r.ok == (value is not None)
        assert str(r)
    else:
        with pytest.raises(ValueError):
            Reading(value, "u", reason)


def test_reading_str() -> None:
    assert str(Reading.of(1410, "MHz")) == "1410 MHz"
    assert str(Reading.missing("W", "permission denied")) == "n/a (permission denied)"


def test_decode_clock_event_reasons() -> None:
    assert decode_clock_event_reasons(0) == ()
    assert decode_clock_event_reasons(0x1 | 0x40) == ("gpu_idle", "hw_thermal_slowdown")
    assert decode_clock_event_reasons(0x10000) == ("unknown_0x10000",)


# -- NVML -------------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_NVML, reason="libnvidia-ml is present on this host")
def test_nvml_without_driver_is_a_value_not_an_error() -> None:
    sampler = NvmlSampler()
    assert sampler.available is False  # not opened yet
    sampler.open()
    assert sampler.available is False
    reason = sampler.unavailable_reason or ""
    assert "libnvidia-ml" in reason or "driver" in reason
    assert sampler.sample() == []
    assert sampler.processes() == {}
    assert sampler.devices() == []
    assert sampler.devices_of(os.getpid()) == []
    sampler.open()  # idempotent
    sampler.close()
    sampler.close()
    with NvmlSampler() as again:
        assert again.available is False
        assert again.sample() == []
    assert again.unavailable_reason is not None


@pytest.mark.skipif(not HAS_NVML, reason="no libnvidia-ml on this host")
def test_nvml_with_driver_samples_every_gpu() -> None:
    ticks = iter(range(0, 10**12, 10**9))
    with NvmlSampler(clock=lambda: next(ticks)) as sampler:
        if not sampler.available:  # a driver library without a usable GPU
            assert sampler.unavailable_reason
            assert sampler.sample() == []
            return
        devices = sampler.devices()
        first, second = sampler.sample(), sampler.sample()
        assert [g.index for g in first] == [d.index for d in devices]
        for s in first + second:
            _assert_invariant(s.readings())
        assert all(g.nvlink_tx_kibps.reason is not None for g in first)  # no baseline yet
        assert isinstance(sampler.processes(), dict)
    sampler.close()


def test_nvml_without_its_binding_is_a_value_not_an_error() -> None:
    """A CPU-only install (no nvidia-ml-py): a real interpreter where pynvml cannot be
    imported still loads the probe layer, and every NVML query is empty with the reason."""
    code = (
        "import sys; sys.modules['pynvml'] = None\n"  # import pynvml raises ImportError
        "from probes.telemetry import NvmlSampler\n"
        "from prism_tui.engine.devices import NvmlDevices\n"
        "s = NvmlSampler().open()\n"
        "assert (s.available, s.sample(), s.processes(), s.devices()) == (False, [], {}, [])\n"
        "d = NvmlDevices()\n"
        "assert d.processes() == {} and d.samples() == [] and d(2**22 + 12345) == 'cpu'\n"
        "print(s.unavailable_reason); print(d.unavailable_reason)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    sampler_reason, labeller_reason = out.stdout.splitlines()
    assert sampler_reason.startswith("NVML binding not importable"), sampler_reason
    assert labeller_reason == sampler_reason


def test_a_binding_that_fails_unexpectedly_is_a_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver or binding that raises something other than NVMLError (not reproducible
    on a real host at will, so pynvml's entry point is made to fail): every query of the
    one NVML entry point is empty with the reason, never an exception."""
    from probes.telemetry import nvml

    if nvml.pynvml is None:
        pytest.skip("nvidia-ml-py is not installed")

    def broken(*_args: object) -> None:
        raise OSError("driver went away")

    monkeypatch.setattr(nvml.pynvml, "nvmlInit", broken)
    sampler = NvmlSampler().open()
    assert not sampler.available
    assert sampler.unavailable_reason == "NVML query failed: OSError: driver went away"
    assert (sampler.sample(), sampler.processes(), sampler.devices()) == ([], {}, [])
    sampler.close()
    assert sampler.unavailable_reason == "NVML closed"


# -- /proc ------------------------------------------------------------------------------------


def test_proc_sampler_on_a_real_busy_process(child: tuple[subprocess.Popen[str], int]) -> None:
    proc, napper = child
    sampler = ProcSampler(proc.pid)
    first = sampler.sample()
    assert first.alive
    assert first.cpu_time_delta_ns.reason == FIRST_SAMPLE
    assert first.runqueue_delta_ns.reason == FIRST_SAMPLE
    assert all(t.runqueue_delta_ns.reason == FIRST_SAMPLE for t in first.threads)
    _assert_sample_invariant(first)

    time.sleep(0.3)
    second = sampler.sample()
    _assert_sample_invariant(second)
    assert second.alive
    assert second.interval_ns is not None and second.interval_ns > 0
    assert second.cpu_time_delta_ns.value is not None and second.cpu_time_delta_ns.value > 0
    assert second.cpu_pct.value is not None and second.cpu_pct.value > 0
    assert second.thread_count.value is not None and second.thread_count.value >= 3
    assert len(second.threads) >= 3
    assert second.rss_bytes.value is not None and second.rss_bytes.value > 0
    assert second.major_faults_delta.value is not None and second.major_faults_delta.value >= 0
    for t in second.threads:
        rq = t.runqueue_delta_ns.value
        assert isinstance(rq, int) and rq >= 0
    total = second.runqueue_delta_ns.value
    assert isinstance(total, int)
    assert total == sum(int(t.runqueue_delta_ns.value or 0) for t in second.threads)
    nap = next(t for t in second.threads if t.tid == napper)
    assert nap.voluntary_switches_delta.value is not None
    assert nap.voluntary_switches_delta.value > 0
    assert thread_runqueue_ns(proc.pid, napper) is not None

    proc.kill()
    proc.wait()
    gone = sampler.sample()
    assert gone.alive is False
    assert gone.threads == ()
    assert gone.readings()
    assert all(r.value is None and r.reason == PROCESS_EXITED for r in gone.readings().values())
    assert thread_runqueue_ns(proc.pid, napper) is None
    assert sampler.sample().alive is False  # stays exited, even if the PID is reused later


def test_proc_sampler_treats_a_zombie_as_exited(child: tuple[subprocess.Popen[str], int]) -> None:
    proc, _ = child
    sampler = ProcSampler(proc.pid)
    assert sampler.sample().alive
    proc.kill()
    deadline = time.monotonic() + 5
    while sampler.sample().alive and time.monotonic() < deadline:  # killed, not yet reaped
        time.sleep(0.01)
    assert sampler.sample().alive is False


def test_leader_that_called_pthread_exit_is_still_alive() -> None:
    code = (
        "import ctypes, threading, time\n"
        "def work():\n"
        "    print(threading.get_native_id(), flush=True)\n"
        "    time.sleep(5)\n"
        "threading.Thread(target=work).start()\n"
        "ctypes.CDLL(None).pthread_exit(None)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        worker = int(proc.stdout.readline())
        sampler = ProcSampler(proc.pid)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:  # wait for the leader to become a zombie
            with open(f"/proc/{proc.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.01)
        s = sampler.sample()
        assert s.alive
        assert worker in {t.tid for t in s.threads}
    finally:
        proc.kill()
        proc.wait()


def test_proc_sampler_on_a_pid_that_is_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: /proc/PID is gone
    s = ProcSampler(proc.pid).sample()
    assert s.alive is False
    assert all(r.reason == PROCESS_EXITED for r in s.readings().values())


def test_proc_sampler_uses_the_injected_clock() -> None:
    ticks = iter([5_000, 1_005_000])
    sampler = ProcSampler(os.getpid(), clock=lambda: next(ticks))
    a, b = sampler.sample(), sampler.sample()
    assert (a.timestamp_ns, b.timestamp_ns, b.interval_ns) == (5_000, 1_005_000, 1_000_000)
    assert a.interval_ns is None


def test_vanished_thread_drops_out() -> None:
    sampler = ProcSampler(os.getpid())
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    tid = worker.native_id
    try:
        assert tid in {t.tid for t in sampler.sample().threads}
    finally:
        stop.set()
        worker.join()
    # join() returns when Python's thread lock is released, a moment before the kernel
    # task goes away: wait for /proc to agree
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/self/task/{tid}") and time.monotonic() < deadline:
        time.sleep(0.005)
    after = sampler.sample()
    assert after.alive
    assert tid not in {t.tid for t in after.threads}
    _assert_sample_invariant(after)


def test_thread_runqueue_ns_of_this_thread() -> None:
    rq = thread_runqueue_ns(os.getpid(), threading.get_native_id())
    assert rq is None or rq >= 0  # None only where the kernel lacks CONFIG_SCHED_INFO
    assert thread_runqueue_ns(os.getpid(), 2**22 + 1) is None


def test_run_queue_reader_keeps_files_open_and_lets_exited_threads_go() -> None:
    reader = RunQueueReader(max_open=2)
    pid = os.getpid()
    me = threading.get_native_id()
    first = reader.read(pid, me)
    if first is None:
        pytest.skip("this kernel keeps no schedstat (CONFIG_SCHED_INFO)")
    burn = time.perf_counter() + 0.05
    while time.perf_counter() < burn:
        pass
    # the same value thread_runqueue_ns reads, from the file kept open: it only grows
    again = reader.read(pid, me)
    assert again is not None and first <= again <= (thread_runqueue_ns(pid, me) or 0)
    started = threading.Event()
    finish = threading.Event()
    tids: list[int] = []

    def short_lived() -> None:
        tids.append(threading.get_native_id())
        started.set()
        finish.wait(5)

    worker = threading.Thread(target=short_lived)
    worker.start()
    started.wait(5)
    assert reader.read(pid, tids[0]) is not None
    fds_open = len(os.listdir("/proc/self/fd"))
    finish.set()
    worker.join()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/self/task/{tids[0]}") and time.monotonic() < deadline:
        time.sleep(0.005)
    # the exited thread reads as None and its file is closed
    assert reader.read(pid, tids[0]) is None
    assert len(os.listdir("/proc/self/fd")) == fds_open - 1
    assert reader.read(pid, 2**22 + 1) is None  # no such thread: nothing opened
    assert len(os.listdir("/proc/self/fd")) == fds_open - 1
    reader.forget(pid + 1)  # another process's: none of ours
    assert len(os.listdir("/proc/self/fd")) == fds_open - 1
    reader.forget(pid)  # a target no longer watched: its files close
    assert len(os.listdir("/proc/self/fd")) == fds_open - 2
    assert reader.read(pid, me) is not None  # and open again when read again
    reader.close()
    assert len(os.listdir("/proc/self/fd")) == fds_open - 2


# -- host -------------------------------------------------------------------------------------


def test_host_sampler() -> None:
    sampler = HostSampler()
    first = sampler.sample()
    _assert_sample_invariant(first)
    freq = first.cpu_freq_mhz
    assert (freq.value is not None and freq.value > 0) or freq.reason
    if freq.value is not None:
        assert first.cpu_freq_per_core_mhz and all(f > 0 for f in first.cpu_freq_per_core_mhz)
    assert first.cpu_util_pct.reason == FIRST_SAMPLE
    assert first.load_avg_1m.value is not None and first.load_avg_1m.value >= 0
    end = time.monotonic() + 0.05
    while time.monotonic() < end:
        pass
    second = sampler.sample()
    _assert_sample_invariant(second)
    util = second.cpu_util_pct
    assert (util.value is not None and 0 <= util.value <= 100) or util.reason
