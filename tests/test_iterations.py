"""Spans into iterations and stages: invariants, and ground truth from the simulator."""

from __future__ import annotations

import itertools
import random
import time
from pathlib import Path
from types import MappingProxyType

from hypothesis import given, settings
from hypothesis import strategies as st

from prism_sim.labels import read_labels
from prism_sim.scenario import parse_scenario
from prism_sim.server import SimServer
from prism_tui.engine.iterations import (
    HOST,
    MEMCPY_KINDS,
    Features,
    Iteration,
    IterationBuilder,
    RunQueueSample,
    exclusive_time,
    phase_of,
    run_queue_wait_within,
    union_ns,
    with_run_queue_delay,
    workload_features,
)
from probes.catalog import DerivedFeature, load_profile
from probes.placement import place_profile
from probes.target import Target
from probes.uprobes import Span, UprobeSession
from tests.sim_scenarios import steady_text


def span(probe: str, start: int, end: int, pid: int = 1, **args: int) -> Span:
    return Span(probe, pid, pid, start, end, MappingProxyType(dict(args)))


def test_union_counts_overlaps_once() -> None:
    assert union_ns([(0, 10), (5, 15), (20, 30), (25, 26)]) == 25
    assert union_ns([]) == 0
    assert union_ns([(5, 5), (7, 3)]) == 0


def test_stages_are_clipped_unions_and_host_is_the_rest() -> None:
    b = IterationBuilder(1, "sync", {"sync": "device_sync", "copy": "memcpy",
                                     "ar": "collective"})
    assert b.add([span("sync", 0, 100)]) == []  # the first anchor opens the first iteration
    its = b.add([
        span("copy", 90, 130, bytes=800, kind=1),  # straddles the start: clipped to 100
        span("ar", 140, 160), span("ar", 150, 170),  # overlapping: 140..170 once
        span("copy", 180, 190, bytes=16, kind=2),
        span("sync", 200, 300),
        span("copy", 310, 320, bytes=8, kind=2),  # after the anchor: next iteration
    ])
    [it] = its
    assert (it.start_ns, it.end_ns, it.index) == (100, 300, 0)
    assert dict(it.stages) == {"memcpy": 30 + 10, "collective": 30, "device_sync": 100,
                               HOST: 200 - 40 - 30 - 100}
    assert sum(it.stages.values()) == it.end_ns - it.start_ns
    assert it.features["d2h_bytes"] == 16 and "h2d_bytes" not in it.features
    assert it.phase == "unknown"
    assert b.late_spans == 0
    b.add([span("copy", 150, 160)])  # arrives after its iteration closed
    assert b.late_spans == 1


def test_nested_and_concurrent_spans_give_time_to_the_innermost() -> None:
    b = IterationBuilder(1, "sync", {"outer": "host_call", "inner": "memcpy",
                                     "sync": "device_sync"})
    b.add([span("sync", 0, 100)])
    [it] = b.add([span("outer", 100, 200), span("inner", 120, 150), span("sync", 200, 300)])
    assert dict(it.stages) == {"host_call": 70, "memcpy": 30, "device_sync": 100, HOST: 0}
    assert sum(it.stages.values()) == it.end_ns - it.start_ns


spans_strategy = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c", "sync"]), st.integers(0, 10_000),
              st.integers(0, 500)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(spans_strategy)
def test_stages_never_exceed_the_iteration(raw: list[tuple[str, int, int]]) -> None:
    b = IterationBuilder(1, "sync", {"a": "s1", "b": "s1", "c": "s2", "sync": "sync"})
    its = b.add([span(p, s, s + d) for p, s, d in raw])
    for it in its:
        assert all(v >= 0 for v in it.stages.values())
        assert sum(it.stages.values()) == it.end_ns - it.start_ns
    assert [it.index for it in its] == list(range(len(its)))
    assert all(x.end_ns <= y.start_ns for x, y in itertools.pairwise(its))


