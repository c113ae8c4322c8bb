"""The engine proper: spans → iterations → sketches, detection, SLOs, alerts and views.

It does no I/O of its own: :class:`~prism_tui.engine.monitor.Monitor` feeds it spans from
live uprobe sessions, and tests (or a replay) feed it recorded spans with a fixed clock.
Baseline models are fitted in the running loop's executor (inline when there is no loop,
so a replay is deterministic). Every detector or SLO transition becomes an
:class:`AlertEvent` handed to every sink on the iteration that crossed the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from prism_tui.engine.detector import (
    Detector,
    FittedBaseline,
    SloRule,
    Verdict,
    Workload,
    fit_baseline,
    get_rule,
)
from prism_tui.engine.episodes import EpisodeGate, EpisodeHolds
from prism_tui.engine.fit_worker import FitWorker, FitWorkerUnavailableError
from prism_tui.engine.iterations import (
    Derived,
    Iteration,
    IterationBuilder,
    RunQueueSample,
    SpanLike,
    run_queue_wait_within,
    with_run_queue_delay,
)
from prism_tui.engine.rca import BaselineSummary, rank_suspects, summarize
from prism_tui.engine.sketches import ITERATION, SeriesKey, Snapshot, WindowedSketches
from prism_tui.engine.span_store import SpanStore
from prism_tui.engine.view import (
    WINDOWS_S,
    AlertCount,
    AlertRecord,
    DetectorPoint,
    DetectorState,
    EngineView,
    GovernorCount,
    GovernorStatus,
    IterationBar,
    ProbeStatus,
    SloStatus,
    TargetStatus,
    TelemetryValue,
    frozen_snapshots,
)
from prism_tui.scheduling import follow_priority, helper_executor, leave_realtime, realtime_priority
from probes.catalog import DerivedFeature

BASELINE_SHARES = 300  # normal iterations kept for root-cause comparison
ANOMALY_SHARES = 10
BASELINE_METRIC_SAMPLES = 60
"""Telemetry samples before an episode that form the metrics' baseline (a minute)."""
METRIC_SAMPLES = 600
"""Telemetry samples kept for root-cause hints (10 min at one a second)."""
METRIC_FLOOR = 1.0
"""Metric values below this count as this: the score takes their log, and a count or a
percentage near 0 (no major fault this second) would make any change look enormous."""
RCA_METRICS = frozenset({
    # the target process: CPU it got, its threads' wait for a CPU, preemptions
    "cpu_pct", "runqueue_delta_ns", "involuntary_switches_delta", "major_faults_delta",
    # the host: how busy and how fast its CPUs are
    "cpu_util_pct", "load_avg_1m", "cpu_freq_min_mhz",
    # a GPU (NVML), when one is sampled
    "gpu_util_pct", "mem_util_pct", "sm_clock_mhz", "mem_clock_mhz", "power_w",
    "pcie_rx_kbps", "pcie_tx_kbps",
})
"""Telemetry metrics compared by the root-cause score (rates and levels that move with
a slowdown; not sizes such as RSS or thread counts)."""
SUMMARY_EVERY = 50
"""Normal iterations between summaries of the root-cause baseline (~1 ms each, kept off
the alert's path: an alert compares its window with the last summary)."""


@dataclass(frozen=True)
class AlertEvent:
    """One alert state change, as the engine emits it (the fields of docs/alerts.md)."""

    id: str
    fingerprint: str
    status: str  # "firing" | "resolved"
    severity: str
    host: str
    target: dict[str, Any]
    device: str
    stage: str
    phase: str
    observed_ms: float
    predicted_ms: float | None
    error: float
    ucl: float
    window: int
    started_at_ns: int
    detected_at_ns: int
    iteration_end_ns: int
    suspects: tuple[dict[str, Any], ...]
    summary: str
    source: str = "detector"
    """``detector`` (workload-aware baseline) or ``slo`` (a configured objective)."""
    wall_time: float = 0.0
    """Epoch seconds at detection (for RFC 3339 fields and the dashboard's clock)."""

    @property
    def alert_latency_ms(self) -> float:
        """From the anomalous iteration's end to detection (CLOCK_MONOTONIC)."""
        return (self.detected_at_ns - self.iteration_end_ns) / 1e6


