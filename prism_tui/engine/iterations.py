"""Spans into iterations and stages.

An iteration of one target process ends where its profile's anchor probe returns (for
CUDA engines ``cudaStreamSynchronize``: the host waits for the step's device work) and
starts where the previous one ended. Inside it, each instant covered by spans belongs to
the innermost active one (a profiler's self time), spans clipped to the iteration, so
nested or concurrent calls are not counted twice and stages never add up to more than
the iteration; what no span covers is ``host`` (Python scheduling, input preparation,
sampling...).

Workload features come from the arguments the probes captured, summed per iteration
(``memcpy_async.bytes``...), with the conventions a monitor can rely on for copies
(``h2d_bytes``, ``d2h_bytes``: kind 1 and 2 of ``cudaMemcpyKind``), then the profile's
derived expressions (``tokens = d2h_bytes / 8``). An iteration that copies more tokens
in (its first host-to-device copy, the input ids) than sequences out is a prefill,
otherwise a decode.

The builder closes an iteration as soon as its anchor span arrives, so an alert on it
costs no batching delay; a span read after its iteration closed (another thread's ring
drained late) is counted in ``late_spans``, not attributed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import chain
from operator import itemgetter
from types import MappingProxyType
from typing import NamedTuple, Protocol

HOST = "host"
RUNQUEUE = "runqueue"
"""The stage of the time the iteration's thread waited for a CPU (from ``schedstat``)."""
MEMCPY_KINDS = {1: "h2d_bytes", 2: "d2h_bytes", 3: "d2d_bytes"}


class SpanLike(Protocol):
    """What the builder needs of a span (``probes.uprobes.Span`` fits)."""

    @property
    def probe(self) -> str: ...
    @property
    def pid(self) -> int: ...
    @property
    def tid(self) -> int: ...
    @property
    def start_ns(self) -> int: ...
    @property
    def end_ns(self) -> int: ...
    @property
    def args(self) -> Mapping[str, int | float]: ...


class Derived(Protocol):
    """A derived feature (``probes.catalog.DerivedFeature`` fits)."""

    @property
    def name(self) -> str: ...

    @property
    def names(self) -> frozenset[str]: ...

    def evaluate(self, values: Mapping[str, float]) -> float | None: ...


@dataclass(frozen=True)
class Iteration:
    """One iteration (batch) of one process: when, where its time went, its workload."""

    pid: int
    device: str
    index: int
    start_ns: int
    end_ns: int
    phase: str
    stages: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    features: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def latency_ms(self) -> float:
        """Iteration time in milliseconds."""
        return (self.end_ns - self.start_ns) / 1e6

    def share(self, stage: str) -> float:
        """Fraction of the iteration spent in ``stage`` (0 when absent)."""
        total = self.end_ns - self.start_ns
        return self.stages.get(stage, 0) / total if total > 0 else 0.0


def union_ns(intervals: Iterable[tuple[int, int]]) -> int:
    """Total length covered by ``intervals`` (overlaps counted once)."""
    total = 0
    cur_start = cur_end = None
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if cur_end is None or start > cur_end:
            if cur_end is not None and cur_start is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None and cur_start is not None:
        total += cur_end - cur_start
    return total


def exclusive_time(spans: Iterable[tuple[int, int, str]]) -> dict[str, int]:
    """Time per stage where each instant goes to the innermost active span.

    ``spans`` are ``(start, end, stage)``; where spans overlap (a nested call, or another
    thread at the same moment) the one that started last owns the time, as in a
    profiler's self time, so stages never add up to more than the time covered.
    One sweep over the sorted starts and ends with a stack of the active spans in start
    order (an ended one leaves when it reaches the top): the top is always the owner.
    """
    items = [(s, e, st) for s, e, st in spans if e > s]
    disjoint = _disjoint_time(items)
    if disjoint is not None:
        return disjoint
    events: list[tuple[int, int, int]] = []  # (time, 0 = end / 1 = start, span index)
    for i, (start, end, _stage) in enumerate(items):
        events.append((start, 1, i))
        events.append((end, 0, i))
    events.sort()
    stack: list[int] = []  # starts in (start, index) order: the top started last
    ended = [False] * len(items)
    out: dict[str, int] = {}
    prev = 0
    for t, kind, i in events:
        if stack and t > prev:
            stage = items[stack[-1]][2]
            out[stage] = out.get(stage, 0) + (t - prev)
        if kind:
            stack.append(i)
        else:
            ended[i] = True
            while stack and ended[stack[-1]]:
                stack.pop()
        prev = t
    return out


