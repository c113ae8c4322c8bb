"""``prism watch``: attach to a live target and monitor it: the dashboard, JSON lines
(``--headless``) or one JSON summary at the end (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from typing import Any

from prism_tui.cli.common import (
    UsageError,
    broker_config,
    favour_the_loop,
    realtime_arg,
    target_args,
    try_realtime,
)
from prism_tui.history.store import HistoryPermissionError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``watch`` sub-command and its flags."""
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
    realtime_arg(w, default=None)
    return w


def run(args: argparse.Namespace) -> int:
    """``prism watch``: monitor a target; the dashboard, JSON lines, or a JSON summary."""
    favour_the_loop()
    import asyncio

    from prism_tui.alert_wire import JsonLinesSink, event_doc
    from prism_tui.dashboard_view import DashboardView
    from prism_tui.session import (
        SessionSpec,
        build_session,
        companion_profiles,
        monitor_config,
        pick_profile,
        run_headless,
        span_recorder,
    )
    from probes.governor import calibrate
    from probes.perf import check_permission
    from probes.target import resolve_target

    settings = _watch_settings(args)
    duration = args.duration if args.duration is not None else settings.watch.duration_s
    check_permission()  # exit 3 with what to grant, before anything starts
    try_realtime(settings.engine.realtime_priority)
    targets = resolve_target(args.pid, args.match, allow_many=True)
    for target in targets:
        target.check_access()  # exit 3 with what to grant (another user's process)
    profile = pick_profile(targets[0], args.profile or settings.watch.profile)
    extras = companion_profiles(targets[0], profile)
    headless = args.headless or args.json or settings.watch.headless
    costs = calibrate(bpf=settings.probe.backend != "perf")  # each backend's own hit costs
    if not costs.measured:  # the overhead estimate and the governor use the defaults
        print(f"prism watch: hit costs {costs.note}", file=sys.stderr)
    history = None if args.no_history else settings.history
    history_db = None if history is None else str(history.path)
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
    counts: dict[str, int] = {}

    def count(obs: Any) -> None:
        counts[obs.iteration.phase] = counts.get(obs.iteration.phase, 0) + 1

    spec = SessionSpec(targets, profile, extras, engine=settings.engine,
                       monitor=monitor_config(settings.engine, keep_spans=not headless),
                       probe=settings.probe, history=history,
                       broker=broker_config(settings.mqtt), match=args.match, costs=costs)
    recorder = span_recorder(args.record)
    try:
        session = build_session(
            spec, alert_sinks=[JsonLinesSink()] if headless and not args.json else [],
            observer=count if headless else None, recorder=recorder)
    except ValueError as exc:
        if recorder is not None:
            recorder.discard()
        raise UsageError(str(exc)) from exc
    except BaseException:
        if recorder is not None:
            recorder.discard()
        raise
    monitor = session.monitor
    try:
        metrics = serve_session_metrics(session, settings.metrics)
    except UsageError:
        session.close()
        if recorder is not None:
            recorder.discard()
        raise
    try:
        if headless:
            said: list[tuple[str, ...]] = [()]  # the notices printed so far
            decided = [0]  # the governor decisions printed so far
            reader_gone = threading.Event()

            def emit(doc: dict[str, Any], indent: int | None = None) -> None:
                if reader_gone.is_set():
                    return
                try:
                    print(json.dumps(doc, indent=indent), flush=True)
                except BrokenPipeError:  # `prism watch --headless | head`: stop, quietly
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                    reader_gone.set()
                    print("prism watch: standard output closed; stopping", file=sys.stderr,
                          flush=True)

            def on_view(view: DashboardView) -> None:
                for line in new_notices(said[0], view.notices):  # the status bar's lines
                    print(f"prism watch: {line}", file=sys.stderr, flush=True)
                said[0] = view.notices
                if args.json:
                    return
                for pid, decision, wall in monitor.governor_decisions[decided[0]:]:
                    emit({"governor": governor_doc(pid, decision, wall)})
                decided[0] = len(monitor.governor_decisions)
                snap = view.snapshot(settings.engine.window_s)
                if snap is None:
                    return
                rows = [{"stage": k.stage, "device": k.device, "phase": k.phase,
                         "rate": round(v.rate, 3), "p50_ms": v.p50, "p90_ms": v.p90,
                         "p99_ms": v.p99, "p999_ms": v.p999, "max_ms": v.max,
                         "share": v.share}
                        for k, v in sorted(snap.series.items())]
                shown = [{"pid": t.pid, "name": t.name, "state": t.state, "lost": t.lost,
                          "backend": t.backend} for t in view.targets]
                emit({"snapshot": {"t_ns": snap.now_ns, "span_s": snap.span_s,
                                   "series": rows, "targets": shown}})

            run_headless(session, on_view, duration, until=reader_gone)
            if args.json:
                # the engine keeps every process it watched (an exited one as gone, a
                # restart under --match as a new pid), named and with its backend from
                # the attach on
                last = session.latest_view
                watched = ([{"pid": t.pid, "name": t.name, "backend": t.backend}
                            for t in last.targets] if last is not None else
                           [{"pid": t.pid, "name": t.name, "backend": ""} for t in targets])
                emit({"profile": profile.name, "targets": watched,
                      "iterations": counts, "history": history_db,
                      "alerts": [event_doc(a) for a in monitor.alerts],
                      "governor": governor_summary(monitor, costs)}, indent=2)
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


def _watch_settings(args: argparse.Namespace) -> Any:
    from prism_tui.settings import load_settings

    return load_settings(args.config, overrides={
        "engine.detector_rule": args.rule, "engine.warmup_iterations": args.warmup,
        "engine.warmup_s": args.warmup_s, "engine.realtime_priority": args.realtime,
        "engine.slo": tuple(args.slo) if args.slo else None, "mqtt.broker": args.broker,
        "history.db": args.db, "metrics.port": args.metrics_port,
        "metrics.addr": args.metrics_addr})


def serve_session_metrics(session: Any, settings: Any) -> Any:
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


def new_notices(before: tuple[str, ...], now: tuple[str, ...]) -> tuple[str, ...]:
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
            "hit_cost_us": hit_cost_doc(costs),
            "decisions": [governor_doc(pid, d, wall)
                          for pid, d, wall in monitor.governor_decisions]}


def hit_cost_doc(costs: Any) -> dict[str, Any]:
    """Calibrated hit costs in µs for ``--json``; the bpf backend's under ``bpf`` when
    they were timed (a bpf session is governed with those)."""
    doc = {"emulated": round(costs.emulated_ns / 1000, 3),
           "single_step": round(costs.single_step_ns / 1000, 3),
           "return": round(costs.return_ns / 1000, 3),
           "wakeup": round(costs.wakeup_ns / 1000, 3),
           "measured": costs.measured, "note": costs.note}
    if costs.bpf is not None:
        doc["bpf"] = hit_cost_doc(costs.bpf)
    return doc
