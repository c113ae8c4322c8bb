"""The MQTT alert publisher: QoS 1, durable outbox, reconnect with backoff, online/offline.

``publish()`` runs on the engine's event loop. While the broker is connected and nothing
is queued, it is the whole hot path: the alert is written to the outbox (one SQLite
insert in WAL mode, ~25 µs, no fsync) and handed to paho, which writes it to the socket
before ``publish()`` returns; only the wait for PUBACK is a task. Each asyncio hop on a
busy two-core host costs up to a millisecond (the engine's other ready work runs first),
and the queued path below took five to seven of them. Otherwise ``publish()`` appends
to memory and two tasks do the rest: a *writer* that stores new alerts in the outbox
(in a worker thread for bursts) and deletes acknowledged ones, and the *connection
loop* (aiomqtt's documented pattern: the loop is outside the client, with capped
exponential backoff) whose sender publishes the backlog in order. Both paths hand
alerts to paho's one FIFO queue, so alerts leave in production order. An alert leaves
memory only after the broker's PUBACK; whatever was in flight when a connection
dropped is sent again first on the next connection (duplicates are possible, losses
are not).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import aiomqtt
import paho.mqtt.client as mqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from alerting.config import (
    BrokerConfig,
    alert_topic,
    digest_topic,
    status_topic,
    summary_topic,
)
from alerting.digests import encode as encode_digests
from alerting.outbox import Outbox
from alerting.schema import SCHEMA_VERSION, Alert, rfc3339

State = Literal["connecting", "connected", "down", "off"]
BACKOFF_START_S = 0.1
BACKOFF_MAX_S = 5.0
CONNECT_TIMEOUT_S = 3.0
"""How long to wait for CONNACK (a v3-only broker may hang up on a v5 CONNECT silently)."""
PUBACK_TIMEOUT_S = 30.0
WINDOW = 100
"""Alerts in flight (sent, PUBACK not yet received) per connection."""
MEMORY_LIMIT = 100_000
INLINE_WRITES = 32
"""Outbox writes of up to this many alerts run on the loop (µs); bigger ones in a thread."""
"""Without an outbox, the most alerts kept in memory while the broker is away."""
DIGEST_QUEUE = 1000
"""Digest messages queued for the sender at most (the oldest go first when it lags)."""


@dataclass(frozen=True)
class PublisherStatus:
    """A snapshot of the publisher for the UI and the CLI."""

    state: State
    pending: int
    """Alerts not yet acknowledged by the broker (memory + outbox)."""
    published: int
    """Alerts acknowledged by the broker since start."""
    last_error: str
    """The last connection problem as one line ('' when none)."""
    protocol: str
    """``"5"`` or ``"3.1.1"`` once connected, else ''."""
    in_flight: int = 0
    """Of ``pending``, alerts sent on the current connection and awaiting PUBACK."""


class _Entry:
    """One alert on its way: its order number, outbox seq and the alert itself."""

    __slots__ = ("alert", "n", "seq")

    def __init__(self, n: int, alert: Alert, seq: int | None) -> None:
        self.n, self.alert, self.seq = n, alert, seq


class _Connection:
    """One live broker connection: its client, its failure, its PUBACK waiters.

    Alerts are handed to paho directly (``aiomqtt.Client.publish`` is a coroutine, so
    the hand-over would wait for a loop iteration, and its socket write for two more:
    aiomqtt registers the writer with ``call_soon_threadsafe``). This uses two private
    parts of aiomqtt 2.x, ``_client`` (the paho client) and ``_pending_publishes`` (mid
    → Event set on PUBACK), pinned in pyproject and exercised by tests/test_publisher.py.
    """

    def __init__(self, client: aiomqtt.Client, props: Properties | None) -> None:
        self.client = client
        self.paho = client._client
        self.pending: dict[int, asyncio.Event] = client._pending_publishes
        self.props = props
        self.failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters: set[asyncio.Task[None]] = set()
        sock = self.paho.socket()
        if isinstance(sock, socket.socket):  # paho leaves Nagle on: an alert could wait
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def fail(self, exc: BaseException) -> None:
        """End this connection (the connection loop reconnects and resends)."""
        if not self.failed.done():
            self.failed.set_exception(exc)

    def send(self, topic: str, payload: bytes) -> asyncio.Event | None:
        """Queue one QoS 1 message in paho and write the socket now; its PUBACK event.

        None when paho refused it (no connection): the connection is failed.
        """
        info = self.paho.publish(topic, payload, 1, False, self.props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.fail(aiomqtt.MqttCodeError(info.rc, "Could not publish message"))
            return None
        acked = asyncio.Event()
        self.pending[info.mid] = acked
        # paho would call this itself without an external loop; a write error here is
        # seen again, and handled, by aiomqtt's own writer callback
        with contextlib.suppress(Exception):
            self.paho.loop_write()
        sock = self.paho.socket()
        if not self.paho.want_write() and sock is not None:
            # paho asked aiomqtt for a writer (added one loop step later) and has already
            # withdrawn the request: withdraw it after it lands, or the loop would spin
            # on an always-writable socket
            loop = asyncio.get_running_loop()
            loop.call_soon(loop.remove_writer, sock.fileno())
        return acked


class _ProtocolRefusedError(Exception):
    """The broker does not speak the MQTT version we offered."""


class AlertPublisher:
    """Publishes alerts and summaries of one host to an MQTT broker, losing none.

    Args:
        config: broker URL, credentials, TLS files, topic root.
        host: this machine's name (a topic level and the status payload).
        outbox: the durable outbox; None keeps the backlog in memory only.
        on_delivered: called with an alert's id when the broker acknowledged it.
        direct: send from ``publish()`` itself when connected with nothing queued
            (default); False always queues (the previous path, kept for comparison in
            ``bench/alert_latency.py``).
    """

    def __init__(self, config: BrokerConfig, *, host: str, outbox: Outbox | None,
                 on_delivered: Callable[[str], None] | None = None,
                 direct: bool = True) -> None:
        self.config = config
        self.host = host or socket.gethostname()
        self.outbox = outbox
        self.on_delivered = on_delivered
        self.direct = direct
        self.client_id = config.client_id or f"prism-pub-{self.host}-{os.getpid()}"
        self._counter = itertools.count()
        self._fresh: list[Alert] = []
        self._backlog: deque[_Entry] = deque()
        self._inflight: dict[int, _Entry] = {}
        self._to_ack: list[int] = []
        self._summaries: dict[str, bytes] = {}
        self._digests: deque[tuple[str, bytes]] = deque(maxlen=DIGEST_QUEUE)
        self.digests_dropped = 0
        """Digest messages not sent: published while disconnected, or pushed out of a
        full queue."""
        self._taken = 0  # fresh alerts the writer is storing (not yet in the backlog)
        self._conn: _Connection | None = None  # set while the sender runs
        self._work = asyncio.Event()  # fresh alerts or acks for the writer
        self._ready = asyncio.Event()  # backlog or summaries for the sender
        self._state: State = "off"
        self._protocol = ""
        self._published = 0
        self._dropped = 0
        self._last_error = ""
        self._closed = False
        self._client: aiomqtt.Client | None = None
        self._runner: asyncio.Task[None] | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._loaded = asyncio.Event()
        self._stop = asyncio.Event()  # aclose() asks the connection loop to end
        self._done = asyncio.Event()  # run() has returned
        self._running = False
        self._alert_props: Properties | None = None

    # ------------------------------------------------------------------ hot path
    def publish(self, alert: Alert) -> None:
        """Send one alert now when connected with nothing queued, else queue it.

        Never blocks on the network and never raises; safe before ``run``. After
        :meth:`aclose` it is ignored: stop the engine's sinks before the publisher.
        """
        if self._closed:
            return
        conn = self._conn
        if (self.direct and conn is not None and not conn.failed.done() and not self._fresh
                and not self._taken and not self._backlog
                and len(self._inflight) < WINDOW):
            try:  # written before it is sent, as on the queued path
                seq = self.outbox.put_many([alert])[0] if self.outbox is not None else None
            except Exception:  # queued below: the writer retries and reports it
                pass
            else:
                self._send(conn, _Entry(next(self._counter), alert, seq))
                return
        self._fresh.append(alert)
        self._work.set()

    def publish_summary(self, target_key: str, doc: dict[str, Any]) -> None:
        """Send a target's summary (QoS 0, latest only; dropped while disconnected)."""
        if self._state != "connected":
            return
        self._summaries[target_key] = json.dumps(doc, separators=(",", ":")).encode()
        self._ready.set()

    def publish_digest(self, target_key: str, doc: dict[str, Any]) -> None:
        """Queue one digest message (:mod:`alerting.digests`; QoS 0, in order; dropped
        and counted in :attr:`digests_dropped` while disconnected)."""
        if self._state != "connected":
            self.digests_dropped += 1
            return
        if len(self._digests) == self._digests.maxlen:
            self.digests_dropped += 1
        self._digests.append((target_key, encode_digests(doc)))
        self._ready.set()

    @property
    def status(self) -> PublisherStatus:
        """Connection state, backlog size, delivered count and the last error line."""
        # _taken: alerts the writer is storing (in a thread for a burst), in no list
        pending = len(self._fresh) + self._taken + len(self._backlog) + len(self._inflight)
        return PublisherStatus(self._state, pending, self._published, self._last_error,
                               self._protocol, len(self._inflight))

    @property
    def dropped(self) -> int:
        """Alerts dropped because no outbox was configured and memory was full."""
        return self._dropped

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> AlertPublisher:
        self._runner = asyncio.create_task(self.run(), name="alert-publisher")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def run(self) -> None:
        """Connect, publish, reconnect with backoff — until :meth:`aclose`."""
        if self._closed or self._running:
            return
        self._running = True
        ignore_socket_races(asyncio.get_running_loop())
        self._writer_task = asyncio.create_task(self._writer(), name="alert-outbox-writer")
        try:
            await self._connection_loop()
        finally:
            self._state = "off"
            self._protocol = ""
            await self._stop_writer()
            self._done.set()

    async def aclose(self, flush_timeout: float = 2.0) -> None:
        """Deliver what can be delivered within ``flush_timeout``, say offline, stop.

        Alerts still unacknowledged stay in the outbox for the next run. Idempotent.
        """
        if self._closed:
            return
        runner = self._runner
        if self._running:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + flush_timeout
            while (self._state == "connected" and self.status.pending
                   and loop.time() < deadline):
                await asyncio.sleep(0.01)
            client = self._client
            if self._state == "connected" and client is not None:
                with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                    await client.publish(status_topic(self.config.topic_root, self.host),
                                         self._status_payload("offline", "stopped"), qos=1,
                                         retain=True, timeout=1.0)
        self._closed = True
        self._stop.set()
        if self._running:
            try:  # the loop ends at its next step (at most one connect attempt away)
                await asyncio.wait_for(self._done.wait(), CONNECT_TIMEOUT_S + 1)
            except asyncio.TimeoutError:
                if runner is not None:
                    runner.cancel()
        if runner is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        await self._stop_writer()
        self._state = "off"

    # ------------------------------------------------------------------ writer
    async def _writer(self) -> None:
        """Move fresh alerts to the outbox (then the backlog); delete acknowledged ones."""
        if self.outbox is not None:
            await self._load_backlog(self.outbox)
        self._loaded.set()
        while True:
            await self._work.wait()
            self._work.clear()
            await self._drain_once()

    async def _drain_once(self) -> None:
        fresh, self._fresh = self._fresh, []
        if fresh:
            if self.outbox is not None:
                # a few alerts: write them here (Outbox.put is ~22 µs in WAL mode), as a
                # hop to a worker thread costs milliseconds on a busy host; a burst
                # (reconnect backlog, alert storm) goes to a thread, while publish()
                # keeps queueing behind it (_taken) so that order holds
                self._taken = len(fresh)
                try:
                    seqs: list[int | None] = list(
                        self.outbox.put_many(fresh) if len(fresh) <= INLINE_WRITES
                        else await asyncio.to_thread(self.outbox.put_many, fresh))
                except BaseException:
                    self._fresh[:0] = fresh  # kept for the next attempt, in order
                    raise
                finally:
                    self._taken = 0
            else:
                seqs = [None] * len(fresh)
                overflow = len(self._backlog) + len(fresh) - MEMORY_LIMIT
                if overflow > 0:  # no outbox: keep the newest, count the loss
                    for _ in range(min(overflow, len(self._backlog))):
                        self._backlog.popleft()
                    fresh = fresh[-MEMORY_LIMIT:]
                    seqs = seqs[-MEMORY_LIMIT:]
                    self._dropped += overflow
            for alert, seq in zip(fresh, seqs, strict=True):
                self._backlog.append(_Entry(next(self._counter), alert, seq))
            self._ready.set()
        acks, self._to_ack = self._to_ack, []
        if acks and self.outbox is not None:
            if len(acks) <= INLINE_WRITES:
                self.outbox.ack_many(acks)
            else:
                await asyncio.to_thread(self.outbox.ack_many, acks)
        if self.outbox is not None and self.outbox.checkpoint_due:
            await asyncio.to_thread(self.outbox.checkpoint)  # the fsync, off the loop

    async def _load_backlog(self, outbox: Outbox) -> None:
        after = 0
        while True:
            rows = await asyncio.to_thread(outbox.pending, 5000, after)
            if not rows:
                return
            for seq, alert in rows:
                self._backlog.append(_Entry(next(self._counter), alert, seq))
            after = rows[-1][0]
            self._ready.set()

    async def _stop_writer(self) -> None:
        """Persist fresh alerts and pending acks, then stop the writer task."""
        task, self._writer_task = self._writer_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.outbox is not None and (self._fresh or self._to_ack):
            with contextlib.suppress(Exception):
                await self._drain_once()

    # ------------------------------------------------------------------ connection
    def _make_client(self, protocol: aiomqtt.ProtocolVersion) -> aiomqtt.Client:
        c = self.config
        _, host, port = c.endpoint
        tls_context = _tls_context(c) if c.uses_tls else None
        will = aiomqtt.Will(status_topic(c.topic_root, self.host),
                            self._status_payload("offline", "connection lost"), qos=1,
                            retain=True)
        return aiomqtt.Client(host, port, username=c.username, password=c.password,
                              identifier=self.client_id, protocol=protocol, will=will,
                              keepalive=c.keepalive_s, tls_context=tls_context,
                              timeout=CONNECT_TIMEOUT_S, max_inflight_messages=WINDOW,
                              clean_session=(None if protocol == aiomqtt.ProtocolVersion.V5
                                             else True))

    def _status_payload(self, state: str, reason: str = "") -> bytes:
        doc: dict[str, Any] = {"state": state, "host": self.host, "schema": SCHEMA_VERSION,
                               "client_id": self.client_id, "pid": os.getpid(),
                               "at": rfc3339()}
        if reason:
            doc["reason"] = reason
        if self._protocol:
            doc["protocol"] = self._protocol
        return json.dumps(doc, separators=(",", ":")).encode()

    async def _connection_loop(self) -> None:
        interval = BACKOFF_START_S
        v5, v311 = aiomqtt.ProtocolVersion.V5, aiomqtt.ProtocolVersion.V311
        protocol = v311 if self.config.protocol == "3.1.1" else v5
        fixed = self.config.protocol != "auto"
        while not self._stop.is_set():
            self._state = "connecting"
            connected = False
            try:
                client = self._make_client(protocol)
                self._client = client
                try:
                    async with client:
                        connected = True
                        self._protocol = "5" if protocol == v5 else "3.1.1"
                        self._last_error = ""
                        interval = BACKOFF_START_S
                        await self._connected(client)
                except MqttConnectError as exc:
                    if not fixed and protocol == v5 and _protocol_refused(exc):
                        protocol = v311
                        raise _ProtocolRefusedError from None
                    raise
            except _ProtocolRefusedError:
                self._last_error = "broker refused MQTT 5; using MQTT 3.1.1"
                continue
            except aiomqtt.MqttError as exc:
                if self._stop.is_set():
                    break
                if not fixed and not connected and "timed out" in str(exc):
                    # No CONNACK: some v3-only brokers (amqtt) drop a v5 CONNECT silently.
                    protocol = v311 if protocol == v5 else v5
                    if protocol == v311:
                        self._last_error = "no answer to MQTT 5 CONNECT; trying MQTT 3.1.1"
                        continue
                self._last_error = describe_error(exc, self.config.url)
            finally:
                self._client = None
            self._state = "down"
            self._protocol = ""
            if self._stop.is_set():
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), interval)
            interval = min(interval * 2, BACKOFF_MAX_S)

    async def _connected(self, client: aiomqtt.Client) -> None:
        """One connection's life: announce online, send backlog then new alerts."""
        c = self.config
        await client.publish(status_topic(c.topic_root, self.host),
                             self._status_payload("online"), qos=1, retain=True)
        if self._protocol == "5":
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.PayloadFormatIndicator = 1
            props.ContentType = "application/json"
            self._alert_props = props
        else:
            self._alert_props = None
        self._state = "connected"
        await self._loaded.wait()
        # Whatever was in flight on the last connection goes first, in production order.
        if self._inflight:
            merged = sorted([*self._inflight.values(), *self._backlog], key=lambda e: e.n)
            self._inflight.clear()
            self._backlog = deque(merged)
        watcher = asyncio.create_task(self._watch(client))
        sender = asyncio.create_task(self._sender(client))
        stop = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait({watcher, sender, stop},
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in done - {stop}:
                task.result()  # re-raise the MqttError that ended the connection
        finally:
            self._state = "down"
            for task in (watcher, sender, stop):
                task.cancel()
            await asyncio.gather(watcher, sender, stop, return_exceptions=True)

    async def _watch(self, client: aiomqtt.Client) -> None:
        """Raise MqttError when the connection drops (we subscribe to nothing)."""
        async for _ in client.messages:
            pass

    async def _sender(self, client: aiomqtt.Client) -> None:
        """Publish the backlog in order, then new alerts (which mostly bypass it)."""
        conn = _Connection(client, self._alert_props)
        window = asyncio.Semaphore(WINDOW)
        self._conn = conn
        try:
            while True:
                if conn.failed.done():
                    conn.failed.result()
                if not self._backlog and not self._summaries and not self._digests:
                    self._ready.clear()
                    waiter: asyncio.Future[Any] = asyncio.ensure_future(self._ready.wait())
                    waiting: set[asyncio.Future[Any]] = {waiter, conn.failed}
                    try:
                        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiter.cancel()  # also when we are cancelled: no task left pending
                    continue
                while self._summaries:
                    key, payload = self._summaries.popitem()
                    await client.publish(summary_topic(self.config.topic_root, self.host, key),
                                         payload, qos=0)
                while self._digests:
                    key, payload = self._digests.popleft()
                    await client.publish(digest_topic(self.config.topic_root, self.host, key),
                                         payload, qos=0)
                if not self._backlog:
                    continue
                await window.acquire()
                if conn.failed.done():
                    window.release()
                    conn.failed.result()
                self._send(conn, self._backlog.popleft(), window.release)
        finally:
            self._conn = None
            for task in list(conn.waiters):
                task.cancel()
            if conn.waiters:
                await asyncio.gather(*conn.waiters, return_exceptions=True)

    def _send(self, conn: _Connection, entry: _Entry,
              release: Callable[[], None] | None = None) -> None:
        """Hand one alert to paho now; a task waits for its PUBACK."""
        self._inflight[entry.n] = entry
        alert = entry.alert.with_published_at()
        acked = conn.send(alert_topic(self.config.topic_root, alert.host, alert.target_key),
                          alert.to_json())
        if acked is None:
            if release is not None:
                release()
            return  # stays in flight: resent first on the next connection
        task = asyncio.create_task(self._await_puback(conn, entry, alert.id, acked, release))
        conn.waiters.add(task)
        task.add_done_callback(conn.waiters.discard)

    async def _await_puback(self, conn: _Connection, entry: _Entry, alert_id: str,
                            acked: asyncio.Event,
                            release: Callable[[], None] | None) -> None:
        try:
            await asyncio.wait_for(acked.wait(), PUBACK_TIMEOUT_S)
        except asyncio.TimeoutError:
            conn.fail(aiomqtt.MqttError(f"no PUBACK within {PUBACK_TIMEOUT_S:g} s"))
            return
        finally:
            if release is not None:
                release()
        self._inflight.pop(entry.n, None)
        self._published += 1
        if entry.seq is not None:
            self._to_ack.append(entry.seq)
            self._work.set()
        if self.on_delivered is not None:
            self.on_delivered(alert_id)


def _protocol_refused(exc: MqttConnectError) -> bool:
    """True for CONNACK 'unsupported protocol version' (v3 rc 1, v5 reason 132)."""
    rc = exc.rc
    if isinstance(rc, ReasonCode):
        return rc.value in (1, 132)
    return rc == 1


def _tls_context(c: BrokerConfig) -> ssl.SSLContext:
    """A verifying client TLS context from the config's files (bad files: MqttError)."""
    for name, path in (("tls_ca", c.tls_ca), ("tls_cert", c.tls_cert), ("tls_key", c.tls_key)):
        if path is not None and not Path(path).expanduser().is_file():
            raise aiomqtt.MqttError(f"{name} file not found: {path}")
    try:
        ctx = ssl.create_default_context(
            cafile=str(Path(c.tls_ca).expanduser()) if c.tls_ca else None)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise aiomqtt.MqttError(f"cannot load the TLS files: tls_ca {c.tls_ca} is not a "
                                f"PEM CA bundle ({exc})") from None
    if c.tls_cert and c.tls_key:
        try:
            ctx.load_cert_chain(str(Path(c.tls_cert).expanduser()),
                                str(Path(c.tls_key).expanduser()))
        except (OSError, ValueError) as exc:
            raise aiomqtt.MqttError(f"cannot load the TLS files: tls_cert {c.tls_cert} and "
                                    f"tls_key {c.tls_key} are not a matching PEM certificate "
                                    f"and key ({exc})") from None
    return ctx


def describe_error(exc: BaseException, url: str) -> str:
    """One clear line for a connection failure (what happened and what to check)."""
    if isinstance(exc, MqttConnectError):
        rc = exc.rc
        value = rc.value if isinstance(rc, ReasonCode) else rc
        if value in (4, 134):
            return "broker refused: bad username or password (check username/password)"
        if value in (5, 135):
            return "broker refused: not authorized (check username/password)"
        if value in (2, 133):
            return "broker refused: client identifier rejected (check client_id)"
        return f"broker refused the connection: {exc}"
    text = str(exc)
    if "file not found" in text or "cannot load the TLS files" in text:
        return f"TLS setup failed: {text}"
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLError) or "SSL" in text or "certificate" in text.lower():
        if "CERTIFICATE_VERIFY_FAILED" in text or "verify failed" in text:
            return (f"TLS handshake with {url} failed: the broker's certificate is not "
                    f"trusted (check tls_ca): {text}")
        return f"TLS handshake with {url} failed (check tls_ca/tls_cert/tls_key): {text}"
    if "refused" in text.lower():
        return f"cannot connect to {url}: connection refused (is the broker running?)"
    return f"connection to {url} failed: {text or type(exc).__name__}"


