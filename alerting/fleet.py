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
import heapq
import json
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import numpy as np
from fastdigest import TDigest

from alerting.config import BrokerConfig
from alerting.digests import DigestEntry, decode, digest_from_centroids
from alerting.schema import Alert, AlertSchemaError

QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999))
BACKOFF_MAX_S = 5.0
BIN_RATIO = 1.002
"""Width of one bin of the fleet's merge: a bin holds values within 0.2 % of each other
(its mean is kept exactly, so quantiles interpolate between bin means)."""
BIN_LOW_MS = 1e-6
"""Values at or below 1 ns share the first bin; values above ~3 h the last."""
N_BINS = math.ceil(math.log(1e7 / BIN_LOW_MS) / math.log(BIN_RATIO)) + 1
_LOG_RATIO = math.log(BIN_RATIO)
_LOW32 = np.float32(BIN_LOW_MS)
_INDEX_SCALE = np.float32(1 / _LOG_RATIO)
_INDEX_OFFSET = np.float32(math.log(BIN_LOW_MS) / _LOG_RATIO)
HISTORY_CENTROIDS = 1000
"""Centroids of a history row's digest (fastdigest's default compression)."""
FOLD_BUCKETS_PER_STEP = 2
"""(group, second) buckets :meth:`FleetState.fold_steps` folds between two yields: a
consumer on an event loop looks at the broker's messages that often."""


Group = tuple[str, str, str, str]
"""(profile, stage, phase, device kind): what fleet quantiles are merged over."""
Kept = tuple[float, np.ndarray, np.ndarray]
"""A window kept for the window's span: (wall-clock start, centroid means, weights).

What the fleet keeps of a message is plain tuples of strings, numbers and arrays:
CPython stops tracking such a tuple in its cycle collector, while a window kept as a
:class:`DigestEntry` (a class instance, always tracked) made ~1M tracked objects at
1,000 hosts, and each full collection walked them all in ~0.8 s, stalling the ingest
loop (measured by ``bench/fleet_scale.py``'s lag)."""
HostWindow = tuple[float, str, str, str, str, str, int, np.ndarray, np.ndarray]
"""One host's window for its drill-down: (start, profile, target, stage, phase, device,
count, means, weights)."""


@dataclass(frozen=True)
class Bins:
    """Centroids summed into fixed log-spaced bins: ``index`` ascending, each bin's
    total ``weight`` and the sum of its values (``weighted``, so means stay exact)."""

    index: np.ndarray
    weight: np.ndarray
    weighted: np.ndarray

    def quantiles(self, qs: tuple[float, ...]) -> list[float]:
        """The quantiles ``qs``: the value at each rank, interpolated between the bins'
        means placed at their middle rank (as a t-digest does between centroids)."""
        means = self.weighted / self.weight
        cum = np.cumsum(self.weight)
        ranks = np.asarray(qs) * cum[-1]
        return [float(v) for v in np.interp(ranks, cum - self.weight / 2, means)]

    def digest(self, count: int, sum_ms: float, min_ms: float, max_ms: float) -> TDigest:
        """A t-digest of the bins (one centroid a bin, compressed to
        :data:`HISTORY_CENTROIDS`): what history rows store."""
        return digest_from_centroids(self.weighted / self.weight, self.weight, count=count,
                                     sum_ms=sum_ms, min_ms=min_ms, max_ms=max_ms,
                                     max_centroids=HISTORY_CENTROIDS)


def bin_centroids(means: np.ndarray, weights: np.ndarray) -> Bins:
    """Sum centroids into the fleet's bins (vectorised: no sort, one pass)."""
    values = np.asarray(means)
    # float32 logs (schema 2 sends float32 means): an index off by a hair moves a value
    # to the next bin, whose mean stays exact
    index = (np.log(np.maximum(values.astype(np.float32, copy=False), _LOW32))
             * _INDEX_SCALE - _INDEX_OFFSET).astype(np.intp)
    np.clip(index, 0, N_BINS - 1, out=index)
    w = np.asarray(weights, dtype=np.float64)
    weight = np.bincount(index, w, minlength=N_BINS)
    weighted = np.bincount(index, w * values, minlength=N_BINS)
    nz = np.flatnonzero(weight)
    return Bins(nz, weight[nz], weighted[nz])


