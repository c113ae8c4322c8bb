"""The gateway process: an MQTT subscriber feeding the pipeline, and the senders.

The subscriber reconnects with backoff outside the client (aiomqtt's documented
pattern) and uses a persistent session (fixed client id; ``clean_session=False`` in MQTT
3.1.1, ``clean_start=False`` with a session expiry in MQTT 5), so the broker keeps QoS 1
alerts while the gateway restarts. Each message is acknowledged only once what it
changed is in the state file: a gateway killed between receipt and that write gets the
message again from the broker, so no alert is lost. Gateways of one MQTT 5 shared
subscription group split the stream between them. Malformed payloads are counted per
kind, logged once per kind, and dropped; the gateway keeps running. Delivered
notifications, firing alerts and silences live in :class:`GatewayState`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from alerting.gateway.config import GatewayConfig
from alerting.gateway.errors import BrokerRefusedError, GatewayConfigError
from alerting.gateway.pipeline import Clock, Ingested, Notification, Pipeline, SystemClock
from alerting.gateway.sinks import Sink, SinkError, build_sink, send_with_retry
from alerting.gateway.state import GatewayState

log = logging.getLogger("alerting.gateway")
T = TypeVar("T")
_REFUSED = {4, 5, 134, 135}
"""CONNACK codes no retry can fix: bad user name or password, not authorized."""


def _nothing() -> None:
    """A state-writer job that writes nothing: orders an acknowledgement after the writes."""


def _acknowledger(client: aiomqtt.Client, message: aiomqtt.Message) -> Callable[[], object]:
    """Send the message's PUBACK (QoS 0 has none); a closed connection just drops it."""
    def acknowledge() -> object:
        if message.qos == 0:
            return None
        return client._client.ack(message.mid, message.qos)
    return acknowledge


