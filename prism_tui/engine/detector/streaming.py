"""The streaming detector: one per (target, phase), fed one decode iteration at a time.

Time is injected: every call carries the caller's ``t_ns``; nothing here reads a clock.
Fitting is synchronous; a runtime that must not block calls
:func:`~prism_tui.engine.detector.calibration.fit_baseline` in an executor with
:meth:`Detector.training_data` and hands the result to :meth:`Detector.install`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from prism_tui.engine.detector.calibration import FittedBaseline, fit_baseline
from prism_tui.engine.detector.features import (
    FEATURE_NAMES,
    FloatArray,
    Workload,
    features,
    is_nonpositive,
    valid_features,
    valid_latency,
)
from prism_tui.engine.detector.policies import (
    FirePolicy,
    LimitGuard,
    ResolvePolicy,
    Transition,
)
from prism_tui.engine.detector.rule import DetectorRule, get_rule

MIN_WARMUP = 200
"""The fewest training iterations a time-bound warm-up fits on (five folds of runs of 25
for the ``prism`` calibration need 50; 200 gives each fold's model 160 rows)."""

BELOW_MARGIN = 0.1
"""How far below a model's trained batch sizes or contexts a workload must lie to count
as below its range (towards a refit, and for the previous model's bound)."""





@dataclass(frozen=True)
class Verdict:
    """The detector's judgement of one iteration (after warm-up)."""

    t_ns: int
    observed_ms: float
    predicted_ms: float
    error: float
    smoothed: float
    ucl: float
    firing: bool
    transition: Transition | None = None
    novel: str | None = None
    """Why the workload is outside the model's training range (not judged), else None."""


_Sample = tuple[float, float, float, float, float, float]
"""A training row: the five features, then the latency in ms. One flat tuple of floats,
which the cyclic GC stops tracking at its first pass (a dataclass per row kept thousands
of objects in every full collection; a nested tuple needs a pass per level)."""


@dataclass
class Detector:
    """Per-(target, phase) streaming detector. Feed decode iterations one at a time.

    The first ``warmup`` valid iterations are training data; when they are in, the
    detector fits (``auto_fit=True``) or raises ``needs_fit`` and waits for
    :meth:`install` (iterations seen while waiting are added to the training data and
    yield no verdict). Afterwards each valid iteration yields a :class:`Verdict`.

    Firing and resolving follow the rule's policies (:class:`FirePolicy`,
    :class:`ResolvePolicy`); a refit's limit is bounded by :class:`LimitGuard`.

    Drift guard: iterations judged while firing, or whose own error exceeds the UCL, are
    kept out of :meth:`recent_training_data`; when an alert fires, the last ``window``
    accepted iterations (the lead-in that the smoothing lagged behind) are removed too.
    ``refit_due`` turns true every ``refit_every`` verdicts when enough recent data is in
    and no alert is firing; the runtime then fits in an executor and calls
    :meth:`install`.

    Invalid inputs (non-finite or non-positive latency, invalid workload, non-finite
    prediction) are skipped and counted in ``skipped`` by reason; they never raise.
    """

    rule: str | DetectorRule = "paper"
    warmup: int = 1000
    warmup_s: float = 0.0
    """The baseline is also ready once its training iterations span this many seconds
    (0: only ``warmup`` counts), provided there are ``min_warmup`` of them: a short run
    or a slow server gets a baseline before its faults, a fast one after ``warmup``."""
    min_warmup: int = MIN_WARMUP
    hysteresis: float | None = None
    """None: the rule's (0.8 for both named rules)."""
    resolve_after: int | None = None
    """None: the rule's."""
    auto_fit: bool = True
    refit_every: int = 20_000
    recent_capacity: int = 5_000
    seed: int = 0
    n_estimators: int = 200
    settle_ns: int = 0
    """Iterations ending within this long of the first one are not trained on (counted
    as skipped ``settling``): for a target started with the monitor, whose first seconds
    are not its normal."""
    fire_policy: Callable[[DetectorRule], FirePolicy] = FirePolicy
    """Builds the firing policy from the rule (a bench passes variants it compares)."""
    skipped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rule = get_rule(self.rule)
        self._hysteresis = (self._rule.hysteresis if self.hysteresis is None
                            else self.hysteresis)
        self._resolve_after = (self._rule.resolve_after if self.resolve_after is None
                               else self.resolve_after)
        if self.warmup < 2:
            raise ValueError("warmup must be >= 2 iterations")
        if not (0 <= self.warmup_s < math.inf):
            raise ValueError("warmup_s must be finite and >= 0")
        self._warmup_ns = int(self.warmup_s * 1e9)
        self._min_warmup = max(2, min(self.min_warmup, self.warmup))
        if not 0 < self._hysteresis <= 1:
            raise ValueError("hysteresis must be in (0, 1]")
        if self._resolve_after < 1:
            raise ValueError("resolve_after must be >= 1")
        # bounded: a runtime that never installs a model must not grow memory forever
        self._training: deque[_Sample] = deque(maxlen=4 * self.warmup)
        self._recent: deque[_Sample] = deque(maxlen=self.recent_capacity)
        self._errors: deque[float] = deque(maxlen=self._rule.window)
        self._median = self._rule.smoothing == "median"
        self._since_fit_errors = 0  # errors smoothed since the model was installed
        self._baseline: FittedBaseline | None = None
        self._previous: FittedBaseline | None = None  # see DetectorRule.bound_by_previous
        self._guard = LimitGuard(self._rule)
        self._fire = self.fire_policy(self._rule)
        self._resolve = ResolvePolicy(self._rule, hysteresis=self._hysteresis,
                                      resolve_after=self._resolve_after)
        self._firing = False
        self._since_resolve = 1 << 62  # judged iterations since the last resolve
        self._novel = 0
        self._over_ceiling_since: int | None = None  # first novel step over the ceiling
        self._novel_errors: deque[float] = deque(maxlen=self._resolve_after)
        """Errors of the novel steps seen in a row while firing (see novelty_ceiling)."""
        self._settle = False
        self._since_fit = 0
        self._first_ns: int | None = None
        self._trained_since_ns: int | None = None  # the first training iteration's end
        self._trained_until_ns = 0  # the latest one's
        self.n_verdicts = 0

    # ---- state

    @property
    def fitted(self) -> bool:
        """Whether a model is installed."""
        return self._baseline is not None

    @property
    def baseline(self) -> FittedBaseline | None:
        """The installed model and UCL, if any."""
        return self._baseline

    @property
    def firing(self) -> bool:
        """Whether an alert is currently firing."""
        return self._firing

    @property
    def ucl(self) -> float | None:
        """The current control limit, or None before the first fit."""
        return None if self._baseline is None else self._baseline.ucl

    @property
    def rule_spec(self) -> DetectorRule:
        """The resolved rule (pass it to :func:`fit_baseline` for a refit)."""
        return self._rule

    @property
    def training_rows(self) -> int:
        """Warm-up rows collected so far (the dashboard's progress; no array copy)."""
        return len(self._training)

    @property
    def warmed_up(self) -> bool:
        """Enough training data: ``warmup`` iterations, or ``min_warmup`` spanning
        ``warmup_s`` seconds, whichever comes first."""
        n = len(self._training)
        if n >= self.warmup:
            return True
        return (self._warmup_ns > 0 and n >= self._min_warmup
                and self._trained_since_ns is not None
                and self._trained_until_ns - self._trained_since_ns >= self._warmup_ns)

    @property
    def needs_fit(self) -> bool:
        """Warm-up complete but no model installed yet."""
        return self._baseline is None and self.warmed_up

    @property
    def refit_due(self) -> bool:
        """A background refit on :meth:`recent_training_data` is due."""
        if self._baseline is None:
            return False
        if self._novel >= self._rule.novelty_refit:
            # a new workload regime: learn it now, not in refit_every; even while firing,
            # since novel iterations leave the state as it is and would keep it firing
            return True
        if self._firing:
            return False
        if self._settle and self._since_fit >= 2 * self._rule.novelty_refit:
            return True
        return self._since_fit >= self.refit_every and len(self._recent) >= self.warmup

    @property
    def novel_seen(self) -> int:
        """Novel-workload iterations since the last fit (see ``novelty_margin``)."""
        return self._novel

    def training_data(self) -> tuple[FloatArray, FloatArray]:
        """(features (n, 5), latencies_ms (n,)) collected during warm-up (a copy)."""
        return _arrays(self._training)

    def recent_training_data(self) -> tuple[FloatArray, FloatArray]:
        """Recent non-alerting iterations for a background refit (a copy).

        After a new workload regime (``novelty_refit`` novel iterations) only the last
        ``warmup`` of them: the new regime is then a tenth of the data, not a fiftieth,
        and the model fits it instead of averaging it away.
        """
        if self._novel >= self._rule.novelty_refit or self._settle:
            return _arrays(list(self._recent)[-self.warmup:])
        return _arrays(self._recent)

    # ---- fitting

    def fit_now(self) -> FittedBaseline:
        """Fit synchronously on the warm-up data and install the result."""
        x, y = self.training_data()
        fb = fit_baseline(x, y, self._rule, seed=self.seed, n_estimators=self.n_estimators)
        self.install(fb)
        return fb

    def refit_now(self) -> FittedBaseline:
        """Refit synchronously on :meth:`recent_training_data` and install the result."""
        x, y = self.recent_training_data()
        fb = fit_baseline(x, y, self._rule, seed=self.seed, n_estimators=self.n_estimators)
        self.install(fb)
        return fb

    def install(self, baseline: FittedBaseline) -> None:
        """Install a model fitted elsewhere (for example in an executor)."""
        baseline = self._guard.admit(baseline, settling=self._settle)
        # a refit for a new regime is followed by one more once the regime settled
        regime = self._novel >= self._rule.novelty_refit
        if regime and not self._settle:
            self._guard.regime_starts(self._baseline)
        self._settle = regime
        self._previous = (self._baseline if self._settle and self._rule.bound_by_previous
                          else None)
        self._baseline = baseline
        self._since_fit = 0
        self._novel = 0
        self._over_ceiling_since = None
        self._training.clear()
        # errors against the previous model say nothing about this one
        self._errors.clear()
        self._since_fit_errors = 0

    # ---- streaming

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def observe(self, t_ns: int, latency_ms: float, workload: Workload) -> Verdict | None:
        """Judge one decode iteration; None during warm-up or when skipped."""
        lat = valid_latency(latency_ms)
        if lat is None:
            self._skip("nonpositive_latency" if is_nonpositive(latency_ms) else "bad_latency")
            return None
        try:
            x = features(workload)
            valid = valid_features(x)
        except (TypeError, ValueError, OverflowError):
            valid = False
        if not valid:
            self._skip("invalid_workload")
            return None
        if self._baseline is None:
            if self._first_ns is None:
                self._first_ns = t_ns
            if t_ns - self._first_ns < self.settle_ns:
                self._skip("settling")
                return None
            self._training.append((*x, lat))
            if self._trained_since_ns is None:
                self._trained_since_ns = t_ns
            self._trained_until_ns = max(self._trained_until_ns, t_ns)
            if self.auto_fit and self.warmed_up:
                self.fit_now()
            return None
        predicted = self._baseline.model.predict_one(x)
        return self._judge(t_ns, lat, predicted, x)

    def observe_predicted(
        self,
        t_ns: int,
        latency_ms: float,
        predicted_ms: float,
        workload: Workload | None = None,
    ) -> Verdict | None:
        """Judge an iteration whose prediction was computed elsewhere (batched).

        Requires an installed model (for its UCL). ``workload`` is only needed for the
        drift guard's recent training data.
        """
        if self._baseline is None:
            self._skip("no_model")
            return None
        lat = valid_latency(latency_ms)
        if lat is None:
            self._skip("nonpositive_latency" if is_nonpositive(latency_ms) else "bad_latency")
            return None
        x = features(workload) if workload is not None and workload.is_valid() else None
        return self._judge(t_ns, lat, predicted_ms, x)

    def _judge(
        self,
        t_ns: int,
        lat: float,
        predicted: float,
        x: tuple[float, float, float, float, float] | None,
    ) -> Verdict | None:
        assert self._baseline is not None
        if not math.isfinite(predicted):
            self._skip("bad_prediction")
            return None
        ucl = self._baseline.ucl
        previous = self._previous
        if previous is not None and x is not None and previous.below_range(x, BELOW_MARGIN):
            bound = previous.model.predict_one(x)
            if math.isfinite(bound):
                predicted = max(predicted, bound)
        err = max(0.0, (lat - predicted) / lat)
        margin = self._rule.novelty_margin
        novel = (self._baseline.novelty(x, margin)
                 if margin is not None and x is not None else None)
        ceiling = self._rule.novelty_ceiling
        if novel is not None and ceiling is not None and lat > ceiling * predicted:
            if self._over_ceiling_since is None:
                self._over_ceiling_since = t_ns
            if t_ns - self._over_ceiling_since < self._rule.novelty_hold_s * 1e9:
                # slower than the extrapolated load explains: judged against the ceiling,
                # and neither counted nor kept towards the refit that would learn it
                predicted *= ceiling
                err = (lat - predicted) / lat
                novel = None
        if novel is not None and x is not None:
            # outside what the model learned: no evidence of a fault, kept for the refit;
            # the smoothed error stands still. With a ceiling, a step under it while
            # firing may end the alert (the fault that grew the batch is over); the
            # smoothing window then starts from such steps, not from the fault's errors.
            self._novel += 1
            self._recent.append((*x, lat))
            self._since_fit += 1
            self.n_verdicts += 1
            transition: Transition | None = None
            if self._firing and ceiling is not None:
                self._novel_errors.append(err)
                if self._resolve.resolves(error=err, smoothed=err, ucl=ucl):
                    self._firing = False
                    self._since_resolve = 0
                    transition = "resolved"
                    self._errors.clear()
                    self._errors.extend(self._novel_errors)
            return Verdict(t_ns, lat, predicted, err, self._smoothed_now(), ucl,
                           self._firing, transition, novel)
        if margin is not None and x is not None and self._baseline.below_range(x, BELOW_MARGIN):
            # judged (the error is conservative) and counted towards a refit that learns it
            self._novel += 1
        smoothed = self._smooth(err)
        self._novel_errors.clear()
        transition = None
        if not self._firing:
            # the limit was calibrated on errors smoothed over W: a mean of fewer (the first
            # verdicts after a fit) is noisier and is not compared with it
            full = self._since_fit_errors >= self._rule.window
            if self._fire.fires(full=full, error=err, smoothed=smoothed, ucl=ucl,
                                since_resolve=self._since_resolve):
                self._firing = True
                self._resolve.fired(self._since_resolve)
                transition = "firing"
                for _ in range(min(self._rule.window, len(self._recent))):
                    self._recent.pop()  # the lead-in the smoothing lagged behind
        elif self._resolve.resolves(error=err, smoothed=smoothed, ucl=ucl):
            self._firing = False
            self._since_resolve = 0
            transition = "resolved"
            if self._rule.resolve_on == "raw":
                # the window still holds the fault's errors and would fire again at
                # once: keep only the iterations that ended the alert
                recent = list(self._errors)[-self._resolve_after:]
                self._errors.clear()
                self._errors.extend(recent)
        if (x is not None and not self._firing and transition is None
                and err <= ucl):
            self._recent.append((*x, lat))
        self._since_fit += 1
        if transition != "resolved":
            self._since_resolve += 1
        self.n_verdicts += 1
        return Verdict(t_ns, lat, predicted, err, smoothed, ucl, self._firing, transition)

    def _smoothed_now(self) -> float:
        """The smoothed error of the window as it stands (see ``DetectorRule.smoothing``)."""
        n = len(self._errors)
        if n == 0:
            return 0.0
        if self._median:
            ordered = sorted(self._errors)
            half = n // 2
            return ordered[half] if n % 2 else (ordered[half - 1] + ordered[half]) / 2
        return sum(self._errors) / n

    def _smooth(self, err: float) -> float:
        self._since_fit_errors += 1
        self._errors.append(err)
        return self._smoothed_now()


def _arrays(samples: Sequence[_Sample] | deque[_Sample]) -> tuple[FloatArray, FloatArray]:
    if not samples:
        return np.zeros((0, len(FEATURE_NAMES))), np.zeros(0)
    # one conversion of the whole (n, 6) block: slicing each sample first took 3x as
    # long, on the loop, at every refit (bench/monitor_cpu.py)
    rows = np.array(samples, dtype=np.float64)
    return rows[:, :5].copy(), rows[:, 5].copy()

