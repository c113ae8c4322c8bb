"""The alert publisher and its outbox against a real Mosquitto broker and real SQLite files."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from alerting.broker import EmbeddedBroker, free_port, write_password_file
from alerting.config import (
    ALERT_SUBSCRIPTION,
    BrokerConfig,
    BrokerConfigError,
    alert_topic,
    parse_broker_url,
    status_topic,
    summary_topic,
)
from alerting.outbox import Outbox
from alerting.publisher import BACKOFF_MAX_S, BACKOFF_START_S, AlertPublisher
from alerting.schema import Alert, parse_rfc3339
from tests.mqtt_fixtures import Subscriber, TlsFiles, broker, make_tls_files, sample_alert

__all__ = ["broker"]  # the fixture, imported for pytest
ROOT = Path(__file__).resolve().parent.parent


async def until(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    """Wait for a condition (fails the test with ``what`` after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what or 'condition'}")
        await asyncio.sleep(0.01)


def alerts_of(sub: Subscriber) -> list[Alert]:
    """Decoded alert messages a subscriber received (in arrival order)."""
    return [Alert.from_json(bytes(m.payload)) for m in sub.messages  # type: ignore[arg-type]
            if str(m.topic).endswith("/alert")]


# ---------------------------------------------------------------------- config
def test_broker_urls_and_topics() -> None:
    """Accepted URL forms, one-line errors for bad ones, and the topic layout."""
    assert parse_broker_url("mqtt://broker.example") == ("mqtt", "broker.example", 1883)
    assert parse_broker_url("mqtts://broker.example") == ("mqtts", "broker.example", 8883)
    assert parse_broker_url("mqtt://10.0.0.1:1884/") == ("mqtt", "10.0.0.1", 1884)
    assert parse_broker_url("localhost:1999") == ("mqtt", "localhost", 1999)
    assert parse_broker_url("mqtt://[::1]:1885") == ("mqtt", "::1", 1885)
    assert parse_broker_url("ssl://b:8884") == ("mqtts", "b", 8884)
    assert parse_broker_url("TCP://b") == ("mqtt", "b", 1883)
    for bad, words in (("http://x:1883", "scheme"), ("ws://x:80", "WebSocket"),
                       ("mqtt://:1883", "no host"), ("mqtt://x:99999", "port"),
                       ("x", "host:port"), ("", "empty"),
                       ("mqtt://u:p@x:1883", "username/password"), ("mqtt://x:abc", "port")):
        with pytest.raises(BrokerConfigError) as info:
            parse_broker_url(bad)
        assert words in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(BrokerConfigError, match="together"):
        BrokerConfig(url="mqtt://x", tls_cert="/c.pem")
    assert BrokerConfig(url="mqtt://x", username="", tls_ca="").username is None
    assert BrokerConfig(url="mqtts://x").uses_tls and not BrokerConfig(url="x:1").uses_tls
    assert status_topic("latencyprism/v1", "node 1") == "latencyprism/v1/node_1/status"
    assert alert_topic("r", "h", "vllm-42") == "r/h/vllm-42/alert"
    assert summary_topic("r", "h+", "t#") == "r/h_/t_/summary"
    assert ALERT_SUBSCRIPTION == "latencyprism/v1/+/+/alert"


# ---------------------------------------------------------------------- outbox
def test_outbox_is_a_durable_ordered_queue(tmp_path: Path) -> None:
    """put/pending/ack keep order across reopen; the file is 0600 and in WAL mode."""
    path = tmp_path / "sub" / "outbox.sqlite"
    alerts = [sample_alert(f"fp-{i % 3}", seq=i) for i in range(10)]
    with Outbox(path) as box:
        seqs = [box.put(a) for a in alerts[:4]] + box.put_many(alerts[4:])
        assert seqs == sorted(seqs) and len(set(seqs)) == 10
        assert len(box) == 10
        box.ack(seqs[0])
        box.ack_many(seqs[2:4])
        box.ack(10_000)  # unknown: ignored
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with Outbox(path) as box:
        assert box.notice == ""
        rows = box.pending(limit=100)
        assert [a for _, a in rows] == [alerts[1], *alerts[4:]]
        assert box.pending(limit=2, after=rows[0][0]) == rows[1:3]
        assert box.put(alerts[0]) > seqs[-1]  # seqs are never reused
        mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
    box.close()  # idempotent


