"""NVML and /proc samplers: device, process, thread and host metrics polled about once a second.

Failures are values, not exceptions (docs/architecture.md §Rules 4): every metric is a
:class:`Reading` that holds either a value or the reason it is missing ("not supported on this GPU",
"permission denied", "process exited", ...). Sampler methods never raise except on programming
errors, so an executor job that calls them cannot surface a traceback in the asyncio loop.

Samplers are synchronous and blocking (NVML calls, /proc reads); the engine runs them in an
executor (docs/architecture.md §Rules 3). Three of them, one concern each:

* :class:`NvmlSampler` owns one NVML session and samples every NVIDIA GPU;
* :class:`ProcSampler` samples one process and its threads from ``/proc/PID``;
* :class:`HostSampler` samples host-wide figures (CPU frequency and utilisation, load), kept
  apart from processes because one host serves many targets.

Counters that only make sense as rates (run-queue delay, context switches, CPU time, faults,
NVLink bytes) are reported as deltas since the previous ``sample()``; the first sample of a
series has them missing with the reason :data:`FIRST_SAMPLE`.
"""

from __future__ import annotations

import glob
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from types import TracebackType
from typing import Any

import pynvml

Clock = Callable[[], int]
"""A monotonic clock in nanoseconds; ``time.monotonic_ns`` unless a test injects another."""

FIRST_SAMPLE = "first sample"
PROCESS_EXITED = "process exited"
PERMISSION_DENIED = "permission denied"
NOT_EXPOSED = "not exposed by this kernel"
NOT_SUPPORTED = "not supported on this GPU"
NO_NVML = "no NVIDIA driver (libnvidia-ml.so.1 not found)"

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_NS_PER_TICK = 1_000_000_000 // _CLK_TCK
_UINT_MAX = 0xFFFFFFFF  # NVML field scopeId meaning "all links"


# --------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class Reading:
    """One metric that may be missing: ``value`` with its ``unit``, or ``None`` and a ``reason``.

    The invariant ``(value is None) == (reason is not None)`` is checked on construction.
    """

    value: float | None
    unit: str
    reason: str | None = None

    def __post_init__(self) -> None:
        """Reject a value with a reason, or a missing value without one (a programming error)."""
        if (self.value is None) != (self.reason is not None):
            raise ValueError(f"Reading needs exactly one of value and reason, got {self!r}")

    @classmethod
    def of(cls, value: float, unit: str) -> Reading:
        """A present reading."""
        return cls(value, unit, None)

    @classmethod
    def missing(cls, unit: str, reason: str) -> Reading:
        """A missing reading and why it is missing."""
        return cls(None, unit, reason)

    @property
    def ok(self) -> bool:
        """True when the reading has a value."""
        return self.value is not None

    def __str__(self) -> str:
        """Short human form for logs and the UI: ``1410 MHz`` or ``n/a (permission denied)``."""
        if self.value is None:
            return f"n/a ({self.reason})"
        shown = f"{self.value:.1f}" if isinstance(self.value, float) else str(self.value)
        return f"{shown} {self.unit}".rstrip()


def readings_of(sample: Any) -> dict[str, Reading]:
    """Every :class:`Reading` field of a sample dataclass by field name, for generic display."""
    return {f.name: v for f in fields(sample) if isinstance(v := getattr(sample, f.name), Reading)}


def _delta(cur: int | None, cur_reason: str | None, prev: int | None, unit: str) -> Reading:
    """Reading of ``cur - prev`` for a cumulative counter; ``prev is None`` means no baseline."""
    if cur is None:
        return Reading.missing(unit, cur_reason or "unavailable")
    if prev is None:
        return Reading.missing(unit, FIRST_SAMPLE)
    if cur < prev:
        return Reading.missing(unit, "counter went backwards")
    return Reading.of(cur - prev, unit)


# --------------------------------------------------------------------------------------------
# NVML


