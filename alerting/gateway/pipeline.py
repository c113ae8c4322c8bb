"""The gateway's stages, pure and driven by an injected clock (docs/architecture.md §Rules 7).

In Alertmanager's spirit, every alert goes: validate → dedup (fingerprint + status) →
route (tree with ``continue``) → group (``group_wait``, ``group_interval``,
``repeat_interval``); when a group is due it is flushed through inhibit → silence →
notification-log dedup, which yields :class:`Notification` objects for the service to
send (with retry) and log. Inhibition and silences are applied at every flush rather
than once at arrival, so a silence added while an alert fires also mutes its repeats, and
an expired one unmutes it. Nothing here does I/O: the service persists what
:meth:`Pipeline.sent` records and feeds silences read from the state database.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from alerting.gateway.config import GatewayConfig, InhibitRule, RouteConfig
from alerting.gateway.matchers import Matcher, alert_value, matches_all
from alerting.schema import Alert, AlertSchemaError, parse_rfc3339

log = logging.getLogger("alerting.gateway")


class Clock(Protocol):
    """Wall-clock time in epoch seconds (persisted state outlives the process)."""

    def now(self) -> float:
        """Current time, seconds since the epoch."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        """``time.time()``."""
        return time.time()


class ManualClock:
    """A clock that moves only when told to (exact tests of timing rules)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.t = start

    def now(self) -> float:
        """The current manual time."""
        return self.t

    def advance(self, seconds: float) -> float:
        """Move forward by ``seconds``; returns the new time."""
        self.t += seconds
        return self.t


@dataclass(frozen=True)
class Silence:
    """Mutes alerts matching every matcher between ``starts_at`` and ``ends_at``."""

    id: str
    matchers: tuple[Matcher, ...]
    starts_at: float
    ends_at: float
    created_by: str = ""
    comment: str = ""

    def active(self, now: float) -> bool:
        """Whether the silence is in force at ``now``."""
        return self.starts_at <= now < self.ends_at

    def mutes(self, alert: Alert, now: float) -> bool:
        """Whether it mutes ``alert`` at ``now``."""
        return self.active(now) and matches_all(self.matchers, alert)

    def state(self, now: float) -> str:
        """``pending``, ``active`` or ``expired``."""
        if now < self.starts_at:
            return "pending"
        return "active" if now < self.ends_at else "expired"


@dataclass(frozen=True)
class NflogEntry:
    """What was last sent to one sink of one receiver for one group, and when."""

    firing: frozenset[str]
    resolved: frozenset[str]
    sent_at: float


NflogKey = tuple[str, str, int]
"""(group key, receiver, sink index)."""


@dataclass(frozen=True)
class Notification:
    """One message to one sink: the unmuted firing alerts of a group and the resolved ones."""

    receiver: str
    sink_index: int
    group_key: str
    group_labels: Mapping[str, str]
    firing: tuple[Alert, ...]
    resolved: tuple[Alert, ...]
    created_at: float
    flush_id: int = 0

    @property
    def key(self) -> NflogKey:
        """Its notification-log key."""
        return (self.group_key, self.receiver, self.sink_index)

    @property
    def status(self) -> str:
        """``firing`` while any alert fires, else ``resolved``."""
        return "firing" if self.firing else "resolved"

    def to_doc(self) -> dict[str, Any]:
        """The JSON document webhook, exec, file and stdout sinks deliver."""
        return {
            "version": "1",
            "receiver": self.receiver,
            "status": self.status,
            "group_key": self.group_key,
            "group_labels": dict(self.group_labels),
            "alerts": [a.to_dict() for a in (*self.firing, *self.resolved)],
        }


def needs_update(entry: NflogEntry | None, firing: frozenset[str],
                 resolved: frozenset[str], repeat_s: float, now: float) -> bool:
    """Alertmanager's rule: notify on news, or when the repeat interval has passed."""
    if entry is None:
        return bool(firing)
    if not firing <= entry.firing:
        return True
    if not firing:
        return bool(entry.firing)
    if not resolved <= entry.resolved:
        return True
    return entry.sent_at + repeat_s <= now


def match_routes(route: RouteConfig, alert: Alert) -> list[RouteConfig]:
    """The routes an alert goes to: deepest matches, siblings tried until one does not
    ``continue``; the node itself when no child matches."""
    if not matches_all(route.matchers, alert):
        return []
    found: list[RouteConfig] = []
    for child in route.routes:
        sub = match_routes(child, alert)
        found.extend(sub)
        if sub and not child.continue_:
            break
    return found or [route]


