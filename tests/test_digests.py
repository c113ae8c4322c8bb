"""Digests on the wire: closed windows' t-digests through a real Mosquitto broker.

Two monitors (engines with their own hosts and publishers) publish their windows; a
subscriber merges both hosts' digests over every window and compares the merged
quantiles with those of the raw values. Then ``LiveSession`` on the simulator, whose
digest messages must carry exactly the windows its engine closed.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alerting.broker import EmbeddedBroker
from alerting.config import BrokerConfig
from alerting.digests import DigestMessage, decode, encode, merge_entries
from alerting.publisher import AlertPublisher
from alerting.schema import AlertSchemaError
from prism_tui.digest_feed import DigestFeed
from prism_tui.engine.core import DetectionConfig, Engine
from prism_tui.engine.monitor import Monitor, MonitorConfig
from prism_tui.engine.sketches import ITERATION, SeriesKey
from prism_tui.live import LiveSession
from probes.catalog import load_profile
from probes.target import Target
from tests.mqtt_fixtures import Subscriber, broker  # noqa: F401  (the fixture)
from tests.sim_scenarios import scenario_file, sim_server

SECONDS = 20
PER_SECOND = 400
"""Values per series per window: above the digests' 200 centroids, so they compress."""
SCALES = {"node-a": 10.0, "node-b": 14.0}
"""Median iteration time (ms) of each host: the fleet's distribution is bimodal."""


async def _connected(publisher: AlertPublisher) -> None:
    for _ in range(500):
        if publisher.status.state == "connected":
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"publisher never connected: {publisher.status}")


@pytest.mark.anyio
async def test_two_hosts_digests_merge_to_the_raw_samples_quantiles(
        broker: EmbeddedBroker) -> None:  # noqa: F811
    raw: list[float] = []
    received: list[DigestMessage] = []
    async with Subscriber(broker.url, "latencyprism/v1/+/+/digest") as sub:
        for host, scale in SCALES.items():
            now = [1_000 * 10**9]
            engine = Engine(host=host, clock=lambda now=now: now[0])  # type: ignore[misc]
            engine.watch(4242, "vllm", "anchor", {}, profile="cuda", device="cuda:0")
            publisher = AlertPublisher(BrokerConfig(url=broker.url), host=host, outbox=None)
            runner = asyncio.create_task(publisher.run())
            try:
                await _connected(publisher)
                feed = DigestFeed(engine, publisher.publish_digest)
                targets = engine.view().targets
                rng = random.Random(len(host) + int(scale))
                key = SeriesKey(ITERATION, "cuda:0", "decode")
                for _ in range(SECONDS):
                    start = now[0]
                    for i in range(PER_SECOND):
                        value = scale * rng.lognormvariate(0, 0.25)
                        raw.append(value)
                        engine.sketches.add(key, start + i * 2_000_000, value)
                        engine.sketches.add(SeriesKey("sync", "cuda:0", "decode"),
                                            start + i * 2_000_000, value / 3)
                    now[0] = start + 10**9
                    # a second later the window has closed (0.5 s lateness): it goes out
                    assert feed.poll(targets, start + 2 * 10**9) == 1
                    # a poll within the same second sends nothing: a series once a second
                    assert feed.poll(targets, start + 2 * 10**9 + 500_000_000) == 0
                assert feed.sent == SECONDS and publisher.digests_dropped == 0
                await asyncio.sleep(0.2)
            finally:
                await publisher.aclose()
                await runner
        messages = await sub.wait_for(2 * SECONDS)
    for m in messages:
        assert str(m.topic).endswith("/vllm-4242/digest")
        received.append(decode(bytes(m.payload)))  # type: ignore[arg-type]
    assert len(received) == 2 * SECONDS
    assert {r.host for r in received} == set(SCALES)
    entries = [e for r in received for e in r.entries
               if (e.stage, e.phase, e.device) == (ITERATION, "decode", "cuda:0")]
    assert len(entries) == 2 * SECONDS and all(e.count == PER_SECOND for e in entries)
    assert all(len(r.entries) == 2 for r in received)  # iteration and sync, once each
    merged = merge_entries(entries)
    assert merged is not None and merged.n_values == len(raw)
    for q in (0.5, 0.9, 0.99):
        truth = float(np.quantile(raw, q))
        assert abs(merged.quantile(q) - truth) / truth < 0.01, (q, merged.quantile(q), truth)


