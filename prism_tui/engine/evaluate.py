"""Score the monitor's verdicts against the simulator's ground truth, as the paper does.

Each decode iteration the monitor judged (after warm-up) is matched to the simulator's
label of the same iteration: the label of that rank whose span contains the monitor's
iteration end (the synchronisation returns inside the rank's iteration, which then
samples and reports), then scored per iteration:
positive when the detector is firing, truly positive when a fault was active.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar


class LabelLike(Protocol):
    """An iteration label (``prism_sim.labels.IterationRecord`` fits)."""

    @property
    def rank(self) -> int: ...
    @property
    def start_ns(self) -> int: ...
    @property
    def end_ns(self) -> int: ...
    @property
    def phase(self) -> str: ...
    @property
    def fault_active(self) -> bool: ...


@dataclass(frozen=True)
class Scored:
    """One judged iteration: when it ended, what the detector said, what was true."""

    rank: int
    end_ns: int
    firing: bool
    fault: bool


L = TypeVar("L", bound=LabelLike)


def labels_at(end_ns: Sequence[int], labels: Sequence[L]) -> list[L | None]:
    """For each iteration end, the label (of one rank) whose iteration contains it."""
    mine = sorted(labels, key=lambda lab: lab.end_ns)
    ends = [lab.end_ns for lab in mine]
    out: list[L | None] = []
    for t in end_ns:
        i = bisect.bisect_left(ends, t)
        out.append(mine[i] if i < len(mine) and mine[i].start_ns <= t else None)
    return out


def match(rank: int, end_ns: Sequence[int], firing: Sequence[bool],
          labels: Sequence[LabelLike]) -> list[Scored]:
    """Pair a rank's judged iterations with its labels (unmatched ones are dropped)."""
    found = labels_at(end_ns, [lab for lab in labels if lab.rank == rank])
    return [Scored(rank, t, f, lab.fault_active)
            for t, f, lab in zip(end_ns, firing, found, strict=True) if lab is not None]


def score(rows: Sequence[Scored]) -> dict[str, Any]:
    """Precision, recall, F1 and false-positive rate over judged iterations."""
    tp = sum(r.firing and r.fault for r in rows)
    fp = sum(r.firing and not r.fault for r in rows)
    fn = sum(not r.firing and r.fault for r in rows)
    tn = sum(not r.firing and not r.fault for r in rows)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"iterations": len(rows), "abnormal": tp + fn, "tp": tp, "fp": fp, "fn": fn,
            "tn": tn, "precision": round(precision, 4), "recall": round(recall, 4),
            "f1": round(f1, 4), "fpr": round(fp / (fp + tn), 4) if fp + tn else 0.0}


def detection_lag(rows: Sequence[Scored]) -> list[int]:
    """Per fault episode, iterations from its first abnormal iteration to the first alarm."""
    lags: list[int] = []
    start: int | None = None
    found = False
    for i, r in enumerate(rows):
        if not r.fault:
            start = None
            continue
        if start is None:
            start, found = i, False
        if not found and r.firing:
            lags.append(i - start)
            found = True
    return lags


def detection_delay_s(rows: Sequence[Scored]) -> list[float | None]:
    """Per rank and fault episode, seconds from its first abnormal iteration to the first
    alarm in it (None: the episode was missed)."""
    out: list[float | None] = []
    by_rank: dict[int, list[Scored]] = {}
    for r in rows:
        by_rank.setdefault(r.rank, []).append(r)
    for mine in by_rank.values():
        start: int | None = None
        found = False
        for r in sorted(mine, key=lambda x: x.end_ns):
            if not r.fault:
                if start is not None and not found:
                    out.append(None)
                start = None
                continue
            if start is None:
                start, found = r.end_ns, False
            if not found and r.firing:
                out.append(round((r.end_ns - start) / 1e9, 4))
                found = True
        if start is not None and not found:
            out.append(None)
    return out
