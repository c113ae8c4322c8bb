"""Fitting a baseline and setting its control limit (synchronous; run in an executor).

The limit (UCL) is what the smoothed relative error is compared with. ``paper`` takes
``mean + 3σ`` of the model's training-set errors; ``prism`` a quantile of out-of-fold
errors smoothed as live, without the warm-up's events and its one worst episode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from prism_tui.engine.detector.features import FloatArray, relative_errors
from prism_tui.engine.detector.model import BaselineModel
from prism_tui.engine.detector.rule import DetectorRule, get_rule


@dataclass(frozen=True)
class FittedBaseline:
    """A fitted model with its control limit: what :meth:`Detector.install` takes."""

    model: BaselineModel
    ucl: float
    error_mean: float
    error_std: float
    n_train: int
    n_calibration: int
    rule: DetectorRule
    batch_range: tuple[float, float] | None = None
    """Batch sizes the model was trained on (min, max): beyond them it extrapolates."""
    kv_range: tuple[float, float] | None = None
    """Average context lengths it was trained on (min, max)."""

    def novelty(self, x: tuple[float, ...], margin: float) -> str | None:
        """Why ``x`` lies above the trained workload by more than ``margin`` (or None)."""
        for name, col, rng in (("batch", 0, self.batch_range), ("kv", 3, self.kv_range)):
            if rng is None:
                continue
            lo, hi = rng
            if x[col] > hi * (1 + margin):
                return f"{name} {x[col]:.0f} above the trained {lo:.0f}–{hi:.0f}"
        return None

    def below_range(self, x: tuple[float, ...], margin: float) -> bool:
        """Whether ``x`` lies below the trained workload by more than ``margin``."""
        return any(rng is not None and x[col] < rng[0] * (1 - margin)
                   for col, rng in ((0, self.batch_range), (3, self.kv_range)))



def smooth_errors(errors: npt.ArrayLike, rule: DetectorRule) -> FloatArray:
    """The detector's smoothing applied to a sequence of errors (in arrival order)."""
    e = np.asarray(errors, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(e)])
    idx = np.arange(1, len(e) + 1)
    lo = np.maximum(0, idx - rule.window)
    total, count = c[idx] - c[lo], idx - lo
    if rule.smoothing == "median" and len(e):
        padded = np.concatenate([np.full(rule.window - 1, np.nan), e])
        windows = np.lib.stride_tricks.sliding_window_view(padded, rule.window)
        return np.asarray(np.nanmedian(windows, axis=1), dtype=np.float64)
    return np.asarray(total / count, dtype=np.float64)


def without_events(errors: FloatArray, rule: DetectorRule) -> FloatArray:
    """``errors`` (in arrival order) without the warm-up's events (see
    :class:`DetectorRule`, ``event_factor``); unchanged when the rule keeps them."""
    if rule.event_factor is None or errors.size == 0:
        return errors
    level = rule.event_factor * float(np.quantile(errors, rule.event_quantile))
    level = max(level, float(np.quantile(errors, 1.0 - rule.event_budget)))
    return errors[errors <= level]


def compute_ucl(errors: npt.ArrayLike, rule: DetectorRule) -> tuple[float, float, float]:
    """(ucl, mean, std) of calibration errors under ``rule``."""
    e = np.asarray(errors, dtype=np.float64)
    mean = float(e.mean()) if e.size else 0.0
    std = float(e.std()) if e.size else 0.0
    if rule.ucl_method == "sigma":
        raw = mean + rule.k_sigma * std
    else:
        sm = smooth_errors(without_events(e, rule), rule)
        # live, a smoothed error is compared with the limit only once W errors are in:
        # the first W - 1, medians of fewer (a run's first iterations), do not set it
        sm = without_episodes(sm[rule.window - 1:] if sm.size >= rule.window else sm, rule)
        raw = float(np.quantile(sm, rule.quantile)) if sm.size else 0.0
    ucl = min(max(raw * rule.ucl_scale, rule.ucl_floor), rule.ucl_cap)
    return ucl, mean, std


