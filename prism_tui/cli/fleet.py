"""``prism fleet``: every monitor on a broker: the fleet dashboard, JSON lines or one
document, its history of merged windows and Prometheus metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable

from prism_tui.cli.common import UsageError, broker_config
from prism_tui.gc_pauses import collect_rarely, freeze_heap
from prism_tui.settings import DEFAULT_FLEET_DB


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``fleet`` sub-command and its flags."""
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
    return fl


def run(args: argparse.Namespace) -> int:
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
    # start-up's objects out of every collection, and full collections rare: the ingest
    # loop must not stall behind a walk of the kept windows (prism_tui/gc_pauses.py)
    freeze_heap()
    collect_rarely()
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
