"""``prism eval --pid/--match ... --faults FILE``: a live target scored against injected faults.

The monitor watches a real process (the same profile choice as ``prism watch``) while a
timeline of host faults (``[[fault]]`` tables: ``type``, ``start_s``, ``duration_s``,
``intensity``) is injected into it from outside with the injectors of ``prism inject``.
The timeline's 0 s is when the detector first judges an iteration (its baseline is
fitted): a fault during the warm-up would be learnt as normal. An iteration is abnormal
when it overlaps a fault window. Scoring goes through the
simulator eval's code (:mod:`prism_tui.engine.evaluate`): per-iteration precision,
recall, F1 and FPR, alert episodes against fault episodes, detection delay and the
root-cause suspect per fault kind, and the alert latency at a real MQTT subscriber.
Nothing is left behind if it is killed: the guard of ``prism inject`` continues a paused
target and removes a throttle's cgroup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prism_sim.faults import HOST_FAULTS, EffectMeter, FaultContext, make_injector
from prism_sim.guard import release
from prism_sim.labels import fault_bit
from prism_sim.scenario import FaultSpec
from prism_tui.inject import (
    InjectUsageError,
    check_kind,
    check_signal,
    start_guard,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

SETTLE_S = 5.0
"""Seconds the run goes on after the last fault ends (the episode's close hold)."""

BASELINE_WAIT_S = 300.0
"""The longest the timeline waits for the detector's baseline before giving up."""


@dataclass(frozen=True)
class FaultWindow:
    """One injected fault as it happened (CLOCK_MONOTONIC), with its measured effect."""

    type: str
    intensity: float
    start_ns: int
    end_ns: int
    effect: dict[str, Any] | None
    rank: int | None = None


def load_fault_timeline(path: str) -> list[FaultSpec]:
    """The ``[[fault]]`` tables of a TOML file (the scenario format's), by start time.

    Raises:
        InjectUsageError: unreadable file, bad TOML, or a fault that cannot be injected
            from outside (one line naming the file and the fault).
    """
    try:
        doc = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise InjectUsageError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InjectUsageError(f"{path}: {exc}") from None
    unknown = set(doc) - {"fault", "scenario", "topology", "phase"}
    if unknown:
        raise InjectUsageError(f"{path}: unknown key {sorted(unknown)[0]!r} (a fault "
                               "timeline has [[fault]] tables)")
    raw = doc.get("fault", [])
    if not isinstance(raw, list) or not raw:
        raise InjectUsageError(f"{path}: no [[fault]] table")
    specs: list[FaultSpec] = []
    for i, t in enumerate(raw):
        where = f"{path}: fault[{i}]"
        if not isinstance(t, dict):
            raise InjectUsageError(f"{where}: must be a table")
        extra = set(t) - {"type", "start_s", "duration_s", "intensity", "rank"}
        if extra:
            raise InjectUsageError(f"{where}: unknown key {sorted(extra)[0]!r}")
        kind = t.get("type")
        if not isinstance(kind, str):
            raise InjectUsageError(f"{where}.type: missing (one of {', '.join(HOST_FAULTS)})")
        start, duration = t.get("start_s"), t.get("duration_s")
        for key, value in (("start_s", start), ("duration_s", duration)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0 \
                    or (key == "duration_s" and value == 0):
                raise InjectUsageError(f"{where}.{key}: a number of seconds "
                                       f"({'> 0' if key == 'duration_s' else '>= 0'}), "
                                       f"not {value!r}")
        intensity = t.get("intensity")
        if intensity is not None and (isinstance(intensity, bool)
                                      or not isinstance(intensity, (int, float))):
            raise InjectUsageError(f"{where}.intensity: a number, not {intensity!r}")
        try:
            value = check_kind(kind, None if intensity is None else float(intensity),
                               float(duration))  # type: ignore[arg-type]
        except InjectUsageError as exc:
            raise InjectUsageError(f"{where}: {exc}") from None
        specs.append(FaultSpec(kind, float(start), float(duration), None,  # type: ignore[arg-type]
                               value))
    specs.sort(key=lambda s: s.start_s)
    for a, b in itertools.pairwise(specs):
        if b.start_s < a.start_s + a.duration_s:
            raise InjectUsageError(f"{path}: faults overlap ({a.type} at {a.start_s:g} s "
                                   f"and {b.type} at {b.start_s:g} s)")
    return specs


class FaultSchedule:
    """Injects the timeline's faults on a thread once the baseline is ready; records each
    window. ``done`` is set :data:`SETTLE_S` after the last fault (or on an error)."""

    def __init__(self, specs: Sequence[FaultSpec], pids: list[int], session: str) -> None:
        self.specs = list(specs)
        self.pids = pids
        self.session = session
        self.windows: list[FaultWindow] = []
        self.error: str | None = None
        self.origin_ns: int | None = None
        """CLOCK_MONOTONIC of the timeline's 0 s (None until the baseline was ready)."""
        self.ready = threading.Event()
        """Set by the caller at the first judged iteration."""
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prism-faults", daemon=True)

    def start(self) -> None:
        """Start the thread; it waits for :attr:`ready`."""
        self._thread.start()

    def stop(self) -> None:
        """Switch off a fault that is on and end the timeline (idempotent)."""
        self._stop.set()
        self.ready.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def _run(self) -> None:
        try:
            self._inject_all()
        finally:
            self.done.set()

    def _inject_all(self) -> None:
        if not self.ready.wait(BASELINE_WAIT_S) or self._stop.is_set():
            if not self._stop.is_set():
                self.error = (f"the detector's baseline was not ready within "
                              f"{BASELINE_WAIT_S:g} s (no decode iteration judged)")
            return
        origin = time.monotonic()
        self.origin_ns = time.monotonic_ns()
        context = FaultContext(None, dict(enumerate(self.pids)), self.session)
        for spec in self.specs:
            if self._stop.wait(max(0.0, origin + spec.start_s - time.monotonic())):
                return
            meter = EffectMeter(self.pids)
            injector = make_injector(spec, context)
            token = meter.fault_on()
            start_ns = time.monotonic_ns()
            try:
                injector.start()
                self._stop.wait(spec.duration_s)
            except Exception as exc:  # a target gone, a child that did not start
                self.error = f"{spec.type} at {spec.start_s:g} s: {exc}"
                return
            finally:
                injector.stop()
                end_ns = time.monotonic_ns()
                with contextlib.suppress(Exception):
                    effect = meter.fault_off(token, injector.effect())
                    self.windows.append(FaultWindow(spec.type, spec.intensity, start_ns,
                                                    end_ns, effect))
        self._stop.wait(SETTLE_S)


def write_fault_windows(path: str, windows: Sequence[FaultWindow],
                       rank_of: dict[int, int]) -> None:
    """The injected fault windows (CLOCK_MONOTONIC ns) as JSON, for an offline replay of
    a ``--record`` recording (``bench/detector_sim.py --faults``)."""
    import json

    doc = {"ranks": {str(pid): rank for pid, rank in rank_of.items()},
           "faults": [{"type": w.type, "intensity": w.intensity, "start_ns": w.start_ns,
                       "end_ns": w.end_ns, "effect": w.effect} for w in windows]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def score_rows(judged: dict[int, list[tuple[int, int, bool]]], rank_of: dict[int, int],
               windows: Sequence[FaultWindow]) -> list[Any]:
    """Each judged iteration scored as abnormal when it overlaps a fault window."""
    from prism_tui.engine.evaluate import Scored

    spans = sorted((w.start_ns, w.end_ns) for w in windows)
    rows = []
    for pid, items in judged.items():
        for start, end, firing in items:
            fault = any(s < end and start < e for s, e in spans)
            rows.append(Scored(rank_of[pid], end, firing, fault))
    return sorted(rows, key=lambda r: (r.rank, r.end_ns))


def cmd_eval_target(args: Any) -> int:
    """``prism eval --pid/--match ... --faults FILE``; prints the scores (one JSON with --json)."""
    import json

    from alerting.broker import EmbeddedBroker
    from alerting.config import BrokerConfig
    from prism_tui.engine.evaluate import (
        alert_episodes,
        detection_delay_s,
        detection_lag,
        score,
        score_episodes,
        window_recall,
    )
    from prism_tui.engine.monitor import MonitorConfig, Observation
    from prism_tui.errors import UsageError
    from prism_tui.evaluation import percentiles, run_and_receive
    from prism_tui.session import (
        SessionSpec,
        build_session,
        companion_profiles,
        pick_profile,
        span_recorder,
    )
    from prism_tui.settings import load_settings
    from probes.perf import check_permission
    from probes.target import resolve_target

    if args.faults is None:
        raise UsageError("a live target needs --faults FILE (a timeline of [[fault]] tables)")
    if args.overhead:
        raise UsageError("--overhead goes with --scenario, not a live target")
    specs = load_fault_timeline(args.faults)
    settings = load_settings(None, overrides={
        "engine.detector_rule": args.rule, "engine.warmup_iterations": args.warmup,
        "engine.warmup_s": args.warmup_s})
    check_permission()
    targets = resolve_target(args.pid, args.match, allow_many=True)
    pids = [t.pid for t in targets]
    check_signal(pids)
    last_end = max(s.start_s + s.duration_s for s in specs)
    if args.duration is not None and args.duration < last_end:
        raise UsageError(f"--duration {args.duration:g} s ends before the last fault "
                         f"({last_end:g} s)")
    profile = pick_profile(targets[0], args.profile)
    rank_of = {pid: i for i, pid in enumerate(pids)}
    judged: dict[int, list[tuple[int, int, bool]]] = {}

    session_name = f"prism-eval-{os.getpid()}"
    schedule = FaultSchedule(specs, pids, session_name)

    def on_observation(obs: Observation) -> None:
        if obs.verdict is not None:
            it = obs.iteration
            judged.setdefault(it.pid, []).append((it.start_ns, it.end_ns, obs.verdict.firing))
            schedule.ready.set()  # the timeline starts with the baseline

    engine = dataclasses.replace(settings.engine, slo=())  # scored on the detector alone
    recorder = span_recorder(args.record)
    with tempfile.TemporaryDirectory(prefix="prism-eval-") as tmp, \
            contextlib.ExitStack() as stack:
        if recorder is not None:
            stack.callback(recorder.discard)  # a run that fails leaves no temp file
        broker_url = args.broker
        if broker_url is None:
            broker_url = stack.enter_context(EmbeddedBroker().start()).url
        spec = SessionSpec(targets, profile, companion_profiles(targets[0], profile),
                           engine=engine, monitor=MonitorConfig(keep_spans=False),
                           broker=BrokerConfig(url=broker_url),
                           outbox_path=os.path.join(tmp, "outbox.sqlite"))
        live = build_session(spec, observer=on_observation, recorder=recorder)
        monitor = live.monitor
        stack.callback(live.close)
        guard = start_guard(session_name, pids)
        stack.callback(release, guard)
        stack.callback(schedule.stop)
        started_ns = time.monotonic_ns()
        schedule.start()
        received = run_and_receive(live, args.duration, args.realtime or 0,
                                   until=schedule.done)
        schedule.stop()
        duration = (time.monotonic_ns() - started_ns) / 1e9
        alerts = list(monitor.alerts)
        if recorder is not None:
            n = recorder.close(monitor.recorded_processes())
            print(f"prism eval: {n} spans saved to {recorder.path}", file=sys.stderr)
    if args.labels:
        write_fault_windows(args.labels, schedule.windows, rank_of)
    if schedule.error is not None and not schedule.windows:
        raise UsageError(f"no fault could be injected: {schedule.error}")
    origin_ns = schedule.origin_ns or started_ns
    rows = score_rows(judged, rank_of, schedule.windows)
    result = score(rows)
    episodes = score_episodes(rows, alert_episodes(alerts, rank_of), [
        FaultWindow(w.type, w.intensity, w.start_ns, w.end_ns, w.effect, None)
        for w in schedule.windows])
    latencies = sorted((received[a.id] - a.iteration_end_ns) / 1e6 for a in alerts
                       if a.id in received)
    faults = []
    for w in schedule.windows:
        faults.append({"type": w.type, "intensity": w.intensity,
                       "start_s": round((w.start_ns - origin_ns) / 1e9, 3),
                       "duration_s": round((w.end_ns - w.start_ns) / 1e9, 3),
                       "bit": fault_bit(w.effect) if w.effect else None, "effect": w.effect,
                       **window_recall(rows, w.start_ns, w.end_ns)})
    doc = {
        "targets": [{"pid": t.pid, "name": t.name} for t in targets],
        "profile": profile.name, "faults_file": args.faults,
        "duration_s": round(duration, 3),
        "baseline_ready_s": round((origin_ns - started_ns) / 1e9, 3),
        "rule": engine.detector_rule, "warmup": engine.warmup_iterations,
        "warmup_s": engine.warmup_s, **result,
        "detection_lag_iterations": detection_lag(rows),
        "detection_delay_s": detection_delay_s(rows), "episodes": episodes,
        "alerts": len(alerts),
        "alerts_firing": sum(a.status == "firing" for a in alerts),
        "alerts_received": len(received),
        "alert_latency_ms": percentiles(latencies),
        "faults": faults,
        "faults_not_biting": sum(1 for f in faults if f["bit"] is False),
        "fault_error": schedule.error,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"{', '.join(f'{t.name} ({t.pid})' for t in targets)}: "
              f"{result['iterations']} judged iterations, {result['abnormal']} abnormal; "
              f"precision {result['precision']}, recall {result['recall']}, F1 "
              f"{result['f1']}, FPR {result['fpr']}; {episodes['episodes_detected']} of "
              f"{episodes['fault_episodes']} fault episodes paged, "
              f"{episodes['false_episodes']} false")
    return 0
