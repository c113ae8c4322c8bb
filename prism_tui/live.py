"""A live monitoring session: the monitor plus its alert path and history, in one loop.

``prism watch`` and ``prism demo`` both run one :class:`LiveSession`: the
:class:`~prism_tui.engine.monitor.Monitor` (probes → engine), an MQTT publisher with its
durable outbox when a broker is configured, and the SQLite history writer. The session
owns all of them (``close()`` idempotent) and hands immutable views to whoever draws
them — the Textual dashboard or the headless JSON-lines printer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alerting.config import BrokerConfig
from alerting.outbox import Outbox
from alerting.publisher import AlertPublisher
from prism_tui.alert_wire import to_wire
from prism_tui.dashboard_view import DashboardView, DeliveryStatus
from prism_tui.digest_feed import DigestFeed
from prism_tui.engine.core import AlertEvent, AlertSink, Engine, Observation
from prism_tui.engine.monitor import Monitor, Subscribers
from prism_tui.engine.view import EngineView, TargetStatus
from prism_tui.gc_pauses import freeze_heap
from prism_tui.history.store import HistoryError, HistoryStore
from prism_tui.history.writer import HistoryWriter
from prism_tui.scheduling import helper_executor, realtime_priority

if TYPE_CHECKING:
    from probes.placement import Placement

SUMMARY_EVERY_S = 5.0


class MqttSink:
    """Engine alerts → the publisher (non-blocking); each alert's delivery state → ``mark``."""

    def __init__(self, publisher: AlertPublisher, mark: Callable[[str, str], None]) -> None:
        self.publisher = publisher
        self.mark = mark

    def emit(self, alert: AlertEvent) -> None:
        """Hand one alert to the publisher; it is in the outbox before it is sent."""
        self.mark(alert.id, "queued")
        self.publisher.publish(to_wire(alert))

    def delivered(self, alert_id: str) -> None:
        """The broker acknowledged the alert."""
        self.mark(alert_id, "sent")


class _HistorySink:
    """The history writer as an alert sink from the start (it opens when the run does)."""

    def __init__(self, session: LiveSession) -> None:
        self.session = session

    def emit(self, alert: AlertEvent) -> None:
        """Hand one alert to the history writer, once it is open."""
        if self.session.history is not None:
            self.session.history.emit(alert)


HELPER_THREADS = 4
"""Threads of a real-time loop's default executor (outbox acknowledgements, telemetry,
DeepDive's probes, detaching): few, so that what runs real-time beside the loop stays
bounded."""


def summary_docs(view: EngineView) -> dict[str, dict[str, Any]]:
    """Per target key, the 10-s snapshot of its device with serialized digests (fleet views)."""
    snap = view.snapshot(10.0)
    out: dict[str, dict[str, Any]] = {}
    if snap is None:
        return out
    for t in view.targets:
        series = []
        for row in snap.rows:
            if row.key.device != t.device:
                continue
            series.append({"stage": row.key.stage, "device": row.key.device,
                           "phase": row.key.phase, "count": row.count,
                           "rate": round(row.rate, 3), "p50": row.p50, "p90": row.p90,
                           "p99": row.p99, "p999": row.p999, "max": row.max,
                           "share": row.share})
        key = f"{t.name}-{t.pid}"
        out[key] = {"schema": 1, "host": view.host, "target": {"pid": t.pid, "name": t.name},
                    "device": t.device, "window_s": snap.span_s, "start_ns": snap.start_ns,
                    "end_ns": snap.end_ns, "series": series}
    return out


def digests_b64(engine: Engine, device: str, span_s: float = 10.0) -> dict[str, str]:
    """Merged digests of ``device``'s series over ``span_s``, base64 (mergeable elsewhere)."""
    from prism_tui.engine.sketches import digest_to_bytes

    out = {}
    for key in engine.sketches.keys():  # noqa: SIM118 (a SketchStore, not a dict)
        if key.device != device:
            continue
        digest = engine.sketches.merged(key, span_s)
        if digest is not None:
            out[key.name] = base64.b64encode(digest_to_bytes(digest)).decode()
    return out


