"""Alert episodes: one page when an anomaly is established, one resolve when it is over.

The detector judges every iteration (its ``firing`` state is what per-iteration scoring
reads); a fault that lets a normal iteration through now and then, or a host that stalls
a sub-millisecond loop for a moment, makes that state flap. An :class:`EpisodeGate` turns
the per-iteration state into episodes, as Prometheus' ``for:`` and Alertmanager's resolve
timeout do for rules, but counted in iterations and milliseconds of the target's own
clock: an episode opens once the state has been firing, without a break, for at least
``open_iterations`` iterations *and* ``open_ms`` milliseconds, and closes once it has been
clear for at least ``close_iterations`` *and* ``close_ms``. Firing again while a close is
pending keeps the episode open once that firing has itself held for the opening holds;
a shorter blip only pauses the count of clear iterations (a sub-millisecond loop on a
busy host fires now and then on normal load: blips that could not open an episode must
not hold one open forever). Pure computation with an injected clock (the iterations'
``t_ns``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EpisodeChange = Literal["opened", "closed"]


@dataclass(frozen=True)
class EpisodeHolds:
    """How long the per-iteration state must hold before an episode opens or closes.

    Attributes:
        open_iterations: consecutive firing iterations before an episode opens.
        open_ms: ... and milliseconds from the first of them (both must be reached: a
            sub-millisecond loop needs the time, a slow one the count).
        close_iterations: consecutive clear iterations before an open episode closes.
        close_ms: ... and milliseconds from the first of them. Longer than the gaps a
            flapping fault leaves, so that one fault pages once.
    """

    open_iterations: int = 3
    open_ms: float = 500.0
    close_iterations: int = 10
    close_ms: float = 5000.0

    def __post_init__(self) -> None:
        if self.open_iterations < 1 or self.close_iterations < 1:
            raise ValueError("episode holds need at least 1 iteration to open and to close")
        if not (0 <= self.open_ms < float("inf") and 0 <= self.close_ms < float("inf")):
            raise ValueError("episode holds in ms must be finite and >= 0")


class EpisodeGate:
    """Per-iteration firing states in, episode openings and closings out."""

    def __init__(self, holds: EpisodeHolds | None = None) -> None:
        self.holds = holds or EpisodeHolds()
        self.open = False
        self.started_ns: int | None = None
        """When the open (or pending) episode's first firing iteration ended."""
        self._run = 0  # iterations in a row in the state opposite to ``open``
        self._run_since_ns = 0
        self._relapse = 0  # while open and closing: firing iterations in a row
        self._relapse_since_ns = 0

    def observe(self, t_ns: int, firing: bool) -> EpisodeChange | None:
        """Feed one iteration's state at ``t_ns``; an episode change, or None."""
        h = self.holds
        if self.open and self._run:  # a close is pending
            if firing:
                if self._relapse == 0:
                    self._relapse_since_ns = t_ns
                self._relapse += 1
                if self._relapse < h.open_iterations or \
                        (t_ns - self._relapse_since_ns) / 1e6 < h.open_ms:
                    return None  # a blip, so far: the clear count waits
                self._run = self._relapse = 0  # firing again, established: stays open
                return None
            self._relapse = 0
        if firing != self.open:
            if self._run == 0:
                self._run_since_ns = t_ns
                if not self.open:
                    self.started_ns = t_ns
            self._run += 1
        else:
            self._run = 0
            if not self.open:
                self.started_ns = None
            return None
        held_ms = (t_ns - self._run_since_ns) / 1e6
        if not self.open and self._run >= h.open_iterations and held_ms >= h.open_ms:
            self.open, self._run = True, 0
            return "opened"
        if self.open and self._run >= h.close_iterations and held_ms >= h.close_ms:
            self.open, self._run = False, 0
            return "closed"
        return None