def test_a_bad_digest_message_is_one_clear_error() -> None:
    with pytest.raises(AlertSchemaError, match="not JSON"):
        decode(b"{")
    with pytest.raises(AlertSchemaError, match="unknown digest schema 3"):
        decode(encode({"schema": 3}))
    good = {"schema": 1, "encoding": "fastdigest-bytes-base64", "host": "h",
            "target": {"pid": 1, "name": "x", "profile": "cuda"}, "published_at": 1.0,
            "series": [{"stage": "iteration", "phase": "decode", "device": "cpu",
                        "start_ns": 0, "end_ns": 10**9, "start": 1.0, "count": 1,
                        "sum_ms": 1.0, "min_ms": 1.0, "max_ms": 1.0,
                        "digest": "bm90IGEgZGlnZXN0"}]}
    with pytest.raises(AlertSchemaError, match=r"series\[0\].digest is not a serialized"):
        decode(encode(good))
    # schema 2 (binary): the header and table must match the centroids that follow
    entry = {**good["series"][0], "count": 3, "means": [1.0, 2.0],  # type: ignore[index]
             "weights": [1, 2]}
    del entry["digest"]
    v2 = {**{k: v for k, v in good.items() if k != "encoding"}, "schema": 2,
          "series": [entry]}
    payload = encode(v2)
    (decoded,) = decode(payload).entries
    assert (decoded.count, decoded.max_ms, decoded.digest.n_values) == (3, 1.0, 3)
    for bad, said in (
            (payload[:-1], "bytes of centroids, the table says 2"),
            (payload[:7], "truncated"),
            (payload[:9] + b"x" + payload[10:], "header is not JSON"),
            (encode({**v2, "series": [{**entry, "count": 4}]}), "adding up to each series"),
            (encode({**v2, "series": [{**entry, "end_ns": 0}]}), "end_ns > start_ns"),
            (payload.replace(b'"stage":["iteration"]', b'"stage":[12345678901]'),
             "lists of strings"),
            (payload[:4] + b"\x03" + payload[5:], "unknown digest schema 3")):
        with pytest.raises(AlertSchemaError, match=said):
            decode(bad)


@pytest.mark.anyio
async def test_a_live_session_publishes_every_window_its_engine_closed(
        broker: EmbeddedBroker, tmp_path: Path) -> None:  # noqa: F811
    with sim_server(scenario_file(tmp_path, 30, seed=4, name="digests")) as server:
        stop_sim = threading.Event()
        runner = threading.Thread(target=server.run, args=(30, stop_sim), daemon=True)
        runner.start()
        session = LiveSession(
            lambda subscribers: Monitor(
                [Target(server.rank_pids[0])], load_profile("cuda"),
                detection=DetectionConfig(warmup=100),
                config=MonitorConfig(telemetry=False, snapshot_interval_s=0.2),
                subscribers=subscribers),
            broker=BrokerConfig(url=broker.url), outbox_path=str(tmp_path / "outbox.sqlite"))
        try:
            async with Subscriber(broker.url, "latencyprism/v1/+/+/digest") as sub:
                await session.run(None, None, 6.0)
                await asyncio.sleep(0.5)
                messages = list(sub.messages)
        finally:
            session.close()
            stop_sim.set()
            runner.join(10)
    assert session.digests is not None and session.digests.sent >= 3
    docs = [decode(bytes(m.payload)) for m in messages]  # type: ignore[arg-type]
    assert session.publisher is not None
    assert len(docs) == session.digests.sent - session.publisher.digests_dropped
    assert {d.pid for d in docs} == {server.rank_pids[0]}
    stamps = sorted(d.published_at for d in docs)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert all(gap >= 0.9 for gap in gaps), gaps  # once a second at most
    # what went out is what the engine closed: count per series, window by window
    sent: dict[tuple[str, str, str], int] = {}
    for d in docs:
        for e in d.entries:
            key = (e.stage, e.device, e.phase)
            sent[key] = sent.get(key, 0) + e.count
            assert e.digest.n_values == e.count
    engine = session.engine.sketches
    closed = {(k.stage, k.device, k.phase): sum(w.count for w in engine.windows(k))
              for k in engine.keys()}  # noqa: SIM118 (a WindowedSketches, not a dict)
    assert sent and all(0 < n <= closed[key] for key, n in sent.items())
    assert sent[(ITERATION, docs[0].entries[0].device, "decode")] > 50


