"""Wake-up lag of a SCHED_FIFO event loop while CPU hogs run, with and without a
normal-priority Python helper thread in the same process (the GIL's priority inversion).

The monitor's loop runs under ``SCHED_FIFO`` with ``--realtime``, but its helper threads
(executor, aiosqlite) stay normal (reset on fork). A helper that holds the GIL when the
hogs preempt it keeps the real-time loop waiting until the scheduler runs it again. Three
modes, one after the other in one run, same hogs: no helper, a normal helper, a helper
under ``SCHED_FIFO`` too. Needs root or CAP_SYS_NICE.

    .venv/bin/python bench/gil_inversion.py [--hogs 6] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prism_tui.scheduling import go_realtime

WORK_S = 0.002
"""Pure-Python work per helper step (a batch of history rows, a telemetry sample)."""
PAUSE_S = 0.05
TICK_S = 0.002


def _helper(stop: threading.Event, realtime: bool) -> None:
    if realtime:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    while not stop.is_set():
        t = time.perf_counter()
        while time.perf_counter() - t < WORK_S:
            sum(range(100))
        time.sleep(PAUSE_S)


async def _lags(seconds: float) -> list[float]:
    lags = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.monotonic()
        await asyncio.sleep(TICK_S)
        lags.append((time.monotonic() - t - TICK_S) * 1e3)
    return sorted(lags)


def measure(mode: str, seconds: float) -> dict[str, float]:
    """Lag percentiles (ms) of the loop's 2-ms sleeps under ``mode``."""
    stop = threading.Event()
    if mode != "no helper":
        threading.Thread(target=_helper, args=(stop, mode == "SCHED_FIFO helper"),
                         daemon=True).start()
    try:
        lags = asyncio.run(_lags(seconds))
    finally:
        stop.set()
    n = len(lags)
    return {"wakeups": n, "p50": lags[n // 2], "p99": lags[int(n * 0.99)],
            "p99.9": lags[int(n * 0.999)], "max": lags[-1],
            "over_5ms": sum(lag > 5 for lag in lags)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hogs", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    sys.setswitchinterval(0.0005)  # the monitor's (prism_tui.cli.common.LOOP_SWITCH_INTERVAL_S)
    why = go_realtime(1, "the loop")
    if why:
        print(why, file=sys.stderr)
        return 3
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(args.hogs)]
    try:
        print(f"{args.hogs} CPU hogs, loop under SCHED_FIFO, {os.cpu_count()} CPUs; "
              "lag of 2-ms sleeps, ms")
        print("| helper thread | wake-ups | p50 | p99 | p99.9 | max | > 5 ms |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for mode in ("no helper", "normal helper", "SCHED_FIFO helper"):
            r = measure(mode, args.seconds)
            print(f"| {mode} | {r['wakeups']} | {r['p50']:.2f} | {r['p99']:.2f} "
                  f"| {r['p99.9']:.2f} | {r['max']:.2f} | {r['over_5ms']} |")
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
