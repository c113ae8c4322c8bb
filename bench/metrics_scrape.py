"""Prometheus scrape of a monitor with 100 series: time per scrape, and values = dashboard's.

Run: ``.venv/bin/python bench/metrics_scrape.py [--series-per-device 20] [--scrapes 300]``

An :class:`~prism_tui.engine.core.Engine` watches 5 targets (one device each); each
device has 2 phases × (9 stages + the iteration) = 20 series, so 100 in all, with 300 s
of 1-s windows of 50 values (lognormal) each, as after five minutes of a real run. Its
view is served by :func:`prism_tui.metrics.serve_metrics` on loopback, as ``prism watch
--metrics-port`` does, and scraped over HTTP by a client process (``urllib``, a new
connection per scrape), in the text and the OpenMetrics format.

Printed: the median and p99 wall time of a scrape (request to last byte, measured by the
client), the CPU time the monitor's process spends per scrape (rendering alone, per
format, ``time.process_time``: what a scrape takes from the monitor whatever else runs
on the host), the same with ``prometheus_client``'s own ``generate_latest`` (whose bytes
are checked equal), the part of it the collector takes (building the families, before
they are written), the goal (≤ 10 ms), the load average while
measuring, and the check that every quantile, count and sum in the scrape equals the
dashboard's 10-s snapshot of the same view (exact float equality after ms → s).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from prism_tui.dashboard_view import DashboardView  # noqa: E402
from prism_tui.engine.core import Engine  # noqa: E402
from prism_tui.engine.sketches import ITERATION, SeriesKey  # noqa: E402
from prism_tui.exposition import MetricsApp  # noqa: E402
from prism_tui.gc_pauses import freeze_heap  # noqa: E402
from prism_tui.metrics import serve_metrics  # noqa: E402

GOAL_MS = 10.0
DEVICES = 5
PHASES = ("prefill", "decode")
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def _p99(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return s[max(0, math.ceil(0.99 * len(s)) - 1)]  # nearest rank


def build_engine(stages_per_phase: int, seconds: int = 300, per_window: int = 50) -> Engine:
    """An engine with ``DEVICES × 2 × stages_per_phase`` series of ``seconds`` closed windows."""
    now = [10**12]
    engine = Engine(clock=lambda: now[0], host="bench")
    rng = random.Random(7)
    stages = [ITERATION, *(f"stage_{i}" for i in range(stages_per_phase - 1))]
    for d in range(DEVICES):
        engine.watch(10_000 + d, f"rank{d}", "anchor", {}, profile="bench", device=f"cuda:{d}")
    keys = [SeriesKey(s, f"cuda:{d}", p) for d in range(DEVICES) for p in PHASES for s in stages]
    start = now[0]
    for second in range(seconds):
        for key in keys:
            base = 0.5 + 10 * (key.stage == ITERATION)
            for i in range(per_window):
                engine.sketches.add(key, start + second * 10**9 + i * 10**7,
                                    base * rng.lognormvariate(0, 0.3))
    now[0] = start + (seconds + 1) * 10**9
    return engine


CLIENT = """
import sys, time, urllib.request
url, accept, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
headers = {"Accept": accept} if accept else {}
for i in range(n + 20):
    t0 = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
        r.read()
    if i >= 20:  # the first connections warm up
        print((time.perf_counter() - t0) * 1000)
"""


def client_scrapes(url: str, accept: str | None, n: int) -> list[float]:
    """``n`` scrapes by another process, as Prometheus would: wall ms of each."""
    out = subprocess.run([sys.executable, "-c", CLIENT, url, accept or "", str(n)],
                         capture_output=True, text=True, check=True, timeout=600).stdout
    return [float(x) for x in out.split()]


def scrape(url: str, accept: str | None) -> tuple[float, str]:
    """One scrape over a new connection: (ms, body)."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=5) as reply:
        body = reply.read()
    return (time.perf_counter() - t0) * 1000, body.decode()


