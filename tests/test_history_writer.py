"""The history writer: a replayed recording flows into a real SQLite file and back out."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from prism_tui.engine.core import AlertEvent, DetectionConfig, Engine, Observation, SloSpec
from prism_tui.engine.detector import Verdict
from prism_tui.engine.iterations import HOST, Iteration
from prism_tui.engine.recording import ReplayClock, load_spans, replay
from prism_tui.engine.sketches import WindowedSketches
from prism_tui.history import HistoryStore
from prism_tui.history.query import history_report_async
from prism_tui.history.writer import HistoryWriter

pytestmark = pytest.mark.anyio
RECORDING = Path(__file__).resolve().parent / "data" / "sim_spans.jsonl.gz"


class WriterSubscriber:
    """The history writer as an engine's alert sink and observer, given at the engine's
    construction (as the live session's): the writer reads the engine's sketches, so it
    is made after the engine and handed in here."""

    def __init__(self) -> None:
        self.writer: HistoryWriter | None = None

    def emit(self, alert: AlertEvent) -> None:
        """Hand one alert to the writer."""
        assert self.writer is not None
        self.writer.emit(alert)

    def observe(self, obs: Observation) -> None:
        """Hand one judged iteration to the writer."""
        assert self.writer is not None
        self.writer.observe(obs)


async def test_replayed_iterations_windows_and_alerts_reach_the_history(tmp_path: Path) -> None:
    procs, spans = load_spans(str(RECORDING))
    clock = ReplayClock(spans[0].start_ns)
    to_history = WriterSubscriber()
    engine = Engine(DetectionConfig(rule="prism", warmup=150,
                                    slos=[SloSpec("decode p99 <= 15ms over 1s")]),
                    sinks=[to_history], on_observation=to_history.observe, clock=clock)
    db = tmp_path / "history.sqlite"
    async with HistoryStore(db, mono_clock=clock) as store:
        writer = to_history.writer = HistoryWriter(store, engine.sketches)
        replay(engine, clock, procs, spans)
        engine.sketches.flush()
        await writer.flush()
        counts = await store.counts()
        assert writer.last_error == ""
        assert counts["iterations"] == engine.iterations_seen
        stored = await store.iterations(limit=counts["iterations"])
        assert all(HOST in i.stages for i in stored)  # every iteration kept its stages
        assert all(sum(i.stages.values()) <= i.latency_ms + 1e-3 for i in stored)
        assert counts["alerts"] == len(engine.alerts) > 0
        assert counts["windows"] == writer.written["windows"] > 0
        # a second flush writes nothing twice
        await writer.flush()
        assert await store.counts() == counts
    assert os.stat(db).st_mode & 0o777 == 0o600
    report = await history_report_async(db, since="1d", stage="iteration")
    assert report["series"] and report["alerts"]
    total = report["series"][0]["total"]
    assert total["count"] > 0 and 5 < total["p50"] < 50


async def test_a_broken_database_is_a_value_and_nothing_is_dropped(tmp_path: Path) -> None:
    procs, spans = load_spans(str(RECORDING))
    clock = ReplayClock(spans[0].start_ns)
    to_history = WriterSubscriber()
    engine = Engine(DetectionConfig(rule="prism", warmup=150),
                    on_observation=to_history.observe, clock=clock)
    db = tmp_path / "history.sqlite"
    store = await HistoryStore(db, mono_clock=clock).open()
    writer = to_history.writer = HistoryWriter(store, engine.sketches)
    replay(engine, clock, procs, spans[: len(spans) // 2])
    await store.close()  # the connection is gone: writes fail
    await writer.flush()
    assert writer.last_error.startswith("history:")
    queued = len(writer._iterations)
    assert queued == engine.iterations_seen  # kept for the next flush
    async with HistoryStore(db, mono_clock=clock) as again:
        writer.store = again
        await writer.flush()
        assert writer.last_error == ""
        assert (await again.counts())["iterations"] == queued
    stop = asyncio.Event()
    stop.set()
    await writer.run(stop)  # returns after one last flush


async def test_an_observation_is_stored_with_its_stages_in_ms(tmp_path: Path) -> None:
    it = Iteration(pid=42, device="cuda:0", index=7, start_ns=10**9,
                   end_ns=10**9 + 20_000_000, phase="decode",
                   stages={"device_sync": 15_123_456, "nccl": 60, HOST: 4_876_484},
                   features={"batch": 8.0})
    verdict = Verdict(t_ns=it.end_ns, observed_ms=20.0, predicted_ms=18.5, error=0.075,
                      smoothed=0.05, ucl=0.3, firing=False)
    async with HistoryStore(tmp_path / "h.sqlite") as store:
        writer = HistoryWriter(store, WindowedSketches())
        writer.observe(Observation(it, verdict))
        writer.observe(Observation(Iteration(42, "cuda:0", 8, it.end_ns, it.end_ns + 10**6,
                                             "decode"), None))
        await writer.flush()
        assert writer.last_error == ""
        first, second = await store.iterations()
    assert first.stages == {"device_sync": 15.1235, "nccl": 0.0001, HOST: 4.8765}
    assert (first.index, first.latency_ms, first.predicted_ms, first.error) == (
        7, 20.0, 18.5, 0.075)
    assert first.features == {"batch": 8.0}
    assert second.stages == {} and second.predicted_ms is None
