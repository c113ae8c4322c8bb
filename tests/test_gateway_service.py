"""The gateway against a real Mosquitto broker, a loopback HTTP server and a real state file."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from alerting.gateway.cli import main as gateway_main
from alerting.gateway.config import parse_broker_url, parse_gateway_config
from alerting.gateway.service import GatewayService
from alerting.gateway.state import GatewayState
from alerting.schema import Alert
from tests.test_gateway_pipeline import make_alert
from tests.test_gateway_sinks import Recorder, http  # noqa: F401

try:  # the shared real-Mosquitto fixture (tests/mqtt_fixtures.py)
    from tests.mqtt_fixtures import broker
except ImportError:  # pragma: no cover - only until that module lands
    @pytest.fixture
    def broker() -> Any:
        """Stand-in that skips, naming the missing shared fixture module."""
        pytest.skip("tests/mqtt_fixtures.py (the shared Mosquitto fixture) is missing")

TOPIC = "latencyprism/v1/gpu-node-1/vllm-4242/alert"


def gateway_config(broker_url: str, pd_url: str, client_id: str) -> str:
    """A config paging everything to the recording server, fast timings."""
    return f"""
[broker]
url = "{broker_url}"
client_id = "{client_id}"

[route]
receiver = "pager"
group_by = ["..."]
group_wait = "0s"
group_interval = "100ms"
repeat_interval = "1h"

[[receiver]]
name = "pager"
[[receiver.sink]]
type = "pagerduty"
routing_key = "R0UT1NG"
url = "{pd_url}/v2/enqueue"
"""


async def publish(url: str, *alerts: Alert) -> None:
    """Publish alerts with QoS 1, as the monitor does."""
    host, port, *_ = parse_broker_url(url)
    async with aiomqtt.Client(host, port) as client:
        for alert in alerts:
            topic = f"latencyprism/v1/{alert.host}/{alert.target_key}/alert"
            await client.publish(topic, alert.to_json(), qos=1)


async def until(predicate: Any, timeout: float = 15.0) -> None:
    """Wait for a condition of the running gateway (fails the test after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.02)


class Running:
    """A gateway service running in a task of the test's loop."""

    def __init__(self, text: str, state_path: Path) -> None:
        self.config = parse_gateway_config(text, "gw.toml")
        self.state = GatewayState(state_path)
        self.service = GatewayService(self.config, self.state, silence_refresh_s=0.05)
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.service.run(self.stop))

    async def close(self) -> None:
        """Stop the service, then close its state."""
        self.stop.set()
        await self.task
        self.service.close()
        self.state.close()


def events(recorder: Recorder) -> list[tuple[str, str]]:
    """(event_action, dedup_key) of every PagerDuty event received so far."""
    return [(r["json"]["event_action"], r["json"]["dedup_key"]) for r in recorder.requests]


