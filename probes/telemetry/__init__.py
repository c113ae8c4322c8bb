"""Telemetry samplers (NVML, /proc, host): device, process, thread and host metrics, each second.

Failures are values, not exceptions (docs/architecture.md §Rules 4): every metric is a
:class:`Reading` that holds either a value or the reason it is missing ("not supported on this GPU",
"permission denied", "process exited", ...). Sampler methods never raise except on programming
errors, so an executor job that calls them cannot surface a traceback in the asyncio loop.

Samplers are synchronous and blocking (NVML calls, /proc reads); the engine runs them in an
executor (docs/architecture.md §Rules 3). One module per source:

* :mod:`~probes.telemetry.nvml`: :class:`NvmlSampler` owns one NVML session and samples every
  NVIDIA GPU; it is the only way into NVML (the engine's device labels use it too);
* :mod:`~probes.telemetry.procfs`: :class:`ProcSampler` samples one process and its threads
  from ``/proc/PID``;
* :mod:`~probes.telemetry.host`: :class:`HostSampler` samples host-wide figures (CPU frequency
  and utilisation, load), kept apart from processes because one host serves many targets;
* :mod:`~probes.telemetry.readings`: the :class:`Reading` they all return, and the reasons.

Counters that only make sense as rates (run-queue delay, context switches, CPU time, faults,
NVLink bytes) are reported as deltas since the previous ``sample()``; the first sample of a
series has them missing with the reason :data:`FIRST_SAMPLE`.
"""

from probes.telemetry.host import HostSample, HostSampler, cpu_frequencies_mhz
from probes.telemetry.nvml import (
    GpuInfo,
    GpuSample,
    NvmlSampler,
    decode_clock_event_reasons,
    nvml_reason,
)
from probes.telemetry.procfs import (
    ProcSample,
    ProcSampler,
    RunQueueReader,
    ThreadSample,
    thread_runqueue_ns,
)
from probes.telemetry.readings import (
    FIRST_SAMPLE,
    NO_NVML,
    NOT_EXPOSED,
    NOT_SUPPORTED,
    PERMISSION_DENIED,
    PROCESS_EXITED,
    Clock,
    Reading,
    readings_of,
)

__all__ = [
    "FIRST_SAMPLE",
    "NOT_EXPOSED",
    "NOT_SUPPORTED",
    "NO_NVML",
    "PERMISSION_DENIED",
    "PROCESS_EXITED",
    "Clock",
    "GpuInfo",
    "GpuSample",
    "HostSample",
    "HostSampler",
    "NvmlSampler",
    "ProcSample",
    "ProcSampler",
    "Reading",
    "RunQueueReader",
    "ThreadSample",
    "cpu_frequencies_mhz",
    "decode_clock_event_reasons",
    "nvml_reason",
    "readings_of",
    "thread_runqueue_ns",
]
