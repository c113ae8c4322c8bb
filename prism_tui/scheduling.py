"""A short scheduler slice for the threads an alert passes through (Linux 6.12 and later).

Linux's EEVDF scheduler lets a thread ask for a shorter time slice (``sched_setattr``
with ``sched_runtime`` on a normal, ``SCHED_OTHER`` thread). A shorter slice gives the
thread an earlier virtual deadline, so when it wakes it preempts a CPU hog sooner; it
gets *no more* CPU time than before (its weight, from its nice value, is unchanged).
That is what a monitor wants for its event loop and its broker: the iteration that
crosses the limit wakes them, and the alert should not wait for a busy thread's slice to
end. On older kernels the call succeeds but changes nothing; we say so.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

SHORT_SLICE_NS = 100_000
"""0.1 ms, the shortest slice the kernel accepts."""

_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}  # sched_setattr, sched_getattr
_ATTR = struct.Struct("IIqiIQQQII")  # struct sched_attr, SCHED_ATTR_SIZE_VER1 (56 bytes)
_SCHED_OTHER = 0
_RESET_ON_FORK = 0x01


def _sched_attr(tid: int) -> tuple[int, ...] | str:
    """``struct sched_attr`` of ``tid`` as a tuple, or why it cannot be read (one line)."""
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        return f"no sched_setattr number known for {platform.machine()}"
    buf = ctypes.create_string_buffer(_ATTR.size)
    if _libc().syscall(numbers[1], tid, buf, _ATTR.size, 0) != 0:
        return f"sched_getattr: {os.strerror(ctypes.get_errno())}"
    return _ATTR.unpack(buf.raw)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def request_short_slice(tid: int = 0, slice_ns: int = SHORT_SLICE_NS) -> str | None:
    """Give thread ``tid`` (0: the caller) a ``slice_ns`` slice, keeping its nice value.

    Threads and processes it creates afterwards get the default slice again (reset on
    fork): the simulator's ranks, say, must not inherit it from ``prism eval``.

    Returns None when the kernel took it, else one line saying why not (an old kernel,
    another architecture, a real-time thread left alone, no permission).
    """
    attr = _sched_attr(tid)
    if isinstance(attr, str):
        return attr
    _size, policy, _flags, nice, prio, *_rest = attr
    if policy != _SCHED_OTHER:
        return f"scheduling policy {policy} is not SCHED_OTHER: left as it is"
    packed = _ATTR.pack(_ATTR.size, policy, _RESET_ON_FORK, nice, prio, slice_ns, 0, 0, 0, 0)
    set_nr = _SYSCALLS[platform.machine()][0]
    if _libc().syscall(set_nr, tid, ctypes.create_string_buffer(packed, _ATTR.size), 0) != 0:
        return f"sched_setattr: {os.strerror(ctypes.get_errno())}"
    if current_slice_ns(tid) != slice_ns:
        return "this kernel has no custom slices (Linux 6.12 or later)"
    return None


def current_slice_ns(tid: int = 0) -> int | None:
    """The thread's requested slice (0: the default), or None when it cannot be read."""
    attr = _sched_attr(tid)
    return None if isinstance(attr, str) else int(attr[5])
