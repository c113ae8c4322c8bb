"""Windowed t-digest sketches: windows, merging, serialization, snapshots, invariants."""

from __future__ import annotations

import dataclasses
import math
import time
from types import MappingProxyType

import numpy as np
import pytest
from fastdigest import TDigest
from hypothesis import given, settings
from hypothesis import strategies as st

from prism_tui.engine.sketches import (
    ITERATION,
    SeriesKey,
    WindowedSketches,
    digest_from_bytes,
    digest_to_bytes,
    merge_digests,
)

S = 1_000_000_000
K = SeriesKey("device_sync", "cuda:0", "decode")
IT = SeriesKey(ITERATION, "cuda:0", "decode")


class FakeClock:
    def __init__(self, ns: int = 0) -> None:
        self.ns = ns

    def __call__(self) -> int:
        return self.ns


def test_series_key_name_round_trip() -> None:
    assert SeriesKey.parse(K.name) == K
    assert K.name == "device_sync/cuda:0/decode"
    odd = SeriesKey("memcpy", "/dev/accel/accel0", "decode")
    assert SeriesKey.parse(odd.name) == odd
    for bad in ("a/b", "a", "/x/y", "a/b/"):
        with pytest.raises(ValueError):
            SeriesKey.parse(bad)


def test_windows_close_by_value_timestamps() -> None:
    sk = WindowedSketches(clock=FakeClock(), lateness_s=0.5)
    for i in range(10):
        sk.add(K, 10 * S + i * 100_000_000, float(i))  # window [10 s, 11 s)
    assert sk.windows(K) == ()
    sk.add(K, 11 * S + 400_000_000, 100.0)  # watermark 11.4 s: 10 s window still open
    assert sk.windows(K) == ()
    sk.add(K, 11 * S + 600_000_000, 100.0)  # watermark 11.6 s - 0.5 > 11 s: closes
    (w,) = sk.windows(K)
    assert (w.start_ns, w.end_ns, w.count, w.min, w.max) == (10 * S, 11 * S, 10, 0.0, 9.0)
    assert w.sum == pytest.approx(45.0)
    assert w.digest.quantile(0.5) == pytest.approx(4.5, abs=0.6)
    assert sk.closed_until_ns == 11 * S
    sk.add(K, 10 * S + 999, 1.0)  # its window is closed: late, dropped
    assert sk.late == 1 and sk.windows(K)[0].count == 10
    sk.add(K, 12 * S, math.nan)
    assert sk.rejected == 1


def test_tick_closes_quiet_series_with_the_injected_clock() -> None:
    clock = FakeClock()
    sk = WindowedSketches(clock=clock, lateness_s=0.25)
    sk.add(K, 5 * S + 1, 2.0)
    clock.ns = 6 * S + 200_000_000
    assert sk.tick() == 0
    clock.ns = 6 * S + 300_000_000
    assert sk.tick() == 1
    assert [w.start_ns for w in sk.windows(K)] == [5 * S]


def test_closed_windows_feed_is_complete_and_duplicate_free() -> None:
    sk = WindowedSketches(clock=FakeClock())
    keys = [SeriesKey(s, d, "decode") for s in ("a", "b") for d in ("cuda:0", "cuda:1")]
    cursor = 0
    seen: list[tuple[SeriesKey, int]] = []
    for t in range(0, 20 * S, 50_000_000):
        for k in keys:
            sk.add(k, t, 1.0)
        if t % (3 * S) == 0:
            batch = sk.closed_windows_since(cursor)
            seen += [(w.key, w.start_ns) for w in batch]
            cursor = sk.closed_until_ns or 0
    sk.flush()
    seen += [(w.key, w.start_ns) for w in sk.closed_windows_since(cursor)]
    assert len(seen) == len(set(seen)) == 20 * len(keys)
    assert [s for _, s in seen] == sorted(s for _, s in seen)


def test_merged_spans_and_retention() -> None:
    clock = FakeClock()
    sk = WindowedSketches(retain_s=60, clock=clock, block_windows=10)
    for sec in range(100):
        for j in range(10):
            sk.add(K, sec * S + j * 100_000_000, float(sec))
    sk.flush()
    clock.ns = 100 * S
    assert len(sk.windows(K)) == 60  # retention trims windows older than 60 s
    d10 = sk.merged(K, 10)
    assert d10 is not None and d10.n_values == 100
    assert (d10.min(), d10.max()) == (90.0, 99.0)
    d60 = sk.merged(K, 60)
    assert d60 is not None and d60.n_values == 600 and d60.min() == 40.0
    # a range not aligned to blocks merges blocks and edge windows: same counts and extremes
    d = sk.merged_range(K, 43 * S, 87 * S)
    assert d is not None and (d.n_values, d.min(), d.max()) == (440, 43.0, 86.0)
    assert sk.merged(SeriesKey("x", "y", "z"), 10) is None


