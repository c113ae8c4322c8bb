"""The two named detector rules: ``paper`` (the reference) and ``prism`` (the default).

A rule is configuration only, grouped by the policy that reads it: the model
(:mod:`.model`), the control limit (:mod:`.calibration` and :class:`.policies.LimitGuard`),
the workload regime (novelty and refits), firing (:class:`.policies.FirePolicy`) and
resolving (:class:`.policies.ResolvePolicy`). Every field is used by one of the two
named rules; variants explored and not adopted live in bench/ (docs/detection.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class DetectorRule:
    """How the model is trained, the control limit set, and alerts fired and resolved.

    Attributes:
        name: label used in reports.

        target: (model) ``"linear"`` or ``"log"`` latency.
        form: (model) ``"gbdt"`` (the paper's) or ``"robust"`` (physical shape times a
            median GBDT, :class:`~prism_tui.engine.detector.model.BaselineModel`).
        min_samples_leaf: (model) fewest rows in a leaf of the trees. With 1 (the
            paper), a regime refit's model, which holds about a hundred rows of the new
            regime, learnt single odd rows and predicted the regime's later iterations
            11-15 % high; a fault shortly after the step then stayed below the limit.

        calibration: (limit) ``"train"`` takes the UCL's errors from the training set
            itself (the paper); ``"blocks"`` cuts the data into runs of ``5·W``
            iterations in arrival order, deals them to ``folds`` folds in turn, and takes
            each fold's errors from a model fitted on the others, so every row gets an
            out-of-sample error and runs of slow iterations stay runs, while every
            workload regime of the period is in every fold's training data.
        folds: (limit) see ``calibration``.
        ucl_method: (limit) ``"sigma"`` = mean + ``k_sigma``·std (the paper);
            ``"smoothed_quantile"`` = the ``quantile`` of the calibration errors smoothed
            like the live ones (the quantity the UCL is compared with), in arrival order.
        k_sigma: (limit) see ``ucl_method``.
        quantile: (limit) see ``ucl_method``.
        ucl_scale: (limit) the calibrated limit is multiplied by this before floor and
            cap (a margin for noise the warm-up did not show).
        ucl_floor: (limit) lower bound of the UCL.
        ucl_cap: (limit) upper bound of the UCL (the paper's 0.5).
        event_factor: (limit) when set, the calibration leaves out the warm-up's
            *events*: iterations whose own error exceeds ``event_factor`` times the
            ``event_quantile`` quantile of the errors, the largest ``event_budget`` of
            the rows at most. Events are what the detector exists to see (on the paper's
            vLLM data, runs of 300-430 ms prefill stalls among 30-90 ms decode steps); a
            limit calibrated to tolerate them hides every slowdown smaller than them.
            None: every row counts.
        event_quantile: (limit) see ``event_factor``.
        event_budget: (limit) see ``event_factor``.
        ucl_skip_episodes: (limit) with ``"smoothed_quantile"``, up to this many one-off
            episodes are removed before the quantile is taken: the stretch of
            ``episode_fraction`` of the calibration rows centred on the largest smoothed
            error, when that error is at least ``episode_outlier`` times the quantile of
            the rest (a server's start-up, one stall of the host). 0: never.
        episode_fraction: (limit) the length of one removed episode, as a fraction of
            the rows (at least ``5·W`` rows).
        episode_outlier: (limit) how far above the rest's quantile an episode must peak
            to be removed.
        refit_ucl_growth: (limit) a refit may lower the limit but not raise it above the
            first (warm-up) limit times this (None: no bound): a fault too mild to fire
            lands in the data a refit learns from and would widen the limit.
        settle_keeps_limit: (limit) the refit that follows a regime's refit once the
            regime settled may not raise the limit above the one in force before the
            regime (its calibration holds the regime's first, noisiest seconds).

        novelty_margin: (regime) when set, an iteration whose batch size or context lies
            above the trained range by more than this fraction is *novel*: not judged,
            kept, and after ``novelty_refit`` such iterations the model is refitted to
            cover it. A workload *below* the trained range is judged (conservatively)
            and learnt by the same refit. None: judge everything (the paper).
        novelty_refit: (regime) see ``novelty_margin``.
        novelty_ceiling: (regime) when set, a novel iteration slower than this many
            times the model's prediction (which the robust form extrapolates along the
            step's physical shape) is judged against that ceiling instead of learnt: a
            fault that queues requests and grows the batch must not become the new load's
            baseline; and while an alert fires, novel iterations under the ceiling count
            towards resolving it (the fault that grew the batch is over). None: every
            novel iteration is learnt and leaves the alert state as it is.
        novelty_hold_s: (regime) once novel iterations have run over the ceiling for this
            many seconds, they are learnt after all: a new load whose cost outgrows the
            extrapolation pages once, then becomes the baseline.
        range_quantile: (regime) the workload range a model counts as trained runs from
            this quantile of its rows' batch sizes and contexts to ``1 -`` it (0: min to
            max), so a few stray rows do not stretch it.
        bound_by_previous: (regime) after a refit for a new regime and until the refit
            that follows once it settled, an iteration below the previous model's
            trained range is judged against the larger of the two models' predictions.

        window: (fire) smoothing window W in iterations.
        smoothing: (fire) ``"mean"`` of the last W errors (the paper) or their
            ``"median"``, which ignores up to ⌊W/2⌋ unexplained iterations of the window.
            The calibration smooths alike.
        refire_within: (fire) for this many judged iterations after a resolve, one
            iteration whose own error exceeds ``refire_level × UCL`` fires again: a fault
            whose slow iterations come and go resolves on a few normal ones and is back
            at the next slow one.
        refire_level: (fire) see ``refire_within``.

        hysteresis: (resolve) a firing alert resolves once the error (per
            ``resolve_on``) stays below ``hysteresis × UCL`` ...
        resolve_after: (resolve) ... for this many consecutive iterations.
        resolve_on: (resolve) the smoothed error (``"smoothed"``) or each iteration's
            own error (``"raw"``: the alert ends without waiting for the window to drain).
        resolve_clear: (resolve) when set, ``clear_after`` iterations in a row whose own
            errors are below ``resolve_clear × UCL`` resolve at once. None: only the
            ``resolve_after`` rule.
        clear_after: (resolve) see ``resolve_clear``.
        flap_within: (resolve) an alert that fires within this many judged iterations of
            the previous resolve is *flapping* (0: never): ``resolve_clear`` does not end
            it, only ``resolve_after`` does.
    """

    name: str
    # the model
    target: Literal["linear", "log"] = "linear"
    form: Literal["gbdt", "robust"] = "gbdt"
    min_samples_leaf: int = 1
    # the control limit
    calibration: Literal["train", "blocks"] = "train"
    folds: int = 5
    ucl_method: Literal["sigma", "smoothed_quantile"] = "sigma"
    k_sigma: float = 3.0
    quantile: float = 0.99
    ucl_scale: float = 1.0
    ucl_floor: float = 0.0
    ucl_cap: float = 0.5
    event_factor: float | None = None
    event_quantile: float = 0.9
    event_budget: float = 0.05
    ucl_skip_episodes: int = 0
    episode_fraction: float = 0.05
    episode_outlier: float = 1.0
    refit_ucl_growth: float | None = None
    settle_keeps_limit: bool = False
    # the workload regime
    novelty_margin: float | None = None
    novelty_refit: int = 100
    novelty_ceiling: float | None = None
    novelty_hold_s: float = 60.0
    range_quantile: float = 0.0
    bound_by_previous: bool = False
    # firing
    window: int = 10
    smoothing: Literal["mean", "median"] = "mean"
    refire_within: int = 0
    refire_level: float = 1.0
    # resolving
    hysteresis: float = 0.8
    resolve_after: int = 10
    resolve_on: Literal["smoothed", "raw"] = "smoothed"
    resolve_clear: float | None = None
    clear_after: int = 1
    flap_within: int = 0


RULES: dict[str, DetectorRule] = {
    "paper": DetectorRule(name="paper"),
    "prism": DetectorRule(
        name="prism",
        target="log",
        form="robust",
        min_samples_leaf=20,
        calibration="blocks",
        ucl_method="smoothed_quantile",
        quantile=0.999,
        ucl_scale=1.5,
        ucl_floor=0.1,
        event_factor=5.0,
        ucl_skip_episodes=1,
        episode_outlier=2.0,
        refit_ucl_growth=1.0,
        settle_keeps_limit=True,
        novelty_margin=0.5,
        novelty_ceiling=2.0,
        range_quantile=0.01,
        bound_by_previous=True,
        window=9,
        smoothing="median",
        refire_within=5,
        refire_level=2.0,
        resolve_after=3,
        resolve_on="raw",
        resolve_clear=0.5,
        clear_after=2,
        flap_within=50,
    ),
}


def get_rule(rule: str | DetectorRule) -> DetectorRule:
    """Look a rule up by name (``"paper"``, ``"prism"``) or pass one through."""
    if isinstance(rule, DetectorRule):
        return rule
    try:
        return RULES[rule]
    except KeyError:
        raise ValueError(f"unknown detector rule {rule!r}; known: {sorted(RULES)}") from None
