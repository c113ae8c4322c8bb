"""perf_event_open through ctypes: uprobe events, their ring buffers, and record decoding.

One :class:`PerfRing` owns one mmap'd ring and the event fds that write into it (the first
event owns the buffer, the others are redirected with ``PERF_EVENT_IOC_SET_OUTPUT``), so a
thread or a CPU costs one mmap however many probes it carries. Records are copied out of
the ring in one slice per read (two when the data wraps), which also takes care of records
that straddle the end of the buffer, and decoded with precompiled ``struct`` layouts.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

from probes.errors import (
    PERMISSION_HINT,
    PerfOpenError,
    PerfPermissionError,
    PerfUnavailableError,
)

SYS_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}.get(os.uname().machine, 298)
PMU_DIR = "/sys/bus/event_source/devices/uprobe"

PERF_SAMPLE_TID = 1 << 1
PERF_SAMPLE_TIME = 1 << 2
PERF_SAMPLE_ID = 1 << 6
PERF_SAMPLE_CPU = 1 << 7
PERF_SAMPLE_REGS_USER = 1 << 12
PERF_SAMPLE_STACK_USER = 1 << 13
PERF_SAMPLE_IDENTIFIER = 1 << 16

PERF_RECORD_LOST = 2
PERF_RECORD_EXIT = 4
PERF_RECORD_FORK = 7
PERF_RECORD_SAMPLE = 9

FLAG_DISABLED = 1 << 0
FLAG_TASK = 1 << 13
FLAG_WATERMARK = 1 << 14
FLAG_SAMPLE_ID_ALL = 1 << 18
FLAG_USE_CLOCKID = 1 << 25
PERF_FLAG_FD_CLOEXEC = 1 << 3
CLOCK_MONOTONIC = 1

PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_DISABLE = 0x2401
PERF_EVENT_IOC_SET_OUTPUT = 0x2405
PERF_EVENT_IOC_ID = 0x80082407

PAGE = mmap.PAGESIZE
PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_DUMMY = 9

# x86-64 perf register numbers (arch/x86/include/uapi/asm/perf_regs.h)
REG_AX, REG_CX, REG_DX, REG_SI, REG_DI, REG_SP = 0, 2, 3, 4, 5, 7
REG_R8, REG_R9 = 16, 17
#: SysV integer argument registers: argN → perf register number.
ARG_REGISTERS = {1: REG_DI, 2: REG_SI, 3: REG_DX, 4: REG_CX, 5: REG_R8, 6: REG_R9}
RETURN_REGISTER = REG_AX


class PerfEventAttr(ctypes.Structure):
    """``struct perf_event_attr`` (PERF_ATTR_SIZE_VER8 layout, 136 bytes)."""

    _fields_ = [
        ("type", ctypes.c_uint32), ("size", ctypes.c_uint32), ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64), ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64), ("flags", ctypes.c_uint64),
        ("wakeup_events", ctypes.c_uint32), ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64), ("config2", ctypes.c_uint64),
        ("branch_sample_type", ctypes.c_uint64), ("sample_regs_user", ctypes.c_uint64),
        ("sample_stack_user", ctypes.c_uint32), ("clockid", ctypes.c_int32),
        ("sample_regs_intr", ctypes.c_uint64), ("aux_watermark", ctypes.c_uint32),
        ("sample_max_stack", ctypes.c_uint16), ("reserved2", ctypes.c_uint16),
        ("aux_sample_size", ctypes.c_uint32), ("reserved3", ctypes.c_uint32),
        ("sig_data", ctypes.c_uint64), ("config3", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


@dataclass(frozen=True)
class UprobePmu:
    """The kernel's uprobe PMU: its type number and the retprobe bit of ``config``."""

    type: int
    retprobe_bit: int


