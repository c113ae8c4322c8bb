"""How mild a slowdown a recording's normal noise lets any limit see at a given FPR.

The ``prism`` rule compares a median of W relative errors, ``E = max(0, (Y - Ŷ) / Y)``,
with its limit. Over a rank's normal iterations (no fault on, and not within ``TAIL_S``
after one: a fault's queue drains after its window) the ``1 - fpr`` quantile ``q`` of
that smoothed error is the lowest limit that keeps the per-iteration false-positive rate
at ``fpr``; a fault that slows every step ``s``-fold has error ``1 - 1/s``, so the
mildest slowdown such a limit sees is ``1 / (1 - q)``. Two models per rank:

* *live*: the ``prism`` detector as ``prism eval`` runs it (warm-up, settling, refits;
  novel iterations, which are not judged, left out);
* *fitted on the run*: the ``prism`` rule's model (a step's physical shape times a
  median GBDT on log-latency) fitted on every normal iteration of the rank and scored on
  those same iterations: in-sample, with no warm-up and no drift, so what it leaves is
  mostly the run's own noise (the host, the simulator). Usually below the live floor,
  not a bound on it.

Per fault and rank it acts on, the same fitted model gives the fault's *unexplained*
slowdown: the median, over its iterations, of latency over the model's prediction for
their workload. It can be far below the labels' slowdown (decode steps under the fault
over those just before it) when the fault grows the batch: its steps are slower partly
because they carry more work, which a workload-aware detector rightly does not flag.
A fault is *above the floor* when its unexplained slowdown exceeds the live floor's.

    .venv/bin/python bench/noise_floor.py --spans R.spans.gz --labels R.labels \\
        [--faults F.json] [--fpr 0.005] [--settle-s 3] [--json]

Recordings come from ``prism eval --scenario S --record R.spans.gz --labels R.labels``
(settles 3 s) or, for a live target, ``bench/eval_llama.py --record PREFIX`` with
``--faults PREFIX.faults.json --settle-s 0``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from detector_sim import DecodeStep, _rebuild, _rebuild_live, observe

from prism_sim.labels import EFFECT_BEFORE_S
from prism_tui.engine.detector import RULES, Detector
from prism_tui.engine.detector.calibration import rule_model, smooth_errors
from prism_tui.engine.detector.features import features
from prism_tui.engine.evaluate import FaultLike
from prism_tui.session import SETTLE_S

TAIL_S = 3.0
"""Seconds after a fault's end whose iterations count neither as normal nor as fault."""


@dataclass(frozen=True)
class Floor:
    """The lowest limit at a false-positive rate, and the mildest slowdown it sees."""

    limit: float
    mildest_slowdown: float


@dataclass(frozen=True)
class RankFloor:
    """One rank's normal noise under the live detector and a model fitted on the run."""

    rank: int
    normal: int
    limit: float
    """The live detector's limit at the end of the run."""
    over_limit: float
    """Share of the normal judged iterations whose smoothed error exceeded it."""
    live: Floor
    fitted: Floor


@dataclass(frozen=True)
class FaultOnRank:
    """One fault on one rank: how much slower than its workload explains, and whether the
    live detector fired in it."""

    type: str
    rank: int
    start_s: float
    """From the rank's first iteration."""
    slowdown: float | None
    """Median latency under it over the median of the normal ones in the
    ``EFFECT_BEFORE_S`` before (``prism_sim.labels.fault_effects``' measure, over the
    decode steps the monitor saw on this rank)."""
    unexplained: float
    """Median of latency over the fitted model's prediction, under it."""
    above_floor: bool
    judged: int
    fired: int


def floor_of(smoothed: npt.ArrayLike, fpr: float) -> Floor:
    """The ``1 - fpr`` quantile of normal smoothed errors and ``1 / (1 - q)``."""
    q = float(np.quantile(np.asarray(smoothed, dtype=np.float64), 1.0 - fpr))
    return Floor(round(q, 4), round(1.0 / (1.0 - q), 3) if q < 1.0 else float("inf"))


def normal_mask(steps: Sequence[DecodeStep]) -> npt.NDArray[np.bool_]:
    """Iterations with no fault on and not within ``TAIL_S`` after a fault's last one."""
    keep = np.ones(len(steps), dtype=bool)
    last_fault: int | None = None
    for i, s in enumerate(steps):
        if s.fault:
            last_fault = s.end_ns
            keep[i] = False
        elif last_fault is not None and s.end_ns - last_fault < TAIL_S * 1e9:
            keep[i] = False
    return keep


def fitted_ratios(steps: Sequence[DecodeStep], normal: npt.NDArray[np.bool_]
                  ) -> npt.NDArray[np.float64]:
    """Latency over the prediction of the ``prism`` rule's model fitted on the normal
    iterations themselves (it extrapolates a step's physical shape beyond their load)."""
    rule = RULES["prism"]
    x = np.array([features(s.workload) for s in steps], dtype=np.float64)
    y = np.array([s.latency_ms for s in steps], dtype=np.float64)
    model = rule_model(rule)
    model.fit(x[normal], y[normal])
    return np.asarray(y / model.predict(x), dtype=np.float64)


