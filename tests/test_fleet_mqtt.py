"""The fleet's MQTT scale-out, with real Mosquitto processes bridged on loopback.

An edge broker runs the bridge that ``prism broker-config`` generates and forwards to a
core broker; paging gateways (real ``python -m alerting.gateway`` children) share one MQTT
5 subscription on the core. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from alerting.bridge import EdgeBroker, bridge_section, edge_config
from alerting.broker import EmbeddedBroker, free_port
from alerting.config import parse_broker_url
from tests.mqtt_fixtures import sample_alert

pytestmark = pytest.mark.skipif(
    not (os.path.exists("/usr/sbin/mosquitto") or os.path.exists("/usr/bin/mosquitto")),
    reason="mosquitto is not installed (make system-deps installs it)")


def _client(url: str, client_id: str, **kwargs: object) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         **kwargs)  # type: ignore[arg-type]
    return client


def _connect(client: paho.Client, url: str) -> None:
    _, host, port = parse_broker_url(url)
    client.connect(host, port, keepalive=2)
    client.loop_start()


class Inbox:
    """A subscriber on a broker that keeps every (topic, payload, retained) it gets."""

    def __init__(self, url: str, topic: str) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.client = _client(url, f"inbox-{os.getpid()}-{time.monotonic_ns()}")
        self.client.on_message = lambda _c, _u, m: self.messages.append(
            (m.topic, bytes(m.payload), bool(m.retain)))
        self.client.on_connect = lambda c, _u, _f, _rc, _p: c.subscribe(topic, qos=1)
        _connect(self.client, url)

    def wait_for(self, predicate: object, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():  # type: ignore[operator]
            if time.monotonic() > deadline:
                pytest.fail(f"not seen in {timeout} s; got {self.messages[-5:]}")
            time.sleep(0.02)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _bridge_up(core: EmbeddedBroker, edge_name: str, timeout: float = 20.0) -> None:
    """Wait until the edge's bridge is connected (its notification topic says 1)."""
    inbox = Inbox(core.url, f"$SYS/broker/connection/latencyprism-edge-{edge_name}/state")
    try:
        inbox.wait_for(lambda: any(p == b"1" for _, p, _ in inbox.messages), timeout)
    finally:
        inbox.close()


def test_generated_edge_config_runs_in_mosquitto_and_bridges_to_the_first_live_core(
        tmp_path: Path) -> None:
    """The whole file ``prism broker-config`` prints starts a real Mosquitto whose bridge
    skips a dead core and forwards an alert to the live one."""
    with EmbeddedBroker() as core:
        dead = f"mqtt://127.0.0.1:{free_port()}"
        port = free_port()
        conf = tmp_path / "edge.conf"
        conf.write_text(edge_config(EdgeBroker(
            name="rack9", cores=(dead, core.url), listen=f"127.0.0.1:{port}",
            persistence_dir=str(tmp_path))) + ("user root\n" if os.geteuid() == 0 else ""))
        inbox = Inbox(core.url, "latencyprism/v1/#")
        edge = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            _bridge_up(core, "rack9", timeout=30)
            pub = _client(f"mqtt://127.0.0.1:{port}", "monitor-rack9")
            _connect(pub, f"mqtt://127.0.0.1:{port}")
            pub.publish("latencyprism/v1/h9/7/alert", sample_alert("fp-9").to_json(), qos=1)
            inbox.wait_for(lambda: any(t == "latencyprism/v1/h9/7/alert"
                                       for t, _, _ in inbox.messages))
            pub.loop_stop()
            pub.disconnect()
        finally:
            inbox.close()
            edge.terminate()
            edge.wait(10)
            assert edge.stderr is not None
            edge.stderr.close()


