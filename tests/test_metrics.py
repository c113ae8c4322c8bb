"""The Prometheus/OpenMetrics endpoint: the collector on a real engine, then a real
Prometheus server (Debian's ``prometheus``) scraping ``prism watch`` on the simulator.

The collector test replays ``tests/data/sim_spans.jsonl.gz`` (spans recorded through
real uprobes, see tests/test_engine_core.py) into an engine with a fixed clock.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from prism_tui.cli.common import UsageError
from prism_tui.cli.watch import serve_session_metrics
from prism_tui.dashboard_view import DashboardView
from prism_tui.engine.core import AlertEvent, DetectionConfig, Engine
from prism_tui.engine.recording import ReplayClock, load_spans, replay
from prism_tui.engine.sketches import ITERATION, SeriesKey, WindowedSketches
from prism_tui.metrics import EngineCollector, serve_metrics
from prism_tui.settings import MetricsSettings, SettingsError, load_settings
from tests.sim_scenarios import scenario_file, sim_server

ROOT = Path(__file__).resolve().parent.parent
RECORDING = ROOT / "tests" / "data" / "sim_spans.jsonl.gz"
PROMETHEUS = shutil.which("prometheus")


class _Alerts:
    def __init__(self) -> None:
        self.alerts: list[AlertEvent] = []

    def emit(self, alert: AlertEvent) -> None:
        self.alerts.append(alert)


def _replayed() -> tuple[Engine, _Alerts]:
    procs, spans = load_spans(str(RECORDING))
    clock = ReplayClock(spans[0].start_ns)
    sink = _Alerts()
    engine = Engine(DetectionConfig(rule="prism", warmup=150), sinks=[sink], clock=clock,
                    wall_clock=lambda: 1_790_000_000.0, host="replay")
    replay(engine, clock, procs, spans)
    return engine, sink


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def test_the_collector_shows_the_dashboards_numbers_from_a_replayed_engine() -> None:
    engine, sink = _replayed()
    engine.count_governor_decision(engine.pids[0], "detach")  # the governor's hook
    view = DashboardView.of(engine.view())  # as a session without a broker
    collector = EngineCollector(lambda: view)
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    samples = _samples(generate_latest(registry).decode())

    snap = view.snapshot(10.0)
    assert snap is not None and len(snap.series) > 10
    quantiles = {(d["stage"], d["device"], d["phase"], d["quantile"]): v
                 for d, v in samples["latencyprism_stage_latency_seconds"]}
    for key, row in snap.series.items():  # every quantile is the dashboard's, in seconds
        for q, ms in (("0.5", row.p50), ("0.9", row.p90), ("0.99", row.p99),
                      ("0.999", row.p999)):
            assert quantiles[(key.stage, key.device, key.phase, q)] == ms / 1000
    # cumulative count and sum: every closed window of the series (none trimmed in 14 s)
    counts = {(d["stage"], d["device"], d["phase"]): v
              for d, v in samples["latencyprism_stage_latency_seconds_count"]}
    sums = {(d["stage"], d["device"], d["phase"]): v
            for d, v in samples["latencyprism_stage_latency_seconds_sum"]}
    for key in engine.sketches.keys():  # noqa: SIM118 (a WindowedSketches, not a dict)
        windows = engine.sketches.windows(key)
        assert counts[(key.stage, key.device, key.phase)] == sum(w.count for w in windows)
        assert sums[(key.stage, key.device, key.phase)] == pytest.approx(
            sum(w.sum for w in windows) / 1000, rel=1e-12)
    # each series names the target on its device
    by_device = {t.device: t for t in view.targets}
    for d, _ in samples["latencyprism_stage_latency_seconds_count"]:
        t = by_device[d["device"]]
        assert (d["target"], d["pid"]) == (t.name, str(t.pid))
    # iterations per target and phase: what the engine counted, closed windows or not
    iterations = {(d["pid"], d["phase"]): v for d, v in samples["latencyprism_iterations_total"]}
    assert sum(iterations.values()) == engine.iterations_seen
    for t in view.targets:
        decode = iterations[(str(t.pid), "decode")]
        closed = counts[(ITERATION, t.device, "decode")]
        assert closed <= decode <= closed + 100  # the last open windows are not closed yet
    # alerts by status and severity: each one the sinks got
    got = Counter((a.target["pid"], a.status, a.severity) for a in sink.alerts)
    assert got, "the recording's fault fires"
    exposed = {(int(d["pid"]), d["status"], d["severity"]): v
               for d, v in samples["latencyprism_alerts_total"]}
    assert exposed == dict(got)
    governor = samples["latencyprism_governor_decisions_total"]
    assert [(d["pid"], d["action"], v) for d, v in governor] == [
        (str(engine.pids[0]), "detach", 1.0)]


def test_summary_totals_survive_trimmed_windows() -> None:
    now = [0]
    sketches = WindowedSketches(retain_s=2.0, clock=lambda: now[0])
    key = SeriesKey(ITERATION, "cpu", "decode")
    for second in range(10):
        for i in range(5):
            sketches.add(key, second * 1_000_000_000 + i, 2.0)
    now[0] = 11_000_000_000
    sketches.tick()
    assert len(sketches.windows(key)) <= 2  # older windows trimmed ...
    assert sketches.totals()[key].count == 50  # ... but a counter never goes down
    assert sketches.totals()[key].sum_ms == 100.0


def test_metrics_settings_are_checked_and_a_taken_port_is_a_usage_error() -> None:
    with pytest.raises(SettingsError, match="PRISM_METRICS_PORT: must be a TCP port"):
        load_settings(None, env={"PRISM_METRICS_PORT": "70000", "HOME": "/nonexistent"})
    settings = load_settings(None, env={"PRISM_METRICS_PORT": "0", "HOME": "/nonexistent"})
    assert settings.metrics == MetricsSettings(port=0, addr="127.0.0.1")

    class Session:
        latest_view: DashboardView | None = None

    first = serve_metrics(lambda: None, 0)
    try:
        with pytest.raises(UsageError, match=r"cannot serve metrics on 127\.0\.0\.1"):
            serve_session_metrics(Session(), MetricsSettings(port=first.port))
    finally:
        first.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


DASHBOARD = ROOT / "docs" / "grafana" / "latencyprism.json"
GRAFANA_VARS = {"$instance": ".*", "$target": ".*", "$phase": "decode",
                "$__rate_interval": "1m", "$__range": "1m"}


def _dashboard_queries() -> dict[str, str]:
    """Each panel's PromQL from the example Grafana dashboard, variables filled in."""
    out = {}
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            out[f"{panel['title']} {target['refId']}"] = expr
    return out


