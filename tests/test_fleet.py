"""``prism fleet``: two monitors' status, digests and alerts through a real Mosquitto.

The monitors are real engines with their own hosts and publishers (as in
tests/test_digests.py): node-b is 40 % slower than node-a. The fleet follower must merge
both hosts' digests to the raw values' quantiles, name node-b the host furthest above
the fleet's p99, list node-b's alert, and see node-a go offline when it stops.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alerting.broker import EmbeddedBroker
from alerting.config import BrokerConfig
from alerting.digests import decode, digest_text, encode
from alerting.fleet import FleetState, follow_fleet
from alerting.publisher import AlertPublisher
from prism_tui.cli import main
from prism_tui.digest_feed import DigestFeed
from prism_tui.engine.core import Engine
from prism_tui.engine.sketches import ITERATION, SeriesKey
from tests.fleet_payloads import EPOCH, host_messages
from tests.fleet_payloads import ROOT as FLEET_ROOT
from tests.mqtt_fixtures import broker, sample_alert  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parent.parent
SCALES = {"node-a": 10.0, "node-b": 14.0}
SECONDS = 10


async def _connected(publisher: AlertPublisher) -> None:
    for _ in range(500):
        if publisher.status.state == "connected":
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"publisher never connected: {publisher.status}")


@pytest.mark.anyio
async def test_the_fleet_merges_hosts_names_the_slow_one_and_sees_one_go_offline(
        broker: EmbeddedBroker) -> None:  # noqa: F811
    config = BrokerConfig(url=broker.url)
    state = FleetState(config.topic_root, window_s=3600)
    stop, subscribed = asyncio.Event(), asyncio.Event()
    follower = asyncio.create_task(follow_fleet(config, state, stop, subscribed))
    await asyncio.wait_for(subscribed.wait(), 10)
    raw: list[float] = []
    by_host: dict[str, list[float]] = {host: [] for host in SCALES}
    publishers = {}
    runners = []
    try:
        for host, scale in SCALES.items():
            now = [0]
            engine = Engine(host=host, clock=lambda now=now: now[0])  # type: ignore[misc]
            engine.watch(4242, "vllm", "anchor", {}, profile="cuda", device="cuda:0")
            publisher = publishers[host] = AlertPublisher(config, host=host, outbox=None)
            runners.append(asyncio.create_task(publisher.run()))
            await _connected(publisher)
            feed = DigestFeed(engine, publisher.publish_digest)
            rng = random.Random(int(scale))
            targets = engine.view().targets
            key = SeriesKey(ITERATION, "cuda:0", "decode")
            for second in range(SECONDS):
                for i in range(300):
                    value = scale * rng.lognormvariate(0, 0.25)
                    raw.append(value)
                    by_host[host].append(value)
                    engine.sketches.add(key, second * 10**9 + i * 3_000_000, value)
                assert feed.poll(targets, (second + 2) * 10**9) == 1
        publishers["node-b"].publish(sample_alert("fp-b", host="node-b"))
        await asyncio.sleep(0.5)
        await publishers["node-a"].aclose()  # a clean stop: retained "offline"
        for _ in range(200):
            snap = state.snapshot()
            hosts = {h["host"]: h for h in snap["hosts"]}
            if (hosts.get("node-a", {}).get("state") == "offline" and snap["alerts"]
                    and sum(r["count"] for r in snap["fleet"]) == len(raw)):
                break
            await asyncio.sleep(0.05)
    finally:
        for publisher in publishers.values():
            await publisher.aclose()
        for runner in runners:
            await runner
        stop.set()
        await follower
    assert hosts["node-a"]["state"] == "offline" and hosts["node-a"]["reason"] == "stopped"
    assert hosts["node-b"]["state"] == "online" and hosts["node-b"]["firing"] == 1
    assert hosts["node-b"]["targets"] == ["vllm-4242"]
    (row,) = snap["fleet"]
    assert (row["profile"], row["stage"], row["phase"], row["device_kind"], row["hosts"]) == (
        "cuda", ITERATION, "decode", "cuda", 2)
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        truth = float(np.quantile(raw, q))
        assert abs(row[name] - truth) / truth < 0.01, (name, row[name], truth)
    # each host's p99 over the fleet's, as the raw values have it (the slow host's tail
    # is most of the fleet's: node-b is above the fleet p99, node-a well below)
    assert [o["host"] for o in snap["outliers"]] == ["node-b", "node-a"]
    for o in snap["outliers"]:
        truth = float(np.quantile(by_host[o["host"]], 0.99) / np.quantile(raw, 0.99))
        assert abs(o["ratio"] - truth) / truth < 0.02, (o, truth)
    assert snap["outliers"][0]["ratio"] > 1.0 > snap["outliers"][1]["ratio"]
    (alert,) = snap["alerts"]
    assert (alert["host"], alert["fingerprint"], alert["status"]) == ("node-b", "fp-b",
                                                                     "firing")
    assert snap["rejected"] == 0


def test_fleet_bad_input_is_one_line_and_exit_2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("PRISM_CONFIG", raising=False)
    monkeypatch.delenv("PRISM_MQTT_BROKER", raising=False)
    assert main(["fleet", "--duration", "1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "prism fleet: no broker: give --broker URL or set mqtt.broker")
    assert main(["fleet", "--broker", "mqtt://127.0.0.1:1", "--window", "0"]) == 2
    assert capsys.readouterr().err.strip() == "prism fleet: --window must be > 0, not 0"


@pytest.mark.anyio
async def test_prism_fleet_json_reports_a_monitor_online(
        broker: EmbeddedBroker, tmp_path: Path) -> None:  # noqa: F811
    publisher = AlertPublisher(BrokerConfig(url=broker.url), host="gpu-node-7", outbox=None)
    runner = asyncio.create_task(publisher.run())
    try:
        await _connected(publisher)  # its retained "online" status waits on the broker
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "prism_tui.cli", "fleet", "--broker", broker.url,
            "--duration", "2", "--json", cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await publisher.aclose()
        await runner
    assert proc.returncode == 0, err
    doc = json.loads(out)
    assert [(h["host"], h["state"]) for h in doc["hosts"]] == [("gpu-node-7", "online")]
    assert doc["fleet"] == [] and doc["alerts"] == []


def _as_schema_1(topic: str, payload: bytes) -> bytes:
    """A digest message as an earlier monitor sent it (JSON, fastdigest bytes)."""
    if not topic.endswith("/digest"):
        return payload
    message = decode(payload)
    return encode({
        "schema": 1, "encoding": "fastdigest-bytes-base64", "host": message.host,
        "target": {"pid": message.pid, "name": message.name, "profile": message.profile},
        "published_at": message.published_at,
        "series": [{"stage": e.stage, "phase": e.phase, "device": e.device,
                    "start_ns": e.start_ns, "end_ns": e.end_ns, "start": e.start,
                    "count": e.count, "sum_ms": e.sum_ms, "min_ms": e.min_ms,
                    "max_ms": e.max_ms, "digest": digest_text(e.digest.to_bytes())}
                   for e in message.entries]})


def test_the_fold_reads_both_schemas_alike_counts_late_windows_and_empties_when_they_age(
        ) -> None:
    clock = [EPOCH + 12.0]
    states = [FleetState(FLEET_ROOT, window_s=30, clock=lambda: clock[0]) for _ in range(2)]
    messages = list(host_messages("gpu-a", 10.0, 10))
    late = list(host_messages("gpu-b", 20.0, 10, seed=1))
    for topic, payload in messages:
        for state, wire in zip(states, (payload, _as_schema_1(topic, payload)), strict=True):
            state.ingest(topic, wire)
    first = [state.snapshot() for state in states]
    for topic, payload in late:  # after the fold of their seconds: a second part each
        for state, wire in zip(states, (payload, _as_schema_1(topic, payload)), strict=True):
            state.ingest(topic, wire)
    v2, v1 = (state.snapshot() for state in states)
    assert v2["rejected"] == v1["rejected"] == 0
    assert [r["count"] for r in first[0]["fleet"]] == [2000] * 3
    assert [r["count"] for r in v2["fleet"]] == [4000] * 3  # both hosts, every value
    for a, b in zip(v2["fleet"], v1["fleet"], strict=True):  # float32 vs float64 means
        for q in ("p50", "p90", "p99", "p999"):
            assert a[q] == pytest.approx(b[q], rel=1e-5), (a, b)
    rows = states[0].drain_windows()
    assert {(w.group[1], w.start) for w in rows} == {
        (stage, int(EPOCH) + s) for stage in (ITERATION, "device_sync", "scheduler")
        for s in range(10)}
    assert sum(w.count for w in rows) == 3 * 4000
    clock[0] += 60  # every window has left the window: nothing stays behind
    for state in states:
        assert state.snapshot()["fleet"] == []
        assert state._groups == {}  # the totals went with their seconds


def test_folding_and_pruning_in_steps_equals_doing_it_at_once() -> None:
    """``prism fleet`` folds and prunes in slices between messages: messages that
    arrive while a fold is in steps wait for the next fold, and the result is the
    snapshot of folding everything at once."""
    clock = [EPOCH + 12.0]
    stepped, at_once = (FleetState(FLEET_ROOT, window_s=8, clock=lambda: clock[0])
                        for _ in range(2))
    first = list(host_messages("gpu-a", 10.0, 10))
    second = list(host_messages("gpu-b", 20.0, 10, seed=1))
    for topic, payload in first:
        stepped.ingest(topic, payload)
        at_once.ingest(topic, payload)
    steps = stepped.fold_steps(buckets_per_step=1)
    next(steps)
    for topic, payload in second:  # arrive between two slices of the fold
        stepped.ingest(topic, payload)
        at_once.ingest(topic, payload)
    assert sum(1 for _ in steps) > 1
    assert stepped._dirty  # the late arrivals wait for the next fold
    for _ in stepped.fold_steps(buckets_per_step=3):
        pass
    assert not stepped._dirty
    assert sum(1 for _ in stepped.prune_steps(clock[0], hosts_per_step=1)) == 2
    a, b = stepped.snapshot(), at_once.snapshot()
    assert [r["count"] for r in a["fleet"]] == [r["count"] for r in b["fleet"]] == [2400] * 3
    for x, y in zip(a["fleet"], b["fleet"], strict=True):
        for q in ("p50", "p90", "p99", "p999"):
            assert x[q] == pytest.approx(y[q], rel=1e-9), (x, y)
    assert [(o["host"], o["p99"]) for o in a["outliers"]] == \
        [(o["host"], o["p99"]) for o in b["outliers"]]
