"""A fitted GBDT as per-feature threshold tables (QuickScorer), for one-row predictions."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from prism_tui.engine.detector.features import FloatArray

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