class AlertSink(Protocol):
    """Where alerts go (stdout JSON lines, MQTT, history...). Must not block."""

    def emit(self, alert: AlertEvent) -> None:
        """Take one alert state change."""


@dataclass(frozen=True)
class Observation:
    """One iteration with the detector's verdict on it (None during warm-up)."""

    iteration: Iteration
    verdict: Verdict | None


@dataclass(frozen=True)
class SloSpec:
    """A configured objective: ``rule`` like ``decode p99 <= 60ms over 10s`` on ``stage``."""

    rule: str
    stage: str = ITERATION
    name: str = ""

    @property
    def label(self) -> str:
        """Its name, or the rule text with the stage."""
        return self.name or (self.rule if self.stage == ITERATION else
                             f"{self.stage}: {self.rule}")

    @classmethod
    def parse(cls, text: str) -> SloSpec:
        """``"[stage:] rule"``: ``"device_sync: decode p99 <= 5ms over 10s"`` holds one
        stage's time per iteration to the objective, ``"decode p99 <= 60ms over 10s"``
        the whole iteration. Raises ValueError (one line) when the rule does not parse."""
        m = _SLO_STAGE.match(text)
        stage, rule = (m["stage"], m["rule"]) if m else (ITERATION, text)
        SloRule.parse(rule)
        return cls(rule.strip(), stage=stage)


_SLO_STAGE = re.compile(r"^\s*(?P<stage>[a-z_][a-z0-9_]*)\s*:\s*(?P<rule>.+)$", re.IGNORECASE)


@dataclass(frozen=True)
class DetectionConfig:
    """How the engine judges iterations (docs/detection.md) and when a verdict becomes an
    alert episode; the session builder makes it from the ``[engine]`` settings.

    ``rule``: ``prism`` or ``paper``. ``warmup``, ``warmup_s``: the baseline is fitted
    after that many decode iterations or seconds, whichever first (0 s: iterations only).
    ``holds``: when the per-iteration state opens or closes an episode. ``slos``: the
    objectives checked on every iteration. ``settle_s``: seconds of a process's first
    decode iterations its detector does not train on (a target started with the monitor).
    """

    rule: str = "prism"
    warmup: int = 1000
    warmup_s: float = 0.0
    holds: EpisodeHolds = field(default_factory=EpisodeHolds)
    slos: Sequence[SloSpec] = ()
    settle_s: float = 0.0


@dataclass(frozen=True)
class ViewRetention:
    """How much of the recent past the engine keeps for its views and trace export."""

    iterations: int = 240
    points: int = 600
    alerts: int = 200
    spans: int = 200_000


DETECTOR_FEATURES = frozenset({"sequences", "kv_tokens", "d2h_bytes", "h2d_bytes",
                               "h2d_first_bytes"})
"""Features the detector's workload (:func:`workload_of`) and the built-in phase rule read."""


def workload_of(it: Iteration) -> Workload:
    """What the detector regresses on, from the iteration's captured arguments.

    Sequences come from the profile's ``sequences`` feature when it derives one, else
    from the device-to-host copy of sampled tokens (8 bytes each, one per sequence); the
    batch's total context length from the profile's ``kv_tokens`` (the attention
    metadata copied each decode step) when the profile derives it. The reference's
    features follow: average context per sequence as ``avg_input`` (prompt and output
    are not told apart in these arguments), so ``kv_len`` and ``B × kv_len`` are exact.
    """
    sequences = it.features.get("sequences")
    batch = sequences if sequences is not None else it.features.get("d2h_bytes", 0.0) / 8
    kv = it.features.get("kv_tokens")
    avg_kv = kv / batch if kv is not None and kv > 0 and batch > 0 else 0.0
    return Workload(batch_size=batch, avg_input=avg_kv, avg_output=0.0)


