"""The paper's workload features of a decode iteration, and input validation.

A decode step's latency is explained by its batch and context: B, average input and
output lengths, ``kv_len = in + out`` and ``B · kv_len`` (the paper's five features).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

FEATURE_NAMES: tuple[str, ...] = ("batch_size", "avg_input", "avg_output", "kv_len", "b_kv")
# Values beyond this cannot be represented by the float32 trees of scikit-learn.
MAX_FEATURE = 1e30


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
        return valid_features(features(self))


def valid_features(x: tuple[float, float, float, float, float]) -> bool:
    """Whether a workload's features are finite, representable, B > 0 and lengths >= 0."""
    if not all(math.isfinite(v) and abs(v) < MAX_FEATURE for v in x):
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


def valid_latency(v: float) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return None
    if not math.isfinite(f) or f <= 0 or f > MAX_FEATURE:
        return None
    return f


def is_nonpositive(v: float) -> bool:
    try:
        f = float(v)
        return math.isfinite(f) and f <= 0
    except (TypeError, ValueError, OverflowError):
        return False
