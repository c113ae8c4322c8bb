"""Real fleet messages for tests: digests from real engines through :class:`DigestFeed`,
statuses and alerts as the publisher writes them, on fixed clocks so pictures repeat."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

from alerting.digests import encode
from alerting.fleet import FleetState
from prism_tui.digest_feed import DigestFeed
from prism_tui.engine.core import Engine
from prism_tui.engine.sketches import ITERATION, SeriesKey
from tests.mqtt_fixtures import sample_alert

ROOT = "latencyprism/v1"
EPOCH = 1_780_000_000.0
"""The fixed wall clock the messages start at (2026-05-28)."""
STAGES = (ITERATION, "device_sync", "scheduler")


def host_messages(host: str, scale: float, seconds: int, *, epoch: float = EPOCH,
                  per_second: int = 200, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """(topic, payload) of one host: its retained ``online`` status, then one digest
    message per second of lognormal stage latencies scaled by ``scale`` (ms)."""
    yield f"{ROOT}/{host}/status", json.dumps(
        {"state": "online", "at": "2026-05-28T00:00:00Z", "host": host}).encode()
    now = [0]
    engine = Engine(host=host, clock=lambda: now[0],
                    wall_clock=lambda: epoch + now[0] / 1e9)
    engine.watch(4242, "vllm", "anchor", {}, profile="cuda", device="cuda:0")
    sent: list[tuple[str, bytes]] = []
    feed = DigestFeed(engine, lambda key, doc: sent.append(
        (f"{ROOT}/{host}/{key}/digest", encode(doc))))
    rng = random.Random(seed)
    targets = engine.view().targets
    for second in range(seconds):
        for i in range(per_second):
            at = second * 10**9 + i * (10**9 // per_second)
            for k, stage in enumerate(STAGES):
                value = scale * (1 + k) * rng.lognormvariate(0, 0.25)
                engine.sketches.add(SeriesKey(stage, "cuda:0", "decode"), at, value)
        now[0] = (second + 2) * 10**9
        feed.poll(targets, now[0])
        yield from sent
        sent.clear()


def alert_message(host: str, fingerprint: str) -> tuple[str, bytes]:
    """A firing alert of ``host`` as published."""
    alert = sample_alert(fingerprint, host=host)
    return f"{ROOT}/{host}/vllm-4242/alert", alert.to_json()


def small_fleet(clock_at: float = EPOCH + 12.0) -> FleetState:
    """Three hosts (gpu-c 50 % slower), one firing alert, gpu-a gone offline."""
    state = FleetState(ROOT, window_s=60, clock=lambda: clock_at)
    for i, (host, scale) in enumerate((("gpu-a", 10.0), ("gpu-b", 10.0), ("gpu-c", 15.0))):
        for topic, payload in host_messages(host, scale, 10, seed=i):
            state.ingest(topic, payload)
    state.ingest(*alert_message("gpu-c", "fp-c"))
    state.ingest(f"{ROOT}/gpu-a/status", json.dumps(
        {"state": "offline", "reason": "stopped", "at": "2026-05-28T00:00:11Z"}).encode())
    return state
