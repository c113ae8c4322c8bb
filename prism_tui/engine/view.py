"""What the dashboard sees: an immutable :class:`EngineView` (docs/architecture.md §Rules 2).

The engine builds a view a few times per second from its own state and hands it to
whoever listens (the Textual app posts it as a message that replaces older queued ones).
Everything in a view is frozen or a read-only mapping, so the UI can keep a reference
without copying and never sees a half-updated structure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from prism_tui.engine.sketches import SeriesKey, SeriesTotal, Snapshot

WINDOWS_S = (10.0, 60.0, 300.0)
"""The spans the dashboard can show (``w`` cycles through them)."""


@dataclass(frozen=True)
class Candidate:
    """A process the user may attach to (the dashboard's picker): an inference-like
    command line, and whether it is watched."""

    pid: int
    name: str
    cmdline: str
    watched: bool


@dataclass(frozen=True)
class ProbeStatus:
    """One probe of one target: attached, or why not."""

    probe: str
    stage: str
    status: str
    """``attached`` | ``missing`` | ``no-library`` | ``detached`` | ``duty-cycled`` (the
    last two by the overhead governor; ``reason`` says why)."""
    library: str = ""
    reason: str = ""
    hits_per_s: float = 0.0
    hits: int = 0
    """Kernel hits since the probe was attached (cumulative: a Prometheus counter)."""


@dataclass(frozen=True)
class GovernorAction:
    """One decision of the overhead governor about one probe of one target."""

    probe: str
    status: str
    """``detached`` | ``duty-cycled`` | ``restored``."""
    overhead_pct: float
    """Estimated share of the target's time the probe costs while attached (%)."""
    hits_per_s: float
    """Calls per second of the probed function, measured or estimated."""
    cost_us: float
    """Estimated cost of one call, wake-ups included (µs)."""
    reason: str
    wall_time: float
    """Epoch seconds of the decision."""


@dataclass(frozen=True)
class GovernorStatus:
    """The overhead governor of one target: its budget, estimate and recent decisions."""

    budget_pct: float
    action: str
    """``detach`` | ``duty-cycle`` (``probe.governor_action``)."""
    decisions: tuple[GovernorAction, ...] = ()
    """Recent decisions, oldest first."""


@dataclass(frozen=True)
class TargetStatus:
    """A watched process and the health of its probes."""

    pid: int
    name: str
    profile: str
    device: str
    state: str
    """``attached`` | ``gone`` (exited; re-attached when a matching process appears)."""
    probes: tuple[ProbeStatus, ...] = ()
    hits_per_s: float = 0.0
    lost: int = 0
    overhead_pct: float | None = None
    """Estimated CPU share the probes cost the target (hits/s × cost per hit, the
    reader's wake-ups included)."""
    iterations: tuple[tuple[str, int], ...] = ()
    """Iterations completed since the watch began, per phase (sorted by phase)."""
    costs_measured: bool = True
    """False when the hit costs are defaults (calibration failed: ``costs_note`` says why)."""
    costs_note: str = ""
    governor: GovernorStatus | None = None
    """None when no overhead budget is enforced on this target."""
    backend: str = ""
    """The probe backend its sentinel probes run on (``bpf`` or ``perf``; empty before
    the first view): ``auto`` falls back to perf where eBPF is not usable, and the two
    cost the target and the monitor differently."""

    @property
    def attached(self) -> int:
        """Probes attached."""
        return sum(1 for p in self.probes if p.status == "attached")


@dataclass(frozen=True)
class IterationBar:
    """One recent iteration: its latency and the share of each stage (sums to ≤ 1)."""

    pid: int
    device: str
    phase: str
    end_ns: int
    latency_ms: float
    shares: tuple[tuple[str, float], ...]
    batch: float = 0.0


@dataclass(frozen=True)
class DetectorPoint:
    """The detector's verdict on one iteration: what the chart plots."""

    pid: int
    device: str
    phase: str
    end_ns: int
    observed_ms: float
    predicted_ms: float
    smoothed: float
    ucl: float
    firing: bool


@dataclass(frozen=True)
class DetectorState:
    """Where a detector is: warming up (``progress`` of ``warmup``), fitting, or live."""

    pid: int
    device: str
    phase: str
    state: str
    """``warming`` | ``fitting`` | ``live``."""
    progress: int = 0
    warmup: int = 0
    firing: bool = False


@dataclass(frozen=True)
class TelemetryValue:
    """One device or host metric; ``value`` None means unavailable, and ``reason`` says why."""

    device: str
    metric: str
    value: float | None
    unit: str
    reason: str | None = None


@dataclass(frozen=True)
class SloStatus:
    """One configured latency objective and whether it holds now."""

    name: str
    stage: str
    quantile: float
    limit_ms: float
    window_s: float
    value_ms: float | None
    breached: bool


@dataclass(frozen=True)
class AlertRecord:
    """An alert state change as the dashboard lists it (wire fields plus delivery)."""

    id: str
    fingerprint: str
    status: str
    severity: str
    source: str
    pid: int
    device: str
    stage: str
    phase: str
    observed_ms: float
    predicted_ms: float | None
    error: float
    ucl: float
    detected_at_ns: int
    wall_time: float
    """Epoch seconds when detected (for the feed's clock column)."""
    summary: str
    suspects: tuple[Mapping[str, Any], ...] = ()
    delivery: str = "local"
    """``local`` (no broker) | ``queued`` | ``sent`` (acknowledged): ``local`` from the
    engine, the alert path's state in the dashboard's view (``LiveSession.compose``)."""


@dataclass(frozen=True)
class AlertCount:
    """How many alert state changes of one kind the engine emitted since it started."""

    pid: int
    status: str
    severity: str
    source: str
    count: int


@dataclass(frozen=True)
class GovernorCount:
    """How many overhead-governor decisions of one action were made on one target."""

    pid: int
    action: str
    """``detach`` | ``duty-cycle`` | ``reattach``..., as the governor names it."""
    count: int


@dataclass(frozen=True)
class EngineView:
    """The engine's facts at one moment, as it publishes them. Immutable. The alert
    path, the history file and the other parts' notices are added by the live session
    (:class:`~prism_tui.dashboard_view.DashboardView`)."""

    now_ns: int
    host: str
    targets: tuple[TargetStatus, ...]
    snapshots: Mapping[float, Snapshot]
    """One sketch snapshot per span of :data:`WINDOWS_S` (10 s, 1 min, 5 min)."""
    iterations: tuple[IterationBar, ...] = ()
    """Recent iterations, oldest first, all devices."""
    detector: tuple[DetectorPoint, ...] = ()
    """Recent detector verdicts, oldest first."""
    detectors: tuple[DetectorState, ...] = ()
    alerts: tuple[AlertRecord, ...] = ()
    """Recent alert state changes, oldest first."""
    telemetry: tuple[TelemetryValue, ...] = ()
    slos: tuple[SloStatus, ...] = ()
    notices: tuple[str, ...] = ()
    """The engine's own status-bar lines (a workload new to the baseline, a refit); the
    dashboard's view (``prism_tui/dashboard_view.py``) carries every part's."""
    series_totals: Mapping[SeriesKey, SeriesTotal] = field(
        default_factory=lambda: MappingProxyType({}))
    """Cumulative count and sum of every series over its closed windows since start."""
    alert_counts: tuple[AlertCount, ...] = ()
    """Alert state changes since start, by target, status, severity and source."""
    governor_counts: tuple[GovernorCount, ...] = ()
    """Overhead-governor decisions since start (see :meth:`Engine.count_governor_decision`)."""

    def snapshot(self, span_s: float) -> Snapshot | None:
        """The snapshot for ``span_s`` (None when the engine did not build that span)."""
        return self.snapshots.get(span_s)


def frozen_snapshots(snaps: Mapping[float, Snapshot]) -> Mapping[float, Snapshot]:
    """A read-only mapping for :attr:`EngineView.snapshots`."""
    return MappingProxyType(dict(snaps))