def test_windows_closed_since_the_last_message_go_out_merged_once_per_series() -> None:
    now = [0]
    engine = Engine(host="h", clock=lambda: now[0])
    engine.watch(7, "rank0", "anchor", {}, profile="cuda", device="cuda:0")
    engine.watch(8, "rank1", "anchor", {}, profile="cuda", device="cuda:0")  # same device
    sent: list[tuple[str, dict[str, object]]] = []
    feed = DigestFeed(engine, lambda key, doc: sent.append((key, doc)))
    key = SeriesKey(ITERATION, "cuda:0", "decode")
    for second in range(3):  # three windows close before the feed looks (a stall)
        for i in range(10):
            engine.sketches.add(key, second * 10**9 + i, float(second * 10 + i))
    assert feed.poll(engine.view(4 * 10**9).targets, 4 * 10**9) == 1
    (target_key, doc), = sent
    assert target_key == "rank0-7"  # a device's series go with its lowest pid, once
    message = decode(encode(doc))
    (entry,) = message.entries
    assert (entry.start_ns, entry.end_ns, entry.count) == (0, 3 * 10**9, 30)
    assert (entry.min_ms, entry.max_ms, entry.sum_ms) == (0.0, 29.0, float(sum(
        s * 10 + i for s in range(3) for i in range(10))))
    assert entry.digest.n_values == 30 and entry.digest.max() == 29.0
    assert feed.poll(engine.view(6 * 10**9).targets, 6 * 10**9) == 0  # nothing new closed


def _real_v2_payload() -> bytes:
    """A schema-2 message of a real engine's windows (two series)."""
    now = [0]
    engine = Engine(host="h", clock=lambda: now[0])
    engine.watch(7, "rank0", "anchor", {}, profile="cuda", device="cuda:0")
    sent: list[bytes] = []
    feed = DigestFeed(engine, lambda _, doc: sent.append(encode(doc)))
    for i in range(40):
        engine.sketches.add(SeriesKey(ITERATION, "cuda:0", "decode"), i * 10**7, 10.0 + i)
        engine.sketches.add(SeriesKey("h2d", "cuda:0", "decode"), i * 10**7, 1.0 + i / 10)
    feed.poll(engine.view(2 * 10**9).targets, 2 * 10**9)
    (payload,) = sent
    return payload


V2_PAYLOAD = _real_v2_payload()


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(V2_PAYLOAD) - 1), st.integers(0, 255)),
                min_size=1, max_size=4), st.integers(0, len(V2_PAYLOAD)))
def test_a_damaged_schema_2_message_is_decoded_or_one_schema_error(
        edits: list[tuple[int, int]], keep: int) -> None:
    damaged = bytearray(V2_PAYLOAD)
    for at, byte in edits:
        damaged[at] = byte
    try:
        message = decode(bytes(damaged[:keep]))
    except AlertSchemaError as exc:
        assert "\n" not in str(exc)
        return
    for e in message.entries:  # what decodes is consistent
        assert e.count == int(e.weights.sum()) >= 1 and e.end_ns > e.start_ns
