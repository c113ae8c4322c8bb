"""Host-wide figures: CPU frequency per core, CPU utilisation, load average.

Kept apart from the per-process samplers because one host serves many targets.
"""

from __future__ import annotations

import glob
import os
import re
import time
from dataclasses import dataclass

from probes.telemetry.readings import (
    FIRST_SAMPLE,
    NOT_EXPOSED,
    Clock,
    Reading,
    os_reason,
    read_text,
    readings_of,
)


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
            khz = int(read_text(path).strip())
        except (OSError, ValueError):
            continue
        if khz > 0:
            freqs.append(khz / 1000.0)
    if freqs:
        return tuple(freqs), None
    try:
        text = read_text("/proc/cpuinfo")
    except OSError as err:
        return (), os_reason(err, gone=NOT_EXPOSED)
    freqs = [mhz for m in _CPUINFO_MHZ.findall(text) if (mhz := float(m)) > 0]
    if freqs:
        return tuple(freqs), None
    return (), NOT_EXPOSED


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from the first line of /proc/stat."""
    try:
        line = read_text("/proc/stat").split("\n", 1)[0].split()
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
            loads = [Reading.missing("", os_reason(err, gone=NOT_EXPOSED))] * 3
        return HostSample(now, mean, low, freqs, util, loads[0], loads[1], loads[2])
