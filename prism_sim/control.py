"""The fault control block: a page of POSIX shared memory the orchestrator writes and the
rank processes read.

The orchestrator creates it (:meth:`ControlBlock.create`) before starting the ranks and
flips faults on and off with :meth:`ControlBlock.set`; each rank's fake runtime maps it
read-only (``SimDevice(control=name)``) and reads its own slot every time its device
thread starts a work item, so a change takes effect on the next kernel, copy or
collective. ``gc_storm`` and ``gil_contention`` are not read by the runtime: the Python
rank loop polls them with :meth:`ControlBlock.get`.

Layout (fixed, little-endian, mirrored in ``prism_sim/runtime/simxpu.h``), 1032 bytes at
``/dev/shm/<name>``::

    offset 0   uint32 magic  = 0x55505853 (the bytes "SXPU")
    offset 4   uint32 nranks (1..16)
    offset 8   struct simxpu_rank_ctl rank[16], 64 bytes each:
      +0  double speed           device speed factor, 1.0 normal, 0.5 = half speed
      +8  double link            interconnect factor (collectives and memcpy), 1.0 normal
      +16 double preempt         share of the device taken by competing work, 0..0.9
      +24 int32  gc_storm        intensity for the Python rank loop, 0 = off
      +28 int32  gil_contention  intensity for the Python rank loop, 0 = off
      +32 double reserved[4]

Ownership: the process that created the block unlinks it (the context manager of
:meth:`ControlBlock.create` does); attached processes only close their mapping.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from types import TracebackType

from prism_sim.errors import SimError

MAGIC = 0x55505853
MAX_RANKS = 16
HEADER = struct.Struct("<II")
RANK = struct.Struct("<dddii4d")
SIZE = HEADER.size + MAX_RANKS * RANK.size  # 1032
SHM_DIR = "/dev/shm"

_FLOAT_FIELDS = ("speed", "link", "preempt")
_INT_FIELDS = ("gc_storm", "gil_contention")
_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")


@dataclass(frozen=True)
class RankControl:
    """A snapshot of one rank's slot.

    Attributes:
        speed: device speed factor (1.0 normal, 0.5 = every kernel takes twice as long).
        link: interconnect factor (1.0 normal, 0.5 = collectives and copies take twice
            as long).
        preempt: share of the device taken by competing work, 0..0.9 (kernels take
            ``1 / (1 - preempt)`` times as long).
        gc_storm: GC storm intensity for the rank's Python loop (0 = off).
        gil_contention: GIL contention intensity for the rank's Python loop (0 = off).
    """

    speed: float = 1.0
    link: float = 1.0
    preempt: float = 0.0
    gc_storm: int = 0
    gil_contention: int = 0


NORMAL = RankControl()


def _check_name(name: str) -> str:
    name = name[1:] if name.startswith("/") else name
    if not _NAME.fullmatch(name):
        raise ValueError(f"control block name {name!r}: use 1-200 of A-Z a-z 0-9 . _ -")
    return name


def _check_value(field: str, value: float | int) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field}: expected a number, got {type(value).__name__}")
    if field in _INT_FIELDS:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{field}: expected an integer intensity, got {value}")
        ivalue = int(value)
        if not 0 <= ivalue < 2**31:
            raise ValueError(f"{field}: must be >= 0, got {ivalue}")
        return ivalue
    fvalue = float(value)
    if not math.isfinite(fvalue):
        raise ValueError(f"{field}: must be finite, got {fvalue}")
    if field == "preempt":
        if not 0.0 <= fvalue <= 0.9:
            raise ValueError(f"preempt: must be within 0..0.9, got {fvalue}")
    elif fvalue <= 0.0:
        raise ValueError(f"{field}: must be > 0, got {fvalue}")
    return fvalue


class ControlBlock:
    """The shared fault control block of one simulated server (see the module doc).

    Use :meth:`create` (orchestrator) or :meth:`attach` (anyone else), not the
    constructor. As a context manager a created block is closed and unlinked on exit, an
    attached one only closed.
    """

    def __init__(self, name: str, mapping: mmap.mmap, nranks: int, *, owner: bool) -> None:
        self.name = name
        self.nranks = nranks
        self._mm: mmap.mmap | None = mapping
        self._owner = owner
        self._unlinked = False

    @property
    def path(self) -> str:
        """The file behind the block (``/dev/shm/<name>``)."""
        return os.path.join(SHM_DIR, self.name)

    @classmethod
    def create(cls, name: str, nranks: int) -> ControlBlock:
        """Create ``/dev/shm/<name>`` for ``nranks`` ranks, every rank normal.

        Raises:
            ValueError: a bad name or rank count.
            SimError: the block already exists or cannot be created.
        """
        name = _check_name(name)
        if not 1 <= nranks <= MAX_RANKS:
            raise ValueError(f"nranks must be within 1..{MAX_RANKS}, got {nranks}")
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise SimError(f"control block {path} already exists (a stale run? remove it)"
                           ) from None
        except OSError as exc:
            raise SimError(f"cannot create control block {path}: {exc.strerror}") from None
        try:
            os.ftruncate(fd, SIZE)
            mapping = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise SimError(f"cannot map control block {path}: {exc.strerror}") from None
        os.close(fd)
        for rank in range(MAX_RANKS):
            RANK.pack_into(mapping, HEADER.size + rank * RANK.size,
                           1.0, 1.0, 0.0, 0, 0, 0.0, 0.0, 0.0, 0.0)
        HEADER.pack_into(mapping, 0, MAGIC, nranks)
        return cls(name, mapping, nranks, owner=True)

    @classmethod
    def attach(cls, name: str) -> ControlBlock:
        """Map an existing block read-write.

        Raises:
            SimError: no such block, or the file is not a control block.
        """
        name = _check_name(name)
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise SimError(f"no control block {path}") from None
        except OSError as exc:
            raise SimError(f"cannot open control block {path}: {exc.strerror}") from None
        try:
            if os.fstat(fd).st_size < SIZE:
                raise SimError(f"{path} is not a control block (too small)")
            mapping = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        magic, nranks = HEADER.unpack_from(mapping, 0)
        if magic != MAGIC or not 1 <= nranks <= MAX_RANKS:
            mapping.close()
            raise SimError(f"{path} is not a control block (magic {magic:#x}, nranks {nranks})")
        return cls(name, mapping, nranks, owner=False)

    def _mapping(self) -> mmap.mmap:
        if self._mm is None:
            raise SimError(f"control block {self.name} is closed")
        return self._mm

    def _offset(self, rank: int) -> int:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.nranks:
            raise ValueError(f"rank must be within 0..{self.nranks - 1}, got {rank!r}")
        return HEADER.size + rank * RANK.size

    def get(self, rank: int) -> RankControl:
        """A snapshot of ``rank``'s slot."""
        speed, link, preempt, gc_storm, gil, *_ = RANK.unpack_from(self._mapping(),
                                                                   self._offset(rank))
        return RankControl(speed, link, preempt, gc_storm, gil)

    def set(self, rank: int, **fields: float | int) -> None:
        """Change some fields of ``rank``'s slot, e.g. ``set(1, speed=0.5)``.

        Raises:
            ValueError: an unknown field or a value out of range (speed and link > 0,
                preempt within 0..0.9, intensities integers >= 0).
        """
        offset = self._offset(rank)
        mapping = self._mapping()
        known = _FLOAT_FIELDS + _INT_FIELDS
        checked = {}
        for field, value in fields.items():
            if field not in known:
                raise ValueError(f"unknown control field {field!r} (known: {', '.join(known)})")
            checked[field] = _check_value(field, value)
        for field, value in checked.items():
            if field in _FLOAT_FIELDS:
                struct.pack_into("<d", mapping, offset + 8 * _FLOAT_FIELDS.index(field), value)
            else:
                struct.pack_into("<i", mapping, offset + 24 + 4 * _INT_FIELDS.index(field),
                                 value)

    def reset(self, rank: int) -> None:
        """Put ``rank`` back to normal (every fault off)."""
        self.set(rank, speed=NORMAL.speed, link=NORMAL.link, preempt=NORMAL.preempt,
                 gc_storm=NORMAL.gc_storm, gil_contention=NORMAL.gil_contention)

    def reset_all(self) -> None:
        """Put every rank back to normal."""
        for rank in range(self.nranks):
            self.reset(rank)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._mm is None

    def close(self) -> None:
        """Unmap the block (idempotent); the name stays until :meth:`unlink`."""
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    def unlink(self) -> None:
        """Remove ``/dev/shm/<name>`` (idempotent; mappings stay valid until closed)."""
        if self._unlinked:
            return
        self._unlinked = True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> ControlBlock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
        if self._owner:
            self.unlink()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"ControlBlock({self.name!r}, nranks={self.nranks}, {state})"
