"""Detector rules compared offline on a simulator run recorded through real uprobes.

``prism eval --record SPANS --labels LABELS`` keeps what the monitor saw (every span of
both ranks) and the simulator's ground truth. This bench replays the spans through the
real :class:`~prism_tui.engine.core.Engine` once to rebuild the decode iterations and
their workload (batch size and context from call arguments), then runs each detector
rule over the same iterations and scores it per iteration against the labels, as
``prism eval`` does. Same input for every rule, so differences are the rules' own, not
the run-to-run noise of a 2-vCPU VM.

    .venv/bin/prism eval --scenario paper --rule prism --warmup 1000 \\
        --record /tmp/paper.spans.gz --labels /tmp/paper.labels.jsonl
    .venv/bin/python bench/detector_sim.py --spans /tmp/paper.spans.gz \\
        --labels /tmp/paper.labels.jsonl [--warmup 1000] [--json]

A live target's run (``prism eval --pid P --faults F --record SPANS --labels WINDOWS``,
or ``bench/eval_llama.py --record PREFIX``) replays with ``--faults WINDOWS`` instead of
``--labels``: an iteration is abnormal when it overlaps an injected fault window.

Fits run inline at the iteration that completes the warm-up (live, they run in an
executor and a few iterations pass before the model is installed), so absolute figures
differ slightly from the live run's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from detector_variants import PRISM_GBDT_FAST_FIRE, PRISM_GBDT_FAST_FIRE_POLICY, fast_fire

from prism_sim.labels import read_labels
from prism_tui.engine.core import DetectionConfig, Engine, Observation, workload_of
from prism_tui.engine.detector import (
    RULES,
    Detector,
    DetectorRule,
    FirePolicy,
    Verdict,
    Workload,
)
from prism_tui.engine.episodes import EpisodeGate, EpisodeHolds
from prism_tui.engine.evaluate import (
    AlertEpisode,
    FaultLike,
    Scored,
    detection_lag,
    rank_of_ends,
    score,
    score_episodes,
)
from prism_tui.engine.recording import ReplayClock, load_spans, replay
from prism_tui.eval_target import FaultWindow


@dataclass(frozen=True)
class DecodeStep:
    """One decode iteration as the monitor saw it, with its ground truth."""

    rank: int
    end_ns: int
    latency_ms: float
    workload: Workload
    fault: bool
    true_batch: int
    true_kv: int


def _decode_iterations(spans_path: str
                       ) -> tuple[dict[int, list[tuple[int, float, Workload]]], int]:
    """Replay the recording once through the engine (which never fits): each pid's
    decode iterations as (end, latency ms, workload), and the number of spans."""
    procs, spans = load_spans(spans_path)
    clock = ReplayClock(spans[0].start_ns if spans else 0)
    seen: dict[int, list[tuple[int, float, Workload]]] = {}

    def on_observation(obs: Observation) -> None:
        it = obs.iteration
        if it.phase == "decode":
            seen.setdefault(it.pid, []).append((it.end_ns, it.latency_ms, workload_of(it)))

    engine = Engine(DetectionConfig(rule="paper", warmup=10**12), clock=clock,
                    on_observation=on_observation)
    replay(engine, clock, procs, spans)
    return seen, len(spans)


def _rebuild(spans_path: str, labels_path: str) -> tuple[list[DecodeStep], dict[str, Any]]:
    """Replay the recording once; decode iterations matched to their labels, per rank."""
    seen, n_spans = _decode_iterations(spans_path)
    labels = read_labels(labels_path)
    steps: list[DecodeStep] = []
    info: dict[str, Any] = {"spans": n_spans, "ranks": {}}
    for pid, items in sorted(seen.items()):
        rank, found = rank_of_ends([item[0] for item in items], labels.iterations)
        pairs = [(item, lab) for item, lab in zip(items, found, strict=True) if lab is not None]
        info["ranks"][pid] = {"rank": rank, "decode_iterations": len(items),
                              "matched": len(pairs)}
        steps += [DecodeStep(rank, t, lat, w, lab.fault_active, lab.batch_size, lab.kv_len)
                  for (t, lat, w), lab in pairs]
    info["iterations"] = len(steps)
    info["fault_iterations"] = sum(s.fault for s in steps)
    info["faults"] = labels.faults
    return steps, info


def _rebuild_live(spans_path: str, faults_path: str
                  ) -> tuple[list[DecodeStep], dict[str, Any]]:
    """Replay a live target's recording; decode iterations marked abnormal when they
    overlap an injected fault window (as ``prism eval --pid`` scores them)."""
    seen, n_spans = _decode_iterations(spans_path)
    with open(faults_path) as f:
        doc = json.load(f)
    rank_of = {int(pid): rank for pid, rank in doc["ranks"].items()}
    windows = [FaultWindow(w["type"], w["intensity"], w["start_ns"], w["end_ns"],
                           w.get("effect")) for w in doc["faults"]]
    steps: list[DecodeStep] = []
    for pid, items in sorted(seen.items()):
        for t, lat, w in items:
            start = t - int(lat * 1e6)
            fault = any(fw.start_ns < t and start < fw.end_ns for fw in windows)
            steps.append(DecodeStep(rank_of.get(pid, 0), t, lat, w, fault,
                                    round(w.batch_size), round(w.kv_len)))
    info: dict[str, Any] = {"spans": n_spans, "iterations": len(steps),
                            "fault_iterations": sum(s.fault for s in steps),
                            "faults": windows}
    return steps, info


def observe(det: Detector, s: DecodeStep) -> Verdict | None:
    """One iteration, then the refit the engine would start (inline here)."""
    v = det.observe(s.end_ns, s.latency_ms, s.workload)
    if det.refit_due:
        det.refit_now()
    return v


def run_rule(steps: Sequence[DecodeStep], rule: DetectorRule, warmup: int,
             warmup_s: float = 0.0, faults: Sequence[FaultLike] = (),
             holds: EpisodeHolds | None = None,
             fire: Callable[[DetectorRule], FirePolicy] = FirePolicy,
             settle_s: float = 0.0) -> dict[str, Any]:
    """One rule over every rank's iterations (a detector per rank), scored per iteration
    and, with the engine's alert episodes (``holds``), per episode; each rank's first
    ``settle_s`` seconds are not trained on (as for a target started with the monitor)."""
    rows: list[Scored] = []
    episodes: list[AlertEpisode] = []
    alerts = 0
    novel = 0
    tail_fp = 0  # false positives within TAIL_S of a fault's end: the alert not yet resolved
    ucls = []
    t0 = time.perf_counter()
    for rank in sorted({s.rank for s in steps}):
        det = Detector(rule=rule, warmup=warmup, warmup_s=warmup_s, fire_policy=fire,
                       settle_ns=int(settle_s * 1e9))
        gate = EpisodeGate(holds)
        fault_end: int | None = None
        prev_fault = False
        for s in (s for s in steps if s.rank == rank):
            if prev_fault and not s.fault:
                fault_end = s.end_ns
            prev_fault = s.fault
            v = observe(det, s)
            if v is None:
                continue
            novel += v.novel is not None
            alerts += v.transition == "firing"
            tail_fp += (v.firing and not s.fault and fault_end is not None
                        and s.end_ns - fault_end < TAIL_S * 1e9)
            rows.append(Scored(rank, s.end_ns, v.firing, s.fault))
            if gate.observe(s.end_ns, v.firing) == "opened":
                episodes.append(AlertEpisode(rank, s.end_ns, None, None))
        ucls.append(round(det.ucl or 0.0, 3))
    doc = score(rows)
    lags = detection_lag(rows)
    doc["episodes"] = score_episodes(rows, episodes, faults)
    doc.update(rule=rule.name, alerts=alerts, novel=novel, fp_after_fault=tail_fp, ucl=ucls,
               lag_iterations=lags, seconds=round(time.perf_counter() - t0, 1))
    return doc


TAIL_S = 2.0


def false_alarm_context(steps: Sequence[DecodeStep], rule: DetectorRule, warmup: int,
                        ) -> list[dict[str, Any]]:
    """Where a rule's false alarms start: time since the last fault ended, workload."""
    out = []
    for rank in sorted({s.rank for s in steps}):
        mine = [s for s in steps if s.rank == rank]
        det = Detector(rule=rule, warmup=warmup)
        last_fault_end: int | None = None
        for prev, s in zip([None, *mine[:-1]], mine, strict=True):
            if prev is not None and prev.fault and not s.fault:
                last_fault_end = s.end_ns
            v = observe(det, s)
            if v is not None and v.transition == "firing" and not s.fault:
                out.append({
                    "rank": rank, "t_s": round((s.end_ns - mine[0].end_ns) / 1e9, 1),
                    "since_fault_s": None if last_fault_end is None
                    else round((s.end_ns - last_fault_end) / 1e9, 1),
                    "batch": s.workload.batch_size, "true_batch": s.true_batch,
                    "kv": round(s.workload.avg_input), "true_kv": s.true_kv,
                    "observed_ms": round(v.observed_ms, 2),
                    "predicted_ms": round(v.predicted_ms, 2),
                    "smoothed": round(v.smoothed, 3), "ucl": round(v.ucl, 3)})
    return out


