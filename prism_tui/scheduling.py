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

import contextlib
import ctypes
import os
import platform
import struct
from concurrent.futures import ThreadPoolExecutor
from functools import partial

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


_SCHED_FIFO = 1
_SCHED_RESET_ON_FORK = 0x40000000


def request_realtime(tid: int = 0, priority: int = 1) -> str | None:
    """Run thread ``tid`` (0: the caller) under ``SCHED_FIFO`` at ``priority``, reset on fork.

    The opt-in stronger form of the short slice: a woken real-time thread takes a CPU
    from any normal thread at once, instead of after up to a slice. It costs the host no
    more CPU time (the loop mostly waits), and the kernel keeps 5 % of every second for
    normal threads (``sched_rt_runtime_us``) should it ever spin. Threads and processes
    it starts afterwards run normally. Returns None when the kernel took it, else one
    line saying why not.
    """
    param = ctypes.c_int(priority)
    if _libc().sched_setscheduler(tid, _SCHED_FIFO | _SCHED_RESET_ON_FORK,
                                  ctypes.byref(param)) != 0:
        return f"sched_setscheduler: {os.strerror(ctypes.get_errno())}"
    return None


def go_realtime(priority: int, what: str, tid: int = 0) -> str | None:
    """:func:`request_realtime` for a user's ``--realtime``: None when done or not asked
    (``priority`` 0), else the line to show (the run goes on at normal priority)."""
    if priority <= 0:
        return None
    why = request_realtime(tid, priority)
    if why is None:
        return None
    return (f"{what} stays at normal priority ({why}; real-time scheduling needs root "
            "or CAP_SYS_NICE)")


def realtime_priority(tid: int = 0) -> int:
    """Thread ``tid``'s ``SCHED_FIFO`` priority (0: the caller); 0 when it runs normally."""
    try:
        policy = os.sched_getscheduler(tid) & ~os.SCHED_RESET_ON_FORK
        return os.sched_getparam(tid).sched_priority if policy == os.SCHED_FIFO else 0
    except OSError:
        return 0


def follow_priority(priority: int) -> None:
    """Thread start-up hook: run the calling thread under ``SCHED_FIFO`` at ``priority``
    (0: leave it); a refusal leaves it at normal priority, silently (the loop's own
    refusal was already shown)."""
    if priority > 0:
        request_realtime(0, priority)


def helper_executor(max_workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads run at the calling thread's real-time priority.

    Why: a helper thread that holds the GIL when CPU hogs preempt it keeps a real-time
    loop waiting until the scheduler runs the helper again (a priority inversion,
    measured by ``bench/gil_inversion.py``). Helpers that only hand work over (the
    outbox's acknowledgements, DeepDive's probe registration, the fit's hand-off) hold
    the GIL briefly, so real-time costs the host no more CPU time. Heavy work does not
    belong here: it goes to a child process or a normal-priority pool. Created by a
    normal thread, it is a plain pool.
    """
    priority = realtime_priority()
    return ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name,
                              initializer=partial(follow_priority, priority)
                              if priority else None)


def leave_realtime() -> None:
    """Return the calling thread to normal scheduling (before it starts heavy work)."""
    if realtime_priority():
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
