"""The monitor, the engine's I/O side: live uprobe sessions feeding the pure
:class:`~prism_tui.engine.core.Engine` (which reads no clock, file or socket itself).

Its parts: attachment (attach, detach, ``--match`` rescans, anchor discovery) and the
loop are here; DeepDive's escalation is :mod:`prism_tui.engine.escalation`, telemetry
polling :mod:`prism_tui.engine.telemetry_poll`. One asyncio loop moves data only: per
target a uprobe session (its anchor probe urgent, so an iteration's end reaches the loop
within a millisecond) whose spans go to the engine.
A profile that names no anchor gets one from its own spans: they are held for a discovery
phase until :func:`~prism_tui.engine.anchors.choose_anchor` accepts a probe, then fed to
the engine with that anchor, so no span is lost.
Telemetry is sampled once a second in an executor; views and snapshots are built a few
times per second. With ``match`` the monitor re-attaches when a matching process appears
after the watched one exited. Its subscribers (:class:`Subscribers`: alert sinks,
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

from prism_tui.engine.anchors import AnchorChoice, choose_anchor
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
    shutdown_fit_executor,
    workload_of,
)
from prism_tui.engine.devices import NvmlDevices
from prism_tui.engine.escalation import DeepDive
from prism_tui.engine.recording import RecordedProcess
from prism_tui.engine.telemetry_poll import TELEMETRY_S, TelemetryPoller
from prism_tui.engine.trace_export import write_chrome_trace
from prism_tui.engine.view import (
    Candidate,
    GovernorAction,
    GovernorStatus,
    TelemetryValue,
)
from probes.backend import ProbeSession
from probes.catalog import Profile
from probes.errors import ProbeError
from probes.governor import DEFAULT_COSTS, GovernorDecision, OverheadGovernor
from probes.placement import Placement
from probes.target import Target, find_targets
from probes.telemetry import thread_runqueue_ns
from probes.uprobes import Span

__all__ = ["AlertEvent", "AlertSink", "DetectionConfig", "Monitor", "MonitorConfig", "Observation",
           "ProbingConfig", "SloSpec", "Subscribers", "detector_probes", "workload_of"]

INFERENCE_PATTERN = (r"vllm|sglang|llama[-_.]?(server|cpp|cli)|text-generation|tgi|"
                     r"tritonserver|lmdeploy|trtllm|tensorrt|ollama|torchrun|prism_sim|"
                     r"python[\d.]* .*(serve|infer|generate)")
"""Command lines that look like inference servers (the process picker's list)."""
RESCAN_S = 1.0
"""How often ``--match`` looks for new processes (a ``/proc`` scan: ~6 ms on the loop)."""
RESCAN_AFTER_EXIT_S = 0.2
"""The rescan period while nothing is attached, and for FAST_RESCAN_FOR_S after a
watched process exited: a restarted server is re-attached well within a second."""
FAST_RESCAN_FOR_S = 10.0
DISCOVERY_CHECK_S = 0.5
"""How often the spans held while no anchor is known are ranked (see _discover)."""
GOVERN_S = 1.0
"""How often each target's overhead governor closes a window and decides."""

_T = TypeVar("_T")

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
        run_queue_stage = config.run_queue_stage
        anchor_discovery_s = config.anchor_discovery_s
        mode, costs = probing.mode, probing.costs
        overhead_budget, governor_action = probing.overhead_budget, probing.governor_action
        ring_pages, drain_interval_s = probing.ring_pages, probing.drain_interval_s
        telemetry, escalation_s = config.telemetry, config.escalation_s
        snapshot_interval_s = config.snapshot_interval_s
        on_snapshot, on_view = subscribers.snapshot, subscribers.view
        self.run_queue_stage = run_queue_stage
        self.profile = profile
        self.extra_profiles = list(extra_profiles)
        self.anchor: str | None = profile.anchor
        self.anchor_choice: AnchorChoice | None = None
        """The discovered anchor with its cycle and reason (None: named, or not yet)."""
        self.anchor_discovery_s = anchor_discovery_s
        self._held: list[Span] | None = None if profile.anchor is not None else []
        self._discovery_deadline: float | None = None
        self._next_discovery = 0.0
        self.mode = mode
        self.match = match
        self.costs = costs
        self.overhead_budget = overhead_budget
        self.governor_action = governor_action
        if overhead_budget is not None:  # a bad value fails here, not at the first window
            OverheadGovernor([], costs or DEFAULT_COSTS, lambda i: None, lambda i: None,
                             budget=overhead_budget, action=governor_action)
        self.ring_pages = ring_pages
        self.drain_interval_s = drain_interval_s
        self._backend_noticed = False
        self.governor_decisions: list[tuple[int, GovernorDecision, float]] = []
        """(pid, decision, epoch seconds) of every governor decision, in order."""
        self.telemetry = telemetry
        self.on_snapshot = on_snapshot
        self.on_view = on_view
        self.snapshot_interval_s = snapshot_interval_s
        self.engine = Engine(detection, sinks=subscribers.alerts,
                             on_observation=subscribers.observation,
                             on_spans=subscribers.spans, on_run_queue=subscribers.run_queue,
                             escalate=lambda alert: self.deepdive.on_alert(alert),
                             on_notice=subscribers.notice, clock=clock)
        self.placements: list[Placement] = []
        self.escalation_s = escalation_s
        self.deepdive = DeepDive(self.engine, [profile, *self.extra_profiles],
                                 escalation_s=escalation_s, mode=mode, ring_pages=ring_pages,
                                 drain_interval_s=drain_interval_s, backend=probing.backend,
                                 in_background=self._in_background)
        """The escalation: deeper probes on a target while its alert fires."""
        self._attached: dict[int, Attached] = {}
        self._ever_attached: dict[int, RecordedProcess] = {}  # a recording's header
        self._new: asyncio.Queue[Attached] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._close_lock = threading.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self._fast_rescan_until = 0.0
        """Until when (monotonic s) ``--match`` rescans every RESCAN_AFTER_EXIT_S."""
        self._attaching: set[int] = set()
        """Matching pids whose probes a thread is opening (see :meth:`_reattach`)."""
        self._unattachable: dict[int, str] = {}
        """Matching pids that failed to attach, with the reason last said in a notice."""
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

    # ------------------------------------------------------------------ compatibility
    @property
    def alerts(self) -> list[AlertEvent]:
        """Every alert state change so far."""
        return self.engine.alerts

    # ------------------------------------------------------------------ attach / detach
    def _attach(self, target: Target) -> Attached:
        session, placements, device = self._open(target)
        try:
            return self._on_loop(self._register, target, session, placements, device)
        except BaseException:
            session.close()
            raise

    def _open(self, target: Target) -> tuple[ProbeSession, list[Placement], str]:
        """The blocking half of an attach (ELF lookups, perf events, the device label from
        NVML's process list): any thread."""
        return open_sentinels(target, [self.profile, *self.extra_profiles], self.anchor,
                              self.probing, self.device_of, on_fallback=self._notice_backend)

    def _notice_backend(self, why: str) -> None:
        """Say once that ``auto`` fell back to the perf backend, and why (any thread)."""
        if not self._backend_noticed:
            self._backend_noticed = True
            self.engine.notice(why)

    def _register(self, target: Target, session: ProbeSession,
                  placements: list[Placement], device: str) -> Attached:
        """The state half of an attach: on the loop's thread once the loop runs."""
        if target.pid in self._attached:
            raise ValueError(f"pid {target.pid} is already watched")
        self._notice_nvml()
        self.placements.extend(placements)
        att = self._attached[target.pid] = Attached(target, session, placements, device,
                                                     frozenset(session.urgent))
        if self.anchor is not None:  # else once one is chosen (see _discover)
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
                          probes=probe_statuses(att.placements, {}))
        self._ever_attached[pid] = self._recorded_process(pid, att)
        if self.overhead_budget is not None and att.governor is None:
            att.governor = OverheadGovernor(
                att.session.sites, self.costs or DEFAULT_COSTS, att.session.detach_site,
                att.session.reattach_site, budget=self.overhead_budget,
                action=self.governor_action, anchor=self.anchor, urgent=att.urgent,
                protected=detector_probes(self.profile, att.session.sites))

    def _notice_nvml(self) -> None:
        """Say once why device labels come from process environments, not NVML."""
        nvml = self._nvml_devices
        if nvml is None or self._nvml_noticed or nvml.unavailable_reason is None:
            return
        self._nvml_noticed = True
        self.engine.notice("device labels from process environments: NVML unavailable "
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
        self.engine.notice(f"attached to pid {pid}")
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

    def _run_queue_of(self, pid: int, spans: Sequence[Span]) -> tuple[int, int] | None:
        """(tid, cumulative ns waiting for a CPU) of the thread that ended an iteration in
        ``spans``, read now; None when no anchor is among them or the kernel does not
        keep schedstat. One small /proc read per iteration (~10 µs), for the engine's
        ``runqueue`` stage."""
        if not self.run_queue_stage or self.anchor is None:
            return None
        tid = next((s.tid for s in reversed(spans) if s.probe == self.anchor), None)
        if tid is None:
            return None
        ns = thread_runqueue_ns(pid, tid)
        return None if ns is None else (tid, ns)

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
            if self._held is not None:  # no anchor yet: _discover feeds them later
                self._held.extend(spans)
                return
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
        if self._held is not None:
            self._discovery_deadline = time.monotonic() + self.anchor_discovery_s
            self._next_discovery = time.monotonic() + DISCOVERY_CHECK_S
            self.engine.notice(f"profile {self.profile.name!r} names no iteration anchor: "
                               "choosing one from its spans")
        last_view = last_rescan = last_telemetry = last_govern = time.monotonic()
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
                if self._held is not None and now >= self._next_discovery:
                    self._next_discovery = now + DISCOVERY_CHECK_S
                    self._discover(now)
                if now - last_govern >= GOVERN_S:
                    last_govern = now
                    self._govern()
                if self.match is not None and now - last_rescan >= (
                        RESCAN_AFTER_EXIT_S if not self._attached
                        or now < self._fast_rescan_until else RESCAN_S):
                    last_rescan = now
                    self._rescan()
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

    def _govern(self) -> None:
        """Close a window of every target's governor; record and announce its decisions.

        Detaching hands the events to the session's closer thread; restoring (and a
        duty cycle's on-period) opens them again on this thread.
        """
        for pid, att in list(self._attached.items()):
            gov = att.governor
            if gov is None or att.session.closed:
                continue
            try:
                made = gov.update(dict(att.session.kernel_hits()))
            except (ProbeError, OSError) as exc:  # a reattach the kernel refused
                self.engine.notice(f"governor on pid {pid}: {exc}")
                continue
            for d in made:
                wall = time.time()
                self.governor_decisions.append((pid, d, wall))
                self.engine.count_governor_decision(pid, d.status)
                att.recent.append(GovernorAction(d.probe, d.status, 100 * d.overhead,
                                                 d.hits_per_s, d.cost_ns / 1000, d.reason,
                                                 wall))
                self.engine.notice(f"governor: {d.probe} {d.status} on pid {pid}: "
                                   f"{d.reason}")

    def _discover(self, now: float) -> None:
        """Choose the anchor from the spans held so far, then feed them to the engine.

        Until a probe qualifies (it recurs at least 20 times in a process, every 1 ms or
        more, regularly: :func:`~prism_tui.engine.anchors.rank_anchors`) the spans stay
        held; past ``anchor_discovery_s`` one notice says why none does, and only the
        last ``anchor_discovery_s`` of spans are kept, so a server that was idle at
        attach time gets its anchor once it serves.
        """
        held = self._held
        assert held is not None
        choice = choose_anchor(held)
        if choice is None:
            if self._discovery_deadline is not None and now >= self._discovery_deadline:
                self._discovery_deadline = None  # say it once
                self.engine.notice(
                    f"no iteration anchor after {self.anchor_discovery_s:g} s: no probe of "
                    f"{self.profile.name!r} recurred regularly every >= 1 ms in "
                    f"{len(held)} spans; still looking (or name one with the profile's "
                    "anchor)")
            if self._discovery_deadline is None and held:
                horizon = max(s.end_ns for s in held) - int(self.anchor_discovery_s * 1e9)
                held[:] = [s for s in held if s.end_ns >= horizon]
            return
        self._held = None
        self.anchor, self.anchor_choice = choice.probe, choice
        self.engine.notice(f"iteration anchor: {choice.probe}, chosen from {len(held)} "
                           f"spans: {choice.reason}")
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
        self._fast_rescan_until = time.monotonic() + FAST_RESCAN_FOR_S  # a restart?
        self._poller.forget(pid)  # it would read a reused pid as exited
        self.engine.gone(pid)
        self.engine.notice(f"pid {pid} exited" + (
            f"; waiting for a process matching {self.match!r}" if self.match else ""))

    def _in_background(self, work: Awaitable[Any]) -> None:
        """Run ``work`` (attaching or closing probes) as a task ``run`` awaits at the end."""
        async def wait() -> None:
            await work

        task = asyncio.get_running_loop().create_task(wait())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _rescan(self) -> None:
        """Attach, in the background, every process matching ``match`` not watched yet."""
        assert self.match is not None
        try:
            candidates = find_targets(self.match)
        except (ProbeError, OSError):
            return
        present = {t.pid for t in candidates}
        for pid in [p for p in self._unattachable if p not in present]:
            del self._unattachable[pid]  # exited: a reused pid gets its notice again
        for target in candidates:
            if target.pid in self._attached or target.pid in self._attaching:
                continue
            self._attaching.add(target.pid)
            self._in_background(self._reattach(target))

    async def _reattach(self, target: Target) -> None:
        """Open ``target``'s probes in a thread, then watch it from the loop.

        Opening is ELF lookups and perf events (6-30 ms for a simulator rank with the
        ``cuda`` and ``nccl`` profiles): on the loop it delayed every verdict. A process
        that fails (its libraries not loaded yet, say) is tried again at the next rescan;
        a notice says why, once per pid and reason.
        """
        loop = asyncio.get_running_loop()
        try:
            session, placements, device = await loop.run_in_executor(
                None, self._open, target)
        except (ProbeError, ValueError, OSError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if self._unattachable.get(target.pid) != reason:  # once per pid and reason
                self._unattachable[target.pid] = reason
                self.engine.notice(f"pid {target.pid} ({target.name}) matches "
                                   f"{self.match!r} but cannot be watched: {reason}; "
                                   "trying again every rescan")
            return
        finally:
            self._attaching.discard(target.pid)
        self._unattachable.pop(target.pid, None)
        if self._loop is None or target.pid in self._attached:  # stopped, or picked meanwhile
            await loop.run_in_executor(None, session.close)
            return
        self._register(target, session, placements, device)
        self.engine.notice(f"re-attached to pid {target.pid} ({target.name})")

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
            gov = att.governor
            costs = self.costs or DEFAULT_COSTS
            self.engine.set_probe_status(
                pid, probe_statuses(att.placements, delta, dt, hits,
                                     self._governed_reasons(att)),
                hits_per_s=sum(delta.values()) / dt, lost=att.session.dropped(),
                overhead_pct=self._overhead_pct(att, delta, dt),
                costs_measured=self.costs is not None and self.costs.measured,
                costs_note=costs.note if self.costs is not None else "no hit costs given",
                governor=None if gov is None else GovernorStatus(
                    100 * gov.budget, gov.action, tuple(att.recent)))
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

    @staticmethod
    def _governed_reasons(att: Attached) -> dict[str, tuple[str, str]]:
        """Probe → (status, reason) of the probes the governor holds now."""
        gov = att.governor
        if gov is None:
            return {}
        last = {a.probe: a.reason for a in att.recent}
        return {p: ("detached" if how == "detach" else "duty-cycled", last.get(p, ""))
                for p, how in gov.governed().items()}

    def _overhead_pct(self, att: Attached, delta: dict[str, int], dt: float) -> float | None:
        """CPU share the probes cost the target over the last view: Σ hits/s × cost per
        hit, the reader's wake-ups for urgent probes included (one per record)."""
        if self.costs is None:
            return None
        ns = 0.0
        seen: set[str] = set()
        for placement in att.placements:
            for site in placement.sites:
                if site.probe in seen:  # kernel counts are per probe, all sites together
                    continue
                seen.add(site.probe)
                n = delta.get(site.probe, 0)
                calls = n / 2 if site.ret else n
                ns += calls * self.costs.site_cost_ns(site.site, site.ret,
                                                      site.probe in att.urgent)
        return 100.0 * ns / (dt * 1e9)
