"""One place that puts a live session together, and one headless runner.

``prism watch``, ``prism eval`` (the simulator and a live target) and ``prism demo`` all
run the same thing: a :class:`~prism_tui.engine.monitor.Monitor` whose subscribers are
given when it is built, inside a :class:`~prism_tui.live.LiveSession` with its alert
path and history. :class:`SessionSpec` says what is watched and which settings'
sections apply; :func:`build_session` builds it; :func:`run_headless` runs it without
the dashboard until a signal, a duration, an event or the targets' end.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from alerting.config import BrokerConfig
from prism_tui.dashboard_view import DashboardView
from prism_tui.engine.core import AlertSink, DetectionConfig, Observation, SloSpec
from prism_tui.engine.monitor import Monitor, MonitorConfig, ProbingConfig, Subscribers
from prism_tui.engine.recording import SpanRecorder
from prism_tui.errors import UsageError
from prism_tui.live import LiveSession
from prism_tui.settings import EngineSettings, HistorySettings, ProbeSettings
from probes.catalog import Profile, available_profiles, load_profile
from probes.governor import HitCosts
from probes.placement import place_profile
from probes.target import Target


@dataclass(frozen=True)
class SessionSpec:
    """What one live session watches, and the settings' sections it applies.

    ``engine``: the ``[engine]`` section; its detector keys always apply, its loop keys
    (``escalation_s``, ``snapshot_hz``) only when ``monitor`` is None. ``probe``: the
    ``[probe]`` section (None: the default rings and backend and no overhead governor,
    as the simulator runs have). ``history``: where and how long to keep it (None: none).
    ``broker``: where alerts go (None: no MQTT); ``outbox_path`` its durable outbox.
    ``settle_s``: seconds of each target's first iterations the detector skips.
    """

    targets: Sequence[Target]
    profile: Profile
    extra_profiles: Sequence[Profile] = ()
    engine: EngineSettings = field(default_factory=EngineSettings)
    probe: ProbeSettings | None = None
    monitor: MonitorConfig | None = None
    history: HistorySettings | None = None
    broker: BrokerConfig | None = None
    outbox_path: str | None = None
    match: str | None = None
    costs: HitCosts | None = None
    settle_s: float = 0.0


SETTLE_S = 3.0
"""Seconds of each rank's first decode iterations the detectors do not train on when the
command starts the server itself (``prism demo``, ``prism eval --scenario``). A server
started with the monitor runs its first steps beside everything else starting: in the
tmux demo the ranks' start and the dashboard's first paint slowed iterations 25-35 % for
a few tenths of a second within the first 2 s (both vCPUs busy), and a warm-up limit
calibrated on that (0.37-0.49) hid a device slowdown to 60 % speed; in ``prism eval
--scenario smoke`` the first ten steps ran 30-50 % above the rest and held the limit at
its cap. ``prism watch`` and ``prism eval --pid`` attach to a running server and train
from its first iteration."""


def detection_config(engine: EngineSettings, settle_s: float = 0.0) -> DetectionConfig:
    """The engine's detection from the ``[engine]`` settings; a bad SLO is a ValueError."""
    return DetectionConfig(rule=engine.detector_rule, warmup=engine.warmup_iterations,
                           warmup_s=engine.warmup_s, holds=engine.episode_holds(),
                           slos=tuple(SloSpec.parse(rule) for rule in engine.slo),
                           settle_s=settle_s)


def probing_config(probe: ProbeSettings | None, costs: HitCosts | None) -> ProbingConfig:
    """The monitor's probing from the ``[probe]`` settings (None: the defaults, ungoverned)."""
    if probe is None:
        defaults = ProbeSettings()
        return ProbingConfig(costs=costs, backend=defaults.backend,
                             wake_gap_s=defaults.wake_gap_ms / 1000)
    return ProbingConfig(mode=probe.mode, ring_pages=probe.ring_pages,
                         drain_interval_s=probe.drain_interval_s,
                         wake_gap_s=probe.wake_gap_ms / 1000,
                         overhead_budget=probe.overhead_budget,
                         governor_action=probe.governor_action, costs=costs,
                         backend=probe.backend)