@dataclass
class _Watched:
    pid: int
    name: str
    profile: str
    device: str
    builder: IterationBuilder
    state: str = "attached"
    probes: tuple[ProbeStatus, ...] = ()
    hits_per_s: float = 0.0
    lost: int = 0
    overhead_pct: float | None = None
    iterations: dict[str, int] = field(default_factory=dict)
    """Iterations completed per phase since the watch began."""
    costs_measured: bool = True
    costs_note: str = ""
    governor: GovernorStatus | None = None
    backend: str = ""
    detectors: dict[str, Detector] = field(default_factory=dict)
    normal_shares: deque[dict[str, float]] = field(
        default_factory=lambda: deque(maxlen=BASELINE_SHARES))
    recent_shares: deque[dict[str, float]] = field(
        default_factory=lambda: deque(maxlen=ANOMALY_SHARES))
    recent_starts: deque[int] = field(default_factory=lambda: deque(maxlen=ANOMALY_SHARES))
    """When each of ``recent_shares``' iterations started."""
    baseline_summary: BaselineSummary | None = None
    """``normal_shares`` summarised every SUMMARY_EVERY normal iterations, ahead of alerts."""
    normal_seen: int = 0
    run_queue: RunQueueSample | None = None
    """The last run-queue reading of the thread that ends the iterations."""
    fitting: set[str] = field(default_factory=set)
    firing_since: dict[str, int] = field(default_factory=dict)
    episodes: dict[str, EpisodeGate] = field(default_factory=dict)
    """Per phase: the detector's per-iteration state turned into alert episodes."""
    episode_shares: list[dict[str, float]] = field(default_factory=list)
    """Stage shares of the iterations judged while the detector fires (capped), for the
    root-cause hints of the ``resolved`` alert: the whole episode against the baseline."""
    slos: dict[tuple[str, str], list[tuple[SloSpec, SloRule]]] = field(default_factory=dict)


_fit_pool: ThreadPoolExecutor | None = None
_fit_worker = FitWorker()
_fit_pool_lock = threading.Lock()


def fit_executor() -> ThreadPoolExecutor:
    """The one thread that hands fits to the fit worker process and waits for them."""
    global _fit_pool
    with _fit_pool_lock:
        if _fit_pool is None:
            # the loop's priority: the thread only pickles and waits, and a normal one
            # holding the GIL under CPU hogs would keep a real-time loop waiting
            _fit_pool = helper_executor(1, "prism-fit")
        return _fit_pool


def fit_in_worker(x: Any, y: Any, rule: Any) -> FittedBaseline:
    """``fit_baseline`` in the low-priority worker process (see :mod:`.fit_worker`); in
    this thread when no process can be started here, so a fit is slower but never lost.
    A worker that died mid-fit raises: the fit is retried, with a new worker, next time."""
    try:
        result: FittedBaseline = _fit_worker.fit(x, y, rule)
        return result
    except FitWorkerUnavailableError:
        priority = realtime_priority()
        leave_realtime()  # a second of CPU: never at real-time priority
        try:
            return fit_baseline(x, y, rule)
        finally:
            follow_priority(priority)


def shutdown_fit_executor() -> None:
    """Stop the fit worker process (the next fit starts a new one); monitors call it
    when they close."""
    _fit_worker.close()


