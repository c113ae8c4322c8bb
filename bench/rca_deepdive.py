"""Root cause on real data: the paper's five SGLang DeepDive cases through our ranking.

Data: ``../shared/datasets/latencyprism/deepdive_sglang/`` from the repository root (not
in the repo; the bench says so and exits 0 when it is absent). Each case has a normal and
an abnormal run: per cycle (one ``Scheduler.run_batch`` iteration) the share ``β`` of
every host function and GPU kernel, and per (cycle, function) the level ``μ`` of the
resource metrics sampled while it ran.

Each run becomes what the live engine hands :func:`prism_tui.engine.rca.rank_suspects`
(the engine's own ranking, not a copy): one ``{"function@device": share}`` row per cycle,
and one ``{"metric@device": level}`` row per cycle (the metric's mean over the cycle's
functions on that device). A stage is related to the metrics of its own device, as the
module documents. Printed per case: our top three suspects, the injected cause, the
paper's first finding (its report in ``Results/``) and whether our top suspect is
consistent with the cause (CPU squeeze or clock -> host CPU work or a CPU metric; GPU
clock -> a GEMM kernel or the SM clock; NVLink -> a collective; PCIe -> a copy).

    .venv/bin/python bench/rca_deepdive.py [--data DIR] [--cycles N] [--json]
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prism_tui.engine.rca import Suspect, rank_suspects  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets" / "latencyprism" / "deepdive_sglang"
RUNS = Path("Data") / "Processed" / "SGLang"

Rows = list[dict[str, float]]


def _host_cpu(s: Suspect) -> bool:
    """Host CPU work (on-CPU time, run queue, syscalls) or a CPU metric."""
    return s.device == "Host" or (s.metric or "").split("@")[0] in (
        "cpu_frequency", "host_cpu_usage", "process_cpu_usage")


def _gemm(s: Suspect) -> bool:
    """A GEMM kernel, or any kernel pinned on the SM clock."""
    return "gemm" in s.stage.lower() or "sm_frequency" in (s.metric or "")


def _collective(s: Suspect) -> bool:
    """A collective (all-reduce, all-gather, NCCL or SGLang's custom one)."""
    return re.search(r"reduce|allgather|all_gather|nccl", s.stage, re.I) is not None


def _copy(s: Suspect) -> bool:
    """A host <-> device or peer copy."""
    return re.search(r"memcpy|copy", s.stage, re.I) is not None


@dataclass(frozen=True)
class Case:
    """One injected fault: its folder, what was injected, what a consistent answer is."""

    folder: str
    injected: str
    expects: str
    consistent: Callable[[Suspect], bool]


CASES = (
    Case("cpu_compute_squeeze_out", "CPU squeeze (AVX-512 loops)", "host CPU", _host_cpu),
    Case("cpu_frequency_reduction", "CPU clock clamped", "host CPU", _host_cpu),
    Case("gpu_instability", "GPU clock locked low", "GEMM / SM clock", _gemm),
    Case("gpu_memory_squeeze_out_NVLink", "NVLink saturated", "collective", _collective),
    Case("gpu_memory_squeeze_out_PCIe", "PCIe saturated", "copy", _copy),
)


def load_run(path: Path, cycles: int | None = None) -> tuple[Rows, Rows]:
    """Per-cycle stage shares and metric levels of one run's ``result_perf_data.csv``.

    Args:
        path: the CSV file.
        cycles: keep only the first ``cycles`` cycles (None: all).

    Returns:
        ``(shares, metrics)``: one ``{"function@device": β / 100}`` and one
        ``{"metric@device": mean μ}`` row per cycle, in cycle order.
    """
    shares: dict[int, dict[str, float]] = defaultdict(dict)
    levels: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            cycle = int(row["cycle"])
            device = row["device"]
            shares[cycle][f"{row['function_name']}@{device}"] = float(row["beta_pct"]) / 100
            if row["metric_name"] not in ("", "N/A") and row["mu_pct"]:
                levels[cycle][f"{row['metric_name']}@{device}"].append(float(row["mu_pct"]))
    order = sorted(shares)[:cycles]
    metrics = [{k: sum(v) / len(v) for k, v in levels[c].items()} for c in order]
    return [shares[c] for c in order], metrics


def paper_first(data: Path, folder: str) -> str:
    """The function, device and metric the paper's report ranks first for a case."""
    for report in sorted((data / "Results").glob(f"Processed_SGLang_{folder}_*.csv")):
        with report.open(newline="", encoding="utf-8") as fh:
            top = next(csv.DictReader(fh), None)
        if top is not None:
            return f"{top['Function Name']}@{top['Device']} ({top['Metric Name']})"
    return "-"


def short(s: Suspect) -> str:
    """A suspect in one short cell: kernel name cut at its template, device, metric."""
    name = re.sub(r"^void |[<(].*$", "", s.stage)[:70]
    metric = (s.metric or "share").split("@")[0]
    return f"{name}@{s.device} ({metric}, {s.score:.3g})"


def main() -> int:
    """Rank every case and print the table (or JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA, help="the deepdive_sglang folder")
    ap.add_argument("--cycles", type=int, default=None,
                    help="use only the first N cycles of each run (a quick slice)")
    ap.add_argument("--case", action="append", choices=[c.folder for c in CASES],
                    help="only this case (repeatable)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    if args.cycles is not None and args.cycles < 2:
        print("rca_deepdive: --cycles must be at least 2", file=sys.stderr)
        return 2
    if not (args.data / RUNS).is_dir():
        print(f"rca_deepdive: skipped: no DeepDive data at {args.data}", file=sys.stderr)
        return 0
    out: list[dict[str, Any]] = []
    for case in CASES:
        if args.case and case.folder not in args.case:
            continue
        run_dir = args.data / RUNS / case.folder
        normal, normal_mu = load_run(run_dir / "normal_perf_data" / "result_perf_data.csv",
                                     args.cycles)
        abnormal, abnormal_mu = load_run(
            run_dir / "abnormal_perf_data" / "result_perf_data.csv", args.cycles)
        top = rank_suspects(normal, abnormal, normal_mu, abnormal_mu, top=3)
        out.append({
            "case": case.folder, "injected": case.injected, "expects": case.expects,
            "cycles": [len(normal), len(abnormal)],
            "suspects": [{"stage": s.stage, "device": s.device, "metric": s.metric,
                          "score": s.score, "delta_share": s.delta_share}
                         for s in top],
            "top": [short(s) for s in top],
            "consistent": bool(top) and case.consistent(top[0]),
            "paper_first": paper_first(args.data, case.folder),
        })
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    hits = sum(r["consistent"] for r in out)
    print("| case | injected | cycles n/a | our top 3 (metric, score) | consistent | "
          "paper's first finding |")
    print("|---|---|---|---|---|---|")
    for r in out:
        paper = re.sub(r"^void |[<(].*?(?=@)", "", str(r["paper_first"]))
        print(f"| {r['case']} | {r['injected']} | {r['cycles'][0]}/{r['cycles'][1]} | "
              f"{'<br>'.join(r['top'])} | {'yes' if r['consistent'] else 'no'} "
              f"({r['expects']}) | {paper} |")
    print(f"\ntop suspect consistent with the injected cause: {hits} of {len(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
