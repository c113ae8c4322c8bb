"""DeepDive, the escalation: a firing alert opens the deeper probes on its target.

The engine hands every alert to :meth:`DeepDive.on_alert` before its sinks (an explicit
hook, not a sink that loops back into the monitor); a firing one notes a request. The
monitor's loop then calls :meth:`DeepDive.start_requested` on its next turn: the
profiles' ``deepdive``-level probes are opened in a thread ``DEEPDIVE_DELAY_S`` after
the alert (once it has left), their spans sketched under phase ``deepdive`` for
``escalation_s`` seconds, then closed in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prism_tui.engine.core import AlertEvent, Engine
from probes.backend import ProbeSession, open_session
from probes.catalog import Profile
from probes.errors import ProbeError
from probes.placement import Placement, place_profile
from probes.target import Target

DEEPDIVE_DELAY_S = 0.05
"""How long a DeepDive waits after its alert before it opens probes (see _open)."""
DEEPDIVE_DRAIN_S = 0.05
"""Least drain interval of a DeepDive's probes (they carry no anchor: nothing is urgent)."""


class Watched(Protocol):
    """What DeepDive needs of an attached target: the process and its sentinel placements."""

    target: Target
    placements: list[Placement]


@dataclass
class _Open:
    session: ProbeSession
    stage_of: dict[str, str]
    until: float
    task: asyncio.Task[None] | None = None


class DeepDive:
    """The deeper probes opened on a target while its alert fires; one owner of them."""

    def __init__(self, engine: Engine, profiles: Sequence[Profile], *, escalation_s: float,
                 mode: str, ring_pages: int, drain_interval_s: float, backend: str = "perf",
                 in_background: Callable[[Awaitable[Any]], None],
                 notice: Callable[[str], None]) -> None:
        """``profiles``: whose ``deepdive`` probes to open; ``escalation_s``: for how long
        (0: never); ``mode``, ``ring_pages``, ``drain_interval_s``, ``backend``: as the
        sentinel sessions'; ``in_background``: the monitor's runner of work it awaits at the end;
        ``notice``: the monitor's notice subscriber (a line per DeepDive opened, ended, failed)."""
        self.engine = engine
        self._notice = notice
        self.profiles = list(profiles)
        self.escalation_s = escalation_s
        self.mode = mode
        self.backend = backend
        self.ring_pages = ring_pages
        self.drain_interval_s = drain_interval_s
        self._in_background = in_background
        self.log: list[tuple[str, int, int]] = []
        """(``attached``/``detached``/``failed``, pid, probes) in order, for reports."""
        self._requested: set[int] = set()
        self._opening: set[int] = set()
        self._open: dict[int, _Open] = {}

    # ------------------------------------------------------------------ the engine's hook
    def on_alert(self, alert: AlertEvent) -> None:
        """Note a firing alert's target for the loop's next turn (never blocks)."""
        if self.escalation_s > 0 and alert.status == "firing":
            self._requested.add(int(alert.target.get("pid", 0)))

    @property
    def requested(self) -> bool:
        """Whether a DeepDive waits to be started by the loop."""
        return bool(self._requested)

    # ------------------------------------------------------------------ the loop's side
    def start_requested(self, attached: Callable[[int], Watched | None],
                        current: Callable[[int, Watched], bool]) -> None:
        """Start (or extend) the DeepDive of every target asked for since the last turn.

        ``attached``: the watched target of a pid (None: gone); ``current``: whether a
        pid is still watched as that target once its probes are open.
        """
        while self._requested:
            pid = self._requested.pop()
            dd = self._open.get(pid)
            if dd is not None:
                dd.until = time.monotonic() + self.escalation_s  # a new alert extends it
                continue
            att = attached(pid)
            if att is None or pid in self._opening:
                continue
            self._opening.add(pid)
            self._in_background(self._start(pid, att, current))

    def _session(self, att: Watched) -> tuple[ProbeSession | None, dict[str, str]]:
        """The blocking half of a DeepDive: resolve the deeper probes and open them."""
        sentinel = {s.probe for p in att.placements for s in p.sites}
        sites = [s for prof in self.profiles
                 for s in place_profile(att.target, prof, "deepdive").sites
                 if s.probe not in sentinel]
        if not sites:
            return None, {}
        session, _ = open_session([att.target], sites, backend=self.backend, mode=self.mode,
                                  ring_pages=self.ring_pages,
                                  drain_interval_s=max(DEEPDIVE_DRAIN_S, self.drain_interval_s))
        return session, {s.probe: s.stage for s in sites}

    async def _start(self, pid: int, att: Watched,
                     current: Callable[[int, Watched], bool]) -> None:
        loop = asyncio.get_running_loop()
        try:
            # the alert first: registering uprobes is kernel work on the CPUs that the
            # broker and the subscribers need to deliver it (measured: firing alerts
            # were delivered ~2x slower than resolutions while their DeepDive opened)
            await asyncio.sleep(DEEPDIVE_DELAY_S)
            session, stage_of = await loop.run_in_executor(None, self._session, att)
        except (ProbeError, OSError, ValueError) as exc:
            self.log.append(("failed", pid, 0))
            self._notice(f"DeepDive on pid {pid} failed: {exc}")
            return
        finally:
            self._opening.discard(pid)
        if session is None:
            self.log.append(("failed", pid, 0))
            return
        if not current(pid, att):
            await loop.run_in_executor(None, session.close)  # stopped or detached meanwhile
            return
        dd = self._open[pid] = _Open(session, stage_of, time.monotonic() + self.escalation_s)

        async def pump() -> None:
            async for batch in session.batches():
                self.engine.add_deepdive_spans(pid, batch, dd.stage_of)

        dd.task = loop.create_task(pump())
        self.log.append(("attached", pid, len(stage_of)))
        self._notice(f"DeepDive: {len(stage_of)} deeper probes on pid {pid} for "
                           f"{self.escalation_s:g} s")

    def expire(self, force: bool = False) -> None:
        """Close, in the background, the DeepDives whose time is up (all with ``force``)."""
        now = time.monotonic()
        for pid, dd in list(self._open.items()):
            if force or now >= dd.until:
                del self._open[pid]
                self._in_background(self._retire(dd))
                self.log.append(("detached", pid, len(dd.stage_of)))
                self._notice(f"DeepDive on pid {pid} ended")

    @property
    def active(self) -> bool:
        """Whether any DeepDive is open."""
        return bool(self._open)

    def target_gone(self, pid: int) -> None:
        """Close ``pid``'s DeepDive in the background (its process exited)."""
        dd = self._open.pop(pid, None)
        if dd is not None:
            self._in_background(self._retire(dd))

    def detach(self, pid: int) -> None:
        """Close ``pid``'s DeepDive now (the user detached it)."""
        dd = self._open.pop(pid, None)
        if dd is not None:
            if dd.task is not None:
                dd.task.cancel()
            dd.session.close()

    async def _retire(self, dd: _Open) -> None:
        """Stop a DeepDive's pump, then close its probes in a thread (slow kernel work)."""
        if dd.task is not None:
            dd.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await dd.task
        await asyncio.get_running_loop().run_in_executor(None, dd.session.close)

    @property
    def events_open(self) -> int:
        """Perf events its sessions hold open."""
        return sum(d.session.stats.events_open for d in self._open.values()
                   if not d.session.closed)

    def close(self) -> None:
        """Close every DeepDive's probes now (idempotent)."""
        for dd in self._open.values():
            dd.session.close()
        self._open.clear()