def test_outbox_commits_never_checkpoint_the_checkpointer_does(tmp_path: Path) -> None:
    """put/ack (on the publisher's loop) only append to the WAL: SQLite's automatic
    checkpoint, an fsync inside whichever commit crosses it, is off. checkpoint() (the
    writer's thread) copies it back, after which the WAL is reused instead of growing."""
    path = tmp_path / "outbox.sqlite"
    wal = Path(f"{path}-wal")
    with Outbox(path) as box:
        for i in range(1100):
            box.ack(box.put(sample_alert(seq=i)))
        assert box.checkpoint_due
        grown = wal.stat().st_size
        assert grown > 2200 * 4096  # 2,200 commits, none checkpointed (SQLite's own
        # automatic checkpoint would have restarted the WAL at 1,000 pages)
        box.checkpoint()
        assert not box.checkpoint_due
        kept = [sample_alert(seq=1000 + i) for i in range(5)]
        for i in range(300):
            box.ack(box.put(sample_alert(seq=i)))
        box.put_many(kept)
        assert wal.stat().st_size == grown  # rewritten from its start, not extended
    with Outbox(path) as box:
        assert [a for _, a in box.pending()] == kept


@pytest.mark.parametrize("content", [b"this is not a database at all" * 100, "foreign"])
def test_corrupt_outbox_is_moved_aside(tmp_path: Path, content: bytes | str) -> None:
    """A garbage or foreign file is kept under .corrupt-<time>, with a notice, not a crash."""
    path = tmp_path / "outbox.sqlite"
    if content == "foreign":
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE users (name TEXT)")
        db.execute("INSERT INTO users VALUES ('keep me')")
        db.commit()
        db.close()
    else:
        assert isinstance(content, bytes)
        path.write_bytes(content)
    original = path.read_bytes()
    with Outbox(path) as box:
        assert "unreadable" in box.notice and ".corrupt-" in box.notice
        assert "\n" not in box.notice
        box.put(sample_alert())
        assert len(box) == 1
    aside = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name and
             not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1 and aside[0].read_bytes() == original


def test_undecodable_outbox_row_is_kept_aside(tmp_path: Path) -> None:
    """A row an older version wrote that no longer decodes moves to 'rejected', not lost."""
    path = tmp_path / "outbox.sqlite"
    with Outbox(path) as box:
        good = box.put(sample_alert(seq=1))
    db = sqlite3.connect(path)
    db.execute("INSERT INTO outbox (fingerprint, payload, created_ns) VALUES ('x', ?, 0)",
               (b'{"schema": 99}',))
    db.commit()
    db.close()
    with Outbox(path) as box:
        assert [seq for seq, _ in box.pending()] == [good]
        assert "rejected" in box.notice
    kept = sqlite3.connect(path).execute("SELECT payload, reason FROM rejected").fetchall()
    assert kept[0][0] == b'{"schema": 99}' and "schema" in kept[0][1]


