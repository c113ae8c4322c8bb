"""Digest messages: closed windows' t-digests on ``<root>/<host>/<target>/digest``.

A monitor publishes, at most once a second per target, the windows that closed since its
last message: per series (stage, phase, device) one entry with the window's count, sum,
min, max and its t-digest's centroids. Digests are mergeable: the merge of every entry
of a series over hosts and windows is the digest of all their values
(``merge_entries``), from which fleet-wide quantiles come.

Two wire versions, both decoded by :func:`decode` (docs/alerts.md has the layouts):

- schema 1: JSON, each entry's digest base64 of fastdigest's ``TDigest.to_bytes``
  (16 bytes a centroid, then a third more for base64, and JSON around it);
- schema 2 (what monitors send): a binary message, a compact JSON header (the same
  fields, no digests) then every entry's centroid means (float32) and weights
  (uint32), 8 bytes a centroid. It is a third of schema 1's size and decodes with
  two ``numpy.frombuffer`` calls instead of one base64 pass and one deserialisation
  per entry: a fleet following a thousand hosts spends most of its time decoding.

This module is the wire format only (build, validate, merge); it does not import the
engine, which converts its closed windows to the plain dicts :func:`encode` takes.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastdigest import TDigest, merge_all

from alerting.schema import MAX_PAYLOAD_BYTES, AlertSchemaError

DIGEST_SCHEMA_VERSION = 2
"""The version monitors send; :func:`decode` also reads :data:`SCHEMA_V1`."""
SCHEMA_V1 = 1
ENCODING = "fastdigest-bytes-base64"
"""Schema 1's ``encoding``: ``digest`` is base64 of ``fastdigest.TDigest.to_bytes()``."""
V2_MAGIC = b"LPDG"
"""The first bytes of a schema-2 message (a schema-1 message starts with ``{``)."""
V2_PREFIX = struct.Struct("<4sBI")
"""Magic, schema version (2), header length in bytes."""
V2_SERIES = np.dtype([("start_ns", "<i8"), ("end_ns", "<i8"), ("start", "<f8"),
                      ("count", "<i8"), ("sum_ms", "<f8"), ("min_ms", "<f8"),
                      ("max_ms", "<f8"), ("centroids", "<i8")])
"""Schema 2's per-series table: one 64-byte record a series, after the header."""
_V2_FLOAT_COLUMNS = [i for i, k in enumerate(V2_SERIES.names or ())
                     if V2_SERIES[k] == np.dtype("<f8")]
"""The table's float64 columns (start, sum_ms, min_ms, max_ms): every field is 8 bytes,
so a record is also 8 float64s, checked for finiteness in one call."""
_V2_STRINGS = ("stage", "phase", "device")
"""Schema 2's per-series strings, one list each in the header."""
MAX_MESSAGE_BYTES = MAX_PAYLOAD_BYTES * 16
_FASTDIGEST_HEADER = 80
"""Bytes before the centroids in fastdigest 0.12's ``to_bytes`` (format version 1):
the centroids follow as (mean, weight) float64 pairs."""
_TDIGEST_MAX_CENTROIDS = 1000
"""fastdigest's default compression, for digests rebuilt from centroids."""


@dataclass(slots=True)
class DigestEntry:
    """One series' closed window(s) as received: ``[start_ns, end_ns)`` on the sender's
    monotonic clock, ``start`` its wall-clock start (epoch seconds), and the digest's
    centroids (``means`` ascending, ``weights`` their value counts). Read-only by
    convention (a plain slotted class: a fleet makes thousands a second)."""

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
    means: np.ndarray = field(repr=False, compare=False)
    weights: np.ndarray = field(repr=False, compare=False)
    _digest: TDigest | None = field(default=None, repr=False, compare=False)

    @property
    def device_kind(self) -> str:
        """``cuda`` for ``cuda:0``: what fleet views group devices by."""
        return self.device.split(":", 1)[0]

    @property
    def digest(self) -> TDigest:
        """The entry as a fastdigest ``TDigest`` (built on first use: the fleet merges
        the centroids directly and needs none)."""
        if self._digest is None:
            self._digest = digest_from_centroids(
                self.means, self.weights, count=self.count, sum_ms=self.sum_ms,
                min_ms=self.min_ms, max_ms=self.max_ms)
        return self._digest


@dataclass(frozen=True)
class DigestMessage:
    """A decoded digest message of one target of one host."""

    host: str
    pid: int
    name: str
    profile: str
    published_at: float
    entries: tuple[DigestEntry, ...]
    schema: int = DIGEST_SCHEMA_VERSION