class LiveSession:
    """Owns a monitor, its publisher and its history writer for one run."""

    def __init__(self, monitor: Callable[[Subscribers], Monitor], *,
                 broker: BrokerConfig | None = None, outbox_path: str | None = None,
                 history_db: str | None = None, retention_days: float = 7.0,
                 max_iterations: int = 1_000_000, alert_sinks: Sequence[AlertSink] = (),
                 observer: Callable[[Observation], None] | None = None,
                 freeze_gc: bool = False) -> None:
        """Open the alert path (the outbox), then build the monitor with ``monitor``,
        handing it every subscriber once: the alert sinks in order — the MQTT sink,
        ``alert_sinks`` (the headless printer), the history writer — after the engine's
        own DeepDive hook; every judged iteration to the history and ``observer``; the
        views and notices to this session, which composes the dashboard's view from the
        engine's, the alert path's delivery, the history file and the notices.

        ``freeze_gc``: freeze the heap before the loop runs and again once the first
        model is in (see :mod:`prism_tui.gc_pauses`); for the ``prism`` commands, which
        own their process.
        """
        self._freeze_gc = freeze_gc
        self._frozen_after_fit = False
        self.publisher: AlertPublisher | None = None
        self.outbox: Outbox | None = None
        self.sink: MqttSink | None = None
        self.digests: DigestFeed | None = None
        self.history: HistoryWriter | None = None
        self._store: HistoryStore | None = None
        self._history_db = history_db
        self.history_path = "" if history_db is None else str(history_db)
        """The history file the dashboard shows ("" without one)."""
        self._retention = (retention_days, max_iterations)
        self._observer = observer
        self._on_view: Callable[[DashboardView], None] | None = None
        self._last_summary = 0.0
        self._closed = False
        self._notices: deque[str] = deque(maxlen=5)
        self._delivery_of: dict[str, str] = {}
        self._targets_recorded: set[tuple[int, str]] = set()
        self._placements_recorded = 0
        """How many of ``monitor.placements`` (append-only) the history has."""
        self._governed_recorded = 0
        """How many of ``monitor.governor_decisions`` (append-only) the history has."""
        self._latest_view: DashboardView | None = None
        """The targets to touch in the history (see :meth:`_touch_targets`)."""
        self._recording: asyncio.Task[None] | None = None
        sinks: list[AlertSink] = []
        if broker is not None:
            path = outbox_path or default_outbox_path()
            Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.outbox = Outbox(path)
            if self.outbox.notice:
                self.notice(self.outbox.notice)
            self.publisher = AlertPublisher(broker, host=socket.gethostname(),
                                            outbox=self.outbox, on_delivered=self._delivered)
            self.sink = MqttSink(self.publisher, self._mark_delivery)
            sinks.append(self.sink)
        sinks += alert_sinks
        if history_db is not None:
            sinks.append(_HistorySink(self))
        try:
            self.monitor = monitor(Subscribers(alerts=tuple(sinks), observation=self._observe,
                                               view=self._view, notice=self.notice))
        except BaseException:
            if self.outbox is not None:
                self.outbox.close()
            raise
        self.engine = self.monitor.engine
        if self.publisher is not None:
            self.digests = DigestFeed(self.engine, self.publisher.publish_digest)

    def notice(self, line: str) -> None:
        """A short line for the dashboard's status bar (the engine's come here too)."""
        self._notices.append(line)

    def _mark_delivery(self, alert_id: str, state: str) -> None:
        self._delivery_of[alert_id] = state

    def _observe(self, obs: Observation) -> None:
        if self.history is not None:
            self.history.observe(obs)
        if self._observer is not None:
            self._observer(obs)

    def compose(self, view: EngineView) -> DashboardView:
        """The dashboard's view: the engine's, with each alert's delivery state, the
        alert path's status, the history file and the latest notices."""
        delivery = DeliveryStatus()
        if self.publisher is not None:
            st = self.publisher.status
            delivery = DeliveryStatus(self.publisher.config.url, st.state, st.pending,
                                      st.published, st.last_error)
        return DashboardView.of(view, delivery=delivery, history_path=self.history_path,
                                notices=tuple(self._notices),
                                alert_delivery=self._delivery_of)

    @property
    def latest_view(self) -> DashboardView | None:
        """The view most recently published to the dashboard (None before the first)."""
        return self._latest_view

    def _delivered(self, alert_id: str) -> None:
        if self.sink is not None:
            self.sink.delivered(alert_id)

    def _view(self, engine_view: EngineView) -> None:
        view = self.compose(engine_view)
        self._latest_view = view
        if self._freeze_gc and not self._frozen_after_fit and any(
                d.state == "live" for d in view.detectors):
            self._frozen_after_fit = True
            freeze_heap()  # no alert before the first model: a quiet moment
        if self.publisher is not None:
            if self.digests is not None:
                self.digests.poll(view.targets)
            now = time.monotonic()
            if now - self._last_summary >= SUMMARY_EVERY_S:
                self._last_summary = now
                for key, doc in summary_docs(view).items():
                    doc["digests"] = digests_b64(self.engine, doc["device"])
                    self.publisher.publish_summary(key, doc)
        if self.history is not None:
            line = self.history.notice()
            if line is not None:  # failing or writing again: said once each
                self.notice(line)
        if self._store is not None and (self._recording is None or self._recording.done()):
            targets, placements = self._unrecorded(view)
            governed = len(self.monitor.governor_decisions) > self._governed_recorded
            if targets or placements or governed:  # attached since, or the governor acted
                self._recording = asyncio.get_running_loop().create_task(
                    self._record_targets(self._store, targets, placements))
        if self._on_view is not None:
            self._on_view(view)

    async def run(self, on_view: Callable[[DashboardView], None] | None = None,
                  stop: asyncio.Event | None = None, duration_s: float | None = None) -> None:
        """Run everything until ``stop``, ``duration_s`` or the targets' end."""
        stop = stop or asyncio.Event()
        self._on_view = on_view
        if realtime_priority():  # helpers at the loop's priority: no GIL inversion
            asyncio.get_running_loop().set_default_executor(
                helper_executor(HELPER_THREADS, "prism-helper"))
        tasks: list[asyncio.Task[Any]] = []
        history_stop = asyncio.Event()
        try:
            if self._history_db is not None:
                self._store = await HistoryStore(self._history_db).open()
                self.history = HistoryWriter(self._store, self.engine.sketches,
                                             retention_days=self._retention[0],
                                             max_iterations=self._retention[1])
                await self._record_targets(self._store, *self._unrecorded(self.engine.view()))
                tasks.append(asyncio.create_task(self.history.run(history_stop)))
                tasks.append(asyncio.create_task(self._touch_targets(
                    self._store, self.history.flush_s, history_stop)))
            if self.publisher is not None:
                tasks.append(asyncio.create_task(self.publisher.run()))
            if self._freeze_gc:
                freeze_heap()
            await self.monitor.run(duration_s, stop)
        finally:
            history_stop.set()
            if self.publisher is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.publisher.aclose(), 5)
            for task in tasks:
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError,
                                         Exception):
                    await asyncio.wait_for(task, 5)
            if self._store is not None:
                with contextlib.suppress(Exception):
                    if self._recording is not None:
                        await asyncio.wait_for(self._recording, 5)
                    # a target attached after the last view
                    await asyncio.wait_for(self._record_targets(
                        self._store, *self._unrecorded(self.engine.view())), 5)
                await self._store.close()
            await self._detach_off_loop()

    def _unrecorded(self, view: EngineView) -> tuple[list[TargetStatus], list[Placement]]:
        """The targets in ``view`` and the monitor's probe decisions not in the history yet."""
        targets = [t for t in view.targets if (t.pid, t.name) not in self._targets_recorded]
        return targets, self.monitor.placements[self._placements_recorded:]

    async def _record_targets(self, store: HistoryStore, targets: Sequence[TargetStatus],
                              placements: Sequence[Placement]) -> None:
        """Write targets and probe decisions to the history, at start, whenever the
        monitor attaches another process and whenever the overhead governor detaches,
        duty-cycles or restores a probe (status ``detached``/``duty-cycled``/``restored``,
        its estimate in the reason); a failed write is a notice, retried next view."""
        try:
            for placement in placements:
                await store.write_probe_decisions(
                    placement.target_pid,
                    [(d.probe, d.status, d.reason or None) for d in placement.decisions])
                self._placements_recorded += 1
            governed = self.monitor.governor_decisions
            while self._governed_recorded < len(governed):
                pid, decision, wall = governed[self._governed_recorded]
                await store.write_probe_decisions(
                    pid, [(decision.probe, decision.status, decision.reason)],
                    at_ns=int(wall * 1e9))
                self._governed_recorded += 1
            for t in targets:
                await store.write_target(t.pid, t.name, t.profile, t.device)
                self._targets_recorded.add((t.pid, t.name))
        except (HistoryError, sqlite3.Error, OSError) as exc:
            self.notice(f"history: {exc}")

    async def _touch_targets(self, store: HistoryStore, every_s: float,
                             stop: asyncio.Event) -> None:
        """Advance the history's ``last_seen_ns`` of the attached targets once per history
        flush until ``stop``, then once more (retention keeps a long-watched target)."""
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
            view = self._latest_view
            if view is None:
                continue
            keys = [(t.pid, t.name, t.device) for t in view.targets
                    if t.state == "attached" and (t.pid, t.name) in self._targets_recorded]
            try:
                await store.touch_targets(keys)
            except (HistoryError, sqlite3.Error, OSError) as exc:
                if self.history is not None:  # its notice says it, once (a full disk)
                    self.history.failed(exc)

    async def _detach_off_loop(self) -> None:
        """Close the probes in a thread (seconds of kernel work), saying so on screen."""
        n = self.monitor.events_open
        if n:
            self.notice(f"stopping: detaching {n} probe events…")
            if self._on_view is not None:
                self._on_view(self.compose(self.engine.view()))
        await asyncio.get_running_loop().run_in_executor(None, self.monitor.close)

    def close(self) -> None:
        """Detach probes and close the outbox (idempotent; ``run`` does it when it ends)."""
        if self._closed:
            return
        self._closed = True
        self.monitor.close()
        if self.outbox is not None:
            self.outbox.close()


def default_outbox_path() -> str:
    """Where the durable outbox lives by default (next to the history)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "latencyprism", "outbox.sqlite")
