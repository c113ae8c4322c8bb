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


def rank_of_ends(end_ns: Sequence[int], labels: Sequence[L]) -> tuple[int, list[L | None]]:
    """The rank whose labelled iterations contain most of ``end_ns``, with each end's label
    of that rank (None where none contains it): a recording names pids, its labels ranks.

    Ties go to the lowest rank. Raises ValueError when ``labels`` is empty.
    """
    by_rank: dict[int, list[L]] = {}
    for lab in labels:
        by_rank.setdefault(lab.rank, []).append(lab)
    if not by_rank:
        raise ValueError("no labelled iterations to match")
    best: tuple[int, int, list[L | None]] | None = None
    for rank in sorted(by_rank):
        found = labels_at(end_ns, by_rank[rank])
        n = sum(lab is not None for lab in found)
        if best is None or n > best[0]:
            best = (n, rank, found)
    assert best is not None
    return best[1], best[2]


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


def window_recall(rows: Sequence[Scored], start_ns: int, end_ns: int) -> dict[str, Any]:
    """The abnormal iterations that ended inside one fault window: how many were judged,
    how many fired, the share that fired (recall, None when none was judged) and whether
    any did (detected)."""
    inside = [r for r in rows if r.fault and start_ns <= r.end_ns <= end_ns]
    fired = sum(r.firing for r in inside)
    return {"judged": len(inside), "fired": fired,
            "recall": round(fired / len(inside), 4) if inside else None,
            "detected": fired > 0}


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


# ----------------------------------------------------------------------- episodes

CAUSE_STAGES: dict[str, frozenset[str]] = {
    # the host's CPU work: the Python loop, API calls, waiting for a CPU
    "cpu_squeeze": frozenset({"host", "runqueue", "launch", "graph_launch", "event"}),
    "cpu_throttle": frozenset({"host", "runqueue", "launch", "graph_launch", "event"}),
    "memory_pressure": frozenset({"host", "runqueue", "launch", "graph_launch", "event"}),
    "gc_storm": frozenset({"host", "runqueue"}),
    "gil_contention": frozenset({"host", "runqueue"}),
    # the device: waiting for its kernels (a slow rank holds its peers in collectives)
    "device_slowdown": frozenset({"device_sync", "collective"}),
    "device_preemption": frozenset({"device_sync", "collective"}),
    "straggler": frozenset({"device_sync", "collective"}),
    # the links: collectives and copies
    "interconnect_squeeze": frozenset({"collective", "p2p", "memcpy"}),
}
"""Per injected fault type, the stages a root-cause hint consistent with it names."""

EPISODE_TOLERANCE_NS = 2_000_000_000
"""An alert episode that opens up to this long after a fault ended still belongs to it
(the smoothing and the episode's open hold lag the fault)."""


class FaultLike(Protocol):
    """A fault window (``prism_sim.labels.FaultRecord`` fits)."""

    @property
    def type(self) -> str: ...
    @property
    def rank(self) -> int | None: ...
    @property
    def start_ns(self) -> int: ...
    @property
    def end_ns(self) -> int: ...