def test_status_and_last_will_cross_the_bridge() -> None:
    """A monitor's retained ``online`` status and, when it dies without a goodbye, its
    ``offline`` last will reach a subscriber on the core through the edge."""
    with EmbeddedBroker() as core, EmbeddedBroker(extra_config=bridge_section(
            EdgeBroker(name="rack1", cores=(core.url,)))) as edge:
        _bridge_up(core, "rack1")
        inbox = Inbox(core.url, "latencyprism/v1/+/status")
        code = (
            "import paho.mqtt.client as p, sys, time\n"
            "c = p.Client(p.CallbackAPIVersion.VERSION2, client_id='mon-h1')\n"
            "c.will_set('latencyprism/v1/h1/status', b'{\"state\": \"offline\"}', 1, True)\n"
            f"c.connect('127.0.0.1', {edge.port}, keepalive=2)\n"
            "c.loop_start()\n"
            "c.publish('latencyprism/v1/h1/status', b'{\"state\": \"online\"}', 1, True)"
            ".wait_for_publish()\n"
            "print('up', flush=True)\n"
            "time.sleep(60)\n")
        monitor = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        try:
            assert monitor.stdout is not None
            assert monitor.stdout.readline().strip() == b"up"
            inbox.wait_for(lambda: any(b"online" in p for _, p, _ in inbox.messages))
            monitor.send_signal(signal.SIGKILL)  # no DISCONNECT: the will is published
            monitor.wait(10)
            # keepalive 2 s: the edge notices within 1.5 x keepalive and publishes the will
            inbox.wait_for(lambda: any(b"offline" in p for _, p, _ in inbox.messages),
                           timeout=15)
        finally:
            if monitor.poll() is None:
                monitor.kill()
                monitor.wait()
            if monitor.stdout is not None:
                monitor.stdout.close()
            inbox.close()
        late = Inbox(core.url, "latencyprism/v1/+/status")  # retained: a new screen sees it
        try:
            late.wait_for(lambda: any(b"offline" in p and r for _, p, r in late.messages))
        finally:
            late.close()


def _gateway_config(path: Path, core: str, client_id: str, out: Path) -> Path:
    path.write_text(f"""
[broker]
url = "{core}"
client_id = "{client_id}"
shared_group = "pagers"
keepalive = "2s"

[route]
receiver = "file"
group_by = ["..."]
group_wait = "0s"
group_interval = "100ms"

[[receiver]]
name = "file"
[[receiver.sink]]
type = "file"
path = "{out}"
""")
    return path


class Gateway:
    """One ``python -m alerting.gateway`` child with its own config, state and output."""

    def __init__(self, tmp: Path, name: str, core: str) -> None:
        self.out = tmp / f"{name}.jsonl"
        self.args = ["--config", str(_gateway_config(tmp / f"{name}.toml", core, name,
                                                      self.out)),
                     "--state", str(tmp / f"{name}.sqlite"), "--log-level", "info"]
        self.log = tmp / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "alerting.gateway", *self.args],
                                         stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 20
        while b"subscribed to" not in self.log.read_bytes()[offset:]:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def sent(self) -> list[str]:
        """The fingerprints of every firing alert this gateway sent, in order."""
        if not self.out.exists():
            return []
        return [a["fingerprint"] for line in self.out.read_text().splitlines() if line
                for a in json.loads(line)["alerts"] if a["status"] == "firing"]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[EmbeddedBroker, EmbeddedBroker, Gateway, Gateway]]:
    """A core broker, an edge bridged to it, and two gateways sharing a subscription."""
    with EmbeddedBroker() as core, EmbeddedBroker(extra_config=bridge_section(
            EdgeBroker(name="rack2", cores=(core.url,)))) as edge:
        gateways = (Gateway(tmp_path, "gw-a", core.url), Gateway(tmp_path, "gw-b", core.url))
        try:
            for gw in gateways:
                gw.start()
            _bridge_up(core, "rack2")
            yield core, edge, *gateways
        finally:
            for gw in gateways:
                gw.stop()


