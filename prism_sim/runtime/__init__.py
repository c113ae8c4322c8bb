"""ctypes binding of the fake accelerator runtime (``libsimxpu``, ``simxpu.c``).

A simulated rank drives its fake device through :class:`SimDevice`, which calls the
library's CUDA-runtime and NCCL entry points exactly as a real engine calls libcudart and
libnccl, so uprobes of the ``cuda`` and ``nccl`` catalog profiles see the real argument
registers: ``cudaMemcpyAsync``'s byte count in arg3, ``ncclAllReduce``'s element count in
arg3, ``cudaLaunchKernel``'s dims in rsi/rdx/rcx/r8 and its shared memory at stack+8.

Typical rank loop::

    with SimDevice(rank, world, comm_id, control="prism-ctl-1234") as dev:
        attn = dev.kernel("attn", flops=2e9, nbytes=4e7)
        dev.memcpy_h2d(input_ids)            # cudaMemcpyAsync H2D
        dev.launch(attn)                     # cudaLaunchKernel, returns at once
        dev.allreduce(tokens * hidden)       # ncclAllReduce (fp16)
        dev.memcpy_d2h(8 * batch)            # cudaMemcpyAsync D2H
        dev.synchronize()                    # cudaStreamSynchronize: device wait
        sampled = dev.read_d2h()

The orchestrator makes one communicator id per run with :meth:`SimDevice.new_comm_id`
and hands it to every rank; ``SimDevice.__init__`` blocks (as ``ncclCommInitRank`` does)
until every rank of the communicator has joined.

Errors from the runtime raise :class:`~prism_sim.errors.SimDeviceError` with the CUDA or
NCCL result code. A collective whose peer died or timed out
(``SIMXPU_COLLECTIVE_TIMEOUT_S``, default 10 s) makes the device fail for good: every
later call raises ``SimDeviceError`` with code 702 (``cudaErrorLaunchTimeout``).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.machinery
import math
import os
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from prism_sim.errors import SimDeviceError

ABI_VERSION = 2
PACKAGE_DIR = Path(__file__).resolve().parent.parent
LIBRARY_GLOB = "libsimxpu*.so"
COMM_ID_BYTES = 128
COMM_ID_PREFIX = b"/prism-sim-"

# cudaMemcpyKind
MEMCPY_H2H, MEMCPY_H2D, MEMCPY_D2H, MEMCPY_D2D, MEMCPY_DEFAULT = range(5)
# ncclDataType_t
NCCL_INT8, NCCL_UINT8, NCCL_INT32, NCCL_UINT32, NCCL_INT64, NCCL_UINT64 = range(6)
NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64, NCCL_BFLOAT16 = range(6, 10)
# ncclRedOp_t
NCCL_SUM, NCCL_PROD, NCCL_MAX, NCCL_MIN, NCCL_AVG = range(5)
# result codes the simulator produces on its own
CUDA_ERROR_NOT_READY = 600
CUDA_ERROR_LAUNCH_TIMEOUT = 702  # sticky: a collective failed (peer gone or timed out)
NCCL_SYSTEM_ERROR = 2  # a collective timed out
NCCL_REMOTE_ERROR = 6  # a peer left or died

_INITIAL_DEVICE_BYTES = 1 << 16

Buffer = bytes | bytearray | memoryview | ctypes.Array[Any]


class _Dim3(ctypes.Structure):
    _fields_ = [("x", ctypes.c_uint), ("y", ctypes.c_uint), ("z", ctypes.c_uint)]


class _KernelDesc(ctypes.Structure):  # struct simxpu_kernel
    _fields_ = [("name", ctypes.c_char_p), ("flops", ctypes.c_double),
                ("bytes", ctypes.c_double)]


class _GraphDesc(ctypes.Structure):  # struct simxpu_graph
    _fields_ = [("n", ctypes.c_int),
                ("kernels", ctypes.POINTER(ctypes.POINTER(_KernelDesc)))]


class _UniqueId(ctypes.Structure):  # ncclUniqueId, passed by value (128 bytes in memory)
    _fields_ = [("internal", ctypes.c_char * COMM_ID_BYTES)]


_c_int, _c_void_p, _c_size_t = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "simxpu_abi_version": (_c_int, []),
    "simxpu_configure": (_c_int, [ctypes.c_double] * 5 + [ctypes.c_ulonglong]),
    "simxpu_attach_control": (_c_int, [ctypes.c_char_p, _c_int]),
    "simxpu_last_error_message": (_c_size_t, [ctypes.c_char_p, _c_size_t]),
    "cudaSetDevice": (_c_int, [_c_int]),
    "cudaGetDevice": (_c_int, [ctypes.POINTER(_c_int)]),
    "cudaGetDeviceCount": (_c_int, [ctypes.POINTER(_c_int)]),
    "cudaGetErrorString": (ctypes.c_char_p, [_c_int]),
    "cudaStreamCreate": (_c_int, [ctypes.POINTER(_c_void_p)]),
    "cudaStreamDestroy": (_c_int, [_c_void_p]),
    "cudaStreamQuery": (_c_int, [_c_void_p]),
    "cudaStreamSynchronize": (_c_int, [_c_void_p]),
    "cudaDeviceSynchronize": (_c_int, []),
    "cudaLaunchKernel": (_c_int, [_c_void_p, _Dim3, _Dim3, _c_void_p, _c_size_t, _c_void_p]),
    "cudaGraphLaunch": (_c_int, [_c_void_p, _c_void_p]),
    "cudaMemcpyAsync": (_c_int, [_c_void_p, _c_void_p, _c_size_t, _c_int, _c_void_p]),
    "cudaMemcpy": (_c_int, [_c_void_p, _c_void_p, _c_size_t, _c_int]),
    "cudaEventCreate": (_c_int, [ctypes.POINTER(_c_void_p)]),
    "cudaEventRecord": (_c_int, [_c_void_p, _c_void_p]),
    "cudaEventQuery": (_c_int, [_c_void_p]),
    "cudaEventSynchronize": (_c_int, [_c_void_p]),
    "cudaEventElapsedTime": (_c_int, [ctypes.POINTER(ctypes.c_float), _c_void_p, _c_void_p]),
    "cudaEventDestroy": (_c_int, [_c_void_p]),
    "cudaStreamWaitEvent": (_c_int, [_c_void_p, _c_void_p, ctypes.c_uint]),
    "ncclGetUniqueId": (_c_int, [ctypes.POINTER(_UniqueId)]),
    "ncclCommInitRank": (_c_int, [ctypes.POINTER(_c_void_p), _c_int, _UniqueId, _c_int]),
    "ncclCommDestroy": (_c_int, [_c_void_p]),
    "ncclGetErrorString": (ctypes.c_char_p, [_c_int]),
    "ncclAllReduce": (_c_int, [_c_void_p, _c_void_p, _c_size_t, _c_int, _c_int, _c_void_p,
                               _c_void_p]),
    "ncclAllGather": (_c_int, [_c_void_p, _c_void_p, _c_size_t, _c_int, _c_void_p, _c_void_p]),
    "ncclReduceScatter": (_c_int, [_c_void_p, _c_void_p, _c_size_t, _c_int, _c_int, _c_void_p,
                                   _c_void_p]),
    "ncclBroadcast": (_c_int, [_c_void_p, _c_void_p, _c_size_t, _c_int, _c_int, _c_void_p,
                               _c_void_p]),
    "ncclSend": (_c_int, [_c_void_p, _c_size_t, _c_int, _c_int, _c_void_p, _c_void_p]),
    "ncclRecv": (_c_int, [_c_void_p, _c_size_t, _c_int, _c_int, _c_void_p, _c_void_p]),
    "ncclGroupStart": (_c_int, []),
    "ncclGroupEnd": (_c_int, []),
}

_FIX = "run `pip install -e .` (or `make venv`) in the project to build it"
_lib: ctypes.CDLL | None = None


def library_path() -> str:
    """Path of the built runtime library (``prism_sim/libsimxpu.cpython-*.so``).

    Raises:
        SimDeviceError: the library was not built.
    """
    found = sorted(PACKAGE_DIR.glob(LIBRARY_GLOB))
    if not found:
        raise SimDeviceError(
            f"the fake accelerator runtime is not built ({PACKAGE_DIR}/{LIBRARY_GLOB} is "
            f"missing): {_FIX}")
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:  # this interpreter's build first
        for path in found:
            if path.name == f"libsimxpu{suffix}":
                return str(path)
    return str(max(found, key=lambda p: p.stat().st_mtime))


def _library() -> ctypes.CDLL:
    """The runtime, loaded once per process, with every prototype set."""
    global _lib
    if _lib is not None:
        return _lib
    path = library_path()
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise SimDeviceError(f"cannot load {path}: {exc}: {_FIX}") from None
    try:
        for name, (restype, argtypes) in _PROTOTYPES.items():
            func = getattr(lib, name)
            func.restype = restype
            func.argtypes = argtypes
    except AttributeError as exc:
        raise SimDeviceError(f"{path} is stale ({exc}): {_FIX}") from None
    version = int(lib.simxpu_abi_version())
    if version != ABI_VERSION:
        raise SimDeviceError(
            f"{path} is stale (ABI {version}, this binding needs {ABI_VERSION}): {_FIX}")
    _lib = lib
    return lib


def _runtime_message(lib: ctypes.CDLL) -> str:
    buf = ctypes.create_string_buffer(512)
    lib.simxpu_last_error_message(buf, len(buf))
    return buf.value.decode(errors="replace")


def _cuda_error(lib: ctypes.CDLL, call: str, code: int) -> SimDeviceError:
    text = (lib.cudaGetErrorString(code) or b"?").decode(errors="replace")
    detail = _runtime_message(lib) if code in (CUDA_ERROR_LAUNCH_TIMEOUT, 1) else ""
    message = f"{call} failed: CUDA error {code} ({text})"
    return SimDeviceError(f"{message}: {detail}" if detail else message, code=code, call=call)


def _nccl_error(lib: ctypes.CDLL, call: str, code: int) -> SimDeviceError:
    text = (lib.ncclGetErrorString(code) or b"?").decode(errors="replace")
    detail = _runtime_message(lib)
    message = f"{call} failed: NCCL error {code} ({text})"
    return SimDeviceError(f"{message}: {detail}" if detail else message, code=code, call=call)


def _check_cost(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


class Kernel:
    """A kernel descriptor (``struct simxpu_kernel``): what ``cudaLaunchKernel``'s
    ``func`` points to. Its duration is ``flops / flops_per_s + nbytes / mem_bw`` at
    speed 1. The runtime copies it at launch, so it may be dropped right after."""

    __slots__ = ("_desc", "flops", "name", "nbytes")

    def __init__(self, name: str, flops: float, nbytes: float) -> None:
        self.name = name
        self.flops = _check_cost("flops", flops)
        self.nbytes = _check_cost("nbytes", nbytes)
        self._desc = _KernelDesc(name.encode(), self.flops, self.nbytes)

    @property
    def address(self) -> int:
        """Address of the descriptor (the ``func`` argument)."""
        return ctypes.addressof(self._desc)

    def __repr__(self) -> str:
        return f"Kernel({self.name!r}, flops={self.flops:g}, nbytes={self.nbytes:g})"


class Graph:
    """A graph descriptor (``struct simxpu_graph``): what a ``cudaGraphExec_t`` points
    to. One graph launch runs its kernels back to back as one device item."""

    __slots__ = ("_array", "_desc", "kernels")

    def __init__(self, kernels: Sequence[Kernel]) -> None:
        self.kernels = tuple(kernels)
        ptr = ctypes.POINTER(_KernelDesc)
        self._array = (ptr * len(self.kernels))(*[ctypes.pointer(k._desc) for k in self.kernels])
        self._desc = _GraphDesc(len(self.kernels), ctypes.cast(self._array, ctypes.POINTER(ptr)))

    @property
    def address(self) -> int:
        """Address of the descriptor (the ``cudaGraphExec_t`` handle)."""
        return ctypes.addressof(self._desc)

    @property
    def flops(self) -> float:
        """Total FLOPs of the graph's kernels."""
        return sum(k.flops for k in self.kernels)

    @property
    def nbytes(self) -> float:
        """Total bytes moved by the graph's kernels."""
        return sum(k.nbytes for k in self.kernels)