def _disjoint_time(items: list[tuple[int, int, str]]) -> dict[str, int] | None:
    """Time per stage when no two spans overlap (one thread's calls one after another,
    the usual iteration), else None: then each span owns all of its own time."""
    out: dict[str, int] = {}
    prev_end = None
    for start, end, stage in sorted(items):
        if prev_end is not None and start < prev_end:
            return None
        out[stage] = out.get(stage, 0) + (end - start)
        prev_end = end
    return out


_CALL_KEYS: dict[str, str] = {}
_ARG_KEYS: dict[tuple[str, str], str] = {}
"""Feature names by probe (and argument), formatted once rather than for every span."""


class Features(dict[str, float]):
    """An iteration's features: a probe not called in it reads as ``calls.<probe> = 0``
    (so an expression such as the phase rule resolves for a step without sampling)."""

    def __missing__(self, key: str) -> float:
        if key.startswith("calls."):
            return 0.0
        raise KeyError(key)


def workload_features(spans: Sequence[SpanLike], derived: Sequence[Derived] = ()
                      ) -> dict[str, float]:
    """Per-iteration features: calls and argument sums per probe, copy bytes by kind
    (and ``h2d_first_bytes``, the iteration's first host-to-device copy: engines copy
    the input ids first), then derived expressions that resolve.

    Spans are grouped by probe first and each argument is summed over its group in
    span order (the same sums as span by span: this runs once per iteration).

    A derived expression over one probe's own arguments (``2 * M * N * K`` of a GEMM,
    a launch's packed grid) is evaluated per call and summed over the iteration: the
    product of summed arguments would mean nothing. Any other is evaluated once, over
    the iteration's features (``d2h_bytes / 8``).
    """
    groups: dict[str, list[SpanLike]] = {}
    for s in spans:
        group = groups.get(s.probe)
        if group is None:
            groups[s.probe] = [s]
        else:
            group.append(s)
    feats: dict[str, float] = Features()
    per_call: set[str] = set()
    per_call_names = frozenset().union(*(d.names for d in derived)) if derived else frozenset()
    first_h2d: tuple[int, float] | None = None
    for probe, group in groups.items():
        key = _CALL_KEYS.get(probe)
        if key is None:
            key = _CALL_KEYS[probe] = f"calls.{probe}"
        feats[key] = float(len(group))
        args = [s.args for s in group if s.args]
        if not args:
            continue
        names = dict.fromkeys(chain.from_iterable(args))  # first seen first
        if per_call_names and not per_call_names.isdisjoint(names):
            for d in derived:
                if d.names and d.names <= names.keys():
                    _per_call_sum(d, args, feats, per_call)
        for name in names:
            if name == "kind":
                continue
            k = _ARG_KEYS.get((probe, name))
            if k is None:
                k = _ARG_KEYS[(probe, name)] = f"{probe}.{name}"
            try:
                feats[k] = sum(map(float, map(itemgetter(name), args)), 0.0)
            except KeyError:  # not every call captured it
                feats[k] = sum([float(a[name]) for a in args if name in a], 0.0)
        for s in group:
            a = s.args
            if "kind" in a and "bytes" in a:
                kind_name = MEMCPY_KINDS.get(int(a["kind"]) & 0xFFFFFFFF)
                if kind_name is not None:
                    n_bytes = float(a["bytes"])
                    feats[kind_name] = feats.get(kind_name, 0.0) + n_bytes
                    if kind_name == "h2d_bytes" and (
                            first_h2d is None or s.start_ns < first_h2d[0]):
                        first_h2d = (s.start_ns, n_bytes)
    if first_h2d is not None:
        feats["h2d_first_bytes"] = first_h2d[1]
    for d in derived:
        if d.name in per_call:
            continue
        derived_value = d.evaluate(feats)
        if derived_value is not None:
            feats[d.name] = derived_value
    return feats


