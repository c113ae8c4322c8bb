"""What the dashboard may ask of the engine besides views: the process picker and exports.

The engine side implements :class:`EngineControl`; the UI calls every method from a worker
*thread* (never on the event loop), so implementations may block (reading ``/proc``,
parsing ELF files, writing a trace). One that must touch state owned by the loop can hand
the work over with ``asyncio.run_coroutine_threadsafe(coro, loop).result()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class CandidateLike(Protocol):
    """What the picker reads of a candidate (the engine may use its own dataclass)."""

    @property
    def pid(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def cmdline(self) -> str: ...
    @property
    def watched(self) -> bool: ...


@dataclass(frozen=True)
class Candidate:
    """A process the picker offers: an inference-like command line, and whether it is watched."""

    pid: int
    name: str
    cmdline: str
    watched: bool


@runtime_checkable
class EngineControl(Protocol):
    """Actions on the running engine (called from a worker thread; may block)."""

    def candidates(self) -> Sequence[CandidateLike]:
        """Inference-like processes found by command line, watched ones included."""
        ...

    def attach(self, pid: int) -> str | None:
        """Start watching ``pid``; returns None on success or one error line for the user."""
        ...

    def detach(self, pid: int) -> None:
        """Stop watching ``pid`` (its probes are detached); unknown pids are ignored."""
        ...

    def export_trace(self, seconds: float, path: str) -> str:
        """Write the last ``seconds`` of spans as Chrome/Perfetto trace JSON; returns the path."""
        ...
