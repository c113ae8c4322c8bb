"""The embedded broker: real Mosquitto child process, and the in-process amqtt fallback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from alerting.broker import (
    AMQTT_NOTICE,
    BrokerStartError,
    EmbeddedBroker,
    find_mosquitto,
    free_port,
)
from alerting.config import ALERT_SUBSCRIPTION, BrokerConfig
from alerting.publisher import AlertPublisher
from tests.mqtt_fixtures import Subscriber, client_for, collect, sample_alert
from tests.test_publisher import alerts_of, until

ROOT = Path(__file__).resolve().parent.parent


def alive(pid: int) -> bool:
    """True while a process with this pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_find_mosquitto_finds_the_installed_binary() -> None:
    """The test machine has Mosquitto (PATH or /usr/sbin)."""
    path = find_mosquitto()
    assert path is not None and os.access(path, os.X_OK)


@pytest.mark.anyio
async def test_mosquitto_stop_start_on_the_same_port_and_clean_close() -> None:
    """Start, round trip, stop (refuses), start again on the same port, close reaps."""
    with EmbeddedBroker() as b:
        assert b.kind == "mosquitto" and b.notice == "" and b.running
        assert b.url == f"mqtt://127.0.0.1:{b.port}"
        pid = b.pid
        assert pid is not None and alive(pid)
        async with client_for(b.url) as client:
            await client.publish("t/retained", b"one", qos=1, retain=True)
        b.stop()
        assert not b.running and not alive(pid)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", b.port), timeout=1).close()
        port = b.port
        assert b.start() is b
        assert b.port == port and b.pid != pid
        got = await collect(b.url, "t/#", 1, timeout=5)  # persistence kept the retained msg
        assert [bytes(m.payload) for m in got] == [b"one"]  # type: ignore[arg-type]
        second = b.pid
        assert second is not None
    assert not alive(second) and not b.running
    b.close()  # idempotent
    with pytest.raises(BrokerStartError, match="closed"):
        b.start()


def test_free_port_is_outside_the_ephemeral_range() -> None:
    """No outgoing connection (not even a reconnect to the stopped broker, a TCP
    self-connect) can take the port while the broker is down for a restart."""
    lo = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(20):
        port = free_port()
        assert port < lo
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # and it is free


def test_port_in_use_is_one_clear_error() -> None:
    """A fixed port someone else holds: BrokerStartError naming the port, no traceback spam."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(BrokerStartError) as info:
            EmbeddedBroker(port=port)
    assert f"port {port}" in str(info.value) and "\n" not in str(info.value)


CHILD = """
import os, sys, time
from alerting.broker import EmbeddedBroker
b = EmbeddedBroker()
print(b.pid, b._dir, flush=True)
if sys.argv[1] == "raise":
    with b:
        raise SystemExit(3)
os.kill(os.getpid(), 9)
"""


@pytest.mark.parametrize("how", ["raise", "sigkill"])
def test_no_mosquitto_left_when_the_owner_exits(tmp_path: Path, how: str) -> None:
    """Exit through an exception, or be SIGKILLed: the Mosquitto child goes too."""
    script = tmp_path / "owner.py"
    script.write_text(CHILD)
    done = subprocess.run([sys.executable, str(script), how], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, check=False)
    pid_text, folder = done.stdout.split()[:2]
    pid = int(pid_text)
    import time

    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(pid), f"mosquitto {pid} outlived its owner ({how})"
    if how == "raise":
        assert not Path(folder).exists()  # close() removed the generated config
    else:
        shutil.rmtree(folder)  # nothing runs in a SIGKILLed owner


def test_generated_config_options() -> None:
    """TLS, password file and anonymous settings end up in mosquitto.conf."""
    b = EmbeddedBroker(start=False, port=1, password_file="/p", certfile="/c", keyfile="/k",
                       cafile="/ca", require_certificate=True)
    try:
        text = b.config_text()
        for line in ("listener 1 127.0.0.1", "allow_anonymous false", "password_file /p",
                     "certfile /c", "keyfile /k", "cafile /ca", "require_certificate true"):
            assert line in text.splitlines()
        assert b.url == "mqtts://127.0.0.1:1"
    finally:
        b.close()
    with pytest.raises(BrokerStartError, match="together"):
        EmbeddedBroker(start=False, certfile="/c")


@pytest.mark.anyio
async def test_amqtt_fallback_round_trip_with_notice() -> None:
    """Forced amqtt: the notice names its limits; the publisher falls back to MQTT 3.1.1."""
    with EmbeddedBroker(prefer="amqtt") as b:
        assert b.kind == "amqtt" and b.notice == AMQTT_NOTICE
        assert "3.1.1" in b.notice and "no v5" in b.notice
        assert b.pid is None and b.running
        alert = sample_alert("fp-amqtt")
        async with Subscriber(b.url, "latencyprism/v1/#") as sub:
            async with AlertPublisher(BrokerConfig(url=b.url), host="gpu-node-1",
                                      outbox=None) as pub:
                pub.publish(alert)
                await until(lambda: len(alerts_of(sub)) == 1, what="alert via amqtt")
                assert pub.status.protocol == "3.1.1"
                assert pub.status.state == "connected"
            status = [json.loads(bytes(m.payload)) for m in sub.messages  # type: ignore
                      if str(m.topic).endswith("/status")]
        assert alerts_of(sub)[0].id == alert.id
        assert status and status[0]["state"] == "online"
        # Told the protocol up front (what `prism demo` does for amqtt): no v5 attempt.
        config = BrokerConfig(url=b.url, protocol="3.1.1")
        async with AlertPublisher(config, host="gpu-node-1", outbox=None) as pub:
            await until(lambda: pub.status.state == "connected", timeout=2, what="3.1.1")
            assert pub.status.protocol == "3.1.1"
        port = b.port
        b.stop()
        assert not b.running
        b.start()
        assert b.port == port
        assert len(await collect(b.url, ALERT_SUBSCRIPTION, 0, timeout=0.1)) == 0
    assert not b.running


def test_amqtt_refuses_tls_and_passwords() -> None:
    """The fallback cannot do TLS or password files: say so instead of running insecurely."""
    with pytest.raises(BrokerStartError, match="install mosquitto"):
        EmbeddedBroker(prefer="amqtt", password_file="/p", port=free_port())
