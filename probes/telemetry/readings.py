"""What every sampler returns: a :class:`Reading` holds a value or the reason it is missing.

Shared by the NVML, ``/proc`` and host samplers, with the reasons they have in common and
the few helpers they use to read ``/proc`` and ``/sys`` files (docs/architecture.md
§Rules 4: failures are values).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

Clock = Callable[[], int]
"""A monotonic clock in nanoseconds; ``time.monotonic_ns`` unless a test injects another."""

FIRST_SAMPLE = "first sample"
PROCESS_EXITED = "process exited"
PERMISSION_DENIED = "permission denied"
NOT_EXPOSED = "not exposed by this kernel"
NOT_SUPPORTED = "not supported on this GPU"
NO_NVML = "no NVIDIA driver (libnvidia-ml.so.1 not found)"


@dataclass(frozen=True)
class Reading:
    """One metric that may be missing: ``value`` with its ``unit``, or ``None`` and a ``reason``.

    The invariant ``(value is None) == (reason is not None)`` is checked on construction.
    """

    value: float | None
    unit: str
    reason: str | None = None

    def __post_init__(self) -> None:
        """Reject a value with a reason, or a missing value without one (a programming error)."""
        if (self.value is None) != (self.reason is not None):
            raise ValueError(f"Reading needs exactly one of value and reason, got {self!r}")

    @classmethod
    def of(cls, value: float, unit: str) -> Reading:
        """A present reading."""
        return cls(value, unit, None)

    @classmethod
    def missing(cls, unit: str, reason: str) -> Reading:
        """A missing reading and why it is missing."""
        return cls(None, unit, reason)

    @property
    def ok(self) -> bool:
        """True when the reading has a value."""
        return self.value is not None

    def __str__(self) -> str:
        """Short human form for logs and the UI: ``1410 MHz`` or ``n/a (permission denied)``."""
        if self.value is None:
            return f"n/a ({self.reason})"
        shown = f"{self.value:.1f}" if isinstance(self.value, float) else str(self.value)
        return f"{shown} {self.unit}".rstrip()


def readings_of(sample: Any) -> dict[str, Reading]:
    """Every :class:`Reading` field of a sample dataclass by field name, for generic display."""
    return {f.name: v for f in fields(sample) if isinstance(v := getattr(sample, f.name), Reading)}


def delta(cur: int | None, cur_reason: str | None, prev: int | None, unit: str) -> Reading:
    """Reading of ``cur - prev`` for a cumulative counter; ``prev is None`` means no baseline."""
    if cur is None:
        return Reading.missing(unit, cur_reason or "unavailable")
    if prev is None:
        return Reading.missing(unit, FIRST_SAMPLE)
    if cur < prev:
        return Reading.missing(unit, "counter went backwards")
    return Reading.of(cur - prev, unit)


def sum_present(readings: Iterable[Reading]) -> Reading:
    """Sum of the present readings; missing with the first reason when none is present."""
    items = list(readings)
    present = [r.value for r in items if r.value is not None]
    unit = items[0].unit if items else ""
    if present:
        return Reading.of(sum(present), unit)
    return Reading.missing(unit, items[0].reason if items and items[0].reason else "no threads")




def read_text(path: str) -> str:
    """A ``/proc`` or ``/sys`` file's text (raises ``OSError``; callers turn it into a reason)."""
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()


def os_reason(err: OSError, gone: str = PROCESS_EXITED) -> str:
    """Reason text for a failed /proc or /sys read; ``gone`` is the text for a missing file."""
    if isinstance(err, (FileNotFoundError, ProcessLookupError)):
        return gone
    if isinstance(err, PermissionError):
        return PERMISSION_DENIED
    return f"read failed: {err.strerror or err}"