def prometheus_scrapes(port: int, seconds: float) -> list[float]:
    """Run Debian's ``prometheus`` scraping ``127.0.0.1:port`` every second for
    ``seconds``; its ``scrape_duration_seconds`` samples, in ms."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise SystemExit("prometheus is not installed (make system-deps)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        web = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n"
                          "scrape_configs:\n  - job_name: prism\n    static_configs:\n"
                          f"      - targets: ['127.0.0.1:{port}']\n")
        prom = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp}/tsdb",
             f"--web.listen-address=127.0.0.1:{web}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(seconds)
            query = urllib.parse.quote(f"scrape_duration_seconds[{int(seconds) + 60}s]")
            with urllib.request.urlopen(f"http://127.0.0.1:{web}/api/v1/query?query={query}",
                                        timeout=10) as reply:
                doc = json.loads(reply.read())
        finally:
            prom.terminate()
            prom.wait(10)
    (series,) = doc["data"]["result"]
    return [float(v) * 1000 for _, v in series["values"]]


def check_equal(view: DashboardView, text: str) -> int:
    """Every series' quantiles/count/sum in ``text`` equal ``view``'s; returns series seen."""
    snap = view.snapshot(10.0)
    assert snap is not None
    seen = set()
    for family in text_string_to_metric_families(text):
        if family.name != "latencyprism_stage_latency_seconds":
            continue
        for s in family.samples:
            key = SeriesKey(s.labels["stage"], s.labels["device"], s.labels["phase"])
            row, total = snap.series[key], view.series_totals[key]
            seen.add(key)
            if s.name.endswith("_count"):
                expected = float(total.count)
            elif s.name.endswith("_sum"):
                expected = total.sum_ms / 1000
            else:
                ms = {"0.5": row.p50, "0.9": row.p90, "0.99": row.p99,
                      "0.999": row.p999}[s.labels["quantile"]]
                expected = ms / 1000
            if s.value != expected:
                raise SystemExit(f"MISMATCH {s.name} {s.labels}: {s.value} != {expected}")
    if seen != set(snap.series):
        raise SystemExit(f"series missing from the scrape: {set(snap.series) - seen}")
    return len(seen)


def main() -> None:
    """Build the monitor, serve it, scrape it and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series-per-device", type=int, default=20,
                    help="series per device (2 phases × stages); 20 gives 100 in all")
    ap.add_argument("--scrapes", type=int, default=300)
    ap.add_argument("--prometheus", type=float, default=0.0, metavar="S",
                    help="also let Debian's prometheus scrape it every second for S "
                         "seconds and read back its own scrape_duration_seconds")
    args = ap.parse_args()
    t0 = time.perf_counter()
    engine = build_engine(args.series_per_device // len(PHASES))
    view = DashboardView.of(engine.view())  # as a session without a broker
    build_s = time.perf_counter() - t0
    freeze_heap()  # as prism watch does once started: collections skip the engine's heap
    server = serve_metrics(lambda: view, 0)
    try:
        rows = []
        load = os.getloadavg()[0]
        for label, accept in (("text 0.0.4", None), ("OpenMetrics 1.0", OPENMETRICS)):
            times = client_scrapes(server.url, accept, args.scrapes)
            rows.append((f"HTTP scrape (wall, client process), {label}", times,
                         len(scrape(server.url, accept)[1])))
        empty = serve_metrics(lambda: None, 0)  # no view yet: an empty body
        try:
            rows.append(("HTTP scrape of an empty endpoint (the client's and HTTP's own "
                         "cost)", client_scrapes(empty.url, None, args.scrapes), 0))
        finally:
            empty.close()
        if args.prometheus > 0:
            durations = prometheus_scrapes(server.port, args.prometheus)
            rows.append(("Prometheus's own scrape_duration_seconds (OpenMetrics, "
                         "gzip, every 1 s)", durations, 0))
        app = MetricsApp(server.registry)
        for label, accept in (("text 0.0.4", None), ("OpenMetrics 1.0", OPENMETRICS)):
            cpu = []
            for _ in range(args.scrapes):
                c0 = time.process_time()
                body, _ = app.render(accept)
                cpu.append((time.process_time() - c0) * 1000)
            rows.append((f"monitor CPU per scrape, {label}", cpu, len(body)))
        text = app.render(None)[0].decode()
        reference = []
        for _ in range(args.scrapes):
            c0 = time.process_time()
            slow = generate_latest(server.registry)
            reference.append((time.process_time() - c0) * 1000)
        rows.append(("monitor CPU per scrape, text 0.0.4 by prometheus_client's "
                     "generate_latest (for comparison)", reference, len(slow)))
        assert slow == app.render(None)[0], "the writers disagree"
        families = []
        for _ in range(args.scrapes):
            c0 = time.process_time()
            list(server.registry.collect())
            families.append((time.process_time() - c0) * 1000)
        rows.append(("of which the collector (families from the view)", families, 0))
        load = max(load, os.getloadavg()[0])
        series = check_equal(view, scrape(server.url, None)[1])
        check_equal(view, text)
    finally:
        server.close()
    print(f"Python {platform.python_version()}, {os.cpu_count()} CPUs, load average up to "
          f"{load:.1f}, {series} series, {args.scrapes} scrapes each (view built in "
          f"{build_s:.1f} s)\n")
    print("| what | median ms | p99 ms | goal ms | p99 / goal | bytes |")
    print("|---|---|---|---|---|---|")
    for name, times, size in rows:
        print(f"| {name} | {statistics.median(times):.2f} | {_p99(times):.2f} | {GOAL_MS:g} "
              f"| {_p99(times) / GOAL_MS:.2f} | {size:,} |")
    print(f"\nvalues equal the dashboard's 10-s snapshot: yes ({series} series × 4 quantiles, "
          "count and sum, exact)")


if __name__ == "__main__":
    main()
