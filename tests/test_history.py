"""History store on real SQLite files: round trips, merged quantiles, permissions, WAL,
migrations, retention, corrupt files, concurrent connections, the `prism history` report."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from prism_tui.engine.sketches import (
    ITERATION,
    SeriesKey,
    Window,
    WindowedSketches,
    merge_digests,
)
from prism_tui.history import (
    HistoryError,
    HistoryStore,
    IterationRecord,
    history_report,
    parse_duration,
    parse_time,
)
from prism_tui.history.query import history_report_async, rfc3339
from prism_tui.history.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    ProbeDecisionRecord,
    TargetRecord,
)

pytestmark = pytest.mark.anyio

S = 1_000_000_000
EPOCH = 1_767_225_600 * S  # 2026-01-01T00:00:00Z
KEY = SeriesKey("device_sync", "cuda:0", "decode")


class Clock:
    def __init__(self, ns: int) -> None:
        self.ns = ns

    def __call__(self) -> int:
        return self.ns


def clocks(mono_s: int = 1000) -> tuple[Clock, Clock]:
    """Monotonic at ``mono_s`` and wall at EPOCH + mono_s: wall = mono + EPOCH."""
    return Clock(mono_s * S), Clock(EPOCH + mono_s * S)


def make_windows(seconds: int, keys: list[SeriesKey], seed: int = 0,
                 base_ns: int = 0) -> list[Window]:
    """20 lognormal values per second per key, windows starting at mono ``base_ns``."""
    rng = np.random.default_rng(seed)
    sk = WindowedSketches(retain_s=max(seconds, 1) + 10, clock=Clock(0))
    for sec in range(seconds):
        for k in keys:
            for j, v in enumerate(rng.lognormal(1, 0.5, 20).tolist()):
                sk.add(k, base_ns + sec * S + j * 50_000_000, v)
    sk.flush()
    return list(sk.closed_windows_since(0))


def store(path: Path, mono: Clock | None = None, wall: Clock | None = None,
          **kw: Any) -> HistoryStore:
    m, w = clocks()
    return HistoryStore(path, mono_clock=mono or m, wall_clock=wall or w, **kw)


async def test_windows_round_trip_and_merged_quantiles(tmp_path: Path) -> None:
    keys = [KEY, SeriesKey(ITERATION, "cuda:0", "decode"), SeriesKey("nccl", "cuda:1", "decode")]
    windows = make_windows(120, keys)
    db = tmp_path / "h.db"
    async with store(db) as st:
        assert await st.write_windows(windows) == len(windows)
        assert await st.series() == sorted(keys)
        rows = await st.quantiles(stage="device_sync")
        assert [r.series for r in rows] == [KEY.name]
        mine = [w for w in windows if w.key == KEY]
        local = merge_digests(w.digest for w in mine)
        assert local is not None
        (r,) = rows
        assert r.count == sum(w.count for w in mine) == local.n_values
        assert (r.p50, r.p90, r.p99, r.p999) == tuple(
            local.quantile(q) for q in (0.5, 0.9, 0.99, 0.999))
        assert r.max == max(w.max for w in mine)
        # steps of 30 s over wall time (wall = mono + EPOCH with the fake clocks)
        steps = await st.quantiles(device="cuda:0", phase="decode", since_ns=EPOCH,
                                   until_ns=EPOCH + 120 * S, step_s=30)
        assert {r.series for r in steps} == {KEY.name, keys[1].name}
        assert [r.start_ns for r in steps if r.series == KEY.name] == [
            EPOCH + i * 30 * S for i in range(4)]
        assert all(r.count == 30 * 20 for r in steps)
        part = [w for w in mine if 30 * S <= w.start_ns < 60 * S]
        merged = merge_digests(w.digest for w in part)
        assert merged is not None
        assert steps[1].p99 == merged.quantile(0.99)
        # a range filter is [since, until)
        few = await st.quantiles(stage="device_sync", since_ns=EPOCH + 10 * S,
                                 until_ns=EPOCH + 15 * S)
        assert few[0].count == 5 * 20


async def test_file_mode_0600_and_wal_whatever_the_umask(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "h.db"
    old = os.umask(0)
    try:
        async with store(db) as st:
            await st.write_windows(make_windows(2, [KEY]))
            assert await st.journal_mode() == "wal"
            wal = db.with_name("h.db-wal")
            assert wal.exists()
            for f in (db, wal):
                assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    finally:
        os.umask(old)
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


async def test_open_close_idempotent_and_not_open_errors(tmp_path: Path) -> None:
    st = store(tmp_path / "h.db")
    with pytest.raises(HistoryError):
        await st.counts()
    assert await st.open() is await st.open()
    await st.close()
    await st.close()
    with pytest.raises(HistoryError, match="closed"):
        await st.open()


async def test_migrations_from_empty_and_old_files(tmp_path: Path) -> None:
    zero = tmp_path / "zero.db"
    zero.write_bytes(b"")
    async with store(zero) as st:
        assert await st.user_version() == SCHEMA_VERSION == 2
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).execute("VACUUM").connection.close()
    assert empty.stat().st_size == 0 or empty.read_bytes().startswith(b"SQLite format 3")
    async with store(empty) as st:
        assert await st.user_version() == 2
        assert set((await st.counts()).keys()) >= {"windows", "iterations", "alerts"}
    # a file of this version with data, opened by a version that knows one more migration
    old = tmp_path / "old.db"
    async with store(old) as st:
        await st.write_alert({"id": "a1", "status": "firing", "fingerprint": "f"})
    nxt = SCHEMA_VERSION + 1
    newer = (*MIGRATIONS, (nxt, "alert notes", ("ALTER TABLE alerts ADD COLUMN note TEXT",)))
    async with store(old, migrations=newer) as st:
        assert await st.user_version() == nxt
        assert [a["alert"]["id"] for a in await st.alerts()] == ["a1"]
    con = sqlite3.connect(old)
    assert "note" in [r[1] for r in con.execute("PRAGMA table_info(alerts)")]
    con.close()
    # ...and that file is now too new for this version: refused, untouched
    before = old.read_bytes()
    with pytest.raises(HistoryError, match="newer"):
        await store(old).open()
    assert old.read_bytes() == before


def write_v1_file(path: Path) -> None:
    """A history file as schema v1 left it: its DDL, ``user_version`` 1, one iteration."""
    con = sqlite3.connect(path)
    for sql in MIGRATIONS[0][2]:
        con.execute(sql)
    con.execute("PRAGMA user_version = 1")
    con.execute(
        "INSERT INTO iterations(target, pid, device, phase, idx, start_ns, end_ns, wall_ns,"
        " session, latency_ms, features, predicted_ms, error)"
        " VALUES ('pid 7', 7, 'cuda:0', 'decode', 3, ?, ?, ?, NULL, 20.0, ?, 19.5, 0.025)",
        (S, S + 20_000_000, EPOCH + S + 20_000_000, '{"batch": 8.0}'))
    con.commit()
    con.close()


async def test_a_v1_file_is_migrated_in_place_and_its_iterations_read_no_stages(
    tmp_path: Path,
) -> None:
    db = tmp_path / "v1.db"
    write_v1_file(db)
    con = sqlite3.connect(db)
    assert "stages" not in [r[1] for r in con.execute("PRAGMA table_info(iterations)")]
    con.close()
    async with store(db) as st:
        assert await st.user_version() == 2
        (it,) = await st.iterations()
        assert it == IterationRecord("pid 7", 7, "cuda:0", "decode", 3, S, S + 20_000_000,
                                     20.0, {"batch": 8.0}, 19.5, 0.025)
        assert it.stages == {}
        # new rows in the migrated file keep their stages next to the old one
        new = IterationRecord("pid 7", 7, "cuda:0", "decode", 4, 2 * S, 2 * S + 10_000_000,
                              10.0, stages={"device_sync": 7.5, "host": 2.5})
        await st.write_iterations([new])
        assert [i.stages for i in await st.iterations()] == [{}, new.stages]
    con = sqlite3.connect(db)  # in place: the same file, now v2, with the column
    assert con.execute("PRAGMA user_version").fetchone()[0] == 2
    assert "stages" in [r[1] for r in con.execute("PRAGMA table_info(iterations)")]
    assert con.execute("SELECT count(*) FROM iterations").fetchone()[0] == 2
    con.close()


async def test_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE recipes(name TEXT)")
    con.commit()
    con.close()
    before = other.read_bytes()
    with pytest.raises(HistoryError, match="not a LatencyPrism history database"):
        await store(other).open()
    assert other.read_bytes() == before


@pytest.mark.parametrize("kind", ["garbage", "short", "truncated"])
async def test_corrupt_file_gives_one_clear_error_and_loses_nothing(
    tmp_path: Path, kind: str,
) -> None:
    db = tmp_path / "h.db"
    if kind == "garbage":
        db.write_bytes(os.urandom(8192))
    elif kind == "short":
        db.write_bytes(b"SQLite format 3\x00\x10\x00")
    else:
        async with store(db) as st:
            await st.write_windows(make_windows(60, [KEY]))
        assert not db.with_name("h.db-wal").exists()  # checkpointed at close
        data = db.read_bytes()
        db.write_bytes(data[: len(data) // 2])
    before = db.read_bytes()
    listing = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(HistoryError) as info:
        await store(db).open()
    msg = str(info.value)
    assert msg.startswith(f"{db}: not a LatencyPrism history database (")
    if kind != "truncated":
        assert "(file is not a database)" in msg
    assert "move it aside" in msg and "\n" not in msg
    assert info.value.exit_code == 2
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    with pytest.raises(HistoryError):  # the report path says the same
        await history_report_async(db, "1h", None, None, None)


async def test_iterations_alerts_targets_probe_decisions_and_purge(tmp_path: Path) -> None:
    mono, wall = clocks()
    async with store(tmp_path / "h.db", mono, wall) as st:
        its = [IterationRecord("vllm", 42, "cuda:0", "decode", i, i * S, i * S + 20_000_000,
                               20.0 + i, {"batch": 8.0, "kv_len": 100.0 + i}, 21.0, 0.01,
                               {"device_sync": 15.25 + i, "nccl": 0.0001, "host": 4.75}
                               if i % 2 else {})
               for i in range(100)]
        assert await st.write_iterations(its) == 100
        back = await st.iterations()
        assert back == its
        assert back[1].stages == {"device_sync": 16.25, "nccl": 0.0001, "host": 4.75}
        alert = {"id": "x1", "fingerprint": "fp", "status": "firing", "severity": "critical",
                 "target": {"pid": 42, "name": "vllm"}, "device": "cuda:0",
                 "stage": "iteration", "phase": "decode", "summary": "decode slow",
                 "iteration_end_ns": 5 * S}
        assert await st.write_alert(alert, at_ns=EPOCH + 50 * S)
        assert not await st.write_alert(alert, at_ns=EPOCH + 51 * S)  # redelivery: ignored
        assert await st.write_alert({**alert, "id": "x2", "status": "resolved"},
                                    at_ns=EPOCH + 90 * S)
        got = await st.alerts(EPOCH + 40 * S, EPOCH + 60 * S)
        assert [a["alert"]["status"] for a in got] == ["firing"]
        assert got[0]["alert"] == alert and got[0]["at_ns"] == EPOCH + 50 * S
        assert len(await st.alerts()) == 2
        await st.write_target(42, "vllm", "cuda", "cuda:0", EPOCH + 1 * S)
        await st.write_target(42, "vllm", None, "cuda:0", EPOCH + 99 * S)
        assert await st.write_probe_decisions(
            42, [("cuLaunchKernel", "attached", None), ("ncclAllReduce", "skipped", "no lib")],
            EPOCH + 2 * S) == 2
        await st.write_windows(make_windows(100, [KEY]))
        counts = await st.counts()
        assert counts == {"sessions": 1, "windows": 100, "iterations": 100, "alerts": 2,
                          "targets": 1, "probe_decisions": 2}
        deleted = await st.purge(older_than_ns=EPOCH + 30 * S, max_iterations=50)
        assert deleted["windows"] == 30 and deleted["probe_decisions"] == 2
        assert deleted["iterations"] == 30 + 20
        assert deleted["alerts"] == 0 and deleted["targets"] == 0
        left = await st.iterations()
        assert [i.index for i in left] == list(range(50, 100))
        assert (await st.counts())["windows"] == 70


async def test_an_attached_target_is_touched_and_read_back(tmp_path: Path) -> None:
    """``last_seen_ns`` advances with touches (never back), in the file another
    connection reads; ``targets()`` and ``probe_decisions()`` read what was written."""
    db = tmp_path / "h.db"
    mono, wall = clocks()
    async with store(db, mono, wall) as st:
        assert await st.targets() == [] and await st.probe_decisions() == []
        await st.write_target(42, "vllm", "cuda", "cuda:0")  # at the wall clock: EPOCH+1000s
        await st.write_target(43, "vllm", "cuda", "cuda:1", EPOCH + 1001 * S)
        wall.ns += 5 * S
        assert await st.touch_targets([(42, "vllm", "cuda:0"), (43, "vllm", "cuda:1")]) == 2
        assert await st.touch_targets([(43, "vllm", "cuda:1")], EPOCH + 1010 * S) == 1
        assert await st.touch_targets([(43, "vllm", "cuda:1")], EPOCH + 1002 * S) == 1
        assert await st.touch_targets([(44, "vllm", "cuda:0"), (42, "vllm", "cpu")]) == 0
        assert await st.touch_targets([]) == 0
        assert await st.targets() == [
            TargetRecord(42, "vllm", "cuda", "cuda:0", EPOCH + 1000 * S, EPOCH + 1005 * S),
            TargetRecord(43, "vllm", "cuda", "cuda:1", EPOCH + 1001 * S, EPOCH + 1010 * S)]
        assert [t.pid for t in await st.targets(since_ns=EPOCH + 1006 * S)] == [43]
        assert len(await st.targets()) == 2  # the unknown keys added no row
        await st.write_probe_decisions(43, [("stream_sync", "attached", None)], EPOCH + 3 * S)
        await st.write_probe_decisions(
            42, [("stream_sync", "attached", None), ("allreduce", "unresolved", "no libnccl")],
            EPOCH + 2 * S)
        assert await st.probe_decisions() == [
            ProbeDecisionRecord(42, "stream_sync", "attached", None, EPOCH + 2 * S),
            ProbeDecisionRecord(42, "allreduce", "unresolved", "no libnccl", EPOCH + 2 * S),
            ProbeDecisionRecord(43, "stream_sync", "attached", None, EPOCH + 3 * S)]
        assert [d.probe for d in await st.probe_decisions(target_pid=42)] == [
            "stream_sync", "allreduce"]
        assert await st.probe_decisions(since_ns=EPOCH + 3 * S) == [
            ProbeDecisionRecord(43, "stream_sync", "attached", None, EPOCH + 3 * S)]
        # retention keeps what was touched: 42 was last seen at +1005 s
        deleted = await st.purge(older_than_ns=EPOCH + 1006 * S)
        assert deleted["targets"] == 1
        assert [t.pid for t in await st.targets()] == [43]
    with sqlite3.connect(db) as conn:  # committed to the file, not only this connection
        assert conn.execute("SELECT pid, first_seen_ns, last_seen_ns FROM targets").fetchall() \
            == [(43, EPOCH + 1001 * S, EPOCH + 1010 * S)]


async def test_wall_clock_anchor_across_restarts(tmp_path: Path) -> None:
    """Two sessions (the second after a reboot: monotonic restarts) line up by wall time."""
    db = tmp_path / "h.db"
    async with store(db, Clock(100 * S), Clock(EPOCH + 100 * S)) as st:
        await st.write_windows(make_windows(10, [KEY]))  # mono 0..10 s -> wall EPOCH+0..10
    # after a reboot monotonic is small again, wall has moved on by an hour
    async with store(db, Clock(50 * S), Clock(EPOCH + 3600 * S + 50 * S)) as st:
        await st.write_windows(make_windows(10, [KEY], seed=1))
        rows = await st.quantiles(step_s=3600, since_ns=EPOCH)
        assert [(r.start_ns, r.count) for r in rows] == [(EPOCH, 200), (EPOCH + 3600 * S, 200)]
        assert (await st.counts())["sessions"] == 2


async def test_concurrent_writer_and_reader(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    windows = make_windows(200, [KEY])
    async with store(db) as writer, store(db) as reader:
        seen: list[int] = []

        async def write() -> None:
            for i in range(0, len(windows), 10):
                await writer.write_windows(windows[i:i + 10])
                await asyncio.sleep(0)

        async def read() -> None:
            while not seen or seen[-1] < len(windows):
                rows = await reader.quantiles(stage=KEY.stage)
                seen.append(sum(r.count for r in rows) // 20)
                await asyncio.sleep(0)

        await asyncio.wait_for(asyncio.gather(write(), read()), timeout=15)
    assert seen == sorted(seen) and seen[-1] == 200
    assert all(n % 10 == 0 for n in seen)  # batches are atomic: never half a batch


def test_parse_duration_and_time() -> None:
    assert parse_duration("90s") == 90 and parse_duration("15m") == 900
    assert parse_duration("2h") == 7200 and parse_duration("1d") == 86400
    assert parse_duration("30") == 30
    now = EPOCH + 7200 * S
    assert parse_time("1h", now) == EPOCH + 3600 * S
    assert parse_time("2026-01-01T00:00:00Z", now) == EPOCH
    assert parse_time("2026-01-01T01:00:00.5+01:00", now) == EPOCH + S // 2
    for bad in ("5 parsecs", "yesterday", "2026-01-01T00:00:00"):
        with pytest.raises(HistoryError):
            parse_time(bad, now)
    assert rfc3339(EPOCH + 1500) == "2026-01-01T00:00:00.000001Z"


async def test_history_report(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    keys = [KEY, SeriesKey("nccl", "cuda:1", "decode")]
    mono, wall = clocks(1000)
    async with store(db, mono, wall) as st:
        await st.write_windows(make_windows(600, keys))  # wall EPOCH .. EPOCH+600 s
        await st.write_alert({"id": "a", "status": "firing", "summary": "slow"},
                             at_ns=EPOCH + 300 * S)
    now = EPOCH + 600 * S
    rep = await history_report_async(db, "10m", None, "device_sync", None, now_ns=now)
    assert rep["since"] == "2026-01-01T00:00:00Z" and rep["until"] == "2026-01-01T00:10:00Z"
    assert rep["step_s"] == 10  # 600 s in at most 60 points
    (series,) = rep["series"]
    assert series["series"] == KEY.name and series["device"] == "cuda:0"
    assert series["total"]["count"] == 600 * 20
    assert len(series["points"]) == 60 and series["points"][0]["start"] == rep["since"]
    assert [a["alert"]["id"] for a in rep["alerts"]] == ["a"]
    assert rep["alerts"][0]["at"] == "2026-01-01T00:05:00Z"
    rep = await history_report_async(db, "2026-01-01T00:01:00Z", "5m", None, "cuda:1",
                                     now_ns=now)
    assert [s["series"] for s in rep["series"]] == ["nccl/cuda:1/decode"]
    assert rep["series"][0]["total"]["count"] == 240 * 20 and rep["alerts"] == []
    with pytest.raises(HistoryError, match="empty time range"):
        await history_report_async(db, "1m", "2m", None, None, now_ns=now)
    missing = tmp_path / "nope.db"
    with pytest.raises(HistoryError, match="no such history database"):
        await history_report_async(missing, None, None, None, None)
    assert not missing.exists()


def test_history_report_sync_wrapper(tmp_path: Path) -> None:
    db = tmp_path / "h.db"

    async def fill() -> None:
        async with HistoryStore(db) as st:  # real clocks: windows of the last ~10 s
            base = time.monotonic_ns() // S * S - 10 * S
            await st.write_windows(make_windows(5, [KEY], base_ns=base))

    asyncio.run(fill())
    rep = history_report(db, "1h", None, None, None)
    assert rep["series"][0]["total"]["count"] == 100
