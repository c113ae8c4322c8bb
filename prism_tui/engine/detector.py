"""Workload-aware latency anomaly detection (pure computation: no asyncio, no I/O).

The method follows the LatencyPrism paper (docs/architecture.md): a gradient-boosted regression
predicts the latency a decode iteration *should* have from its workload (batch size,
average input length, average output length, ``kv_len = in + out`` and ``B * kv_len``).
The positive relative residual ``E_t = max(0, (Y - Ŷ) / Y)`` is smoothed over a window of
``W`` iterations and compared with an upper control limit (UCL); an alert fires when the
smoothed error exceeds it. Slower iterations that the workload explains (bigger batches,
longer KV) do not fire; the same workload running slower does.

Two named rules are provided (see ``RULES`` and docs/detection.md for measurements):

* ``"paper"`` — the reference: GBDT on latency, UCL = min(mean + 3·std, 0.5) of the
  model's *training-set* errors, moving mean over W = 10.
* ``"prism"`` — ours, the monitor's default: the physical shape of a decode step times
  a median GBDT, on log-latency (leaves of at least 20 rows); the error smoothed by the
  median of W = 9 (lone unexplained iterations, such as prefill stalls, move it by
  nothing); UCL = 1.5 × the 99.9th percentile of the *smoothed* out-of-fold errors of
  the warm-up (five folds of runs of 45 iterations in arrival order, so every warm-up
  iteration gets an error from a model that did not see it and bursts stay bursts),
  leaving out the warm-up's events (errors above 5 × their 90th percentile, at most 5 %
  of the rows: stalls the workload does not explain would otherwise set the limit),
  floored at 0.1 (below a 1.2× slowdown's error, 0.167), capped at 0.5; a workload
  above the trained range is not judged but learnt by a refit (one below it is judged
  against the previous model too until the regime settles); fires again on 1 iteration
  above 2 × UCL within 5 iterations of a resolve; resolves after 3 iterations whose own
  errors are below 0.8 × UCL (not waiting for the smoothing window to drain), or after
  2 below 0.5 × UCL unless the alert fired within 50 iterations of the previous resolve
  (a fault that comes and goes).

A verdict's ``firing`` is the per-iteration state (what the paper's scoring reads); the
engine makes alerts from episodes of it (:mod:`prism_tui.engine.episodes`).

Time is injected: every call carries the caller's ``t_ns``; nothing here reads a clock.
Fitting is synchronous; a runtime that must not block calls :func:`fit_baseline` in an
executor with :meth:`Detector.training_data` and hands the result to
:meth:`Detector.install`.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


class _Regressor(Protocol):
    """The part of a scikit-learn regressor the model uses."""

    def fit(self, x: FloatArray, y: FloatArray) -> object: ...

    def predict(self, x: FloatArray) -> npt.ArrayLike: ...

Transition = Literal["firing", "resolved"]

FEATURE_NAMES: tuple[str, ...] = ("batch_size", "avg_input", "avg_output", "kv_len", "b_kv")
# Values beyond this cannot be represented by the float32 trees of scikit-learn.
_MAX_FEATURE = 1e30


# --------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Workload:
    """The workload of one decode iteration, as a monitor recovers it from call arguments.

    Attributes:
        batch_size: sequences in the batch (B).
        avg_input: average prompt length of the batch's sequences, tokens.
        avg_output: average number of tokens generated so far, tokens.
    """

    batch_size: float
    avg_input: float
    avg_output: float

    @property
    def kv_len(self) -> float:
        """Average KV-cache length per sequence: input + output tokens."""
        return self.avg_input + self.avg_output

    def is_valid(self) -> bool:
        """Finite, representable, batch size > 0 and lengths >= 0."""
        return _valid_features(features(self))


def _valid_features(x: tuple[float, float, float, float, float]) -> bool:
    """Whether a workload's features are finite, representable, B > 0 and lengths >= 0."""
    if not all(math.isfinite(v) and abs(v) < _MAX_FEATURE for v in x):
        return False
    return x[0] > 0 and x[1] >= 0 and x[2] >= 0


def features(w: Workload) -> tuple[float, float, float, float, float]:
    """The paper's five features: B, avg input, avg output, kv_len, B·kv_len."""
    b = float(w.batch_size)
    kv = float(w.avg_input) + float(w.avg_output)
    return (b, float(w.avg_input), float(w.avg_output), kv, b * kv)


def feature_matrix(
    batch_size: npt.ArrayLike, avg_input: npt.ArrayLike, avg_output: npt.ArrayLike
) -> FloatArray:
    """Vectorised :func:`features` for columns of equal length; shape (n, 5)."""
    b = np.asarray(batch_size, dtype=np.float64)
    i = np.asarray(avg_input, dtype=np.float64)
    o = np.asarray(avg_output, dtype=np.float64)
    kv = i + o
    return np.column_stack([b, i, o, kv, b * kv])


