"""The ``prism`` command line (docs/architecture.md §Command line).

Every user error reaches the user as one line on stderr with the exit code of its kind
(2 bad input, 3 permission, 1 anything else); ``--json`` prints one JSON document on
stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from fastdigest import TDigest

from alerting.errors import AlertingError
from prism_sim.errors import SimError
from prism_tui import __version__
from prism_tui.history.store import HistoryError, HistoryPermissionError
from prism_tui.settings import SettingsError
from probes.errors import EXIT_OTHER, EXIT_USAGE, ProbeError

QUANTILES = (("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99), ("p999_ms", 0.999))
DEFAULT_DB = "~/.local/state/latencyprism/history.sqlite"
DEFAULT_FLEET_DB = "~/.local/state/latencyprism/fleet.sqlite"
"""``prism fleet``'s history (prism_tui.fleet_session has the same default)."""


class UsageError(ProbeError):
    """A command-line mistake argparse cannot see (exit 2)."""

    exit_code = EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prism",
        description="LatencyPrism: zero-intrusion latency monitor for LLM inference servers.")
    p.add_argument("--version", action="version", version=f"prism {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def target_args(sp: argparse.ArgumentParser) -> None:
        g = sp.add_mutually_exclusive_group(required=True)
        g.add_argument("--pid", type=int, help="process id of the target")
        g.add_argument("--match", metavar="REGEX",
                       help="regular expression on the target's command line")

    s = sub.add_parser("symbols", help="which catalog probes resolve in a process, and why not")
    target_args(s)
    s.add_argument("--profile", action="append",
                   help="profile name or TOML file (repeatable; default: every profile "
                        "with a library mapped in the target)")
    s.add_argument("--level", choices=("sentinel", "deepdive"), default="deepdive",
                   help="probe level to show (default: deepdive, i.e. all probes)")
    s.add_argument("--json", action="store_true", help="print one JSON document")

    t = sub.add_parser("trace", help="latency distribution of one function (like funclatency)")
    target_args(t)
    t.add_argument("--probe", required=True, metavar="LIB:SYMBOL",
                   help="library (path, basename or soname prefix) and symbol (glob allowed)")
    t.add_argument("--ret", action="store_true",
                   help="probe returns too and report call latency (else call rate and "
                        "the interval between calls)")
    t.add_argument("--duration", type=float, default=None, metavar="S",
                   help="stop after S seconds (default: Ctrl-C or target exit)")
    t.add_argument("--mode", choices=("auto", "thread", "cpu"), default="auto",
                   help="per-thread events, or per-CPU events filtered by pid")
    t.add_argument("--json", action="store_true", help="print one JSON document")

    w = sub.add_parser("watch", help="attach and monitor: the dashboard, or JSON lines")
    target_args(w)
    w.add_argument("--profile", default=None, help="profile name or file (default: the "
                   "first profile whose iteration anchor resolves in the target; a "
                   "profile without an anchor has one chosen from its spans)")
    w.add_argument("--config", metavar="FILE", help="settings TOML (default: $PRISM_CONFIG "
                   "or ~/.config/latencyprism/config.toml when it exists)")
    w.add_argument("--broker", metavar="URL",
                   help="publish alerts to this MQTT broker (mqtt://host:1883, mqtts://...)")
    w.add_argument("--db", metavar="PATH", help="history file (default: settings, "
                   "$PRISM_DB or ~/.local/state/latencyprism/history.sqlite)")
    w.add_argument("--no-history", action="store_true", help="keep no SQLite history")
    w.add_argument("--slo", action="append", metavar="RULE",
                   help="latency objective, e.g. 'decode p99 <= 60ms over 10s', or on one "
                   "stage 'device_sync: decode p99 <= 5ms over 10s' (repeatable)")
    w.add_argument("--record", metavar="FILE",
                   help="also save every span to FILE (gzip JSON lines) for replay")
    w.add_argument("--headless", action="store_true",
                   help="JSON lines (snapshots, alerts) on stdout instead of the dashboard")
    w.add_argument("--duration", type=float, default=None, metavar="S")
    w.add_argument("--rule", choices=("paper", "prism"), default=None,
                   help="detection rule (docs/detection.md; default: settings, prism; "
                   "paper is the reference method)")
    w.add_argument("--warmup", type=int, default=None, metavar="N",
                   help="decode iterations before the baseline is fitted (default 1000)")
    w.add_argument("--warmup-s", type=float, default=None, metavar="S",
                   help="... or seconds they span, whichever comes first, with at least "
                   "200 iterations (default 10; 0: iterations only)")
    w.add_argument("--json", action="store_true", help="one JSON summary at the end")
    w.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus/OpenMetrics /metrics on this port (0: any free "
                   "port; default: settings metrics.port, else none)")
    w.add_argument("--metrics-addr", default=None, metavar="ADDR",
                   help="address /metrics binds (default: settings metrics.addr, 127.0.0.1)")

    ev = sub.add_parser("eval", help="simulator + headless monitor, scored against the labels; "
                        "or a live target with injected faults")
    live = ev.add_mutually_exclusive_group()
    live.add_argument("--pid", type=int, help="a live target instead of the simulator "
                      "(with --faults)")
    live.add_argument("--match", metavar="REGEX", help="a live target by its command line "
                      "(with --faults)")
    ev.add_argument("--faults", metavar="FILE", help="with --pid/--match: a TOML timeline of "
                    "[[fault]] tables (type, start_s, duration_s, intensity) injected into it")
    ev.add_argument("--profile", metavar="NAME|FILE", help="with --pid/--match: the probe "
                    "profile (default: chosen from the target's libraries, as prism watch)")
    ev.add_argument("--scenario", default="smoke", metavar="NAME|FILE",
                    help="built-in scenario name, a TOML file or random:SEED (default: smoke)")
    ev.add_argument("--duration", type=float, default=None, metavar="S")
    ev.add_argument("--rule", choices=("paper", "prism"), default=None,
                    help="detection rule (default: settings, prism)")
    ev.add_argument("--warmup", type=int, default=None, metavar="N",
                    help="decode iterations before the baseline is fitted (default 1000)")
    ev.add_argument("--warmup-s", type=float, default=None, metavar="S",
                    help="... or seconds they span, whichever comes first (default 10)")
    ev.add_argument("--labels", metavar="FILE", help="keep the labels file here")
    ev.add_argument("--record", metavar="FILE", help="save the spans (gzip JSON lines) "
                    "for offline replay, e.g. by bench/detector_sim.py")
    ev.add_argument("--overhead", action="store_true", help="also run the scenario without "
                    "the monitor first and report throughput_ratio (with / without)")
    ev.add_argument("--broker", metavar="URL", help="publish through this broker (default: "
                    "an embedded one); alert latency is measured at a real subscriber")
    ev.add_argument("--json", action="store_true", help="print one JSON document")

    inj = sub.add_parser("inject", help="a host fault in any live process, from outside, "
                         "with its measured effect")
    target_args(inj)
    inj.add_argument("kind", metavar="KIND",
                     help="cpu_squeeze, cpu_throttle, memory_pressure or pause")
    inj.add_argument("--intensity", type=float, default=None, metavar="X",
                     help="how hard, in (0, max] (default: the kind's, as in scenarios; "
                          "pause: 0.5, the share of each 200 ms the target is stopped)")
    inj.add_argument("--duration", type=float, default=None, metavar="S",
                     help="seconds the fault stays on (default: until Ctrl-C or the "
                          "target exits)")
    inj.add_argument("--labels", metavar="FILE",
                     help="write the fault window and its measured effect here (the "
                          "simulator's labels format)")

    h = sub.add_parser("history", help="quantiles over time and alerts from the SQLite history")
    h.add_argument("--db", default=None, metavar="PATH",
                   help=f"history file (default: $PRISM_DB, the settings' history.db or "
                   f"{DEFAULT_DB})")
    h.add_argument("--config", metavar="FILE", help="settings TOML, for its history.db "
                   "(default: $PRISM_CONFIG or ~/.config/latencyprism/config.toml)")
    h.add_argument("--since", default="1h", metavar="DUR|T",
                   help="start: a duration before now (90s, 15m, 2h, 1d) or RFC 3339")
    h.add_argument("--until", default=None, metavar="DUR|T", help="end (default: now)")
    h.add_argument("--stage", help="only this stage")
    h.add_argument("--device", help="only this device")
    h.add_argument("--phase", help="only this phase (prefill, decode)")
    h.add_argument("--json", action="store_true", help="print one JSON document")
    h.add_argument("--fleet", action="store_true", help="the history `prism fleet` keeps "
                   f"(default file {DEFAULT_FLEET_DB}; devices are profile/kind)")

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

    from alerting.gateway.cli import add_gateway_arguments

    g = sub.add_parser("gateway", help="route alerts from MQTT to pagers, webhooks, "
                       "commands; manage silences")
    add_gateway_arguments(g)

    from alerting.bridge import add_arguments as add_bridge_arguments

    bc = sub.add_parser("broker-config", help="print the mosquitto.conf of an edge broker "
                        "that bridges a rack's monitors to core brokers")
    add_bridge_arguments(bc)
    fl = sub.add_parser("fleet", help="every monitor on a broker: hosts, fleet-wide "
                        "quantiles merged from their digests, outliers, alerts (dashboard)")
    fl.add_argument("--broker", metavar="URL", help="MQTT broker (default: settings "
                    "mqtt.broker)")
    fl.add_argument("--config", metavar="FILE", help="settings TOML, for [mqtt]")
    fl.add_argument("--window", type=float, default=60.0, metavar="S",
                    help="merge the digests of windows that started in the last S seconds "
                    "(default 60)")
    fl.add_argument("--interval", type=float, default=1.0, metavar="S",
                    help="seconds between views, JSON lines and history writes (default 1)")
    fl.add_argument("--duration", type=float, default=None, metavar="S",
                    help="stop after S seconds (default: run until interrupted)")
    fl.add_argument("--headless", action="store_true",
                    help="JSON lines on stdout instead of the dashboard")
    fl.add_argument("--json", action="store_true",
                    help="print one JSON document when it stops instead of the dashboard")
    fl.add_argument("--db", metavar="PATH", help="the fleet's history of merged windows "
                    f"(default {DEFAULT_FLEET_DB}; read it with prism history --fleet)")
    fl.add_argument("--no-history", action="store_true", help="keep no SQLite history")
    fl.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                    help="serve the fleet's quantiles as Prometheus metrics on "
                    "127.0.0.1:PORT/metrics (0: any free port, printed on stderr)")

    d = sub.add_parser("demo", help="the main job on an embedded default: simulator, "
                       "broker, monitor, dashboard")
    d.add_argument("--duration", type=float, default=None, metavar="S",
                   help="stop after S seconds (default: run until you quit)")
    d.add_argument("--scenario", default="demo", metavar="NAME|FILE",
                   help="simulator scenario (default: demo, faults every ~40 s after 60 s)")
    d.add_argument("--warmup", type=int, default=1000, metavar="N",
                   help="decode iterations before the baseline is fitted")
    d.add_argument("--warmup-s", type=float, default=10.0, metavar="S",
                   help="... or seconds they span, whichever comes first (default 10)")
    d.add_argument("--broker", metavar="URL", help="use this broker instead of starting one")
    d.add_argument("--db", metavar="PATH", help="keep the history here (default: a "
                   "temporary file removed at exit)")
    d.add_argument("--headless", action="store_true",
                   help="JSON lines on stdout instead of the dashboard")
    for cmd in (w, ev, d):
        cmd.add_argument("--realtime", type=int, nargs="?", const=1,
                         default=None if cmd is w else 0, metavar="PRIO",
                         help="run the loop, its helper threads (and an embedded "
                              "broker) under SCHED_FIFO at PRIO (default 1): alerts are "
                              "not delayed by busy CPUs; needs root or CAP_SYS_NICE")
    return p