def inhibited(alert: Alert, rules: Sequence[InhibitRule], firing: Iterable[Alert]) -> bool:
    """Whether a firing source alert of some rule mutes ``alert``."""
    if alert.status != "firing":
        return False
    sources = list(firing)
    for rule in rules:
        if not matches_all(rule.target, alert):
            continue
        for src in sources:
            if (src.fingerprint != alert.fingerprint and src.status == "firing"
                    and matches_all(rule.source, src)
                    and all(alert_value(src, n) == alert_value(alert, n) for n in rule.equal)):
                return True
    return False


@dataclass(frozen=True)
class Ingested:
    """The fate of one message at ingest."""

    outcome: str
    """``accepted``, ``duplicate``, ``stale`` or ``invalid.<json|size|schema>``."""
    alert: Alert | None
    reason: str = ""


@dataclass
class _Group:
    route: RouteConfig
    key: str
    labels: dict[str, str]
    next_flush: float
    alerts: dict[str, Alert] = field(default_factory=dict)
    flushed: bool = False
    pending: dict[int, tuple[int, Mapping[str, Alert]]] = field(default_factory=dict)
    """flush id → (notifications still in flight, resolved alerts it carried)."""


def _when(alert: Alert) -> datetime:
    return parse_rfc3339(alert.detected_at)


