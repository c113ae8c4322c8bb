"""What the dashboard may ask of the engine besides views: the process picker and exports.

The engine side implements :class:`EngineControl`; the UI calls every method from a worker
*thread* (never on the event loop), so implementations may block (reading ``/proc``,
parsing ELF files, writing a trace). One that must touch state owned by the loop can hand
the work over with ``asyncio.run_coroutine_threadsafe(coro, loop).result()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from prism_tui.engine.view import Candidate

__all__ = ["Candidate", "EngineControl"]


@runtime_checkable
class EngineControl(Protocol):
    """Actions on the running engine (called from a worker thread; may block)."""

    def candidates(self) -> Sequence[Candidate]:
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