def innermost_owner_reference(items: list[tuple[int, int, str]]) -> dict[str, int]:
    """Instant by instant: the covering span with the latest (start, index) owns it."""
    out: dict[str, int] = {}
    cuts = sorted({t for s, e, _ in items for t in (s, e)})
    for a, b in itertools.pairwise(cuts):
        covering = [(s, i) for i, (s, e, _) in enumerate(items) if s <= a and e >= b and e > s]
        if covering:
            stage = items[max(covering)[1]][2]
            out[stage] = out.get(stage, 0) + (b - a)
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 60),
                          st.sampled_from(["s1", "s2", "s3"])), max_size=25))
def test_exclusive_time_gives_each_instant_to_the_span_that_started_last(
        raw: list[tuple[int, int, str]]) -> None:
    items = [(s, s + d, stage) for s, d, stage in raw]
    assert exclusive_time(items) == innermost_owner_reference(items)


def test_simulator_iterations_match_its_labels(tmp_path: Path) -> None:
    """Iterations cut from real uprobes on a rank agree with the simulator's own labels."""
    text = steady_text("iters", 30, batch=6)
    path = tmp_path / "iters.toml"
    path.write_text(text)
    labels_path = tmp_path / "labels.jsonl"
    with SimServer(parse_scenario(text, str(path)), labels=labels_path,
                   metrics_port=None) as server:
        pid = server.rank_pids[0]
        target = Target(pid)
        profile = load_profile("cuda")
        sites = place_profile(target, profile, "sentinel").sites
        sites += place_profile(target, load_profile("nccl"), "sentinel").sites
        builder = IterationBuilder(pid, profile.anchors[0] if profile.anchors else "stream_sync",
                                   {s.probe: s.stage for s in sites},
                                   derived=profile.derived)
        iterations = []
        with UprobeSession([target], sites, urgent={"stream_sync"}) as session:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                iterations += builder.add(session.poll(0.05))
    labels = [r for r in read_labels(labels_path).iterations if r.rank == 0]
    assert len(iterations) > 50
    assert builder.late_spans == 0
    matched = 0
    for it in iterations:
        # the sync returns inside the rank's labelled iteration, which then samples
        [label] = [r for r in labels if r.start_ns <= it.end_ns <= r.end_ns]
        assert it.phase == label.phase
        assert it.features["d2h_bytes"] / 8 == label.batch_size  # sequences
        # input ids (8 bytes a token) and the KV-slot indices (4 bytes a cached token)
        assert it.features["h2d_bytes"] == 8 * label.tokens + 4 * label.kv_len
        assert it.features["h2d_first_bytes"] == 8 * label.tokens
        assert it.features["kv_tokens"] == label.kv_len  # the profile's derived feature
        assert it.features["tokens"] == label.batch_size  # the profile's derived feature
        assert it.share("device_sync") > 0 and it.stages[HOST] > 0
        matched += 1
    assert matched == len(iterations)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 40),
                          st.sampled_from(["s1", "s2", "s3"])), max_size=25),
       st.randoms(use_true_random=False))
def test_exclusive_time_of_spans_one_after_another(
        raw: list[tuple[int, int, str]], rnd: random.Random) -> None:
    # the fast path: back to back or with gaps, never overlapping, in any order
    items, t = [], 0
    for gap, d, stage in raw:
        items.append((t + gap, t + gap + d, stage))
        t += gap + d
    rnd.shuffle(items)
    assert exclusive_time(items) == innermost_owner_reference(items)


def _laminar(rnd: random.Random, start: int, end: int, depth: int,
             out: list[tuple[int, int, str]]) -> None:
    """Spans inside [start, end): one after the other, each with spans inside it."""
    t = start
    while depth and t < end and rnd.random() < 0.7:
        a = rnd.randint(t, end)
        b = rnd.randint(a, end)
        out.append((a, b, rnd.choice(["s1", "s2", "s3"])))
        _laminar(rnd, a, b, depth - 1, out)
        t = b


@settings(max_examples=300, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(0, 4))
def test_exclusive_time_of_nested_calls(rnd: random.Random, depth: int) -> None:
    # the nested fast path: calls inside calls (equal bounds included), in any order
    items: list[tuple[int, int, str]] = []
    _laminar(rnd, 0, 1000, depth, items)
    rnd.shuffle(items)
    assert exclusive_time(items) == innermost_owner_reference(items)


