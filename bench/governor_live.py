"""The overhead governor on a live target: what it decides and what that gives the target.

The C target runs its "server" (``serve_start 5000 500``: a step ``pl_step`` calling the
per-operation ``pl_op`` 500 times, then a 5 ms sleep); ``prism watch --json`` watches it
with a profile probing both (``pl_step`` the anchor, ``pl_op`` ~90,000 calls/s) under
three settings, interleaved over the rounds, each on a fresh target: a budget no probe
exceeds (``0.9``: the governor never acts), and a 1 % budget with ``detach`` and with
``duty-cycle``. Per run: the governor's decisions (estimated cost of the op probe) and,
from the run's history, the mean step (anchor to anchor) over its last ``--tail`` seconds,
when the governor has acted; the ratio to the ungoverned run is what the target gained.

    .venv/bin/python bench/governor_live.py [--rounds 3] [--duration 10] [--tail 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prism_tui.history.store import HistoryStore  # noqa: E402
from tests.conftest import SERVER_PROFILE as PROFILE  # noqa: E402

SETTINGS = {"off (budget 90 %)": (0.9, "detach"), "1 %, detach": (0.01, "detach"),
            "1 %, duty-cycle": (0.01, "duty-cycle")}


@dataclass(frozen=True)
class Run:
    """One watched run: the governor's decisions and hit costs, the tail's steps."""

    decisions: list[dict[str, Any]]
    costs: dict[str, Any]
    step_ms: float
    steps: int


def build_target(tmp: Path) -> Path:
    """Compile the C target into ``tmp``."""
    exe = tmp / "ctarget"
    cc = shutil.which("cc") or "gcc"
    subprocess.run([cc, "-O0", "-g", "-fcf-protection=full", "-pthread",
                    str(ROOT / "tests/targets/ctarget.c"), "-o", str(exe)], check=True)
    return exe


def watch(exe: Path, tmp: Path, name: str, budget: float, action: str, duration: float,
          tail: float) -> Run:
    """One ``prism watch`` run on a fresh serving target: decisions and the tail's steps."""
    tag = name.split()[0].strip("%,")
    (tmp / "server.toml").write_text(PROFILE)
    config = tmp / f"config-{tag}.toml"
    config.write_text(f'[probe]\noverhead_budget = {budget}\ngovernor_action = "{action}"\n')
    db = tmp / f"history-{tag}-{len(list(tmp.iterdir()))}.sqlite"
    target = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, bufsize=1)
    try:
        assert target.stdout is not None and target.stdin is not None
        target.stdout.readline()
        target.stdin.write("serve_start 5000 500\n")
        target.stdin.flush()
        target.stdout.readline()
        out = subprocess.run(
            [sys.executable, "-m", "prism_tui.cli", "watch", "--pid", str(target.pid),
             "--profile", str(tmp / "server.toml"), "--config", str(config), "--db", str(db),
             "--json", "--duration", str(duration)],
            capture_output=True, text=True, timeout=duration + 120, cwd=ROOT, check=True)
    finally:
        target.kill()
        target.wait()
    summary = json.loads(out.stdout)

    async def steps() -> list[float]:
        async with HistoryStore(str(db)) as store:
            rows = await store.iterations(limit=1_000_000)
        end = max(r.end_ns for r in rows)
        return [r.latency_ms for r in rows if r.end_ns >= end - tail * 1e9]

    tail_steps = asyncio.run(steps())
    return Run(summary["governor"]["decisions"], summary["governor"]["hit_cost_us"],
               statistics.fmean(tail_steps), len(tail_steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--tail", type=float, default=4.0)
    args = parser.parse_args()
    results: dict[str, list[Run]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="prism-governor-") as tmpdir:
        tmp = Path(tmpdir)
        exe = build_target(tmp)
        for _ in range(args.rounds):
            for name, (budget, action) in SETTINGS.items():
                results[name].append(watch(exe, tmp, name, budget, action, args.duration,
                                           args.tail))
    base = statistics.median(r.step_ms for r in results[next(iter(SETTINGS))])
    print(f"{args.rounds} rounds, {args.duration:g} s each; step = mean anchor-to-anchor "
          f"time over the last {args.tail:g} s (medians over rounds)\n")
    print("| governor | decisions (op probe) | estimated op cost when decided | "
          "mean step (ms) | steps in the tail | ratio to off |")
    print("|---|---|---:|---:|---:|---:|")
    for name, runs in results.items():
        step = statistics.median(r.step_ms for r in runs)
        n = statistics.median(r.steps for r in runs)
        decided = [d for r in runs for d in r.decisions]
        kinds = sorted({f"{d['probe']} {d['status']}" for d in decided}) or ["none"]
        per_run = [len(r.decisions) for r in runs]
        first = [d for r in runs for d in r.decisions[:1]]
        cost = (f"{statistics.median(d['overhead_pct'] for d in first):.1f} % "
                f"({statistics.median(d['calls_per_s'] for d in first):,.0f} calls/s)"
                if first else "–")
        print(f"| {name} | {', '.join(kinds)} ({'/'.join(map(str, per_run))} per run) | "
              f"{cost} | {step:.3f} | {n:.0f} | {step / base:.3f} |")
    costs = results[next(iter(SETTINGS))][0].costs
    print(f"\nHit costs calibrated by the first run (us): {json.dumps(costs)}")


if __name__ == "__main__":
    main()