class Engine:
    """Turns spans of watched processes into iterations, sketches, alerts and views."""

    def __init__(self, detection: DetectionConfig | None = None, *,
                 sinks: Sequence[AlertSink] = (),
                 on_observation: Callable[[Observation], None] | None = None,
                 on_spans: Callable[[Sequence[SpanLike]], None] | None = None,
                 on_run_queue: Callable[[int, RunQueueSample], None] | None = None,
                 escalate: Callable[[AlertEvent], None] | None = None,
                 on_notice: Callable[[str], None] | None = None,
                 host: str | None = None, clock: Callable[[], int] = time.monotonic_ns,
                 wall_clock: Callable[[], float] = time.time,
                 keep: ViewRetention | None = None) -> None:
        """``detection``: the rule, warm-up, alert holds, SLOs and settling time
        (:class:`DetectionConfig`; default: its defaults). ``clock`` is CLOCK_MONOTONIC in
        ns (span timestamps use it); ``wall_clock`` epoch s. ``sinks`` take every alert,
        ``on_observation`` every judged iteration; ``on_spans`` sees every batch of spans
        fed, ``on_run_queue`` every run-queue reading that came with one (``pid``,
        the reading), after the batch: a recorder. ``keep``: how much the views look back.

        Raises ValueError when an SLO rule does not parse.
        """
        self.detection = detection = detection or DetectionConfig()
        keep = keep or ViewRetention()
        self.rule = detection.rule
        self.warmup = detection.warmup
        self.warmup_s = detection.warmup_s
        self.holds = detection.holds
        self.settle_ns = int(detection.settle_s * 1e9)
        self.sinks = list(sinks)
        self.escalate = escalate
        self.on_notice = on_notice
        self.on_observation = on_observation
        self.on_spans = on_spans
        self.on_run_queue = on_run_queue
        self.slo_specs = tuple(detection.slos)
        for spec in self.slo_specs:
            SloRule.parse(spec.rule)  # fail at start, not on the first iteration
        self.host = host or socket.gethostname()
        self.clock = clock
        self.wall_clock = wall_clock
        self.sketches = WindowedSketches(clock=clock)
        self.alerts: list[AlertEvent] = []
        self.iterations_seen = 0
        self._watched: dict[int, _Watched] = {}
        self._bars: deque[IterationBar] = deque(maxlen=keep.iterations)
        self._points: deque[DetectorPoint] = deque(maxlen=keep.points)
        self._records: deque[AlertRecord] = deque(maxlen=keep.alerts)
        # typed arrays, not objects: 200k span objects made each full collection ~160 ms,
        # and as flat tuples they held ~70 MiB (span_store.py)
        self._spans = SpanStore(keep.spans)
        self._metric_log: deque[tuple[int, dict[str, float]]] = deque(maxlen=METRIC_SAMPLES)
        self._series_keys: dict[tuple[str, str, str], SeriesKey] = {}
        self._telemetry: tuple[TelemetryValue, ...] = ()
        self._notices: deque[str] = deque(maxlen=5)
        self._held: list[AlertEvent] | None = None
        self._alert_counts: dict[tuple[int, str, str, str], int] = {}
        self._governor_counts: dict[tuple[int, str], int] = {}

    # ------------------------------------------------------------------ targets
    def watch(self, pid: int, name: str, anchor: str, stage_of: Mapping[str, str], *,
              profile: str = "", device: str = "cpu", derived: Sequence[Derived] = (),
              phase_rule: str | None = None, probes: Sequence[ProbeStatus] = (),
              backend: str = "") -> None:
        """Start (or restart) following process ``pid`` whose iterations end at ``anchor``
        (``backend``: the probe backend its probes were opened with, shown from the start)."""
        builder = IterationBuilder(
            pid, anchor, stage_of, device=device, derived=derived,
            phase_rule=DerivedFeature("phase_rule", phase_rule) if phase_rule else None)
        self._watched[pid] = _Watched(pid, name, profile, device, builder, probes=tuple(probes),
                                      backend=backend)

    def gone(self, pid: int) -> None:
        """Mark a watched process as exited (it stays in the view, greyed)."""
        if pid in self._watched:
            self._watched[pid].state = "gone"
            self._watched[pid].hits_per_s = 0.0

    def forget(self, pid: int) -> None:
        """Stop showing a process (detached by the user)."""
        self._watched.pop(pid, None)

    @property
    def pids(self) -> tuple[int, ...]:
        """Processes being watched (attached or gone)."""
        return tuple(self._watched)

    def set_probe_status(self, pid: int, probes: Sequence[ProbeStatus], *,
                         hits_per_s: float, lost: int, overhead_pct: float | None,
                         costs_measured: bool = True, costs_note: str = "",
                         governor: GovernorStatus | None = None, backend: str = "") -> None:
        """Record the probe health of ``pid`` for the header (Monitor calls it each view):
        the overhead estimate, whether its costs were measured, the governor's state and
        the probe backend."""
        w = self._watched.get(pid)
        if w is not None:
            w.probes, w.hits_per_s, w.lost, w.overhead_pct = (tuple(probes), hits_per_s,
                                                              lost, overhead_pct)
            w.costs_measured, w.costs_note, w.governor = costs_measured, costs_note, governor
            w.backend = backend

    def set_telemetry(self, values: Iterable[TelemetryValue]) -> None:
        """Replace the telemetry shown (sampled elsewhere, once a second), and log its
        numbers (``metric@device``) for the root-cause hints."""
        self._telemetry = tuple(values)
        metrics = {f"{v.metric}@{v.device}": max(v.value, METRIC_FLOOR)
                   for v in self._telemetry
                   if v.metric in RCA_METRICS and v.value is not None
                   and _usable_metric(v.value)}
        if metrics:
            self._metric_log.append((self.clock(), metrics))

    def count_governor_decision(self, pid: int, action: str) -> None:
        """Count one overhead-governor decision on ``pid`` (``detach``, ``duty-cycle``...)
        for the view's :attr:`~EngineView.governor_counts`; the monitor calls it for each
        decision its governor makes."""
        key = (pid, action)
        self._governor_counts[key] = self._governor_counts.get(key, 0) + 1

    def notice(self, line: str) -> None:
        """A short line for the dashboard's status bar (also to ``on_notice``)."""
        self._notices.append(line)
        if self.on_notice is not None:
            self.on_notice(line)

    # ------------------------------------------------------------------ spans
    def add_spans(self, pid: int, spans: Sequence[SpanLike],
                  run_queue: RunQueueSample | None = None) -> list[Iteration]:
        """Feed spans of ``pid``; returns the iterations they completed.

        ``run_queue`` is the cumulative run-queue wait of the thread that ends the
        iterations, read as the spans arrived. The part of the wait since the previous
        reading of that thread that fell inside the iterations the spans complete
        becomes their ``runqueue`` stage.
        """
        w = self._watched.get(pid)
        if w is None:
            return []
        self._keep(spans)
        if self.on_spans is not None:
            self.on_spans(spans)
        if run_queue is not None and self.on_run_queue is not None:
            self.on_run_queue(pid, run_queue)
        done = w.builder.add(spans)
        previous = w.run_queue
        if run_queue is not None and (done or previous is None
                                      or previous.tid != run_queue.tid):
            # a reading with no iteration completed keeps the last one: the wait since
            # then belongs to the iteration still open
            w.run_queue = run_queue
            if done and previous is not None and previous.tid == run_queue.tid:
                done = with_run_queue_delay(
                    done, run_queue_wait_within(done, previous, run_queue))
        for it in done:
            self._on_iteration(w, it)
        return done

    def add_deepdive_spans(self, pid: int, spans: Sequence[SpanLike],
                           stage_of: Mapping[str, str]) -> None:
        """Spans of the deeper probes attached while an alert fires (DeepDive).

        They are kept for the trace export and sketched per call under phase
        ``deepdive``, but not cut into iterations: the sentinel stages stay comparable
        with the baseline window the root-cause scores use.
        """
        w = self._watched.get(pid)
        if w is None:
            return
        self._keep(spans)
        if self.on_spans is not None:
            self.on_spans(spans)
        for s in spans:
            stage = stage_of.get(s.probe, s.probe)
            self.sketches.add(SeriesKey(stage, w.device, "deepdive"), s.end_ns,
                              (s.end_ns - s.start_ns) / 1e6)

    def _keep(self, spans: Sequence[SpanLike]) -> None:
        self._spans.extend(spans)

    def recent_spans(self, seconds: float) -> list[SpanLike]:
        """Spans that ended in the last ``seconds`` (for a trace export)."""
        return self._spans.recent(self.clock() - int(seconds * 1e9))

    def _on_iteration(self, w: _Watched, it: Iteration) -> None:
        self.iterations_seen += 1
        device, phase = it.device, it.phase
        w.iterations[phase] = w.iterations.get(phase, 0) + 1
        keys = self._series_keys
        for stage, ns in (*it.stages.items(), (ITERATION, it.end_ns - it.start_ns)):
            key = keys.get((stage, device, phase))
            if key is None:  # made once per series, not per iteration
                key = keys[(stage, device, phase)] = SeriesKey(stage, device, phase)
            self.sketches.add(key, it.end_ns, ns / 1e6)
        total_ns = it.end_ns - it.start_ns
        shares = {stage: ns / total_ns if total_ns > 0 else 0.0
                  for stage, ns in it.stages.items()}  # Iteration.share, inlined
        workload = workload_of(it)
        self._bars.append(IterationBar(it.pid, device, phase, it.end_ns, it.latency_ms,
                                       tuple(sorted(shares.items())), workload.batch_size))
        w.recent_shares.append(shares)
        w.recent_starts.append(it.start_ns)
        verdict = None
        if phase == "decode":
            det = w.detectors.get(phase)
            if det is None:
                det = w.detectors[phase] = Detector(rule=self.rule, warmup=self.warmup,
                                                    warmup_s=self.warmup_s, auto_fit=False,
                                                    settle_ns=self.settle_ns)
            verdict = det.observe(it.end_ns, it.latency_ms, workload)
            if verdict is not None and verdict.novel and det.novel_seen == 1:
                self.notice(f"pid {w.pid}: {phase} workload new to the baseline "
                            f"({verdict.novel}); learning it, not judging it")
            if phase not in w.fitting and (det.needs_fit or det.refit_due):
                self._fit(w, phase, det, refit=not det.needs_fit)
            if verdict is not None:
                self._points.append(DetectorPoint(
                    it.pid, device, phase, it.end_ns, verdict.observed_ms,
                    verdict.predicted_ms, verdict.smoothed, verdict.ucl, verdict.firing))
                if not verdict.firing:
                    w.normal_shares.append(shares)
                    w.normal_seen += 1
                    if w.normal_seen % SUMMARY_EVERY == 0:
                        w.baseline_summary = summarize(list(w.normal_shares))
                elif len(w.episode_shares) < BASELINE_SHARES:
                    w.episode_shares.append(shares)
                gate = w.episodes.get(phase)
                if gate is None:
                    gate = w.episodes[phase] = EpisodeGate(self.holds)
                change = gate.observe(it.end_ns, verdict.firing)
                if change is not None:
                    self._detector_alert(w, it, verdict, change, gate.started_ns or it.end_ns)
                elif not verdict.firing and not gate.open and w.episode_shares:
                    w.episode_shares = []  # a blip that opened no episode
        self._check_slos(w, it)
        if self.on_observation is not None:
            self.on_observation(Observation(it, verdict))

    def _fit(self, w: _Watched, phase: str, det: Detector, *, refit: bool) -> None:
        """Fit in the running loop's executor, or inline when there is no loop."""
        x, y = det.recent_training_data() if refit else det.training_data()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            det.install(fit_baseline(x, y, det.rule_spec))
            return
        w.fitting.add(phase)
        future = loop.run_in_executor(fit_executor(), fit_in_worker, x, y, det.rule_spec)

        def done(fut: asyncio.Future[Any]) -> None:
            w.fitting.discard(phase)
            if not fut.cancelled() and fut.exception() is None:
                det.install(fut.result())
                if refit:
                    self.notice(f"pid {w.pid}: {phase} baseline refitted on recent "
                                f"non-alerting iterations")

        future.add_done_callback(done)

    # ------------------------------------------------------------------ alerts
    def _suspects(self, w: _Watched, device: str, anomalous: Sequence[Mapping[str, float]],
                  since_ns: int) -> tuple[dict[str, Any], ...]:
        """The top root-cause hints: each stage's share of the ``anomalous`` iterations
        against the normal ones, with the telemetry metric that moved most between the
        samples before ``since_ns`` and those after it (the paper's score). A sample is
        taken once a second: one describes an episode, rarely its first iterations."""
        if len(w.normal_shares) < 20:
            return ()
        if w.baseline_summary is None:
            w.baseline_summary = summarize(list(w.normal_shares))
        before = [m for t, m in self._metric_log if t < since_ns][-BASELINE_METRIC_SAMPLES:]
        during = [m for t, m in self._metric_log if t >= since_ns]
        return tuple(
            {"stage": s.stage, "device": s.device or device,
             "metric": s.metric.partition("@")[0] if s.metric else "share",
             "score": round(s.score, 4), "delta_share": round(s.delta_share, 4)}
            for s in rank_suspects(w.baseline_summary, anomalous, before, during,
                                   related=self._related_metrics(w, before + during, anomalous),
                                   top=3))

    def _related_metrics(self, w: _Watched, samples: Sequence[Mapping[str, float]],
                         anomalous: Sequence[Mapping[str, float]]) -> dict[str, list[str]]:
        """Every stage of ``w`` with the metrics of its process and host (CPU time, run
        queue, preemptions, clocks) and of its device (a GPU's): a slowdown of any
        stage can come from either side."""
        mine = (f"@pid {w.pid}", "@host", f"@{w.device}")
        keys = sorted({k for m in samples for k in m if k.endswith(mine)})
        stages = set(w.baseline_summary.stats if w.baseline_summary else ()) | \
            {k for row in anomalous for k in row}
        return {stage: keys for stage in stages}

    @contextlib.contextmanager
    def alerts_held(self) -> Iterator[None]:
        """Alerts raised inside the block reach the sinks when it ends, in order.

        The runtime judges every target's finished iterations first: when two ranks fire
        on one iteration, the second's verdict does not wait behind the first alert's
        root-cause ranking, outbox write and publish. Nested blocks flush at the outermost.
        """
        if self._held is not None:
            yield
            return
        self._held = []
        try:
            yield
        finally:
            held, self._held = self._held, None
            for alert in held:
                self._emit(alert)

    @property
    def alerts_pending(self) -> bool:
        """Whether alerts are held by :meth:`alerts_held` (raised, not yet emitted)."""
        return bool(self._held)

    def _emit(self, alert: AlertEvent) -> None:
        if self._held is not None:
            self._held.append(alert)
            return
        self.alerts.append(alert)
        kind = (int(alert.target.get("pid", 0)), alert.status, alert.severity, alert.source)
        self._alert_counts[kind] = self._alert_counts.get(kind, 0) + 1
        self._records.append(AlertRecord(
            alert.id, alert.fingerprint, alert.status, alert.severity, alert.source,
            int(alert.target.get("pid", 0)), alert.device, alert.stage, alert.phase,
            alert.observed_ms, alert.predicted_ms, alert.error, alert.ucl,
            alert.detected_at_ns, alert.wall_time, alert.summary, alert.suspects))
        if self.escalate is not None:
            self.escalate(alert)
        for sink in self.sinks:
            sink.emit(alert)

    def _fingerprint(self, *parts: object) -> str:
        key = "/".join(str(p) for p in (self.host, *parts))
        return uuid.uuid5(uuid.NAMESPACE_URL, key).hex[:16]

    def _detector_alert(self, w: _Watched, it: Iteration, v: Verdict, change: str,
                        started: int) -> None:
        """Emit an episode's ``firing`` (it ``opened``) or ``resolved`` (``closed``)."""
        now = self.clock()
        key = f"{it.device}/{it.phase}/{ITERATION}"
        status = "firing" if change == "opened" else "resolved"
        if status == "firing":  # the iterations that crossed, as they arrive
            suspects = self._suspects(w, it.device, list(w.recent_shares), w.recent_starts[0])
        else:  # the whole episode, with the telemetry sampled during it
            suspects = self._suspects(w, it.device, w.episode_shares or list(w.recent_shares),
                                      started)
            w.episode_shares = []
        top = ""
        if suspects:
            metric = suspects[0]["metric"]
            top = (f"; {'top suspect' if status == 'firing' else 'the episode pointed at'}"
                   f": {suspects[0]['stage']}" + (f" ({metric})" if metric != "share" else ""))
        where = f"{it.phase} iterations of pid {w.pid} on {it.device}"
        why = (f"smoothed error {v.smoothed:.0%} > UCL {v.ucl:.0%}" if v.smoothed > v.ucl
               else f"error {v.error:.0%} and its latest predecessors above UCL {v.ucl:.0%}")
        summary = (f"{where} take {v.observed_ms:.1f} ms where the workload predicts "
                   f"{v.predicted_ms:.1f} ms ({why}){top}" if status == "firing" else
                   f"{where} are back within the workload's prediction{top}")
        self._emit(AlertEvent(
            id=uuid.uuid4().hex, fingerprint=self._fingerprint(w.pid, key),
            status=status,
            severity="critical" if v.smoothed > 2 * v.ucl else "error", host=self.host,
            target={"pid": w.pid, "name": w.name}, device=it.device, stage=ITERATION,
            phase=it.phase, observed_ms=round(v.observed_ms, 4),
            predicted_ms=round(v.predicted_ms, 4), error=round(v.smoothed, 4),
            ucl=round(v.ucl, 4), window=get_rule(self.rule).window, started_at_ns=started,
            detected_at_ns=now, iteration_end_ns=it.end_ns, suspects=suspects, summary=summary,
            wall_time=self.wall_clock()))

    def _check_slos(self, w: _Watched, it: Iteration) -> None:
        if not self.slo_specs:
            return
        rules = w.slos.get((it.device, it.phase))
        if rules is None:
            rules = w.slos[(it.device, it.phase)] = [
                (spec, SloRule.parse(spec.rule)) for spec in self.slo_specs]
        for spec, rule in rules:
            if rule.phase is not None and rule.phase != it.phase:
                continue
            value = (it.latency_ms if spec.stage == ITERATION else
                     it.stages.get(spec.stage, 0) / 1e6)
            transition = rule.observe(it.end_ns, value)
            if transition is None:
                continue
            stat = rule.value() or 0.0
            key = f"{it.device}/{it.phase}/{spec.stage}/slo/{spec.label}"
            if transition == "firing":
                w.firing_since[key] = it.end_ns
            started = w.firing_since.pop(key, it.end_ns) if transition == "resolved" else \
                w.firing_since.get(key, it.end_ns)
            summary = (f"SLO '{spec.label}' breached on pid {w.pid} {it.device}: "
                       f"{rule.stat} {stat:.1f} ms > {rule.threshold_ms:g} ms"
                       if transition == "firing" else
                       f"SLO '{spec.label}' holds again on pid {w.pid} {it.device}")
            self._emit(AlertEvent(
                id=uuid.uuid4().hex, fingerprint=self._fingerprint(w.pid, key),
                status=transition, severity="warning", host=self.host,
                target={"pid": w.pid, "name": w.name}, device=it.device, stage=spec.stage,
                phase=it.phase, observed_ms=round(stat, 4), predicted_ms=None,
                error=round(stat / rule.threshold_ms - 1, 4), ucl=0.0,
                window=int(rule.window_s), started_at_ns=started,
                detected_at_ns=self.clock(), iteration_end_ns=it.end_ns,
                suspects=self._suspects(w, it.device, list(w.recent_shares),
                                        w.recent_starts[0]) if transition == "firing" else (),
                summary=summary, source="slo", wall_time=self.wall_clock()))

    # ------------------------------------------------------------------ views
    def snapshots(self, now_ns: int | None = None) -> dict[float, Snapshot]:
        """One sketch snapshot per dashboard window (closing finished 1-s windows first)."""
        self.sketches.tick(now_ns)
        return {span: self.sketches.snapshot(now_ns, span_s=span) for span in WINDOWS_S}

    def prepare_view(self, now_ns: int | None = None) -> Iterator[None]:
        """Compute ``view(now_ns)``'s snapshots one series per step (nothing when cached).

        For a caller that yields to its event loop between steps; see
        :meth:`WindowedSketches.snapshot_steps`.
        """
        self.sketches.tick(now_ns)
        for span in WINDOWS_S:
            yield from self.sketches.snapshot_steps(now_ns, span)

    def view(self, now_ns: int | None = None) -> EngineView:
        """An immutable view of everything the dashboard draws."""
        now = self.clock() if now_ns is None else now_ns
        snaps = self.snapshots(now)
        targets = tuple(TargetStatus(w.pid, w.name, w.profile, w.device, w.state, w.probes,
                                     w.hits_per_s, w.lost, w.overhead_pct,
                                     tuple(sorted(w.iterations.items())), w.costs_measured,
                                     w.costs_note, w.governor, w.backend)
                        for w in self._watched.values())
        detectors = []
        slos = []
        for w in self._watched.values():
            for phase, det in w.detectors.items():
                state = "live" if det.fitted else ("fitting" if det.needs_fit else "warming")
                progress = det.warmup if det.fitted else det.training_rows
                detectors.append(DetectorState(w.pid, w.device, phase, state, progress,
                                               det.warmup, det.firing))
            for (device, phase), rules in sorted(w.slos.items()):
                for spec, rule in rules:
                    if rule.phase is not None and rule.phase != phase:
                        continue
                    slos.append(SloStatus(f"{spec.label} ({device})", spec.stage,
                                          _quantile_of(rule.stat), rule.threshold_ms,
                                          rule.window_s, rule.value(), rule.violated))
        return EngineView(
            now_ns=now, host=self.host, targets=targets,
            snapshots=frozen_snapshots(snaps), iterations=tuple(self._bars),
            detector=tuple(self._points), detectors=tuple(detectors),
            alerts=tuple(self._records), telemetry=self._telemetry, slos=tuple(slos),
            notices=tuple(self._notices),
            series_totals=self.sketches.totals(),
            alert_counts=tuple(AlertCount(pid, status, severity, source, n) for
                               (pid, status, severity, source), n in
                               sorted(self._alert_counts.items())),
            governor_counts=tuple(GovernorCount(pid, action, n) for (pid, action), n in
                                  sorted(self._governor_counts.items())))


def _usable_metric(value: float) -> bool:
    return not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _quantile_of(stat: str) -> float:
    """0.99 for ``p99``; 1.0 for ``max``; 0.5 for ``mean`` (shown as an average)."""
    if stat == "max":
        return 1.0
    if stat.startswith("p"):
        return float(stat[1:]) / 100
    return 0.5