class Pipeline:
    """All stages; the service calls :meth:`ingest`, :meth:`due`, :meth:`sent`, :meth:`failed`."""

    def __init__(self, config: GatewayConfig, clock: Clock,
                 nflog: Mapping[NflogKey, NflogEntry] | None = None,
                 silences: Sequence[Silence] = ()) -> None:
        self.config = config
        self.clock = clock
        self.nflog: dict[NflogKey, NflogEntry] = dict(nflog or {})
        self.silences: tuple[Silence, ...] = tuple(silences)
        self.alerts: dict[str, Alert] = {}
        """Latest accepted alert per fingerprint (dedup memory; firing and resolved)."""
        self.groups: dict[str, _Group] = {}
        self.stats: Counter[str] = Counter()
        self._in_flight: set[NflogKey] = set()
        self._flush_ids = 0
        self._seen: dict[str, float] = {}
        self._muted: dict[str, str] = {}
        self._pruned_at = clock.now()

    # ------------------------------------------------------------------ ingest
    def ingest(self, payload: bytes | str) -> Ingested:
        """Validate → dedup → route → group one message.

        Returns:
            What became of it: ``accepted``, ``duplicate`` or ``stale`` (with the alert),
            or ``invalid.<kind>`` (json, size, schema; with the reason).
        """
        self.stats["received"] += 1
        try:
            alert = Alert.from_json(payload)
        except AlertSchemaError as exc:
            outcome = f"invalid.{exc.kind}"
            self.stats[outcome] += 1
            return Ingested(outcome, None, str(exc))
        except (TypeError, ValueError, KeyError, OverflowError, RecursionError) as exc:
            # defence in depth: a hole in the schema's checks must not stop the gateway
            self.stats["invalid.schema"] += 1
            return Ingested("invalid.schema", None, f"{type(exc).__name__}: {exc}")
        return Ingested(self.ingest_alert(alert), alert)

    def ingest_alert(self, alert: Alert) -> str:
        """Dedup → route → group an already valid alert; returns the outcome."""
        known = self.alerts.get(alert.fingerprint)
        if known is not None:
            if _when(alert) < _when(known):
                self.stats["stale"] += 1
                return "stale"
            if known.status == alert.status:
                self.stats["duplicate"] += 1
                return "duplicate"
        self.stats["accepted"] += 1
        self._admit(alert)
        return "accepted"

    def restore(self, alerts: Iterable[Alert]) -> None:
        """Re-admit alerts kept in the state database (no counting, no dedup)."""
        for alert in alerts:
            self._admit(alert)

    def _admit(self, alert: Alert) -> None:
        now = self.clock.now()
        self.alerts[alert.fingerprint] = alert
        self._seen[alert.fingerprint] = now
        for route in match_routes(self.config.route, alert):
            labels = self._group_labels(route, alert)
            key = f"{route.id}:{{{','.join(f'{k}={v!r}' for k, v in labels.items())}}}"
            group = self.groups.get(key)
            if group is None:
                group = _Group(route, key, labels, now + route.timing.group_wait)
                self.groups[key] = group
            group.alerts[alert.fingerprint] = alert

    @staticmethod
    def _group_labels(route: RouteConfig, alert: Alert) -> dict[str, str]:
        if "..." in route.group_by:
            return {"fingerprint": alert.fingerprint}
        return {name: alert_value(alert, name) for name in route.group_by}

    def set_silences(self, silences: Sequence[Silence]) -> None:
        """Replace the silences in force (the service reloads them from the state file)."""
        self.silences = tuple(silences)

    # ------------------------------------------------------------------ flush
    def next_flush_at(self) -> float | None:
        """Earliest time a group is due, or None when there is no group."""
        return min((g.next_flush for g in self.groups.values()), default=None)

    def muted(self, alert: Alert, now: float) -> str | None:
        """``inhibited`` / ``silenced`` when the alert must not be sent now, else None."""
        firing = (a for a in self.alerts.values() if a.status == "firing")
        if inhibited(alert, self.config.inhibit, firing):
            return "inhibited"
        if alert.status == "firing" and any(s.mutes(alert, now) for s in self.silences):
            return "silenced"
        return None

    def due(self) -> list[Notification]:
        """Flush every group whose time has come; returns what must be sent now."""
        now = self.clock.now()
        out: list[Notification] = []
        for group in list(self.groups.values()):
            if group.next_flush <= now:
                out.extend(self._flush(group, now))
        if now - self._pruned_at >= 60.0:
            self._prune(now)
        return out

    def _prune(self, now: float) -> None:
        """Forget resolved alerts older than the retention that no group holds any more."""
        self._pruned_at = now
        held = {fp for g in self.groups.values() for fp in g.alerts}
        horizon = now - self.config.retention_s
        for fp in [fp for fp, a in self.alerts.items()
                   if a.status == "resolved" and fp not in held
                   and self._seen.get(fp, now) < horizon]:
            del self.alerts[fp]
            self._seen.pop(fp, None)
            self._muted.pop(fp, None)

    def _flush(self, group: _Group, now: float) -> list[Notification]:
        timing = group.route.timing
        group.next_flush = now + timing.group_interval
        group.flushed = True
        firing: list[Alert] = []
        for alert in group.alerts.values():
            if alert.status != "firing":
                continue
            why = self.muted(alert, now)
            if why and self._muted.get(alert.fingerprint) != why:
                self.stats[why] += 1  # counted when an alert becomes muted, not per flush
            if why:
                self._muted[alert.fingerprint] = why
            else:
                self._muted.pop(alert.fingerprint, None)
                firing.append(alert)
        resolved = {fp: a for fp, a in group.alerts.items() if a.status == "resolved"}
        receiver = self.config.receivers[group.route.receiver]
        out: list[Notification] = []
        if firing or resolved:
            fset = frozenset(a.fingerprint for a in firing)
            self._flush_ids += 1
            for index in range(len(receiver.sinks)):
                key = (group.key, receiver.name, index)
                if key in self._in_flight:
                    continue
                entry = self.nflog.get(key)
                known = entry.firing if entry else frozenset()
                sent_resolved = [a for fp, a in resolved.items() if fp in known]
                rset = frozenset(a.fingerprint for a in sent_resolved)
                if not needs_update(entry, fset, rset, timing.repeat_interval, now):
                    continue
                if not firing and not (receiver.send_resolved and sent_resolved):
                    self.nflog[key] = NflogEntry(fset, rset, now)  # clear, nothing to send
                    continue
                out.append(Notification(
                    receiver.name, index, group.key, dict(group.labels), tuple(firing),
                    tuple(sent_resolved) if receiver.send_resolved else (), now,
                    self._flush_ids))
                self._in_flight.add(key)
        if out:
            group.pending[self._flush_ids] = (len(out), resolved)
        else:
            self._drop_resolved(group, resolved)
        return out

    def _drop_resolved(self, group: _Group, resolved: Mapping[str, Alert]) -> None:
        for fp, alert in resolved.items():
            if group.alerts.get(fp) is alert:
                del group.alerts[fp]
        if not group.alerts and not group.pending:
            del self.groups[group.key]

    def _settle(self, notification: Notification, ok: bool) -> None:
        self._in_flight.discard(notification.key)
        group = self.groups.get(notification.group_key)
        if group is None or notification.flush_id not in group.pending:
            return
        left, resolved = group.pending[notification.flush_id]
        if left > 1:
            group.pending[notification.flush_id] = (left - 1, resolved)
            return
        del group.pending[notification.flush_id]
        if ok:
            self._drop_resolved(group, resolved)

    def sent(self, notification: Notification, at: float | None = None) -> NflogEntry:
        """Record a delivered notification; returns the notification-log entry to persist."""
        entry = NflogEntry(frozenset(a.fingerprint for a in notification.firing),
                           frozenset(a.fingerprint for a in notification.resolved),
                           self.clock.now() if at is None else at)
        self.nflog[notification.key] = entry
        self.stats["notifications.sent"] += 1
        self._settle(notification, True)
        return entry

    def failed(self, notification: Notification) -> None:
        """Record a notification given up on; the next group interval tries again."""
        self.stats["notifications.failed"] += 1
        self._settle(notification, False)
