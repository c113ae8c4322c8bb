"""Telemetry polling: the host, the GPUs (through NVML) and each watched process.

The monitor's loop asks for a sample once a second (``TELEMETRY_S``) and runs
:meth:`TelemetryPoller.sample` in an executor: ``/proc`` reads and NVML calls block. A
failure is a value with its reason (``docs/architecture.md`` §Rules 4), never an
exception; the values go to the view and to the root-cause hints.
"""

from __future__ import annotations

from collections.abc import Sequence

from prism_tui.engine.devices import NvmlDevices
from prism_tui.engine.view import TelemetryValue
from probes.telemetry import HostSampler, ProcSampler, Reading

TELEMETRY_S = 1.0
"""Seconds between samples."""


class TelemetryPoller:
    """The samplers of one monitor: the host's, NVML's (shared with the device labels)
    and one per watched process."""

    def __init__(self, nvml: NvmlDevices | None) -> None:
        self._host = HostSampler()
        self._nvml = nvml
        self._procs: dict[int, ProcSampler] = {}

    def sample(self, pids: Sequence[int]) -> list[TelemetryValue]:
        """Host, GPU and per-process figures of ``pids`` (blocking: in an executor)."""
        out: list[TelemetryValue] = []
        for metric, reading in self._host.sample().readings().items():
            out.append(_value("host", metric, reading))
        if self._nvml is not None:  # GPUs, when NVML has any (labels as devices')
            for gpu in self._nvml.samples():
                for metric, reading in gpu.readings().items():
                    out.append(_value(f"cuda:{gpu.index}", metric, reading))
        for pid in pids:
            sampler = self._procs.get(pid)
            if sampler is None:
                sampler = self._procs[pid] = ProcSampler(pid)
            for metric, reading in sampler.sample().readings().items():
                out.append(_value(f"pid {pid}", metric, reading))
        return out

    def forget(self, pid: int) -> None:
        """Drop ``pid``'s sampler (detached or exited: a reused pid would read as exited)."""
        self._procs.pop(pid, None)


def _value(device: str, metric: str, reading: Reading) -> TelemetryValue:
    return TelemetryValue(device, metric, reading.value, reading.unit, reading.reason)
