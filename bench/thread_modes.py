"""Thread mode vs CPU mode of ``UprobeSession``: calls missed, and cost on the target.

A session with one entry probe on ``pl_work`` of the C target (sites from
``place_symbol(Target(pid), "ctarget", "pl_work", ret=False)``) is attached, then the
target runs ``threads T N`` (T new short-lived threads, each calling ``pl_work`` N times).
Spans are collected with ``session.poll(0.05)`` until the target answers, then once more
with ``session.read()`` after a short pause, and compared with the T×N calls made.

``thread`` mode follows new threads through PERF_RECORD_FORK (one ring per thread) and so
misses what a thread does before it is attached; ``cpu`` mode has one ring per CPU for all
tasks, filtered by PID, and installs the breakpoint in every process that maps the file
(here only the target maps it).

The cost of each mode on the target is ``time work 200000`` (one thread) with the session
attached and drained, against no session, side by side in each round.

Run: ``.venv/bin/python bench/thread_modes.py [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from probe_cost import CTarget, baseline_ns, build_ctarget

from probes.placement import ProbeSite, place_symbol
from probes.target import Target
from probes.uprobes import UprobeSession

MODES = ("thread", "cpu")
COST_RING_PAGES = 2048  # 8 MiB per ring: the 200k records (6.4 MB) of a cost run all fit


@dataclass
class Coverage:
    """Spans seen vs calls made, over the repetitions of one (mode, workload)."""

    seen: list[int] = field(default_factory=list)
    expected: int = 0
    lost: int = 0
    attach_failures: int = 0
    threads_attached: int = 0


def run_threads(target: CTarget, sites: list[ProbeSite], mode: str, threads: int,
                calls: int) -> tuple[int, UprobeSession]:
    """One ``threads T N`` under a fresh session; returns (spans seen, the closed session)."""
    session = UprobeSession([Target(target.pid)], sites, mode=mode)  # default 64-page rings
    with session:
        seen = 0
        target.send(f"threads {threads} {calls}")
        while not target.answered():
            seen += len(session.poll(0.05))
        assert target.answer() == threads * calls
        time.sleep(0.1)
        seen += len(session.read())
    return seen, session


def timed_work(target: CTarget, sites: list[ProbeSite], mode: str, calls: int) -> tuple[
        float, int, int]:
    """ns per call of ``time work calls`` with a ``mode`` session; returns (ns, spans, lost)."""
    if mode == "none":
        return baseline_ns(target, "work"), 0, 0
    with UprobeSession([Target(target.pid)], sites, mode=mode,
                       ring_pages=COST_RING_PAGES) as s:
        spans = 0
        target.send(f"time work {calls}")
        while not target.answered():
            spans += len(s.poll(0.02))
        value = target.answer()
        spans += len(s.read())
        return float(value), spans, s.stats.lost


def main() -> None:
    """Measure coverage and cost of both modes, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    reps = 2 if args.quick else 5
    cost_rounds = 2 if args.quick else 7
    work_calls = 50_000 if args.quick else 200_000
    workloads = [(50, 100), (200, 10)]
    coverage: dict[tuple[str, int, int], Coverage] = {}
    costs: dict[str, list[float]] = {m: [] for m in ("none", *MODES)}
    cost_check: dict[str, list[tuple[int, int]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="prism-bench-") as tmp:
        exe = build_ctarget(tmp)
        target = CTarget(exe)
        try:
            sites = place_symbol(Target(target.pid), "ctarget", "pl_work", ret=False)
            for _ in range(reps):
                for threads, calls in workloads:
                    for mode in MODES:
                        cov = coverage.setdefault((mode, threads, calls), Coverage())
                        seen, session = run_threads(target, sites, mode, threads, calls)
                        cov.seen.append(seen)
                        cov.expected = threads * calls
                        cov.lost += session.stats.lost
                        cov.attach_failures += session.stats.thread_attach_failures
                        cov.threads_attached += session.stats.threads_attached
            for _ in range(cost_rounds):
                for mode in ("none", *MODES):
                    ns, spans, lost = timed_work(target, sites, mode, work_calls)
                    costs[mode].append(ns)
                    if mode != "none":
                        cost_check[mode].append((spans, lost))
        finally:
            target.close()

    print(f"Calls seen per mode, {reps} repetitions each "
          f"({platform.node()}, {os.cpu_count()} CPUs, kernel {platform.release()}, "
          f"{time.strftime('%Y-%m-%d')})")
    print()
    print("| workload | mode | calls made per run | spans seen (each run) | seen, total "
          "| missed | lost records | threads attached (incl. main) | attach failures |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for (mode, threads, calls), cov in coverage.items():
        total = sum(cov.seen)
        expected = cov.expected * len(cov.seen)
        print(f"| threads {threads} {calls} | {mode} | {cov.expected} "
              f"| {', '.join(map(str, cov.seen))} | {total / expected:.1%} "
              f"| {expected - total} ({(expected - total) / expected:.1%}) | {cov.lost} "
              f"| {cov.threads_attached if mode == 'thread' else '-'} "
              f"| {cov.attach_failures if mode == 'thread' else '-'} |")
    print()
    print(f"Cost on the target: `time work {work_calls}` (one thread), median of "
          f"{cost_rounds} rounds, modes interleaved")
    print()
    print("| mode | ns/call | ratio to no monitor | ratio to thread mode | spans per round "
          "(min–max) / calls | lost |")
    print("|---|---:|---:|---:|---|---:|")
    base = statistics.median(costs["none"])
    thread = statistics.median(costs["thread"])
    for mode in ("none", *MODES):
        med = statistics.median(costs[mode])
        checks = cost_check.get(mode, [])
        counts = [s for s, _ in checks]
        spans_text = f"{min(counts)}–{max(counts)} / {work_calls}" if counts else "-"
        lost_text = str(sum(n for _, n in checks)) if checks else "-"
        print(f"| {mode} | {med:,.2f} | {med / base:,.0f}x | {med / thread:.3f} "
              f"| {spans_text} | {lost_text} |")
    print()
    print("`none`: wall time of 10M unprobed calls (the target answers whole ns, too coarse); "
          "with a session: the target's own timing of its loop, the session draining "
          f"(poll 20 ms), its rings ({COST_RING_PAGES} pages) big enough to hold every record "
          "of a run, so that the cost of every record written is counted.")


if __name__ == "__main__":
    main()