def _per_call_sum(d: Derived, args: Sequence[Mapping[str, int | float]],
                 feats: dict[str, float], done: set[str]) -> None:
    """Add ``d`` evaluated on each call's own arguments to ``feats[d.name]`` (calls
    where it does not resolve are left out); ``done`` records that it was."""
    values = [v for a in args if (v := d.evaluate(a)) is not None]
    if values:
        feats[d.name] = feats.get(d.name, 0.0) + sum(values, 0.0)
        done.add(d.name)


class RunQueueSample(NamedTuple):
    """A thread's cumulative run-queue wait (``schedstat``), read once with a batch of
    spans."""

    tid: int
    waited_ns: int
    at_ns: int | None = None
    """When it was read (CLOCK_MONOTONIC ns); None where not known (older recordings)."""


def run_queue_wait_within(its: Sequence[Iteration], previous: RunQueueSample,
                          current: RunQueueSample) -> int:
    """The part of the wait between two readings of one thread that fell inside ``its``.

    The readings are taken when the monitor reads the spans, so their interval also
    holds time outside the iterations they complete (the thread idle between requests,
    or a reading late behind the iterations); the wait is spread evenly over the interval
    and ``its`` keep their duration's part of it. Without reading times, all of it.
    """
    delay = current.waited_ns - previous.waited_ns
    if delay <= 0:
        return 0
    if current.at_ns is None or previous.at_ns is None:
        return delay
    interval = current.at_ns - previous.at_ns
    covered = sum(it.end_ns - it.start_ns for it in its)
    if interval <= covered:
        return delay
    return delay * covered // interval