VARIANTS: dict[str, DetectorRule] = {
    "paper": RULES["paper"],
    "prism": RULES["prism"],
    "prism-gbdt-fast-fire": PRISM_GBDT_FAST_FIRE,
}

_PRISM = RULES["prism"]
EXPLORE: dict[str, DetectorRule] = {
    "prism, leaves of 1 row": dataclasses.replace(_PRISM, min_samples_leaf=1),
    "prism, leaves of 50 rows": dataclasses.replace(_PRISM, min_samples_leaf=50),
    "prism, 2 raw errors above 1.2 x UCL fire": _PRISM,
    "prism, 2 raw errors below 0.1 x UCL resolve": dataclasses.replace(
        _PRISM, resolve_clear=0.1, clear_after=2),
    "prism, trained range from min to max": dataclasses.replace(
        _PRISM, range_quantile=0.0),
    "prism, trained range from the 2nd to the 98th percentile": dataclasses.replace(
        _PRISM, range_quantile=0.02),
    "prism, one iteration within 0.2 x UCL resolves": dataclasses.replace(
        _PRISM, resolve_clear=0.2, clear_after=1),
    "prism, one iteration within 0.3 x UCL resolves": dataclasses.replace(
        _PRISM, resolve_clear=0.3, clear_after=1),
    "prism, limit floored at 0.05": dataclasses.replace(
        _PRISM, ucl_floor=0.05),
    "prism, floor 0.2": dataclasses.replace(_PRISM, ucl_floor=0.2),
    "prism, floor 0.25": dataclasses.replace(_PRISM, ucl_floor=0.25),
    "prism, floor 0.3": dataclasses.replace(_PRISM, ucl_floor=0.3),
    "prism, a new regime judged by its refit alone, its settling refit may widen the "
    "limit": dataclasses.replace(
        _PRISM, bound_by_previous=False, settle_keeps_limit=False),
    "prism, without the previous model's bound": dataclasses.replace(
        _PRISM, bound_by_previous=False),
    "prism, the settling refit may widen the limit": dataclasses.replace(
        _PRISM, settle_keeps_limit=False),
    "prism, every warm-up episode sets the limit":
        dataclasses.replace(_PRISM, ucl_skip_episodes=0),
    "prism, the worst episode never sets the limit": dataclasses.replace(
        _PRISM, episode_outlier=1.0),
    "prism, the worst episode never sets the limit, ×1.75": dataclasses.replace(
        _PRISM, episode_outlier=1.0, ucl_scale=1.75),
    "prism, q99 × 2": dataclasses.replace(_PRISM, quantile=0.99, ucl_scale=2.0),
    "prism, q99 × 1.75": dataclasses.replace(_PRISM, quantile=0.99, ucl_scale=1.75),
    "prism, q99.5 × 1.75": dataclasses.replace(_PRISM, quantile=0.995, ucl_scale=1.75),
    "prism, refits may widen the limit": dataclasses.replace(
        _PRISM, refit_ucl_growth=None),
    "prism, refits narrow the limit to 0.9 x the warm-up's": dataclasses.replace(
        _PRISM, refit_ucl_growth=0.9),
    "prism, W10": dataclasses.replace(_PRISM, window=10),
    "prism, q99.5": dataclasses.replace(_PRISM, quantile=0.995),
    "prism, ×1.0": dataclasses.replace(_PRISM, ucl_scale=1.0),
    "prism, ×1.25": dataclasses.replace(_PRISM, ucl_scale=1.25),
    "prism, ×1.25, resolve on smoothed errors": dataclasses.replace(
        _PRISM, ucl_scale=1.25, resolve_on="smoothed"),
    "prism, resolve on smoothed errors": dataclasses.replace(_PRISM, resolve_on="smoothed"),
    "prism, resolve 2": dataclasses.replace(_PRISM, resolve_after=2),
    "prism, resolve 5": dataclasses.replace(_PRISM, resolve_after=5),
}

