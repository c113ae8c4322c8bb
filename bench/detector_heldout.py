"""The detector on held-out generated scenarios, scored by fault strength.

Runs ``prism eval --scenario random:SEED --json`` for each seed (default: the held-out
list of ``docs/scenarios.md``, never used for tuning) and prints one table: per seed its
ranks, per-iteration F1 and FPR, and per fault-strength bucket (the slowdown measured
from the labels, ``prism_sim.labels.fault_effects``) the iteration recall and the faults
detected. The last rows pool every seed, with F1 over the faults that slowed decode steps
1.2x or more (iterations under milder ones left out) and with every fault.

Each eval runs its scenario in real time (3-5 minutes). ``--out DIR`` keeps each seed's
JSON there, with its recording and labels (``random-SEED.spans.gz``, ``.labels``) for
``bench/detector_sim.py`` to replay other detectors on the same iterations offline;
``--reuse`` reads the JSONs back instead of running again.

    .venv/bin/python bench/detector_heldout.py [--seeds 1001,1002 | --seeds 1001-1012]
        [--out DIR] [--reuse] [--json] [-- PRISM-EVAL-ARGS...]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prism_sim.labels import STRENGTH_BUCKETS  # noqa: E402
from prism_sim.scenario import load_scenario  # noqa: E402

DOCS = ROOT / "docs" / "scenarios.md"
BUCKETS = [name for _, name in STRENGTH_BUCKETS] + ["unmeasured"]
STRONG = {"1.2-1.5x", ">=1.5x"}


def documented_seeds(label: str) -> list[int]:
    """The seed list ``docs/scenarios.md`` gives on its ``LABEL seeds:`` line."""
    m = re.search(rf"^{label} seeds: `([0-9 ,]+)`", DOCS.read_text(encoding="utf-8"), re.M)
    if m is None:
        raise SystemExit(f"detector_heldout: no '{label} seeds:' line in {DOCS}")
    return [int(x) for x in m.group(1).replace(",", " ").split()]


def parse_seeds(text: str) -> list[int]:
    """``1001,1002`` or ``1001-1012`` (or both, comma-separated) as a list of seeds."""
    out: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"--seeds: {part.strip()!r} is not SEED or FIRST-LAST")
        out += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    return out


def run_eval(seed: int, eval_args: list[str], out: Path | None,
             reuse: bool) -> dict[str, Any] | str:
    """One seed's ``prism eval --json`` document (read back from ``out`` with reuse), or
    why the eval failed (the table says so and goes on with the other seeds)."""
    saved = out / f"random-{seed}.json" if out is not None else None
    if reuse and saved is not None and saved.is_file():
        doc: dict[str, Any] = json.loads(saved.read_text(encoding="utf-8"))
        return doc
    cmd = [sys.executable, "-m", "prism_tui.cli", "eval", "--scenario", f"random:{seed}",
           "--json"]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        cmd += ["--record", str(out / f"random-{seed}.spans.gz"),
                "--labels", str(out / f"random-{seed}.labels")]
    cmd += eval_args
    print(f"detector_heldout: random:{seed} ...", file=sys.stderr, flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["(no message)"])[-1]
        print(f"detector_heldout: random:{seed}: prism eval exited {res.returncode}: "
              f"{last}", file=sys.stderr)
        return f"eval failed (exit {res.returncode}): {last}"
    doc = json.loads(res.stdout)
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return doc


def by_bucket(faults: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per strength bucket: fault windows, detected ones, judged and fired iterations."""
    out = {b: {"faults": 0, "detected": 0, "judged": 0, "fired": 0} for b in BUCKETS}
    for f in faults:
        b = out[f["strength"]]
        b["faults"] += 1
        b["detected"] += bool(f["detected"])
        b["judged"] += f["judged"]
        b["fired"] += f["fired"]
    return out


def f1(tp: int, fp: int, fn: int) -> float | None:
    """F1 of the counts (None without any positive)."""
    if tp + fn == 0:
        return None
    return round(2 * tp / (2 * tp + fp + fn), 4)