def with_run_queue_delay(its: Sequence[Iteration], delay_ns: int) -> list[Iteration]:
    """``its`` with ``delay_ns`` of run-queue wait (read once for all of them) as their
    ``runqueue`` stage, shared in proportion to their durations.

    The wait is taken out of ``host`` first, the time no probed call covers (the host's
    Python between calls is what a busy CPU delays most), and what ``host`` cannot hold
    out of the other stages in proportion to their time: a thread also waits for a CPU
    inside a call, above all when it wakes from a blocking one (a sync whose device
    finished, a throttled thread's next period), and left there that wait made a CPU
    fault look like a slower device. Never more than the iteration, so stages still add
    up to it. ``delay_ns`` is the wait inside ``its`` (:func:`run_queue_wait_within`).
    """
    total = sum(it.end_ns - it.start_ns for it in its)
    if delay_ns <= 0 or total <= 0:
        return list(its)
    out = []
    for it in its:
        length = it.end_ns - it.start_ns
        share = min(length, delay_ns * length // total)
        if share > 0:
            stages = dict(it.stages)
            host = stages.get(HOST, 0)
            from_host = min(host, share)
            if from_host:
                stages[HOST] = host - from_host
            others = [(k, v) for k, v in stages.items() if k != HOST and v > 0]
            held = sum(v for _, v in others)
            rest = min(share - from_host, held)
            if rest > 0:
                cuts = [rest * v // held for _, v in others]
                left = rest - sum(cuts)  # the rounding, to stages with time left
                for i, (_, v) in enumerate(others):
                    extra = min(left, v - cuts[i])
                    cuts[i] += extra
                    left -= extra
                for (k, v), cut in zip(others, cuts, strict=True):
                    stages[k] = v - cut
            stages[RUNQUEUE] = stages.get(RUNQUEUE, 0) + from_host + max(rest, 0)
            it = replace(it, stages=MappingProxyType(stages))
        out.append(it)
    return out


def phase_of(features: Mapping[str, float], rule: Derived | None = None) -> str:
    """The iteration's phase from its features.

    With the profile's ``rule`` (an expression giving the share of the step's new
    tokens that are decode tokens, one per running sequence): ``decode`` at 1 or more,
    ``prefill`` at 0 or less, ``mixed`` between (chunked prefill beside decoding
    sequences). Without one, or where it does not resolve, the built-in rule:
    ``prefill`` when more tokens go in (the first H2D copy: input ids) than sequences
    come out, else ``decode``; ``unknown`` without those copies.
    """
    if rule is not None:
        share = rule.evaluate(features)
        if share is not None:
            return "decode" if share >= 1 else "prefill" if share <= 0 else "mixed"
    h2d = features.get("h2d_first_bytes", features.get("h2d_bytes"))
    d2h = features.get("d2h_bytes")
    if h2d is None or d2h is None or d2h <= 0:
        return "unknown"
    return "prefill" if h2d > d2h else "decode"


class IterationBuilder:
    """Cuts one process's span stream into :class:`Iteration` s at its anchor probe."""

    def __init__(self, pid: int, anchor: str, stage_of: Mapping[str, str], *,
                 device: str = "cpu", derived: Sequence[Derived] = (),
                 phase_rule: Derived | None = None) -> None:
        """Build iterations of ``pid`` delimited by the ends of ``anchor`` spans.

        Args:
            pid: the target process.
            anchor: probe id whose span end closes an iteration.
            stage_of: probe id → stage name.
            device: device label of this process (``cuda:0``, ``cpu``...).
            derived: the profile's derived features.
            phase_rule: the profile's phase rule (see :func:`phase_of`).
        """
        self.pid = pid
        self.anchor = anchor
        self.stage_of = dict(stage_of)
        self.device = device
        self.derived = tuple(derived)
        self.phase_rule = phase_rule
        self.index = 0
        self.late_spans = 0
        self._last_end: int | None = None
        self._pending: list[SpanLike] = []

    def add(self, spans: Iterable[SpanLike]) -> list[Iteration]:
        """Take a batch of spans (any order); return the iterations they complete."""
        done: list[Iteration] = []
        batch = [s for s in spans if s.pid == self.pid]
        anchors = sorted((s for s in batch if s.probe == self.anchor), key=lambda s: s.end_ns)
        for s in batch:
            if self._last_end is not None and s.end_ns <= self._last_end and \
                    s.probe != self.anchor:
                self.late_spans += 1  # its iteration is closed already
            elif s.probe != self.anchor:
                self._pending.append(s)
        for anchor in anchors:
            if self._last_end is None:
                self._last_end = anchor.end_ns  # the first anchor only opens an iteration
                self._pending = [s for s in self._pending if s.end_ns > anchor.end_ns]
                continue
            if anchor.end_ns <= self._last_end:
                self.late_spans += 1
                continue
            done.append(self._close(self._last_end, anchor))
            self._last_end = anchor.end_ns
        return done

    def _close(self, start: int, anchor: SpanLike) -> Iteration:
        end = anchor.end_ns
        inside = [s for s in self._pending if s.start_ns < end and s.end_ns > start]
        inside.append(anchor)
        self._pending = [s for s in self._pending if s.end_ns > end]
        stage_of = self.stage_of
        clipped = [(s.start_ns if s.start_ns > start else start,  # max(), min() inlined
                    s.end_ns if s.end_ns < end else end,
                    stage_of.get(s.probe, s.probe)) for s in inside]
        stages = exclusive_time(clipped)
        stages[HOST] = (end - start) - sum(stages.values())
        feats = workload_features(
            [s for s in inside if s.start_ns >= start or s is anchor], self.derived)
        it = Iteration(self.pid, self.device, self.index, start, end,
                       phase_of(feats, self.phase_rule),
                       MappingProxyType(stages), MappingProxyType(feats))
        self.index += 1
        return it
