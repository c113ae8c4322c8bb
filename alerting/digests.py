"""Digest messages, schema 1: closed windows' t-digests on ``<root>/<host>/<target>/digest``.

A monitor publishes, at most once a second per target, the windows that closed since its
last message: per series (stage, phase, device) one entry with the window's count, sum,
min, max and its t-digest in fastdigest's binary format (``TDigest.to_bytes``: the magic
``FASTDIG~``, a format version, then the centroids), base64 in the JSON. Digests are
mergeable: the merge of every entry of a series over hosts and windows is the digest of
all their values (``merge_entries``), from which fleet-wide quantiles come.

This module is the wire format only (build, validate, merge); it does not import the
engine, which converts its closed windows to the plain dicts :func:`encode` takes.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fastdigest import TDigest, merge_all

from alerting.schema import MAX_PAYLOAD_BYTES, AlertSchemaError

DIGEST_SCHEMA_VERSION = 1
ENCODING = "fastdigest-bytes-base64"
"""How ``digest`` is encoded: base64 of ``fastdigest.TDigest.to_bytes()``."""


@dataclass(frozen=True)
class DigestEntry:
    """One series' closed window(s) as received: ``[start_ns, end_ns)`` on the sender's
    monotonic clock, ``start`` its wall-clock start (epoch seconds)."""

    stage: str
    phase: str
    device: str
    start_ns: int
    end_ns: int
    start: float
    count: int
    sum_ms: float
    min_ms: float
    max_ms: float
    digest: TDigest

    @property
    def device_kind(self) -> str:
        """``cuda`` for ``cuda:0``: what fleet views group devices by."""
        return self.device.split(":", 1)[0]


@dataclass(frozen=True)
class DigestMessage:
    """A decoded digest message of one target of one host."""

    host: str
    pid: int
    name: str
    profile: str
    published_at: float
    entries: tuple[DigestEntry, ...]


def encode(doc: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON of a digest message built by the monitor (see docs/alerts.md)."""
    return json.dumps(doc, separators=(",", ":")).encode()


def decode(payload: bytes) -> DigestMessage:
    """Validate and decode one digest message; :class:`AlertSchemaError` names the problem."""
    if len(payload) > MAX_PAYLOAD_BYTES * 16:
        raise AlertSchemaError(f"digest message of {len(payload)} bytes is too big", "size")
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AlertSchemaError(f"digest message is not JSON: {exc}", "json") from None
    if not isinstance(doc, dict):
        raise AlertSchemaError("digest message is not a JSON object")
    if doc.get("schema") != DIGEST_SCHEMA_VERSION:
        raise AlertSchemaError(f"unknown digest schema {doc.get('schema')!r} "
                               f"(this reader knows {DIGEST_SCHEMA_VERSION})")
    if doc.get("encoding") != ENCODING:
        raise AlertSchemaError(f"unknown digest encoding {doc.get('encoding')!r}")
    target = _field(doc, "target", dict)
    entries = tuple(_entry(i, e) for i, e in enumerate(_field(doc, "series", list)))
    return DigestMessage(host=_field(doc, "host", str), pid=_field(target, "pid", int),
                         name=_field(target, "name", str),
                         profile=str(target.get("profile", "")),
                         published_at=float(_field(doc, "published_at", (int, float))),
                         entries=entries)


def merge_entries(entries: Iterable[DigestEntry]) -> TDigest | None:
    """One digest of every value of ``entries`` (one compression pass); None when empty."""
    digests = [e.digest for e in entries if not e.digest.is_empty()]
    if not digests:
        return None
    return digests[0].copy() if len(digests) == 1 else merge_all(digests)


def digest_text(digest_bytes: bytes) -> str:
    """The ``digest`` field for fastdigest's serialized bytes."""
    return base64.b64encode(digest_bytes).decode("ascii")


def _entry(i: int, e: Any) -> DigestEntry:
    if not isinstance(e, dict):
        raise AlertSchemaError(f"series[{i}] is not an object")
    try:
        raw = base64.b64decode(_field(e, "digest", str), validate=True)
        digest = TDigest.from_bytes(raw)
    except Exception as exc:  # binascii.Error, or what the extension raises on bad bytes
        raise AlertSchemaError(f"series[{i}].digest is not a serialized t-digest: {exc}") \
            from None
    entry = DigestEntry(
        stage=_field(e, "stage", str), phase=_field(e, "phase", str),
        device=_field(e, "device", str), start_ns=_field(e, "start_ns", int),
        end_ns=_field(e, "end_ns", int), start=float(_field(e, "start", (int, float))),
        count=_field(e, "count", int), sum_ms=float(_field(e, "sum_ms", (int, float))),
        min_ms=float(_field(e, "min_ms", (int, float))),
        max_ms=float(_field(e, "max_ms", (int, float))), digest=digest)
    if entry.end_ns <= entry.start_ns or entry.count < 1 or not all(
            math.isfinite(v) for v in (entry.sum_ms, entry.min_ms, entry.max_ms)):
        raise AlertSchemaError(f"series[{i}]: needs end_ns > start_ns, count >= 1 and "
                               "finite sum/min/max")
    return entry


def _field(doc: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = doc.get(name)
    if value is None or not isinstance(value, kind) or (
            isinstance(value, bool) and kind is not bool):
        raise AlertSchemaError(f"digest field {name!r} is missing or not "
                               f"{getattr(kind, '__name__', kind)}")
    return value