def features_span_by_span(spans: list[Span]) -> dict[str, float]:
    """The features as first written: one span at a time, in order."""
    out: dict[str, float] = {}
    first: tuple[int, float] | None = None
    for s in spans:
        out[f"calls.{s.probe}"] = out.get(f"calls.{s.probe}", 0.0) + 1
        for name, value in s.args.items():
            if name != "kind":
                out[f"{s.probe}.{name}"] = out.get(f"{s.probe}.{name}", 0.0) + float(value)
        if "bytes" in s.args and "kind" in s.args:
            kind = MEMCPY_KINDS.get(int(s.args["kind"]) & 0xFFFFFFFF)
            if kind is not None:
                out[kind] = out.get(kind, 0.0) + float(s.args["bytes"])
                if kind == "h2d_bytes" and (first is None or s.start_ns < first[0]):
                    first = (s.start_ns, float(s.args["bytes"]))
    if first is not None:
        out["h2d_first_bytes"] = first[1]
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(
    st.sampled_from(["memcpy", "reduce", "sync"]), st.integers(0, 1000),
    st.dictionaries(st.sampled_from(["bytes", "kind", "count", "op"]),
                    st.one_of(st.integers(0, 2**40), st.floats(0, 1e12)), max_size=4)),
    max_size=30))
def test_features_grouped_by_probe_are_the_span_by_span_sums(
        raw: list[tuple[str, int, dict[str, float]]]) -> None:
    # grouped by probe and summed per argument (some calls lack one), in span order:
    # the same floats as one span at a time
    spans = [Span(p, 1, 1, t, t + 5, MappingProxyType(a)) for p, t, a in raw]
    assert workload_features(spans) == features_span_by_span(spans)


def test_phase_from_the_profiles_rule_then_the_built_in_one() -> None:
    rule = DerivedFeature("phase", "min(calls.sample, decode.n_tokens) / decode.n_tokens")
    assert phase_of({"calls.sample": 8, "decode.n_tokens": 8}, rule) == "decode"
    assert phase_of({"calls.sample": 4, "decode.n_tokens": 504}, rule) == "mixed"
    assert phase_of({"decode.n_tokens": 500, "calls.sample": 0}, rule) == "prefill"
    # the rule does not resolve (no sampling call seen, or no tokens): the built-in rule
    assert phase_of({"decode.n_tokens": 500}, rule) == "unknown"
    assert phase_of(Features({"decode.n_tokens": 500}), rule) == "prefill"  # no call: 0
    assert phase_of({"calls.sample": 2, "decode.n_tokens": 0,
                     "h2d_first_bytes": 16, "d2h_bytes": 16}, rule) == "decode"
    assert phase_of({"h2d_first_bytes": 800, "d2h_bytes": 16}) == "prefill"


def test_llama_cpp_steps_are_cut_into_prefill_mixed_and_decode() -> None:
    """The llama_cpp profile's rule on its own probes' spans: a prompt alone, then two
    slots decoding, then a prompt chunk beside them."""
    profile = load_profile("llama_cpp")
    b = IterationBuilder(1, profile.anchors[0] if profile.anchors else "decode",
                         {p.id: p.stage for p in profile.probes},
                         derived=profile.derived,
                         phase_rule=DerivedFeature("phase", profile.phase_rule or ""))
    b.add([span("decode", 0, 10, n_tokens=1)])
    steps = [(300, 0), (2, 1), (2, 2), (130, 2)]  # (tokens in, sequences sampled before)
    spans, t = [], 10
    for n_tokens, sampled in steps:
        spans += [span("sample", t + i * 2, t + i * 2 + 1, token=7) for i in range(sampled)]
        spans.append(span("decode", t + 10, t + 50, n_tokens=n_tokens))
        t += 60
    its = b.add(spans)
    assert [it.phase for it in its] == ["prefill", "mixed", "decode", "mixed"]
    assert its[2].features["sequences"] == 2


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 10_000), st.integers(0, 10_000),
                          st.integers(0, 10_000)), min_size=1, max_size=5),
       st.integers(-100, 50_000))