# ---------------------------------------------------------------------- round trip
@pytest.mark.anyio
async def test_round_trip_alerts_status_and_summary(broker: EmbeddedBroker,
                                                     tmp_path: Path) -> None:
    """Alerts arrive intact on their topic with published_at; online, then offline status."""
    delivered: list[str] = []
    box = Outbox(tmp_path / "outbox.sqlite")
    alerts = [sample_alert("fp-a", seq=0), sample_alert("fp-b", seq=1, name="sg lang"),
              sample_alert("fp-a", seq=2)]
    pub = AlertPublisher(BrokerConfig(url=broker.url), host="gpu-node-1", outbox=box,
                         on_delivered=delivered.append)
    assert pub.status.state == "off"
    pub.publish(alerts[0])  # before run(): queued, delivered once connected
    async with Subscriber(broker.url, "latencyprism/v1/#") as sub:
        async with pub:
            await until(lambda: pub.status.state == "connected", what="connect")
            assert pub.status.protocol == "5"
            for alert in alerts[1:]:
                pub.publish(alert)
            await until(lambda: len(alerts_of(sub)) == 3, what="3 alerts")
            await until(lambda: pub.status.published == 3 and len(box) == 0, what="acks")
            assert pub.status.pending == 0 and pub.status.last_error == ""
            pub.publish_summary("vllm-4242", {"schema": 1, "series": [{"p99": 1.5}]})
            await until(lambda: any(str(m.topic).endswith("/summary") for m in sub.messages))
        got = alerts_of(sub)
        await until(lambda: len([m for m in sub.messages
                                 if str(m.topic).endswith("/status")]) == 2, what="offline")
    assert [a.id for a in got] == [a.id for a in alerts] == delivered
    for sent, received in zip(alerts, got, strict=True):
        assert received.published_at and parse_rfc3339(received.published_at)
        assert received == sent.with_published_at(parse_rfc3339(received.published_at))
    topics = [str(m.topic) for m in sub.messages]
    assert "latencyprism/v1/gpu-node-1/vllm-4242/alert" in topics
    assert "latencyprism/v1/gpu-node-1/sg_lang-4242/alert" in topics
    summary = next(m for m in sub.messages if str(m.topic).endswith("/summary"))
    assert str(summary.topic) == "latencyprism/v1/gpu-node-1/vllm-4242/summary"
    assert summary.qos == 0 and json.loads(bytes(summary.payload))["series"]  # type: ignore
    statuses = [json.loads(bytes(m.payload)) for m in sub.messages  # type: ignore[arg-type]
                if str(m.topic).endswith("/status")]
    assert [s["state"] for s in statuses] == ["online", "offline"]
    assert statuses[0]["host"] == "gpu-node-1" and statuses[1]["reason"] == "stopped"
    assert pub.status.state == "off"
    await pub.aclose()  # idempotent
    box.close()


