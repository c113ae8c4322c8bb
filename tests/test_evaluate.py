"""Scoring against ground truth: per-iteration counts, lag and delay per fault episode."""

from __future__ import annotations

from prism_tui.engine.evaluate import Scored, detection_delay_s, detection_lag, score

MS = 1_000_000


def rows(rank: int, pattern: str, step_ms: int = 20) -> list[Scored]:
    """``pattern``: one char per iteration: '.' normal, 'f' fault, 'F' fault + firing,
    'x' normal + firing."""
    return [Scored(rank, (i + 1) * step_ms * MS, c in "Fx", c in "fF")
            for i, c in enumerate(pattern)]


def test_score_counts_each_judged_iteration() -> None:
    r = rows(0, "..x..ffFFF..")
    doc = score(r)
    assert (doc["tp"], doc["fp"], doc["fn"], doc["tn"]) == (3, 1, 2, 6)
    assert doc["precision"] == 0.75 and doc["recall"] == 0.6
    assert doc["fpr"] == round(1 / 7, 4)


def test_lag_and_delay_per_episode_and_rank() -> None:
    r0 = rows(0, "...ffFF....ffff..")  # caught after 2 iterations, then missed
    r1 = rows(1, "...Ffff...", step_ms=10)  # caught at once
    assert detection_lag(r0) == [2]
    assert detection_delay_s(r0 + r1) == [0.04, None, 0.0]
