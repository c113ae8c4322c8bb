"""Drill: ``prism gateway`` fed junk and valid alerts mixed, through a real Mosquitto.

Real parts: the gateway as a child process (``python -m alerting.gateway``, the code
behind ``prism gateway``), the real broker, a paho publisher, the gateway's state file
and its file sink. Hypothesis generates the payloads: bytes, JSON that violates the
schema, oversized messages, and valid alerts whose free text (summary, names, labels)
is arbitrary Unicode; the alert schema itself is the oracle of which are valid.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alerting.schema import MAX_PAYLOAD_BYTES, Alert, AlertSchemaError
from tests.mqtt_fixtures import broker  # noqa: F401  (fuzz_rig's broker)
from tests.test_gateway_pipeline import make_alert
from tests.test_gateway_service import TOPIC, GatewayProcess, fuzz_rig  # noqa: F401

FUZZ = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12)
FREE_TEXT = st.text(max_size=300)
"""Any Unicode text but lone surrogates: controls, NUL, right-to-left marks, emoji."""


def _kind(payload: bytes) -> str:
    """What the schema says of ``payload``: ``valid`` or the ``invalid.<kind>`` outcome."""
    try:
        Alert.from_json(payload)
    except AlertSchemaError as exc:
        return f"invalid.{exc.kind}"
    except (TypeError, ValueError, KeyError, OverflowError, RecursionError):
        return "invalid.schema"  # the gateway's defence in depth counts these so
    return "valid"


def test_junk_is_counted_and_logged_once_per_kind_and_every_valid_alert_is_routed(
        fuzz_rig: tuple[GatewayProcess, paho.Client, Path]) -> None:  # noqa: F811
    gw, client, out = fuzz_rig
    sent: list[tuple[str, bytes]] = []
    valid_fingerprints: list[str] = []

    def send(payload: bytes) -> None:
        client.publish(TOPIC, payload, qos=1).wait_for_publish(30)
        kind = _kind(payload)
        sent.append((kind, payload))
        if kind == "valid":
            valid_fingerprints.append(Alert.from_json(payload).fingerprint)

    @FUZZ
    @given(summary=FREE_TEXT, name=FREE_TEXT, labels=st.dictionaries(
        st.text(max_size=20), FREE_TEXT, max_size=4))
    def valid_with_odd_text(summary: str, name: str, labels: dict[str, str]) -> None:
        alert = dataclasses.replace(make_alert(f"fp-fuzz-{len(sent)}", labels=labels),
                                    summary=summary, target_name=name)
        send(alert.to_json())

    @FUZZ
    @given(st.one_of(
        st.binary(max_size=400),
        st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=8).map(
            lambda d: json.dumps(d).encode()),
        st.dictionaries(st.sampled_from(sorted(make_alert().to_dict())), JSON_VALUES,
                        min_size=1, max_size=4).map(
            lambda d: json.dumps({**make_alert().to_dict(), **d, "id": "junk"}).encode()),
        st.integers(MAX_PAYLOAD_BYTES + 1, 4 * MAX_PAYLOAD_BYTES).map(
            lambda n: b'{"summary": "' + b"x" * n + b'"}'),
        st.integers(1, 50_000).map(lambda depth: b"[" * depth + b"]" * depth)))
    def junk(payload: bytes) -> None:
        if _kind(payload) != "valid":  # junk that happens to be valid is not junk
            send(payload)

    junk()
    valid_with_odd_text()
    junk()
    survivor = make_alert("fp-after-the-junk")
    send(survivor.to_json())

    deadline = time.monotonic() + 60
    while not (out.exists() and "fp-after-the-junk" in out.read_text()):
        assert gw.proc.poll() is None, gw.lines[-5:]
        assert time.monotonic() < deadline, gw.lines[-5:]
        time.sleep(0.05)
    assert gw.stop() == 0, gw.lines[-5:]

    [summary] = [line for line in gw.lines if "stopped:" in line]
    counts: dict[str, Any] = json.loads(summary.split("stopped: ", 1)[1])
    expected: dict[str, int] = {}
    for kind, _payload in sent:
        expected[kind] = expected.get(kind, 0) + 1
    invalid = {k: v for k, v in counts.items() if k.startswith("invalid.")}
    assert invalid == {k: v for k, v in expected.items() if k != "valid"}, (counts, expected)
    assert {"invalid.json", "invalid.size", "invalid.schema"} <= set(invalid)
    assert counts["received"] == len(sent)
    assert counts["accepted"] == expected["valid"] == len(set(valid_fingerprints))
    for kind in invalid:  # logged once per kind, then only counted
        logged = [line for line in gw.lines if f"({kind.split('.', 1)[1]}: " in line]
        assert len(logged) == 1, (kind, logged)
    routed = {a["fingerprint"]: a for line in out.read_text().splitlines()
              for a in json.loads(line)["alerts"]}
    assert set(routed) == set(valid_fingerprints)
    for kind, payload in sent:  # and delivered intact, odd text and all
        if kind == "valid":
            alert = Alert.from_json(payload).to_dict()
            assert routed[alert["fingerprint"]] == alert
