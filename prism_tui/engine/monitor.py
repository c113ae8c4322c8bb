"""The monitor, the engine's I/O side: live uprobe sessions feeding the pure
:class:`~prism_tui.engine.core.Engine` (which reads no clock, file or socket itself).

The monitor is the loop that composes its parts, each a module: attachment
(:mod:`~prism_tui.engine.attachment`: a target's probes opened), ``--match`` rescans
(:mod:`~prism_tui.engine.rescan`), anchor discovery
(:mod:`~prism_tui.engine.anchor_discovery`), the overhead governor
(:mod:`~prism_tui.engine.governing`), DeepDive's escalation
(:mod:`~prism_tui.engine.escalation`) and telemetry polling
(:mod:`~prism_tui.engine.telemetry_poll`). One asyncio loop moves data only: per target a
uprobe session (its anchor probe urgent, so an iteration's end reaches the loop within a
millisecond) whose spans go to the engine. Views and snapshots are built a few times per
second. Its subscribers (:class:`Subscribers`: alert sinks,
observers, views, notices) are given once, at construction; sinks are a protocol, so the
alert path plugs in without the engine importing it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from prism_tui.engine.anchor_discovery import AnchorDiscovery, AnchorSilence
from prism_tui.engine.anchors import AnchorChoice
from prism_tui.engine.attachment import (
    Attached,
    detector_probes,
    open_sentinels,
    probe_statuses,
)
from prism_tui.engine.config import MonitorConfig, ProbingConfig, Subscribers
from prism_tui.engine.core import (
    AlertEvent,
    AlertSink,
    DetectionConfig,
    Engine,
    Observation,
    SloSpec,
    ViewRetention,
    shutdown_fit_executor,
    workload_of,
)
from prism_tui.engine.devices import NvmlDevices
from prism_tui.engine.escalation import DeepDive
from prism_tui.engine.governing import GOVERN_S, Governing
from prism_tui.engine.iterations import RunQueueSample
from prism_tui.engine.recording import RecordedProcess
from prism_tui.engine.rescan import Opened, Rescanner
from prism_tui.engine.telemetry_poll import TELEMETRY_S, TelemetryPoller
from prism_tui.engine.trace_export import write_chrome_trace
from prism_tui.engine.view import Candidate, TelemetryValue
from probes.backend import ProbeSession
from probes.catalog import Profile
from probes.errors import ProbeError
from probes.governor import GovernorDecision
from probes.placement import Placement
from probes.target import Target, find_targets
from probes.telemetry import RunQueueReader
from probes.uprobes import Span

__all__ = ["AlertEvent", "AlertSink", "DetectionConfig", "Monitor", "MonitorConfig", "Observation",
           "ProbingConfig", "SloSpec", "Subscribers", "detector_probes", "workload_of"]

INFERENCE_PATTERN = (r"vllm|sglang|llama[-_.]?(server|cpp|cli)|text-generation|tgi|"
                     r"tritonserver|lmdeploy|trtllm|tensorrt|ollama|torchrun|prism_sim|"
                     r"python[\d.]* .*(serve|infer|generate)")
"""Command lines that look like inference servers (the process picker's list)."""

_T = TypeVar("_T")


def _unheard(line: str) -> None:
    """The notice subscriber of a monitor built without one: the line is dropped."""


class Monitor:
    """Watches targets with a profile; one owner of their sessions (``close()`` idempotent)."""

    def __init__(self, targets: Sequence[Target], profile: Profile, *,
                 extra_profiles: Sequence[Profile] = (),
                 detection: DetectionConfig | None = None,
                 probing: ProbingConfig | None = None, config: MonitorConfig | None = None,
                 subscribers: Subscribers | None = None, match: str | None = None,
                 device_of: Callable[[int], str] | None = None,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        """Attach the sentinel probes of ``profile`` (its iteration anchor and derived
        features) and of ``extra_profiles`` (``nccl`` beside ``cuda``, say) to every
        target; raises a ProbeError subclass when a probe cannot be opened.

        When ``profile`` names no anchor, :meth:`run` holds the spans (no iterations, no
        verdicts) until :func:`~prism_tui.engine.anchors.choose_anchor` accepts a probe
        of them, then feeds them to the engine cut at that anchor; after
        ``config.anchor_discovery_s`` without one it says so in a notice and keeps
        looking at the last ``anchor_discovery_s`` of spans. The choice is
        :attr:`anchor_choice`. A discovered anchor is not urgent: its spans reach the
        engine at the sessions' next drain (20 ms at most), not within a millisecond.
        A named anchor that has not fired ``config.anchor_silence_s`` after the loop
        started, while 100 spans of the other probes did, is given up the same way (one
        notice says so); the governor acts only once the anchor has fired, so it has
        detached nothing that could be the one to choose. A profile that names several
        anchors (alternatives for different versions of an engine) has its spans held the
        same way until one of them fires, and that one is the anchor; they are all urgent
        until then.

        With ``config.run_queue_stage``, the anchor thread's run-queue wait
        (``schedstat``) is read as each iteration arrives and becomes its ``runqueue``
        stage; the readings go to ``subscribers.run_queue`` as the spans go to
        ``subscribers.spans`` (a :class:`~prism_tui.engine.recording.SpanRecorder` takes
        both).

        ``detection`` goes to the :class:`~prism_tui.engine.core.Engine` (the detector and
        its alert episodes). With ``probing.overhead_budget`` (a fraction: 0.005 is
        0.5 %), each target's sentinel probes are governed once its anchor is known:
        every ``GOVERN_S`` an :class:`~probes.governor.OverheadGovernor` estimates their
        cost from the kernel's hit counts and ``probing.costs``
        (:data:`~probes.governor.DEFAULT_COSTS` when None) and detaches or duty-cycles
        (``governor_action``) the costliest probes but the anchor while over budget; its
        decisions go to :attr:`governor_decisions`, the view and the notices.
        ``ring_pages`` and ``drain_interval_s`` size and drain the sentinel sessions'
        rings (a DeepDive drains every ``escalation.DEEPDIVE_DRAIN_S`` at least);
        ``probing.backend`` opens every session (perf rings or the eBPF program).
        """
        self.probing = probing = probing or ProbingConfig()
        config = config or MonitorConfig()
        subscribers = subscribers or Subscribers()
        self.run_queue_stage = config.run_queue_stage
        self._run_queue = RunQueueReader()
        self.profile = profile
        self.extra_profiles = list(extra_profiles)
        anchors = profile.anchors
        self.anchor: str | None = anchors[0] if len(anchors) == 1 else None
        self.match = match
        self.telemetry = config.telemetry
        self.on_snapshot, self.on_view = subscribers.snapshot, subscribers.view
        self.snapshot_interval_s = config.snapshot_interval_s
        self._backend_noticed = False
        self.engine = Engine(detection, sinks=subscribers.alerts,
                             on_observation=subscribers.observation,
                             on_spans=subscribers.spans, on_run_queue=subscribers.run_queue,
                             escalate=lambda alert: self.deepdive.on_alert(alert),
                             on_notice=subscribers.notice, clock=clock,
                             keep=None if config.keep_spans else ViewRetention(spans=0))
        self._notice: Callable[[str], None] = subscribers.notice or _unheard
        """The monitor's own notices (attach, rescan, anchor, governor, DeepDive) go to
        the subscriber directly; the engine's view keeps only the engine's."""
        self.governing = Governing(probing, count=self.engine.count_governor_decision,
                                   notice=self._notice)
        """The overhead governor of every target (:mod:`~prism_tui.engine.governing`)."""
        self._discovery = None if self.anchor is not None else AnchorDiscovery(
            profile.name, config.anchor_discovery_s, notice=self._notice,
            candidates=anchors, candidates_s=config.anchor_silence_s)
        """The spans held until an anchor is chosen or one of the profile's alternative
        anchors fires (None: the profile names one)."""
        self._anchor_discovery_s = config.anchor_discovery_s
        self._silence = None if self.anchor is None else AnchorSilence(
            self.anchor, config.anchor_silence_s)
        """Watches a named anchor for never firing (None: discovery from the start)."""
        self._rescanner = None if match is None else Rescanner(
            match, open_target=self._open, adopt=self._adopt,
            in_background=self._in_background, notice=self._notice)
        """``--match``'s rescans (None without a pattern)."""
        self.placements: list[Placement] = []
        self.escalation_s = config.escalation_s
        self.deepdive = DeepDive(self.engine, [profile, *self.extra_profiles],
                                 escalation_s=config.escalation_s, mode=probing.mode,
                                 ring_pages=probing.ring_pages,
                                 drain_interval_s=probing.drain_interval_s,
                                 backend=probing.backend, in_background=self._in_background,
                                 notice=self._notice)
        """The escalation: deeper probes on a target while its alert fires."""
        self._attached: dict[int, Attached] = {}
        self._ever_attached: dict[int, RecordedProcess] = {}  # a recording's header
        self._new: asyncio.Queue[Attached] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._close_lock = threading.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self._nvml_devices: NvmlDevices | None = None
        """The default :attr:`device_of`: NVML's process list, else the environment."""
        self._nvml_noticed = False
        if device_of is None:
            device_of = self._nvml_devices = NvmlDevices()
        self._poller = TelemetryPoller(self._nvml_devices)
        self.device_of: Callable[[int], str] = device_of
        """pid → device label (``cuda:0``, ``cpu``...), called once per attach."""
        try:
            for target in targets:
                self._attach(target)
        except BaseException:
            self.close()
            raise

    @property
    def alerts(self) -> list[AlertEvent]:
        """Every alert state change so far."""
        return self.engine.alerts

    @property
    def anchor_choice(self) -> AnchorChoice | None:
        """The discovered anchor with its cycle and reason (None: named, or not yet)."""
        return None if self._discovery is None else self._discovery.choice

    @property
    def governor_decisions(self) -> list[tuple[int, GovernorDecision, float]]:
        """(pid, decision, epoch seconds) of every governor decision, in order."""
        return self.governing.decisions

    @property
    def overhead_budget(self) -> float | None:
        """The governor's share of each target's CPU (None: not governed)."""
        return self.governing.budget

    @property
    def governor_action(self) -> str:
        """What the governor does over budget (``detach`` or ``duty-cycle``)."""
        return self.governing.action

    # ------------------------------------------------------------------ attach / detach
    def _attach(self, target: Target) -> Attached:
        session, placements, device = self._open(target)
        try:
            return self._on_loop(self._register, target, session, placements, device)
        except BaseException:
            session.close()
            raise

    def _open(self, target: Target) -> Opened:
        """The blocking half of an attach (ELF lookups, perf events, the device label from
        NVML's process list): any thread."""
        return open_sentinels(target, [self.profile, *self.extra_profiles], self._anchors(),
                              self.probing, self.device_of, on_fallback=self._notice_backend)

    def _anchors(self) -> tuple[str, ...]:
        """The anchor a target is opened with (urgent, and it must resolve): the one
        known, the profile's alternatives while none has fired, else none."""
        if self.anchor is not None:
            return (self.anchor,)
        if self._discovery is not None and self._discovery.chosen is None:
            return self._discovery.candidates
        return ()

    def _notice_backend(self, why: str) -> None:
        """Say once that ``auto`` fell back to the perf backend, and why (any thread)."""
        if not self._backend_noticed:
            self._backend_noticed = True
            self._notice(why)

    def _register(self, target: Target, session: ProbeSession,
                  placements: list[Placement], device: str) -> Attached:
        """The state half of an attach: on the loop's thread once the loop runs."""
        if target.pid in self._attached:
            raise ValueError(f"pid {target.pid} is already watched")
        self._notice_nvml()
        self.placements.extend(placements)
        att = self._attached[target.pid] = Attached(target, session, placements, device,
                                                     frozenset(session.urgent))
        if self.anchor is not None:  # else once one is chosen (see _discovered)
            self._watch(att)
        if self._new is not None:
            self._new.put_nowait(att)
        return att

    def _watch(self, att: Attached) -> None:
        """Have the engine cut ``att``'s spans into iterations at :attr:`anchor`."""
        assert self.anchor is not None
        pid = att.target.pid
        sites = [s for p in att.placements for s in p.sites]
        self.engine.watch(pid, att.target.name, self.anchor,
                          {s.probe: s.stage for s in sites}, profile=self.profile.name,
                          device=att.device, derived=self.profile.derived,
                          phase_rule=self.profile.phase_rule,
                          probes=probe_statuses(att.placements, {}),
                          backend=att.session.backend)
        self._ever_attached[pid] = self._recorded_process(pid, att)
        self.governing.equip(att, self.anchor, self.profile)

    def _adopt(self, target: Target, opened: Opened) -> bool:
        """Watch a target a rescan opened (on the loop); False when the loop stopped or
        it was picked meanwhile (the caller closes its session)."""
        if self._loop is None or target.pid in self._attached:
            return False
        self._register(target, *opened)
        return True

    def _notice_nvml(self) -> None:
        """Say once why device labels come from process environments, not NVML."""
        nvml = self._nvml_devices
        if nvml is None or self._nvml_noticed or nvml.unavailable_reason is None:
            return
        self._nvml_noticed = True
        self._notice("device labels from process environments: NVML unavailable "
                           f"({nvml.unavailable_reason})")

    def _on_loop(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` on the loop's thread (the dashboard calls from a worker thread).

        The engine and the sessions are owned by the loop; a call from another thread is
        handed over and waited for. Before ``run`` or on the loop itself it runs directly.
        """
        loop = self._loop
        if loop is None or not loop.is_running():
            return fn(*args)
        try:
            if asyncio.get_running_loop() is loop:
                return fn(*args)
        except RuntimeError:
            pass  # not on any loop's thread
        done: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def call() -> None:
            try:
                done.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller's thread
                done.set_exception(exc)

        loop.call_soon_threadsafe(call)
        return done.result(timeout=30)

    def attach(self, pid: int) -> str | None:
        """Attach to one more process; the error line, or None when it worked."""
        if pid in self._attached:
            return f"pid {pid} is already watched"
        try:
            self._attach(Target(pid))
        except (ProbeError, ValueError, OSError) as exc:
            return str(exc)
        self._notice(f"attached to pid {pid}")
        return None

    def detach(self, pid: int) -> None:
        """Detach every probe from ``pid`` and stop showing it."""
        self._on_loop(self._detach, pid)

    def _detach(self, pid: int) -> None:
        att = self._attached.pop(pid, None)
        if att is not None:
            att.session.close()
        self.deepdive.detach(pid)
        self.engine.forget(pid)
        self._run_queue.forget(pid)
        self._poller.forget(pid)

    def recorded_processes(self) -> list[RecordedProcess]:
        """The header of a span recording: every process attached during the run.

        Those that exited too: under ``prism eval`` the ranks exit at the scenario's
        end, before the recording is closed (the header came out empty, and the
        recording could not be replayed).
        """
        return list(self._ever_attached.values())

    def _recorded_process(self, pid: int, att: Attached) -> RecordedProcess:
        assert self.anchor is not None
        stage_of = {s.probe: s.stage for p in att.placements for s in p.sites}
        return RecordedProcess(pid, att.target.name, self.profile.name, self.anchor,
                               att.device, stage_of,
                               {d.name: d.expr for d in self.profile.derived},
                               self.profile.phase_rule)

    def candidates(self, pattern: str = INFERENCE_PATTERN) -> list[Candidate]:
        """Inference-like processes for the picker, the watched ones marked."""
        try:
            found = find_targets(pattern)
        except (ProbeError, OSError):
            found = []
        out = [Candidate(t.pid, t.name, " ".join(t.cmdline)[:200], t.pid in self._attached)
               for t in found]
        seen = {c.pid for c in out}
        out += [Candidate(pid, a.target.name, "", True) for pid, a in self._attached.items()
                if pid not in seen]
        return sorted(out, key=lambda c: (not c.watched, c.pid))

    def _judge_the_others(self, pid: int) -> None:
        """Feed the engine what the other targets' rings hold now (an alert is pending).

        The ranks of one model finish an iteration together; their wake-ups are
        callbacks of the same loop turn, or of the next. Reading their rings here puts
        their verdicts before the pending alert's work instead of after it.
        """
        for other, att in list(self._attached.items()):
            if other != pid:
                spans = att.session.read()
                if spans:
                    self.engine.add_spans(other, spans, self._run_queue_of(other, spans))

    def _run_queue_of(self, pid: int, spans: Sequence[Span]) -> RunQueueSample | None:
        """The run-queue wait so far of the thread that ended an iteration in ``spans``,
        read now; None when no anchor is among them or the kernel does not keep
        schedstat. One ``pread`` of a kept-open /proc file per batch (~1 µs), for the
        engine's ``runqueue`` stage."""
        if not self.run_queue_stage or self.anchor is None:
            return None
        tid = next((s.tid for s in reversed(spans) if s.probe == self.anchor), None)
        if tid is None:
            return None
        ns = self._run_queue.read(pid, tid)
        return None if ns is None else RunQueueSample(tid, ns, time.monotonic_ns())

    # ------------------------------------------------------------------ DeepDive
    @property
    def escalations(self) -> list[tuple[str, int, int]]:
        """(``attached``/``detached``/``failed``, pid, probes) of every DeepDive, in order."""
        return self.deepdive.log

    def export_trace(self, seconds: float, path: str) -> str:
        """Write the last ``seconds`` of spans as a Chrome/Perfetto trace; returns the path."""
        names, spans = self._on_loop(
            lambda: ({pid: a.target.name for pid, a in self._attached.items()},
                     self.engine.recent_spans(seconds)))
        return write_chrome_trace(spans, path, names)

    @property
    def events_open(self) -> int:
        """Perf events still open (each costs ~80 ms of kernel time to close on this VM)."""
        sessions = [a.session for a in self._attached.values()]
        return (sum(s.stats.events_open for s in sessions if not s.closed)
                + self.deepdive.events_open)

    def close(self) -> None:
        """Detach every probe (idempotent; a second caller waits for the first to finish).

        The kernel unregisters each uprobe with an RCU grace period (measured ~80 ms per
        event here, serialized), so this can take seconds: run it off the event loop.
        """
        with self._close_lock:
            if self._closed:
                return
            self.deepdive.close()
            for att in self._attached.values():
                att.session.close()
            if self._nvml_devices is not None:
                self._nvml_devices.close()
            self._run_queue.close()
            shutdown_fit_executor()
            self._closed = True

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the loop
    async def run(self, duration_s: float | None = None,
                  stop: asyncio.Event | None = None) -> None:
        """Process spans until ``duration_s``, ``stop``, or every target exits (unless
        ``match`` is set: then wait for a matching process to appear)."""
        stop = stop or asyncio.Event()
        queue: asyncio.Queue[tuple[int, list[Span] | None]] = asyncio.Queue()
        self._new = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        pumps: list[asyncio.Task[None]] = []

        failures: list[BaseException] = []

        def on_spans(pid: int, spans: list[Span]) -> None:
            if self.anchor is None and self._discovery is not None:  # fed once chosen
                self._discovery.hold(spans)
                return
            if self._silence is not None and not self._silence.fired:
                self._silence.saw(spans)
            # in the rings' reader callback: an alert leaves before the callback returns,
            # after the other targets' finished iterations are judged (see alerts_held)
            try:
                with self.engine.alerts_held():
                    self.engine.add_spans(pid, spans, self._run_queue_of(pid, spans))
                    if self.engine.alerts_pending:
                        self._judge_the_others(pid)
            except Exception as exc:
                failures.append(exc)
                queue.put_nowait((0, []))
                raise
            if self.deepdive.requested:
                queue.put_nowait((0, []))  # DeepDive attaches from the loop below

        async def pump(att: Attached) -> None:
            pid = att.target.pid
            try:
                await att.session.deliver(functools.partial(on_spans, pid))
            finally:
                queue.put_nowait((pid, None))

        for att in self._attached.values():
            self._new.put_nowait(att)
        deadline = None if duration_s is None else time.monotonic() + duration_s
        last_view = last_telemetry = last_govern = time.monotonic()
        if self.anchor is None and self._discovery is not None:
            self._discovery.start(last_view)
        if self._silence is not None:
            self._silence.start(last_view)
        if self._rescanner is not None:
            self._rescanner.start(last_view)
        telemetry_task: asyncio.Future[list[TelemetryValue]] | None = None
        view_task: asyncio.Task[None] | None = None
        loop = asyncio.get_running_loop()
        try:
            while not stop.is_set():
                while not self._new.empty():
                    pumps.append(asyncio.create_task(pump(self._new.get_nowait())))
                if not self._attached and self.match is None:
                    break
                timeout = 0.1
                if deadline is not None:
                    timeout = min(timeout, deadline - time.monotonic())
                    if timeout <= 0:
                        break
                # an empty batch on a timer, not asyncio.wait_for (which can swallow a
                # cancellation on Python 3.11 and leave the loop running)
                tick = loop.call_later(timeout, queue.put_nowait, (0, []))
                try:
                    pid, spans = await queue.get()
                finally:
                    tick.cancel()
                if failures:
                    raise failures[0]
                if spans is None:
                    self._lost_target(pid)
                if self.deepdive.requested:
                    self.deepdive.start_requested(
                        self._attached.get,
                        lambda pid, att: self._loop is not None
                        and self._attached.get(pid) is att)
                if self.deepdive.active:
                    self.deepdive.expire()
                now = time.monotonic()
                if self._silence is not None and self._silence.silent(now):
                    self._anchor_silent(now)
                if self.anchor is None and self._discovery is not None:
                    held = self._discovery.check(now)
                    if held is not None:
                        self._discovered(held)
                if now - last_govern >= GOVERN_S and (
                        self._silence is None or self._silence.fired):
                    # not before the named anchor fired: the estimate scales detached
                    # probes by its rate, and a silent one is given up for a probe the
                    # governor must not have detached meanwhile
                    last_govern = now
                    self.governing.tick(self._attached.items())
                if self._rescanner is not None and self._rescanner.due(
                        now, bool(self._attached)):
                    self._rescanner.scan(self._attached.__contains__)
                if self.telemetry:  # for the view, and the root-cause hints' metrics
                    if telemetry_task is not None and telemetry_task.done():
                        if telemetry_task.exception() is None:
                            self.engine.set_telemetry(telemetry_task.result())
                        telemetry_task = None
                    if telemetry_task is None and now - last_telemetry >= TELEMETRY_S:
                        last_telemetry = now
                        telemetry_task = loop.run_in_executor(
                            None, self._poller.sample, list(self._attached))
                if now - last_view >= self.snapshot_interval_s and (
                        self.on_view is not None or self.on_snapshot is not None) and (
                        view_task is None or view_task.done()):
                    last_view = now
                    view_task = loop.create_task(self._next_view())
        finally:
            self.deepdive.expire(force=True)
            self._loop = None
            for retiring in list(self._retiring):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await retiring
            self._retiring.clear()
            for task in pumps:
                task.cancel()
            for task in pumps:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if telemetry_task is not None:
                with contextlib.suppress(Exception):
                    await telemetry_task
            if view_task is not None:
                view_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await view_task

    def _anchor_silent(self, now: float) -> None:
        """The named anchor never fired while the other probes did: choose one from the
        spans; every target is watched again once chosen. (The governor has not acted:
        it waits for the anchor's first call.)"""
        assert self._silence is not None and self.anchor is not None
        said = (f"iteration anchor {self.anchor!r} of profile {self.profile.name!r} has not "
                f"fired in {self._silence.after_s:g} s while {self._silence.others} spans "
                "of its other probes arrived (this engine steps through another function)")
        for pid, att in self._attached.items():
            self.engine.forget(pid)
            att.governor = None  # equipped again for the chosen anchor
        self.anchor = None
        self._discovery = AnchorDiscovery(self.profile.name, self._anchor_discovery_s,
                                          notice=self._notice)
        self._discovery.start(now, f"{said}: choosing one from the spans")

    def _discovered(self, held: list[Span]) -> None:
        """An anchor was chosen: watch every target with it, then feed its held spans."""
        assert self._discovery is not None and self._discovery.chosen is not None
        self.anchor = self._discovery.chosen
        for pid, att in self._attached.items():
            self._watch(att)
            mine = [s for s in held if s.pid == pid]
            if mine:
                with self.engine.alerts_held():
                    self.engine.add_spans(pid, mine)

    def _lost_target(self, pid: int) -> None:
        att = self._attached.get(pid)
        if att is None or att.target.alive():
            return  # detached by the user, or a session that ended for another reason
        self.deepdive.target_gone(pid)
        # closing a dead target's probes is seconds of kernel work: off the loop
        self._in_background(asyncio.get_running_loop().run_in_executor(None, att.session.close))
        del self._attached[pid]
        if self._rescanner is not None:
            self._rescanner.target_exited(time.monotonic())  # a restart?
        self._poller.forget(pid)  # it would read a reused pid as exited
        self._run_queue.forget(pid)  # its schedstat files
        self.engine.gone(pid)
        self._notice(f"pid {pid} exited" + (
            f"; waiting for a process matching {self.match!r}" if self.match else ""))

    def _in_background(self, work: Awaitable[Any]) -> None:
        """Run ``work`` (attaching or closing probes) as a task ``run`` awaits at the end."""
        async def wait() -> None:
            await work

        task = asyncio.get_running_loop().create_task(wait())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _next_view(self) -> None:
        """Compute the view's snapshots a series at a time, then publish the view.

        Merging a few minutes of digests for every series takes milliseconds (5 ms
        on the dev VM after 5 min of a two-rank run, 15–25 ms while the ranks kept
        its CPUs busy); done in one callback, an iteration that ended meanwhile waited
        that long for its verdict. Between steps the rings' callbacks run.
        """
        for _attempt in range(3):
            now = self.engine.clock()
            stepped = False
            for _ in self.engine.prepare_view(now):
                stepped = True
                await asyncio.sleep(0)
            if not stepped:  # every snapshot for ``now`` is ready: publish it at once
                break
        self._publish_views(now)

    def _publish_views(self, now_ns: int | None = None) -> None:
        now_t = time.monotonic()
        for pid, att in self._attached.items():
            hits = dict(att.session.kernel_hits())
            delta = {p: n - att.prev_hits.get(p, 0) for p, n in hits.items()}
            dt = max(1e-3, now_t - att.prev_t)
            att.prev_hits, att.prev_t = hits, now_t
            costs = self.governing.costs_for(att)
            self.engine.set_probe_status(
                pid, probe_statuses(att.placements, delta, dt, hits,
                                     self.governing.governed_reasons(att)),
                hits_per_s=sum(delta.values()) / dt, lost=att.session.dropped(),
                overhead_pct=self.governing.overhead_pct(att, delta, dt),
                costs_measured=costs is not None and costs.measured,
                costs_note=costs.note if costs is not None else "no hit costs given",
                governor=self.governing.status(att), backend=att.session.backend)
        if self.on_view is not None:
            view = self.engine.view(now_ns)
            self.on_view(view)
            if self.on_snapshot is not None:
                snap = view.snapshot(10.0)
                if snap is not None:
                    self.on_snapshot(snap)
        elif self.on_snapshot is not None:
            self.engine.sketches.tick(now_ns)
            self.on_snapshot(self.engine.sketches.snapshot(now_ns, span_s=10))
