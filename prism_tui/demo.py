"""``prism demo`` until the dashboard exists: the simulator watched through uprobes.

It starts the simulated tensor-parallel inference server on the ``demo`` scenario
(periodic faults), attaches the ``cuda`` and ``nccl`` catalog profiles to every rank by
uprobes, exactly as it would to a real engine, and prints every two seconds, per rank and
probe, calls/s and latency quantiles over the last window, with the faults the simulator
switched on. Nothing in the simulator knows it is watched. The engine, MQTT alerts and the
Textual dashboard replace this printout in later issues.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections import defaultdict

from fastdigest import TDigest

from prism_sim.errors import SimError
from prism_sim.scenario import load_scenario
from prism_sim.server import SimServer
from probes.catalog import load_profile
from probes.governor import calibrate
from probes.perf import check_permission
from probes.placement import ProbeSite, place_profile
from probes.target import Target
from probes.uprobes import UprobeSession

WINDOW_S = 2.0


def _sites(target: Target) -> list[ProbeSite]:
    sites: list[ProbeSite] = []
    for name in ("cuda", "nccl"):
        sites += place_profile(target, load_profile(name), "sentinel").sites
    return sites


def _table(window: dict[tuple[int, str], list[float]], stages: dict[str, str],
           seconds: float) -> list[str]:
    lines = [f"{'rank':<5}{'probe':<16}{'stage':<13}{'calls/s':>9}{'p50 ms':>9}"
             f"{'p99 ms':>9}{'max ms':>9}"]
    for (rank, probe), values in sorted(window.items()):
        d = TDigest.from_values(values)
        lines.append(f"{rank:<5}{probe:<16}{stages.get(probe, ''):<13}"
                     f"{len(values) / seconds:>9.1f}{d.quantile(0.5):>9.3f}"
                     f"{d.quantile(0.99):>9.3f}{max(values):>9.3f}")
    return lines


def run_demo(duration_s: float = 100.0) -> int:
    """Run the interim demo for ``duration_s`` seconds (Ctrl-C ends it sooner)."""
    check_permission()  # exit 3 with what to grant, before anything starts
    print("LatencyPrism demo (interim: the detector, MQTT alerts and the dashboard come with "
          "later issues).\nThe simulated inference server runs the 'demo' scenario; its "
          "ranks are traced by uprobes with the cuda and nccl profiles, unchanged.\n",
          flush=True)
    costs = calibrate()
    print(f"probe hit cost here: {costs.emulated_ns / 1000:.1f} us (emulated site), "
          f"{costs.single_step_ns / 1000:.1f} us (single-stepped), "
          f"+{costs.return_ns / 1000:.1f} us per return probe", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    events: list[str] = []

    def log(line: str) -> None:
        events.append(f"[{time.strftime('%H:%M:%S')}] {line}")

    failure: list[BaseException] = []
    try:
        with SimServer(load_scenario("demo"), log=log) as server:
            print(events.pop(0) if events else "", flush=True)
            sessions = []
            stages: dict[str, str] = {}
            for rank, pid in sorted(server.rank_pids.items()):
                target = Target(pid)
                sites = _sites(target)
                stages.update({s.probe: s.stage for s in sites})
                sessions.append((rank, UprobeSession([target], sites,
                                                     drain_interval_s=0.05).open()))
                print(f"rank {rank} (pid {pid}): {len(sites)} probes attached in "
                      f"{sessions[-1][1].mode} mode", flush=True)

            def drive() -> None:
                try:
                    server.run(duration_s, stop)
                except BaseException as exc:  # reported by the main thread
                    failure.append(exc)
                stop.set()

            runner = threading.Thread(target=drive, daemon=True)
            runner.start()
            window: dict[tuple[int, str], list[float]] = defaultdict(list)
            last = time.monotonic()
            try:
                while not stop.is_set():
                    for rank, session in sessions:
                        for span in session.poll(0.05):
                            window[(rank, span.probe)].append(span.duration_ns / 1e6)
                    now = time.monotonic()
                    if now - last >= WINDOW_S:
                        while events:
                            print(events.pop(0))
                        print("\n".join(_table(window, stages, now - last)), "\n", flush=True)
                        window.clear()
                        last = now
            finally:
                for _rank, session in sessions:
                    session.close()
            runner.join(5)
            while events:
                print(events.pop(0))
    except SimError as exc:
        print(f"prism demo: {exc}", file=sys.stderr)
        return 1
    if failure:
        print(f"prism demo: {failure[0]}", file=sys.stderr)
        return 1
    print("demo finished: every simulator process stopped, shared memory removed")
    return 0