def without_episodes(smoothed: FloatArray, rule: DetectorRule) -> FloatArray:
    """``smoothed`` without its ``rule.ucl_skip_episodes`` worst episodes (see
    :class:`DetectorRule`); unchanged when that would leave fewer than half the rows."""
    keep = np.ones(len(smoothed), dtype=bool)
    half = max(round(len(smoothed) * rule.episode_fraction), 5 * rule.window) // 2
    for _ in range(rule.ucl_skip_episodes):
        if keep.sum() - (2 * half + 1) < len(smoothed) / 2:
            break
        worst = int(np.argmax(np.where(keep, smoothed, -np.inf)))
        rest = keep.copy()
        rest[max(0, worst - half):worst + half + 1] = False
        if smoothed[worst] < rule.episode_outlier * np.quantile(smoothed[rest], rule.quantile):
            break
        keep = rest
    return smoothed[keep]


def rule_model(r: DetectorRule, seed: int = 0, n_estimators: int = 200) -> BaselineModel:
    """An unfitted model of the rule's target, leaf size and form (the GBDT)."""
    return BaselineModel(r.target, n_estimators=n_estimators, random_state=seed,
                         min_samples_leaf=r.min_samples_leaf, form=r.form)


def fit_and_calibrate(
    xa: FloatArray, ya: FloatArray, r: DetectorRule, *, seed: int = 0,
    n_estimators: int = 200,
) -> tuple[BaselineModel, FloatArray, int, int]:
    """The model and the calibration errors the UCL is computed from, per ``r.calibration``
    (see :func:`fit_baseline`); also the rows fitted and the rows calibrated on."""
    model = rule_model(r, seed, n_estimators)
    block_len = max(5 * r.window, 20)
    if r.calibration == "blocks" and len(ya) >= 2 * block_len:
        # runs of block_len rows in arrival order, dealt to the folds in turn: each
        # fold's rows are runs (bursts stay bursts) spread over the whole period (a
        # regime seen in only part of it is in every fold's training data)
        folds = max(2, min(r.folds, len(ya) // block_len))
        fold_of = (np.arange(len(ya)) // block_len) % folds
        pred = np.empty_like(ya)
        for k in range(folds):
            held = fold_of == k
            fold = rule_model(r, seed, n_estimators)
            fold.fit(xa[~held], ya[~held])
            pred[held] = fold.predict(xa[held])
        model.fit(xa, ya)
        return model, relative_errors(ya, pred), len(ya), len(ya)
    model.fit(xa, ya)
    return model, relative_errors(ya, model.predict(xa)), len(ya), len(ya)


def fit_baseline(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    rule: str | DetectorRule = "paper",
    *,
    seed: int = 0,
    n_estimators: int = 200,
) -> FittedBaseline:
    """Fit a model and its UCL (synchronous: a runtime runs this in an executor).

    With ``calibration="train"`` the UCL comes from the errors of the fitted model on its
    own training set (as in the paper — in-sample errors are optimistic, so the UCL is
    tight). With ``"blocks"`` every row gets an out-of-fold error (see
    :class:`DetectorRule`) and the returned model is fitted on all rows; fewer than two
    blocks of rows fall back to in-sample errors.
    """
    r = get_rule(rule)
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    model, errs, n_train, n_cal_used = fit_and_calibrate(xa, ya, r, seed=seed,
                                                         n_estimators=n_estimators)
    ucl, mean, std = compute_ucl(errs, r)
    return FittedBaseline(model, ucl, mean, std, n_train, n_cal_used, r,
                          batch_range=trained_range(xa[:, 0], r.range_quantile),
                          kv_range=trained_range(xa[:, 3], r.range_quantile))


def trained_range(column: FloatArray, quantile: float) -> tuple[float, float]:
    """The span of one workload feature a model was trained on: from the ``quantile``
    to the ``1 - quantile`` quantile of its rows (0: min and max)."""
    if quantile <= 0:
        return float(column.min()), float(column.max())
    lo, hi = np.quantile(column, [quantile, 1.0 - quantile])
    return float(lo), float(hi)

