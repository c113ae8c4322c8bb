"""Alert schema version 1 (docs/alerts.md): a typed, validated model and its JSON codec.

The payload is self-contained: everything a pager needs is in one message. Decoding is
strict (unknown schema, wrong types, missing fields, oversized payloads raise
:class:`AlertSchemaError` with the first problem), because a gateway must drop a bad
message with one clear line rather than route half an alert.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from alerting.errors import AlertingError

SCHEMA_VERSION = 1
MAX_PAYLOAD_BYTES = 256 * 1024
STATUSES = ("firing", "resolved")
SEVERITIES = ("critical", "error", "warning", "info")
SEVERITY_RANK = {name: rank for rank, name in enumerate(reversed(SEVERITIES))}
"""info 0 < warning 1 < error 2 < critical 3."""

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")


class AlertSchemaError(AlertingError):
    """A payload that is not a valid schema-1 alert (the message names the first problem)."""

    def __init__(self, message: str, kind: str = "schema") -> None:
        super().__init__(message)
        self.kind = kind
        """``json`` (not JSON), ``size`` (too big), ``schema`` (wrong fields or values)."""


def rfc3339(t: float | datetime | None = None) -> str:
    """Wall-clock time (epoch seconds or aware datetime; default now) as RFC 3339 with µs, UTC."""
    if t is None:
        dt = datetime.now(timezone.utc)
    elif isinstance(t, datetime):
        dt = t.astimezone(timezone.utc)
    else:
        dt = datetime.fromtimestamp(t, timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 timestamp (``Z`` or offset); raises ValueError when it is not one."""
    if not _RFC3339.match(text):
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    head, _, rest = text.partition(".")
    if rest:  # Python < 3.11 takes at most 6 fraction digits and no "Z"
        digits = re.match(r"\d+", rest)
        assert digits is not None
        frac = digits.group(0)[:6].ljust(6, "0")
        text = f"{head}.{frac}{rest[len(digits.group(0)):]}"
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Suspect:
    """A root-cause hint: which stage/device/metric moved, and by how much (score)."""

    stage: str
    device: str
    metric: str
    score: float
    delta_share: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``delta_share`` only when known)."""
        out: dict[str, Any] = {"stage": self.stage, "device": self.device,
                               "metric": self.metric, "score": self.score}
        if self.delta_share is not None:
            out["delta_share"] = self.delta_share
        return out


@dataclass(frozen=True)
class Alert:
    """One alert state change of one alerting series (schema version 1)."""

    id: str
    fingerprint: str
    status: str
    severity: str
    host: str
    target_pid: int
    target_name: str
    device: str
    stage: str
    phase: str
    observed_ms: float
    predicted_ms: float | None
    error: float
    ucl: float
    window: int
    started_at: str
    detected_at: str
    iteration_end_ns: int
    summary: str
    suspects: tuple[Suspect, ...] = ()
    published_at: str = ""
    """Set by the publisher when the message leaves (``with_published_at``)."""
    source: str = "detector"
    """``detector`` (workload-aware rule) or ``slo`` (a configured latency objective)."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Free-form labels for routing (``team``, ``cluster``...)."""

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem:
            raise AlertSchemaError(problem)

    # ------------------------------------------------------------------ derived
    @property
    def target_key(self) -> str:
        """The topic segment of the target: ``<name>-<pid>`` with MQTT wildcards removed."""
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", self.target_name) or "target"
        return f"{name}-{self.target_pid}"

    def with_published_at(self, when: float | datetime | None = None) -> Alert:
        """A copy stamped with the publish time (default now)."""
        from dataclasses import replace

        return replace(self, published_at=rfc3339(when))

    # ------------------------------------------------------------------ codec
    def to_dict(self) -> dict[str, Any]:
        """The wire form (docs/alerts.md field names)."""
        return {
            "schema": SCHEMA_VERSION,
            "id": self.id,
            "fingerprint": self.fingerprint,
            "status": self.status,
            "severity": self.severity,
            "host": self.host,
            "target": {"pid": self.target_pid, "name": self.target_name},
            "device": self.device,
            "stage": self.stage,
            "phase": self.phase,
            "observed_ms": self.observed_ms,
            "predicted_ms": self.predicted_ms,
            "error": self.error,
            "ucl": self.ucl,
            "window": self.window,
            "started_at": self.started_at,
            "detected_at": self.detected_at,
            "published_at": self.published_at,
            "iteration_end_ns": self.iteration_end_ns,
            "suspects": [s.to_dict() for s in self.suspects],
            "summary": self.summary,
            "source": self.source,
            "labels": dict(self.labels),
        }

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON."""
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_dict(cls, doc: Any) -> Alert:
        """Validate a decoded payload; raises :class:`AlertSchemaError` on the first problem."""
        if not isinstance(doc, Mapping):
            raise AlertSchemaError(f"an alert is a JSON object, not {type(doc).__name__}")
        if doc.get("schema") != SCHEMA_VERSION:
            raise AlertSchemaError(f"unsupported schema {doc.get('schema')!r} "
                                   f"(this reader knows {SCHEMA_VERSION})")
        target = doc.get("target")
        if not isinstance(target, Mapping):
            raise AlertSchemaError("target must be an object with pid and name")
        raw_suspects = doc.get("suspects", [])
        if not isinstance(raw_suspects, list):
            raise AlertSchemaError("suspects must be a list")
        suspects = []
        for s in raw_suspects:
            if not isinstance(s, Mapping):
                raise AlertSchemaError("each suspect must be an object")
            _need(s, "suspect.stage", s.get("stage"), str)
            _need(s, "suspect.device", s.get("device"), str)
            _need(s, "suspect.metric", s.get("metric"), str)
            _need(s, "suspect.score", s.get("score"), float)
            delta = s.get("delta_share")
            if delta is not None:
                _need(s, "suspect.delta_share", delta, float)
            suspects.append(Suspect(s["stage"], s["device"], s["metric"], float(s["score"]),
                                    None if delta is None else float(delta)))
        labels = doc.get("labels", {})
        if not isinstance(labels, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise AlertSchemaError("labels must be an object of strings")
        fields: dict[str, Any] = {}
        for name, kind in _FIELDS.items():
            if name not in doc:
                if name in _OPTIONAL:
                    continue
                raise AlertSchemaError(f"missing field {name!r}")
            value = doc[name]
            if value is None and name in _NULLABLE:
                fields[name] = None
                continue
            _need(doc, name, value, kind)
            fields[name] = float(value) if kind is float else value
        _need(target, "target.pid", target.get("pid"), int)
        _need(target, "target.name", target.get("name"), str)
        return cls(target_pid=target["pid"], target_name=target["name"],
                   suspects=tuple(suspects), labels=dict(labels), **fields)

    @classmethod
    def from_json(cls, payload: bytes | str) -> Alert:
        """Decode and validate one message (size checked before parsing)."""
        size = len(payload.encode() if isinstance(payload, str) else payload)
        if size > MAX_PAYLOAD_BYTES:
            raise AlertSchemaError(f"payload of {size} bytes exceeds {MAX_PAYLOAD_BYTES}",
                                   kind="size")
        try:
            doc = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise AlertSchemaError(f"not JSON: {exc}", kind="json") from None
        return cls.from_dict(doc)


_FIELDS: dict[str, type] = {
    "id": str, "fingerprint": str, "status": str, "severity": str, "host": str,
    "device": str, "stage": str, "phase": str, "observed_ms": float, "predicted_ms": float,
    "error": float, "ucl": float, "window": int, "started_at": str, "detected_at": str,
    "published_at": str, "iteration_end_ns": int, "summary": str, "source": str,
}
_OPTIONAL = {"published_at", "source"}
_NULLABLE = {"predicted_ms"}


def _need(where: Mapping[str, Any], name: str, value: Any, kind: type) -> None:
    """Type check with JSON's view of numbers (bool is not a number; int is a float)."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          if kind is float else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else
          isinstance(value, kind))
    if not ok:
        shown = "missing" if value is None else f"{type(value).__name__} {value!r:.40}"
        raise AlertSchemaError(f"{name} must be {kind.__name__}, got {shown}")


def _problem(a: Alert) -> str | None:
    """The first semantic problem of a constructed alert, or None."""
    if not a.id or not a.fingerprint:
        return "id and fingerprint must be non-empty"
    if a.status not in STATUSES:
        return f"status must be one of {', '.join(STATUSES)}, got {a.status!r}"
    if a.severity not in SEVERITIES:
        return f"severity must be one of {', '.join(SEVERITIES)}, got {a.severity!r}"
    for name in ("observed_ms", "error", "ucl"):
        value = getattr(a, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{name} must be a finite number"
    if a.predicted_ms is not None and not math.isfinite(a.predicted_ms):
        return "predicted_ms must be a finite number or null"
    if a.window < 0 or a.iteration_end_ns < 0 or a.target_pid < 0:
        return "window, iteration_end_ns and target.pid must not be negative"
    for name in ("started_at", "detected_at") + (("published_at",) if a.published_at else ()):
        value = getattr(a, name)
        try:
            parse_rfc3339(value)
        except (ValueError, TypeError):
            return f"{name} must be an RFC 3339 timestamp, got {value!r:.40}"
    if a.source not in ("detector", "slo"):
        return f"source must be detector or slo, got {a.source!r}"
    return None
