"""NVML: the one way into NVIDIA's driver, for GPU metrics and for which process runs where.

:class:`NvmlSampler` owns an NVML session. Every NVML call goes through
:func:`nvml_call`, which returns ``(result, None)`` or ``(None, reason)``: errors are
values (as nvitop's ``libnvml`` does), and so is a missing binding or driver, so a host
without NVIDIA's driver, a CPU-only install without ``nvidia-ml-py``, or a driver that
fails mid-query gives empty results and a reason, never an exception. PCIe throughput
queries block about 20 ms each inside the driver: sample from an executor.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from probes.telemetry.readings import (
    FIRST_SAMPLE,
    NO_NVML,
    NOT_SUPPORTED,
    PERMISSION_DENIED,
    Clock,
    Reading,
    readings_of,
)

try:
    import pynvml as pynvml  # re-exported: the tests make its entry point fail
except ImportError as exc:  # a CPU-only install: every query says so
    pynvml = None
    _BINDING_MISSING = f"NVML binding not importable ({exc})"
else:
    _BINDING_MISSING = ""

_UINT_MAX = 0xFFFFFFFF  # NVML field scopeId meaning "all links"
_T = TypeVar("_T")
_NO_DRIVER_FUNCTION = "not available in this driver version"
_NO_BINDING_FUNCTION = "not available in this nvidia-ml-py"
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
} if pynvml is not None else {}


def nvml_reason(code: int, detail: str = "") -> str:
    """Human reason for an NVML return code (the ``value`` of a :class:`pynvml.NVMLError`)."""
    if code in _NVML_REASON_BY_CODE:
        return _NVML_REASON_BY_CODE[code]
    return f"NVML error {code}: {detail}" if detail else f"NVML error {code}"


def nvml_call(name: str, *args: Any) -> tuple[Any, str | None]:
    """Call ``pynvml.<name>(*args)``; return ``(result, None)`` or ``(None, reason)``.

    The binding missing, a function this binding lacks and every ``NVMLError`` are
    reasons; other exceptions of the binding are the caller's to turn into one.
    """
    if pynvml is None:
        return None, _BINDING_MISSING
    fn = getattr(pynvml, name, None)
    if fn is None:
        return None, _NO_BINDING_FUNCTION
    try:
        return fn(*args), None
    except pynvml.NVMLError as err:
        return None, nvml_reason(int(err.value), str(err))


def _unexpected(exc: Exception) -> str:
    """The reason for a failure the binding raised as something other than ``NVMLError``."""
    return f"NVML query failed: {type(exc).__name__}: {exc}"


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

    Nothing raises: when NVML cannot start (no binding, no driver, no GPU) ``available`` is
    False, ``unavailable_reason`` says why, and every query returns an empty result; a query
    the binding fails in an unexpected way returns an empty result too, its reason in
    ``unavailable_reason`` until a query succeeds. ``open()`` and ``close()`` are
    idempotent; the sampler is a context manager. Methods are thread-safe.

    PCIe throughput queries block about 20 ms each inside the driver; call ``sample()`` from an
    executor, not from the event loop.
    """

    def __init__(self, clock: Clock = time.monotonic_ns) -> None:
        """Create a closed sampler; ``clock`` stamps samples (monotonic ns)."""
        self._clock = clock
        self._lock = threading.Lock()
        self._open = False
        self._reason: str | None = "NVML not opened (call open() first)"
        self._query_error: str | None = None
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
            try:
                self._start()
            except Exception as exc:  # a broken binding or driver is a reason too
                self._reason = _unexpected(exc)
            return self

    def _start(self) -> None:
        _, reason = nvml_call("nvmlInit")
        if reason is not None:
            self._reason = reason
            return
        self._open = True
        count, reason = nvml_call("nvmlDeviceGetCount")
        if reason is not None:
            self._reason = f"cannot count GPUs: {reason}"
            return
        self._reason = None
        self._handles = [nvml_call("nvmlDeviceGetHandleByIndex", i) for i in range(count)]
        self._uuids = [
            None if hreason is not None
            or (uuid := nvml_call("nvmlDeviceGetUUID", h)[0]) is None else _text(uuid)
            for h, hreason in self._handles
        ]
        self._nvlink_prev.clear()

    def close(self) -> None:
        """End the NVML session (safe to call any number of times)."""
        with self._lock:
            if self._open:
                with contextlib.suppress(Exception):  # closing never raises either
                    nvml_call("nvmlShutdown")
                self._open = False
            self._handles = []
            self._uuids = []
            self._nvlink_prev.clear()
            self._reason = "NVML closed"
            self._query_error = None

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
        """Why no GPU metrics are available (or the last query failed); ``None`` when they are."""
        return self._reason or self._query_error

    # -- queries -----------------------------------------------------------------------------

    def _query(self, run: Callable[[], _T], empty: _T) -> _T:
        """``run()`` under the lock while the session is up; ``empty`` otherwise or on a
        failure the binding did not report as an ``NVMLError``."""
        with self._lock:
            if self._reason is not None:
                return empty
            try:
                result = run()
            except Exception as exc:  # a broken binding or driver must not stop a caller
                self._query_error = _unexpected(exc)
                return empty
            self._query_error = None
            return result

    def devices(self) -> list[GpuInfo]:
        """Identity of every GPU; empty (see ``unavailable_reason``) when NVML is unavailable."""
        return self._query(self._devices, [])

    def _devices(self) -> list[GpuInfo]:
        out = []
        for index, (handle, hreason) in enumerate(self._handles):
            if hreason is not None:
                out.append(GpuInfo(index, None, None, None, Reading.missing("B", hreason)))
                continue
            name, _ = nvml_call("nvmlDeviceGetName", handle)
            pci, _ = nvml_call("nvmlDeviceGetPciInfo", handle)
            mem, mreason = nvml_call("nvmlDeviceGetMemoryInfo", handle)
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
        return self._query(
            lambda: [self._sample_one(i, h, r) for i, (h, r) in enumerate(self._handles)], [])

    def processes(self) -> dict[int, list[int]]:
        """PID → sorted GPU indices on which it runs compute or graphics work.

        PIDs are as NVML sees them (the host PID namespace); ``{}`` when NVML is unavailable.
        """
        return self._query(self._processes, {})

    def _processes(self) -> dict[int, list[int]]:
        found: dict[int, set[int]] = {}
        for index, (handle, hreason) in enumerate(self._handles):
            if hreason is not None:
                continue
            for fn in ("nvmlDeviceGetComputeRunningProcesses",
                       "nvmlDeviceGetGraphicsRunningProcesses"):
                procs, _ = nvml_call(fn, handle)
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
            raw, reason = nvml_call(fn, handle, *args)
            return Reading.missing(unit, reason) if reason is not None else Reading.of(
                conv(raw), unit)

        util, ureason = nvml_call("nvmlDeviceGetUtilizationRates", handle)
        mem, mreason = nvml_call("nvmlDeviceGetMemoryInfo", handle)
        mask, treason = nvml_call(self._event_fn, handle)
        if (treason in (_NO_DRIVER_FUNCTION, _NO_BINDING_FUNCTION)
                and self._event_fn == "nvmlDeviceGetCurrentClocksEventReasons"):
            # drivers before R535 only have the older name of the same query
            self._event_fn = "nvmlDeviceGetCurrentClocksThrottleReasons"
            mask, treason = nvml_call(self._event_fn, handle)
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
        values, reason = nvml_call("nvmlDeviceGetFieldValues", handle, fields_)
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
