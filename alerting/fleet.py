"""The fleet view: every monitor's status, digests and alerts from MQTT, merged.

:class:`FleetState` is pure (no I/O): it takes messages of ``<root>/+/status``,
``<root>/+/+/digest`` and ``<root>/+/+/alert`` and answers with a plain snapshot: the
hosts with their state (online/offline from the retained status and the last will) and
when each was last heard from; fleet-wide quantiles per (profile, stage, phase, device
kind) merged from every host's digests of the last ``window_s`` seconds; the hosts
furthest above the fleet's p99; the alerts of every host. :func:`follow_fleet` feeds it
from a broker. ``prism fleet`` prints its snapshots.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from alerting.config import BrokerConfig
from alerting.digests import DigestEntry, decode, merge_entries
from alerting.schema import Alert, AlertSchemaError

QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999))
BACKOFF_MAX_S = 5.0


@dataclass
class _Host:
    state: str = "unknown"
    """``online`` | ``offline`` (from its retained status or last will) | ``unknown``."""
    reason: str = ""
    status_at: str = ""
    last_seen: float = 0.0
    targets: set[str] = field(default_factory=set)
    digests: deque[tuple[str, DigestEntry]] = field(default_factory=deque)
    """(profile, entry) received, oldest first."""
    firing: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Alerts firing now, by fingerprint."""


class FleetState:
    """What ``prism fleet`` knows about the fleet (see the module docstring).

    Args:
        topic_root: the monitors' topic root (``latencyprism/v1``).
        window_s: how far back (wall clock of the windows' starts) quantiles merge.
        keep_alerts: alerts kept for the snapshot, newest last.
        top: outlier hosts listed.
        clock: epoch seconds.
    """

    def __init__(self, topic_root: str = "latencyprism/v1", *, window_s: float = 60.0,
                 keep_alerts: int = 100, top: int = 5,
                 clock: Callable[[], float] = time.time) -> None:
        self.root = topic_root.rstrip("/")
        self.window_s = window_s
        self.top = top
        self.clock = clock
        self.hosts: dict[str, _Host] = {}
        self.alerts: deque[dict[str, Any]] = deque(maxlen=keep_alerts)
        self.rejected = 0
        """Messages that did not decode (bad JSON, unknown schema...)."""
        self.last_error = ""

    def ingest(self, topic: str, payload: bytes) -> None:
        """Take one message; a bad one is counted in :attr:`rejected`, never raised."""
        levels = topic[len(self.root) + 1:].split("/") if topic.startswith(
            self.root + "/") else []
        now = self.clock()
        try:
            if len(levels) == 2 and levels[1] == "status":
                if payload:  # an empty retained message clears a status
                    self._status(levels[0], payload, now)
            elif len(levels) == 3 and levels[2] == "digest":
                self._digest(levels[0], levels[1], payload, now)
            elif len(levels) == 3 and levels[2] == "alert":
                self._alert(levels[0], levels[1], payload, now)
        except AlertSchemaError as exc:
            self.rejected += 1
            self.last_error = f"{topic}: {exc}"

    def _host(self, name: str) -> _Host:
        host = self.hosts.get(name)
        if host is None:
            host = self.hosts[name] = _Host()
        return host

    def _status(self, name: str, payload: bytes, now: float) -> None:
        doc = parse_status(payload)
        host = self._host(name)
        host.state, host.reason, host.status_at = doc["state"], doc.get("reason", ""), \
            doc.get("at", "")
        host.last_seen = max(host.last_seen, now)

    def _digest(self, name: str, target: str, payload: bytes, now: float) -> None:
        message = decode(payload)
        host = self._host(name)
        host.last_seen = now
        if host.state == "unknown":  # its retained status comes first, normally
            host.state = "online"
        host.targets.add(target)
        for entry in message.entries:
            host.digests.append((message.profile, entry))

    def _alert(self, name: str, target: str, payload: bytes, now: float) -> None:
        alert = Alert.from_json(payload)
        host = self._host(name)
        host.last_seen = now
        host.targets.add(target)
        doc = {"host": alert.host, "target": target, "status": alert.status,
               "severity": alert.severity, "stage": alert.stage, "phase": alert.phase,
               "device": alert.device, "fingerprint": alert.fingerprint,
               "summary": alert.summary, "detected_at": alert.detected_at,
               "received_at": now}
        self.alerts.append(doc)
        if alert.status == "firing":
            host.firing[alert.fingerprint] = doc
        else:
            host.firing.pop(alert.fingerprint, None)

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        for host in self.hosts.values():
            while host.digests and host.digests[0][1].start < horizon:
                host.digests.popleft()

    def snapshot(self) -> dict[str, Any]:
        """Hosts, fleet quantiles, outlier hosts and alerts now (a JSON-ready dict)."""
        now = self.clock()
        self._prune(now)
        groups: dict[tuple[str, str, str, str], dict[str, list[DigestEntry]]] = {}
        for name, host in self.hosts.items():
            for profile, e in host.digests:
                key = (profile, e.stage, e.phase, e.device_kind)
                groups.setdefault(key, {}).setdefault(name, []).append(e)
        fleet = []
        outliers = []
        for (profile, stage, phase, kind), by_host in sorted(groups.items()):
            entries = [e for es in by_host.values() for e in es]
            merged = merge_entries(entries)
            if merged is None:
                continue
            row: dict[str, Any] = {"profile": profile, "stage": stage, "phase": phase,
                                   "device_kind": kind, "hosts": len(by_host),
                                   "count": sum(e.count for e in entries)}
            row.update({name: merged.quantile(q) for name, q in QUANTILES})
            fleet.append(row)
            if row["p99"] <= 0:
                continue
            for name, es in by_host.items():
                mine = merge_entries(es)
                if mine is not None:
                    p99 = mine.quantile(0.99)
                    outliers.append({"host": name, "profile": profile, "stage": stage,
                                     "phase": phase, "device_kind": kind, "p99": p99,
                                     "fleet_p99": row["p99"], "ratio": p99 / row["p99"]})
        outliers.sort(key=lambda o: -o["ratio"])
        hosts = [{"host": name, "state": h.state, "reason": h.reason,
                  "status_at": h.status_at,
                  "last_seen_s_ago": round(now - h.last_seen, 3) if h.last_seen else None,
                  "targets": sorted(h.targets), "firing": len(h.firing)}
                 for name, h in sorted(self.hosts.items())]
        return {"at": now, "window_s": self.window_s, "hosts": hosts, "fleet": fleet,
                "outliers": outliers[:self.top], "alerts": list(self.alerts),
                "rejected": self.rejected, "last_error": self.last_error}