def merge_bins(windows: list[Kept]) -> Bins | None:
    """Every value of ``windows`` (``(start, means, weights)``) in bins; None when
    there is none."""
    if not windows:
        return None
    return bin_centroids(np.concatenate([w[1] for w in windows]),
                         np.concatenate([w[2] for w in windows]))


@dataclass
class _Series:
    """One host's per-window p99s of one group in the window (oldest first) and their
    running sum: it ranks outlier candidates without merging."""

    p99s: deque[tuple[float, float]] = field(default_factory=deque)
    """(window start, that window's p99)."""
    p99_sum: float = 0.0
    entries: deque[Kept] = field(default_factory=deque)


@dataclass
class _Bucket:
    """Every host's entries of one group whose window started in one wall-clock second:
    entries wait in ``pending`` until the next fold, which bins them all at once and
    adds them to the group's window totals (``parts`` remember what was added, to take
    it out when the second leaves the window)."""

    pending: list[tuple[_Series, DigestEntry]] = field(default_factory=list)
    parts: list[Bins] = field(default_factory=list)
    count: int = 0


@dataclass
class _Totals:
    """A group's bins summed over the window (dense, one slot a bin)."""

    weight: np.ndarray = field(default_factory=lambda: np.zeros(N_BINS))
    weighted: np.ndarray = field(default_factory=lambda: np.zeros(N_BINS))
    buckets: dict[int, _Bucket] = field(default_factory=dict)

    def add(self, part: Bins, sign: float = 1.0) -> None:
        """Add (or, with ``sign`` -1, take out) one fold's bins."""
        self.weight[part.index] += sign * part.weight
        self.weighted[part.index] += sign * part.weighted
        if sign < 0:  # a bin emptied holds nothing, not a rounding residue
            self.weighted[part.index[self.weight[part.index] <= 0]] = 0.0

    def bins(self) -> Bins | None:
        """The window's non-empty bins (None when empty)."""
        nz = np.flatnonzero(self.weight > 0)
        return Bins(nz, self.weight[nz], self.weighted[nz]) if nz.size else None


@dataclass(frozen=True)
class _Unsaved:
    """One fold's bins of one (group, second), with their entries' totals: a history
    row not yet written."""

    group: Group
    second: int
    bins: Bins
    count: int
    sum_ms: float
    min_ms: float
    max_ms: float


