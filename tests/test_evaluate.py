"""Scoring against ground truth: per-iteration counts, lag and delay per fault episode."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from prism_tui.engine.evaluate import (
    AlertEpisode,
    Scored,
    alert_episodes,
    detection_delay_s,
    detection_lag,
    rank_of_ends,
    score,
    score_episodes,
)

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


@dataclass(frozen=True)
class Fault:
    type: str
    rank: int | None
    start_ns: int
    end_ns: int


@dataclass(frozen=True)
class Alert:
    status: str
    pid: int
    iteration_end_ns: int
    stage: str | None = None
    source: str = "detector"
    suspects: tuple[dict[str, Any], ...] = field(default=())

    @property
    def target(self) -> dict[str, Any]:
        return {"pid": self.pid}


def alert(status: str, pid: int, at_ms: int, stage: str | None = None) -> Alert:
    return Alert(status, pid, at_ms * MS, stage,
                 suspects=({"stage": stage},) if stage else ())


def test_alerts_pair_into_episodes_per_target() -> None:
    alerts = [alert("firing", 10, 100, "host"), alert("firing", 11, 120, "collective"),
              alert("resolved", 10, 900, "runqueue"), alert("firing", 10, 2000),
              alert("resolved", 99, 50), Alert("firing", 10, 150, source="slo")]
    assert alert_episodes(alerts, {10: 0, 11: 1}) == [
        AlertEpisode(0, 100 * MS, 900 * MS, "host", "runqueue"),
        AlertEpisode(1, 120 * MS, None, "collective"),
        AlertEpisode(0, 2000 * MS, None, None)]


def test_episode_figures_per_fault_and_rank() -> None:
    # 10 ms iterations over 10 s on two ranks; faults at 2-4 s (squeeze) and 6-7 s
    judged = [Scored(rank, t * 10 * MS, False, False) for rank in (0, 1) for t in range(1000)]
    faults = [Fault("cpu_squeeze", None, 2000 * MS, 4000 * MS),
              Fault("device_slowdown", 1, 6000 * MS, 7000 * MS)]
    episodes = [
        AlertEpisode(0, 2500 * MS, 4200 * MS, "host"),  # squeeze, rank 0: right cause
        AlertEpisode(0, 3500 * MS, 3900 * MS, "runqueue"),  # ... paged twice
        AlertEpisode(1, 1500 * MS, 1800 * MS, "host"),  # before any fault: false
        AlertEpisode(1, 8500 * MS, None, "host"),  # 1.5 s after it ended: its late page
        AlertEpisode(0, 9500 * MS, None, "host"),  # 2.5 s after: false
    ]
    doc = score_episodes(judged, episodes, faults)
    assert doc["fault_episodes"] == 4  # two faults on two lockstep ranks
    assert doc["episodes_detected"] == 2  # squeeze on rank 0, slowdown on rank 1
    assert doc["false_episodes"] == 2 and doc["alert_episodes"] == 5
    assert doc["false_episodes_per_hour"] == round(2 / (2 * 9.99 / 3600), 2)
    assert doc["firings_per_fault_episode"] == {"mean": 1.5, "max": 2}
    assert doc["detection_delay_ms"] == {"median": 2500.0, "max": 2500.0}  # 500 and 2,500
    assert doc["detection_delay_iterations"] == {"median": 250.0, "max": 250.0}  # 50, 250
    squeeze = doc["by_fault_kind"]["cpu_squeeze"]
    assert (squeeze["episodes"], squeeze["detected"], squeeze["suspect_matches"]) == (2, 1, 1)
    slowdown = doc["by_fault_kind"]["device_slowdown"]
    assert slowdown["top_suspect"] == "host" and slowdown["suspect_matches"] == 0
    # a fault nobody judged (warm-up) is no fault episode
    assert score_episodes(judged[500:1000], [], faults)["fault_episodes"] == 1


def test_window_recall_counts_the_abnormal_iterations_ending_inside_the_window() -> None:
    """Only abnormal iterations that ended within [start, end] count; none judged is None."""
    from prism_tui.engine.evaluate import Scored, window_recall

    rows = [Scored(0, 5, True, False), Scored(0, 10, True, True), Scored(0, 15, False, True),
            Scored(0, 20, True, True), Scored(0, 25, True, True)]
    assert window_recall(rows, 10, 20) == {"judged": 3, "fired": 2, "recall": 0.6667,
                                           "detected": True}
    assert window_recall(rows, 30, 40) == {"judged": 0, "fired": 0, "recall": None,
                                           "detected": False}


@dataclass(frozen=True)
class Label:
    """An iteration label as ``prism_sim.labels.IterationRecord`` has it."""

    rank: int
    start_ns: int
    end_ns: int
    phase: str = "decode"
    fault_active: bool = False


def test_a_recorded_pid_takes_the_rank_whose_iterations_hold_most_of_its_ends() -> None:
    """Rank 1's iterations hold three of the four ends, rank 0's one; each end gets its
    label of the chosen rank, None where none holds it; a tie goes to the lower rank."""
    labels = [Label(0, 0, 10), Label(0, 10, 20), Label(1, 5, 15), Label(1, 15, 25),
              Label(1, 25, 35)]
    rank, found = rank_of_ends([12, 20, 30, 40], labels)
    assert rank == 1 and found == [labels[2], labels[3], labels[4], None]
    assert rank_of_ends([7], labels) == (0, [labels[0]])  # rank 0 and 1 both hold it
    with pytest.raises(ValueError, match="no labelled iterations"):
        rank_of_ends([1], [])