def relative_errors(observed: npt.ArrayLike, predicted: npt.ArrayLike) -> FloatArray:
    """``E = max(0, (y - ŷ) / y)`` elementwise (y > 0 assumed)."""
    y = np.asarray(observed, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    return np.asarray(np.maximum(0.0, (y - p) / y), dtype=np.float64)


# ------------------------------------------------------------------------------ model


class BaselineModel:
    """Latency model: the paper's GBDT (default), or a physically-shaped robust model.

    Args:
        target: ``"linear"`` regresses latency (the paper); ``"log"`` regresses
            log-latency, so that the loss weighs relative errors evenly across fast and
            slow workloads, and predictions are always positive.
        form: ``"gbdt"`` is the paper's ``GradientBoostingRegressor`` (squared loss).
            ``"robust"`` (the ``prism`` rule's) first fits the physical shape of a decode
            step, ``a + b·B + c·B·kv + d·kv`` (weights, per-sequence and per-KV-token
            cost), with a Huber loss and non-negative costs, then a GBDT with absolute
            (median) loss on the remaining log-ratio (or difference, for a linear
            target). The median loss ignores prefill stalls and end-of-job steps; the
            linear part extrapolates to batch sizes and contexts that warm-up did not
            see. On whole jobs held out of the paper's data it errs 3.4 % against the
            log GBDT's 5.7 % (docs/detection.md, "Baseline model on unseen workloads").
            Both forms' trees are tabled (:class:`TreeEnsemble`). Default ``"gbdt"``.
        n_estimators: boosting iterations (the paper's 200).
        learning_rate: shrinkage (the paper's 0.1).
        max_depth: tree depth (the paper's 4).
        random_state: seed.
        min_samples_leaf: fewest rows in a leaf of the GBDT (scikit-learn's and the
            paper's 1). A larger leaf averages a regime's handful of odd rows instead of
            learning them: see :class:`DetectorRule`. The robust form uses at least
            ``min(50, rows // 40)``.
    """

    def __init__(
        self,
        target: Literal["linear", "log"] = "linear",
        *,
        n_estimators: int = 200,
        learning_rate: float = 0.1,
        max_depth: int = 4,
        random_state: int = 0,
        form: Literal["gbdt", "robust"] | None = None,
        min_samples_leaf: int = 1,
    ) -> None:
        self.target = target
        self._min_samples_leaf = min_samples_leaf
        self.form: Literal["gbdt", "robust"] = form or "gbdt"
        self._n_estimators = n_estimators
        self._learning_rate = learning_rate
        self._max_depth = max_depth
        self._random_state = random_state
        self._est: _Regressor | None = None
        self._trees: TreeEnsemble | None = None
        self._shape: _PhysicalShape | None = None
        self.fitted = False

    def _make(self, n_rows: int) -> _Regressor:
        from sklearn.ensemble import GradientBoostingRegressor

        if self.form == "robust":
            robust: _Regressor = GradientBoostingRegressor(
                loss="absolute_error",
                n_estimators=self._n_estimators,
                learning_rate=self._learning_rate,
                max_depth=self._max_depth,
                min_samples_leaf=max(self._min_samples_leaf, min(50, n_rows // 40)),
                random_state=self._random_state,
            )
            return robust

        paper: _Regressor = GradientBoostingRegressor(
            n_estimators=self._n_estimators,
            learning_rate=self._learning_rate,
            max_depth=self._max_depth,
            random_state=self._random_state,
            min_samples_leaf=self._min_samples_leaf,
        )
        return paper

    def fit(self, x: npt.ArrayLike, y: npt.ArrayLike) -> BaselineModel:
        """Fit on features ``x`` (n, 5) and latencies ``y`` (n,), y > 0."""
        xa = np.asarray(x, dtype=np.float64)
        ya = np.asarray(y, dtype=np.float64)
        if xa.ndim != 2 or len(xa) != len(ya) or len(ya) < 2:
            raise ValueError(f"need >= 2 rows of features and latencies, got {xa.shape}")
        if np.any(ya <= 0) or not np.all(np.isfinite(ya)):
            raise ValueError("latencies must be finite and > 0")
        est = self._make(len(ya))
        if self.form == "robust":
            self._shape = _PhysicalShape.fit(xa, ya)
            base = self._shape.predict(xa)
            est.fit(xa, np.log(ya / base) if self.target == "log" else ya - base)
        else:
            est.fit(xa, np.log(ya) if self.target == "log" else ya)
        self._est = est
        self._trees = TreeEnsemble.of(est)
        self.fitted = True
        return self

    def predict_one(self, x: Sequence[float]) -> float:
        """Predicted latency of one row: the engine's per-iteration call, without arrays."""
        if self._trees is None:
            return float(self.predict(np.asarray([x], dtype=np.float64))[0])
        raw = self._trees.predict_row(np.asarray(x, dtype=np.float32).tolist())
        if self._shape is not None:
            base = self._shape.predict_one(x)
            return base * math.exp(raw) if self.target == "log" else base + raw
        return math.exp(raw) if self.target == "log" else raw

    def predict(self, x: npt.ArrayLike) -> FloatArray:
        """Predicted latency for each row of ``x`` (same unit as the training target)."""
        if self._est is None:
            raise ValueError("BaselineModel.predict called before fit")
        xa = np.asarray(x, dtype=np.float64)
        if xa.ndim == 1:
            xa = xa.reshape(1, -1)
        raw: FloatArray
        if self._trees is not None and len(xa) <= TreeEnsemble.MAX_ROWS:
            raw = self._trees.predict(xa)
        else:
            raw = np.asarray(self._est.predict(xa), dtype=np.float64)
        if self._shape is not None:
            base = self._shape.predict(xa)
            return base * np.exp(raw) if self.target == "log" else base + raw
        return np.exp(raw) if self.target == "log" else raw


_CODES16 = np.arange(1 << 16, dtype=np.int64)
_LOWEST_BIT16: npt.NDArray[np.intp] = np.log2(
    np.maximum(_CODES16 & -_CODES16, 1).astype(np.float64)).astype(np.intp)
"""The index of the lowest set bit of every 16-bit mask. A module constant, not built by
the first :class:`TreeEnsemble`: ensembles are fitted in a worker process and unpickled.
(A tree's mask is never 0: its rightmost leaf is in no left subtree.)"""


class TreeEnsemble:
    """A fitted ``GradientBoostingRegressor`` as per-feature threshold tables (QuickScorer).

    Why: scikit-learn validates its input on every ``predict`` (~230 µs for one row
    here), and the engine predicts one iteration at a time on the event loop, ahead of
    the alert. Walking the trees level by level with numpy took ~16 µs a row. Instead,
    as in QuickScorer (Lucchese et al., SIGIR 2015), each tree's leaves are numbered left
    to right, and each split node carries a bit mask of the leaves still reachable when
    its test is false (the row goes right). A row's exit leaf in a tree is the lowest bit
    left after AND-ing the masks of its false nodes. The false nodes on one feature are
    those whose threshold lies below the row's value: a prefix of that feature's
    thresholds in ascending order, so the AND of every prefix is tabled once, per tree.
    A row is then one bisection per feature, one AND over the features' table rows and
    one lookup of the leaves (~5 µs). Inputs are rounded to float32 and go left on
    ``<=``, as scikit-learn's trees do: the numbers are the same.
    """

    MAX_ROWS = 16
    """More rows than this go to scikit-learn, which is faster in bulk."""

    MAX_LEAVES = 64
    """Trees with more leaves than a mask has bits are not tabled (depth ≤ 6 is)."""

    def __init__(self, prefix_masks: npt.NDArray[np.unsignedinteger],
                 thresholds: list[list[float]], leaf_values: FloatArray,
                 init: float, scale: float) -> None:
        self.init, self.scale = init, scale
        self._masks = prefix_masks  # rows: per feature, the AND of its first k masks
        self._thresholds = thresholds
        self._offsets: list[int] = []
        offset = 0
        for th in thresholds:
            self._offsets.append(offset)
            offset += len(th) + 1
        # features no tree splits on (a constant column) have all-ones rows: skipped
        self._searches = [(f, self._offsets[f], th) for f, th in enumerate(thresholds) if th]
        n_trees, width = leaf_values.shape
        self._leaf_base = np.arange(n_trees, dtype=np.intp) * width
        self._leaf_values = leaf_values.ravel()
        self._narrow = prefix_masks.dtype == np.uint16

    @classmethod
    def of(cls, est: object) -> TreeEnsemble | None:
        """Table ``est``; None when it is not a squared-loss GBDT of one output."""
        from sklearn.dummy import DummyRegressor
        from sklearn.ensemble import GradientBoostingRegressor

        if not isinstance(est, GradientBoostingRegressor) or \
                not isinstance(est.init_, DummyRegressor) or est.estimators_.shape[1] != 1:
            return None
        trees = [e.tree_ for e in est.estimators_[:, 0]]
        n_features = int(est.n_features_in_)
        splits: list[list[tuple[float, int, int]]] = [[] for _ in range(n_features)]
        leaf_lists: list[list[float]] = []
        for t, tree in enumerate(trees):
            values, below = _number_leaves(tree)
            left = tree.children_left
            if len(values) > cls.MAX_LEAVES:
                return None
            leaf_lists.append(values)
            for node in range(tree.node_count):
                if left[node] >= 0:  # false (goes right): its left subtree is unreachable
                    splits[int(tree.feature[node])].append(
                        (float(tree.threshold[node]), t, ~below[int(left[node])]))
        width = max(len(v) for v in leaf_lists)
        dtype = np.uint16 if width <= 16 else np.uint64
        full = int(np.iinfo(dtype).max)
        tables, thresholds = [], []
        for on_feature in splits:
            on_feature.sort(key=lambda s: s[0])
            table = np.full((len(on_feature) + 1, len(trees)), full, dtype=dtype)
            for k, (_, t, mask) in enumerate(on_feature):
                table[k + 1, t] = mask & full
            tables.append(np.bitwise_and.accumulate(table, axis=0))
            thresholds.append([s[0] for s in on_feature])
        leaf_values = np.zeros((len(trees), width))
        for t, values in enumerate(leaf_lists):
            leaf_values[t, :len(values)] = values
        init = float(np.ravel(est.init_.predict(np.zeros((1, n_features))))[0])
        return cls(np.vstack(tables), thresholds, leaf_values, init, float(est.learning_rate))

    def predict(self, x: FloatArray) -> FloatArray:
        """Raw predictions for the rows of ``x`` (what ``est.predict`` returns)."""
        rows = np.asarray(x, dtype=np.float32).tolist()
        return np.asarray([self.predict_row(row) for row in rows], dtype=np.float64)

    def predict_row(self, row: Sequence[float]) -> float:
        """Raw prediction for one row already rounded to float32."""
        picks = [offset + bisect.bisect_left(th, row[f])  # thresholds below: false nodes
                 for f, offset, th in self._searches]
        masks = np.bitwise_and.reduce(self._masks.take(picks, axis=0), axis=0)
        if self._narrow:
            leaves = _LOWEST_BIT16.take(masks)
        else:  # the lowest set bit, isolated, is a power of two: its log2 is exact
            lowest = masks & (~masks + np.uint64(1))
            leaves = np.log2(lowest.astype(np.float64)).astype(np.intp)
        picked = self._leaf_values.take(self._leaf_base + leaves)
        return self.init + self.scale * float(np.add.reduce(picked))


def _number_leaves(tree: object) -> tuple[list[float], dict[int, int]]:
    """A scikit-learn tree's leaf values left to right, and per node the bit mask of the
    leaves under it (bit i: the i-th leaf from the left)."""
    left, right = tree.children_left, tree.children_right  # type: ignore[attr-defined]
    value = tree.value  # type: ignore[attr-defined]
    values: list[float] = []
    below: dict[int, int] = {}
    stack: list[tuple[int, bool]] = [(0, False)]
    while stack:  # post-order without recursion: children are numbered before parents
        node, children_done = stack.pop()
        if left[node] < 0:
            values.append(float(value[node, 0, 0]))
            below[node] = 1 << (len(values) - 1)
        elif children_done:
            below[node] = below[int(left[node])] | below[int(right[node])]
        else:
            stack += [(node, True), (int(right[node]), False), (int(left[node]), False)]
    return values, below


# Columns of the feature matrix the physical shape uses: B, B·kv, kv.
_SHAPE_COLUMNS = (0, 4, 3)


@dataclass(frozen=True)
class _PhysicalShape:
    """``a + Σ coef·feature`` over B, B·kv and kv with non-negative costs, Huber-fitted.

    Why: a decode step costs a fixed part (weights), a part per sequence and a part per
    KV token; a robust linear fit of that shape extrapolates where trees cannot, and the
    trees then only model what it leaves.
    """

    intercept: float
    coef: FloatArray
    columns: tuple[int, ...]
    scale: FloatArray
    floor: float

    @classmethod
    def fit(cls, x: FloatArray, y: FloatArray) -> _PhysicalShape:
        """Fit on features (n, 5) and latencies; negative costs are dropped and refitted."""
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import HuberRegressor

        floor = 1e-3 * float(np.median(y))
        columns = list(_SHAPE_COLUMNS)
        while columns:
            cols = x[:, columns]
            scale = np.maximum(np.abs(cols).max(axis=0), 1e-12)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                h = HuberRegressor(epsilon=1.1, alpha=1e-3, max_iter=500).fit(cols / scale, y)
            coef = np.asarray(h.coef_, dtype=np.float64)
            if np.all(coef >= 0):
                return cls(float(h.intercept_), coef, tuple(columns), scale, floor)
            columns = [c for c, k in zip(columns, coef.tolist(), strict=True) if k >= 0]
        return cls(float(np.median(y)), np.zeros(0), (), np.ones(0), floor)

    def predict_one(self, x: Sequence[float]) -> float:
        """The shape's latency for one row (the engine's per-iteration call)."""
        base = self.intercept
        for col, per_unit in self.per_unit:
            base += x[col] * per_unit
        return max(base, self.floor)

    @property
    def per_unit(self) -> tuple[tuple[int, float], ...]:
        """(column, cost per unit of it): the coefficients with the scaling folded in."""
        cached: tuple[tuple[int, float], ...] | None = self.__dict__.get("_per_unit")
        if cached is None:
            cached = tuple((c, k / s) for c, k, s in zip(
                self.columns, self.coef.tolist(), self.scale.tolist(), strict=True))
            object.__setattr__(self, "_per_unit", cached)
        return cached

    def predict(self, x: FloatArray) -> FloatArray:
        """The shape's latency for each row, floored at a positive value."""
        base = np.full(len(x), self.intercept, dtype=np.float64)
        if self.columns:
            base = base + (x[:, list(self.columns)] / self.scale) @ self.coef
        return np.asarray(np.maximum(base, self.floor), dtype=np.float64)


# ------------------------------------------------------------------------------ rules


@dataclass(frozen=True)
class DetectorRule:
    """How the model is trained and the control limit is set.

    Attributes:
        name: label used in reports.
        target: model target, ``"linear"`` or ``"log"`` latency.
        calibration: ``"train"`` takes the UCL's errors from the training set itself (the
            paper); ``"holdout"`` fits on ``1 - holdout_fraction`` of the data and takes
            them from the rest (rows drawn at random); ``"blocks"`` cuts the data into
            runs of ``5·W`` iterations in arrival order, deals them to ``folds`` folds in
            turn, and takes each fold's errors from a model fitted on the others, so every
            row gets an out-of-sample error and runs of slow iterations stay runs
            (smoothing random rows spreads W errors over ~W/fraction iterations and hides
            the bursts the live stream has), while every workload regime of the period
            is in every fold's training data.
        ucl_method: ``"sigma"`` = mean + ``k_sigma``·std (the paper);
            ``"smoothed_quantile"`` = the
            ``quantile`` of the calibration errors smoothed like the live ones (the
            quantity the UCL is compared with), taken in arrival order.
        ucl_cap: upper bound of the UCL (the paper's 0.5).
        ucl_floor: lower bound of the UCL.
        window: smoothing window W in iterations.
        (The error is smoothed by a moving mean over the last W errors, fewer at the
        start.)
        novelty_margin: when set, an iteration whose batch size or context lies above
            the trained range by more than this fraction is *novel*: a workload the model
            never saw (trees do not extrapolate) is not judged as a fault; it is kept and,
            after ``novelty_refit`` such iterations, the model is refitted to cover it.
            A workload *below* the trained range is judged (a decode step does not get
            slower with fewer sequences or less context, so the prediction for the
            smallest trained workload bounds it from above: an error against it is
            conservative) and is also learnt by the same refit. None: judge everything
            (the paper).
        hysteresis: a firing alert resolves once the smoothed error stays below
            ``hysteresis × UCL`` ...
        resolve_after: ... for this many consecutive iterations.
        ucl_scale: the calibrated limit is multiplied by this before floor and cap (a
            margin for noise the warm-up did not show).
        resolve_on: what must stay below ``hysteresis × UCL`` to resolve: the smoothed
            error (``"smoothed"``) or each iteration's own error (``"raw"``: the alert
            ends ``resolve_after`` iterations after the fault, without waiting for the
            smoothing window to drain).
        refit_ucl_growth: a refit may lower the limit but not raise it above the first
            (warm-up) limit times this (None: no bound). A fault too mild to fire still
            lands in the recent iterations a refit learns from; its recalibrated limit
            then rose (0.24 to 0.37-0.49 after one such fault in ``mixed``) and hid
            every later fault of that size.
        ucl_skip_episodes: with ``"smoothed_quantile"``, up to this many one-off
            episodes are removed before the quantile is taken: the stretch of
            ``episode_fraction`` of the calibration rows centred on the largest smoothed
            error, when that error is at least ``episode_outlier`` times the quantile of
            the rest. A level the data reaches once and far above everything else (the
            server's first iterations, one stall of the host) then does not set the limit
            for the whole run: in the tmux demo, the simulator's start-up put the limit at
            0.45-0.49 in one run of five and hid a device slowdown to 60 % speed. 0: never.
        episode_fraction: the length of one removed episode, as a fraction of the rows
            (at least ``5·W`` rows).
        episode_outlier: how far above the rest's quantile an episode must peak to be
            removed (1.0: always the worst; removing it unconditionally raised the false
            positive rate 2-4x on recorded runs, docs/detection.md).
        bound_by_previous: after a refit for a new workload regime and until the refit
            that follows once it settled, an iteration below the previous model's
            trained range is judged against the larger of the two models' predictions.
            The new model has seen only ``novelty_refit`` iterations of the regime (in
            ``mixed``, the first 100 after the step down to 8 requests were faster than
            the next ones: false alarms for ~2 s); the previous model's prediction
            bounds a smaller workload's latency from above.
        settle_keeps_limit: the refit that follows a regime's refit once the regime
            settled may not raise the limit above the one in force before the regime
            (its calibration holds the regime's first, noisiest seconds).
        resolve_clear: when set, ``clear_after`` iterations in a row whose own errors
            are below ``resolve_clear × UCL`` resolve a firing alert at once (steps back
            on the model's prediction say the fault is over); errors between that and
            ``hysteresis × UCL`` still need ``resolve_after`` in a row. None: only the
            latter. The alert then ends ``clear_after - 1`` iterations after the fault
            instead of ``resolve_after - 1``.
        clear_after: see ``resolve_clear``. One clear iteration was too few: a fault
            that lets a normal iteration through now and then (``cpu_squeeze``) ended
            its alert on each and fired again (one ``mixed`` run: 50 of its 424
            iterations missed instead of 10).
        fast_fire: when > 0, this many iterations in a row whose own errors exceed
            ``fast_fire_level × UCL`` fire at once, before the smoothed error (a mean
            that a fault's first iterations raise by a fifth each) gets there. Most
            iterations the smoothed rule misses are each fault's first three. Like the
            smoothed error, only once W errors have come in since the last fit.
        fast_fire_level: see ``fast_fire``.
        refire_within: for this many judged iterations after a resolve, one iteration
            whose own error exceeds ``refire_level × UCL`` fires again (not
            ``fast_fire`` in a row): a fault whose slow iterations come and go (a CPU
            squeeze) resolves on three normal ones and is back at the next slow one.
        refire_level: the error, in UCLs, that re-fires within ``refire_within``.
        flap_within: an alert that fires within this many judged iterations of the
            previous resolve is *flapping* (0: never): the fault is still on and lets
            normal iterations through (a CPU squeeze), so ``resolve_clear`` does not end
            it; only ``resolve_after`` iterations below ``hysteresis × UCL`` do.
        min_samples_leaf: of the model's trees (:class:`BaselineModel`). With 1 (the
            paper), a regime refit's model, which holds about a hundred rows of the new
            regime, learnt single odd rows and predicted the regime's later iterations
            11-15 % high; a fault shortly after the step (a device slowdown 7 s after the
            step to 32 requests) then stayed below the limit.
        range_quantile: the workload range a model counts as trained (for
            ``novelty_margin``, the refit of a regime below it and ``bound_by_previous``)
            runs from this quantile of its rows' batch sizes and contexts to ``1 -`` it
            (0: min to max). A few stray rows (the ramp-up's first batches, a batch
            draining) otherwise stretch it: in one ``mixed`` run 1,000 rows of batches
            16-32 held a few small ones, the step down to 8 requests was not seen as a new
            regime, the model's predictions for it stayed 12-30 % high, and a device fault
            7 s later was missed.
        form: the model's form (:class:`BaselineModel`): ``"gbdt"`` (the paper's) or
            ``"robust"`` (physical shape times a median GBDT).
        smoothing: ``"mean"``: the moving mean of the last W errors (the paper);
            ``"median"``: their median, which ignores up to ⌊W/2⌋ unexplained
            iterations of the window and fires once most of it is slow;
            ``"trimmed"``: their mean without the largest one, so that one slow
            iteration the workload does not explain (a prefill stall among decode
            steps, a host hiccup) moves the smoothed error by nothing, while a slowdown
            that lasts raises every error of the window. The calibration smooths alike.
        event_factor: when set, the calibration leaves out the warm-up's *events*:
            iterations whose own error exceeds ``event_factor`` times the
            ``event_quantile`` quantile of the errors (the spread of the model's
            ordinary misses), the largest ``event_budget`` of the rows at most. Events
            are what the detector exists to see (on the paper's vLLM data, runs of
            300-430 ms prefill stalls among 30-90 ms decode steps, 2-3 % of the rows); a
            limit calibrated to tolerate them hides every slowdown smaller than them.
            The limit is then the quantile of what the model's noise does. None: every
            row counts.
        event_quantile: see ``event_factor``.
        event_budget: see ``event_factor``.
    """

    name: str
    target: Literal["linear", "log"] = "linear"
    calibration: Literal["train", "holdout", "blocks"] = "train"
    ucl_method: Literal["sigma", "smoothed_quantile"] = "sigma"
    k_sigma: float = 3.0
    quantile: float = 0.99
    ucl_cap: float = 0.5
    ucl_floor: float = 0.0
    holdout_fraction: float = 0.2
    folds: int = 5
    window: int = 10
    novelty_margin: float | None = None
    novelty_refit: int = 100
    hysteresis: float = 0.8
    resolve_after: int = 10
    ucl_scale: float = 1.0
    resolve_on: Literal["smoothed", "raw"] = "smoothed"
    refit_ucl_growth: float | None = None
    ucl_skip_episodes: int = 0
    episode_fraction: float = 0.05
    episode_outlier: float = 1.0
    bound_by_previous: bool = False
    settle_keeps_limit: bool = False
    resolve_clear: float | None = None
    range_quantile: float = 0.0
    fast_fire: int = 0
    fast_fire_level: float = 1.5
    refire_within: int = 0
    refire_level: float = 1.0
    flap_within: int = 0
    clear_after: int = 1
    min_samples_leaf: int = 1
    smoothing: Literal["mean", "trimmed", "median"] = "mean"
    form: Literal["gbdt", "robust"] = "gbdt"
    event_factor: float | None = None
    event_quantile: float = 0.9
    event_budget: float = 0.05


RULES: dict[str, DetectorRule] = {
    "paper": DetectorRule(name="paper"),
    "prism": DetectorRule(
        name="prism",
        target="log",
        calibration="blocks",
        ucl_method="smoothed_quantile",
        window=9,
        quantile=0.999,
        ucl_scale=1.5,
        ucl_floor=0.1,
        resolve_after=3,
        resolve_on="raw",
        novelty_margin=0.5,
        refit_ucl_growth=1.0,
        ucl_skip_episodes=1,
        episode_outlier=2.0,
        bound_by_previous=True,
        settle_keeps_limit=True,
        range_quantile=0.01,
        min_samples_leaf=20,
        form="robust",
        smoothing="median",
        event_factor=5.0,
        resolve_clear=0.5,
        clear_after=2,
        flap_within=50,
        refire_within=5,
        refire_level=2.0,
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


MIN_WARMUP = 200
"""The fewest training iterations a time-bound warm-up fits on (five folds of runs of 25
for the ``prism`` calibration need 50; 200 gives each fold's model 160 rows)."""

BELOW_MARGIN = 0.1
"""How far below a model's trained batch sizes or contexts a workload must lie to count
as below its range (towards a refit, and for the previous model's bound)."""


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
    if rule.smoothing == "trimmed" and len(e) > 1:
        padded = np.concatenate([np.full(rule.window - 1, -np.inf), e])
        largest = np.lib.stride_tricks.sliding_window_view(padded, rule.window).max(axis=1)
        more = count > 1
        total = np.where(more, total - largest, total)
        count = np.where(more, count - 1, count)
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
        sm = without_episodes(smooth_errors(without_events(e, rule), rule), rule)
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


def _model_of(r: DetectorRule, seed: int, n_estimators: int) -> BaselineModel:
    """An unfitted model of the rule's target and leaf size (the GBDT)."""
    return BaselineModel(r.target, n_estimators=n_estimators, random_state=seed,
                         min_samples_leaf=r.min_samples_leaf, form=r.form)


def fit_and_calibrate(
    xa: FloatArray, ya: FloatArray, r: DetectorRule, *, seed: int = 0,
    n_estimators: int = 200,
) -> tuple[BaselineModel, FloatArray, int, int]:
    """The model and the calibration errors the UCL is computed from, per ``r.calibration``
    (see :func:`fit_baseline`); also the rows fitted and the rows calibrated on."""
    model = _model_of(r, seed, n_estimators)
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
            fold = _model_of(r, seed, n_estimators)
            fold.fit(xa[~held], ya[~held])
            pred[held] = fold.predict(xa[held])
        model.fit(xa, ya)
        errs = relative_errors(ya, pred)
        n_train, n_cal_used = len(ya), len(ya)
    elif r.calibration == "holdout" and len(ya) >= 10:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(ya))
        n_cal = max(1, round(len(ya) * r.holdout_fraction))
        cal, tr = np.sort(order[:n_cal]), order[n_cal:]
        model.fit(xa[tr], ya[tr])
        errs = relative_errors(ya[cal], model.predict(xa[cal]))
        n_train, n_cal_used = len(tr), len(cal)
    else:
        model.fit(xa, ya)
        errs = relative_errors(ya, model.predict(xa))
        n_train, n_cal_used = len(ya), len(ya)
    return model, errs, n_train, n_cal_used


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
    tight). With ``"holdout"`` a seeded random ``holdout_fraction`` of the rows is kept
    out of the fit and the UCL comes from the model's errors on them (in arrival order,
    so that ``"smoothed_quantile"`` smooths them as the live stream would be). With
    ``"blocks"`` every row gets an out-of-fold error (see :class:`DetectorRule`) and the
    returned model is fitted on all rows; fewer than two blocks of rows fall back to
    in-sample errors.
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


# --------------------------------------------------------------------------- detector


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

    Hysteresis: fire when the smoothed error exceeds the UCL (once W errors have been
    smoothed since the model was installed: the limit is calibrated on W-smoothed
    errors), or, with the rule's ``fast_fire``, on that many raw errors in a row above
    it; resolve when it has been below ``UCL * hysteresis`` for ``resolve_after``
    consecutive iterations.

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
        self._trimmed = self._rule.smoothing == "trimmed"
        self._median = self._rule.smoothing == "median"
        self._since_fit_errors = 0  # errors smoothed since the model was installed
        self._baseline: FittedBaseline | None = None
        self._previous: FittedBaseline | None = None  # see DetectorRule.bound_by_previous
        self._before_regime: float | None = None
        self._first_ucl: float | None = None
        self._firing = False
        self._below = 0
        self._hot = 0
        self._clear = 0
        self._since_resolve = 1 << 62  # judged iterations since the last resolve
        self._flapping = False  # see DetectorRule.flap_within
        self._novel = 0
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
        growth = self._rule.refit_ucl_growth
        if self._first_ucl is None:
            self._first_ucl = baseline.ucl
        elif growth is not None and baseline.ucl > self._first_ucl * growth:
            baseline = dataclasses.replace(baseline, ucl=self._first_ucl * growth)
        if (self._rule.settle_keeps_limit and self._settle and self._before_regime is not None
                and baseline.ucl > self._before_regime):
            baseline = dataclasses.replace(baseline, ucl=self._before_regime)
        # a refit for a new regime is followed by one more once the regime settled
        regime = self._novel >= self._rule.novelty_refit
        if regime and not self._settle:
            self._before_regime = None if self._baseline is None else self._baseline.ucl
        self._settle = regime
        self._previous = (self._baseline if self._settle and self._rule.bound_by_previous
                          else None)
        self._baseline = baseline
        self._since_fit = 0
        self._novel = 0
        self._training.clear()
        # errors against the previous model say nothing about this one
        self._errors.clear()
        self._since_fit_errors = 0

    # ---- streaming

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def observe(self, t_ns: int, latency_ms: float, workload: Workload) -> Verdict | None:
        """Judge one decode iteration; None during warm-up or when skipped."""
        lat = _valid_latency(latency_ms)
        if lat is None:
            self._skip("nonpositive_latency" if _is_nonpositive(latency_ms) else "bad_latency")
            return None
        try:
            x = features(workload)
            valid = _valid_features(x)
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
        lat = _valid_latency(latency_ms)
        if lat is None:
            self._skip("nonpositive_latency" if _is_nonpositive(latency_ms) else "bad_latency")
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
        if novel is not None and x is not None:
            # outside what the model learned: neither evidence of a fault nor of its
            # absence. Kept for the refit; the smoothed error and the state stand still.
            self._novel += 1
            self._recent.append((*x, lat))
            self._since_fit += 1
            self.n_verdicts += 1
            return Verdict(t_ns, lat, predicted, err, self._smoothed_now(), ucl,
                           self._firing, None, novel)
        if margin is not None and x is not None and self._baseline.below_range(x, BELOW_MARGIN):
            # judged (the error is conservative) and counted towards a refit that learns it
            self._novel += 1
        smoothed = self._smooth(err)
        transition: Transition | None = None
        if not self._firing:
            # the limit was calibrated on errors smoothed over W: a mean of fewer (the first
            # verdicts after a fit) is noisier and is not compared with it
            full = self._since_fit_errors >= self._rule.window
            above = full and smoothed > ucl
            self._hot = self._hot + 1 if full and err > ucl * self._rule.fast_fire_level else 0
            need = self._rule.fast_fire
            if self._since_resolve < self._rule.refire_within and \
                    err > ucl * self._rule.refire_level:
                need = 1  # the fault resolved a moment ago: one slow iteration re-fires
            fast = need > 0 and self._hot >= need
            if above or fast:
                self._firing = True
                self._flapping = self._since_resolve < self._rule.flap_within
                self._below = 0
                self._hot = 0
                self._clear = 0
                transition = "firing"
                lead_in = self._rule.window
                for _ in range(min(lead_in, len(self._recent))):
                    self._recent.pop()
        elif (err if self._rule.resolve_on == "raw" else smoothed) < ucl * self._hysteresis:
            self._below += 1
            clear = None if self._flapping else self._rule.resolve_clear
            self._clear = self._clear + 1 if clear is not None and err < ucl * clear else 0
            if self._below >= self._resolve_after or (
                    clear is not None and self._clear >= self._rule.clear_after):
                self._firing = False
                self._below = 0
                self._since_resolve = 0
                transition = "resolved"
                if self._rule.resolve_on == "raw":
                    # the window still holds the fault's errors and would fire again at
                    # once: keep only the iterations that ended the alert
                    recent = list(self._errors)[-self._resolve_after:]
                    self._errors.clear()
                    self._errors.extend(recent)
        else:
            self._below = 0
            self._clear = 0
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
        if self._trimmed and n > 1:
            return (sum(self._errors) - max(self._errors)) / (n - 1)
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


def _valid_latency(v: float) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return None
    if not math.isfinite(f) or f <= 0 or f > _MAX_FEATURE:
        return None
    return f


def _is_nonpositive(v: float) -> bool:
    try:
        f = float(v)
        return math.isfinite(f) and f <= 0
    except (TypeError, ValueError, OverflowError):
        return False


# --------------------------------------------------------------------------- SLO rule

_UNITS_MS = {"us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "min": 60_000.0}
_SLO_RE = re.compile(
    r"^\s*(?:(?P<phase>[a-z_][a-z0-9_]*)\s+)?"
    r"(?P<stat>p\d+(?:\.\d+)?|mean|max)\s*"
    r"(?P<op><=|<)\s*"
    r"(?P<thr>\d+(?:\.\d+)?)\s*(?P<thr_unit>us|µs|ms|s)\s+"
    r"over\s+(?P<win>\d+(?:\.\d+)?)\s*(?P<win_unit>ms|s|m|min)\s*$",
    re.IGNORECASE,
)
_STATS = ("mean", "max")


@dataclass
class SloRule:
    """A latency objective evaluated on a stream with an injected clock.

    ``"decode p99 <= 60ms over 10s"``: the 99th percentile (nearest rank) of the
    latencies observed in the last 10 s must stay at or under 60 ms. The rule fires when
    it is violated (with at least ``min_samples`` in the window) and resolves when it
    holds again.
    """

    stat: str
    threshold_ms: float
    window_s: float
    phase: str | None = None
    strict: bool = False
    min_samples: int = 1
    text: str = ""

    def __post_init__(self) -> None:
        s = self.stat.lower()
        if s not in _STATS:
            q = _parse_quantile(s)
            if q is None:
                raise ValueError(f"SLO statistic must be pNN, mean or max, got {self.stat!r}")
        self.stat = s
        if not (math.isfinite(self.threshold_ms) and self.threshold_ms > 0):
            raise ValueError(f"SLO threshold must be > 0 ms, got {self.threshold_ms!r}")
        if not (math.isfinite(self.window_s) and self.window_s > 0):
            raise ValueError(f"SLO window must be > 0 s, got {self.window_s!r}")
        if self.min_samples < 1:
            raise ValueError("SLO min_samples must be >= 1")
        self._window: deque[tuple[int, float]] = deque()
        self._latest_ns: int | None = None
        self.violated = False

    @classmethod
    def parse(cls, spec: str | Mapping[str, object]) -> SloRule:
        """From ``"[phase] pNN|mean|max <=|< N(us|ms|s) over N(ms|s|m)"`` or a dict.

        Dict keys: ``stat`` (or ``quantile`` as 0.99), ``threshold_ms``, ``window_s``,
        optional ``phase``, ``strict``, ``min_samples``.
        """
        if isinstance(spec, str):
            m = _SLO_RE.match(spec)
            if m is None:
                raise ValueError(
                    f"cannot parse SLO {spec!r}: expected like 'decode p99 <= 60ms over 10s'"
                )
            return cls(
                stat=m["stat"].lower(),
                threshold_ms=float(m["thr"]) * _UNITS_MS[m["thr_unit"].lower()],
                window_s=float(m["win"]) * _UNITS_MS[m["win_unit"].lower()] / 1000.0,
                phase=m["phase"].lower() if m["phase"] else None,
                strict=m["op"] == "<",
                text=spec.strip(),
            )
        if isinstance(spec, Mapping):
            return cls._from_mapping(spec)
        raise ValueError(f"SLO must be a string or a mapping, got {type(spec).__name__}")

    @classmethod
    def _from_mapping(cls, d: Mapping[str, object]) -> SloRule:
        unknown = set(d) - {
            "stat",
            "quantile",
            "threshold_ms",
            "window_s",
            "phase",
            "strict",
            "min_samples",
        }
        if unknown:
            raise ValueError(f"unknown SLO keys: {sorted(unknown)}")
        stat = d.get("stat")
        if stat is None and "quantile" in d:
            q = _number(d, "quantile")
            if not 0 < q < 1:
                raise ValueError(f"SLO quantile must be in (0, 1), got {q}")
            stat = f"p{q * 100:g}"
        if not isinstance(stat, str):
            raise ValueError("SLO needs 'stat' (e.g. 'p99') or 'quantile' (e.g. 0.99)")
        phase = d.get("phase")
        if phase is not None and not isinstance(phase, str):
            raise ValueError("SLO 'phase' must be a string")
        min_samples = d.get("min_samples", 1)
        if not isinstance(min_samples, int) or isinstance(min_samples, bool):
            raise ValueError("SLO 'min_samples' must be an integer")
        return cls(
            stat=stat,
            threshold_ms=_number(d, "threshold_ms"),
            window_s=_number(d, "window_s"),
            phase=phase,
            strict=bool(d.get("strict", False)),
            min_samples=min_samples,
        )

    def value(self) -> float | None:
        """The statistic over the current window, or None when it is empty."""
        if not self._window:
            return None
        vals = sorted(v for _, v in self._window)
        if self.stat == "mean":
            return sum(vals) / len(vals)
        if self.stat == "max":
            return vals[-1]
        q = _parse_quantile(self.stat)
        assert q is not None
        rank = max(1, math.ceil(q * len(vals)))
        return vals[rank - 1]

    def observe(self, t_ns: int, latency_ms: float) -> Transition | None:
        """Add one latency at time ``t_ns``; returns a transition when the state flips.

        Non-finite or negative latencies are ignored. Time that goes backwards does not
        shrink the window (the newest time seen defines it).
        """
        if not math.isfinite(latency_ms) or latency_ms < 0:
            return None
        latest = t_ns if self._latest_ns is None else max(self._latest_ns, t_ns)
        self._latest_ns = latest
        self._window.append((t_ns, float(latency_ms)))
        horizon = latest - int(self.window_s * 1e9)
        while self._window and self._window[0][0] <= horizon:
            self._window.popleft()
        v = self.value()
        bad = (
            v is not None
            and len(self._window) >= self.min_samples
            and (v >= self.threshold_ms if self.strict else v > self.threshold_ms)
        )
        if bad and not self.violated:
            self.violated = True
            return "firing"
        if not bad and self.violated:
            self.violated = False
            return "resolved"
        return None


def _parse_quantile(stat: str) -> float | None:
    m = re.fullmatch(r"p(\d{1,2}(?:\.\d+)?)", stat)
    if m is None:
        return None
    q = float(m[1]) / 100.0
    return q if 0 < q < 1 else None


def _number(d: Mapping[str, object], key: str) -> float:
    if key not in d:
        raise ValueError(f"SLO needs {key!r}")
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"SLO {key!r} must be a number, got {v!r}")
    return float(v)
