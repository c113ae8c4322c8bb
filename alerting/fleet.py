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
from fastdigest import TDigest, merge_all

from alerting.config import BrokerConfig
from alerting.digests import DigestEntry, decode, merge_entries
from alerting.schema import Alert, AlertSchemaError

QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999))
BACKOFF_MAX_S = 5.0
MERGE_CHUNK = 32
"""Digests merged per pass before the partial merges are merged (see :func:`_chunked`)."""


Group = tuple[str, str, str, str]
"""(profile, stage, phase, device kind): what fleet quantiles are merged over."""


@dataclass
class _Series:
    """One host's entries of one group in the window, with the running sum of their own
    p99s (which ranks outlier candidates without merging)."""

    entries: deque[DigestEntry] = field(default_factory=deque)
    p99s: deque[float] = field(default_factory=deque)
    p99_sum: float = 0.0


@dataclass
class _Bucket:
    """Every host's entries of one group whose window started in one wall-clock second:
    merged once (``merged``), later arrivals folded in at the next snapshot."""

    pending: list[TDigest] = field(default_factory=list)
    merged: TDigest | None = None
    count: int = 0


@dataclass
class _Host:
    state: str = "unknown"
    """``online`` | ``offline`` (from its retained status or last will) | ``unknown``."""
    reason: str = ""
    status_at: str = ""
    last_seen: float = 0.0
    targets: set[str] = field(default_factory=set)
    digests: deque[tuple[str, str, DigestEntry]] = field(default_factory=deque)
    """(profile, target, entry) received, oldest first (for one host's drill-down)."""
    series: dict[Group, _Series] = field(default_factory=dict)
    firing: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Alerts firing now, by fingerprint."""


@dataclass(frozen=True)
class MergedWindow:
    """The fleet's merge of one group over one wall-clock second (for its history)."""

    group: Group
    start: int
    """Epoch second the windows started in."""
    digest: TDigest
    count: int
    sum_ms: float
    min_ms: float
    max_ms: float