_NO_DRIVER_FUNCTION = "not available in this driver version"
_NO_BINDING = "not available in this nvidia-ml-py"
_NVML_REASONS: dict[str, str] = {
    "NVML_ERROR_UNINITIALIZED": "NVML not initialised",
    "NVML_ERROR_NOT_SUPPORTED": NOT_SUPPORTED,
    "NVML_ERROR_NO_PERMISSION": PERMISSION_DENIED,
    "NVML_ERROR_NOT_FOUND": "not found",
    "NVML_ERROR_INSUFFICIENT_POWER": "GPU has insufficient power (check power cables)",
    "NVML_ERROR_DRIVER_NOT_LOADED": "NVIDIA driver not loaded",
    "NVML_ERROR_TIMEOUT": "NVML call timed out",
    "NVML_ERROR_LIBRARY_NOT_FOUND": NO_NVML,
    "NVML_ERROR_FUNCTION_NOT_FOUND": _NO_DRIVER_FUNCTION,
    "NVML_ERROR_GPU_IS_LOST": "GPU is lost (fell off the bus)",
    "NVML_ERROR_RESET_REQUIRED": "GPU needs a reset",
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH":
        "NVIDIA driver/library version mismatch (reload the kernel module)",
    "NVML_ERROR_NO_DATA": "no data yet",
    "NVML_ERROR_NOT_READY": "GPU not ready",
    "NVML_ERROR_GPU_NOT_FOUND": "GPU not found",
    "NVML_ERROR_DEPRECATED": "deprecated in this driver",
}
_NVML_REASON_BY_CODE: dict[int, str] = {
    code: reason
    for name, reason in _NVML_REASONS.items()
    if isinstance(code := getattr(pynvml, name, None), int)
}


def nvml_reason(code: int, detail: str = "") -> str:
    """Human reason for an NVML return code (the ``value`` of a :class:`pynvml.NVMLError`)."""
    if code in _NVML_REASON_BY_CODE:
        return _NVML_REASON_BY_CODE[code]
    return f"NVML error {code}: {detail}" if detail else f"NVML error {code}"


def _nvml_call(name: str, *args: Any) -> tuple[Any, str | None]:
    """Call ``pynvml.<name>(*args)``; return ``(result, None)`` or ``(None, reason)``."""
    fn = getattr(pynvml, name, None)
    if fn is None:
        return None, _NO_BINDING
    try:
        return fn(*args), None
    except pynvml.NVMLError as err:
        return None, nvml_reason(int(err.value), str(err))


def _text(raw: Any) -> str:
    """NVML strings are ``bytes`` in older nvidia-ml-py releases and ``str`` in newer ones."""
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