def test_two_gateways_split_the_stream_and_a_killed_one_loses_nothing(
        fleet: tuple[EmbeddedBroker, EmbeddedBroker, Gateway, Gateway]) -> None:
    """300 alerts published on the edge while gateway A is SIGKILLed a third of the way
    in and restarted a second later: every alert is sent, none by both gateways (the
    shared subscription hands each message to one), and A re-sends at most what it had
    in flight when it died (a pager dedups those by the alert's fingerprint).

    Each message is acknowledged to the broker only after the gateway's state file has
    it, so what A had received but not yet stored comes back to A when it reconnects.
    """
    _core, edge, gw_a, gw_b = fleet
    n = 300
    pub = _client(edge.url, f"storm-{os.getpid()}")
    _connect(pub, edge.url)
    try:
        for i in range(n):
            alert = sample_alert(f"fp-{i:03d}", host=f"h{i % 7}")
            pub.publish(f"latencyprism/v1/h{i % 7}/1/alert", alert.to_json(), qos=1)
            time.sleep(0.005)
            if i == n // 3:
                gw_a.kill()
            if i == n // 3 + 150:
                gw_a.start()
        deadline = time.monotonic() + 30
        want = {f"fp-{i:03d}" for i in range(n)}
        while set(gw_a.sent()) | set(gw_b.sent()) != want:
            assert time.monotonic() < deadline, sorted(want - set(gw_a.sent())
                                                       - set(gw_b.sent()))[:10]
            time.sleep(0.1)
    finally:
        pub.loop_stop()
        pub.disconnect()
    time.sleep(1.0)  # anything still on its way shows up as a re-send
    a, b = Counter(gw_a.sent()), Counter(gw_b.sent())
    print(f"gateway A sent {sum(a.values())} ({len(a)} alerts), B {sum(b.values())} "
          f"({len(b)}); re-sent by A after the kill: {sum(a.values()) - len(a)}")
    assert set(a) | set(b) == {f"fp-{i:03d}" for i in range(n)}  # nothing lost
    assert not set(a) & set(b)  # no alert went to both gateways
    assert a and b  # the shared group really split the stream
    assert all(v == 1 for v in b.values())  # B never died: B never repeats itself
    # A repeats at most the deliveries in flight at the kill (one per concurrent sink
    # call; a handful at most)
    assert sum(a.values()) - len(a) <= 5, a.most_common(5)


def test_shared_group_settings_are_checked_with_the_line_to_fix() -> None:
    """A group implies MQTT 5 and subscribes under ``$share``; a bad one is one line."""
    from alerting.gateway.config import parse_gateway_config
    from alerting.gateway.errors import GatewayConfigError

    base = '[route]\nreceiver = "out"\n[[receiver]]\nname = "out"\n[[receiver.sink]]\n' \
           'type = "stdout"\n'
    config = parse_gateway_config('[broker]\nshared_group = "pagers"\n' + base, "gw.toml")
    assert config.broker.protocol == "5"
    assert config.broker.subscription == "$share/pagers/latencyprism/v1/+/+/alert"
    assert parse_gateway_config(base).broker.subscription == "latencyprism/v1/+/+/alert"
    for bad, said in (('shared_group = "a/b"', "no '/'"),
                      ('protocol = "3.1.1"\nshared_group = "p"', 'needs protocol "5"'),
                      ('protocol = "4"', "unknown MQTT protocol")):
        with pytest.raises(GatewayConfigError, match=r"gw\.toml:") as err:
            parse_gateway_config(f"[broker]\n{bad}\n" + base, "gw.toml")
        assert said in str(err.value)


@pytest.mark.parametrize("args, said", [
    (["--edge", "rack 1", "--core", "mqtt://core:1883"], "edge name"),
    (["--edge", "r1", "--core", "ws://core"], "core broker"),
    (["--edge", "r1", "--core", "mqtt://core", "--listen", "nowhere"], "listen address"),
])
def test_broker_config_bad_input_is_one_line_and_exit_2(args: list[str], said: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "prism_tui.cli", "broker-config", *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and said in proc.stderr and not proc.stdout