@pytest.mark.anyio
async def test_connected_publish_is_stored_and_on_the_wire_before_it_returns(
        broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Connected with nothing queued: publish() writes the outbox and hands the alert to
    the socket itself (no task hop); a burst past the in-flight window queues behind it,
    and everything arrives in production order. Afterwards the loop idles: the socket
    writer paho asked for is withdrawn, not left spinning on a writable socket."""
    box = Outbox(tmp_path / "outbox.sqlite")
    async with Subscriber(broker.url, ALERT_SUBSCRIPTION) as sub, \
            AlertPublisher(BrokerConfig(url=broker.url), host="h", outbox=box) as pub:
        await until(lambda: pub.status.state == "connected", what="connect")
        await asyncio.sleep(0.2)  # the online status acknowledged
        first = sample_alert("fp-0", seq=0)
        pub.publish(first)
        assert len(box) == 1 and pub.status.in_flight == 1  # no await in between
        await until(lambda: len(alerts_of(sub)) == 1, what="first alert")
        burst = [sample_alert(f"fp-{i % 3}", seq=i) for i in range(1, 301)]
        for alert in burst:
            pub.publish(alert)
        assert 0 < pub.status.in_flight <= 100 < pub.status.pending
        await until(lambda: len(alerts_of(sub)) == 301, what="burst")
        await until(lambda: pub.status.pending == 0 and len(box) == 0, what="acks")
        cpu = time.process_time()
        await asyncio.sleep(1.0)
        idle_cpu = time.process_time() - cpu
    assert [a.window for a in alerts_of(sub)] == list(range(301))
    assert idle_cpu < 0.3, f"the loop kept busy while idle: {idle_cpu:.2f} s of CPU in 1 s"
    box.close()


@pytest.mark.anyio
async def test_publish_returns_immediately_without_a_broker(tmp_path: Path) -> None:
    """No broker: publish() still returns at once, alerts wait in the outbox, error is clear."""
    url = f"mqtt://127.0.0.1:{free_port()}"
    box = Outbox(tmp_path / "outbox.sqlite")
    pub = AlertPublisher(BrokerConfig(url=url), host="h", outbox=box)
    async with pub:
        for i in range(200):
            pub.publish(sample_alert(seq=i))
        await until(lambda: len(box) == 200, what="outbox writes")
        await until(lambda: pub.status.state == "down", what="down state")
        assert pub.status.pending == 200 and pub.status.published == 0
        assert pub.status.last_error == (f"cannot connect to {url}: connection refused "
                                         "(is the broker running?)")
    assert len(box) == 200  # kept for the next run
    box.close()


@pytest.mark.anyio
async def test_backlog_from_a_previous_run_is_sent_first_in_order(broker: EmbeddedBroker,
                                                                  tmp_path: Path) -> None:
    """Alerts left in the outbox by a run that never reached the broker go out, in order."""
    path = tmp_path / "outbox.sqlite"
    dead = BrokerConfig(url=f"mqtt://127.0.0.1:{free_port()}")
    old = [sample_alert(f"fp-{i % 2}", seq=i) for i in range(50)]
    with Outbox(path) as box:
        pub = AlertPublisher(dead, host="gpu-node-1", outbox=box)
        for alert in old[:20]:
            pub.publish(alert)  # never run(): aclose() still writes them
        await pub.aclose()
        async with AlertPublisher(dead, host="gpu-node-1", outbox=box) as pub2:
            for alert in old[20:]:
                pub2.publish(alert)
            await until(lambda: len(box) == 50)
    new = sample_alert("fp-0", seq=50)
    async with Subscriber(broker.url, ALERT_SUBSCRIPTION) as sub:
        with Outbox(path) as box:
            async with AlertPublisher(BrokerConfig(url=broker.url), host="gpu-node-1",
                                      outbox=box) as pub3:
                pub3.publish(new)
                await until(lambda: len(alerts_of(sub)) == 51, what="backlog + new")
                await until(lambda: len(box) == 0, what="outbox emptied")
    assert [a.window for a in alerts_of(sub)] == list(range(51))


# ---------------------------------------------------------------------- last will
CHILD = """
import asyncio, sys
from alerting.config import BrokerConfig
from alerting.publisher import AlertPublisher

async def main():
    pub = AlertPublisher(BrokerConfig(url=sys.argv[1], keepalive_s=2), host="doomed-node",
                         outbox=None)
    task = asyncio.create_task(pub.run())
    while pub.status.state != "connected":
        await asyncio.sleep(0.01)
    print("connected", flush=True)
    await task

asyncio.run(main())
"""


@pytest.mark.anyio
async def test_last_will_marks_a_killed_publisher_offline(broker: EmbeddedBroker,
                                                          tmp_path: Path) -> None:
    """SIGKILL a publisher process: the broker publishes its retained offline will."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    topic = status_topic("latencyprism/v1", "doomed-node")
    child = subprocess.Popen([sys.executable, str(script), broker.url], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 20)
        assert line.strip() == "connected"
        async with Subscriber(broker.url, topic) as sub:
            await until(lambda: len(sub.messages) == 1, what="retained online")
            assert json.loads(bytes(sub.messages[0].payload))["state"] == "online"  # type: ignore
            assert sub.messages[0].retain
            os.kill(child.pid, signal.SIGKILL)
            await until(lambda: len(sub.messages) == 2, what="last will")
        will = json.loads(bytes(sub.messages[1].payload))  # type: ignore[arg-type]
        assert will["state"] == "offline" and will["reason"] == "connection lost"
        assert will["host"] == "doomed-node"
        # Retained: a late subscriber learns the host is offline too.
        async with Subscriber(broker.url, topic) as late:
            await until(lambda: len(late.messages) == 1, what="retained will")
        assert json.loads(bytes(late.messages[0].payload))["state"] == "offline"  # type: ignore
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


# ---------------------------------------------------------------------- outage
@pytest.mark.anyio
@pytest.mark.slow
async def test_broker_outage_past_the_backoff_cap_loses_nothing(broker: EmbeddedBroker,
                                                                tmp_path: Path) -> None:
    """1,000 alerts produced around a broker outage: all arrive, in order per series.

    The outage (2 x the backoff cap, 10 s) outlasts the backoff's climb to its cap
    (0.1 s doubling to 5 s: 6.3 s of waits), so the reconnect follows a capped wait, as
    after any longer outage; a longer one only adds more capped retries.
    """
    outage_s = 2 * BACKOFF_MAX_S
    climb, wait = 0.0, BACKOFF_START_S
    while wait < BACKOFF_MAX_S:
        climb, wait = climb + wait, wait * 2
    assert climb < outage_s - 1.0, "the outage must outlast the backoff's climb to its cap"
    box = Outbox(tmp_path / "outbox.sqlite")
    fingerprints = [f"fp-{k}" for k in range(4)]
    alerts = [sample_alert(fingerprints[i % 4], seq=i) for i in range(1000)]
    pub = AlertPublisher(BrokerConfig(url=broker.url, keepalive_s=2), host="gpu-node-1",
                         outbox=box)
    async with Subscriber(broker.url, ALERT_SUBSCRIPTION, identifier=f"sub-{os.getpid()}",
                          clean_session=False) as sub, pub:
        await until(lambda: pub.status.state == "connected", what="connect")
        for alert in alerts[:300]:  # a burst: many still in flight when the broker goes
            pub.publish(alert)
        await asyncio.to_thread(broker.stop)
        stopped = time.monotonic()
        for alert in alerts[300:]:
            pub.publish(alert)
            await asyncio.sleep(0.005)
        await until(lambda: pub.status.state == "down", what="down")
        assert pub.status.pending > 0 and "refused" in pub.status.last_error
        await until(lambda: len(box) + pub.status.published >= 1000, what="outbox writes")
        await asyncio.sleep(max(0.0, outage_s - (time.monotonic() - stopped)))
        await asyncio.to_thread(broker.start)
        await until(lambda: len({a.id for a in alerts_of(sub)}) == 1000, timeout=40,
                    what="all 1000 alerts after the restart")
        await until(lambda: len(box) == 0 and pub.status.pending == 0, what="outbox empty")
    received = alerts_of(sub)
    assert {a.id for a in received} == {a.id for a in alerts}
    for fp in fingerprints:
        first_seen: list[int] = []
        for a in received:
            if a.fingerprint == fp and a.window not in first_seen:
                first_seen.append(a.window)
        assert first_seen == sorted(first_seen), f"{fp} out of order"
    box.close()


@pytest.mark.anyio
async def test_in_flight_alerts_survive_a_broker_crash(broker: EmbeddedBroker,
                                                       tmp_path: Path) -> None:
    """Alerts sent but never acknowledged (frozen, then SIGKILLed broker) are sent again."""
    box = Outbox(tmp_path / "outbox.sqlite")
    alerts = [sample_alert(f"fp-{i % 2}", seq=i) for i in range(50)]
    pub = AlertPublisher(BrokerConfig(url=broker.url), host="gpu-node-1", outbox=box)
    async with Subscriber(broker.url, ALERT_SUBSCRIPTION, identifier=f"crash-{os.getpid()}",
                          clean_session=False) as sub, pub:
        await until(lambda: pub.status.state == "connected", what="connect")
        pid = broker.pid
        assert pid is not None
        os.kill(pid, signal.SIGUSR1)  # Mosquitto saves sessions (our subscription) now
        await asyncio.sleep(0.3)
        os.kill(pid, signal.SIGSTOP)  # frozen: PUBLISHes go out, no PUBACK comes back
        for alert in alerts:
            pub.publish(alert)
        await until(lambda: pub.status.in_flight == 50 and len(box) == 50,
                    what="50 alerts in flight")
        assert pub.status.published == 0
        os.kill(pid, signal.SIGKILL)  # the broker dies with them unacknowledged
        await asyncio.to_thread(broker.stop)
        await asyncio.to_thread(broker.start)
        await until(lambda: len({a.id for a in alerts_of(sub)}) == 50, what="resent")
        await until(lambda: len(box) == 0 and pub.status.published >= 50, what="acks")
    first_seen: list[int] = []
    for a in alerts_of(sub):
        if a.window not in first_seen:
            first_seen.append(a.window)
    assert first_seen == list(range(50))
    box.close()


# ---------------------------------------------------------------------- TLS + auth
@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[EmbeddedBroker, TlsFiles]]:
    """Mosquitto with TLS (fixture-made CA, server and client certs) and a password file."""
    folder = tmp_path_factory.mktemp("tls")
    tls = make_tls_files(folder)
    passwd = write_password_file(folder / "passwd", {"prism": "s3cret"})
    with EmbeddedBroker(certfile=tls.server_cert, keyfile=tls.server_key, cafile=tls.ca,
                        require_certificate=True, password_file=passwd) as b:
        yield b, tls