def centroid_arrays(digest: TDigest) -> tuple[np.ndarray, np.ndarray]:
    """A digest's centroid means and weights (float64), read from its ``to_bytes``
    (~100x faster than the ``centroids`` property; falls back to it if fastdigest's
    layout ever differs)."""
    raw = bytes(digest.to_bytes())
    n = digest.n_centroids
    if len(raw) == _FASTDIGEST_HEADER + 16 * n and raw[8:12] == b"\x01\x00\x00\x00":
        pairs = np.frombuffer(raw, dtype="<f8", offset=_FASTDIGEST_HEADER).reshape(n, 2)
        return pairs[:, 0], pairs[:, 1]
    pairs = np.array(digest.centroids, dtype=np.float64).reshape(-1, 2)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def digest_from_centroids(means: np.ndarray, weights: np.ndarray, *, count: int,
                          sum_ms: float, min_ms: float, max_ms: float,
                          max_centroids: int = _TDIGEST_MAX_CENTROIDS) -> TDigest:
    """A ``TDigest`` of the given centroids (compressed to ``max_centroids`` if more)."""
    return TDigest.from_dict({
        "max_centroids": max_centroids, "mass": float(np.sum(weights)), "sum": sum_ms,
        "min": min_ms, "max": max_ms, "n_values": count,
        "centroids": [{"m": m, "c": c} for m, c in zip(np.asarray(means, np.float64).tolist(),
                                                        np.asarray(weights,
                                                                   np.float64).tolist(),
                                                        strict=True)]})


def encode(doc: Mapping[str, Any]) -> bytes:
    """The wire bytes of a digest message built by the monitor (see docs/alerts.md):
    schema 1 as compact JSON; schema 2 (``series[].means``/``weights`` sequences instead
    of ``digest``) as its binary layout."""
    if doc.get("schema") != 2:
        return json.dumps(doc, separators=(",", ":")).encode()
    series = list(doc["series"])
    means = [np.asarray(s["means"], dtype=np.float64) for s in series]
    weights = [np.asarray(s["weights"], dtype=np.float64) for s in series]
    for i, (m, w) in enumerate(zip(means, weights, strict=True)):
        if m.shape != w.shape or m.ndim != 1:
            raise ValueError(f"series[{i}]: means and weights differ in shape")
        if np.any(w < 1) or np.any(w != np.rint(w)) or np.any(w >= 2**32):
            raise ValueError(f"series[{i}]: weights must be whole counts ≥ 1")
    header = {**{k: v for k, v in doc.items() if k != "series"},
              **{k: [s[k] for s in series] for k in _V2_STRINGS}}
    head = json.dumps(header, separators=(",", ":")).encode()
    table = np.zeros(len(series), dtype=V2_SERIES)
    for name in V2_SERIES.names or ():
        table[name] = [m.size for m in means] if name == "centroids" else [
            s[name] for s in series]
    all_means = np.concatenate(means) if means else np.zeros(0)
    all_weights = np.concatenate(weights) if weights else np.zeros(0)
    return b"".join((V2_PREFIX.pack(V2_MAGIC, 2, len(head)), head, table.tobytes(),
                     all_means.astype("<f4").tobytes(),
                     all_weights.astype("<u4").tobytes()))


