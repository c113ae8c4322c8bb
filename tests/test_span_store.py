"""The span store: a fixed ring of typed columns that reads back the spans that went in."""

from __future__ import annotations

import gc
from array import array
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prism_tui.engine.iterations import SpanLike
from prism_tui.engine.span_store import SpanStore
from probes.pairing import Span

ARG_NAMES = ("n_tokens", "n_seqs", "bytes", "ratio")
values = st.one_of(st.integers(-(2**70), 2**70),
                   st.floats(allow_nan=False, allow_infinity=True))
spans = st.builds(
    lambda probe, pid, tid, start, dur, args: Span(probe, pid, tid, start, start + dur, args),
    st.sampled_from(["llama_decode", "graph_compute", "sample", "deepdive.gemm"]),
    st.integers(1, 4_194_304), st.integers(1, 4_194_304),
    st.integers(0, 2**62), st.integers(0, 10**9),
    st.dictionaries(st.sampled_from(ARG_NAMES), values, max_size=4))


def _same(a: SpanLike, b: SpanLike) -> bool:
    if (a.probe, a.pid, a.tid, a.start_ns, a.end_ns) != (b.probe, b.pid, b.tid, b.start_ns,
                                                          b.end_ns):
        return False
    if list(a.args) != list(b.args):
        return False
    for k, v in a.args.items():
        w = b.args[k]
        if isinstance(v, int) and -(2**63) <= v < 2**63:
            if type(w) is not int or w != v:
                return False
        elif float(v) != w:  # ints beyond 64 bits come back as the nearest float
            return False
    return True


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(spans, max_size=12), max_size=8), st.integers(1, 20))
def test_the_store_reads_back_the_last_capacity_spans_in_order(
        batches: list[list[Span]], capacity: int) -> None:
    store = SpanStore(capacity)
    reference: deque[Span] = deque(maxlen=capacity)
    for batch in batches:
        store.extend(batch)
        reference.extend(batch)
        back = store.recent(-(2**63))
        assert len(back) == len(store) == len(reference)
        assert all(_same(a, b) for a, b in zip(reference, back, strict=True))


def test_recent_keeps_only_spans_that_ended_after_the_horizon() -> None:
    store = SpanStore(4)
    store.extend(Span("p", 1, 1, t, t + 5) for t in range(0, 60, 10))  # 6 into 4
    assert [s.start_ns for s in store.recent(0)] == [20, 30, 40, 50]
    assert [s.end_ns for s in store.recent(40)] == [45, 55]


def test_a_span_with_more_arguments_widens_every_row_and_loses_nothing() -> None:
    store = SpanStore(3)
    store.extend([Span("a", 1, 1, 0, 1, {"x": 1}), Span("b", 1, 1, 1, 2, {})])
    store.extend([Span("c", 1, 1, 2, 3, {"x": 2, "y": 0.5, "z": -7})])
    store.extend([Span("d", 1, 1, 3, 4, {"x": 3})])  # overwrites "a"
    back = store.recent(0)
    assert [(s.probe, dict(s.args)) for s in back] == [
        ("b", {}), ("c", {"x": 2, "y": 0.5, "z": -7}), ("d", {"x": 3})]


def test_the_columns_hold_no_python_objects_per_span() -> None:
    store = SpanStore(50_000)
    store.extend(Span("p", 7, 8, t, t + 1, {"n": t}) for t in range(50_000))
    gc.collect()
    # nothing per span for the allocator to keep or the cyclic GC to walk
    assert len(gc.get_referents(store)) < 50
    assert all(gc.get_referents(column) == [array] for column in
               (store._ids, store._rows))


def test_a_store_of_no_capacity_keeps_nothing_and_a_negative_one_is_refused() -> None:
    store = SpanStore(0)  # a headless session's: nothing can export a trace
    store.extend([Span("p", 1, 1, 0, 1, {"n": 1})])
    assert len(store) == 0 and store.recent(-1) == []
    with pytest.raises(ValueError, match="capacity"):
        SpanStore(-1)