FIRE_POLICIES: dict[str, Callable[[DetectorRule], FirePolicy]] = {
    "prism-gbdt-fast-fire": PRISM_GBDT_FAST_FIRE_POLICY,
    "prism, 2 raw errors above 1.2 x UCL fire": fast_fire(2, 1.2),
}
"""Variants whose firing policy is not the rule's own (detector_variants.py)."""


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spans", required=True, help="recording from prism eval --record")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--labels", help="labels from prism eval --scenario ... --labels")
    src.add_argument("--faults", help="fault windows from prism eval --pid ... --labels "
                     "(a live target)")
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--warmup-s", type=float, default=0.0,
                    help="... or seconds, whichever first (prism watch: 10; default 0 here, "
                    "so replays of older recordings keep their figures)")
    ap.add_argument("--settle-s", type=float, default=0.0,
                    help="seconds of each rank's first iterations not trained on (prism "
                    "demo and prism eval --scenario: 3; default 0, so replays of older "
                    "recordings keep their figures)")
    ap.add_argument("--rules", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--explore", action="store_true", help="also the variants explored")
    ap.add_argument("--why", action="store_true", help="list where false alarms start")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    steps, info = (_rebuild(args.spans, args.labels) if args.labels
                   else _rebuild_live(args.spans, args.faults))
    info["rebuild_s"] = round(time.perf_counter() - t0, 1)
    rules = {name: VARIANTS[name] for name in args.rules}
    if args.explore:
        rules |= EXPLORE
    faults = info.pop("faults")
    results = [run_rule(steps, dataclasses.replace(rule, name=name), args.warmup,
                        args.warmup_s, faults, fire=FIRE_POLICIES.get(name, FirePolicy),
                        settle_s=args.settle_s)
               for name, rule in rules.items()]
    if args.json:
        print(json.dumps({"input": info, "results": results}, indent=2))
        return 0
    print(f"{info['spans']} spans, {len(steps)} decode iterations matched to labels "
          f"({sum(s.fault for s in steps)} during a fault), rebuilt in {info['rebuild_s']} s")
    print()
    print("| rule | UCL per rank | judged | abnormal | precision | recall | F1 | FPR "
          f"| false positives (≤ {TAIL_S:.0f} s after a fault / elsewhere) | alerts | novel "
          "| lag (iterations) | fault episodes paged | false episodes | firings per fault |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in results:
        ep = r["episodes"]
        lags = r["lag_iterations"]
        lag = f"{min(lags)}–{max(lags)}" if lags else "–"
        ucl = " / ".join(f"{u:.3f}" for u in r["ucl"])
        print(f"| {r['rule']} | {ucl} | {r['iterations']} | {r['abnormal']} "
              f"| {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} "
              f"| {r['fpr'] * 100:.2f} % | {r['fp_after_fault']} / "
              f"{r['fp'] - r['fp_after_fault']} | {r['alerts']} | {r['novel']} | {lag} "
              f"| {ep['episodes_detected']} / {ep['fault_episodes']} | {ep['false_episodes']} "
              f"| {ep['firings_per_fault_episode']['max']} |")
    if args.why:
        for name, rule in rules.items():
            print(f"\nfalse alarms of {name}:")
            for row in false_alarm_context(steps, rule, args.warmup):
                print("  " + json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
