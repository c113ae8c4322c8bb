"""``prism demo``: the simulator, an embedded broker and the monitor (``prism_tui.demo``)."""

from __future__ import annotations

import argparse
import math

from prism_tui.cli.common import UsageError, favour_the_loop, realtime_arg


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``demo`` sub-command and its flags."""
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
    realtime_arg(d, default=0)
    return d


def run(args: argparse.Namespace) -> int:
    """Check the warm-up flags and run the demo until quit or ``--duration``."""
    favour_the_loop()
    from prism_tui.demo import run_demo

    if args.warmup < 2 or not 0 <= args.warmup_s < math.inf:
        raise UsageError("--warmup must be >= 2 and --warmup-s >= 0")
    return run_demo(args.duration, scenario=args.scenario, warmup=args.warmup,
                    warmup_s=args.warmup_s, headless=args.headless, history_db=args.db,
                    broker_url=args.broker, realtime=args.realtime)