def _query(api: str, promql: str) -> list[dict[str, Any]]:
    url = f"{api}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(url, timeout=5) as reply:
        doc = json.loads(reply.read())
    assert doc["status"] == "success", doc
    result: list[dict[str, Any]] = doc["data"]["result"]
    return result


@pytest.mark.slow
def test_a_real_prometheus_scrapes_prism_watch_and_sees_the_dashboards_values(
        tmp_path: Path) -> None:
    """Prometheus scrapes ``prism watch --metrics-port`` on the simulator every second;
    its stored p99 and iteration counts must be values the headless view printed.

    The watch is stopped (SIGINT) once the dashboard's queries ran, or by its 14 s
    ``--duration`` if that comes first."""
    if PROMETHEUS is None:
        pytest.fail("prometheus is not installed (make system-deps, or apt-get install "
                    "prometheus)")
    metrics_port, web_port = _free_port(), _free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n"
        "scrape_configs:\n  - job_name: prism\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n")
    api = f"http://127.0.0.1:{web_port}"
    prom = subprocess.Popen(
        [str(PROMETHEUS), f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{web_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    scraped: dict[str, list[dict[str, Any]]] = {}
    panels: dict[str, list[dict[str, Any]]] = {}
    first_seen = 0.0
    try:
        with sim_server(scenario_file(tmp_path, 40, seed=4, name="metrics")) as server:
            stop_sim = threading.Event()
            runner = threading.Thread(target=server.run, args=(40, stop_sim), daemon=True)
            runner.start()
            # its output goes to files: a pipe nobody reads fills up with snapshots and
            # blocks the watch, which then ran out this loop's 40 s instead of its 14 s
            out_path, err_path = tmp_path / "watch.out", tmp_path / "watch.err"
            with out_path.open("w") as out_file, err_path.open("w") as err_file:
                watch = subprocess.Popen(
                    [sys.executable, "-m", "prism_tui.cli", "watch", "--pid",
                     str(server.rank_pids[0]), "--headless", "--duration", "14",
                     "--no-history", "--metrics-port", str(metrics_port)],
                    stdout=out_file, stderr=err_file, text=True, cwd=ROOT,
                    env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                         "PYTHONPATH": str(ROOT), "XDG_STATE_HOME": str(tmp_path / "state")})
            try:
                deadline = time.monotonic() + 40
                while watch.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.5)
                    try:
                        p99 = _query(api, 'latencyprism_stage_latency_seconds{stage="iteration",'
                                     'phase="decode",quantile="0.99"}')
                        its = _query(api, 'latencyprism_iterations_total{phase="decode"}')
                        count = _query(api, 'latencyprism_stage_latency_seconds_count'
                                       '{stage="iteration",phase="decode"}')
                    except OSError:
                        continue  # Prometheus is still starting
                    if p99 and its and count:
                        scraped = {"p99": p99, "its": its, "count": count}
                        first_seen = first_seen or time.monotonic()
                    if scraped and not panels and time.monotonic() - first_seen > 4:
                        panels = {title: _query(api, expr)  # a rate needs two scrapes
                                  for title, expr in _dashboard_queries().items()}
                        # all that is checked is in hand: stop the watch as Ctrl-C does
                        # (its --duration bounds the run if Prometheus is slow to come)
                        watch.send_signal(signal.SIGINT)
                watch.wait(timeout=60)
                out, err = out_path.read_text(), err_path.read_text()
            finally:
                if watch.poll() is None:
                    watch.kill()
                stop_sim.set()
                runner.join(10)
    finally:
        prom.terminate()
        prom.wait(10)
    assert watch.returncode == 0, err
    assert f"metrics on http://127.0.0.1:{metrics_port}/metrics" in err
    assert scraped, "Prometheus never returned the series"
    (stored_p99,), (stored_its,), (stored_count,) = (scraped["p99"], scraped["its"],
                                                      scraped["count"])
    labels = stored_p99["metric"]
    assert labels["job"] == "prism" and labels["pid"] == str(server.rank_pids[0])
    assert labels["target"] and labels["device"]
    # the value Prometheus stored is one the dashboard's view showed (exactly, in seconds)
    shown = set()
    for line in out.splitlines():
        doc = json.loads(line)
        for row in doc.get("snapshot", {}).get("series", []):
            if row["stage"] == ITERATION and row["phase"] == "decode":
                shown.add(row["p99_ms"] / 1000)
    assert float(stored_p99["value"][1]) in shown
    assert float(stored_its["value"][1]) >= float(stored_count["value"][1]) > 0
    # every panel of the example Grafana dashboard is valid PromQL over these series, and
    # all but the alert panel (no alert in these <= 14 s of a healthy run) show data
    assert panels, "the dashboard's queries never ran"
    empty = [title for title, result in panels.items() if not result]
    assert empty == ["Alerts fired A"], empty