class Event:
    """A ``cudaEvent_t`` of a :class:`SimDevice` (see :meth:`SimDevice.record_event`)."""

    def __init__(self, device: SimDevice, handle: int) -> None:
        self._device = device
        self.handle: int | None = handle

    def _handle(self) -> int:
        if self.handle is None:
            raise SimDeviceError("the event is closed")
        return self.handle

    def query(self) -> bool:
        """True once the device reached the event (``cudaEventQuery``)."""
        code = int(self._device._lib.cudaEventQuery(self._handle()))
        if code == CUDA_ERROR_NOT_READY:
            return False
        if code:
            raise _cuda_error(self._device._lib, "cudaEventQuery", code)
        return True

    def elapsed_ms(self, end: Event) -> float:
        """Device time from this event to ``end`` in ms (``cudaEventElapsedTime``);
        both must have completed."""
        ms = ctypes.c_float()
        code = int(self._device._lib.cudaEventElapsedTime(ctypes.byref(ms), self._handle(),
                                                          end._handle()))
        if code:
            raise _cuda_error(self._device._lib, "cudaEventElapsedTime", code)
        return float(ms.value)

    def close(self) -> None:
        """Destroy the event (idempotent)."""
        if self.handle is not None:
            handle, self.handle = self.handle, None
            self._device._lib.cudaEventDestroy(handle)