@lru_cache(maxsize=1)
def uprobe_pmu() -> UprobePmu:
    """Read the uprobe PMU from sysfs; raises :class:`PerfUnavailableError` if absent."""
    try:
        with open(f"{PMU_DIR}/type") as f:
            pmu_type = int(f.read())
    except OSError as exc:
        raise PerfUnavailableError(
            "this kernel has no uprobe PMU (CONFIG_UPROBE_EVENTS): "
            f"{PMU_DIR}/type is missing") from exc
    bit = 0
    try:
        with open(f"{PMU_DIR}/format/retprobe") as f:
            bit = int(f.read().strip().split(":")[1])  # "config:0"
    except (OSError, IndexError, ValueError):
        pass
    return UprobePmu(pmu_type, bit)


def online_cpus() -> list[int]:
    """CPU numbers that are online (per-CPU events are opened on each)."""
    try:
        with open("/sys/devices/system/cpu/online") as f:
            text = f.read().strip()
    except OSError:
        return list(range(os.cpu_count() or 1))
    cpus: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


@dataclass(frozen=True)
class EventSpec:
    """What one uprobe event records.

    Attributes:
        path: file the probe is placed in (a path the kernel can open).
        offset: file offset of the probed instruction.
        is_return: a uretprobe (fires on return) rather than a uprobe.
        registers: perf register numbers to capture, in any order.
        stack_bytes: bytes of user stack to capture (rounded up to 8).
    """

    path: str
    offset: int
    is_return: bool = False
    registers: tuple[int, ...] = ()
    stack_bytes: int = 0

    @property
    def sample_type(self) -> int:
        """The ``sample_type`` bits this spec needs."""
        st = PERF_SAMPLE_IDENTIFIER | PERF_SAMPLE_TID | PERF_SAMPLE_TIME
        if self.registers:
            st |= PERF_SAMPLE_REGS_USER
        if self.stack_bytes:
            st |= PERF_SAMPLE_STACK_USER
        return st

    @property
    def regs_mask(self) -> int:
        """Bit mask of the captured registers (``sample_regs_user``)."""
        mask = 0
        for r in self.registers:
            mask |= 1 << r
        return mask


def _raise_open_error(err: int, what: str) -> None:
    if err in (errno.EACCES, errno.EPERM):
        raise PerfPermissionError(f"no permission to open perf events ({what}): {PERMISSION_HINT}")
    if err == errno.ESRCH:
        raise PerfOpenError(f"{what}: the task has exited")
    if err == errno.ENOENT:
        raise PerfOpenError(f"{what}: file not found by the kernel")
    if err == errno.EMFILE:
        raise PerfOpenError(f"{what}: too many open files (raise `ulimit -n`)")
    raise PerfOpenError(f"{what}: {os.strerror(err)}")


