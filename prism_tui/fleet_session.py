"""``prism fleet``'s session: a :class:`FleetState` fed from the broker, snapshotted every
interval into an immutable :class:`FleetView` (for the dashboard, the JSON lines and the
Prometheus collector) and its merged windows written to the fleet's SQLite history.

The history reuses :class:`~prism_tui.history.store.HistoryStore`'s ``windows`` table:
one row per (profile, stage, phase, device kind) and wall-clock second, its ``device``
column ``profile/kind`` (``kind`` alone without a profile), ``start_ns`` wall-clock ns,
so ``prism history --fleet`` is ``prism history`` over that file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

from alerting.config import BrokerConfig
from alerting.fleet import FleetState, MergedWindow, follow_fleet
from prism_tui.engine.sketches import SeriesKey, Window
from prism_tui.fleet_view import FleetView, HostSeries, fleet_view, host_series
from prism_tui.history.store import HistoryStore


def fleet_device(profile: str, kind: str) -> str:
    """The history ``device`` of a fleet group: ``profile/kind`` (``kind`` alone)."""
    return f"{profile}/{kind}" if profile else kind


def fleet_window(merged: MergedWindow) -> Window:
    """A merged fleet window as a history row (start in wall-clock ns)."""
    profile, stage, phase, kind = merged.group
    return Window(SeriesKey(stage, fleet_device(profile, kind), phase),
                  merged.start * 1_000_000_000, merged.digest, merged.count, merged.sum_ms,
                  merged.min_ms, merged.max_ms)


class FleetSession:
    """Follows one broker and publishes a view every ``interval_s``.

    Args:
        config: the broker.
        state: what the messages feed.
        history_db: the fleet's SQLite file (None: keep no history).
        interval_s: seconds between views (and history writes).
        on_error: one line per broker or history failure (repeated ones once).
    """

    def __init__(self, config: BrokerConfig, state: FleetState, *,
                 history_db: str | None = None, interval_s: float = 1.0,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.state = state
        self.history_db = history_db
        self.interval_s = interval_s
        self.on_error = on_error
        self.latest: FleetView | None = None
        self.latest_snapshot: dict[str, Any] | None = None
        self.windows_written = 0

    async def prepare(self) -> None:
        """Do a snapshot's heavy part (folding the entries received, dropping what left
        the window) in slices, taking messages in between: at 1,000 hosts it is ~0.3 s
        of CPU a second, and done at once it held back every message that arrived
        meanwhile (the fleet's lag)."""
        for _ in self.state.fold_steps():
            await asyncio.sleep(0)
        for _ in self.state.prune_steps(self.state.clock()):
            await asyncio.sleep(0)

    def view(self) -> FleetView:
        """Snapshot the state now into a view (kept as :attr:`latest`)."""
        snap = self.state.snapshot()
        self.latest_snapshot = snap
        self.latest = fleet_view(snap, self.config.url)
        return self.latest

    def host_series(self, host: str) -> tuple[HostSeries, ...]:
        """One host's drill-down rows (the dashboard's Enter)."""
        return host_series(self.state.host_series(host))

    async def run(self, show: Callable[[FleetView], None], stop: asyncio.Event,
                  duration_s: float | None = None) -> None:
        """Follow the broker, ``show`` a view every interval, write history; returns when
        ``stop`` is set or ``duration_s`` ran out (after a last view)."""
        store = None
        if self.history_db is not None:
            os.makedirs(os.path.dirname(self.history_db) or ".", mode=0o700, exist_ok=True)
            store = HistoryStore(self.history_db, mono_clock=time.time_ns,
                                 wall_clock=time.time_ns)
            await store.open()  # a HistoryError (permission, corrupt file) ends the run
        loop = asyncio.get_running_loop()
        follower = asyncio.create_task(follow_fleet(self.config, self.state, stop,
                                                    on_error=self.on_error))
        deadline = None if duration_s is None else loop.time() + duration_s
        try:
            while not stop.is_set():
                wait = self.interval_s if deadline is None else min(
                    self.interval_s, deadline - loop.time())
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, wait))
                if deadline is not None and loop.time() >= deadline:
                    stop.set()
                await self.prepare()
                show(self.view())
                if store is not None:
                    await self._save(store)
        finally:
            stop.set()
            await follower
            if store is not None:
                await self._save(store)
                await store.close()

    async def _save(self, store: HistoryStore) -> None:
        windows = [fleet_window(w) for w in self.state.drain_windows()]
        try:
            self.windows_written += await store.write_windows(windows)
        except Exception as exc:  # a full disk must not stop the screen; said once
            if self.on_error is not None:
                self.on_error(f"fleet history {self.history_db}: {exc}")