@dataclass
class _Host:
    state: str = "unknown"
    """``online`` | ``offline`` (from its retained status or last will) | ``unknown``."""
    reason: str = ""
    status_at: str = ""
    last_seen: float = 0.0
    targets: set[str] = field(default_factory=set)
    digests: deque[HostWindow] = field(default_factory=deque)
    """Windows received, oldest first (for one host's drill-down)."""
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

    Ingest only decodes a message and files its entries (no merge). A fold, at each
    snapshot and history drain, bins every entry received since the last one into
    log-spaced bins (0.2 % wide, each keeping its exact mean) in one vectorised pass per
    (group, second) and adds them to the group's window totals; a snapshot's quantiles
    are read off those totals. So the merge costs a few numpy passes over the centroids
    received, not a sort per snapshot. Outliers are ranked by the mean of each (host,
    group)'s per-window p99 (computed in the fold) over the fleet's p99, and only the
    best ``top`` × 2 are merged exactly.

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
        """Wall time the last snapshot took (fold and quantiles)."""
        self._groups: dict[Group, _Totals] = {}
        self._dirty: set[tuple[Group, int]] = set()
        """(group, second) buckets with pending entries."""
        self._unsaved: list[_Unsaved] = []

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
        profile = message.profile
        self.lags.extend(now - e.start - (e.end_ns - e.start_ns) / 1e9 for e in message.entries)
        host.digests.extend((e.start, profile, target, e.stage, e.phase, e.device, e.count,
                             e.means, e.weights) for e in message.entries)
        for entry in message.entries:
            if entry.start < horizon:
                continue
            group = (profile, entry.stage, entry.phase, entry.device.partition(":")[0])
            series = host.series.get(group)
            if series is None:
                series = host.series[group] = _Series()
            series.entries.append((entry.start, entry.means, entry.weights))
            totals = self._groups.get(group)
            if totals is None:
                totals = self._groups[group] = _Totals()
            second = int(entry.start)
            bucket = totals.buckets.get(second)
            if bucket is None:
                bucket = totals.buckets[second] = _Bucket()
            if not bucket.pending:
                self._dirty.add((group, second))
            bucket.pending.append((series, entry))
            bucket.count += entry.count

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

    def fold_steps(self, buckets_per_step: int = FOLD_BUCKETS_PER_STEP) -> Iterator[None]:
        """:meth:`fold` ``buckets_per_step`` (group, second) buckets at a time, yielding
        between them, so a caller on an event loop can take messages meanwhile. Only
        the buckets waiting when it starts are folded (entries arriving meanwhile wait
        for the next fold: folding them piecemeal costs a pass per piece)."""
        dirty, self._dirty = list(self._dirty), set()
        for first in range(0, len(dirty), buckets_per_step):
            self._fold(dirty[first:first + buckets_per_step])
            yield

    def fold(self) -> None:
        """Bin every entry received since the last fold into its group's window totals
        (one vectorised pass per (group, second)), noting each entry's p99 for the
        outlier ranking and the bins for the history."""
        dirty, self._dirty = self._dirty, set()
        self._fold(dirty)

    def _fold(self, dirty: Iterable[tuple[Group, int]]) -> None:
        for group, second in dirty:
            totals = self._groups.get(group)
            bucket = totals.buckets.get(second) if totals is not None else None
            if totals is None or bucket is None or not bucket.pending:
                continue
            pending, bucket.pending = bucket.pending, []
            entries = [e for _, e in pending]
            means = np.concatenate([e.means for e in entries])
            weights = np.concatenate([e.weights for e in entries])
            part = bin_centroids(means, weights)
            totals.add(part)
            bucket.parts.append(part)
            # each entry's own p99: the centroid holding its 99th-percentile rank
            cum = np.cumsum(weights, dtype=np.float64)
            ends = np.cumsum([e.means.size for e in entries])
            before = np.concatenate(([0.0], cum[ends[:-1] - 1]))
            mass = cum[ends - 1] - before
            at = np.minimum(np.searchsorted(cum, before + 0.99 * mass), ends - 1)
            for (series, entry), p99 in zip(pending, means[at].tolist(), strict=True):
                series.p99s.append((entry.start, p99))
                series.p99_sum += p99
            self._unsaved.append(_Unsaved(
                group, second, part, sum(e.count for e in entries),
                sum(e.sum_ms for e in entries), min(e.min_ms for e in entries),
                max(e.max_ms for e in entries)))

    def prune_steps(self, now: float, hosts_per_step: int = 100) -> Iterator[None]:
        """Drop what left the window, ``hosts_per_step`` hosts at a time (yielding
        between them, so a caller on an event loop can take messages meanwhile); a
        snapshot then finds little left to drop."""
        horizon = now - self.window_s
        names = list(self.hosts)
        for first in range(0, len(names), hosts_per_step):
            for name in names[first:first + hosts_per_step]:
                host = self.hosts.get(name)
                if host is not None:
                    _prune_host(host, horizon)
            yield

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        for host in self.hosts.values():
            _prune_host(host, horizon)
        for group, totals in list(self._groups.items()):
            for second in [s for s in totals.buckets if s + 1 <= horizon]:
                for part in totals.buckets.pop(second).parts:
                    totals.add(part, -1.0)
            if not totals.buckets:
                del self._groups[group]

    def snapshot(self) -> dict[str, Any]:
        """Hosts, fleet quantiles, outlier hosts and alerts now (a JSON-ready dict)."""
        started = time.perf_counter()
        now = self.clock()
        self.fold()
        self._prune(now)
        members: dict[Group, list[tuple[str, _Series]]] = {}
        for name, host in self.hosts.items():
            for group, series in host.series.items():
                members.setdefault(group, []).append((name, series))
        fleet = []
        candidates: list[tuple[float, str, _Series, dict[str, Any]]] = []
        best = 2 * self.top
        for group in sorted(self._groups):
            totals = self._groups[group]
            bins = totals.bins()
            if bins is None:
                continue
            profile, stage, phase, kind = group
            row: dict[str, Any] = {"profile": profile, "stage": stage, "phase": phase,
                                   "device_kind": kind, "hosts": len(members.get(group, [])),
                                   "count": sum(b.count for b in totals.buckets.values())}
            row.update(zip((n for n, _ in QUANTILES),
                           bins.quantiles(tuple(q for _, q in QUANTILES)), strict=True))
            fleet.append(row)
            if row["p99"] > 0:  # this group's best (host, series) by mean window p99
                ranked = heapq.nlargest(best, ((s.p99_sum / len(s.p99s), name, s)
                                               for name, s in members.get(group, [])
                                               if s.p99s), key=lambda c: c[0])
                candidates.extend((p99 / row["p99"], name, s, row) for p99, name, s in ranked)
        # the best candidates by their windows' mean p99, then each one's exact p99 over
        # its entries (ties at the cut are cut: the ranking is the estimate's)
        candidates.sort(key=lambda c: -c[0])
        outliers = []
        for _, name, series, row in candidates[:best]:
            mine = merge_bins(list(series.entries))
            if mine is not None:
                p99 = mine.quantiles((0.99,))[0]
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
        by_key: dict[tuple[str, str, str, str], list[HostWindow]] = {}
        for w in host.digests:
            by_key.setdefault((w[2], w[3], w[4], w[5]), []).append(w)
        rows = []
        for (target, stage, phase, device), windows in sorted(by_key.items()):
            merged = merge_bins([(w[0], w[7], w[8]) for w in windows])
            if merged is None:
                continue
            row: dict[str, Any] = {"target": target, "stage": stage, "phase": phase,
                                   "device": device, "count": sum(w[6] for w in windows)}
            row.update(zip((n for n, _ in QUANTILES),
                           merged.quantiles(tuple(q for _, q in QUANTILES)), strict=True))
            rows.append(row)
        return rows

    def drain_windows(self) -> list[MergedWindow]:
        """The entries received since the last drain, merged per (group, start second):
        what the fleet's history stores. A window arriving after its second was drained
        gives a second row for that second; history queries merge them."""
        self.fold()
        pending, self._unsaved = self._unsaved, []
        by_second: dict[tuple[Group, int], list[_Unsaved]] = {}
        for part in pending:
            by_second.setdefault((part.group, part.second), []).append(part)
        out = []
        for (group, second), parts in sorted(by_second.items()):
            bins = parts[0].bins if len(parts) == 1 else _sum_bins([p.bins for p in parts])
            count, sum_ms = sum(p.count for p in parts), sum(p.sum_ms for p in parts)
            min_ms, max_ms = min(p.min_ms for p in parts), max(p.max_ms for p in parts)
            out.append(MergedWindow(group, second, bins.digest(count, sum_ms, min_ms, max_ms),
                                    count, sum_ms, min_ms, max_ms))
        return out


def _sum_bins(parts: list[Bins]) -> Bins:
    index = np.concatenate([p.index for p in parts])
    weight = np.bincount(index, np.concatenate([p.weight for p in parts]))
    weighted = np.bincount(index, np.concatenate([p.weighted for p in parts]))
    nz = np.flatnonzero(weight)
    return Bins(nz, weight[nz], weighted[nz])


def _prune_host(host: _Host, horizon: float) -> None:
    """Drop one host's windows that started before ``horizon``."""
    while host.digests and host.digests[0][0] < horizon:
        host.digests.popleft()
    aged = [g for g, s in host.series.items()
            if s.entries[0][0] < horizon and _prune_series(s, horizon)]
    for group in aged:
        del host.series[group]


def _prune_series(series: _Series, horizon: float) -> bool:
    """Drop entries and p99s of windows that started before ``horizon``; True when
    none is left."""
    while series.entries and series.entries[0][0] < horizon:
        series.entries.popleft()
    while series.p99s and series.p99s[0][0] < horizon:
        series.p99_sum -= series.p99s.popleft()[1]
    if not series.p99s:
        series.p99_sum = 0.0  # no rounding residue left behind
    return not series.entries


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