def faults_on_rank(rank: int, steps: Sequence[DecodeStep], faults: Sequence[FaultLike],
                   ratios: npt.NDArray[np.float64], normal: npt.NDArray[np.bool_],
                   fired: npt.NDArray[np.bool_], judged: npt.NDArray[np.bool_],
                   floor: float) -> list[FaultOnRank]:
    """Each fault acting on this rank with enough iterations under it (3 or more)."""
    ends = np.array([s.end_ns for s in steps], dtype=np.int64)
    lat = np.array([s.latency_ms for s in steps], dtype=np.float64)
    out = []
    for f in faults:
        if f.rank is not None and f.rank != rank:
            continue
        under = (ends >= f.start_ns) & (ends <= f.end_ns)
        if under.sum() < 3:
            continue
        before = normal & (ends < f.start_ns) & (ends >= f.start_ns - EFFECT_BEFORE_S * 1e9)
        slowdown = (round(float(np.median(lat[under]) / np.median(lat[before])), 3)
                    if before.sum() >= 3 else None)
        unexplained = round(float(np.median(ratios[under])), 3)
        out.append(FaultOnRank(f.type, rank, round((f.start_ns - steps[0].end_ns) / 1e9, 1),
                               slowdown, unexplained, unexplained > floor,
                               int((under & judged).sum()), int((under & fired).sum())))
    return out


def rank_floor(rank: int, steps: Sequence[DecodeStep], fpr: float, settle_s: float,
               warmup: int, warmup_s: float, faults: Sequence[FaultLike] = ()
               ) -> tuple[RankFloor, list[FaultOnRank]] | None:
    """Live and fitted floors of one rank, and its faults (None when nothing normal was
    judged)."""
    det = Detector(rule=RULES["prism"], warmup=warmup, warmup_s=warmup_s,
                   settle_ns=int(settle_s * 1e9))
    normal = normal_mask(steps)
    live: list[float] = []
    fired = np.zeros(len(steps), dtype=bool)
    judged = np.zeros(len(steps), dtype=bool)
    for i, (s, ok) in enumerate(zip(steps, normal, strict=True)):
        v = observe(det, s)
        if v is None or v.novel is not None:
            continue
        judged[i], fired[i] = True, v.firing
        if ok:
            live.append(v.smoothed)
    if not live or det.ucl is None:
        return None
    ratios = fitted_ratios(steps, normal)
    fitted = smooth_errors(np.maximum(0.0, 1.0 - 1.0 / ratios), RULES["prism"])[normal]
    floor = RankFloor(rank, len(live), round(det.ucl, 4),
                      round(float(np.mean(np.asarray(live) > det.ucl)), 4),
                      floor_of(live, fpr), floor_of(fitted, fpr))
    return floor, faults_on_rank(rank, steps, faults, ratios, normal, fired, judged,
                                 floor.live.mildest_slowdown)


def main(argv: Sequence[str] | None = None) -> int:
    """Print each rank's floors (or JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spans", required=True, help="a span recording (.spans.gz)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--labels", help="the simulator's labels of that run")
    src.add_argument("--faults", help="a live target's fault windows (JSON)")
    ap.add_argument("--fpr", type=float, default=0.005,
                    help="per-iteration false-positive rate (default 0.005, the goal's)")
    ap.add_argument("--settle-s", type=float, default=SETTLE_S,
                    help="seconds not trained on at the start (3: prism eval --scenario; "
                         "0 for a live target's recording)")
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--warmup-s", type=float, default=10.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not 0 < args.fpr < 1:
        ap.error("--fpr must be between 0 and 1")
    for path in (args.spans, args.labels or args.faults):
        if not Path(path).is_file():
            print(f"noise_floor: no such file: {path}", file=sys.stderr)
            return 2
    steps, info = (_rebuild(args.spans, args.labels) if args.labels
                   else _rebuild_live(args.spans, args.faults))
    floors: list[RankFloor] = []
    faults: list[FaultOnRank] = []
    for rank in sorted({s.rank for s in steps}):
        found = rank_floor(rank, [s for s in steps if s.rank == rank], args.fpr,
                           args.settle_s, args.warmup, args.warmup_s, info["faults"])
        if found is not None:
            floors.append(found[0])
            faults += found[1]
    if args.json:
        print(json.dumps({"spans": args.spans, "fpr": args.fpr,
                          "ranks": [asdict(f) for f in floors],
                          "faults": [asdict(f) for f in faults]}, indent=2))
        return 0
    print(f"{args.spans}: lowest limit at FPR {args.fpr:.2%} per rank, and the mildest "
          "slowdown of every step it sees")
    print("| rank | normal judged | live limit | normal over it | live: limit, slowdown "
          "| fitted on the run: limit, slowdown |")
    print("|---|---:|---:|---:|---|---|")
    for f in floors:
        print(f"| {f.rank} | {f.normal} | {f.limit:.3f} | {f.over_limit:.2%} "
              f"| {f.live.limit:.3f}, {f.live.mildest_slowdown:.2f}x "
              f"| {f.fitted.limit:.3f}, {f.fitted.mildest_slowdown:.2f}x |")
    print("\n| fault | rank | start s | slowdown | unexplained | above the live floor "
          "| fired / judged |")
    print("|---|---:|---:|---:|---:|---|---|")
    for g in faults:
        slow = "-" if g.slowdown is None else f"{g.slowdown:.2f}x"
        print(f"| {g.type} | {g.rank} | {g.start_s:.0f} | {slow} | {g.unexplained:.2f}x "
              f"| {'yes' if g.above_floor else 'no'} | {g.fired} / {g.judged} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
