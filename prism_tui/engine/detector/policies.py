"""The detector's policies: what a refit may do to the limit, when to fire, when to resolve.

Each reads its part of a :class:`~prism_tui.engine.detector.rule.DetectorRule`; the
streaming :class:`~prism_tui.engine.detector.streaming.Detector` asks them, in order, on
every judged iteration. Pure computation, no clock.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from prism_tui.engine.detector.calibration import FittedBaseline
from prism_tui.engine.detector.rule import DetectorRule

Transition = Literal["firing", "resolved"]


class LimitGuard:
    """Bounds a refit puts on the control limit (``refit_ucl_growth``,
    ``settle_keeps_limit``): a fault too mild to fire, or a regime's noisy first
    seconds, land in the data a refit learns from and must not widen the limit."""

    def __init__(self, rule: DetectorRule) -> None:
        self._rule = rule
        self._first_ucl: float | None = None
        self._before_regime: float | None = None

    def admit(self, baseline: FittedBaseline, *, settling: bool) -> FittedBaseline:
        """``baseline`` with its limit bounded; ``settling``: the regime's settling refit."""
        growth = self._rule.refit_ucl_growth
        if self._first_ucl is None:
            self._first_ucl = baseline.ucl
        elif growth is not None and baseline.ucl > self._first_ucl * growth:
            baseline = dataclasses.replace(baseline, ucl=self._first_ucl * growth)
        if (self._rule.settle_keeps_limit and settling and self._before_regime is not None
                and baseline.ucl > self._before_regime):
            baseline = dataclasses.replace(baseline, ucl=self._before_regime)
        return baseline

    def regime_starts(self, current: FittedBaseline | None) -> None:
        """A refit for a new workload regime: remember the limit in force before it."""
        self._before_regime = None if current is None else current.ucl


class FirePolicy:
    """When a clear state fires: the smoothed error above the limit, once a full window
    of errors has come in since the model was installed (the limit was calibrated on
    W-smoothed errors); or, within ``refire_within`` iterations of a resolve, one error
    above ``refire_level × UCL`` (a fault whose slow iterations come and go)."""

    def __init__(self, rule: DetectorRule) -> None:
        self._refire_within = rule.refire_within
        self._refire_level = rule.refire_level

    def fires(self, *, full: bool, error: float, smoothed: float, ucl: float,
              since_resolve: int) -> bool:
        """Whether this iteration fires (``full``: W errors smoothed since the fit)."""
        if not full:
            return False
        return smoothed > ucl or (since_resolve < self._refire_within
                                  and error > ucl * self._refire_level)


class ResolvePolicy:
    """When a firing state resolves: ``resolve_after`` iterations in a row below
    ``hysteresis × UCL`` (raw or smoothed error, per ``resolve_on``), or sooner,
    ``clear_after`` in a row whose own errors are below ``resolve_clear × UCL``, unless
    the alert is flapping (it fired within ``flap_within`` iterations of a resolve)."""

    def __init__(self, rule: DetectorRule, *, hysteresis: float, resolve_after: int) -> None:
        self._on_raw = rule.resolve_on == "raw"
        self._hysteresis = hysteresis
        self.resolve_after = resolve_after
        self._clear_level = rule.resolve_clear
        self._clear_after = rule.clear_after
        self._flap_within = rule.flap_within
        self._below = 0
        self._clear = 0
        self._flapping = False

    def fired(self, since_resolve: int) -> None:
        """The state fired ``since_resolve`` judged iterations after the last resolve."""
        self._flapping = since_resolve < self._flap_within
        self._below = 0
        self._clear = 0

    def resolves(self, *, error: float, smoothed: float, ucl: float) -> bool:
        """Whether this iteration, judged while firing, ends the alert."""
        if (error if self._on_raw else smoothed) >= ucl * self._hysteresis:
            self._below = 0
            self._clear = 0
            return False
        self._below += 1
        level = None if self._flapping else self._clear_level
        self._clear = self._clear + 1 if level is not None and error < ucl * level else 0
        if self._below >= self.resolve_after or (
                level is not None and self._clear >= self._clear_after):
            self._below = 0
            return True
        return False