def decode(payload: bytes) -> DigestMessage:
    """Validate and decode one digest message (schema 1 or 2); :class:`AlertSchemaError`
    names the problem."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise AlertSchemaError(f"digest message of {len(payload)} bytes is too big", "size")
    if payload[:4] == V2_MAGIC:
        return _decode_v2(payload)
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AlertSchemaError(f"digest message is not JSON: {exc}", "json") from None
    if not isinstance(doc, dict):
        raise AlertSchemaError("digest message is not a JSON object")
    if doc.get("schema") != SCHEMA_V1:
        raise AlertSchemaError(f"unknown digest schema {doc.get('schema')!r} in JSON "
                               f"(JSON is schema {SCHEMA_V1}; schema 2 is binary)")
    if doc.get("encoding") != ENCODING:
        raise AlertSchemaError(f"unknown digest encoding {doc.get('encoding')!r}")
    entries = []
    for i, e in enumerate(_field(doc, "series", list)):
        digest = _v1_digest(i, e)
        entry = _entry(i, e, *centroid_arrays(digest))
        entry._digest = digest  # the very digest sent
        entries.append(entry)
    return _message(doc, tuple(entries), SCHEMA_V1)


def _decode_v2(payload: bytes) -> DigestMessage:
    """Schema 2: the strings from the JSON header, every number checked column-wise."""
    if len(payload) < V2_PREFIX.size:
        raise AlertSchemaError("schema-2 digest message is truncated")
    _, version, head_len = V2_PREFIX.unpack_from(payload)
    if version != 2:
        raise AlertSchemaError(f"unknown digest schema {version} (binary is schema 2)")
    at = V2_PREFIX.size + head_len
    if at > len(payload):
        raise AlertSchemaError("schema-2 digest header runs past the message")
    try:
        doc = json.loads(payload[V2_PREFIX.size:at])
    except (ValueError, UnicodeDecodeError) as exc:
        raise AlertSchemaError(f"schema-2 digest header is not JSON: {exc}", "json") \
            from None
    if not isinstance(doc, dict) or doc.get("schema") != 2:
        raise AlertSchemaError("schema-2 digest header is not an object with schema 2")
    strings = [_field(doc, k, list) for k in _V2_STRINGS]
    n = len(strings[0])
    if any(len(col) != n or not all(type(x) is str for x in col) for col in strings):
        raise AlertSchemaError(f"schema-2 digest: {', '.join(_V2_STRINGS)} must be lists "
                               "of strings of one length")
    if len(payload) < at + n * V2_SERIES.itemsize:
        raise AlertSchemaError(f"schema-2 digest: the table of {n} series is truncated")
    table = np.frombuffer(payload, dtype=V2_SERIES, count=n, offset=at)
    floats = np.frombuffer(payload, dtype="<f8", count=8 * n, offset=at).reshape(n, 8)
    at += n * V2_SERIES.itemsize
    sizes = table["centroids"]
    total = int(sizes.sum()) if n else 0
    if (sizes < 1).any() or len(payload) - at != 8 * total:
        raise AlertSchemaError(f"schema-2 digest: {len(payload) - at} bytes of centroids, "
                               f"the table says {total} (8 bytes each, >= 1 a series)")
    means = np.frombuffer(payload, dtype="<f4", count=total, offset=at)
    weights = np.frombuffer(payload, dtype="<u4", count=total, offset=at + 4 * total)
    starts = np.cumsum(sizes) - sizes
    if n and not ((table["end_ns"] > table["start_ns"]).all() and (table["count"] >= 1).all()
                  and np.isfinite(floats[:, _V2_FLOAT_COLUMNS]).all()):
        raise AlertSchemaError("schema-2 digest: every series needs end_ns > start_ns, "
                               "count >= 1 and finite start/sum/min/max")
    if n and not (np.isfinite(means).all() and (weights > 0).all() and np.array_equal(
            np.add.reduceat(weights, starts, dtype=np.int64), table["count"])):
        raise AlertSchemaError("schema-2 digest: centroids need finite means, weights "
                               ">= 1 adding up to each series' count")
    ends = (starts + sizes).tolist()
    entries = tuple(
        DigestEntry(stage, phase, device, start_ns, end_ns, start, count, sum_ms, min_ms,
                    max_ms, means[a:b], weights[a:b])
        for stage, phase, device, (start_ns, end_ns, start, count, sum_ms, min_ms, max_ms,
                                   _), a, b
        in zip(*strings, table.tolist(), starts.tolist(), ends, strict=True))
    return _message(doc, entries, 2)


def _message(doc: Mapping[str, Any], entries: tuple[DigestEntry, ...],
             schema: int) -> DigestMessage:
    target = _field(doc, "target", dict)
    return DigestMessage(host=_field(doc, "host", str), pid=_field(target, "pid", int),
                         name=_field(target, "name", str),
                         profile=str(target.get("profile", "")),
                         published_at=float(_field(doc, "published_at", (int, float))),
                         entries=entries, schema=schema)


def merge_entries(entries: Iterable[DigestEntry]) -> TDigest | None:
    """One digest of every value of ``entries`` (one compression pass); None when empty."""
    digests = [e.digest for e in entries if e.count > 0]
    if not digests:
        return None
    return digests[0].copy() if len(digests) == 1 else merge_all(digests)


def digest_text(digest_bytes: bytes) -> str:
    """Schema 1's ``digest`` field for fastdigest's serialized bytes."""
    return base64.b64encode(digest_bytes).decode("ascii")


def series_centroids(digest: TDigest) -> dict[str, np.ndarray]:
    """Schema 2's ``means`` and ``weights`` of one entry's digest."""
    means, weights = centroid_arrays(digest)
    return {"means": means, "weights": weights}


def _v1_digest(i: int, e: Any) -> TDigest:
    if not isinstance(e, dict):
        raise AlertSchemaError(f"series[{i}] is not an object")
    try:
        return TDigest.from_bytes(base64.b64decode(_field(e, "digest", str), validate=True))
    except Exception as exc:  # binascii.Error, or what the extension raises on bad bytes
        raise AlertSchemaError(f"series[{i}].digest is not a serialized t-digest: {exc}") \
            from None


def _entry(i: int, e: Any, means: np.ndarray, weights: np.ndarray) -> DigestEntry:
    if not isinstance(e, dict):
        raise AlertSchemaError(f"series[{i}] is not an object")
    entry = DigestEntry(
        stage=_field(e, "stage", str), phase=_field(e, "phase", str),
        device=_field(e, "device", str), start_ns=_field(e, "start_ns", int),
        end_ns=_field(e, "end_ns", int), start=float(_field(e, "start", (int, float))),
        count=_field(e, "count", int), sum_ms=float(_field(e, "sum_ms", (int, float))),
        min_ms=float(_field(e, "min_ms", (int, float))),
        max_ms=float(_field(e, "max_ms", (int, float))), means=means, weights=weights)
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