def monitor_config(engine: EngineSettings, *, keep_spans: bool = True) -> MonitorConfig:
    """The monitor's loop from the ``[engine]`` settings; ``keep_spans``: for a trace
    export (a dashboard's)."""
    return MonitorConfig(escalation_s=engine.escalation_s,
                         snapshot_interval_s=1 / engine.snapshot_hz, keep_spans=keep_spans)


def build_session(spec: SessionSpec, *, alert_sinks: Sequence[AlertSink] = (),
                  observer: Callable[[Observation], None] | None = None,
                  recorder: SpanRecorder | None = None,
                  freeze_gc: bool = True) -> LiveSession:
    """Attach to ``spec.targets`` and wrap the monitor in a live session.

    ``alert_sinks`` take every alert (after DeepDive, before MQTT and history),
    ``observer`` every judged iteration, ``recorder`` every span and run-queue reading.
    Raises ValueError for a setting the engine refuses, a ProbeError subclass when a
    probe cannot be opened.
    """
    def monitor(subscribers: Subscribers) -> Monitor:
        return Monitor(
            spec.targets, spec.profile, extra_profiles=spec.extra_profiles,
            match=spec.match, detection=detection_config(spec.engine, spec.settle_s),
            probing=probing_config(spec.probe, spec.costs),
            config=spec.monitor or monitor_config(spec.engine),
            subscribers=replace(subscribers,
                                spans=recorder.add if recorder else None,
                                run_queue=recorder.add_run_queue if recorder else None))

    history = spec.history or HistorySettings()
    return LiveSession(monitor, broker=spec.broker, outbox_path=spec.outbox_path,
                       history_db=None if spec.history is None else str(history.path),
                       retention_days=history.retention_days,
                       max_iterations=history.max_iterations, alert_sinks=alert_sinks,
                       observer=observer, freeze_gc=freeze_gc)


def run_headless(session: LiveSession, on_view: Callable[[DashboardView], None] | None = None,
                 duration_s: float | None = None, *, until: threading.Event | None = None,
                 signals: bool = True) -> None:
    """Run ``session`` on a new loop without the dashboard until ``duration_s``, the
    targets' end, ``until`` (set from any thread) or, with ``signals``, SIGINT/SIGTERM."""

    stop = asyncio.Event()
    loop = asyncio.new_event_loop()
    if signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

    async def main() -> None:
        watcher = None
        if until is not None:
            async def watch() -> None:
                while not until.is_set():
                    await asyncio.sleep(0.1)
                stop.set()

            watcher = asyncio.create_task(watch())
        try:
            await session.run(on_view, stop, duration_s)
        finally:
            if watcher is not None:
                watcher.cancel()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def pick_profile(target: Target, name: str | None) -> Profile:
    """The profile named, else the first whose iteration anchor resolves in ``target``."""
    if name is not None:
        return load_profile(name)
    # only a profile that names its anchor is picked unasked: one without (cpython,
    # blas) would have the monitor cut "iterations" at whatever recurs (GIL waits...)
    for candidate in sorted(available_profiles()):
        profile = load_profile(candidate)
        if not profile.anchors:
            continue
        placement = place_profile(target, profile, "sentinel")
        if any(s.probe in profile.anchors for s in placement.sites):
            return profile
    raise UsageError(f"no profile's iteration anchor resolves in pid {target.pid}; "
                     "name one with --profile (prism symbols --pid PID lists them; a "
                     "profile without an anchor has one chosen from its spans)")


def companion_profiles(target: Target, main: Profile) -> list[Profile]:
    """Other profiles with a sentinel probe that resolves here (nccl beside cuda...)."""
    out = []
    for name in sorted(available_profiles()):
        if name == main.name:
            continue
        profile = load_profile(name)
        if place_profile(target, profile, "sentinel").sites:
            out.append(profile)
    return out


def span_recorder(path: str | None) -> SpanRecorder | None:
    """A streaming span recorder for ``--record`` (None without it); bad paths are usage errors."""
    if path is None:
        return None
    try:
        return SpanRecorder(path)
    except OSError as exc:
        raise UsageError(f"cannot record to {path}: {exc.strerror or exc}") from None
