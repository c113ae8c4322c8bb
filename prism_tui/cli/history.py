"""``prism history``: quantiles over time and the alerts, from the SQLite history.
"""

from __future__ import annotations

import argparse
import json
import os

from prism_tui.settings import DEFAULT_DB, DEFAULT_FLEET_DB


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``history`` sub-command and its flags."""
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
    return h


def run(args: argparse.Namespace) -> int:
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
