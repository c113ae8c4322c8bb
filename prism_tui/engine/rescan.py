"""Rescan: ``--match`` re-attaches to every matching process that appears.

The monitor's loop asks :meth:`Rescanner.due` each turn: every ``RESCAN_S``, or every
``RESCAN_AFTER_EXIT_S`` while nothing is attached and for ``FAST_RESCAN_FOR_S`` after a
watched process exited (a restarted server is re-attached well within a second).
:meth:`Rescanner.scan` lists ``/proc`` and opens each new match's probes in a thread
(ELF lookups and perf events would delay every verdict on the loop), then hands the
result to the monitor on the loop. A process that fails is tried again at the next scan,
with a notice once per pid and reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from probes.backend import ProbeSession
from probes.errors import ProbeError
from probes.placement import Placement
from probes.target import Target, find_targets

RESCAN_S = 1.0
"""How often ``--match`` looks for new processes (a ``/proc`` scan: ~6 ms on the loop)."""
RESCAN_AFTER_EXIT_S = 0.2
"""The rescan period while nothing is attached, and for FAST_RESCAN_FOR_S after a
watched process exited."""
FAST_RESCAN_FOR_S = 10.0


Opened = tuple[ProbeSession, list[Placement], str]
"""A target's sentinel session, placements and device label (see ``open_sentinels``)."""


class Rescanner:
    """The ``--match`` pattern's rescans and the attaches they start."""

    def __init__(self, match: str, *, open_target: Callable[[Target], Opened],
                 adopt: Callable[[Target, Opened], bool],
                 in_background: Callable[[Awaitable[Any]], None],
                 notice: Callable[[str], None]) -> None:
        """``open_target``: the blocking half of an attach (run in a thread; its result's
        first item is the session); ``adopt``: the loop's half, False when the target
        may no longer be watched (the loop stopped, or it was picked meanwhile: the
        session is then closed); ``in_background``: the monitor's runner of work it
        awaits at the end."""
        self.match = match
        self._open_target = open_target
        self._adopt = adopt
        self._in_background = in_background
        self._notice = notice
        self._fast_until = 0.0
        """Until when (monotonic s) rescans come every RESCAN_AFTER_EXIT_S."""
        self._last = 0.0
        self._attaching: set[int] = set()
        """Matching pids whose probes a thread is opening (see :meth:`_reattach`)."""
        self._unattachable: dict[int, str] = {}
        """Matching pids that failed to attach, with the reason last said in a notice."""

    def start(self, now: float) -> None:
        """The loop starts at monotonic ``now``: the first scan is one period away."""
        self._last = now

    def target_exited(self, now: float) -> None:
        """A watched process exited at ``now``: rescan fast for a while (a restart?)."""
        self._fast_until = now + FAST_RESCAN_FOR_S

    def due(self, now: float, any_attached: bool) -> bool:
        """Whether a scan is due at ``now`` (then it counts as done)."""
        period = (RESCAN_AFTER_EXIT_S if not any_attached or now < self._fast_until
                  else RESCAN_S)
        if now - self._last < period:
            return False
        self._last = now
        return True

    def scan(self, watched: Callable[[int], bool]) -> None:
        """Attach, in the background, every matching process not ``watched`` yet."""
        try:
            candidates = find_targets(self.match)
        except (ProbeError, OSError):
            return
        present = {t.pid for t in candidates}
        for pid in [p for p in self._unattachable if p not in present]:
            del self._unattachable[pid]  # exited: a reused pid gets its notice again
        for target in candidates:
            if watched(target.pid) or target.pid in self._attaching:
                continue
            self._attaching.add(target.pid)
            self._in_background(self._reattach(target))

    async def _reattach(self, target: Target) -> None:
        """Open ``target``'s probes in a thread, then hand them to the monitor on the loop.

        Opening is ELF lookups and perf events (6-30 ms for a simulator rank with the
        ``cuda`` and ``nccl`` profiles): on the loop it delayed every verdict.
        """
        loop = asyncio.get_running_loop()
        try:
            opened = await loop.run_in_executor(None, self._open_target, target)
        except (ProbeError, ValueError, OSError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if self._unattachable.get(target.pid) != reason:  # once per pid and reason
                self._unattachable[target.pid] = reason
                self._notice(f"pid {target.pid} ({target.name}) matches "
                             f"{self.match!r} but cannot be watched: {reason}; "
                             "trying again every rescan")
            return
        finally:
            self._attaching.discard(target.pid)
        self._unattachable.pop(target.pid, None)
        if not self._adopt(target, opened):
            await loop.run_in_executor(None, opened[0].close)
            return
        self._notice(f"re-attached to pid {target.pid} ({target.name})")