def cell(b: dict[str, int]) -> str:
    """``recall (detected/faults)`` of one bucket, ``-`` when it has no fault."""
    if not b["faults"]:
        return "-"
    recall = f"{b['fired'] / b['judged']:.2f}" if b["judged"] else "n/a"
    return f"{recall} ({b['detected']}/{b['faults']})"


def main() -> int:
    """Run (or read back) every seed's eval and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default=None,
                    help="seeds, e.g. 1001,1002 or 1001-1012 (default: the held-out list)")
    ap.add_argument("eval_args", nargs=argparse.REMAINDER,
                    help="after --: passed to prism eval (e.g. -- --rule paper)")
    ap.add_argument("--out", type=Path, default=None, help="keep each seed's JSON here")
    ap.add_argument("--reuse", action="store_true", help="read saved JSON back from --out")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    try:
        seeds = parse_seeds(args.seeds) if args.seeds else documented_seeds("Held-out")
    except ValueError as exc:
        print(f"detector_heldout: {exc}", file=sys.stderr)
        return 2
    if args.reuse and args.out is None:
        print("detector_heldout: --reuse needs --out DIR", file=sys.stderr)
        return 2
    eval_args = args.eval_args[1:] if args.eval_args[:1] == ["--"] else args.eval_args
    dev = set(documented_seeds("Development"))
    rows = []
    failed: dict[int, str] = {}
    for seed in seeds:
        doc = run_eval(seed, eval_args, args.out, args.reuse)
        if isinstance(doc, str):
            failed[seed] = doc
            continue
        rows.append({"seed": seed, "development": seed in dev, "rule": doc.get("rule"),
                     "f1": doc["f1"], "fpr": doc["fpr"], "tp": doc["tp"], "fp": doc["fp"],
                     "fn": doc["fn"], "tn": doc["tn"], "faults": doc["faults"],
                     "buckets": by_bucket(doc["faults"])})
    every = [f for r in rows for f in r["faults"]]
    pooled = by_bucket(every)
    fp = sum(r["fp"] for r in rows)
    tn = sum(r["tn"] for r in rows)
    strong_tp = sum(pooled[b]["fired"] for b in STRONG)
    strong_fn = sum(pooled[b]["judged"] - pooled[b]["fired"] for b in STRONG)
    summary = {
        "seeds": seeds, "failed": failed,
        "development_seeds_included": sorted(dev & set(seeds)),
        "f1_all": f1(sum(r["tp"] for r in rows), fp, sum(r["fn"] for r in rows)),
        "f1_strong": f1(strong_tp, fp, strong_fn),
        "fpr": round(fp / (fp + tn), 4) if fp + tn else None,
        "buckets": pooled}
    if args.json:
        print(json.dumps({"rows": rows, "summary": summary}, indent=2))
        return 0
    print("| seed | ranks | F1 | FPR | " + " | ".join(BUCKETS[:-1]) + " |")
    print("|---|---|---|---|" + "---|" * (len(BUCKETS) - 1))
    for r in rows:
        ranks = load_scenario(f"random:{r['seed']}").topology.ranks
        mark = " (dev)" if r["development"] else ""
        print(f"| {r['seed']}{mark} | {ranks} | {r['f1']} | {r['fpr']} | "
              + " | ".join(cell(r["buckets"][b]) for b in BUCKETS[:-1]) + " |")
    for seed, why in failed.items():
        print(f"| {seed} | | {why} |" + " |" * (len(BUCKETS) + 1))
    print(f"| all | | {summary['f1_all']} | {summary['fpr']} | "
          + " | ".join(cell(pooled[b]) for b in BUCKETS[:-1]) + " |")
    print(f"\nF1 over faults >= 1.2x (milder ones left out): {summary['f1_strong']}; "
          f"with every fault: {summary['f1_all']}; FPR {summary['fpr']}; "
          f"unmeasured faults: {pooled['unmeasured']['faults']}. "
          "Cells: iteration recall (faults detected / faults).")
    if summary["development_seeds_included"]:
        print("NOTE: development seeds included; these are not held-out figures.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