@pytest.mark.anyio
async def test_routes_to_pagerduty_restart_does_not_repage_and_silences_apply(
        broker: Any, http: Recorder, tmp_path: Path) -> None:  # noqa: F811
    text = gateway_config(broker.url, http.url, f"gw-{os.getpid()}-{time.monotonic_ns()}")
    db = tmp_path / "state" / "gateway.sqlite"
    first = make_alert("fp-a", severity="critical")
    gw = Running(text, db)
    try:
        await asyncio.wait_for(gw.service.connected.wait(), 15)
        await publish(broker.url, first, make_alert("fp-b", severity="error", stage="host"))
        await until(lambda: len(http.requests) == 2)
        assert sorted(events(http)) == [("trigger", "fp-a"), ("trigger", "fp-b")]
        by_key = {r["json"]["dedup_key"]: r["json"] for r in http.requests}
        assert by_key["fp-a"]["payload"]["severity"] == "critical"
        assert by_key["fp-a"]["payload"]["source"] == "gpu-node-1"
        await until(lambda: len(gw.state.sent_log()) == 2)
    finally:
        await gw.close()
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600

    # restart with the same state: the publisher repeats fp-a; nobody is paged again
    gw = Running(text, db)
    try:
        await asyncio.wait_for(gw.service.connected.wait(), 15)
        await publish(broker.url, make_alert("fp-a", severity="critical"))
        await until(lambda: gw.service.stats["received"] == 1)
        assert gw.service.stats["duplicate"] == 1
        await asyncio.sleep(0.5)  # several group intervals
        assert len(http.requests) == 2
        # a silence added from the command line mutes a new alert of that host
        assert gateway_main(["--state", str(db), "silence", "add", "--match",
                             "host=gpu-node-9", "--duration", "1h"]) == 0
        await until(lambda: len(gw.service.pipeline.silences) == 1)
        await publish(broker.url, make_alert("fp-muted", host="gpu-node-9"),
                      make_alert("fp-c", severity="error", stage="memcpy"))
        await until(lambda: len(http.requests) == 3)
        assert events(http)[2] == ("trigger", "fp-c")
        # it did not forget fp-a fired: its resolution closes the incident
        await publish(broker.url, make_alert("fp-a", severity="critical", status="resolved",
                                             at=time.time()))
        await until(lambda: len(http.requests) == 4)
        assert events(http)[3] == ("resolve", "fp-a")
        await asyncio.sleep(0.3)
        assert len(http.requests) == 4 and gw.service.stats["silenced"] >= 1
    finally:
        await gw.close()
    with GatewayState(db) as state:
        sent = [(r["fingerprint"], r["status"]) for r in state.sent_log()]
    # fp-a and fp-b arrive in one publish burst: their order is the broker's
    assert sorted(sent[:2]) == [("fp-a", "firing"), ("fp-b", "firing")]
    assert sent[2:] == [("fp-c", "firing"), ("fp-a", "resolved")]


# ------------------------------------------------------------------ malformed payloads
class GatewayProcess:
    """``python -m alerting.gateway`` as a child process, its stderr collected."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "alerting.gateway", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 20.0) -> None:
        """Block until a stderr line contains ``text``."""
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"gateway never said {text!r}: {self.lines}")
            time.sleep(0.02)

    def stop(self) -> int:
        """SIGTERM, then wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.reader.join(5)
            if self.proc.stderr is not None:
                self.proc.stderr.close()


@pytest.fixture
def fuzz_rig(broker: Any, tmp_path: Path) -> Iterator[tuple[GatewayProcess, paho.Client, Path]]:
    """A gateway child writing notifications to a JSON-lines file, and a paho publisher."""
    out = tmp_path / "notifications.jsonl"
    config = tmp_path / "gw.toml"
    config.write_text(f"""
[route]
receiver = "file"
group_wait = "0s"
group_interval = "100ms"
[[receiver]]
name = "file"
[[receiver.sink]]
type = "file"
path = "{out}"
""")
    gw = GatewayProcess(["--broker", broker.url, "--config", str(config), "--state",
                         str(tmp_path / "gw.sqlite")])
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"fuzz-{os.getpid()}")
    host, port, *_ = parse_broker_url(broker.url)
    client.connect(host, port)
    client.loop_start()
    try:
        gw.wait_for("subscribed to")
        yield gw, client, out
    finally:
        client.loop_stop()
        client.disconnect()
        gw.stop()


