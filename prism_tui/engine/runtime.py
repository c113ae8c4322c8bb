"""The monitor's loop: spans → iterations → sketches, detection, alerts, snapshots.

One asyncio loop moves data only: per target a uprobe session (its anchor probe urgent,
so an iteration's end reaches the loop within a millisecond), an iteration builder, and
one detector per phase. Baseline models are fitted in an executor and installed when
ready. A detector transition becomes an :class:`AlertEvent` handed to every sink on the
iteration that crossed the limit, with ``iteration_end_ns`` so alert latency can be
measured end to end. Sinks are a protocol: the alerting package plugs in without the
engine importing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prism_tui.engine.detector import Detector, Verdict, Workload, fit_baseline
from prism_tui.engine.iterations import Iteration, IterationBuilder
from prism_tui.engine.rca import rank_suspects
from prism_tui.engine.sketches import ITERATION, SeriesKey, Snapshot, WindowedSketches
from probes.catalog import Profile
from probes.placement import Placement, place_profile
from probes.target import Target
from probes.uprobes import Span, UprobeSession

BASELINE_SHARES = 300  # normal iterations kept for root-cause comparison
ANOMALY_SHARES = 10


@dataclass(frozen=True)
class AlertEvent:
    """One alert state change, as the engine emits it (DESIGN.md §4.2 fields)."""

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
    predicted_ms: float
    error: float
    ucl: float
    window: int
    started_at_ns: int
    detected_at_ns: int
    iteration_end_ns: int
    suspects: tuple[dict[str, Any], ...]
    summary: str

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


def workload_of(it: Iteration) -> Workload:
    """What the detector regresses on, from the iteration's captured arguments.

    Sequences come from the device-to-host copy of sampled tokens (8 bytes each) and
    tokens from the host-to-device copy of input ids; per-sequence context length is not
    visible in these arguments, so only the batch enters the baseline today.
    """
    batch = it.features.get("d2h_bytes", 0.0) / 8
    return Workload(batch_size=batch, avg_input=0.0, avg_output=0.0)


@dataclass
class _TargetState:
    target: Target
    session: UprobeSession
    builder: IterationBuilder
    detectors: dict[str, Detector] = field(default_factory=dict)
    normal_shares: deque[dict[str, float]] = field(
        default_factory=lambda: deque(maxlen=BASELINE_SHARES))
    recent_shares: deque[dict[str, float]] = field(
        default_factory=lambda: deque(maxlen=ANOMALY_SHARES))
    fitting: set[str] = field(default_factory=set)
    firing_since: dict[str, int] = field(default_factory=dict)


class Monitor:
    """Watches targets with a profile; one owner of their sessions (``close()`` idempotent)."""

    def __init__(self, targets: Sequence[Target], profile: Profile, *,
                 extra_profiles: Sequence[Profile] = (), rule: str = "paper",
                 warmup: int = 1000, sinks: Sequence[AlertSink] = (),
                 on_observation: Callable[[Observation], None] | None = None,
                 on_snapshot: Callable[[Snapshot], None] | None = None,
                 snapshot_interval_s: float = 0.5, device_of: Callable[[int], str] | None = None,
                 mode: str = "auto", clock: Callable[[], int] = time.monotonic_ns) -> None:
        """Attach the sentinel probes of ``profile`` (which names the iteration anchor and
        derived features) and of ``extra_profiles`` (``nccl`` beside ``cuda``, say) to
        every target; raises a ProbeError subclass when a probe cannot be opened."""
        if profile.anchor is None:
            raise ValueError(f"profile {profile.name!r} names no iteration anchor")
        self.profile = profile
        self.anchor = profile.anchor
        self.rule = rule
        self.warmup = warmup
        self.sinks = list(sinks)
        self.on_observation = on_observation
        self.on_snapshot = on_snapshot
        self.snapshot_interval_s = snapshot_interval_s
        self.clock = clock
        self.host = socket.gethostname()
        self.sketches = WindowedSketches(clock=clock)
        self.alerts: list[AlertEvent] = []
        self.placements: list[Placement] = []
        self._states: list[_TargetState] = []
        self._closed = False
        if device_of is None:
            from prism_tui.engine.devices import device_of as from_environment

            device_of = from_environment
        try:
            for target in targets:
                placement = place_profile(target, profile, "sentinel")
                self.placements.append(placement)
                sites = placement.sites
                for extra in extra_profiles:
                    more = place_profile(target, extra, "sentinel")
                    self.placements.append(more)
                    sites += more.sites
                if not any(s.probe == self.anchor for s in sites):
                    raise ValueError(f"the anchor {self.anchor!r} of profile "
                                     f"{profile.name!r} does not resolve in pid {target.pid}")
                session = UprobeSession([target], sites, mode=mode, urgent={self.anchor},
                                        drain_interval_s=0.02).open()
                builder = IterationBuilder(target.pid, self.anchor,
                                           {s.probe: s.stage for s in sites},
                                           device=device_of(target.pid),
                                           derived=profile.derived)
                self._states.append(_TargetState(target, session, builder))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Detach every probe (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for st in self._states:
            st.session.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the loop
    async def run(self, duration_s: float | None = None,
                  stop: asyncio.Event | None = None) -> None:
        """Process spans until ``duration_s``, ``stop``, or every target exits."""
        stop = stop or asyncio.Event()
        queue: asyncio.Queue[tuple[_TargetState, list[Span]] | None] = asyncio.Queue()

        async def pump(st: _TargetState) -> None:
            async for batch in st.session.batches():
                await queue.put((st, batch))
            await queue.put(None)

        pumps = [asyncio.create_task(pump(st)) for st in self._states]
        deadline = None if duration_s is None else time.monotonic() + duration_s
        last_snapshot = time.monotonic()
        alive = len(pumps)
        try:
            while alive and not stop.is_set():
                timeout = 0.1
                if deadline is not None:
                    timeout = min(timeout, deadline - time.monotonic())
                    if timeout <= 0:
                        break
                try:
                    item = await asyncio.wait_for(queue.get(), timeout)
                except asyncio.TimeoutError:
                    item = ()  # type: ignore[assignment]
                if item is None:
                    alive -= 1
                elif item:
                    st, spans = item
                    for it in st.builder.add(spans):
                        self._on_iteration(st, it)
                now = time.monotonic()
                if self.on_snapshot is not None and now - last_snapshot >= \
                        self.snapshot_interval_s:
                    last_snapshot = now
                    self.sketches.tick()
                    self.on_snapshot(self.sketches.snapshot(span_s=10))
        finally:
            for task in pumps:
                task.cancel()
            for task in pumps:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    # ------------------------------------------------------------------ per iteration
    def _on_iteration(self, st: _TargetState, it: Iteration) -> None:
        device, phase = it.device, it.phase
        for stage, ns in it.stages.items():
            self.sketches.add(SeriesKey(stage, device, phase), it.end_ns, ns / 1e6)
        self.sketches.add(SeriesKey(ITERATION, device, phase), it.end_ns, it.latency_ms)
        shares = {stage: it.share(stage) for stage in it.stages}
        st.recent_shares.append(shares)
        verdict = None
        if phase == "decode":
            det = st.detectors.get(phase)
            if det is None:
                det = st.detectors[phase] = Detector(rule=self.rule, warmup=self.warmup,
                                                     auto_fit=False)
            verdict = det.observe(it.end_ns, it.latency_ms, workload_of(it))
            if det.needs_fit and phase not in st.fitting:
                self._fit_in_background(st, phase, det)
            if verdict is not None and not verdict.firing:
                st.normal_shares.append(shares)
            if verdict is not None and verdict.transition is not None:
                self._alert(st, it, verdict)
        if self.on_observation is not None:
            self.on_observation(Observation(it, verdict))

    def _fit_in_background(self, st: _TargetState, phase: str, det: Detector) -> None:
        st.fitting.add(phase)
        x, y = det.training_data()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, fit_baseline, x, y, det.rule_spec)

        def done(fut: asyncio.Future[Any]) -> None:
            st.fitting.discard(phase)
            if not fut.cancelled() and fut.exception() is None:
                det.install(fut.result())

        future.add_done_callback(done)

    def _alert(self, st: _TargetState, it: Iteration, v: Verdict) -> None:
        now = self.clock()
        key = f"{self.host}/{st.target.pid}/{it.device}/{it.phase}/iteration"
        fingerprint = uuid.uuid5(uuid.NAMESPACE_URL, key).hex[:16]
        if v.transition == "firing":
            st.firing_since[key] = it.end_ns
        started = st.firing_since.get(key, it.end_ns)
        suspects = tuple(
            {"stage": s.stage, "device": s.device or it.device, "metric": s.metric,
             "score": round(s.score, 4), "delta_share": round(s.delta_share, 4)}
            for s in rank_suspects(list(st.normal_shares), list(st.recent_shares), top=3)
        ) if len(st.normal_shares) >= 20 else ()
        top = f"; top suspect: {suspects[0]['stage']}" if suspects else ""
        summary = (f"{it.phase} iterations of pid {st.target.pid} on {it.device} take "
                   f"{v.observed_ms:.1f} ms where the workload predicts "
                   f"{v.predicted_ms:.1f} ms (smoothed error {v.smoothed:.0%} > "
                   f"UCL {v.ucl:.0%}){top}" if v.transition == "firing" else
                   f"{it.phase} iterations of pid {st.target.pid} on {it.device} are back "
                   f"within the workload's prediction")
        alert = AlertEvent(
            id=uuid.uuid4().hex, fingerprint=fingerprint, status=str(v.transition),
            severity="critical" if v.smoothed > 2 * v.ucl else "error", host=self.host,
            target={"pid": st.target.pid, "name": st.target.name}, device=it.device,
            stage=ITERATION, phase=it.phase, observed_ms=round(v.observed_ms, 4),
            predicted_ms=round(v.predicted_ms, 4), error=round(v.smoothed, 4),
            ucl=round(v.ucl, 4), window=10, started_at_ns=started, detected_at_ns=now,
            iteration_end_ns=it.end_ns, suspects=suspects, summary=summary)
        if v.transition == "resolved":
            st.firing_since.pop(key, None)
        self.alerts.append(alert)
        for sink in self.sinks:
            sink.emit(alert)

