"""The monitor's small configuration objects and its subscribers.

The session builder (``prism_tui/session.py``) makes them from the settings' sections:
:class:`ProbingConfig` from ``[probe]``, :class:`MonitorConfig` from ``[engine]``'s loop
keys (the detection keys make a :class:`~prism_tui.engine.core.DetectionConfig`);
:class:`Subscribers` are who hears from the monitor, given once when it is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prism_tui.engine.core import AlertSink, Observation
from prism_tui.engine.iterations import RunQueueSample, SpanLike
from prism_tui.engine.sketches import Snapshot
from prism_tui.engine.view import EngineView
from probes.governor import HitCosts


@dataclass(frozen=True)
class ProbingConfig:
    """How the sentinel probes are opened and governed (the ``[probe]`` settings).

    ``mode``: per-thread or per-CPU perf events (``auto`` chooses). ``ring_pages``,
    ``drain_interval_s``: each ring's size and how often an unhurried ring is read.
    ``wake_gap_s``: the bpf backend's least time between the anchor's wake-ups (0: each
    wakes the reader; the settings' default is ``probe.wake_gap_ms``).
    ``overhead_budget``: the governor's share of the target's CPU (None: not governed),
    ``governor_action`` what it does over budget. ``costs``: measured hit costs.
    ``backend``: ``perf``, ``bpf`` or ``auto`` (:func:`probes.backend.open_session`);
    ``auto`` falling back to perf says why once, in a notice.
    """

    mode: str = "auto"
    ring_pages: int = 64
    drain_interval_s: float = 0.02
    wake_gap_s: float = 0.0
    overhead_budget: float | None = None
    governor_action: str = "detach"
    costs: HitCosts | None = None
    backend: str = "perf"


@dataclass(frozen=True)
class MonitorConfig:
    """How the monitor's loop runs around the engine.

    ``escalation_s``: how long DeepDive probes stay after an alert fires (0: never).
    ``snapshot_interval_s``: seconds between views. ``telemetry``: sample host, /proc and
    NVML once a second. ``anchor_discovery_s``: see :class:`Monitor`.
    ``anchor_silence_s``: a named anchor that has not fired this long while the other
    probes did is given up for one chosen from the spans (see :class:`Monitor`).
    ``run_queue_stage``: read the anchor thread's run-queue wait as a stage.
    ``keep_spans``: keep the last spans for the dashboard's trace export (headless
    sessions, which cannot export one, keep none: no memory or CPU for them).
    """

    escalation_s: float = 30.0
    snapshot_interval_s: float = 0.5
    telemetry: bool = True
    anchor_discovery_s: float = 5.0
    anchor_silence_s: float = 10.0
    run_queue_stage: bool = True
    keep_spans: bool = True


@dataclass(frozen=True)
class Subscribers:
    """Who hears from the monitor, each given once at construction: alert sinks, every
    judged iteration, every batch of spans and run-queue reading (a recorder), every
    view and snapshot, every status-bar notice: the engine's (also kept in its view) and
    the monitor's parts' (attach, rescan, anchor, governor, DeepDive: told only here)."""

    alerts: Sequence[AlertSink] = ()
    observation: Callable[[Observation], None] | None = None
    spans: Callable[[Sequence[SpanLike]], None] | None = None
    run_queue: Callable[[int, RunQueueSample], None] | None = None
    view: Callable[[EngineView], None] | None = None
    snapshot: Callable[[Snapshot], None] | None = None
    notice: Callable[[str], None] | None = None
