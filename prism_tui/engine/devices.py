"""Which accelerator a target process runs on, as a device label (``cuda:0``, ``cpu``...).

Sketches are kept per (stage, device), so every process needs a label. The best source
is NVML's list of processes per GPU (host PIDs); without NVML (no NVIDIA GPU, another
vendor, or a container that hides it) the process's own environment says which devices
its runtime was told to use (``CUDA_VISIBLE_DEVICES``, ``HIP_VISIBLE_DEVICES``,
``ROCR_VISIBLE_DEVICES``, ``ASCEND_RT_VISIBLE_DEVICES``); a process with none of those
is labelled ``cpu``. Nothing here raises for an unreadable ``/proc/PID/environ``
(another user's process, or one that exited): the next source is tried.

:class:`NvmlDevices` is the monitor's default: the probe layer's NVML session
(:class:`probes.telemetry.NvmlSampler`, the one way into NVML), asked for its process list
once per attached target, and the reason NVML is unavailable when it is. The module
imports the standard library only (the probe layer's NVML module is loaded by the first
label), so it also runs as a standalone copy (see the tests).

Profiles name no device (``probes/catalog/*.toml`` has no such field), so they are not a
source here.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

# (variable, label prefix), in the order they are consulted.
VISIBLE_DEVICE_VARS: tuple[tuple[str, str], ...] = (
    ("CUDA_VISIBLE_DEVICES", "cuda"),
    ("HIP_VISIBLE_DEVICES", "rocm"),
    ("ROCR_VISIBLE_DEVICES", "rocm"),
    ("ASCEND_RT_VISIBLE_DEVICES", "npu"),
)
UUID_PREFIX_CHARS = 8  # of the hex part of a GPU UUID like GPU-5c1a2b3d-...


def device_of(pid: int, *, nvml_processes: Mapping[int, list[int]] | None = None,
              environ: Mapping[str, str] | None = None) -> str:
    """Device label of ``pid``.

    Args:
        pid: the target process (host PID namespace, as NVML reports them).
        nvml_processes: PID → GPU indices, e.g. ``NvmlSampler.processes()``; checked first.
            Several GPUs give ``cuda:0+1``.
        environ: the process's environment; None reads ``/proc/PID/environ``.

    Returns:
        ``cuda:<index>`` (or ``cuda:<uuid prefix>`` when the variable lists UUIDs),
        ``rocm:<n>``, ``npu:<n>``, or ``cpu``.
    """
    if nvml_processes:
        indices = nvml_processes.get(pid)
        if indices:
            return "cuda:" + "+".join(str(i) for i in sorted(set(indices)))
    env = read_environ(pid) if environ is None else environ
    if env:
        for var, prefix in VISIBLE_DEVICE_VARS:
            label = _first_device(env.get(var))
            if label is not None:
                return f"{prefix}:{label}"
    return "cpu"


class NvmlDevices:
    """Device labels from NVML's process list, else from the process environment.

    A callable ``pid → label`` for :class:`~prism_tui.engine.monitor.Monitor`. NVML is
    reached only through :class:`probes.telemetry.NvmlSampler`, the one way into it, whose
    failures are values: this class holds one, opened at the first label (nvmlInit takes
    a while on some hosts) and kept until :meth:`close`; each label asks it for its
    process list once. Nothing raises: when NVML cannot start, or a query fails, the label
    comes from the environment and :attr:`unavailable_reason` says why NVML was not used.

    A process is listed by NVML only once it has a CUDA context: one attached before it
    creates it (a server still loading) is labelled from its environment.
    """

    def __init__(self) -> None:
        """A closed session; nothing is loaded until the first label."""
        self._lock = threading.Lock()
        self._nvml: Any = None  # a probes.telemetry.NvmlSampler, made at the first label
        self._closed = False
        self.unavailable_reason: str | None = None
        """Why the latest label could not use NVML (None: it could)."""

    def __call__(self, pid: int) -> str:
        """Label of ``pid``: NVML's GPUs for it, else its environment's, else ``cpu``."""
        return device_of(pid, nvml_processes=self.processes())

    def _session(self) -> Any:
        """The NVML sampler, opened on first use; None once closed."""
        with self._lock:
            if self._closed:
                self.unavailable_reason = "NVML closed"
                return None
            if self._nvml is None:
                # imported here, so this module stays standard-library only (its tests
                # run a copy of it alone) and a CPU-only import loads no NVML binding
                from probes.telemetry import NvmlSampler

                self._nvml = NvmlSampler().open()
            return self._nvml

    def processes(self) -> dict[int, list[int]]:
        """NVML's PID → GPU indices now; ``{}`` (reason in :attr:`unavailable_reason`)
        when NVML is unavailable or the query failed."""
        nvml = self._session()
        if nvml is None:
            return {}
        found: dict[int, list[int]] = nvml.processes()
        self.unavailable_reason = nvml.unavailable_reason
        return dict(found)

    def samples(self) -> list[Any]:
        """One ``probes.telemetry.GpuSample`` per GPU from the same session (utilisation,
        clocks, power, PCIe...); ``[]`` when NVML is unavailable, closed or failing."""
        nvml = self._session()
        if nvml is None:
            return []
        found: list[Any] = nvml.sample()
        if nvml.unavailable_reason is not None:
            self.unavailable_reason = nvml.unavailable_reason
        return list(found)

    def close(self) -> None:
        """End the NVML session (idempotent); later labels come from the environment."""
        with self._lock:
            self._closed = True
            nvml, self._nvml = self._nvml, None
        if nvml is not None:
            nvml.close()


def read_environ(pid: int) -> dict[str, str]:
    """The environment ``pid`` was started with; ``{}`` when it cannot be read."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:  # permission, no such process, not Linux
        return {}
    env: dict[str, str] = {}
    for entry in raw.split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if sep and name:
            env[name.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return env


def _first_device(value: str | None) -> str | None:
    """First entry of a ``*_VISIBLE_DEVICES`` list: an index, or a UUID's short prefix.

    Empty, ``-1`` or ``NoDevFiles`` mean no device is visible: None.
    """
    if value is None:
        return None
    first = value.split(",")[0].strip()
    if not first or first.startswith("-") or first.lower() == "nodevfiles":
        return None
    if first.isdigit():
        return str(int(first))
    # GPU-5c1a2b3d-..., MIG-..., or a bare UUID: keep a short, stable prefix.
    kind, sep, rest = first.partition("-")
    if sep and kind.isalpha() and rest:
        return f"{kind}-{rest[:UUID_PREFIX_CHARS]}"
    return first[:UUID_PREFIX_CHARS]
