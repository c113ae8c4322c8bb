"""Root cause on recorded simulator runs: the engine's alerts replayed and scored by fault kind.

``prism eval --scenario S --record R.spans.gz --labels R.labels`` keeps every span, the
run-queue readings and the ground truth. This bench replays the recording through the
real :class:`~prism_tui.engine.core.Engine` with detection as ``prism eval --scenario``
runs it (the ``prism`` rule, 1,000 iterations or 10 s of warm-up, 3 s of settling, the
default alert holds; fits inline), pairs its detector alerts into episodes and scores
them against the labels' fault windows with the same code as ``prism eval``: per fault
kind, the fault episodes, those detected, and the firing alerts' top suspects and how
many name a stage consistent with the injected cause (``CAUSE_STAGES``). ``prism eval``
samples no telemetry, so there as here suspects are ranked on stages alone.

    .venv/bin/python bench/rca_sim.py R.spans.gz:R.labels [...] [--json]

Same input, same figures: a change to stage attribution or to the ranking is compared
on the same iterations, free of a 2-vCPU VM's run-to-run noise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prism_sim.labels import read_labels
from prism_tui.engine.core import DetectionConfig, Engine, Observation
from prism_tui.engine.evaluate import (
    Scored,
    alert_episodes,
    rank_of_ends,
    score,
    score_episodes,
)
from prism_tui.engine.recording import ReplayClock, load_recording, replay
from prism_tui.session import SETTLE_S


def replay_scored(spans_path: str, labels_path: str) -> dict[str, Any]:
    """One recording replayed through the engine: per-iteration scores and episodes."""
    rec = load_recording(spans_path)
    labels = read_labels(labels_path)
    clock = ReplayClock(rec.spans[0].start_ns if rec.spans else 0)
    judged: dict[int, list[tuple[int, bool]]] = {}

    def on_observation(obs: Observation) -> None:
        if obs.verdict is not None:
            judged.setdefault(obs.iteration.pid, []).append(
                (obs.iteration.end_ns, obs.verdict.firing))

    engine = Engine(DetectionConfig(rule="prism", warmup=1000, warmup_s=10.0,
                                    settle_s=SETTLE_S),
                    clock=clock, on_observation=on_observation)
    replay(engine, clock, rec.processes, rec.spans, run_queue=rec.run_queue)
    rank_of: dict[int, int] = {}
    rows: list[Scored] = []
    for pid, items in sorted(judged.items()):
        ends = [t for t, _ in items]
        rank, found = rank_of_ends(ends, labels.iterations)
        rank_of[pid] = rank
        rows += [Scored(rank, t, firing, lab.fault_active)
                 for (t, firing), lab in zip(items, found, strict=True) if lab is not None]
    doc = score(rows)
    doc["episodes"] = score_episodes(rows, alert_episodes(engine.alerts, rank_of),
                                     labels.faults)
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    """Print per fault kind the episodes detected and their suspects (or JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recordings", nargs="+", metavar="SPANS:LABELS",
                    help="a recording and its labels, joined by a colon")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    pairs = []
    for item in args.recordings:
        spans, sep, labels = item.rpartition(":")
        if not sep or not spans or not labels:
            ap.error(f"{item!r}: give SPANS:LABELS")
        for path in (spans, labels):
            if not Path(path).is_file():
                print(f"rca_sim: no such file: {path}", file=sys.stderr)
                return 2
        pairs.append((spans, labels))
    docs = {spans: replay_scored(spans, labels) for spans, labels in pairs}
    kinds: dict[str, Counter[str]] = {}
    for doc in docs.values():
        for kind, v in doc["episodes"]["by_fault_kind"].items():
            c = kinds.setdefault(kind, Counter())
            c["episodes"] += v["episodes"]
            c["detected"] += v["detected"]
            c["consistent"] += v["suspect_matches"]
            for stage, n in v["suspects"].items():
                c["suspect " + stage] += n
    if args.json:
        print(json.dumps({"recordings": docs,
                          "by_fault_kind": {k: dict(c) for k, c in sorted(kinds.items())}},
                         indent=2))
        return 0
    print(f"{len(docs)} recording(s) replayed")
    print("| fault kind | episodes | detected | top suspect consistent | top suspects |")
    print("|---|---:|---:|---:|---|")
    for kind, c in sorted(kinds.items()):
        tops = ", ".join(f"{k[8:]} {n}" for k, n in sorted(c.items())
                         if k.startswith("suspect "))
        print(f"| {kind} | {c['episodes']} | {c['detected']} | {c['consistent']} "
              f"| {tops or '-'} |")
    total = sum(c["detected"] for c in kinds.values())
    consistent = sum(c["consistent"] for c in kinds.values())
    print(f"\ntop suspect consistent with the injected cause: {consistent} of {total} "
          "detected fault episodes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
