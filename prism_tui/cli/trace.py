"""``prism trace``: the latency (or call-interval) distribution of one function, as
bcc's funclatency prints it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import signal
import sys
import time
from typing import Any

from fastdigest import TDigest

from prism_tui.cli.common import UsageError, target_args

QUANTILES = (("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99), ("p999_ms", 0.999))


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``trace`` sub-command and its flags."""
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
    return t


def run(args: argparse.Namespace) -> int:
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
