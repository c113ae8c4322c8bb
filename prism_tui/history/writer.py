"""Moves the engine's closed windows, iterations and alerts into the SQLite history.

The engine's loop only appends to in-memory lists (``observe``/``emit`` are O(1)); a task
flushes them once a second in one transaction per table (aiosqlite runs SQLite in its own
thread), and purges by retention every few minutes. Database failures become a value
(``last_error``) that the dashboard shows; the monitor keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from prism_tui.alert_wire import to_wire
from prism_tui.engine.core import AlertEvent, Observation
from prism_tui.engine.sketches import WindowedSketches
from prism_tui.history.store import HistoryError, HistoryStore, IterationRecord

PURGE_EVERY_S = 300.0


class HistoryWriter:
    """Flushes engine data to a :class:`HistoryStore` (an alert sink and an observer)."""

    def __init__(self, store: HistoryStore, sketches: WindowedSketches, *,
                 flush_s: float = 1.0, retention_days: float = 7.0,
                 max_iterations: int = 1_000_000, max_pending: int = 200_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.sketches = sketches
        self.flush_s = flush_s
        self.retention_days = retention_days
        self.max_iterations = max_iterations
        self.max_pending = max_pending
        self.clock = clock
        self.cursor = 0
        self.written: dict[str, int] = {"windows": 0, "iterations": 0, "alerts": 0}
        self.dropped_iterations = 0
        self.last_error = ""
        """Why the latest flush failed ("" once one succeeds)."""
        self._failing_said = False
        self._dropped_said = 0
        self._iterations: list[IterationRecord] = []
        self._alerts: list[dict[str, Any]] = []
        self._last_purge = clock()

    # ---------------------------------------------------------------- engine side (sync)
    def emit(self, alert: AlertEvent) -> None:
        """Queue an alert state change (sink protocol)."""
        self._alerts.append(to_wire(alert).to_dict())

    def observe(self, obs: Observation) -> None:
        """Queue an iteration with its stage times (ns → ms, 4 decimals: 100 ns) and the
        detector's prediction when there is one."""
        if len(self._iterations) >= self.max_pending:
            self.dropped_iterations += 1  # the DB is stuck: keep memory bounded
            return
        it, v = obs.iteration, obs.verdict
        self._iterations.append(IterationRecord(
            target=f"pid {it.pid}", pid=it.pid, device=it.device, phase=it.phase,
            index=it.index, start_ns=it.start_ns, end_ns=it.end_ns,
            latency_ms=it.latency_ms, features=dict(it.features),
            predicted_ms=None if v is None else v.predicted_ms,
            error=None if v is None else v.error,
            stages={stage: round(ns / 1e6, 4) for stage, ns in it.stages.items()}))

    # ---------------------------------------------------------------- the task
    async def flush(self) -> None:
        """Write what is queued; on a database error keep what was not written queued and
        record why (a full disk: the rows wait in memory, up to ``max_pending``)."""
        # read windows and the cursor together, before any await lets the engine close more
        windows = list(self.sketches.closed_windows_since(self.cursor))
        until = self.sketches.closed_until_ns
        its, alerts = self._iterations, self._alerts
        self._iterations, self._alerts = [], []
        try:
            self.written["alerts"] += await self.store.write_alerts(alerts)
            alerts = []
            self.written["iterations"] += await self.store.write_iterations(its)
            its = []
            self.written["windows"] += await self.store.write_windows(windows)
        except (HistoryError, sqlite3.Error, OSError) as exc:
            # each table in its own transaction: requeue only what did not commit
            self._iterations[:0], self._alerts[:0] = its, alerts
            self.failed(exc)
            return
        if until is not None:
            self.cursor = until
        self.last_error = ""
        if self.clock() - self._last_purge >= PURGE_EVERY_S:
            self._last_purge = self.clock()
            with contextlib.suppress(HistoryError, sqlite3.Error, OSError):
                await self.store.purge(
                    older_than_ns=time.time_ns() - int(self.retention_days * 86400e9),
                    max_iterations=self.max_iterations)

    def failed(self, exc: BaseException) -> None:
        """Record a failed history write (this writer's or the session's); the next
        successful flush clears it."""
        self.last_error = f"history: {exc}"

    def notice(self) -> str | None:
        """A status line when writing starts failing or resumes, once each (None: no news).

        A full disk fails every flush; the dashboard is told once that the history is
        held back, and once that it writes again (with what it had to drop meanwhile).
        """
        if self.last_error and not self._failing_said:
            self._failing_said = True
            return (f"{self.last_error}; monitoring and alerts go on, the history is held "
                    "in memory and written when it can write again")
        if not self.last_error and self._failing_said:
            self._failing_said = False
            dropped = self.dropped_iterations - self._dropped_said
            self._dropped_said = self.dropped_iterations
            lost = f", {dropped} iterations dropped meanwhile" if dropped else ""
            return f"history: writing again{lost}"
        return None

    async def run(self, stop: asyncio.Event) -> None:
        """Flush every ``flush_s`` until ``stop``, then once more."""
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.flush_s)
            await self.flush()