LOOP_SWITCH_INTERVAL_S = 0.0005
"""The GIL switch interval of a monitoring process (Python's default is 5 ms)."""


def _favour_the_loop() -> None:
    """Let the monitor's loop get the GIL back within 0.5 ms instead of 5 ms, and the
    CPU sooner after a wake-up.

    The loop mostly waits; when an anchor probe wakes it, any thread busy in Python (a
    model fit, the recorder, the UI's workers) holds the GIL until the switch interval
    ends, and the alert waits with it. A short scheduler slice (Linux 6.12+, no more CPU
    time, see :mod:`prism_tui.scheduling`) lets it preempt a busy process sooner.
    Measured in docs/performance.md.
    """
    sys.setswitchinterval(LOOP_SWITCH_INTERVAL_S)
    from prism_tui.scheduling import request_short_slice

    request_short_slice()  # this (the loop's) thread preempts a CPU hog sooner on wake-up


def _go_realtime(priority: int, what: str = "the monitor's loop", tid: int = 0) -> None:
    """Run ``tid`` (0: this thread) under ``SCHED_FIFO`` at ``priority`` (0: leave it).

    A refusal is one line on stderr and the run goes on at normal priority.
    """
    from prism_tui.scheduling import go_realtime

    why = go_realtime(priority, what, tid)
    if why is not None:
        print(f"prism: {why}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``prism`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "symbols":
            return cmd_symbols(args)
        if args.command == "trace":
            return cmd_trace(args)
        if args.command == "sim":
            return cmd_sim(args)
        if args.command == "history":
            return cmd_history(args)
        if args.command == "inject":
            from prism_tui.inject import run_inject

            return run_inject(args.pid, args.match, args.kind, args.intensity,
                              args.duration, args.labels)
        if args.command in ("watch", "eval", "demo"):
            _favour_the_loop()
        if args.command == "watch":
            return cmd_watch(args)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "fleet":
            return cmd_fleet(args)
        if args.command == "gateway":
            from alerting.gateway.cli import run_gateway_command

            return run_gateway_command(args)
        if args.command == "broker-config":
            from alerting.bridge import main as bridge_config

            print(bridge_config(args), end="")
            return 0
        if args.command == "demo":
            from prism_tui.demo import run_demo

            if args.warmup < 2 or not 0 <= args.warmup_s < math.inf:
                raise UsageError("--warmup must be >= 2 and --warmup-s >= 0")
            return run_demo(args.duration, scenario=args.scenario, warmup=args.warmup,
                            warmup_s=args.warmup_s,
                            headless=args.headless, history_db=args.db,
                            broker_url=args.broker, realtime=args.realtime)
    except (ProbeError, SettingsError, AlertingError, HistoryError, SimError) as exc:
        print(f"prism {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OTHER
    return EXIT_USAGE


# ---------------------------------------------------------------------- watch / eval
def _pick_profile(target: Any, name: str | None) -> Any:
    from probes.catalog import available_profiles, load_profile
    from probes.placement import place_profile

    if name is not None:
        return load_profile(name)
    # only a profile that names its anchor is picked unasked: one without (cpython,
    # blas) would have the monitor cut "iterations" at whatever recurs (GIL waits...)
    for candidate in sorted(available_profiles()):
        profile = load_profile(candidate)
        if profile.anchor is None:
            continue
        placement = place_profile(target, profile, "sentinel")
        if any(s.probe == profile.anchor for s in placement.sites):
            return profile
    raise UsageError(f"no profile's iteration anchor resolves in pid {target.pid}; "
                     "name one with --profile (prism symbols --pid PID lists them; a "
                     "profile without an anchor has one chosen from its spans)")


def _companion_profiles(target: Any, main: Any) -> list[Any]:
    """Other profiles with a sentinel probe that resolves here (nccl beside cuda...)."""
    from probes.catalog import available_profiles, load_profile
    from probes.placement import place_profile

    out = []
    for name in sorted(available_profiles()):
        if name == main.name:
            continue
        profile = load_profile(name)
        if place_profile(target, profile, "sentinel").sites:
            out.append(profile)
    return out


def _watch_settings(args: argparse.Namespace) -> Any:
    from prism_tui.settings import load_settings

    return load_settings(args.config, overrides={
        "engine.detector_rule": args.rule, "engine.warmup_iterations": args.warmup,
        "engine.warmup_s": args.warmup_s, "engine.realtime_priority": args.realtime,
        "engine.slo": tuple(args.slo) if args.slo else None, "mqtt.broker": args.broker,
        "history.db": args.db, "metrics.port": args.metrics_port,
        "metrics.addr": args.metrics_addr})


def broker_config(mqtt: Any) -> Any:
    """The alerting package's broker config from the ``[mqtt]`` settings (None: no MQTT)."""
    from alerting.config import BrokerConfig

    if not mqtt.broker:
        return None
    return BrokerConfig(url=mqtt.broker, username=mqtt.username, password=mqtt.password,
                        tls_ca=mqtt.tls_ca, tls_cert=mqtt.tls_cert, tls_key=mqtt.tls_key,
                        client_id=mqtt.client_id, topic_root=mqtt.topic_root)


def cmd_watch(args: argparse.Namespace) -> int:
    """``prism watch``: monitor a target; the dashboard, JSON lines, or a JSON summary."""
    import asyncio

    from prism_tui.engine.core import SloSpec
    from prism_tui.engine.runtime import Monitor
    from prism_tui.engine.sinks import JsonLinesSink, event_doc
    from prism_tui.engine.view import EngineView
    from prism_tui.live import LiveSession
    from probes.governor import calibrate
    from probes.perf import check_permission
    from probes.target import resolve_target

    settings = _watch_settings(args)
    duration = args.duration if args.duration is not None else settings.watch.duration_s
    check_permission()  # exit 3 with what to grant, before anything starts
    _go_realtime(settings.engine.realtime_priority)
    targets = resolve_target(args.pid, args.match, allow_many=True)
    for target in targets:
        target.check_access()  # exit 3 with what to grant (another user's process)
    profile = _pick_profile(targets[0], args.profile or settings.watch.profile)
    extras = _companion_profiles(targets[0], profile)
    headless = args.headless or args.json or settings.watch.headless
    recorder = None
    costs = calibrate()
    if not costs.measured:  # the overhead estimate and the governor use the defaults
        print(f"prism watch: hit costs {costs.note}", file=sys.stderr)
    try:
        slos = [SloSpec.parse(rule) for rule in settings.engine.slo]
        recorder = _span_recorder(args.record)
        monitor = Monitor(
            targets, profile, extra_profiles=extras, rule=settings.engine.detector_rule,
            warmup=settings.engine.warmup_iterations, warmup_s=settings.engine.warmup_s,
            holds=settings.engine.episode_holds(), slos=slos, match=args.match,
            mode=settings.probe.mode, backend=settings.probe.backend, costs=costs,
            overhead_budget=settings.probe.overhead_budget,
            governor_action=settings.probe.governor_action,
            ring_pages=settings.probe.ring_pages,
            drain_interval_s=settings.probe.drain_interval_s,
            escalation_s=settings.engine.escalation_s,
            snapshot_interval_s=1 / settings.engine.snapshot_hz,
            on_spans=recorder.add if recorder else None,
            on_run_queue=recorder.add_run_queue if recorder else None)
    except ValueError as exc:
        if recorder is not None:
            recorder.discard()
        raise UsageError(str(exc)) from exc
    history_db = None if args.no_history else str(settings.history.path)
    if history_db is not None:
        try:
            os.makedirs(os.path.dirname(history_db) or ".", mode=0o700, exist_ok=True)
        except PermissionError as exc:  # the outbox lives beside it: refuse before attaching
            raise HistoryPermissionError(
                f"cannot create the directory of {history_db}: permission denied; pass a "
                "--db this user may write, or --no-history") from exc
        except OSError as exc:
            raise UsageError(f"cannot create the directory of {history_db}: "
                             f"{exc.strerror}") from exc
    session = LiveSession(monitor, broker=broker_config(settings.mqtt), history_db=history_db,
                          retention_days=settings.history.retention_days,
                          max_iterations=settings.history.max_iterations, freeze_gc=True)
    try:
        metrics = _serve_metrics(session, settings.metrics)
    except UsageError:
        session.close()
        if recorder is not None:
            recorder.discard()
        raise
    counts: dict[str, int] = {}
    try:
        if headless:
            if not args.json:
                monitor.sinks.append(JsonLinesSink())
            previous = monitor.engine.on_observation

            def on_observation(obs: Any) -> None:
                counts[obs.iteration.phase] = counts.get(obs.iteration.phase, 0) + 1
                if previous is not None:
                    previous(obs)

            monitor.engine.on_observation = on_observation
            said: list[tuple[str, ...]] = [()]  # the notices printed so far
            decided = [0]  # the governor decisions printed so far

            def on_view(view: EngineView) -> None:
                for line in _new_notices(said[0], view.notices):  # the status bar's lines
                    print(f"prism watch: {line}", file=sys.stderr, flush=True)
                said[0] = view.notices
                if args.json:
                    return
                for pid, decision, wall in monitor.governor_decisions[decided[0]:]:
                    print(json.dumps({"governor": governor_doc(pid, decision, wall)}),
                          flush=True)
                decided[0] = len(monitor.governor_decisions)
                snap = view.snapshot(settings.engine.window_s)
                if snap is None:
                    return
                rows = [{"stage": k.stage, "device": k.device, "phase": k.phase,
                         "rate": round(v.rate, 3), "p50_ms": v.p50, "p90_ms": v.p90,
                         "p99_ms": v.p99, "p999_ms": v.p999, "max_ms": v.max,
                         "share": v.share}
                        for k, v in sorted(snap.series.items())]
                watched = [{"pid": t.pid, "name": t.name, "state": t.state, "lost": t.lost}
                           for t in view.targets]
                print(json.dumps({"snapshot": {"t_ns": snap.now_ns, "span_s": snap.span_s,
                                               "series": rows, "targets": watched}}),
                      flush=True)

            stop = asyncio.Event()
            loop = asyncio.new_event_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            try:
                loop.run_until_complete(session.run(on_view, stop, duration))
            finally:
                loop.close()
            if args.json:
                print(json.dumps({"profile": profile.name,
                                  "targets": [{"pid": t.pid, "name": t.name} for t in targets],
                                  "iterations": counts, "history": history_db,
                                  "alerts": [event_doc(a) for a in monitor.alerts],
                                  "governor": governor_summary(monitor, costs)}, indent=2))
        else:
            from prism_tui.ui.app import PrismApp

            async def engine(show: Any, stop: asyncio.Event) -> None:
                await session.run(show, stop, duration)

            app = PrismApp(engine=engine, control=monitor, history_db=history_db,
                           title=f"LatencyPrism — {profile.name}",
                           window_s=settings.engine.window_s)
            app.run()
    finally:
        if metrics is not None:
            metrics.close()
        session.close()
        if recorder is not None:
            n = recorder.close(monitor.recorded_processes())
            print(f"prism watch: {n} spans saved to {recorder.path}", file=sys.stderr)
    return 0


def _serve_metrics(session: Any, settings: Any) -> Any:
    """Start ``/metrics`` when ``[metrics] port`` is set (None otherwise); the bound URL
    goes to stderr. An address that cannot be bound is a usage error."""
    if settings.port is None:
        return None
    from prism_tui.metrics import serve_metrics

    try:
        server = serve_metrics(lambda: session.latest_view, settings.port, settings.addr)
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on {settings.addr}:{settings.port}: "
                         f"{exc.strerror or exc}") from None
    print(f"prism watch: metrics on {server.url}", file=sys.stderr, flush=True)
    return server


def _new_notices(before: tuple[str, ...], now: tuple[str, ...]) -> tuple[str, ...]:
    """The lines of ``now`` (the engine's last few notices) not already in ``before``:
    what follows the longest tail of ``before`` that ``now`` starts with."""
    for k in range(min(len(before), len(now)), 0, -1):
        if before[-k:] == now[:k]:
            return now[k:]
    return now


def governor_doc(pid: int, decision: Any, wall: float) -> dict[str, Any]:
    """One governor decision as ``prism watch`` prints it (JSON)."""
    return {"pid": pid, "probe": decision.probe, "status": decision.status,
            "at": round(wall, 3), "overhead_pct": round(100 * decision.overhead, 4),
            "calls_per_s": round(decision.hits_per_s, 1),
            "cost_us_per_call": round(decision.cost_ns / 1000, 3), "reason": decision.reason}


def governor_summary(monitor: Any, costs: Any) -> dict[str, Any]:
    """The overhead governor's settings, hit costs and every decision, for ``--json``."""
    return {"budget_pct": None if monitor.overhead_budget is None
            else round(100 * monitor.overhead_budget, 4),
            "action": monitor.governor_action,
            "hit_cost_us": {"emulated": round(costs.emulated_ns / 1000, 3),
                            "single_step": round(costs.single_step_ns / 1000, 3),
                            "return": round(costs.return_ns / 1000, 3),
                            "wakeup": round(costs.wakeup_ns / 1000, 3),
                            "measured": costs.measured, "note": costs.note},
            "decisions": [governor_doc(pid, d, wall)
                          for pid, d, wall in monitor.governor_decisions]}


def _span_recorder(path: str | None) -> Any:
    """A streaming span recorder for ``--record`` (None without it); bad paths are usage errors."""
    if path is None:
        return None
    from prism_tui.engine.recording import SpanRecorder

    try:
        return SpanRecorder(path)
    except OSError as exc:
        raise UsageError(f"cannot record to {path}: {exc.strerror or exc}") from None


def _percentiles(values: list[float]) -> dict[str, float | None]:
    """p50 / p99 / max of sorted ``values`` in ms (None when empty)."""
    if not values:
        return {"p50": None, "p99": None, "max": None}
    return {"p50": round(values[len(values) // 2], 3),
            "p99": round(values[min(len(values) - 1, int(len(values) * 0.99))], 3),
            "max": round(values[-1], 3)}


def _throughput(done: dict[str, Any], labels_path: str, duration: float) -> dict[str, float]:
    """Generated tokens per second and mean decode iteration latency of one run, from the
    simulator child's final counts (``done``) and its labels."""
    from prism_sim.labels import read_labels

    decode = [it for it in read_labels(labels_path).iterations if it.phase == "decode"]
    mean_ms = (sum(it.end_ns - it.start_ns for it in decode) / len(decode) / 1e6
               if decode else 0.0)
    return {"tokens_per_s": round(int(done["generation_tokens"]) / duration, 3),
            "iterations": float(sum(int(n) for n in done["iterations"].values())),
            "decode_ms_mean": round(mean_ms, 4)}


class AlertReceiver:
    """A real MQTT subscriber in a child process (``prism_tui.alert_receiver``).

    A process of its own, so that the monitor's loop and GIL do not delay the receipt
    timestamps; CLOCK_MONOTONIC is shared by every process on the host.
    """

    def __init__(self, config: Any, realtime: int = 0) -> None:
        self.config = config
        self.realtime = realtime
        self.received: dict[str, int] = {}
        """Alert id → CLOCK_MONOTONIC ns of receipt (the spans' clock)."""
        self._proc: subprocess.Popen[str] | None = None
        self._reader: Any = None

    def __enter__(self) -> AlertReceiver:
        import threading

        from prism_tui.scheduling import realtime_priority

        env = dict(os.environ, PRISM_RECEIVER_USERNAME=self.config.username or "",
                   PRISM_RECEIVER_PASSWORD=self.config.password or "")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "prism_tui.alert_receiver", self.config.url,
             f"{self.config.topic_root}/+/+/alert", str(self.realtime)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert self._proc.stdout is not None
        first = self._proc.stdout.readline().strip()
        if first != "ready":
            err = self._proc.stderr.read() if self._proc.stderr else ""
            self._proc.kill()
            self._proc.wait()
            raise RuntimeError(f"the measuring subscriber did not start: {err.strip()}")
        self._reader = threading.Thread(target=self._read, args=(realtime_priority(),),
                                        daemon=True)
        self._reader.start()
        return self

    def _read(self, priority: int) -> None:
        from prism_tui.scheduling import follow_priority

        follow_priority(priority)  # a normal thread holding the GIL would delay the loop
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            alert_id, _, ns = line.strip().partition(" ")
            if ns.isdigit():
                self.received[alert_id] = int(ns)

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(OSError):
            assert self._proc.stdin is not None
            self._proc.stdin.close()  # its signal to stop
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._reader is not None:
            self._reader.join(5)


def _run_and_receive(session: Any, duration: float, realtime: int = 0) -> dict[str, int]:
    """Run the session while a real MQTT subscriber records when each alert arrives."""
    import asyncio

    with AlertReceiver(session.publisher.config, realtime) as receiver:
        asyncio.run(session.run(None, None, duration))
        time.sleep(0.5)  # the last deliveries
    return dict(receiver.received)


def cmd_eval(args: argparse.Namespace) -> int:
    """``prism eval``: the simulator watched by the monitor, scored against its labels
    (or, with ``--pid``/``--match``, a live target against injected faults)."""
    if args.pid is not None or args.match is not None:
        from prism_tui.eval_target import cmd_eval_target

        return cmd_eval_target(args)
    if args.faults is not None or args.profile is not None:
        raise UsageError("--faults and --profile go with a live target (--pid or --match)")
    from alerting.broker import EmbeddedBroker
    from alerting.config import BrokerConfig
    from prism_sim.errors import ScenarioError
    from prism_sim.labels import read_labels
    from prism_sim.scenario import load_scenario
    from prism_tui.engine.evaluate import (
        alert_episodes,
        detection_delay_s,
        detection_lag,
        match,
        score,
        score_episodes,
    )
    from prism_tui.engine.runtime import Monitor, Observation
    from prism_tui.live import LiveSession
    from prism_tui.scheduling import request_short_slice
    from prism_tui.settings import load_settings
    from prism_tui.sim_child import SimChild
    from probes.catalog import load_profile
    from probes.perf import check_permission
    from probes.target import Target

    engine_settings = load_settings(None, overrides={
        "engine.detector_rule": args.rule, "engine.warmup_iterations": args.warmup,
        "engine.warmup_s": args.warmup_s}).engine
    check_permission()
    _go_realtime(args.realtime)
    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        raise UsageError(str(exc)) from exc
    duration = args.duration or scenario.duration_s
    if not duration:
        raise UsageError(f"scenario {scenario.name!r} runs until stopped: give --duration")
    tmp = tempfile.TemporaryDirectory(prefix="prism-eval-")
    labels_path = args.labels or os.path.join(tmp.name, "labels.jsonl")
    judged: dict[int, list[tuple[int, bool]]] = {}
    unwatched = None
    if args.overhead:  # the same scenario and seed, first without the monitor
        bare_labels = os.path.join(tmp.name, "bare.jsonl")
        with SimChild(args.scenario, duration, bare_labels) as bare:
            time.sleep(duration)
            unwatched = _throughput(bare.finish(duration + 30), bare_labels,
                                    duration)
    with SimChild(args.scenario, duration, labels_path) as sim:
        rank_of = {pid: rank for rank, pid in sim.rank_pids.items()}

        def on_observation(obs: Observation) -> None:
            if obs.verdict is not None:
                judged.setdefault(rank_of[obs.iteration.pid], []).append(
                    (obs.iteration.end_ns, obs.verdict.firing))

        started_ns = sim.started_ns
        targets = [Target(pid) for pid in sim.rank_pids.values()]
        recorder = _span_recorder(args.record)
        monitor = Monitor(targets, load_profile("cuda"), extra_profiles=[load_profile("nccl")],
                          rule=engine_settings.detector_rule,
                          warmup=engine_settings.warmup_iterations,
                          warmup_s=engine_settings.warmup_s,
                          holds=engine_settings.episode_holds(), on_observation=on_observation,
                          telemetry=False, on_spans=recorder.add if recorder else None,
                          on_run_queue=recorder.add_run_queue if recorder else None)
        with contextlib.ExitStack() as stack:
            if recorder is not None:
                stack.callback(recorder.discard)  # a run that fails leaves no temp file
            broker_url = args.broker
            if broker_url is None:
                broker = stack.enter_context(EmbeddedBroker().start())
                broker_url = broker.url
                if broker.pid is not None:  # the alert's next hop
                    request_short_slice(broker.pid)
                    _go_realtime(args.realtime, "the embedded broker", broker.pid)
            session = LiveSession(monitor, broker=BrokerConfig(url=broker_url),
                                  outbox_path=os.path.join(tmp.name, "outbox.sqlite"),
                                  freeze_gc=True)
            stack.callback(session.close)
            left = duration - (time.monotonic_ns() - started_ns) / 1e9
            received = _run_and_receive(session, max(left, 0.0), args.realtime)
            alerts = list(monitor.alerts)
            if recorder is not None:
                n = recorder.close(monitor.recorded_processes())
                print(f"prism eval: {n} spans saved to {recorder.path}", file=sys.stderr)
        watched = _throughput(sim.finish(), labels_path, duration)
    read = read_labels(labels_path)
    labels = read.iterations
    rows = [row for rank, items in sorted(judged.items())
            for row in match(rank, [t for t, _ in items], [f for _, f in items], labels)]
    result = score(rows)
    episodes = score_episodes(rows, alert_episodes(alerts, rank_of), read.faults)
    firing = [a for a in alerts if a.status == "firing"]
    # end to end: the anomalous iteration's end → receipt by a real MQTT subscriber
    latencies = sorted((received[a.id] - a.iteration_end_ns) / 1e6 for a in alerts
                       if a.id in received)
    # the two halves: iteration end → the engine's verdict, verdict → subscriber
    detect = sorted((a.detected_at_ns - a.iteration_end_ns) / 1e6 for a in alerts)
    deliver = sorted((received[a.id] - a.detected_at_ns) / 1e6 for a in alerts
                     if a.id in received)
    doc = {
        "scenario": scenario.name, "duration_s": duration,
        "rule": engine_settings.detector_rule, "warmup": engine_settings.warmup_iterations,
        "warmup_s": engine_settings.warmup_s,
        "alert_holds": dataclasses.asdict(engine_settings.episode_holds()),
        # the paper's per-iteration scores, then what an on-call sees: alert episodes
        **result, "episodes": episodes, "detection_lag_iterations": detection_lag(rows),
        "detection_delay_s": detection_delay_s(rows), "alerts": len(alerts),
        "alerts_firing": len(firing), "alerts_resolved": len(alerts) - len(firing),
        "alerts_received": len(received),
        "alert_latency_ms": {"p50": latencies[len(latencies) // 2] if latencies else None,
                             "p99": latencies[min(len(latencies) - 1,
                                                  int(len(latencies) * 0.99))]
                             if latencies else None,
                             "max": latencies[-1] if latencies else None},
        "detect_latency_ms": _percentiles(detect),
        "delivery_latency_ms": _percentiles(deliver),
        # every fault window: its measured slowdown and what the injector measurably did
        # (a window where it did not bite is scored as abnormal all the same, and shows
        # here), with the iterations judged under it
        "faults": _fault_scores(rows, read, started_ns),
        # every alert's own figures, to find what the slow ones had in common
        "alert_log": [
            {"status": a.status, "pid": a.target.get("pid"), "at_s": round(
                (a.iteration_end_ns - started_ns) / 1e9, 3),
             "detect_ms": round((a.detected_at_ns - a.iteration_end_ns) / 1e6, 3),
             "delivery_ms": round((received[a.id] - a.detected_at_ns) / 1e6, 3)
             if a.id in received else None}
            for a in alerts],
        "faults_not_biting": sum(1 for f in read.faults if f.bit is False),
    }
    if unwatched is not None:
        doc["overhead"] = {"without": unwatched, "with": watched}
        doc["throughput_ratio"] = round(watched["tokens_per_s"] / unwatched["tokens_per_s"], 4) \
            if unwatched["tokens_per_s"] else None
        doc["decode_latency_ratio"] = round(
            watched["decode_ms_mean"] / unwatched["decode_ms_mean"], 4) \
            if unwatched["decode_ms_mean"] else None
    tmp.cleanup()
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"{scenario.name}: {result['iterations']} judged decode iterations, "
              f"{result['abnormal']} abnormal; precision {result['precision']}, recall "
              f"{result['recall']}, F1 {result['f1']}, FPR {result['fpr']}; "
              f"{episodes['episodes_detected']} of {episodes['fault_episodes']} fault "
              f"episodes paged, {episodes['false_episodes']} false; "
              f"{len(firing)} alerts, latency p50 {doc['alert_latency_ms']['p50']} ms; "
              f"{doc['faults_not_biting']} of {len(read.faults)} fault windows did not "
              "measurably bite")
    return 0


def _fault_scores(rows: Sequence[Any], labels: Any, started_ns: int) -> list[dict[str, Any]]:
    """Per fault window: its measured slowdown and strength bucket, whether the injector
    measurably bit and what it measured (``bit``, ``effect``), the judged decode
    iterations that ended inside it, the share of them that fired (recall) and whether
    any did (detected), so scores can be read by fault strength."""
    from prism_sim.labels import fault_effects, strength_bucket
    from prism_tui.engine.evaluate import window_recall

    out: list[dict[str, Any]] = []
    for effect in fault_effects(labels):
        f = effect.fault
        out.append({
            "type": f.type, "rank": f.rank, "intensity": f.intensity,
            "start_s": round((f.start_ns - started_ns) / 1e9, 3),
            "duration_s": round((f.end_ns - f.start_ns) / 1e9, 3),
            "slowdown": effect.slowdown, "strength": strength_bucket(effect.slowdown),
            "bit": f.bit, "effect": f.effect,
            **window_recall(rows, f.start_ns, f.end_ns)})
    return out


# ---------------------------------------------------------------------- history
def cmd_fleet(args: argparse.Namespace) -> int:
    """``prism fleet``: follow every monitor on the broker: the dashboard, JSON lines of
    the fleet's state every ``--interval`` (``--headless``) or one document at the end
    (``--json``); the merged windows go to the fleet's history."""
    import asyncio

    from alerting.fleet import FleetState
    from prism_tui.fleet_session import FleetSession
    from prism_tui.fleet_view import FleetView
    from prism_tui.settings import load_settings

    settings = load_settings(args.config, overrides={"mqtt.broker": args.broker})
    config = broker_config(settings.mqtt)
    if config is None:
        raise UsageError("no broker: give --broker URL or set mqtt.broker")
    for name in ("window", "interval", "duration"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UsageError(f"--{name} must be > 0, not {value:g}")
    if args.headless and args.json:
        raise UsageError("--headless and --json exclude each other")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise UsageError(f"--metrics-port must be 0..65535, not {args.metrics_port}")
    db = None if args.no_history else os.path.expanduser(args.db or DEFAULT_FLEET_DB)
    errors: list[str] = []

    def error(line: str) -> None:
        if not errors or errors[-1] != line:
            print(f"prism fleet: {line}", file=sys.stderr, flush=True)
        errors.append(line)

    session = FleetSession(config, FleetState(config.topic_root, window_s=args.window),
                           history_db=db, interval_s=args.interval, on_error=error)
    metrics = None
    if args.metrics_port is not None:
        from prism_tui.metrics import serve_fleet_metrics

        try:
            metrics = serve_fleet_metrics(lambda: session.latest, args.metrics_port)
        except OSError as exc:
            raise UsageError(f"cannot serve metrics on port {args.metrics_port}: "
                             f"{exc.strerror or exc}") from None
        print(f"prism fleet: metrics on {metrics.url}", file=sys.stderr, flush=True)
    try:
        if args.headless or args.json:
            def line(_: FleetView) -> None:
                if args.headless and session.latest_snapshot is not None:
                    print(json.dumps({"fleet": session.latest_snapshot}), flush=True)

            async def run() -> None:
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, stop.set)
                await session.run(line, stop, args.duration)

            asyncio.run(run())
            if args.json:
                print(json.dumps(session.latest_snapshot, indent=2))
            return 0
        from prism_tui.ui.fleet import FleetApp

        async def feed(show: Callable[[FleetView], None], stop: asyncio.Event) -> None:
            await session.run(show, stop, args.duration)

        code = FleetApp(feed=feed, control=session).run()
        return 1 if code is None else code
    finally:
        if metrics is not None:
            metrics.close()


def cmd_history(args: argparse.Namespace) -> int:
    """``prism history``: merged window digests over time, and the alerts in range."""
    from prism_tui.history.query import history_report
    from prism_tui.settings import load_settings

    if args.fleet:  # the file `prism fleet` writes
        path = os.path.expanduser(args.db or DEFAULT_FLEET_DB)
    else:  # the file `prism watch` writes: the same settings decide it
        path = str(load_settings(args.config, overrides={"history.db": args.db}).history.path)
    doc = history_report(path, args.since, args.until, args.stage, args.device,
                         phase=args.phase)  # a HistoryError carries its own exit code
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"{doc['db']}: {doc['since']} .. {doc['until']} (step {doc['step_s']:g} s)")
    if not doc["series"]:
        print("no windows in this range")
    for series in doc["series"]:
        t = series["total"]
        print(f"\n{series['series']}: {t['count']} values, p50 {_ms(t['p50'])}, "
              f"p99 {_ms(t['p99'])}, p99.9 {_ms(t['p999'])}, max {_ms(t['max'])}")
        for pt in series["points"]:
            print(f"  {pt['start']}  n={pt['count']:<7} p50 {_ms(pt['p50'])}  "
                  f"p99 {_ms(pt['p99'])}  max {_ms(pt['max'])}")
    print(f"\n{len(doc['alerts'])} alert state change(s)")
    for alert in doc["alerts"]:
        print(f"  {alert['at']}  {json.dumps(alert.get('alert', alert))[:120]}")
    return 0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} ms"


# ---------------------------------------------------------------------- sim
def cmd_sim(args: argparse.Namespace) -> int:
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


# ---------------------------------------------------------------------- symbols
def cmd_symbols(args: argparse.Namespace) -> int:
    """``prism symbols``: every probe decision of the chosen profiles on the target."""
    from probes.catalog import available_profiles, load_profile
    from probes.governor import calibrate
    from probes.placement import place_profile
    from probes.target import resolve_target

    [target] = resolve_target(args.pid, args.match)
    costs = calibrate()
    names = args.profile or sorted(available_profiles())
    files = target.mapped_files()
    report: list[dict[str, Any]] = []
    for name in names:
        profile = load_profile(name)
        mapped = [f.path for f in files for lib in profile.libraries if lib.matches(f.name)]
        if not args.profile and not mapped:
            continue
        placement = place_profile(target, profile, args.level)
        probes = []
        for d in placement.decisions:
            entry: dict[str, Any] = {
                "probe": d.probe, "stage": d.stage, "level": d.level, "status": d.status,
                "optional": d.optional, "reason": d.reason, "near": list(d.near),
                "sites": [{"library": s.library, "symbol": s.symbol,
                           "offset": s.offset, "function_offset": s.function_offset,
                           "skipped_endbr64": s.offset != s.function_offset,
                           "site": s.site, "ret": s.ret,
                           "est_cost_us_per_call": round(
                               costs.site_cost_ns(s.site, s.ret) / 1000, 2)}
                          for s in d.sites]}
            probes.append(entry)
        report.append({"profile": profile.name, "libraries": sorted(set(mapped)),
                       "probes": probes})
    doc: dict[str, Any] = {
        "target": {"pid": target.pid, "name": target.name, "exe": target.exe},
        "hit_cost_us": {"emulated": round(costs.emulated_ns / 1000, 2),
                        "single_step": round(costs.single_step_ns / 1000, 2),
                        "return": round(costs.return_ns / 1000, 2),
                        "wakeup": round(costs.wakeup_ns / 1000, 2),
                        "measured": costs.measured, "note": costs.note},
        "profiles": report}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"pid {target.pid} ({target.name}) {target.exe}")
    hc = doc["hit_cost_us"]
    print(f"probe hit cost measured here: {hc['emulated']} us emulated, "
          f"{hc['single_step']} us single-stepped, +{hc['return']} us per return probe")
    if not report:
        print("no catalog profile has a library mapped in this process "
              "(name one with --profile)")
    for prof in report:
        print(f"\nprofile {prof['profile']}: "
              f"{', '.join(prof['libraries']) or 'no library mapped'}")
        for pr in prof["probes"]:
            if pr["status"] == "resolved":
                for site in pr["sites"]:
                    where = f"{os.path.basename(site['library'])}+{site['offset']:#x}"
                    note = " (after endbr64)" if site["skipped_endbr64"] else ""
                    kind = "entry+return" if site["ret"] else "entry"
                    print(f"  ok      {pr['probe']:<22} {pr['stage']:<14} {site['symbol']} "
                          f"@ {where} {kind}, {site['site']}{note}, "
                          f"~{site['est_cost_us_per_call']:g} us/call")
            else:
                opt = " (optional)" if pr["optional"] else ""
                print(f"  {pr['status']:<7} {pr['probe']:<22} {pr['stage']:<14} "
                      f"{pr['reason']}{opt}")
    return 0