def test_serialized_digests_merge_like_local_ones() -> None:
    rng = np.random.default_rng(3)
    hosts = [TDigest.from_values(rng.lognormal(1, 0.5, 5000).tolist(), max_centroids=200)
             for _ in range(4)]
    blobs = [digest_to_bytes(d) for d in hosts]
    remote = merge_digests(digest_from_bytes(b) for b in blobs)
    local = merge_digests(hosts)
    assert remote is not None and local is not None
    assert remote.n_values == local.n_values == 20_000
    for q in (0.5, 0.9, 0.99, 0.999):
        assert remote.quantile(q) == local.quantile(q)
    assert digest_to_bytes(remote) == digest_to_bytes(local)
    with pytest.raises(ValueError):
        digest_from_bytes(b"\x00garbage")
    assert merge_digests([]) is None


def test_merged_p999_matches_exact_quantile() -> None:
    rng = np.random.default_rng(42)
    x = rng.lognormal(1.0, 0.6, 100_000)
    sk = WindowedSketches(retain_s=300, clock=FakeClock())
    for i, v in enumerate(x.tolist()):
        sk.add(K, i * 1_000_000, v)  # 1 ms apart: 100 windows of 1,000 values
    sk.flush()
    assert len(sk.windows(K)) == 100
    merged = sk.merged_range(K, 0, 100 * S)
    assert merged is not None and merged.n_values == 100_000
    for q in (0.5, 0.9, 0.99, 0.999):
        exact = float(np.quantile(x, q))
        assert abs(merged.quantile(q) - exact) / exact < 0.02, q


def test_snapshot_is_immutable_and_computes_share_rate_sparkline() -> None:
    clock = FakeClock()
    sk = WindowedSketches(clock=clock, spark_windows=5)
    for sec in range(20):
        for j in range(4):
            t = sec * S + j * 250_000_000
            sk.add(IT, t, 10.0)
            sk.add(K, t, 2.5 if sec < 15 else 5.0)
    sk.flush()
    clock.ns = 20 * S
    snap = sk.snapshot(span_s=10)
    assert isinstance(snap.series, MappingProxyType)
    with pytest.raises(TypeError):
        snap.series[K] = snap.series[IT]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.span_s = 5  # type: ignore[misc]
    st_ = snap.get("device_sync", "cuda:0", "decode")
    assert st_ is not None
    assert st_.count == 40 and st_.rate == pytest.approx(4.0)
    assert st_.share == pytest.approx((5 * 4 * 2.5 + 5 * 4 * 5.0) / (40 * 10.0))
    assert st_.max == 5.0 and st_.min == 2.5
    assert st_.min <= st_.p50 <= st_.p90 <= st_.p99 <= st_.p999 <= st_.max
    assert st_.sparkline == (5.0,) * 5
    assert isinstance(st_.sparkline, tuple)
    it = snap.get(ITERATION, "cuda:0", "decode")
    assert it is not None and it.share == 1.0
    assert snap.devices == ("cuda:0",) and snap.stages == ("device_sync", ITERATION)
    # cached between closes, but the snapshot object carries the new `now`
    again = sk.snapshot(20 * S + 5, span_s=10)
    assert again.series is snap.series and again.now_ns == 20 * S + 5


def test_snapshot_steps_compute_the_same_snapshot_one_series_at_a_time() -> None:
    def fed() -> tuple[WindowedSketches, FakeClock]:
        clock = FakeClock()
        sk = WindowedSketches(clock=clock, block_windows=4)
        for sec in range(40):
            for j in range(5):
                t = sec * S + j * 200_000_000
                sk.add(IT, t, 10.0 + j)
                sk.add(K, t, 2.0 + (sec % 7))
        clock.ns = 40 * S + S // 2
        return sk, clock

    stepped, _ = fed()
    steps = list(stepped.snapshot_steps(span_s=30))
    assert len(steps) == 2  # one per series: the loop gets a turn between them
    assert list(stepped.snapshot_steps(span_s=30)) == []  # now cached: nothing to do
    direct, _ = fed()
    assert stepped.snapshot(span_s=30).series == direct.snapshot(span_s=30).series
    # windows that close between two steps leave the range being computed as it was
    later, clock = fed()
    gen = later.snapshot_steps(span_s=30)
    next(gen)
    for j in range(5):
        later.add(K, 41 * S + j, 99.0)
    later.tick(42 * S)  # closes window 39 too: later snapshots cover a newer range
    list(gen)
    # the range the steps began with ends at 39 s, which `direct` still shows at 40.5 s
    before = direct.snapshot(span_s=30)
    clock.ns = 39 * S + S // 2
    assert later.snapshot(span_s=30).series is later.snapshot(span_s=30).series  # cached
    assert later.snapshot(span_s=30).series == before.series