def test_malformed_payloads_never_kill_it_and_are_counted_once_logged(
        fuzz_rig: tuple[GatewayProcess, paho.Client, Path]) -> None:
    gw, client, out = fuzz_rig
    published: list[bytes] = []

    def send(payload: bytes) -> None:
        client.publish(TOPIC, payload, qos=1).wait_for_publish(10)
        published.append(payload)

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner,
                                                                    max_size=4),
        max_leaves=12)
    valid = make_alert("fp-template").to_dict()

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=300))
    def fuzz_bytes(payload: bytes) -> None:
        send(payload)

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.dictionaries(st.sampled_from(sorted(valid)), json_values, max_size=8),
           st.booleans())
    def fuzz_dicts(doc: dict[str, Any], based: bool) -> None:
        # either a random object, or a valid alert with fields overwritten by junk
        body = {**valid, **doc, "id": "x"} if based and doc else doc
        try:
            Alert.from_dict(body)
            return  # junk that happens to be valid is not what this test is about
        except Exception:
            pass
        send(json.dumps(body).encode())

    fuzz_bytes()
    fuzz_dicts()
    send(b"{" + b" " * (300 * 1024) + b"}")  # over 256 KiB
    send(b"[1, 2")
    send(b'{"schema": 1, "id": "x"}')
    client.publish(TOPIC, make_alert("fp-alive").to_json(), qos=1).wait_for_publish(10)

    deadline = time.monotonic() + 30
    while not (out.exists() and "fp-alive" in out.read_text()):
        assert gw.proc.poll() is None, gw.lines
        assert time.monotonic() < deadline, gw.lines[-5:]
        time.sleep(0.05)
    assert gw.proc.poll() is None
    assert gw.stop() == 0
    [summary] = [line for line in gw.lines if "stopped:" in line]
    counts = json.loads(summary.split("stopped: ", 1)[1])
    invalid = {k: v for k, v in counts.items() if k.startswith("invalid.")}
    assert sum(invalid.values()) == len(published), (counts, len(published))
    assert invalid["invalid.size"] == 1 and invalid["invalid.json"] >= 2
    assert invalid["invalid.schema"] >= 2
    assert counts["received"] == len(published) + 1 and counts["accepted"] == 1
    for kind in ("json", "size", "schema"):
        logged = [line for line in gw.lines if f"({kind}: " in line]
        assert len(logged) == 1, (kind, logged)


# ------------------------------------------------------------------ the silence commands
def test_silence_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "gw.sqlite")
    assert gateway_main(["--state", db, "silence", "add", "--match", "host=gpu-node-7",
                         "--match", "stage=~memcpy.*", "--duration", "2h", "--comment",
                         "PCIe card swap", "--author", "alice"]) == 0
    sid = capsys.readouterr().out.strip()
    assert len(sid) == 12
    assert gateway_main(["silence", "list", "--json", "--state", db]) == 0
    [doc] = json.loads(capsys.readouterr().out)["silences"]
    assert doc["id"] == sid and doc["state"] == "active" and doc["created_by"] == "alice"
    assert doc["matchers"] == ["host=gpu-node-7", "stage=~memcpy.*"]
    assert doc["comment"] == "PCIe card swap"
    assert gateway_main(["silence", "list", "--state", db]) == 0
    assert sid in capsys.readouterr().out
    assert gateway_main(["silence", "expire", sid[:6], "--state", db]) == 0
    assert capsys.readouterr().out.strip() == f"expired {sid}"
    assert gateway_main(["silence", "list", "--json", "--state", db]) == 0
    assert json.loads(capsys.readouterr().out)["silences"] == []
    assert gateway_main(["silence", "list", "--all", "--json", "--state", db]) == 0
    assert json.loads(capsys.readouterr().out)["silences"][0]["state"] == "expired"

    for argv, message in [
        (["silence", "expire", "nope"], "no silence with id 'nope'"),
        (["silence", "add", "--match", "colour=red", "--duration", "1h"],
         "unknown alert field 'colour'"),
        (["silence", "add", "--match", "host=a", "--duration", "soon"], "--duration: bad"),
    ]:
        assert gateway_main([*argv, "--state", db]) == 2
        err = capsys.readouterr().err
        assert err.startswith("prism gateway: ") and message in err and err.count("\n") == 1


def test_corrupt_state_file_is_one_clear_line(tmp_path: Path) -> None:
    db = tmp_path / "gw.sqlite"
    db.write_bytes(b"this is not a database, it is a shopping list\n" * 200)
    proc = subprocess.run([sys.executable, "-m", "alerting.gateway", "--state", str(db),
                           "silence", "list"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert str(db) in proc.stderr and "not a usable gateway state database" in proc.stderr
    bad_config = tmp_path / "gw.toml"
    bad_config.write_text("[route]\nreceiver = 'x'\ngroup_wait = \n")
    proc = subprocess.run([sys.executable, "-m", "alerting.gateway", "--config",
                           str(bad_config)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"prism gateway: {bad_config}:3: invalid TOML")
