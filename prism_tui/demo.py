"""``prism demo`` until the dashboard and the simulator exist: the probe layer end to end.

It starts a real workload (a Python loop doing float32 matrix products through numpy's
OpenBLAS, creating cyclic garbage, and contending for the GIL with a second thread),
attaches the ``blas`` and ``cpython`` catalog profiles to it by uprobes, and prints, every
second, calls/s and latency quantiles per probe, then the overhead governor's figures.
Nothing in the workload knows it is watched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from fastdigest import TDigest

from probes.catalog import load_profile
from probes.governor import OverheadGovernor, calibrate
from probes.perf import check_permission
from probes.placement import ProbeSite, place_profile
from probes.target import Target
from probes.uprobes import UprobeSession

WORKLOAD = """
import gc, os, sys, threading, time
import numpy as np
a = np.random.default_rng(0).random((192, 192), dtype=np.float32)

def contender():
    x = 0
    while True:
        x += 1
        if x % 200000 == 0:
            time.sleep(0.001)

threading.Thread(target=contender, daemon=True).start()
print("ready", flush=True)
step = 0
while True:
    for _ in range(3):
        a = (a @ a) / 192.0
    junk = [[i, None] for i in range(300)]
    for item in junk:
        item[1] = item          # reference cycles: work for the cyclic GC
    step += 1
    if step % 25 == 0:
        gc.collect()
    time.sleep(0.004)
"""


@dataclass
class _Series:
    digest: TDigest = field(default_factory=TDigest)
    count: int = 0


def _start_workload() -> subprocess.Popen[str]:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", WORKLOAD], stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError("the demo workload did not start (is numpy installed?)")
    return proc


def _table(series: dict[str, _Series], stages: dict[str, str], wall: float,
           detached: set[str]) -> list[str]:
    lines = [f"{'probe':<28}{'stage':<10}{'calls/s':>9}{'p50 ms':>10}{'p99 ms':>10}"
             f"{'max ms':>10}"]
    for probe, s in sorted(series.items()):
        if s.count == 0:
            continue
        d = s.digest
        name = f"{probe} (detached)" if probe in detached else probe
        lines.append(f"{name:<28}{stages.get(probe, ''):<10}{s.count / wall:>9.1f}"
                     f"{d.quantile(0.5):>10.4f}{d.quantile(0.99):>10.4f}{d.max():>10.4f}")
    return lines


def run_demo(duration_s: float = 8.0) -> int:
    """Run the interim demo for ``duration_s`` seconds; returns the exit code."""
    check_permission()  # exit 3 with what to grant, before anything starts
    print("LatencyPrism demo (interim: the dashboard and the simulated inference server "
          "come with later issues).\nA real numpy + CPython workload is started and traced "
          "by uprobes, with no change to it.\n")
    costs = calibrate()
    print(f"probe hit cost on this host: {costs.emulated_ns / 1000:.1f} us (emulated site), "
          f"{costs.single_step_ns / 1000:.1f} us (single-stepped site), "
          f"+{costs.return_ns / 1000:.1f} us for a return probe {costs.note}")
    proc = _start_workload()
    try:
        target = Target(proc.pid)
        sites: list[ProbeSite] = []
        for name in ("blas", "cpython"):
            placement = place_profile(target, load_profile(name), "sentinel")
            for d in placement.decisions:
                if d.status == "resolved":
                    s = d.sites[0]
                    print(f"  attach {name}:{d.probe} -> {os.path.basename(s.library)}:"
                          f"{s.symbol} +{s.offset:#x} ({s.site})")
                elif not d.optional:
                    print(f"  skip   {name}:{d.probe}: {d.reason}")
            sites += placement.sites
        stages = {s.probe: s.stage for s in sites}
        series: dict[str, _Series] = {s.probe: _Series() for s in sites}
        stop = {"flag": False}
        signal.signal(signal.SIGINT, lambda *_: stop.update(flag=True))
        with UprobeSession([target], sites, drain_interval_s=0.05) as session:
            governor = OverheadGovernor(sites, costs, session.detach_site,
                                        session.reattach_site, budget=0.005)
            governor.update(dict(session.kernel_hits()))
            t0 = last = time.monotonic()
            print(f"\nattached {len(sites)} probes in {session.mode} mode; "
                  f"running {duration_s:g} s (Ctrl-C to stop)\n")
            while not stop["flag"] and time.monotonic() - t0 < duration_s:
                for span in session.poll(0.1):
                    one = series[span.probe]
                    one.digest.update(span.duration_ns / 1e6)
                    one.count += 1
                if time.monotonic() - last >= 1.0:
                    last = time.monotonic()
                    for decision in governor.update(dict(session.kernel_hits())):
                        print(f"  governor: {decision.action} {decision.probe}: "
                              f"{decision.reason}")
                    off = {sites[i].probe for i in session.detached_sites}
                    print("\n".join(_table(series, stages, last - t0, off)), "\n", flush=True)
                if session.all_exited:
                    print("the workload exited")
                    break
            stats = session.stats
        print(f"events lost {stats.lost}, unfinished {stats.unfinished}, "
              f"estimated probe overhead {governor.last_overhead:.3%} of the target's time "
              f"(budget {governor.budget:.1%})")
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    return 0
