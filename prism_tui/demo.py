"""``prism demo`` until the dashboard exists: the simulator watched by the monitor.

It starts the simulated tensor-parallel inference server on the ``demo`` scenario
(periodic faults after a minute of steady load), attaches the ``cuda`` and ``nccl``
catalog profiles to every rank by uprobes, exactly as it would to a real engine, and
runs the monitor on them: every two seconds a per-stage table (rate, p50, p99, share of
the iteration, per device and phase), and every alert as it fires or resolves, with how
long after the anomalous iteration it was raised. Nothing in the simulator knows it is
watched. MQTT delivery and the Textual dashboard replace this printout in later issues.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time

from prism_sim.errors import SimError
from prism_sim.scenario import load_scenario
from prism_sim.server import SimServer
from prism_tui.engine.runtime import AlertEvent, Monitor
from prism_tui.engine.sketches import Snapshot
from probes.catalog import load_profile
from probes.governor import calibrate
from probes.perf import check_permission
from probes.target import Target

SNAPSHOT_S = 2.0


def _table(snap: Snapshot, devices: dict[str, str]) -> list[str]:
    lines = [f"{'device':<8}{'phase':<8}{'stage':<13}{'rate/s':>8}{'p50 ms':>9}"
             f"{'p99 ms':>9}{'share':>7}"]
    for key, v in sorted(snap.series.items(), key=lambda kv: (kv[0].device, kv[0].phase,
                                                              kv[0].stage != "iteration",
                                                              kv[0].stage)):
        if key.phase == "unknown" or v.count == 0:
            continue
        share = "" if v.share is None or key.stage == "iteration" else f"{v.share:.0%}"
        lines.append(f"{devices.get(key.device, key.device):<8}{key.phase:<8}"
                     f"{key.stage:<13}{v.rate:>8.1f}{v.p50:>9.3f}{v.p99:>9.3f}{share:>7}")
    return lines


def _alert_line(alert: AlertEvent) -> str:
    top = f" | suspect: {alert.suspects[0]['stage']}" if alert.suspects else ""
    return (f"*** ALERT {alert.status.upper()} [{alert.severity}] {alert.summary} "
            f"(raised {alert.alert_latency_ms:.1f} ms after the iteration ended){top}")


def run_demo(duration_s: float = 100.0) -> int:
    """Run the interim demo for ``duration_s`` seconds (Ctrl-C ends it sooner)."""
    check_permission()  # exit 3 with what to grant, before anything starts
    print("LatencyPrism demo (interim: MQTT alerts and the dashboard come with later "
          "issues).\nThe simulated inference server runs its 'demo' scenario: steady load, "
          "then a fault every 40 s from the 60th second.\nIts ranks are traced by uprobes "
          "with the unchanged cuda and nccl profiles; the baseline is fitted after 1,000 "
          "decode iterations.\n", flush=True)
    costs = calibrate()
    print(f"probe hit cost here: {costs.emulated_ns / 1000:.1f} us (emulated site), "
          f"{costs.single_step_ns / 1000:.1f} us (single-stepped), "
          f"+{costs.return_ns / 1000:.1f} us per return probe", flush=True)
    events: list[str] = []

    def log(line: str) -> None:
        events.append(f"[{time.strftime('%H:%M:%S')}] simulator: {line}")

    class PrintSink:
        def emit(self, alert: AlertEvent) -> None:
            print(_alert_line(alert), flush=True)

    try:
        with SimServer(load_scenario("demo"), log=log) as server:
            stop_sim = threading.Event()
            runner = threading.Thread(target=server.run, args=(duration_s, stop_sim),
                                      daemon=True)
            runner.start()
            targets = [Target(pid) for pid in server.rank_pids.values()]
            devices = {"cpu": "cpu"}
            last = [time.monotonic()]

            def on_snapshot(snap: Snapshot) -> None:
                while events:
                    print(events.pop(0), flush=True)
                if time.monotonic() - last[0] >= SNAPSHOT_S:
                    last[0] = time.monotonic()
                    print("\n".join(_table(snap, devices)), "\n", flush=True)

            with Monitor(targets, load_profile("cuda"), extra_profiles=[load_profile("nccl")],
                         rule="prism", sinks=[PrintSink()], on_snapshot=on_snapshot) as mon:
                for placement in mon.placements:
                    print(f"pid {placement.target_pid}: {placement.profile} "
                          f"{len(placement.sites)} probes", flush=True)
                stop = asyncio.Event()
                loop = asyncio.new_event_loop()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, stop.set)
                try:
                    loop.run_until_complete(mon.run(duration_s, stop))
                finally:
                    loop.close()
                print(f"\n{len(mon.alerts)} alert state changes", flush=True)
            stop_sim.set()
            runner.join(10)
            while events:
                print(events.pop(0))
    except SimError as exc:
        print(f"prism demo: {exc}", file=sys.stderr)
        return 1
    print("demo finished: every simulator process stopped, shared memory removed")
    return 0