class AlertLike(Protocol):
    """An alert as the engine emits it (``prism_tui.engine.core.AlertEvent`` fits)."""

    @property
    def status(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def target(self) -> dict[str, Any]: ...
    @property
    def iteration_end_ns(self) -> int: ...
    @property
    def suspects(self) -> tuple[dict[str, Any], ...]: ...


@dataclass(frozen=True)
class AlertEpisode:
    """One detector alert episode of one rank: its ``firing`` alert and its ``resolved``."""

    rank: int
    opened_ns: int
    closed_ns: int | None
    suspect: str | None
    """The top root-cause suspect's stage in the firing alert."""
    episode_suspect: str | None = None
    """... in the resolved alert (ranked over the whole episode)."""


def alert_episodes(alerts: Sequence[AlertLike], rank_of: dict[int, int]) -> list[AlertEpisode]:
    """Pair each target's detector ``firing`` alerts with the ``resolved`` that follows."""
    out: list[AlertEpisode] = []
    open_: dict[int, AlertLike] = {}
    for a in sorted(alerts, key=lambda x: x.iteration_end_ns):
        rank = rank_of.get(int(a.target.get("pid", -1)))
        if a.source != "detector" or rank is None:
            continue
        if a.status == "firing":
            open_[rank] = a
        elif a.status == "resolved" and rank in open_:
            fired = open_.pop(rank)
            out.append(AlertEpisode(rank, fired.iteration_end_ns, a.iteration_end_ns,
                                    _top(fired), _top(a)))
    out += [AlertEpisode(rank, a.iteration_end_ns, None, _top(a)) for rank, a in open_.items()]
    return sorted(out, key=lambda e: (e.opened_ns, e.rank))


def _top(alert: AlertLike) -> str | None:
    return str(alert.suspects[0]["stage"]) if alert.suspects else None


def score_episodes(rows: Sequence[Scored], episodes: Sequence[AlertEpisode],
                   faults: Sequence[FaultLike], *,
                   tolerance_ns: int = EPISODE_TOLERANCE_NS) -> dict[str, Any]:
    """Alert episodes against fault windows, per judged rank (what an on-call sees).

    A *fault episode* is a fault and a rank judged during it (tensor-parallel ranks run
    in lockstep: a fault on one slows all, as the per-iteration labels say). It is
    detected when an alert episode of that rank opens between the fault's start and
    ``tolerance_ns`` after its end; every such opening counts as a firing of it. An
    alert episode opening outside every fault (with the tolerance) is *false*. Delays
    run from the fault's start to the opening alert's iteration, in ms and in judged
    iterations of the rank. Per fault type: how many were detected and whether the
    firing alert's top suspect names a stage consistent with the cause (CAUSE_STAGES).
    """
    by_rank: dict[int, list[int]] = {}
    for r in rows:
        by_rank.setdefault(r.rank, []).append(r.end_ns)
    for ends in by_rank.values():
        ends.sort()
    opened: dict[int, list[AlertEpisode]] = {}
    for e in episodes:
        opened.setdefault(e.rank, []).append(e)
    fault_episodes = detected = 0
    firings: list[int] = []
    delays_ms: list[float] = []
    delays_it: list[int] = []
    kinds: dict[str, dict[str, Any]] = {}
    for f in sorted(faults, key=lambda x: x.start_ns):
        for rank, ends in sorted(by_rank.items()):
            lo = bisect.bisect_left(ends, f.start_ns)
            if lo >= len(ends) or ends[lo] > f.end_ns:
                continue  # not judged during the fault (warm-up, no traffic)
            fault_episodes += 1
            kind = kinds.setdefault(f.type, {"episodes": 0, "detected": 0, "suspects": {},
                                             "suspect_matches": 0})
            kind["episodes"] += 1
            hits = [e for e in opened.get(rank, [])
                    if f.start_ns <= e.opened_ns <= f.end_ns + tolerance_ns]
            if not hits:
                continue
            detected += 1
            kind["detected"] += 1
            firings.append(len(hits))
            first = hits[0]
            delays_ms.append(round((first.opened_ns - f.start_ns) / 1e6, 1))
            delays_it.append(bisect.bisect_left(ends, first.opened_ns) - lo)
            suspect = first.suspect or "none"
            kind["suspects"][suspect] = kind["suspects"].get(suspect, 0) + 1
            kind["suspect_matches"] += first.suspect in CAUSE_STAGES.get(f.type, frozenset())
    false = [e for e in episodes
             if not any(f.start_ns <= e.opened_ns <= f.end_ns + tolerance_ns
                        for f in faults)]
    judged_h = sum(ends[-1] - ends[0] for ends in by_rank.values() if ends) / 3.6e12
    for kind in kinds.values():
        kind["top_suspect"] = (max(kind["suspects"], key=kind["suspects"].get)
                               if kind["suspects"] else None)
    return {
        "fault_episodes": fault_episodes,
        "episodes_detected": detected,
        "alert_episodes": len(episodes),
        "false_episodes": len(false),
        "false_episodes_per_hour": round(len(false) / judged_h, 2) if judged_h else None,
        "firings_per_fault_episode": {
            "mean": round(sum(firings) / len(firings), 3) if firings else None,
            "max": max(firings, default=None)},
        "detection_delay_ms": _spread(delays_ms),
        "detection_delay_iterations": _spread([float(d) for d in delays_it]),
        "by_fault_kind": {k: kinds[k] for k in sorted(kinds)},
    }


def _spread(values: Sequence[float]) -> dict[str, float | None]:
    """Median and max of ``values`` (None when empty)."""
    if not values:
        return {"median": None, "max": None}
    s = sorted(values)
    return {"median": s[len(s) // 2], "max": s[-1]}