class GatewayService:
    """Subscribe, route, send; one owner of its tasks and its state-writer thread."""

    def __init__(self, config: GatewayConfig, state: GatewayState, *,
                 clock: Clock | None = None, sinks: Mapping[tuple[str, int], Sink] | None = None,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 silence_refresh_s: float = 1.0) -> None:
        self.config = config
        self.state = state
        self.clock = clock or SystemClock()
        self.sleep = sleep
        self.silence_refresh_s = silence_refresh_s
        now = self.clock.now()
        state.prune(now - config.retention_s)
        self.pipeline = Pipeline(config, self.clock, nflog=state.nflog(),
                                 silences=state.silences(now, include_expired=False))
        self.pipeline.restore(state.firing_alerts())
        self.sinks: dict[tuple[str, int], Sink] = {
            (name, i): build_sink(cfg, f"{name}/{cfg.kind}#{i}")
            for name, receiver in config.receivers.items()
            for i, cfg in enumerate(receiver.sinks)}
        if sinks:
            self.sinks.update(sinks)
        self.connected = asyncio.Event()
        """Set while subscribed (tests wait on it)."""
        self._wake = asyncio.Event()
        self._warned: set[str] = set()
        self._deliveries: set[asyncio.Task[None]] = set()
        self._writes: set[asyncio.Future[Any]] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-state")

    @property
    def stats(self) -> Counter[str]:
        """Counters: received, accepted, duplicate, stale, invalid.<kind>, silenced,
        inhibited, notifications.sent/failed, retries, connects."""
        return self.pipeline.stats

    # ------------------------------------------------------------------ helpers
    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        self._writes.add(future)
        try:
            return await future
        finally:
            self._writes.discard(future)

    def _write_later(self, fn: Callable[..., Any], *args: Any,
                     then: Callable[[], object] | None = None) -> None:
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        self._writes.add(future)
        future.add_done_callback(lambda done: self._write_done(done, then))

    def _write_done(self, future: asyncio.Future[Any], then: Callable[[], object] | None
                    ) -> None:
        self._writes.discard(future)
        if future.cancelled():
            return
        if future.exception() is not None:  # not acknowledged: the broker sends it again
            log.error("gateway state: %s", future.exception())
        elif then is not None:
            then()

    # ------------------------------------------------------------------ ingest
    def handle(self, topic: str, payload: bytes,
               acknowledge: Callable[[], object] | None = None) -> Ingested:
        """Feed one MQTT message to the pipeline (never raises for bad payloads).

        ``acknowledge`` runs on the loop once the state write this message caused (if
        any) is done; messages are acknowledged in the order they arrived, because every
        write and every acknowledgement goes through the one state-writer thread.
        """
        result = self._ingest(topic, payload)
        if acknowledge is not None:
            self._write_later(_nothing, then=acknowledge)
        return result

    def _ingest(self, topic: str, payload: bytes) -> Ingested:
        result = self.pipeline.ingest(payload)
        if result.outcome.startswith("invalid."):
            kind = result.outcome.split(".", 1)[1]
            if kind not in self._warned:
                self._warned.add(kind)
                log.warning("dropped a malformed alert on %s (%s: %s); further %s errors "
                            "are only counted", topic, kind, result.reason, kind)
        elif result.outcome == "accepted" and result.alert is not None:
            self._write_later(self.state.save_alert, result.alert, self.clock.now())
            self._wake.set()
        return result

    # ------------------------------------------------------------------ run
    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (forever when None).

        Raises:
            BrokerRefusedError: the broker refused the credentials or TLS trust failed.
        """
        stop = stop or asyncio.Event()
        self._check_files()
        tasks = [asyncio.create_task(self._subscribe(), name="gateway-subscriber"),
                 asyncio.create_task(self._flusher(), name="gateway-flusher"),
                 asyncio.create_task(self._refresher(), name="gateway-silences")]
        stopper = asyncio.create_task(stop.wait())
        fatal: BaseException | None = None
        try:
            await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stopper, *tasks, *self._deliveries):
                task.cancel()
            for task in (*tasks, *list(self._deliveries)):
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except BrokerRefusedError as exc:
                    fatal = exc
                except Exception as exc:  # a bug in a task: say it, do not hide it
                    log.error("%s stopped: %r", task.get_name(), exc)
            if self._writes:
                await asyncio.gather(*list(self._writes), return_exceptions=True)
        if fatal is not None:
            raise fatal

    def close(self) -> None:
        """Stop the state-writer thread (idempotent; the state itself is the caller's)."""
        self._executor.shutdown(wait=True)

    def _check_files(self) -> None:
        b = self.config.broker
        for name, path in (("tls_ca", b.tls_ca), ("tls_cert", b.tls_cert),
                           ("tls_key", b.tls_key)):
            if path and not os.path.isfile(os.path.expanduser(path)):
                raise GatewayConfigError(f"broker {name}: no such file {path}")

    def _client(self) -> aiomqtt.Client:
        b = self.config.broker
        host, port, tls, transport, path = b.endpoint
        user, password = b.credentials
        tls_params = None
        if tls or b.tls_ca:
            tls_params = aiomqtt.TLSParameters(
                ca_certs=os.path.expanduser(b.tls_ca) if b.tls_ca else None,
                certfile=os.path.expanduser(b.tls_cert) if b.tls_cert else None,
                keyfile=os.path.expanduser(b.tls_key) if b.tls_key else None)
        session: dict[str, Any] = {"clean_session": False}
        if b.protocol == "5":
            connect = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            connect.SessionExpiryInterval = b.session_expiry_s
            session = {"protocol": aiomqtt.ProtocolVersion.V5, "clean_start": False,
                       "properties": connect}
        client = aiomqtt.Client(host, port, username=user, password=password,
                                identifier=b.client_id, keepalive=b.keepalive_s,
                                tls_params=tls_params,
                                transport="websockets" if transport == "websockets" else "tcp",
                                websocket_path=path, timeout=10.0, **session)
        # aiomqtt has no switch for it: paho acknowledges a QoS 1 message when asked to
        client._client.manual_ack_set(True)
        return client

    async def _subscribe(self) -> None:
        backoff, down_logged = 0.5, False
        b = self.config.broker
        while True:
            try:
                async with self._client() as client:
                    await client.subscribe(b.subscription, qos=1)
                    self.stats["connects"] += 1
                    log.info("subscribed to %s on %s", b.subscription, b.url)
                    self.connected.set()
                    backoff, down_logged = 0.5, False
                    async for message in client.messages:
                        raw = message.payload
                        payload = (bytes(raw) if isinstance(raw, (bytes, bytearray))
                                   else b"" if raw is None else str(raw).encode())
                        self.handle(str(message.topic), payload,
                                    _acknowledger(client, message))
            except aiomqtt.MqttCodeError as exc:
                code = getattr(exc.rc, "value", exc.rc)
                if isinstance(exc, MqttConnectError) and code in _REFUSED:
                    raise BrokerRefusedError(f"broker {b.url} refused the gateway: {exc}"
                                             ) from None
                self._down(exc, down_logged)
            except aiomqtt.MqttError as exc:
                if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                    raise BrokerRefusedError(f"broker {b.url}: TLS certificate not trusted "
                                             f"({exc}); check tls_ca") from None
                self._down(exc, down_logged)
            down_logged = True
            self.connected.clear()
            await self.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, 30.0)

    def _down(self, exc: Exception, already: bool) -> None:
        if not already:
            log.warning("broker %s unreachable (%s); retrying with backoff",
                        self.config.broker.url, exc)

    async def _flusher(self) -> None:
        while True:
            nxt = self.pipeline.next_flush_at()
            delay = None if nxt is None else max(0.0, nxt - self.clock.now())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            for notification in self.pipeline.due():
                task = asyncio.create_task(self._deliver(notification))
                self._deliveries.add(task)
                task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, n: Notification) -> None:
        sink = self.sinks[(n.receiver, n.sink_index)]
        try:
            attempts = await send_with_retry(sink, n, self.config.retry, sleep=self.sleep)
        except SinkError as exc:
            self.pipeline.failed(n)
            log.error("%s: giving up on %s (%d firing, %d resolved): %s", sink.name,
                      n.group_key, len(n.firing), len(n.resolved), exc)
            return
        self.stats["retries"] += attempts - 1
        entry = self.pipeline.sent(n)
        log.info("%s: sent %s (%d firing, %d resolved)", sink.name, n.group_key,
                 len(n.firing), len(n.resolved))
        await self._in_thread(self.state.record, n, entry)

    async def _refresher(self) -> None:
        while True:
            await asyncio.sleep(self.silence_refresh_s)
            now = self.clock.now()
            silences = await self._in_thread(self.state.silences, now)
            self.pipeline.set_silences([s for s in silences if s.ends_at > now])
