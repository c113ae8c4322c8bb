"""The baseline latency model: the paper's GBDT, or the physical shape times a median GBDT."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

from prism_tui.engine.detector.features import FloatArray
from prism_tui.engine.detector.trees import TreeEnsemble


class _Regressor(Protocol):
    """The part of a scikit-learn regressor the model uses."""

    def fit(self, x: FloatArray, y: FloatArray) -> object: ...

    def predict(self, x: FloatArray) -> npt.ArrayLike: ...

Transition = Literal["firing", "resolved"]



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

    def __getstate__(self) -> dict[str, object]:
        """Pickled without the scikit-learn estimator once its trees are tabled: the
        monitor unpickles the fit worker's models and then predicts from the tables,
        never importing scikit-learn and SciPy (~30 MiB of modules, and seconds of
        imports on its loop at the first model)."""
        state = self.__dict__.copy()
        if state.get("_trees") is not None:
            state["_est"] = None
        return state

    def predict(self, x: npt.ArrayLike) -> FloatArray:
        """Predicted latency for each row of ``x`` (same unit as the training target)."""
        if not self.fitted:
            raise ValueError("BaselineModel.predict called before fit")
        xa = np.asarray(x, dtype=np.float64)
        if xa.ndim == 1:
            xa = xa.reshape(1, -1)
        raw: FloatArray
        if self._trees is not None and (len(xa) <= TreeEnsemble.MAX_ROWS or self._est is None):
            raw = self._trees.predict(xa)
        else:
            assert self._est is not None  # kept whenever the trees could not be tabled
            raw = np.asarray(self._est.predict(xa), dtype=np.float64)
        if self._shape is not None:
            base = self._shape.predict(xa)
            return base * np.exp(raw) if self.target == "log" else base + raw
        return np.exp(raw) if self.target == "log" else raw



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
