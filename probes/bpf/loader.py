"""Load the span program through libbpf (ctypes) and attach it with ``uprobe_multi`` links.

libbpf 1.1 (Debian 12) loads the object (maps, relocations, BTF) but has no
``uprobe_multi`` attach call, so links are made with the raw ``bpf(2)`` command
(``BPF_LINK_CREATE``, ``BPF_TRACE_UPROBE_MULTI``), as ``bench/detach_cost.py`` measured
first: one link carries every offset of one file in one process, and closing it
unregisters them all with one grace period (not one ~80 ms grace period per uprobe).
Every failure that means "this host cannot run the backend" is a
:class:`BpfUnavailableError` whose message says why, for the fallback notice.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from pathlib import Path

from probes.errors import ProbeError

OBJECT_PATH = Path(__file__).with_name("spans.bpf.o")
"""The compiled program (``make bpf``; git-ignored)."""

BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_LINK_CREATE = 1, 2, 28
BPF_TRACE_UPROBE_MULTI = 48
BPF_F_UPROBE_MULTI_RETURN = 1
SYS_BPF = 321  # x86_64
ENOTSUPP = 524  # the kernel's internal 'not supported', seen by user space as is
PROGRAM_NAME = b"on_hit"


class BpfUnavailableError(ProbeError):
    """The eBPF backend cannot run here; the message says why (for the fallback notice)."""


_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    fd = _libc.syscall(SYS_BPF, cmd, attr, len(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return int(fd)


def _libbpf() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise BpfUnavailableError(f"libbpf is not installed ({exc})") from None
    vp, cp, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
    for fn, res, args in [
        ("bpf_object__open_file", vp, [cp, vp]),
        ("bpf_object__load", i, [vp]),
        ("bpf_object__close", None, [vp]),
        ("bpf_object__find_program_by_name", vp, [vp, cp]),
        ("bpf_object__find_map_by_name", vp, [vp, cp]),
        ("bpf_map__set_max_entries", i, [vp, ctypes.c_uint32]),
        ("bpf_map__fd", i, [vp]),
        ("bpf_program__fd", i, [vp]),
        ("bpf_program__set_expected_attach_type", i, [vp, i]),
        ("libbpf_set_print", vp, [vp]),
    ]:
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    lib.libbpf_set_print(None)  # its own messages go nowhere: ours say why in one line
    return lib


def _why(err: int, what: str) -> str:
    if err in (errno.EPERM, errno.EACCES):
        return f"{what}: not permitted (needs CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN)"
    return f"{what}: {os.strerror(err)}"


class SpanProgram:
    """The loaded span program and its maps; one owner of their fds (``close`` idempotent)."""

    def __init__(self, ring_bytes: int, object_path: Path = OBJECT_PATH) -> None:
        """Load ``object_path`` with a ring buffer of ``ring_bytes`` (a power of two pages)."""
        if not object_path.exists():
            raise BpfUnavailableError(f"no compiled BPF program at {object_path} "
                                      "(run `make bpf`: needs clang and libbpf-dev)")
        self._lib = _libbpf()
        ctypes.set_errno(0)
        obj = self._lib.bpf_object__open_file(str(object_path).encode(), None)
        if not obj:
            raise BpfUnavailableError(_why(ctypes.get_errno() or errno.EINVAL,
                                           f"opening {object_path.name}"))
        self._obj: int | None = obj
        try:
            prog = self._lib.bpf_object__find_program_by_name(obj, PROGRAM_NAME)
            ring = self._lib.bpf_object__find_map_by_name(obj, b"spans")
            if not prog or not ring:
                raise BpfUnavailableError(f"{object_path.name} lacks its program or ring")
            self._lib.bpf_program__set_expected_attach_type(prog, BPF_TRACE_UPROBE_MULTI)
            self._lib.bpf_map__set_max_entries(ring, ring_bytes)
            rc = self._lib.bpf_object__load(obj)
            if rc != 0:
                raise BpfUnavailableError(_why(-rc, "loading the BPF program"))
            self.prog_fd = self._lib.bpf_program__fd(prog)
            self.ring_fd = self._lib.bpf_map__fd(ring)
            self.hits_fd = self._map_fd(b"site_hits")
            self.stats_fd = self._map_fd(b"stats")
            self.wake_fd = self._map_fd(b"wake")
            self.ring_bytes = ring_bytes
        except BaseException:
            self.close()
            raise

    def _map_fd(self, name: bytes) -> int:
        found = self._lib.bpf_object__find_map_by_name(self._obj, name)
        if not found:
            raise BpfUnavailableError(f"the BPF object lacks its map {name.decode()}")
        return int(self._lib.bpf_map__fd(found))

    def link(self, path: str, offsets: list[int], cookies: list[int], pid: int,
             is_return: bool) -> int:
        """A ``uprobe_multi`` link: the program at ``offsets`` of ``path`` in ``pid`` only."""
        c_path = ctypes.create_string_buffer(path.encode())
        c_offsets = (ctypes.c_uint64 * len(offsets))(*offsets)
        c_cookies = (ctypes.c_uint64 * len(cookies))(*cookies)
        attr = ctypes.create_string_buffer(128)
        struct.pack_into("<IIII", attr, 0, self.prog_fd, 0, BPF_TRACE_UPROBE_MULTI, 0)
        struct.pack_into("<QQQQIII", attr, 16, ctypes.addressof(c_path),
                         ctypes.addressof(c_offsets), 0, ctypes.addressof(c_cookies),
                         len(offsets), BPF_F_UPROBE_MULTI_RETURN if is_return else 0, pid)
        try:
            return _bpf(BPF_LINK_CREATE, attr)
        except OSError as exc:
            assert exc.errno is not None
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP):
                raise BpfUnavailableError(
                    f"attaching uprobe_multi links: {exc.strerror} "
                    "(the kernel needs uprobe_multi, Linux >= 6.6)") from None
            if exc.errno == errno.ESRCH:
                raise ProbeError(f"pid {pid} exited before its probes were attached") from None
            raise BpfUnavailableError(_why(exc.errno, "attaching uprobe_multi links")) from None

    def lookup_u64(self, map_fd: int, key: int) -> int:
        """One ``u64`` value of an array map (0 when the lookup fails)."""
        c_key = ctypes.c_uint32(key)
        c_value = ctypes.c_uint64(0)
        attr = ctypes.create_string_buffer(32)
        struct.pack_into("<IIQQ", attr, 0, map_fd, 0, ctypes.addressof(c_key),
                         ctypes.addressof(c_value))
        try:
            _bpf(BPF_MAP_LOOKUP_ELEM, attr)
        except OSError:
            return 0
        return int(c_value.value)

    def set_u64(self, map_fd: int, key: int, value: int) -> None:
        """Write one ``u64`` value of an array map (:class:`BpfUnavailableError` when
        the kernel refuses: ``auto`` then falls back to perf, saying why)."""
        c_key = ctypes.c_uint32(key)
        c_value = ctypes.c_uint64(value)
        attr = ctypes.create_string_buffer(32)
        struct.pack_into("<IIQQQ", attr, 0, map_fd, 0, ctypes.addressof(c_key),
                         ctypes.addressof(c_value), 0)  # flags 0: BPF_ANY
        try:
            _bpf(BPF_MAP_UPDATE_ELEM, attr)
        except OSError as exc:
            raise BpfUnavailableError(_why(exc.errno or errno.EINVAL,
                                           "writing the BPF program's settings")) from None

    def close(self) -> None:
        """Close the object: its program and maps (links are their owner's to close)."""
        obj, self._obj = self._obj, None
        if obj:
            self._lib.bpf_object__close(obj)