@pytest.mark.anyio
async def test_tls_with_client_certificate_and_password(
        secure_broker: tuple[EmbeddedBroker, TlsFiles]) -> None:
    """The right CA, client certificate and password: alerts flow over TLS."""
    b, tls = secure_broker
    assert b.url.startswith("mqtts://")
    config = BrokerConfig(url=b.url, username="prism", password="s3cret", tls_ca=str(tls.ca),
                          tls_cert=str(tls.client_cert), tls_key=str(tls.client_key))
    from aiomqtt import TLSParameters

    params = TLSParameters(ca_certs=str(tls.ca), certfile=str(tls.client_cert),
                           keyfile=str(tls.client_key))
    alert = sample_alert("fp-tls")
    pub = AlertPublisher(config, host="tls-node", outbox=None)
    async with Subscriber(b.url, ALERT_SUBSCRIPTION, username="prism", password="s3cret",
                          tls_params=params) as sub, pub:
        pub.publish(alert)
        await until(lambda: len(alerts_of(sub)) == 1, what="alert over TLS")
        assert pub.status.state == "connected" and pub.status.last_error == ""
    assert alerts_of(sub)[0].id == alert.id


@pytest.mark.anyio
@pytest.mark.parametrize("case", ["password", "untrusted-ca", "missing-ca", "bad-key"])
async def test_wrong_credentials_give_one_clear_error(
        secure_broker: tuple[EmbeddedBroker, TlsFiles], case: str, tmp_path: Path) -> None:
    """Wrong password, untrusted server certificate, missing CA, garbage key: one line."""
    b, tls = secure_broker
    ca = str(tls.ca)
    if case == "untrusted-ca":
        ca = str(make_tls_files(tmp_path / "other").ca)
    elif case == "missing-ca":
        ca = str(tmp_path / "nope.crt")
    key = str(tls.client_key)
    if case == "bad-key":
        key = str(tmp_path / "garbage.key")
        Path(key).write_text("-----BEGIN EC PRIVATE KEY-----\nnot a key\n")
    password = "wrong" if case == "password" else "s3cret"
    config = BrokerConfig(url=b.url, username="prism", password=password, tls_ca=ca,
                          tls_cert=str(tls.client_cert), tls_key=key)
    expected = {
        "password": "broker refused: not authorized (check username/password)",
        "untrusted-ca": "the broker's certificate is not trusted (check tls_ca)",
        "missing-ca": f"TLS setup failed: tls_ca file not found: {ca}",
        "bad-key": "TLS setup failed: cannot load the TLS files: ",
    }[case]
    async with AlertPublisher(config, host="h", outbox=None) as pub:
        pub.publish(sample_alert())
        await until(lambda: pub.status.last_error != "", what="an error")
        await asyncio.sleep(0.5)  # it keeps retrying with backoff, the line stays clear
        st = pub.status
        assert st.state in ("down", "connecting") and st.pending == 1 and st.published == 0
        assert expected in st.last_error and "\n" not in st.last_error


def test_the_aiomqtt_reconnect_race_is_not_logged_but_other_loop_errors_are() -> None:
    """aiomqtt schedules ``add_writer`` on paho's socket; a drop in between closes it."""
    import socket as socket_module

    from alerting.publisher import ignore_socket_races

    class Client:  # the qualified name aiomqtt's callback has
        def _on_socket_register_write(self) -> Callable[[], None]:
            def callback() -> None: ...
            return callback

    seen: list[BaseException | None] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx.get("exception")))
        ignore_socket_races(loop)
        ignore_socket_races(loop)  # idempotent: wraps once
        a, _b = socket_module.socketpair()
        fd = a.fileno()
        a.close()
        loop.call_soon_threadsafe(loop.add_writer, fd, Client()._on_socket_register_write())
        loop.call_soon_threadsafe(loop.add_writer, fd, lambda: None)
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert len(seen) == 1 and isinstance(seen[0], OSError)