_PAHO_SOCKET_CALLBACKS = ("_on_socket_register_write", "_on_socket_open")


def _is_paho_socket_call(handle: object) -> bool:
    """Whether a loop handle is aiomqtt's ``add_writer``/``add_reader`` for paho's socket."""
    callback = getattr(handle, "_callback", None)
    if getattr(callback, "__name__", "") not in ("add_writer", "add_reader"):
        return False
    names = [getattr(arg, "__qualname__", "") for arg in getattr(handle, "_args", ())]
    return any(part in name for name in names for part in _PAHO_SOCKET_CALLBACKS)


def ignore_socket_races(loop: asyncio.AbstractEventLoop) -> None:
    """Keep aiomqtt's reconnect race out of the loop's error log (idempotent).

    paho-mqtt asks aiomqtt, from its thread, to watch a socket; aiomqtt schedules
    ``loop.add_writer(fd, ...)`` with ``call_soon_threadsafe``, and when the broker drops
    the connection in between, the fd is already closed when that runs: ``OSError``
    EBADF in a loop callback (seen in the 30 s broker-outage test). The connection loop
    already treats the drop as a disconnect and reconnects, so that one error is noise;
    every other loop error still reaches the previous handler.
    """
    previous = loop.get_exception_handler()
    if getattr(previous, "ignores_socket_races", False):
        return

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno == 9 and _is_paho_socket_call(
                context.get("handle")):
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handler.ignores_socket_races = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)
