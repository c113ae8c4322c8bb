"""Which accelerator a target process runs on, as a device label (``cuda:0``, ``cpu``...).

Sketches are kept per (stage, device), so every process needs a label. The best source
is NVML's list of processes per GPU (host PIDs); without NVML (no NVIDIA GPU, another
vendor, or a container that hides it) the process's own environment says which devices
its runtime was told to use (``CUDA_VISIBLE_DEVICES``, ``HIP_VISIBLE_DEVICES``,
``ROCR_VISIBLE_DEVICES``, ``ASCEND_RT_VISIBLE_DEVICES``); a process with none of those
is labelled ``cpu``. Nothing here raises for an unreadable ``/proc/PID/environ``
(another user's process, or one that exited): the next source is tried.
"""

from __future__ import annotations

from collections.abc import Mapping

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