# ---------------------------------------------------------------------- trace
def _quantiles(values_ms: list[float]) -> dict[str, float | None]:
    if not values_ms:
        empty: dict[str, float | None] = {k: None for k, _ in QUANTILES}
        return empty | {"max_ms": None, "mean_ms": None}
    digest = TDigest.from_values(values_ms)
    out: dict[str, float | None] = {k: round(digest.quantile(q), 6) for k, q in QUANTILES}
    out["max_ms"] = round(max(values_ms), 6)
    out["mean_ms"] = round(sum(values_ms) / len(values_ms), 6)
    return out


def _log2_histogram(values_ms: list[float]) -> list[tuple[int, int, int]]:
    """(low µs, high µs, count) buckets as bcc's funclatency prints them."""
    counts: dict[int, int] = {}
    for v in values_ms:
        us = max(v * 1000.0, 0.0)
        b = 0 if us < 1 else int(math.log2(us)) + 1
        counts[b] = counts.get(b, 0) + 1
    if not counts:
        return []
    rows = []
    for b in range(min(counts), max(counts) + 1):
        low = 0 if b == 0 else 1 << (b - 1)
        rows.append((low, (1 << b) - 1, counts.get(b, 0)))
    return rows


def cmd_trace(args: argparse.Namespace) -> int:
    """``prism trace``: count, rate and latency quantiles of one function."""
    from probes.perf import check_permission
    from probes.placement import place_symbol
    from probes.target import resolve_target
    from probes.uprobes import UprobeSession

    lib, sep, symbol = args.probe.rpartition(":")
    if not sep or not lib or not symbol:
        raise UsageError(f"--probe wants LIB:SYMBOL (for example libc:clock_nanosleep), "
                         f"got {args.probe!r}")
    if args.duration is not None and args.duration <= 0:
        raise UsageError("--duration must be positive")
    check_permission()
    [target] = resolve_target(args.pid, args.match)
    sites = place_symbol(target, lib, symbol, ret=args.ret)
    durations: list[float] = []
    starts: list[int] = []
    per_symbol: dict[str, int] = {}
    stop = {"flag": False}

    def on_signal(_sig: int, _frame: object) -> None:
        stop["flag"] = True

    def take(spans: list[Any]) -> None:
        for span in spans:
            per_symbol[span.probe] = per_symbol.get(span.probe, 0) + 1
            if args.ret:
                durations.append(span.duration_ns / 1e6)
            else:
                starts.append(span.start_ns)

    old = signal.signal(signal.SIGINT, on_signal)
    old_term = signal.signal(signal.SIGTERM, on_signal)
    if not args.json:
        names = ", ".join(sorted({s.symbol for s in sites}))
        print(f"Tracing {len(sites)} function(s) in pid {target.pid} ({target.name}): {names}"
              f"{'' if args.duration else '... Hit Ctrl-C to end.'}", file=sys.stderr)
    t0 = time.monotonic()
    lost = 0
    session = UprobeSession([target], sites, mode=args.mode, drain_interval_s=0.1)
    try:
        session.open()
        while not stop["flag"]:
            elapsed = time.monotonic() - t0
            if args.duration is not None and elapsed >= args.duration:
                break
            remaining = 0.2 if args.duration is None else min(0.2, args.duration - elapsed)
            take(session.poll(max(remaining, 0.0)))
            if session.all_exited:
                break
        take(session.read())
        lost = session.dropped()
    finally:
        session.close()
        signal.signal(signal.SIGINT, old)
        signal.signal(signal.SIGTERM, old_term)
    wall = time.monotonic() - t0
    count = len(durations) if args.ret else len(starts)
    values = durations
    if not args.ret:
        starts.sort()
        values = [(b - a) / 1e6 for a, b in itertools.pairwise(starts)]
    doc: dict[str, Any] = {
        "target": {"pid": target.pid, "name": target.name},
        "probe": args.probe,
        "measure": "latency" if args.ret else "interval",
        "sites": [{"library": s.library, "symbol": s.symbol, "offset": s.offset,
                   "site": s.site} for s in sites],
        "mode": session.mode,
        "count": count,
        "duration_s": round(wall, 6),
        "rate_hz": round(count / wall, 3) if wall > 0 else 0.0,
        **_quantiles(values),
        "lost": lost,
        "unfinished": session.stats.unfinished,
        "orphan_returns": session.stats.orphan_returns,
        "threads": session.stats.threads_attached,
        "target_exited": session.all_exited,
        "per_symbol": per_symbol,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    _print_trace(doc, values)
    return 0


def _print_trace(doc: dict[str, Any], values: list[float]) -> None:
    label = "usecs" if doc["measure"] == "latency" else "usecs between calls"
    rows = _log2_histogram(values)
    if rows:
        peak = max(c for _, _, c in rows)
        print(f"{label:>24} : count    distribution")
        for low, high, c in rows:
            bar = "*" * round(40 * c / peak) if peak else ""
            print(f"{low:>10} -> {high:<10} : {c:<8} |{bar:<40}|")
    ended = " (target exited)" if doc["target_exited"] else ""
    print(f"\n{doc['count']} calls in {doc['duration_s']:.2f} s ({doc['rate_hz']:.1f}/s){ended}, "
          f"{doc['lost']} events lost, mode {doc['mode']}")
    if doc["p50_ms"] is not None:
        what = "latency" if doc["measure"] == "latency" else "interval"
        print(f"{what} ms: p50 {doc['p50_ms']:.4f}  p90 {doc['p90_ms']:.4f}  "
              f"p99 {doc['p99_ms']:.4f}  p99.9 {doc['p999_ms']:.4f}  max {doc['max_ms']:.4f}")
    if len(doc["per_symbol"]) > 1:
        for name, n in sorted(doc["per_symbol"].items()):
            print(f"  {name}: {n}")




if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