def open_uprobe(spec: EventSpec, pid: int, cpu: int, *, wakeup_events: int = 0,
                disabled: bool = False) -> int:
    """Open one uprobe/uretprobe perf event and return its fd.

    Args:
        spec: where the probe goes and what each hit records.
        pid: a thread id (per-task event; sees only that thread) or -1 (all tasks).
        cpu: a CPU number, or -1 for any CPU (only with a task).
        wakeup_events: wake a reader polling the ring every this many hits; 0 leaves
            wake-ups to the ring's byte watermark. A wake-up costs the probed thread
            10.6–13.5 µs here (ten times the hit itself), so only probes whose events
            must arrive at once (an iteration anchor) should set it.
        disabled: open the event disabled (enable it with :func:`enable`).
    """
    pmu = uprobe_pmu()
    attr = PerfEventAttr()
    attr.type = pmu.type
    attr.size = ctypes.sizeof(PerfEventAttr)
    attr.config = (1 << pmu.retprobe_bit) if spec.is_return else 0
    attr.sample_period = 1
    attr.sample_type = spec.sample_type
    attr.flags = (FLAG_USE_CLOCKID | FLAG_SAMPLE_ID_ALL | (FLAG_DISABLED if disabled else 0)
                  | (0 if wakeup_events > 0 else FLAG_WATERMARK))
    attr.clockid = CLOCK_MONOTONIC
    attr.wakeup_events = max(0, wakeup_events)
    attr.sample_regs_user = spec.regs_mask
    attr.sample_stack_user = (spec.stack_bytes + 7) // 8 * 8
    path_buf = ctypes.create_string_buffer(spec.path.encode())
    attr.config1 = ctypes.addressof(path_buf)
    attr.config2 = spec.offset
    fd = _libc.syscall(SYS_PERF_EVENT_OPEN, ctypes.byref(attr), pid, cpu, -1,
                       PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        what = f"uprobe {os.path.basename(spec.path)}+{spec.offset:#x} pid={pid} cpu={cpu}"
        _raise_open_error(ctypes.get_errno(), what)
    return int(fd)


def open_ring_owner(pid: int, cpu: int, *, task_events: bool, watermark_bytes: int) -> int:
    """Open a software dummy event to own a ring (and report thread fork/exit).

    The ring wakes its reader when ``watermark_bytes`` are pending; redirected uprobe
    events add wake-ups of their own only if opened with ``wakeup_events``.
    """
    attr = PerfEventAttr()
    attr.type = PERF_TYPE_SOFTWARE
    attr.size = ctypes.sizeof(PerfEventAttr)
    attr.config = PERF_COUNT_SW_DUMMY
    attr.sample_period = 1
    attr.sample_type = PERF_SAMPLE_IDENTIFIER | PERF_SAMPLE_TID | PERF_SAMPLE_TIME
    attr.flags = (FLAG_USE_CLOCKID | FLAG_SAMPLE_ID_ALL | FLAG_WATERMARK
                  | (FLAG_TASK if task_events else 0))
    attr.clockid = CLOCK_MONOTONIC
    attr.wakeup_events = max(1, watermark_bytes)  # union with wakeup_watermark
    fd = _libc.syscall(SYS_PERF_EVENT_OPEN, ctypes.byref(attr), pid, cpu, -1,
                       PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        _raise_open_error(ctypes.get_errno(), f"ring owner pid={pid} cpu={cpu}")
    return int(fd)


def _ioctl(fd: int, request: int, arg: int | ctypes.c_uint64 | None = None) -> None:
    if isinstance(arg, ctypes.c_uint64):
        rc = _libc.ioctl(fd, request, ctypes.addressof(arg))
    else:
        rc = _libc.ioctl(fd, request, ctypes.c_void_p(arg or 0))
    if rc < 0:
        err = ctypes.get_errno()
        raise PerfOpenError(f"ioctl {request:#x} on perf fd {fd}: {os.strerror(err)}")


def event_id(fd: int) -> int:
    """The kernel's id of the event behind ``fd`` (it heads every record it writes)."""
    value = ctypes.c_uint64()
    _ioctl(fd, PERF_EVENT_IOC_ID, value)
    return int(value.value)


def enable(fd: int) -> None:
    """Start counting/sampling on ``fd``."""
    _ioctl(fd, PERF_EVENT_IOC_ENABLE)


def disable(fd: int) -> None:
    """Stop sampling on ``fd`` (the breakpoint stays until the fd is closed)."""
    _ioctl(fd, PERF_EVENT_IOC_DISABLE)


@dataclass(frozen=True)
class Layout:
    """How to decode the samples of one event (what follows its fixed header)."""

    nregs: int
    stack_bytes: int
    regs: struct.Struct = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # compiled once per event: a format string built per record cost a tenth of
        # decoding (bench/monitor_cpu.py)
        object.__setattr__(self, "regs", struct.Struct(f"<{self.nregs}Q"))


@dataclass
class RingStats:
    """Counters of one ring: records decoded, records the kernel dropped, bytes read."""

    samples: int = 0
    lost: int = 0
    bytes: int = 0
    reads: int = 0


#: A decoded sample: (event id, pid, tid, time ns, registers, stack bytes or None).
Sample = tuple[int, int, int, int, tuple[int, ...], "bytes | None"]

_HEADER = struct.Struct("<IHH")
_FIXED = struct.Struct("<QIIQ")  # identifier, pid, tid, time
_U64 = struct.Struct("<Q")
_LOST = struct.Struct("<QQ")
_TASK = struct.Struct("<IIIIQ")  # pid, ppid, tid, ptid, time


def ring_positions(buffer: mmap.mmap, offset: int, count: int) -> memoryview:
    """``count`` 64-bit ring positions at ``offset`` of a shared mapping, as one view.

    Each item is read and written with a single aligned 8-byte access (the view's
    native ``Q``), so the kernel never sees a position half written. ``struct``'s
    little-endian codes go byte by byte: a consumer position caught mid-write reads as
    far behind, and the kernel drops records for a ring it takes for full. Release the
    view before closing the mapping.
    """
    return memoryview(buffer)[offset:offset + 8 * count].cast("Q")


class PerfRing:
    """One mmap'd perf ring buffer and the event fds that write into it.

    The first fd added owns the buffer; later fds are redirected into it. ``close()``
    unmaps and closes every fd, and is idempotent.
    """

    def __init__(self, data_pages: int = 64) -> None:
        """Create an empty ring of ``data_pages`` pages (a power of two)."""
        if data_pages <= 0 or data_pages & (data_pages - 1):
            raise ValueError("data_pages must be a power of two")
        self.data_pages = data_pages
        self.fds: list[int] = []
        self.layouts: dict[int, Layout] = {}
        self.stats = RingStats()
        self._mm: mmap.mmap | None = None
        self._head_tail: memoryview | None = None  # data_head, data_tail
        self._size = 0
        self._base = 0
        self.closed = False

    @property
    def data_bytes(self) -> int:
        """Size of the data area in bytes."""
        return self.data_pages * PAGE

    @property
    def owner_fd(self) -> int:
        """The fd whose readiness signals new data (poll it or add_reader it)."""
        return self.fds[0]

    def add(self, fd: int, spec: EventSpec) -> int:
        """Take ownership of the event ``fd``; returns its event id."""
        try:
            if not self.fds:
                self._mm = mmap.mmap(fd, PAGE * (1 + self.data_pages))
                self._head_tail = ring_positions(self._mm, 1024, 2)
                offset, size = struct.unpack_from("<QQ", self._mm, 1040)
                self._base = offset or PAGE
                self._size = size or PAGE * self.data_pages
            else:
                _ioctl(fd, PERF_EVENT_IOC_SET_OUTPUT, self.fds[0])
            eid = event_id(fd)
        except (OSError, PerfOpenError) as exc:
            os.close(fd)
            if isinstance(exc, PerfOpenError):
                raise
            raise PerfOpenError(f"mmap of a perf ring failed: {exc}") from exc
        self.fds.append(fd)
        self.layouts[eid] = Layout(len(spec.registers), (spec.stack_bytes + 7) // 8 * 8)
        return eid

    def remove(self, fd: int) -> None:
        """Close one redirected event fd (not the owner)."""
        if self.release(fd):
            os.close(fd)

    def release(self, fd: int) -> bool:
        """Forget one redirected event fd (not the owner) without closing it: the
        caller closes it (closing a uprobe event can take ~80 ms)."""
        if fd in self.fds[1:]:
            self.fds.remove(fd)
            return True
        return False

    def pending_bytes(self) -> int:
        """Bytes written by the kernel and not read yet."""
        positions = self._head_tail
        if positions is None:
            return 0
        return int(positions[0] - positions[1])

    def read_raw(self) -> bytes:
        """Copy out everything between data_tail and data_head, then free that space."""
        mm, positions = self._mm, self._head_tail
        if mm is None or positions is None:
            return b""
        head, tail = positions[0], positions[1]
        if head == tail:
            return b""
        size, base = self._size, self._base
        if head - tail > size:  # cannot happen unless the kernel overwrote (never in fwd mode)
            tail = head - size
        start = tail % size
        end = start + (head - tail)
        if end <= size:
            data = mm[base + start: base + end]
        else:
            data = mm[base + start: base + size] + mm[base: base + end - size]
        positions[1] = head
        self.stats.bytes += len(data)
        self.stats.reads += 1
        return data

    def read(self, on_lost: Callable[[int], None] | None = None,
             on_task: Callable[[int, int, int], None] | None = None) -> list[Sample]:
        """Decode every available record; samples are returned, losses counted."""
        return self.decode(self.read_raw(), on_lost, on_task)

    def decode(self, data: bytes, on_lost: Callable[[int], None] | None = None,
               on_task: Callable[[int, int, int], None] | None = None) -> list[Sample]:
        """Decode a run of records copied from this ring (see :meth:`read_raw`).

        ``on_lost(n)`` is called for each PERF_RECORD_LOST, ``on_task(kind, pid, tid)``
        for each PERF_RECORD_FORK/EXIT (kind is the record type).
        """
        out: list[Sample] = []
        append = out.append
        layouts = self.layouts
        header = _HEADER.unpack_from
        fixed = _FIXED.unpack_from
        u64 = _U64.unpack_from
        pos, n = 0, len(data)
        while pos + 8 <= n:
            rtype, _misc, rsize = header(data, pos)
            if rsize < 8:
                break  # corrupt: stop rather than spin
            if rtype == PERF_RECORD_SAMPLE:
                eid, pid, tid, t = fixed(data, pos + 8)
                layout = layouts.get(eid)
                regs: tuple[int, ...] = ()
                stack: bytes | None = None
                if layout is not None:
                    p = pos + 32
                    if layout.nregs:
                        abi = u64(data, p)[0]
                        p += 8
                        if abi:
                            regs = layout.regs.unpack_from(data, p)
                            p += 8 * layout.nregs
                    if layout.stack_bytes:
                        ssize = u64(data, p)[0]
                        p += 8
                        if ssize:
                            dyn = u64(data, p + ssize)[0]
                            stack = data[p: p + min(ssize, dyn)]
                append((eid, pid, tid, t, regs, stack))
            elif rtype == PERF_RECORD_LOST:
                _id, lost = _LOST.unpack_from(data, pos + 8)
                self.stats.lost += lost
                if on_lost is not None:
                    on_lost(lost)
            elif rtype in (PERF_RECORD_FORK, PERF_RECORD_EXIT) and on_task is not None:
                pid, _ppid, tid, _ptid, _t = _TASK.unpack_from(data, pos + 8)
                on_task(rtype, pid, tid)
            pos += rsize
        self.stats.samples += len(out)
        return out

    def close(self) -> None:
        """Unmap the ring and close every event fd (idempotent)."""
        if self.closed:
            return
        self.closed = True
        for fd in reversed(self.fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        if self._head_tail is not None:
            self._head_tail.release()
            self._head_tail = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    def __enter__(self) -> PerfRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def registers_for(args: tuple[int, ...], want_return: bool = False) -> tuple[int, ...]:
    """Perf register numbers for SysV argument numbers (1..6), sorted as perf writes them."""
    regs = {ARG_REGISTERS[a] for a in args}
    if want_return:
        regs.add(RETURN_REGISTER)
    return tuple(sorted(regs))


def check_permission() -> None:
    """Fail early with exit-code-3 advice when this process cannot open uprobes.

    CAP_SYS_ADMIN must be in the effective set, whatever the user id: the uprobe PMU
    refused CAP_PERFMON alone on Linux 6.18 (``perf_event_paranoid`` 2), and root
    without capabilities (a container, ``setpriv``) is refused too.
    """
    uprobe_pmu()
    cap_eff = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    cap_eff = int(line.split()[1], 16)
    except OSError:
        pass
    cap_sys_admin = 21
    if cap_eff & (1 << cap_sys_admin):
        return
    raise PerfPermissionError(f"this user may not open uprobe perf events: {PERMISSION_HINT}")
