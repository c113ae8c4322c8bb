"""A live session end to end: simulator → uprobes → engine → MQTT (real Mosquitto) + SQLite.

Also the dashboard's control path: attach, detach and export called from another thread
while the monitor's loop runs, as the process picker does.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from alerting.broker import EmbeddedBroker
from alerting.config import BrokerConfig
from prism_sim.server import SimServer
from prism_tui.dashboard_view import DashboardView
from prism_tui.engine.core import DetectionConfig, SloSpec
from prism_tui.engine.monitor import Monitor, MonitorConfig
from prism_tui.history.store import HistoryStore
from prism_tui.live import LiveSession
from probes.catalog import load_profile
from probes.target import Target
from tests.mqtt_fixtures import Subscriber, broker  # noqa: F401  (the fixture)
from tests.sim_scenarios import scenario_file, sim_server

ROOT = Path(__file__).resolve().parent.parent


def _server(tmp_path: Path, duration: float) -> SimServer:
    return sim_server(scenario_file(tmp_path, duration, seed=4, name="live"))


def _watch_during_sim(tmp_path: Path, sim_s: float, *args: str) -> subprocess.CompletedProcess[str]:
    """``prism watch --pid <rank 0> ARGS`` while the simulator runs; state under tmp_path."""
    with _server(tmp_path, sim_s) as server:
        stop_sim = threading.Event()
        runner = threading.Thread(target=server.run, args=(sim_s, stop_sim), daemon=True)
        runner.start()
        try:
            return subprocess.run(
                [sys.executable, "-m", "prism_tui.cli", "watch", "--pid",
                 str(server.rank_pids[0]), *args],
                capture_output=True, text=True, timeout=90, cwd=ROOT,
                env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                     "XDG_STATE_HOME": str(tmp_path / "state")})
        finally:
            stop_sim.set()
            runner.join(10)


@pytest.mark.anyio
async def test_alerts_reach_a_subscriber_and_history_while_the_picker_attaches(
        broker: EmbeddedBroker, tmp_path: Path) -> None:  # noqa: F811
    db = tmp_path / "history.sqlite"
    with _server(tmp_path, 40) as server:
        stop_sim = threading.Event()
        runner = threading.Thread(target=server.run, args=(40, stop_sim), daemon=True)
        runner.start()
        first, second = server.rank_pids[0], server.rank_pids[1]
        # an SLO no decode iteration meets: it fires within a second, deterministically
        session = LiveSession(
            lambda subscribers: Monitor(
                [Target(first)], load_profile("cuda"), extra_profiles=[load_profile("nccl")],
                detection=DetectionConfig(
                    rule="prism", warmup=100,
                    slos=[SloSpec("decode p99 <= 1ms over 1s", name="impossible")]),
                config=MonitorConfig(telemetry=False, snapshot_interval_s=0.2),
                subscribers=subscribers),
            broker=BrokerConfig(url=broker.url), outbox_path=str(tmp_path / "outbox.sqlite"),
            history_db=str(db))
        monitor = session.monitor
        views: list[DashboardView] = []
        control: dict[str, Any] = {}

        def picker() -> None:  # the dashboard calls the control from a worker thread
            time.sleep(2.0)
            control["candidates"] = monitor.candidates()
            control["attach"] = monitor.attach(second)
            time.sleep(2.5)
            control["export"] = monitor.export_trace(2.0, str(tmp_path / "trace.json"))
            monitor.detach(second)
            control["detached_at"] = len(views)

        thread = threading.Thread(target=picker, daemon=True)
        try:
            async with Subscriber(broker.url, "latencyprism/v1/+/+/alert") as sub:
                thread.start()
                await session.run(views.append, None, 8.0)
                messages = await sub.wait_for(1)
        finally:
            session.close()
            stop_sim.set()
            runner.join(10)
    thread.join(5)

    # the picker: ranks offered, attach worked from a thread, spans flowed, detach took
    offered = {c.pid: c.watched for c in control["candidates"]}
    assert offered.get(first) is True and offered.get(second) is False
    assert control["attach"] is None
    trace = json.loads(Path(control["export"]).read_text())
    assert {e["pid"] for e in trace["traceEvents"] if e.get("ph") == "X"} == {first, second}
    before_detach = views[:control["detached_at"]]
    assert any({t.pid for t in v.targets} == {first, second} for v in before_detach)
    assert {t.pid for t in views[-1].targets} == {first}

    # the alert went out through the broker and was acknowledged
    docs = [json.loads(bytes(m.payload)) for m in messages]  # type: ignore[arg-type]
    assert docs and docs[0]["source"] == "slo" and docs[0]["status"] == "firing"
    assert docs[0]["target"]["pid"] == first
    sent = [a for a in views[-1].alerts if a.delivery == "sent"]
    assert sent and views[-1].delivery is not None and views[-1].delivery.state
    # and history kept windows and the alert
    async with HistoryStore(str(db), create=False) as store:
        counts = await store.counts()
        alerts = await store.alerts()
    assert counts["windows"] > 0 and counts["iterations"] > 0
    assert any(a["alert"].get("source") == "slo" for a in alerts), alerts


def test_prism_watch_headless_publishes_and_keeps_history(
        broker: EmbeddedBroker, tmp_path: Path) -> None:  # noqa: F811
    db = tmp_path / "watch.sqlite"
    result = _watch_during_sim(tmp_path, 30, "--headless", "--duration", "5", "--broker",
                               broker.url, "--db", str(db), "--slo",
                               "decode p99 <= 1ms over 1s")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert any("snapshot" in x for x in lines)
    assert any("alert" in x and x["alert"]["source"] == "slo" for x in lines), lines[-3:]
    assert (tmp_path / "state" / "latencyprism" / "outbox.sqlite").exists()
    history = subprocess.run(
        [sys.executable, "-m", "prism_tui.cli", "history", "--db", str(db), "--json"],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert history.returncode == 0, history.stderr
    doc = json.loads(history.stdout)
    assert doc["alerts"] and doc["series"], doc.keys()


def test_watch_with_a_broker_that_is_down_keeps_alerts_in_the_outbox(tmp_path: Path) -> None:
    with EmbeddedBroker(prefer="mosquitto") as down:
        url = down.url
    result = _watch_during_sim(tmp_path, 20, "--json", "--duration", "4", "--no-history",
                               "--broker", url, "--slo", "decode p99 <= 1ms over 1s")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    doc = json.loads(result.stdout)
    assert doc["alerts"]
    outbox = tmp_path / "state" / "latencyprism" / "outbox.sqlite"
    with sqlite3.connect(outbox) as conn:
        kept = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    # nothing lost: every alert the run emitted waits in the outbox for the broker
    assert kept == len(doc["alerts"]), (kept, len(doc["alerts"]))


def test_prism_gateway_is_a_subcommand_of_prism(tmp_path: Path) -> None:
    state = tmp_path / "gateway.sqlite"
    ok = subprocess.run([sys.executable, "-m", "prism_tui.cli", "gateway", "silence", "add",
                         "--state", str(state), "--match", "host=gpu-node-9",
                         "--duration", "1h"], capture_output=True, text=True, timeout=60,
                        cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    listed = subprocess.run([sys.executable, "-m", "prism_tui.cli", "gateway", "silence",
                             "list", "--state", str(state)], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert listed.returncode == 0 and "gpu-node-9" in listed.stdout, listed
    bad = tmp_path / "gateway.toml"
    bad.write_text("[broker\nurl = 1\n")
    broken = subprocess.run([sys.executable, "-m", "prism_tui.cli", "gateway", "--config",
                             str(bad)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 1 and "gateway.toml:1" in broken.stderr
