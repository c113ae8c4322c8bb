"""Does every fault injector bite every time? Slowdown of the simulator's iterations per window.

Runs the simulator (2 ranks, batch 8 decode, ranks pinned to one CPU as in
``tests/test_sim_engine.py``) with ``--trials`` windows of each fault kind, ``--on``
seconds each, ``--gap`` seconds apart, and prints per kind the slowdown of rank 0's
decode iterations in each window (median while on / mean of the medians in the gaps
before and after): the minimum over the trials is the figure (a fault that sometimes
does nothing shows there), then the median and maximum, and how many windows the labels'
measured effect calls biting (:func:`prism_sim.labels.fault_bit`).

    PYTHONPATH=. .venv/bin/python bench/fault_bite.py --trials 20
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from prism_sim.labels import IterationRecord, read_labels
from prism_sim.scenario import FAULT_INFO, parse_scenario
from prism_sim.server import SimServer

SCENARIO = """
[scenario]
name = "fault-bite"
description = "every fault kind, window after window"
seed = 3
duration_s = {duration}

[topology]
ranks = 2
layers = 8
hidden = 4096

[[phase]]
start_s = 0
arrival_rate = 200.0
max_batch = 8
prompt = {{ dist = "fixed", value = 32 }}
output = {{ dist = "fixed", value = 400 }}
{faults}
"""

HOST_KINDS = ("cpu_squeeze", "cpu_throttle", "memory_pressure")


def pin_ranks(server: SimServer) -> None:
    """Every thread of the ranks on the last CPU (one CPU: latency stable to ~1 %)."""
    cpu = max(os.sched_getaffinity(0))
    for pid in server.rank_pids.values():
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(int(tid), {cpu})


def median_ms(rows: list[IterationRecord]) -> float | None:
    """Median latency of ``rows`` in ms (None when there are fewer than 5)."""
    if len(rows) < 5:
        return None
    return statistics.median((r.end_ns - r.start_ns) / 1e6 for r in rows)


def main() -> int:
    """Run the windows, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20, help="windows per kind (default 20)")
    p.add_argument("--on", type=float, default=1.0, help="seconds each window is on")
    p.add_argument("--gap", type=float, default=1.0, help="seconds between windows")
    p.add_argument("--kinds", default=",".join(HOST_KINDS),
                   help="comma-separated fault kinds (default: the host faults; 'all': "
                        "every simulator kind)")
    p.add_argument("--verbose", action="store_true",
                   help="also print every window's slowdown and measured effect")
    args = p.parse_args()
    kinds = list(FAULT_INFO) if args.kinds == "all" else args.kinds.split(",")
    for kind in kinds:
        if kind not in FAULT_INFO:
            print(f"fault_bite: unknown kind {kind!r}", file=sys.stderr)
            return 2
    first = 3.0
    faults = ""
    order = [k for _ in range(args.trials) for k in kinds]  # interleaved: drift is shared
    for i, kind in enumerate(order):
        rank = 0 if kind != "straggler" else 1
        faults += (f'\n[[fault]]\ntype = "{kind}"\nstart_s = {first + i * (args.on + args.gap)}'
                   f"\nduration_s = {args.on}\nrank = {rank}\n")
    duration = first + len(order) * (args.on + args.gap) + 1
    text = SCENARIO.format(duration=duration, faults=faults)
    with tempfile.TemporaryDirectory(prefix="fault-bite-") as tmp:
        labels_path = Path(tmp) / "labels.jsonl"
        scenario_path = Path(tmp) / "fault-bite.toml"
        scenario_path.write_text(text)
        t0 = time.monotonic()
        with SimServer(parse_scenario(text, str(scenario_path)), labels=labels_path,
                       metrics_port=None) as server:
            pin_ranks(server)
            server.run()
        labels = read_labels(labels_path)
    rows = [r for r in labels.iterations if r.rank == 0 and r.phase == "decode"
            and r.batch_size == 8]
    per_kind: dict[str, list[float]] = {k: [] for k in kinds}
    bit: dict[str, list[bool | None]] = {k: [] for k in kinds}
    modes: dict[str, set[str]] = {k: set() for k in kinds}
    settle = 0.2e9
    for f in labels.faults:
        during = [r for r in rows if r.start_ns >= f.start_ns + settle and r.end_ns <= f.end_ns]
        before = [r for r in rows if f.start_ns - args.gap * 1e9 + settle <= r.start_ns
                  and r.end_ns <= f.start_ns]
        after = [r for r in rows if f.end_ns + settle <= r.start_ns
                 and r.end_ns <= f.end_ns + args.gap * 1e9]
        on, b, a = median_ms(during), median_ms(before), median_ms(after)
        if on is None or b is None or a is None:
            continue
        per_kind[f.type].append(on / ((a + b) / 2))
        if args.verbose:
            print(f"{f.type}: {on / ((a + b) / 2):.2f} bit={f.bit} {f.effect}")
        bit[f.type].append(f.bit)
        if f.effect and f.effect.get("injector"):
            modes[f.type].add(str(f.effect["injector"].get("mode", "")))
    print(f"{len(order)} windows of {args.on:g} s, {args.gap:g} s apart, in "
          f"{time.monotonic() - t0:.0f} s; load average {os.getloadavg()[0]:.1f}")
    print("| fault | mode | windows | min slowdown | median | max | labels say bit |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for kind in kinds:
        v = per_kind[kind]
        if not v:
            print(f"| {kind} | | 0 | | | | |")
            continue
        said = sum(1 for x in bit[kind] if x)
        print(f"| {kind} | {','.join(sorted(modes[kind]))} | {len(v)} | {min(v):.2f} | "
              f"{statistics.median(v):.2f} | {max(v):.2f} | {said}/{len(bit[kind])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