class SimDevice:
    """One rank's fake accelerator: a stream, a communicator, device and host buffers.

    Not thread-safe: one rank loop drives it. Calls that block (``synchronize``,
    ``event_sync``, the constructor's communicator setup) release the GIL.

    Args:
        rank: this rank (0-based); also the device number (``cudaSetDevice``).
        world: number of ranks of the communicator.
        comm_id: the run's communicator id from :meth:`new_comm_id`; required when
            ``world > 1`` (with ``world == 1`` a private one is made when None).
        control: name of the fault control block (:class:`prism_sim.control.ControlBlock`)
            to read speed, link and preempt from; None runs at nominal speed.
        flops_per_s, mem_bw, link_bw, pcie_bw: the device's cost model (FLOP/s and
            bytes/s of memory, interconnect and host link).
        jitter: relative standard deviation of kernel durations.
        seed: seed of the jitter (mixed with ``rank``, so ranks differ).

    Raises:
        SimDeviceError: the runtime is missing, or a runtime call failed (for example
            ranks that never all joined within ``SIMXPU_INIT_TIMEOUT_S``).
        ValueError: bad arguments.
    """

    def __init__(self, rank: int, world: int, comm_id: bytes | None, *,
                 control: str | None = None, flops_per_s: float = 5e12, mem_bw: float = 5e11,
                 link_bw: float = 5e10, pcie_bw: float = 2.5e10, jitter: float = 0.02,
                 seed: int = 0) -> None:
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank {rank}, world {world}")
        if comm_id is None and world > 1:
            raise ValueError("world > 1 needs the run's comm_id (SimDevice.new_comm_id())")
        if comm_id is not None and (len(comm_id) != COMM_ID_BYTES
                                    or not comm_id.startswith(COMM_ID_PREFIX)):
            raise ValueError("comm_id must be the 128 bytes SimDevice.new_comm_id() returns")
        self.rank = rank
        self.world = world
        self.control = control
        self._lib = _library()
        self._closed = False
        self._stream: int | None = None
        self._comm: int | None = None
        self._control_attached = False
        self._events: weakref.WeakSet[Event] = weakref.WeakSet()
        self._keep: list[object] = []  # host/device buffers pending copies may touch
        self._device_mem = (ctypes.c_char * _INITIAL_DEVICE_BYTES)()
        self._d2h = (ctypes.c_char * _INITIAL_DEVICE_BYTES)()
        self._d2h_len = 0
        self._kernel_args = (ctypes.c_void_p * 1)()
        lib = self._lib
        try:
            mixed_seed = (seed * 0x9E3779B97F4A7C15 + rank) % (1 << 64)
            self._cuda("simxpu_configure", lib.simxpu_configure(
                flops_per_s, mem_bw, link_bw, pcie_bw, jitter, mixed_seed))
            count = ctypes.c_int()
            self._cuda("cudaGetDeviceCount", lib.cudaGetDeviceCount(ctypes.byref(count)))
            self._cuda("cudaSetDevice", lib.cudaSetDevice(rank % count.value))
            if control is not None:
                self._cuda("simxpu_attach_control",
                           lib.simxpu_attach_control(control.encode(), rank))
                self._control_attached = True
            stream = ctypes.c_void_p()
            self._cuda("cudaStreamCreate", lib.cudaStreamCreate(ctypes.byref(stream)))
            self._stream = stream.value
            uid = _UniqueId()
            uid.internal = comm_id if comm_id is not None else self.new_comm_id()
            self.comm_id = bytes(uid.internal).ljust(COMM_ID_BYTES, b"\0")
            comm = ctypes.c_void_p()
            self._nccl("ncclCommInitRank",
                       lib.ncclCommInitRank(ctypes.byref(comm), world, uid, rank))
            self._comm = comm.value
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ helpers
    def _cuda(self, call: str, code: int) -> None:
        if code:
            raise _cuda_error(self._lib, call, int(code))

    def _nccl(self, call: str, code: int) -> None:
        if code:
            raise _nccl_error(self._lib, call, int(code))

    def _open(self) -> None:
        if self._closed:
            raise SimDeviceError(f"the device of rank {self.rank} is closed")

    def _device_buffer(self, nbytes: int) -> int:
        if nbytes > len(self._device_mem):
            self._keep.append(self._device_mem)  # a pending copy may still use it
            self._device_mem = (ctypes.c_char * max(nbytes, 2 * len(self._device_mem)))()
        return ctypes.addressof(self._device_mem)

    @staticmethod
    def _count(name: str, value: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        return value

    # ------------------------------------------------------------------ ids
    @staticmethod
    def new_comm_id() -> bytes:
        """A fresh communicator id (``ncclGetUniqueId``), 128 bytes, for every rank of a
        run. It names the shared memory the ranks meet in; making one creates nothing."""
        lib = _library()
        uid = _UniqueId()
        code = int(lib.ncclGetUniqueId(ctypes.byref(uid)))
        if code:
            raise _nccl_error(lib, "ncclGetUniqueId", code)
        return bytes(uid.internal).ljust(COMM_ID_BYTES, b"\0")

    @staticmethod
    def comm_shm_name(comm_id: bytes) -> str:
        """The POSIX shared-memory name a communicator id stands for (``/prism-sim-...``)."""
        return comm_id.split(b"\0", 1)[0].decode()

    @staticmethod
    def unlink_comm(comm_id: bytes) -> bool:
        """Remove the communicator's ``/dev/shm`` entry if a rank died while the ranks were
        still joining (after a complete join the name is already gone). Idempotent;
        True when something was removed."""
        path = "/dev/shm" + SimDevice.comm_shm_name(comm_id)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True

    # ------------------------------------------------------------------ work
    def kernel(self, name: str, flops: float, nbytes: float) -> Kernel:
        """A kernel descriptor to :meth:`launch` (or put in a :meth:`graph`)."""
        return Kernel(name, flops, nbytes)

    def graph(self, kernels: Sequence[Kernel]) -> Graph:
        """A graph descriptor of ``kernels`` to :meth:`graph_launch`."""
        return Graph(kernels)

    def launch(self, kernel: Kernel, grid: tuple[int, int, int] = (1, 1, 1),
               block: tuple[int, int, int] = (128, 1, 1), shared_mem: int = 0) -> None:
        """``cudaLaunchKernel(kernel, grid, block, args, shared_mem, stream)``: enqueue and
        return at once."""
        self._open()
        code = self._lib.cudaLaunchKernel(kernel.address, _Dim3(*grid), _Dim3(*block),
                                          ctypes.addressof(self._kernel_args), shared_mem,
                                          self._stream)
        if code:
            raise _cuda_error(self._lib, "cudaLaunchKernel", int(code))

    def graph_launch(self, graph: Graph) -> None:
        """``cudaGraphLaunch(graph, stream)``: enqueue the whole graph as one item."""
        self._open()
        self._cuda("cudaGraphLaunch", self._lib.cudaGraphLaunch(graph.address, self._stream))

    def memcpy_h2d(self, src: Buffer | None, nbytes: int | None = None) -> None:
        """``cudaMemcpyAsync(device, host, nbytes, cudaMemcpyHostToDevice, stream)``.

        The first ``nbytes`` (default: all) of ``src`` are staged in host memory owned by
        the device and copied into its device buffer when the copy executes. With
        ``src=None`` the copy is timed but moves no bytes (NULL pointers): for large
        copies whose content does not matter.
        """
        self._open()
        if src is None:
            count = self._count("nbytes", nbytes if nbytes is not None else 0)
            code = self._lib.cudaMemcpyAsync(None, None, count, MEMCPY_H2D, self._stream)
            self._cuda("cudaMemcpyAsync", int(code))
            return
        view = memoryview(src).cast("B")
        count = self._count("nbytes", len(view) if nbytes is None else nbytes)
        if count > len(view):
            raise ValueError(f"nbytes {count} is more than the {len(view)} bytes of src")
        host = (ctypes.c_char * count).from_buffer_copy(view[:count]) if count else None
        dst = self._device_buffer(count)
        self._keep.append(host)
        code = self._lib.cudaMemcpyAsync(dst, ctypes.addressof(host) if host else None, count,
                                         MEMCPY_H2D, self._stream)
        self._cuda("cudaMemcpyAsync", int(code))

    def memcpy_d2h(self, nbytes: int, *, data: bool = True) -> None:
        """``cudaMemcpyAsync(host, device, nbytes, cudaMemcpyDeviceToHost, stream)``:
        enqueue a copy of the device buffer's first ``nbytes`` into the device's host
        buffer; :meth:`read_d2h` returns them once the stream is synchronised. With
        ``data=False`` the copy is timed but moves no bytes."""
        self._open()
        count = self._count("nbytes", nbytes)
        if not data:
            code = self._lib.cudaMemcpyAsync(None, None, count, MEMCPY_D2H, self._stream)
            self._cuda("cudaMemcpyAsync", int(code))
            return
        src = self._device_buffer(count)
        if count > len(self._d2h):
            self._keep.append(self._d2h)
            self._d2h = (ctypes.c_char * max(count, 2 * len(self._d2h)))()
        self._d2h_len = count
        code = self._lib.cudaMemcpyAsync(ctypes.addressof(self._d2h), src, count, MEMCPY_D2H,
                                         self._stream)
        self._cuda("cudaMemcpyAsync", int(code))

    def read_d2h(self) -> bytes:
        """The bytes of the latest :meth:`memcpy_d2h`.

        Raises:
            SimDeviceError: the stream still has work pending (synchronise first).
        """
        self._open()
        code = int(self._lib.cudaStreamQuery(self._stream))
        if code == CUDA_ERROR_NOT_READY:
            raise SimDeviceError("read_d2h before the copy completed: synchronize() first",
                                 code=code, call="cudaStreamQuery")
        self._cuda("cudaStreamQuery", code)
        return ctypes.string_at(ctypes.addressof(self._d2h), self._d2h_len)

    def memcpy_sync(self, nbytes: int, kind: int = MEMCPY_D2H) -> None:
        """``cudaMemcpy(dst, src, nbytes, kind)``: a blocking copy (device buffer to and
        from the host buffer by ``kind``; no bytes move for H2H and D2D)."""
        self._open()
        count = self._count("nbytes", nbytes)
        dev = self._device_buffer(count)
        if count > len(self._d2h):
            self._keep.append(self._d2h)
            self._d2h = (ctypes.c_char * max(count, 2 * len(self._d2h)))()
        host = ctypes.addressof(self._d2h)
        dst, src = {MEMCPY_H2D: (dev, host), MEMCPY_D2H: (host, dev)}.get(kind, (None, None))
        if kind == MEMCPY_D2H:
            self._d2h_len = count
        self._cuda("cudaMemcpy", int(self._lib.cudaMemcpy(dst, src, count, kind)))

    # ------------------------------------------------------------------ collectives
    def _collective_buffers(self) -> int:
        return ctypes.addressof(self._device_mem)

    def allreduce(self, count: int, dtype: int = NCCL_FLOAT16, op: int = NCCL_SUM) -> None:
        """``ncclAllReduce(send, recv, count, dtype, op, comm, stream)``: enqueued; the
        rendezvous with the other ranks happens on the device (a slow peer shows up as
        device time in the next synchronisation)."""
        self._open()
        buf = self._collective_buffers()
        self._nccl("ncclAllReduce", int(self._lib.ncclAllReduce(
            buf, buf, self._count("count", count), dtype, op, self._comm, self._stream)))

    def all_gather(self, sendcount: int, dtype: int = NCCL_FLOAT16) -> None:
        """``ncclAllGather(send, recv, sendcount, dtype, comm, stream)``."""
        self._open()
        buf = self._collective_buffers()
        self._nccl("ncclAllGather", int(self._lib.ncclAllGather(
            buf, buf, self._count("sendcount", sendcount), dtype, self._comm, self._stream)))

    def reduce_scatter(self, recvcount: int, dtype: int = NCCL_FLOAT16,
                       op: int = NCCL_SUM) -> None:
        """``ncclReduceScatter(send, recv, recvcount, dtype, op, comm, stream)``."""
        self._open()
        buf = self._collective_buffers()
        self._nccl("ncclReduceScatter", int(self._lib.ncclReduceScatter(
            buf, buf, self._count("recvcount", recvcount), dtype, op, self._comm,
            self._stream)))

    def broadcast(self, count: int, dtype: int = NCCL_FLOAT16, root: int = 0) -> None:
        """``ncclBroadcast(send, recv, count, dtype, root, comm, stream)``."""
        self._open()
        buf = self._collective_buffers()
        self._nccl("ncclBroadcast", int(self._lib.ncclBroadcast(
            buf, buf, self._count("count", count), dtype, root, self._comm, self._stream)))

    def send(self, peer: int, count: int, dtype: int = NCCL_FLOAT16) -> None:
        """``ncclSend(sendbuff, count, dtype, peer, comm, stream)``: enqueued; on the device
        it waits for ``peer``'s matching :meth:`recv` (rendezvous), then takes
        ``count × size`` bytes over the slower of the two links. Ranks that send to each
        other must do it inside :meth:`group`, as with NCCL."""
        self._open()
        self._nccl("ncclSend", int(self._lib.ncclSend(
            self._collective_buffers(), self._count("count", count), dtype,
            self._count("peer", peer), self._comm, self._stream)))

    def recv(self, peer: int, count: int, dtype: int = NCCL_FLOAT16) -> None:
        """``ncclRecv(recvbuff, count, dtype, peer, comm, stream)``: the receiving side of
        :meth:`send` (the k-th receive from ``peer`` matches its k-th send to this rank)."""
        self._open()
        self._nccl("ncclRecv", int(self._lib.ncclRecv(
            self._collective_buffers(), self._count("count", count), dtype,
            self._count("peer", peer), self._comm, self._stream)))

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        """``ncclGroupStart()`` ... ``ncclGroupEnd()`` around the block: sends and receives
        in it are launched together by ``ncclGroupEnd`` (so an exchange cannot deadlock)."""
        self._open()
        self._nccl("ncclGroupStart", int(self._lib.ncclGroupStart()))
        try:
            yield
        finally:
            self._nccl("ncclGroupEnd", int(self._lib.ncclGroupEnd()))

    # ------------------------------------------------------------------ sync
    def record_event(self, event: Event | None = None) -> Event:
        """``cudaEventRecord(event, stream)``, creating the event (``cudaEventCreate``)
        unless one is given to re-record."""
        self._open()
        if event is None:
            handle = ctypes.c_void_p()
            self._cuda("cudaEventCreate", int(self._lib.cudaEventCreate(ctypes.byref(handle))))
            assert handle.value is not None
            event = Event(self, handle.value)
            self._events.add(event)
        self._cuda("cudaEventRecord",
                   int(self._lib.cudaEventRecord(event._handle(), self._stream)))
        return event

    def event_sync(self, event: Event) -> None:
        """``cudaEventSynchronize(event)``: block until the device reached it."""
        self._open()
        self._cuda("cudaEventSynchronize", int(self._lib.cudaEventSynchronize(event._handle())))
        self._release_if_idle()

    def wait_event(self, event: Event) -> None:
        """``cudaStreamWaitEvent(stream, event, 0)``."""
        self._open()
        self._cuda("cudaStreamWaitEvent",
                   int(self._lib.cudaStreamWaitEvent(self._stream, event._handle(), 0)))

    def synchronize(self) -> None:
        """``cudaStreamSynchronize(stream)``: block until the stream drained.

        Raises:
            SimDeviceError: the device failed (code 702 after a failed collective).
        """
        self._open()
        self._cuda("cudaStreamSynchronize", int(self._lib.cudaStreamSynchronize(self._stream)))
        self._keep.clear()

    def device_synchronize(self) -> None:
        """``cudaDeviceSynchronize()``: block until every stream drained."""
        self._open()
        self._cuda("cudaDeviceSynchronize", int(self._lib.cudaDeviceSynchronize()))
        self._keep.clear()

    def _release_if_idle(self) -> None:
        if int(self._lib.cudaStreamQuery(self._stream)) == 0:
            self._keep.clear()

    # ------------------------------------------------------------------ lifecycle
    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    def close(self) -> None:
        """Drain the device, leave the communicator, free the stream and events, detach
        the control block (idempotent; errors of a failed device are ignored)."""
        if self._closed:
            return
        self._closed = True
        lib = self._lib
        lib.cudaDeviceSynchronize()  # a failed device returns at once
        for event in list(self._events):
            event.close()
        if self._comm is not None:
            lib.ncclCommDestroy(self._comm)
            self._comm = None
        if self._stream is not None:
            lib.cudaStreamDestroy(self._stream)
            self._stream = None
        if self._control_attached:
            lib.simxpu_attach_control(None, 0)
            self._control_attached = False
        self._keep.clear()

    def __enter__(self) -> SimDevice:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"SimDevice(rank={self.rank}, world={self.world}, {state})"