class FleetState:
    """What ``prism fleet`` knows about the fleet (see the module docstring).

    Each entry is merged into its group's one-second bucket once; a snapshot merges the
    window's buckets (not every host's entries again), and ranks every (host, group) by
    the mean of its entries' own p99s over the group's fleet p99, merging exactly only
    the best ``top`` × 2.

    Args:
        topic_root: the monitors' topic root (``latencyprism/v1``).
        window_s: how far back (wall clock of the windows' starts) quantiles merge.
        keep_alerts: alerts kept for the snapshot, newest last.
        top: outlier hosts listed.
        clock: epoch seconds.
        keep_lags: close-to-ingest lags kept for the snapshot's ``lag_s``.
    """

    def __init__(self, topic_root: str = "latencyprism/v1", *, window_s: float = 60.0,
                 keep_alerts: int = 100, top: int = 5,
                 clock: Callable[[], float] = time.time, keep_lags: int = 20_000) -> None:
        self.root = topic_root.rstrip("/")
        self.window_s = window_s
        self.top = top
        self.clock = clock
        self.hosts: dict[str, _Host] = {}
        self.alerts: deque[dict[str, Any]] = deque(maxlen=keep_alerts)
        self.rejected = 0
        """Messages that did not decode (bad JSON, unknown schema...)."""
        self.last_error = ""
        self.messages = 0
        """Messages taken (status, digest and alert)."""
        self.lags: deque[float] = deque(maxlen=keep_lags)
        """Seconds from each received window's close (sender's wall clock) to its ingest."""
        self.snapshot_s = 0.0
        """Wall time the last snapshot took to merge."""
        self._buckets: dict[Group, dict[int, _Bucket]] = {}
        self._unsaved: list[tuple[Group, DigestEntry]] = []

    def ingest(self, topic: str, payload: bytes) -> None:
        """Take one message; a bad one is counted in :attr:`rejected`, never raised."""
        levels = topic[len(self.root) + 1:].split("/") if topic.startswith(
            self.root + "/") else []
        now = self.clock()
        self.messages += 1
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
        horizon = now - self.window_s
        for entry in message.entries:
            self.lags.append(now - entry.start - (entry.end_ns - entry.start_ns) / 1e9)
            host.digests.append((message.profile, target, entry))
            if entry.start < horizon or entry.digest.is_empty():
                continue
            group = (message.profile, entry.stage, entry.phase, entry.device_kind)
            series = host.series.get(group)
            if series is None:
                series = host.series[group] = _Series()
            p99 = entry.digest.quantile(0.99)
            series.entries.append(entry)
            series.p99s.append(p99)
            series.p99_sum += p99
            bucket = self._buckets.setdefault(group, {}).setdefault(int(entry.start), _Bucket())
            bucket.pending.append(entry.digest)
            bucket.count += entry.count
            self._unsaved.append((group, entry))

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
            while host.digests and host.digests[0][2].start < horizon:
                host.digests.popleft()
            for group in [g for g, s in host.series.items() if _prune_series(s, horizon)]:
                del host.series[group]
        for group, buckets in list(self._buckets.items()):
            for second in [s for s in buckets if s + 1 <= horizon]:
                del buckets[second]
            if not buckets:
                del self._buckets[group]

    def _merged(self, group: Group) -> tuple[TDigest | None, int]:
        """The group's digest over the window and its count (buckets merged once)."""
        digests, count = [], 0
        for bucket in self._buckets.get(group, {}).values():
            if bucket.pending:
                base = [bucket.merged] if bucket.merged is not None else []
                bucket.merged = _merge([*base, *_chunked(bucket.pending)])
                bucket.pending = []
            if bucket.merged is not None:
                digests.append(bucket.merged)
                count += bucket.count
        return _merge(digests), count

    def snapshot(self) -> dict[str, Any]:
        """Hosts, fleet quantiles, outlier hosts and alerts now (a JSON-ready dict)."""
        started = time.perf_counter()
        now = self.clock()
        self._prune(now)
        members: dict[Group, list[tuple[str, _Series]]] = {}
        for name, host in self.hosts.items():
            for group, series in host.series.items():
                members.setdefault(group, []).append((name, series))
        fleet = []
        candidates: list[tuple[float, str, _Series, dict[str, Any]]] = []
        for group in sorted(self._buckets):
            merged, count = self._merged(group)
            if merged is None:
                continue
            profile, stage, phase, kind = group
            row: dict[str, Any] = {"profile": profile, "stage": stage, "phase": phase,
                                   "device_kind": kind, "hosts": len(members.get(group, [])),
                                   "count": count}
            row.update({name: merged.quantile(q) for name, q in QUANTILES})
            fleet.append(row)
            if row["p99"] > 0:
                candidates.extend((series.p99_sum / len(series.p99s) / row["p99"], name,
                                   series, row) for name, series in members.get(group, [])
                                  if series.p99s)
        # the best candidates by their entries' mean p99, then each one's exact p99 over
        # its merged entries (ties at the cut are cut: the ranking is the estimate's)
        candidates.sort(key=lambda c: -c[0])
        outliers = []
        for _, name, series, row in candidates[:2 * self.top]:
            mine = merge_entries(series.entries)
            if mine is not None:
                p99 = mine.quantile(0.99)
                outliers.append({"host": name, "profile": row["profile"], "stage": row["stage"],
                                 "phase": row["phase"], "device_kind": row["device_kind"],
                                 "p99": p99, "fleet_p99": row["p99"],
                                 "ratio": p99 / row["p99"]})
        outliers.sort(key=lambda o: -o["ratio"])
        hosts = [{"host": name, "state": h.state, "reason": h.reason,
                  "status_at": h.status_at,
                  "last_seen_s_ago": round(now - h.last_seen, 3) if h.last_seen else None,
                  "targets": sorted(h.targets), "firing": len(h.firing)}
                 for name, h in sorted(self.hosts.items())]
        self.snapshot_s = time.perf_counter() - started
        return {"at": now, "window_s": self.window_s, "hosts": hosts, "fleet": fleet,
                "outliers": outliers[:self.top], "alerts": list(self.alerts),
                "rejected": self.rejected, "last_error": self.last_error,
                "messages": self.messages, "lag_s": _lag_stats(self.lags),
                "snapshot_s": round(self.snapshot_s, 6)}

    def host_series(self, name: str) -> list[dict[str, Any]]:
        """One host's drill-down: per (target, stage, phase, device), its windows' count
        and quantiles merged over the window (empty for an unknown host)."""
        host = self.hosts.get(name)
        if host is None:
            return []
        self._prune(self.clock())
        by_key: dict[tuple[str, str, str, str], list[DigestEntry]] = {}
        for _, target, e in host.digests:
            by_key.setdefault((target, e.stage, e.phase, e.device), []).append(e)
        rows = []
        for (target, stage, phase, device), entries in sorted(by_key.items()):
            merged = merge_entries(entries)
            if merged is None:
                continue
            row: dict[str, Any] = {"target": target, "stage": stage, "phase": phase,
                                   "device": device, "count": sum(e.count for e in entries)}
            row.update({q_name: merged.quantile(q) for q_name, q in QUANTILES})
            rows.append(row)
        return rows

    def drain_windows(self) -> list[MergedWindow]:
        """The entries received since the last drain, merged per (group, start second):
        what the fleet's history stores. A window arriving after its second was drained
        gives a second row for that second; history queries merge them."""
        pending, self._unsaved = self._unsaved, []
        by_second: dict[tuple[Group, int], list[DigestEntry]] = {}
        for group, entry in pending:
            by_second.setdefault((group, int(entry.start)), []).append(entry)
        out = []
        for (group, second), entries in sorted(by_second.items()):
            merged = merge_entries(entries)
            if merged is None:
                continue
            out.append(MergedWindow(group, second, merged, sum(e.count for e in entries),
                                    sum(e.sum_ms for e in entries),
                                    min(e.min_ms for e in entries),
                                    max(e.max_ms for e in entries)))
        return out


def _prune_series(series: _Series, horizon: float) -> bool:
    """Drop entries that started before ``horizon``; True when none is left."""
    while series.entries and series.entries[0].start < horizon:
        series.entries.popleft()
        series.p99_sum -= series.p99s.popleft()
    return not series.entries


def _chunked(digests: list[TDigest], size: int = MERGE_CHUNK) -> list[TDigest]:
    """Digests merged in chunks of ``size``: for 1,000 digests of 200 centroids, chunks
    of 32 then their merge took about half the time of one pass (fastdigest 0.x)."""
    if len(digests) <= size:
        return digests
    return [merge_all(digests[i:i + size]) for i in range(0, len(digests), size)]


def _merge(digests: list[TDigest]) -> TDigest | None:
    if not digests:
        return None
    return digests[0] if len(digests) == 1 else merge_all(digests)


def _lag_stats(lags: deque[float]) -> dict[str, Any]:
    """p50/p99/max of the kept close-to-ingest lags (seconds), and how many."""
    if not lags:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    ordered = sorted(lags)
    n = len(ordered)
    return {"n": n, "p50": round(ordered[n // 2], 4),
            "p99": round(ordered[min(n - 1, int(n * 0.99))], 4), "max": round(ordered[-1], 4)}


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