def parse_status(payload: bytes) -> dict[str, Any]:
    """A monitor's status message (``online``, or ``offline`` from its last will or a
    clean stop); :class:`AlertSchemaError` when it is not one."""
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AlertSchemaError(f"status is not JSON: {exc}", "json") from None
    if not isinstance(doc, dict) or doc.get("state") not in ("online", "offline"):
        raise AlertSchemaError("status needs \"state\": \"online\" or \"offline\"")
    return doc


async def follow_fleet(config: BrokerConfig, state: FleetState, stop: asyncio.Event,
                       subscribed: asyncio.Event | None = None,
                       on_error: Callable[[str], None] | None = None) -> None:
    """Subscribe to every monitor's status, digests and alerts and feed ``state`` until
    ``stop``; reconnects with capped backoff (each failure goes to ``on_error``)."""
    from alerting.publisher import _tls_context  # one TLS setup for every client

    _, host, port = config.endpoint
    root = config.topic_root
    backoff = 0.1
    while not stop.is_set():
        client = aiomqtt.Client(
            host, port, username=config.username, password=config.password,
            identifier=config.client_id, keepalive=config.keepalive_s,
            tls_context=_tls_context(config) if config.uses_tls else None)
        try:
            async with client:
                for topic in (f"{root}/+/status", f"{root}/+/+/digest", f"{root}/+/+/alert"):
                    await client.subscribe(topic, qos=1)
                backoff = 0.1
                if subscribed is not None:
                    subscribed.set()
                reader = asyncio.ensure_future(_read(client, state))
                waiter = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in (reader, waiter):
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                            await task
                if not reader.cancelled():
                    reader.result()  # the connection dropped: MqttError, reconnect
        except aiomqtt.MqttError as exc:
            if on_error is not None:
                on_error(f"broker {config.url}: {exc}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(BACKOFF_MAX_S, backoff * 2)


async def _read(client: aiomqtt.Client, state: FleetState) -> None:
    async for message in client.messages:
        payload = message.payload
        if isinstance(payload, (bytes, bytearray)):
            state.ingest(str(message.topic), bytes(payload))
