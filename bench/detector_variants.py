"""Detector variants explored and not adopted, kept for the benches' comparisons.

The product's rules (``prism_tui.engine.detector.RULES``) hold only what ``paper`` and
``prism`` use; what the benches compare them with is built here: ``prism-gbdt-fast-fire``,
the ``prism`` rule with a plain GBDT on log-latency, a mean of 5, no event filter (every
warm-up row calibrates), a 0.22 floor and *fast firing* (two raw errors in a row above
1.3 × UCL fire before the smoothed error does), the last as a firing policy of its own.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prism_tui.engine.detector import RULES, DetectorRule, FirePolicy


class FastFire(FirePolicy):
    """``count`` raw errors in a row above ``level × UCL`` fire at once (once W errors
    have come in since the fit), besides the rule's own firing; within the rule's
    ``refire_within`` of a resolve, one error above both levels does."""

    def __init__(self, rule: DetectorRule, count: int, level: float) -> None:
        super().__init__(rule)
        self._count, self._level = count, level
        self._refire_within, self._refire_level = rule.refire_within, rule.refire_level
        self._hot = 0

    def fires(self, *, full: bool, error: float, smoothed: float, ucl: float,
              since_resolve: int) -> bool:
        """The rule's firing, or ``count`` hot errors in a row (see the class)."""
        self._hot = self._hot + 1 if full and error > ucl * self._level else 0
        need = self._count
        if since_resolve < self._refire_within and error > ucl * self._refire_level:
            need = 1
        if (full and smoothed > ucl) or (need > 0 and self._hot >= need):
            self._hot = 0
            return True
        return False


def fast_fire(count: int, level: float) -> Callable[[DetectorRule], FirePolicy]:
    """A ``Detector(fire_policy=...)`` factory for :class:`FastFire`."""
    return lambda rule: FastFire(rule, count, level)


PRISM_GBDT_FAST_FIRE = dataclasses.replace(
    RULES["prism"], name="prism-gbdt-fast-fire", window=5, smoothing="mean",
    event_factor=None, ucl_floor=0.22, form="gbdt")
"""``prism-gbdt-fast-fire``: GBDT, mean of 5; fires with :data:`PRISM_GBDT_FAST_FIRE_POLICY`."""

PRISM_GBDT_FAST_FIRE_POLICY = fast_fire(2, 1.3)
"""Its firing: two raw errors in a row above 1.3 × UCL, besides the smoothed error."""
