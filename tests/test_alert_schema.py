"""Alert schema v1: JSON round trip, strict validation, and fuzzed payloads."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alerting.schema import MAX_PAYLOAD_BYTES, Alert, AlertSchemaError, parse_rfc3339, rfc3339
from tests.mqtt_fixtures import sample_alert


def test_json_round_trip_is_exact() -> None:
    """to_json → from_json gives the same alert, stamped or not."""
    alert = sample_alert("fp-x", seq=7)
    assert Alert.from_json(alert.to_json()) == alert
    stamped = alert.with_published_at(1_700_000_000.25)
    assert stamped.published_at == "2023-11-14T22:13:20.250000Z"
    assert Alert.from_json(stamped.to_json().decode()) == stamped
    doc = json.loads(stamped.to_json())
    assert doc["schema"] == 1 and doc["target"] == {"pid": 4242, "name": "vllm"}
    assert set(doc) == {"schema", "id", "fingerprint", "status", "severity", "host", "target",
                        "device", "stage", "phase", "observed_ms", "predicted_ms", "error",
                        "ucl", "window", "started_at", "detected_at", "published_at",
                        "iteration_end_ns", "suspects", "summary", "source", "labels"}
    assert parse_rfc3339(rfc3339(0.5)).timestamp() == 0.5


def _doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(sample_alert().to_json())
    for key, value in changes.items():
        if value is _DROP:
            doc.pop(key)
        else:
            doc[key] = value
    return doc


_DROP = object()


@pytest.mark.parametrize(("changes", "words"), [
    ({"schema": 2}, "unsupported schema 2"),
    ({"id": _DROP}, "missing field 'id'"),
    ({"status": "burning"}, "status must be one of"),
    ({"severity": "page"}, "severity must be one of"),
    ({"observed_ms": "12"}, "observed_ms must be float"),
    ({"window": True}, "window must be int"),
    ({"target": [1]}, "target must be an object"),
    ({"target": {"pid": "1", "name": "x"}}, "target.pid must be int"),
    ({"detected_at": "yesterday"}, "detected_at must be an RFC 3339"),
    ({"labels": {"team": 1}}, "labels must be an object of strings"),
    ({"suspects": [{"stage": "x"}]}, "suspect.device must be str"),
    ({"window": -1}, "must not be negative"),
    ({"source": "human"}, "source must be detector or slo"),
])
def test_malformed_payloads_name_the_first_problem(changes: dict[str, Any], words: str) -> None:
    """Each kind of wrong field gives a schema error naming it in one line."""
    with pytest.raises(AlertSchemaError) as info:
        Alert.from_json(json.dumps(_doc(**changes)))
    assert info.value.kind == "schema"
    assert words in str(info.value) and "\n" not in str(info.value)


def test_not_json_and_too_big() -> None:
    """Bad JSON is kind 'json'; oversized payloads are refused before parsing (kind 'size')."""
    with pytest.raises(AlertSchemaError) as info:
        Alert.from_json(b"{nope")
    assert info.value.kind == "json"
    with pytest.raises(AlertSchemaError) as info:
        Alert.from_json(b"\xff\xfe")
    assert info.value.kind == "json"
    with pytest.raises(AlertSchemaError) as info:
        Alert.from_json(b" " * (MAX_PAYLOAD_BYTES + 1))
    assert info.value.kind == "size"
    with pytest.raises(AlertSchemaError, match="JSON object"):
        Alert.from_json(b"[1, 2]")
    assert Alert.from_json(json.dumps(_doc(published_at=_DROP, source=_DROP))).source == "detector"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_schema_errors(payload: bytes) -> None:
    """Arbitrary bytes: either a valid alert or AlertSchemaError, never anything else."""
    with contextlib.suppress(AlertSchemaError):
        Alert.from_json(payload)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(_doc())), json_values, max_size=8),
       st.booleans())
def test_mutated_alerts_only_raise_schema_errors(changes: dict[str, Any], start_valid: bool
                                                 ) -> None:
    """A valid alert with random fields replaced by random JSON values never crashes."""
    doc = _doc() if start_valid else {}
    doc.update(changes)
    try:
        alert = Alert.from_json(json.dumps(doc))
    except AlertSchemaError:
        return
    assert Alert.from_json(alert.to_json()) == alert  # what validates also round-trips