def test_run_queue_wait_comes_out_of_host_first_then_the_calls_in_proportion(
        shapes: list[tuple[int, int, int]], delay: int) -> None:
    its, t = [], 0
    for i, (length, busy, sync) in enumerate(shapes):
        busy = min(busy, length)
        sync = min(sync, length - busy)
        its.append(Iteration(1, "cpu", i, t, t + length, "decode", MappingProxyType(
            {"gemm": busy, "device_sync": sync, HOST: length - busy - sync})))
        t += length
    out = with_run_queue_delay(its, delay)
    for before, after in zip(its, out, strict=True):
        length = before.end_ns - before.start_ns
        assert sum(after.stages.values()) == length
        assert all(v >= 0 for v in after.stages.values())
        rq = after.stages.get("runqueue", 0)
        part = delay * length // t if delay > 0 else 0
        assert rq == min(part, length)  # the iteration's part of the wait
        host = before.stages[HOST]
        if rq <= host:  # host holds it all: the calls keep their time
            assert after.stages[HOST] == host - rq
            assert after.stages["gemm"] == before.stages["gemm"]
            assert after.stages["device_sync"] == before.stages["device_sync"]
        else:  # host emptied, the rest from each call by its share (to the ns)
            assert after.stages[HOST] == 0
            rest = rq - host
            calls = before.stages["gemm"] + before.stages["device_sync"]
            for stage in ("gemm", "device_sync"):
                cut = before.stages[stage] - after.stages[stage]
                assert abs(cut - rest * before.stages[stage] / calls) <= 2
    assert sum(a.stages.get("runqueue", 0) for a in out) <= max(delay, 0)


def test_an_expression_of_one_probes_arguments_is_summed_per_call() -> None:
    """blas's ``flops = 2 * M * N * K`` and cuda's ``grid_blocks`` (packed dim3) are per
    call: two GEMMs of different shapes are the sum of their flops, not the product of
    summed dimensions. ``tokens = d2h_bytes / 8`` stays over the iteration's features."""
    blas = load_profile("blas").derived
    gemms = [span("gemm", 0, 5, M=128, N=256, K=64), span("gemm", 10, 20, M=4, N=4, K=4),
             span("gemm", 30, 40, M=9)]  # a call whose shape was not captured: left out
    feats = workload_features(gemms, blas)
    assert feats["flops"] == 2 * 128 * 256 * 64 + 2 * 4 * 4 * 4
    assert feats["gemm.M"] == 128 + 4 + 9
    cuda = load_profile("cuda").derived
    launches = [span("launch", 0, 1, grid_xy=(2 << 32) | 3, grid_z=1, block_xy=(1 << 32) | 128,
                     block_z=1),
                span("launch", 2, 3, grid_xy=(1 << 32) | 10, grid_z=(0xBEEF << 32) | 2,
                     block_xy=(1 << 32) | 64, block_z=1),
                span("memcpy_async", 4, 5, bytes=24, kind=2)]
    feats = workload_features(launches, cuda)
    assert feats["grid_blocks"] == 3 * 2 * 1 + 10 * 1 * 2
    assert feats["block_threads"] == 128 + 64
    assert feats["tokens"] == 3  # d2h_bytes / 8, once over the iteration


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 10_000), min_size=1, max_size=5),
       st.integers(0, 50_000), st.integers(-100, 50_000), st.booleans())
def test_the_wait_inside_the_iterations_is_the_interval_s_rate_times_their_time(
        lengths: list[int], gap: int, wait: int, timed: bool) -> None:
    """Spread evenly over the interval between the readings: never more than the wait,
    and never a larger share of the iterations than the thread waited of the interval."""
    its, t = [], 0
    for i, length in enumerate(lengths):
        its.append(Iteration(1, "cpu", i, t, t + length, "decode",
                             MappingProxyType({HOST: length})))
        t += length
    interval = t + gap
    first = RunQueueSample(5, 1_000, 10**9 if timed else None)
    second = RunQueueSample(5, 1_000 + wait, 10**9 + interval if timed else None)
    inside = run_queue_wait_within(its, first, second)
    assert 0 <= inside <= max(wait, 0)
    if wait > 0 and not timed:
        assert inside == wait
    if wait > 0 and timed:
        assert inside == wait * t // interval
