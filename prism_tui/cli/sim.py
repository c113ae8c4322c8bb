"""``prism sim``: the simulated inference server alone.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from prism_tui.cli.common import UsageError
from probes.errors import EXIT_OTHER


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``sim`` sub-command and its flags."""
    sm = sub.add_parser("sim", help="run the simulated inference server")
    sm.add_argument("--scenario", default="smoke", metavar="NAME|FILE",
                    help="built-in scenario name, a TOML file or random:SEED (a generated "
                    "one; default: smoke)")
    sm.add_argument("--print", action="store_true", help="print the scenario's TOML "
                    "(what random:SEED draws) and exit")
    sm.add_argument("--duration", type=float, default=None, metavar="S",
                    help="stop after S seconds (default: the scenario's duration)")
    sm.add_argument("--labels", metavar="FILE", help="write ground-truth labels (JSON lines)")
    sm.add_argument("--metrics-port", type=int, default=0, metavar="PORT",
                    help="loopback port of the Prometheus /metrics endpoint (0: any free)")
    sm.add_argument("--json", action="store_true",
                    help="print JSON lines on stdout: the ranks' pids once they run, the "
                    "final counts at the end; stop when the parent process exits (for "
                    "scripts; prism eval uses it)")
    return sm


def run(args: argparse.Namespace) -> int:
    """``prism sim``: run a scenario until its end, Ctrl-C or SIGTERM; clean up always."""
    import threading

    from prism_sim.errors import ScenarioError, SimError
    from prism_sim.scenario import load_scenario, scenario_text
    from prism_sim.server import SimServer

    if args.duration is not None and args.duration <= 0:
        raise UsageError("--duration must be positive")
    try:
        scenario = load_scenario(args.scenario)
        if args.print:
            print(scenario_text(args.scenario)[0], end="")
            return 0
        if args.duration is not None:  # what runs, so the labels' scenario line says it
            scenario = scenario.with_duration(args.duration)
    except ScenarioError as exc:
        raise UsageError(str(exc)) from exc
    stop = threading.Event()

    def on_signal(_sig: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if args.json:  # a script's child: stop (cleanly) when the script is gone
        parent = os.getppid()

        def watch_parent() -> None:
            while not stop.wait(0.5):
                if os.getppid() != parent:
                    stop.set()

        threading.Thread(target=watch_parent, daemon=True, name="parent-watch").start()

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    try:
        with SimServer(scenario, labels=args.labels, metrics_port=args.metrics_port,
                       log=log) as server:
            if args.json:
                print(json.dumps({"event": "started", "started_ns": server.started_ns,
                                  "ranks": {str(r): p for r, p in server.rank_pids.items()},
                                  "metrics_url": getattr(server, "metrics_url", None)}),
                      flush=True)
            server.run(stop=stop)
            st = server.stats
            log(f"done: iterations per rank {dict(sorted(st.iterations.items()))}, "
                f"{st.requests} requests finished"
                + (f", labels in {args.labels}" if args.labels else ""))
            if args.json:
                with st.lock:
                    print(json.dumps({"event": "done", "requests": st.requests,
                                      "prompt_tokens": st.prompt_tokens,
                                      "generation_tokens": st.generation_tokens,
                                      "iterations": {str(r): n for r, n
                                                     in sorted(st.iterations.items())}}),
                          flush=True)
    except SimError as exc:
        print(f"prism sim: {exc}", file=sys.stderr)
        return EXIT_OTHER
    return 0
