"""``prism fleet``'s dashboard, history and metrics, on real digests.

The FleetState is fed real messages (digests of real engines through DigestFeed, the
publisher's status and alert JSON; tests/fleet_payloads.py) on a fixed clock, so the
snapshot picture repeats; the headless test runs the CLI against a real Mosquitto.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from textual.pilot import Pilot

from alerting.broker import EmbeddedBroker
from alerting.config import BrokerConfig
from alerting.fleet import FleetState
from prism_tui.cli import main
from prism_tui.fleet_session import FleetSession, fleet_window
from prism_tui.fleet_view import FleetView, fleet_view, host_series
from prism_tui.history.store import HistoryStore
from prism_tui.metrics import serve_fleet_metrics
from prism_tui.ui.fleet import FleetApp, HostScreen, HostsTable, OutliersTable
from tests.fleet_payloads import ROOT, host_messages, small_fleet
from tests.mqtt_fixtures import broker  # noqa: F401  (the fixture)

REPO = Path(__file__).resolve().parent.parent
SnapCompare = Callable[..., bool]


class _Control:
    def __init__(self, state: FleetState) -> None:
        self.state = state

    def host_series(self, host: str) -> tuple:  # type: ignore[type-arg]
        return host_series(self.state.host_series(host))


def _fed(state: FleetState) -> tuple[FleetApp, FleetView]:
    view = fleet_view(state.snapshot(), "mqtt://core:1883")
    return FleetApp(control=_Control(state)), view


@pytest.mark.anyio
async def test_fleet_screen_lists_hosts_outliers_alerts_and_drills_into_a_host() -> None:
    state = small_fleet()
    app, view = _fed(state)
    async with app.run_test(size=(120, 36)) as pilot:
        app.show_view(view)
        await pilot.pause()
        hosts = app.query_one(HostsTable)
        assert [str(hosts.get_row_at(i)[0]) for i in range(hosts.row_count)] == [
            "gpu-a", "gpu-b", "gpu-c"]
        assert [str(hosts.get_row_at(i)[1]) for i in range(3)] == ["offline", "online",
                                                                   "online"]
        outliers = app.query_one(OutliersTable)
        assert str(outliers.get_row_at(0)[0]) == "gpu-c"  # 50 % slower: first
        assert view.alerts[0].host == "gpu-c" and view.online == 2
        await pilot.press("down", "down", "enter")  # the third host: gpu-c
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, HostScreen) and screen.host == "gpu-c"
        assert [(r.stage, r.count) for r in screen.rows] == [
            ("device_sync", 2000), ("iteration", 2000), ("scheduler", 2000)]
        table = screen.query_one("#host-series")
        assert table.row_count == 3  # type: ignore[attr-defined]
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, HostScreen)


def test_fleet_screen_snapshot(snap_compare: SnapCompare) -> None:
    state = small_fleet()
    app, view = _fed(state)

    async def run_before(pilot: Pilot[int]) -> None:
        app.show_view(view)
        await pilot.pause()

    assert snap_compare(app, terminal_size=(120, 30), run_before=run_before)


def test_fleet_history_is_prism_history_fleet(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    epoch = time.time() - 30  # `--since` is relative to now
    state = FleetState(ROOT, window_s=3600)
    for i, host in enumerate(("gpu-a", "gpu-b")):
        for topic, payload in host_messages(host, 10.0 + 5 * i, 5, epoch=epoch, seed=i):
            state.ingest(topic, payload)
    db = tmp_path / "state" / "fleet.sqlite"
    db.parent.mkdir(mode=0o700)

    async def write() -> int:
        async with HistoryStore(db, mono_clock=time.time_ns,
                                wall_clock=time.time_ns) as store:
            return await store.write_windows(fleet_window(w) for w in state.drain_windows())

    written = asyncio.run(write())
    assert written == 3 * 5  # 3 stages × 5 seconds, both hosts merged in each
    assert state.drain_windows() == []
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
    assert main(["history", "--fleet", "--db", str(db), "--since", "1h", "--json",
                 "--stage", "scheduler"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (series,) = doc["series"]
    assert (series["stage"], series["device"], series["phase"]) == (
        "scheduler", "cuda/cuda", "decode")
    assert series["total"]["count"] == 2 * 5 * 200
    fleet = {r["stage"]: r for r in state.snapshot()["fleet"]}
    assert abs(series["total"]["p99"] - fleet["scheduler"]["p99"]) / fleet[
        "scheduler"]["p99"] < 0.01


def test_fleet_metrics_serve_the_screens_quantiles() -> None:
    view = fleet_view(small_fleet().snapshot())
    server = serve_fleet_metrics(lambda: view, 0)
    try:
        with urllib.request.urlopen(server.url, timeout=10) as response:
            text = response.read().decode()
    finally:
        server.close()
    row = next(r for r in view.fleet if r.stage == "iteration")
    line = next(x for x in text.splitlines() if x.startswith(
        "latencyprism_fleet_stage_latency_seconds{") and 'stage="iteration"' in x
        and 'quantile="0.99"' in x)
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(row.p99 / 1000, rel=1e-9)
    assert 'latencyprism_fleet_host_online{host="gpu-a"} 0.0' in text
    assert 'latencyprism_fleet_host_alerts_firing{host="gpu-c"} 1.0' in text


@pytest.mark.anyio
async def test_prism_fleet_headless_through_mosquitto_writes_its_history(
        broker: EmbeddedBroker, tmp_path: Path) -> None:  # noqa: F811
    import aiomqtt

    db = tmp_path / "fleet" / "fleet.sqlite"
    (status, *digests) = host_messages("gpu-a", 10.0, 3, epoch=time.time() - 3)
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.publish(*status, qos=1, retain=True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "prism_tui.cli", "fleet", "--broker", broker.url,
        "--duration", "6", "--headless", "--db", str(db), "--interval", "0.5", cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None
    while True:  # the retained status shows it subscribed; the digests are not retained
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line, "prism fleet ended before it saw the retained status"
        if json.loads(line)["fleet"]["hosts"]:
            break
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        for topic, payload in digests:
            await client.publish(topic, payload, qos=1)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    last = json.loads(out.decode().splitlines()[-1])["fleet"]
    assert [h["host"] for h in last["hosts"]] == ["gpu-a"]
    assert sum(r["count"] for r in last["fleet"]) == 3 * 3 * 200
    assert stat.S_IMODE(os.stat(db.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
    async with HistoryStore(db, create=False) as store:
        rows = await store.quantiles(since_ns=0, until_ns=time.time_ns())
    assert sum(r.count for r in rows) == 3 * 3 * 200


def test_fleet_session_view_names_the_broker() -> None:
    session = FleetSession(BrokerConfig(url="mqtt://core:1883"), small_fleet(),
                           history_db=None)
    view = session.view()
    assert view.broker == "mqtt://core:1883" and len(view.hosts) == 3
    assert [r.stage for r in session.host_series("gpu-b")] == [
        "device_sync", "iteration", "scheduler"]


@pytest.mark.anyio
async def test_the_dashboard_follows_a_real_broker(broker: EmbeddedBroker) -> None:  # noqa: F811
    """What ``prism fleet`` runs without --headless: the session as the app's feed."""
    import aiomqtt

    session = FleetSession(BrokerConfig(url=broker.url), FleetState(ROOT, window_s=3600),
                           interval_s=0.2)

    async def feed(show: Callable[[FleetView], None], stop: asyncio.Event) -> None:
        await session.run(show, stop)

    app = FleetApp(feed=feed, control=session)
    (status, *digests) = host_messages("gpu-z", 10.0, 2, epoch=time.time() - 2)
    async with app.run_test(size=(120, 36)) as pilot:
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            await client.publish(*status, qos=1, retain=True)
            for _ in range(300):  # the retained status shows the session subscribed
                await pilot.pause(0.1)
                if app.shown is not None and app.shown.hosts:
                    break
            for topic, payload in digests:
                await client.publish(topic, payload, qos=1)
        for _ in range(300):
            await pilot.pause(0.1)
            if app.shown is not None and app.shown.fleet:
                break
        assert app.shown is not None and [h.host for h in app.shown.hosts] == ["gpu-z"]
        assert sum(r.count for r in app.shown.fleet) == 3 * 2 * 200
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, HostScreen) and len(app.screen.rows) == 3
        await pilot.press("escape", "q")
    assert app.return_code == 0


def test_fleet_headless_and_json_together_is_exit_2(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fleet", "--broker", "mqtt://127.0.0.1:1", "--headless", "--json"]) == 2
    assert capsys.readouterr().err.strip() == (
        "prism fleet: --headless and --json exclude each other")