def test_snapshot_sparkline_marks_gaps() -> None:
    sk = WindowedSketches(clock=FakeClock(), spark_windows=4)
    for sec in (0, 2, 3):
        sk.add(K, sec * S, float(sec + 1))
    sk.flush()
    snap = sk.snapshot(4 * S, span_s=4)
    st_ = snap.get(K.stage, K.device, K.phase)
    assert st_ is not None and st_.sparkline == (1.0, None, 3.0, 4.0)
    assert st_.share is None


def test_snapshot_cost_report(capsys: pytest.CaptureFixture[str]) -> None:
    """Measures (prints, never asserts) snapshot() for 8 devices x 12 stages x 2 phases."""
    sk = WindowedSketches(retain_s=300, clock=FakeClock())
    keys = [SeriesKey(s, f"cuda:{d}", ph) for d in range(8) for ph in ("prefill", "decode")
            for s in [*(f"stage{i}" for i in range(12)), ITERATION]]
    vals = np.random.default_rng(0).lognormal(1, 0.5, 10).tolist()
    for sec in range(301):
        for k in keys:
            for j, v in enumerate(vals):
                sk.add(k, sec * S + j * 100_000_000, v)
    out = []
    for span in (10, 60, 300):
        t0 = time.perf_counter()
        snap = sk.snapshot(301 * S, span)
        t1 = time.perf_counter()
        sk.snapshot(301 * S, span)
        t2 = time.perf_counter()
        assert len(snap.series) == len(keys)
        out.append(f"span {span}s: {1e3 * (t1 - t0):.1f} ms, cached {1e3 * (t2 - t1):.3f} ms")
    with capsys.disabled():
        print("\nsnapshot cost (208 series):", "; ".join(out))


@st.composite
def _adds(draw: st.DrawFn) -> list[tuple[int, int, float]]:
    n = draw(st.integers(0, 300))
    t = draw(st.integers(0, 10 * S))
    out = []
    for _ in range(n):
        t += draw(st.integers(-800_000_000, 700_000_000))  # out of order within limits
        t = max(t, 0)
        key = draw(st.integers(0, 2))
        value = draw(st.one_of(
            st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
            st.just(math.inf), st.just(math.nan)))
        out.append((key, t, value))
    return out


@settings(max_examples=150, deadline=None)
@given(_adds(), st.floats(0.0, 2.0), st.booleans())
def test_any_sequence_of_adds_keeps_invariants(
    adds: list[tuple[int, int, float]], lateness: float, tick: bool,
) -> None:
    keys = [SeriesKey("s", f"d{i}", "decode") for i in range(3)]
    sk = WindowedSketches(retain_s=1e6, clock=FakeClock(), lateness_s=lateness,
                          block_windows=3)
    for i, (k, t, v) in enumerate(adds):
        sk.add(keys[k], t, v)
        if tick and i % 7 == 0:
            sk.tick(t)
    sk.flush()
    accepted = len(adds) - sk.late - sk.rejected
    assert sk.rejected == sum(1 for _, _, v in adds if not math.isfinite(v))
    feed = sk.closed_windows_since(-(2**62))
    assert sum(w.count for w in feed) == accepted
    assert [w.start_ns for w in feed] == sorted(w.start_ns for w in feed)
    for key in keys:
        ws = sk.windows(key)
        starts = [w.start_ns for w in ws]
        assert starts == sorted(set(starts))  # ordered, one window per start
        for w in ws:
            assert w.start_ns % sk.window_ns == 0 and w.count == w.digest.n_values >= 1
            assert w.min <= w.digest.quantile(0.5) <= w.max
        if ws:
            m = sk.merged_range(key, ws[0].start_ns, ws[-1].end_ns)
            assert m is not None and m.n_values == sum(w.count for w in ws)
            assert m.min() <= m.quantile(0.5) <= m.max()


def test_rate_counts_only_the_time_since_the_first_value() -> None:
    """A monitor that has watched for 3 s shows the rate of those 3 s, not 3/10 of it."""
    clock = FakeClock()
    sk = WindowedSketches(clock=clock)
    for sec in range(17, 20):
        for j in range(4):
            sk.add(IT, sec * S + j * 250_000_000, 10.0)
    sk.flush()
    clock.ns = 20 * S
    st_ = sk.snapshot(span_s=10).get("iteration", "cuda:0", "decode")
    assert st_ is not None and st_.count == 12
    assert st_.rate == pytest.approx(4.0)
    # once the span is covered, the rate is over the whole span again
    for sec in range(20, 30):
        sk.add(IT, sec * S, 10.0)
    sk.flush()
    clock.ns = 30 * S
    st_ = sk.snapshot(span_s=10).get("iteration", "cuda:0", "decode")
    assert st_ is not None and st_.rate == pytest.approx(1.0)
