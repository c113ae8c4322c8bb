"""Engine ingest on one core: spans to iterations, stages, sketches and verdicts, per second.

A recording of the simulated server as the monitor saw it through real uprobes (by
default ``tests/data/sim_spans.jsonl.gz``: two ranks, the ``cuda`` and ``nccl``
profiles; or any ``prism eval --record`` file) is loaded once, then replayed through a
fresh :class:`~prism_tui.engine.core.Engine` per round, in batches of 64 spans per
process as the rings deliver them, with this process pinned to one CPU. Two engines,
interleaved over the rounds (median kept):

* ``warm-up``: no model yet: iterations cut at the anchor, stage attribution, t-digest
  windows per (stage, device, phase), workload features and the detector's training
  rows: what every span costs;
* ``judged``: the same with the ``prism`` rule's model installed after 150 decode
  iterations per rank, so every later decode iteration is also predicted and judged.
  The fits themselves (in the runtime, a separate process) are timed and left out.
  Spans are kept for the dashboard's trace export, as ``prism watch`` with a dashboard;
* ``judged, headless``: the same keeping no spans, as ``prism watch --headless`` and
  the evals run (nothing there can export a trace).

The goal (the performance issue) is ≥ 1M events/s on one core, judged. An event is a
ring record: a span of an entry+return site is two (its entry and its return), of an
entry-only site one; both are printed, and the goal is judged on events.

Run: ``.venv/bin/python bench/engine_ingest.py [--spans FILE] [--rounds N] [--cpu N]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prism_tui.engine.core import DetectionConfig, Engine, ViewRetention  # noqa: E402
from prism_tui.engine.recording import ReplayClock, load_spans, replay  # noqa: E402

DEFAULT_SPANS = ROOT / "tests" / "data" / "sim_spans.jsonl.gz"
GOAL = 1_000_000


def one_round(procs: list[Any], spans: list[Any], judged: bool,
              keep_spans: bool = True) -> dict[str, float]:
    """Replay every span once through a new engine; seconds spent, fits excluded."""
    clock = ReplayClock(spans[0].start_ns)
    engine = Engine(DetectionConfig(rule="prism", warmup=150 if judged else 10**12), clock=clock,
                    wall_clock=lambda: 0.0, host="bench",
                    keep=None if keep_spans else ViewRetention(spans=0))
    fit_s = [0.0]
    fit = engine._fit

    def timed_fit(*args: Any, **kwargs: Any) -> None:
        t = time.perf_counter()
        fit(*args, **kwargs)
        fit_s[0] += time.perf_counter() - t

    engine._fit = timed_fit  # type: ignore[method-assign]
    t0 = time.perf_counter()
    replay(engine, clock, procs, spans)
    total = time.perf_counter() - t0
    verdicts = sum(d.n_verdicts for w in engine._watched.values()
                   for d in w.detectors.values())
    return {"s": total - fit_s[0], "fit_s": fit_s[0], "iterations": engine.iterations_seen,
            "verdicts": verdicts}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spans", default=str(DEFAULT_SPANS), help="a span recording")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cpu", type=int, default=0, help="the one CPU to run on")
    args = ap.parse_args(argv)
    os.sched_setaffinity(0, {args.cpu})
    procs, spans = load_spans(args.spans)
    events = sum(2 if s.end_ns > s.start_ns else 1 for s in spans)
    results: dict[str, list[dict[str, float]]] = {"warm-up": [], "judged": [],
                                                  "judged, headless": []}
    for _ in range(args.rounds):
        for name in results:
            results[name].append(one_round(procs, spans, judged=name != "warm-up",
                                           keep_spans=name != "judged, headless"))
    print(f"{len(spans):,} spans ({events:,} ring records) of {len(procs)} processes from "
          f"{Path(args.spans).name}; one CPU ({args.cpu}) of {os.cpu_count()}, "
          f"{platform.python_implementation()} {platform.python_version()}, "
          f"{args.rounds} rounds, median")
    print()
    print("| engine | iterations | verdicts | s per replay | spans/s | events/s | µs per "
          "span | ratio to goal (1M events/s) | meets goal | fits left out (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for name, rows in results.items():
        s = statistics.median(r["s"] for r in rows)
        rate = events / s
        print(f"| {name} | {int(rows[0]['iterations']):,} | {int(rows[0]['verdicts']):,} "
              f"| {s:.3f} | {len(spans) / s:,.0f} | {rate:,.0f} | {1e6 * s / len(spans):.2f} "
              f"| {rate / GOAL:.2f} | {'yes' if rate >= GOAL else 'no'} "
              f"| {statistics.median(r['fit_s'] for r in rows):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