_CLOCK_EVENT_BITS: tuple[tuple[int, str], ...] = (
    (0x001, "gpu_idle"),
    (0x002, "applications_clocks_setting"),
    (0x004, "sw_power_cap"),
    (0x008, "hw_slowdown"),
    (0x010, "sync_boost"),
    (0x020, "sw_thermal_slowdown"),
    (0x040, "hw_thermal_slowdown"),
    (0x080, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
    (0x200, "board_limit"),
    (0x400, "reliability"),
)


def decode_clock_event_reasons(mask: int) -> tuple[str, ...]:
    """Names of the bits set in an NVML clocks-event (throttle) reason bitmask."""
    names = [name for bit, name in _CLOCK_EVENT_BITS if mask & bit]
    known = 0
    for bit, _ in _CLOCK_EVENT_BITS:
        known |= bit
    if rest := mask & ~known:
        names.append(f"unknown_{rest:#x}")
    return tuple(names)


@dataclass(frozen=True)
class GpuInfo:
    """Static identity of one GPU; string fields are ``None`` where NVML could not tell."""

    index: int
    uuid: str | None
    name: str | None
    pci_bus_id: str | None
    memory_total: Reading


@dataclass(frozen=True)
class GpuSample:
    """One poll of one GPU. ``timestamp_ns`` comes from the sampler's monotonic clock."""

    index: int
    uuid: str | None
    timestamp_ns: int
    gpu_util_pct: Reading
    mem_util_pct: Reading
    sm_clock_mhz: Reading
    mem_clock_mhz: Reading
    temperature_c: Reading
    power_w: Reading
    throttle_reasons: Reading
    throttle_names: tuple[str, ...]
    memory_used_bytes: Reading
    memory_total_bytes: Reading
    pcie_tx_kbps: Reading
    pcie_rx_kbps: Reading
    nvlink_tx_kibps: Reading
    nvlink_rx_kibps: Reading

    def readings(self) -> dict[str, Reading]:
        """Every metric of this sample by name."""
        return readings_of(self)


class NvmlSampler:
    """The one owner of an NVML session; samples every NVIDIA GPU of the host.

    ``open()`` never raises: when NVML cannot start (no driver, no GPU) ``available`` is False,
    ``unavailable_reason`` says why, and every query returns an empty result. ``open()`` and
    ``close()`` are idempotent; the sampler is a context manager. Methods are thread-safe.

    PCIe throughput queries block about 20 ms each inside the driver; call ``sample()`` from an
    executor, not from the event loop.
    """

    def __init__(self, clock: Clock = time.monotonic_ns) -> None:
        """Create a closed sampler; ``clock`` stamps samples (monotonic ns)."""
        self._clock = clock
        self._lock = threading.Lock()
        self._open = False
        self._reason: str | None = "NVML not opened (call open() first)"
        self._handles: list[tuple[Any, str | None]] = []
        self._uuids: list[str | None] = []
        self._nvlink_prev: dict[int, tuple[int, int, int]] = {}
        self._event_fn = "nvmlDeviceGetCurrentClocksEventReasons"

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> NvmlSampler:
        """Start NVML and enumerate the GPUs; on failure record the reason instead of raising."""
        with self._lock:
            if self._open:
                return self
            _, reason = _nvml_call("nvmlInit")
            if reason is not None:
                self._reason = reason
                return self
            self._open = True
            count, reason = _nvml_call("nvmlDeviceGetCount")
            if reason is not None:
                self._reason = f"cannot count GPUs: {reason}"
                return self
            self._reason = None
            self._handles = [_nvml_call("nvmlDeviceGetHandleByIndex", i) for i in range(count)]
            self._uuids = [
                None if hreason is not None
                or (uuid := _nvml_call("nvmlDeviceGetUUID", h)[0]) is None else _text(uuid)
                for h, hreason in self._handles
            ]
            self._nvlink_prev.clear()
            return self

    def close(self) -> None:
        """End the NVML session (safe to call any number of times)."""
        with self._lock:
            if self._open:
                _nvml_call("nvmlShutdown")
                self._open = False
            self._handles = []
            self._uuids = []
            self._nvlink_prev.clear()
            self._reason = "NVML closed"

    def __enter__(self) -> NvmlSampler:
        """Open the session."""
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the session."""
        self.close()

    @property
    def available(self) -> bool:
        """True while NVML is open and its GPUs were enumerated."""
        return self._reason is None

    @property
    def unavailable_reason(self) -> str | None:
        """Why no GPU metrics are available, or ``None`` when they are."""
        return self._reason

    # -- queries -----------------------------------------------------------------------------

    def devices(self) -> list[GpuInfo]:
        """Identity of every GPU; empty (see ``unavailable_reason``) when NVML is unavailable."""
        with self._lock:
            if self._reason is not None:
                return []
            out = []
            for index, (handle, hreason) in enumerate(self._handles):
                if hreason is not None:
                    out.append(GpuInfo(index, None, None, None, Reading.missing("B", hreason)))
                    continue
                name, _ = _nvml_call("nvmlDeviceGetName", handle)
                pci, _ = _nvml_call("nvmlDeviceGetPciInfo", handle)
                mem, mreason = _nvml_call("nvmlDeviceGetMemoryInfo", handle)
                out.append(GpuInfo(
                    index=index,
                    uuid=self._uuids[index],
                    name=None if name is None else _text(name),
                    pci_bus_id=None if pci is None else _text(pci.busId),
                    memory_total=(Reading.missing("B", mreason) if mreason is not None
                                  else Reading.of(int(mem.total), "B")),
                ))
            return out

    def sample(self) -> list[GpuSample]:
        """One :class:`GpuSample` per GPU; ``[]`` when NVML is unavailable."""
        with self._lock:
            if self._reason is not None:
                return []
            return [self._sample_one(i, h, r) for i, (h, r) in enumerate(self._handles)]

    def processes(self) -> dict[int, list[int]]:
        """PID → sorted GPU indices on which it runs compute or graphics work.

        PIDs are as NVML sees them (the host PID namespace); ``{}`` when NVML is unavailable.
        """
        with self._lock:
            if self._reason is not None:
                return {}
            found: dict[int, set[int]] = {}
            for index, (handle, hreason) in enumerate(self._handles):
                if hreason is not None:
                    continue
                for fn in ("nvmlDeviceGetComputeRunningProcesses",
                           "nvmlDeviceGetGraphicsRunningProcesses"):
                    procs, _ = _nvml_call(fn, handle)
                    for p in procs or ():
                        found.setdefault(int(p.pid), set()).add(index)
            return {pid: sorted(idx) for pid, idx in found.items()}

    def devices_of(self, pid: int) -> list[int]:
        """GPU indices used by ``pid`` (empty if none, or NVML is unavailable)."""
        return self.processes().get(pid, [])

    # -- internals ---------------------------------------------------------------------------

    def _sample_one(self, index: int, handle: Any, hreason: str | None) -> GpuSample:
        now = self._clock()
        if hreason is not None:
            return _missing_gpu_sample(index, self._uuids[index], now, hreason)

        def read(fn: str, unit: str, conv: Callable[[Any], float], *args: Any) -> Reading:
            raw, reason = _nvml_call(fn, handle, *args)
            return Reading.missing(unit, reason) if reason is not None else Reading.of(
                conv(raw), unit)

        util, ureason = _nvml_call("nvmlDeviceGetUtilizationRates", handle)
        mem, mreason = _nvml_call("nvmlDeviceGetMemoryInfo", handle)
        mask, treason = _nvml_call(self._event_fn, handle)
        if (treason in (_NO_DRIVER_FUNCTION, _NO_BINDING)
                and self._event_fn == "nvmlDeviceGetCurrentClocksEventReasons"):
            # drivers before R535 only have the older name of the same query
            self._event_fn = "nvmlDeviceGetCurrentClocksThrottleReasons"
            mask, treason = _nvml_call(self._event_fn, handle)
        nv_tx, nv_rx = self._nvlink(index, handle, now)
        return GpuSample(
            index=index,
            uuid=self._uuids[index],
            timestamp_ns=now,
            gpu_util_pct=(Reading.missing("%", ureason) if ureason is not None
                          else Reading.of(int(util.gpu), "%")),
            mem_util_pct=(Reading.missing("%", ureason) if ureason is not None
                          else Reading.of(int(util.memory), "%")),
            sm_clock_mhz=read("nvmlDeviceGetClockInfo", "MHz", int, pynvml.NVML_CLOCK_SM),
            mem_clock_mhz=read("nvmlDeviceGetClockInfo", "MHz", int, pynvml.NVML_CLOCK_MEM),
            temperature_c=read("nvmlDeviceGetTemperature", "C", int,
                               pynvml.NVML_TEMPERATURE_GPU),
            power_w=read("nvmlDeviceGetPowerUsage", "W", lambda mw: int(mw) / 1000.0),
            throttle_reasons=(Reading.missing("bitmask", treason) if treason is not None
                              else Reading.of(int(mask), "bitmask")),
            throttle_names=() if treason is not None else decode_clock_event_reasons(int(mask)),
            memory_used_bytes=(Reading.missing("B", mreason) if mreason is not None
                               else Reading.of(int(mem.used), "B")),
            memory_total_bytes=(Reading.missing("B", mreason) if mreason is not None
                                else Reading.of(int(mem.total), "B")),
            pcie_tx_kbps=read("nvmlDeviceGetPcieThroughput", "KB/s", int,
                              pynvml.NVML_PCIE_UTIL_TX_BYTES),
            pcie_rx_kbps=read("nvmlDeviceGetPcieThroughput", "KB/s", int,
                              pynvml.NVML_PCIE_UTIL_RX_BYTES),
            nvlink_tx_kibps=nv_tx,
            nvlink_rx_kibps=nv_rx,
        )

    def _nvlink(self, index: int, handle: Any, now: int) -> tuple[Reading, Reading]:
        """NVLink data throughput (all links) from the cumulative KiB counters, as KiB/s."""
        unit = "KiB/s"
        fields_ = [(pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, _UINT_MAX),
                   (pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, _UINT_MAX)]
        values, reason = _nvml_call("nvmlDeviceGetFieldValues", handle, fields_)
        if reason is not None:
            return Reading.missing(unit, reason), Reading.missing(unit, reason)
        counters: list[int | None] = []
        reasons: list[str] = []
        for v in values:
            if int(v.nvmlReturn) != pynvml.NVML_SUCCESS:
                counters.append(None)
                reasons.append(nvml_reason(int(v.nvmlReturn)))
            else:
                counters.append(_field_value(v))
                reasons.append("")
        tx, rx = counters
        prev = self._nvlink_prev.get(index)
        if tx is not None and rx is not None:
            self._nvlink_prev[index] = (now, tx, rx)
        out = []
        for i, cur in enumerate((tx, rx)):
            if cur is None:
                out.append(Reading.missing(unit, reasons[i]))
            elif prev is None or now <= prev[0]:
                out.append(Reading.missing(unit, FIRST_SAMPLE))
            elif cur < prev[1 + i]:
                out.append(Reading.missing(unit, "counter went backwards"))
            else:
                out.append(Reading.of((cur - prev[1 + i]) * 1e9 / (now - prev[0]), unit))
        return out[0], out[1]


def _field_value(v: Any) -> int | None:
    """Integer payload of an ``nvmlFieldValue_t`` by its ``valueType``."""
    attr = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal",
            6: "usVal"}.get(int(v.valueType))
    return None if attr is None else int(getattr(v.value, attr))


def _missing_gpu_sample(index: int, uuid: str | None, now: int, reason: str) -> GpuSample:
    """A sample of a GPU that could not be reached at all."""
    def m(unit: str) -> Reading:
        return Reading.missing(unit, reason)
    return GpuSample(index, uuid, now, m("%"), m("%"), m("MHz"), m("MHz"), m("C"), m("W"),
                     m("bitmask"), (), m("B"), m("B"), m("KB/s"), m("KB/s"), m("KiB/s"),
                     m("KiB/s"))


# --------------------------------------------------------------------------------------------
# /proc helpers


def _read(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()


def _os_reason(err: OSError, gone: str = PROCESS_EXITED) -> str:
    """Reason text for a failed /proc or /sys read; ``gone`` is the text for a missing file."""
    if isinstance(err, (FileNotFoundError, ProcessLookupError)):
        return gone
    if isinstance(err, PermissionError):
        return PERMISSION_DENIED
    return f"read failed: {err.strerror or err}"


@dataclass(frozen=True)
class _Stat:
    """The fields of ``/proc/PID[/task/TID]/stat`` that the samplers use."""

    comm: str
    state: str
    majflt: int
    cpu_ticks: int  # utime + stime
    num_threads: int
    start_ticks: int
    rss_pages: int


def _parse_stat(text: str) -> _Stat:
    # comm may hold spaces and parentheses: fields resume after the last ')'
    lpar, rpar = text.index("("), text.rindex(")")
    rest = text[rpar + 2:].split()  # rest[0] is field 3 (state)
    return _Stat(comm=text[lpar + 1:rpar], state=rest[0], majflt=int(rest[9]),
                 cpu_ticks=int(rest[11]) + int(rest[12]), num_threads=int(rest[17]),
                 start_ticks=int(rest[19]), rss_pages=int(rest[21]))


def _parse_schedstat(text: str) -> int:
    """Second field of ``schedstat``: cumulative ns spent waiting on a run queue."""
    return int(text.split()[1])


_CSW = re.compile(r"^(voluntary|nonvoluntary)_ctxt_switches:\s*(\d+)", re.M)


def _parse_ctxt_switches(text: str) -> tuple[int, int] | None:
    """(voluntary, involuntary) context switches from a ``status`` file."""
    found = dict(_CSW.findall(text))
    if "voluntary" not in found or "nonvoluntary" not in found:
        return None
    return int(found["voluntary"]), int(found["nonvoluntary"])


def thread_runqueue_ns(pid: int, tid: int) -> int | None:
    """Cumulative ns thread ``tid`` of ``pid`` has waited on a CPU run queue; None if unknown."""
    try:
        return _parse_schedstat(_read(f"/proc/{pid}/task/{tid}/schedstat"))
    except (OSError, ValueError, IndexError):
        return None


def _schedstat_exposed() -> bool:
    return os.path.exists(f"/proc/{os.getpid()}/schedstat")


# --------------------------------------------------------------------------------------------
# ProcSampler


@dataclass(frozen=True)
class ThreadSample:
    """One poll of one thread; deltas are since the previous sample of the same thread."""

    tid: int
    name: str
    runqueue_ns: Reading
    runqueue_delta_ns: Reading
    cpu_time_delta_ns: Reading
    voluntary_switches_delta: Reading
    involuntary_switches_delta: Reading

    def readings(self) -> dict[str, Reading]:
        """Every metric of this sample by name."""
        return readings_of(self)


@dataclass(frozen=True)
class ProcSample:
    """One poll of one process.

    Sums over threads (``runqueue_delta_ns`` and the context switches) cover the threads present
    in both this sample and the previous one; a thread that ended in between drops out. Once
    the process has exited (or its PID was reused) ``alive`` is False, ``threads`` is empty and
    every reading is missing with the reason :data:`PROCESS_EXITED`.
    """

    pid: int
    timestamp_ns: int
    alive: bool
    interval_ns: int | None
    cpu_time_ns: Reading
    cpu_time_delta_ns: Reading
    cpu_pct: Reading
    rss_bytes: Reading
    major_faults_delta: Reading
    thread_count: Reading
    runqueue_delta_ns: Reading
    voluntary_switches_delta: Reading
    involuntary_switches_delta: Reading
    threads: tuple[ThreadSample, ...]

    def readings(self) -> dict[str, Reading]:
        """Every process-level metric of this sample by name (threads not included)."""
        return readings_of(self)


@dataclass(frozen=True)
class _ThreadRaw:
    tid: int
    name: str
    start_ticks: int
    cpu_ticks: int
    runqueue_ns: int | None
    rq_reason: str | None
    csw: tuple[int, int] | None
    csw_reason: str | None


class ProcSampler:
    """Samples one process and its threads from ``/proc/PID``; ``sample()`` never raises.

    CPU time comes from ``stat`` (user + system, clock ticks converted to ns), run-queue delay
    from each thread's ``schedstat`` (2nd field), context switches from each thread's
    ``status``. The process start time is remembered so a reused PID reads as exited.
    """

    def __init__(self, pid: int, clock: Clock = time.monotonic_ns) -> None:
        """Bind to ``pid``; nothing is read until the first ``sample()``."""
        self.pid = pid
        self._clock = clock
        self._proc = f"/proc/{pid}"
        self._start_ticks: int | None = None
        self._exited = False
        self._schedstat = _schedstat_exposed()
        self._prev_t: int | None = None
        self._prev_cpu: int | None = None
        self._prev_majflt: int | None = None
        self._prev_threads: dict[int, _ThreadRaw] = {}

    def sample(self) -> ProcSample:
        """Read the process and its threads now and return deltas since the previous call."""
        now = self._clock()
        if self._exited:
            return self._gone(now, PROCESS_EXITED)
        try:
            stat = _parse_stat(_read(f"{self._proc}/stat"))
        except OSError as err:
            reason = _os_reason(err)
            if reason == PROCESS_EXITED or not os.path.exists(self._proc):
                self._exited = True
                return self._gone(now, PROCESS_EXITED)
            return self._gone(now, reason, alive=True)
        except (ValueError, IndexError):
            return self._gone(now, f"malformed {self._proc}/stat", alive=True)
        # a zombie leader with other threads still running (it called pthread_exit) is alive
        zombie = stat.state in ("Z", "X") and stat.num_threads <= 1
        if zombie or (self._start_ticks is not None and stat.start_ticks != self._start_ticks):
            self._exited = True
            return self._gone(now, PROCESS_EXITED)
        self._start_ticks = stat.start_ticks
        try:
            tids = sorted(int(t) for t in os.listdir(f"{self._proc}/task"))
        except OSError as err:
            if _os_reason(err) == PROCESS_EXITED:
                self._exited = True
                return self._gone(now, PROCESS_EXITED)
            tids = []
        raws = [r for tid in tids if (r := self._read_thread(tid)) is not None]

        threads = tuple(self._thread_sample(r) for r in raws)
        interval = None if self._prev_t is None else now - self._prev_t
        cpu_ns = stat.cpu_ticks * _NS_PER_TICK
        cpu_delta = _delta(cpu_ns, None, self._prev_cpu, "ns")
        cpu_pct = (Reading.of(100.0 * cpu_delta.value / interval, "%")
                   if cpu_delta.value is not None and interval
                   else Reading.missing("%", cpu_delta.reason or "zero interval"))
        sample = ProcSample(
            pid=self.pid,
            timestamp_ns=now,
            alive=True,
            interval_ns=interval,
            cpu_time_ns=Reading.of(cpu_ns, "ns"),
            cpu_time_delta_ns=cpu_delta,
            cpu_pct=cpu_pct,
            rss_bytes=Reading.of(stat.rss_pages * _PAGE_SIZE, "B"),
            major_faults_delta=_delta(stat.majflt, None, self._prev_majflt, "faults"),
            thread_count=Reading.of(stat.num_threads, "threads"),
            runqueue_delta_ns=_sum(t.runqueue_delta_ns for t in threads),
            voluntary_switches_delta=_sum(t.voluntary_switches_delta for t in threads),
            involuntary_switches_delta=_sum(t.involuntary_switches_delta for t in threads),
            threads=threads,
        )
        self._prev_t = now
        self._prev_cpu = cpu_ns
        self._prev_majflt = stat.majflt
        self._prev_threads = {r.tid: r for r in raws}
        return sample

    def _read_thread(self, tid: int) -> _ThreadRaw | None:
        """Raw counters of one thread, or None when it vanished while being read."""
        base = f"{self._proc}/task/{tid}"
        try:
            stat = _parse_stat(_read(f"{base}/stat"))
        except (OSError, ValueError, IndexError):
            return None
        runqueue: int | None = None
        rq_reason: str | None = None
        if not self._schedstat:
            rq_reason = NOT_EXPOSED
        else:
            try:
                runqueue = _parse_schedstat(_read(f"{base}/schedstat"))
            except OSError as err:
                if _os_reason(err) == PROCESS_EXITED:
                    return None
                rq_reason = _os_reason(err)
            except (ValueError, IndexError):
                rq_reason = "malformed schedstat"
        csw: tuple[int, int] | None = None
        csw_reason: str | None = None
        try:
            csw = _parse_ctxt_switches(_read(f"{base}/status"))
            if csw is None:
                csw_reason = NOT_EXPOSED
        except OSError as err:
            if _os_reason(err) == PROCESS_EXITED:
                return None
            csw_reason = _os_reason(err)
        return _ThreadRaw(tid, stat.comm, stat.start_ticks, stat.cpu_ticks, runqueue, rq_reason,
                          csw, csw_reason)

    def _thread_sample(self, r: _ThreadRaw) -> ThreadSample:
        prev = self._prev_threads.get(r.tid)
        if prev is not None and prev.start_ticks != r.start_ticks:
            prev = None  # the TID was reused by a new thread
        vol, invol = r.csw if r.csw is not None else (None, None)
        pvol, pinvol = (prev.csw if prev is not None and prev.csw is not None
                        else (None, None))
        return ThreadSample(
            tid=r.tid,
            name=r.name,
            runqueue_ns=(Reading.of(r.runqueue_ns, "ns") if r.runqueue_ns is not None
                         else Reading.missing("ns", r.rq_reason or "unavailable")),
            runqueue_delta_ns=_delta(r.runqueue_ns, r.rq_reason,
                                     None if prev is None else prev.runqueue_ns, "ns"),
            cpu_time_delta_ns=_delta(r.cpu_ticks * _NS_PER_TICK, None,
                                     None if prev is None else prev.cpu_ticks * _NS_PER_TICK,
                                     "ns"),
            voluntary_switches_delta=_delta(vol, r.csw_reason, pvol, "switches"),
            involuntary_switches_delta=_delta(invol, r.csw_reason, pinvol, "switches"),
        )

    def _gone(self, now: int, reason: str, alive: bool = False) -> ProcSample:
        """A sample whose every reading is missing for ``reason``."""
        def m(unit: str) -> Reading:
            return Reading.missing(unit, reason)
        interval = None if self._prev_t is None else now - self._prev_t
        if not alive:
            self._prev_threads = {}
        return ProcSample(self.pid, now, alive, interval, m("ns"), m("ns"), m("%"), m("B"),
                          m("faults"), m("threads"), m("ns"), m("switches"), m("switches"), ())


def _sum(readings: Iterable[Reading]) -> Reading:
    """Sum of the present readings; missing with the first reason when none is present."""
    items = list(readings)
    present = [r.value for r in items if r.value is not None]
    unit = items[0].unit if items else ""
    if present:
        return Reading.of(sum(present), unit)
    return Reading.missing(unit, items[0].reason if items and items[0].reason else "no threads")


# --------------------------------------------------------------------------------------------
# HostSampler


@dataclass(frozen=True)
class HostSample:
    """One poll of host-wide figures.

    ``cpu_freq_mhz`` is the mean over cores; ``cpu_freq_per_core_mhz`` lists the cores in CPU
    number order (empty when the kernel exposes no frequency), so a single slowed core shows.
    """

    timestamp_ns: int
    cpu_freq_mhz: Reading
    cpu_freq_min_mhz: Reading
    cpu_freq_per_core_mhz: tuple[float, ...]
    cpu_util_pct: Reading
    load_avg_1m: Reading
    load_avg_5m: Reading
    load_avg_15m: Reading

    def readings(self) -> dict[str, Reading]:
        """Every metric of this sample by name."""
        return readings_of(self)


_CPUFREQ_GLOB = "/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq"
_CPU_NUM = re.compile(r"/cpu(\d+)/")
_CPUINFO_MHZ = re.compile(r"^cpu MHz\s*:\s*([0-9.]+)", re.M)


def cpu_frequencies_mhz() -> tuple[tuple[float, ...], str | None]:
    """Current per-core CPU frequencies in MHz and ``None``, or ``()`` and a reason.

    Reads cpufreq's ``scaling_cur_freq`` (kHz) where exposed, else the ``cpu MHz`` lines of
    ``/proc/cpuinfo`` (x86); virtual machines often expose neither.
    """
    paths = sorted(glob.glob(_CPUFREQ_GLOB),
                   key=lambda p: int(m.group(1)) if (m := _CPU_NUM.search(p)) else 0)
    freqs: list[float] = []
    for path in paths:
        try:
            khz = int(_read(path).strip())
        except (OSError, ValueError):
            continue
        if khz > 0:
            freqs.append(khz / 1000.0)
    if freqs:
        return tuple(freqs), None
    try:
        text = _read("/proc/cpuinfo")
    except OSError as err:
        return (), _os_reason(err, gone=NOT_EXPOSED)
    freqs = [mhz for m in _CPUINFO_MHZ.findall(text) if (mhz := float(m)) > 0]
    if freqs:
        return tuple(freqs), None
    return (), NOT_EXPOSED


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from the first line of /proc/stat."""
    try:
        line = _read("/proc/stat").split("\n", 1)[0].split()
    except OSError:
        return None
    if not line or line[0] != "cpu":
        return None
    vals = [int(v) for v in line[1:9]]  # user nice system idle iowait irq softirq steal
    total = sum(vals)
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return total - idle, total


class HostSampler:
    """Samples host-wide CPU frequency, CPU utilisation and load average; never raises.

    Kept apart from :class:`ProcSampler` because one host serves many targets: sample it once
    per poll, not once per process.
    """

    def __init__(self, clock: Clock = time.monotonic_ns) -> None:
        """Create the sampler; the first ``sample()`` has no CPU utilisation (no baseline)."""
        self._clock = clock
        self._prev_cpu: tuple[int, int] | None = None

    def sample(self) -> HostSample:
        """Read the host figures now."""
        now = self._clock()
        freqs, freason = cpu_frequencies_mhz()
        if freqs:
            mean = Reading.of(sum(freqs) / len(freqs), "MHz")
            low = Reading.of(min(freqs), "MHz")
        else:
            mean = low = Reading.missing("MHz", freason or NOT_EXPOSED)

        cur = _cpu_times()
        if cur is None:
            util = Reading.missing("%", "cannot read /proc/stat")
        elif self._prev_cpu is None:
            util = Reading.missing("%", FIRST_SAMPLE)
        elif cur[1] <= self._prev_cpu[1]:
            util = Reading.missing("%", "no CPU time elapsed")
        else:
            util = Reading.of(100.0 * max(0, cur[0] - self._prev_cpu[0])
                              / (cur[1] - self._prev_cpu[1]), "%")
        if cur is not None:
            self._prev_cpu = cur

        try:
            loads: list[Reading] = [Reading.of(v, "") for v in os.getloadavg()]
        except OSError as err:
            loads = [Reading.missing("", _os_reason(err, gone=NOT_EXPOSED))] * 3
        return HostSample(now, mean, low, freqs, util, loads[0], loads[1], loads[2])
