"""The background threads of a probe session: one opener, one closer, both backends.

Opening a uprobe registers it (~3 ms per perf event) and closing one waits for an RCU
grace period (~80 ms, ``docs/performance.md``): done on the reader's loop, either would
stall every alert behind it. A session hands that work to a :class:`Closer` (closes, in
order, counted in the session's :class:`SessionStats`) and an :class:`Opener` (builds,
hands the result back and wakes the reader), each one daemon thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Built = TypeVar("Built")


@dataclass
class SessionStats:
    """Counters of a session, for the governor and the dashboard."""

    hits: Counter[str] = field(default_factory=Counter)
    spans: int = 0
    lost: int = 0
    unfinished: int = 0
    orphan_returns: int = 0
    thread_records_lost: int = 0
    threads_attached: int = 0
    threads_exited: int = 0
    thread_attach_failures: int = 0
    events_open: int = 0
    closes_queued: int = 0
    """Rings and fds handed to the background closer (written by the reader only)."""
    closes_done: int = 0
    """Those the closer has closed (written by the closer only)."""


def fifo_priority() -> int:
    """The calling thread's ``SCHED_FIFO`` priority, 0 when it runs normally."""
    try:
        policy = os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK
        return os.sched_getparam(0).sched_priority if policy == os.SCHED_FIFO else 0
    except OSError:
        return 0


class Worker:
    """One daemon thread that runs the callables handed to it, in order.

    It runs at the real-time priority of the thread that starts it (a monitor's loop
    under ``--realtime``): its jobs are short system calls, and a normal-priority thread
    holding the GIL while CPU hogs preempt it would keep that loop waiting.
    """

    def __init__(self, name: str) -> None:
        """Start the thread, named ``name`` (as ``ps -L`` and the docs show it)."""
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._priority = fifo_priority()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, job: Callable[[], None]) -> None:
        """Run ``job`` after every job handed over before it."""
        self._jobs.put(job)

    def _run(self) -> None:
        if self._priority:
            with contextlib.suppress(OSError):  # refused: it runs normally
                os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK,
                                      os.sched_param(self._priority))
        while (job := self._jobs.get()) is not None:
            job()

    def finish(self) -> None:
        """Wait until every job handed over has run; the thread then ends."""
        self._jobs.put(None)
        self._thread.join()


class Opener(Worker, Generic[Built]):
    """Builds what the reader asks for (a thread's ring) and wakes it when one is done."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop,
                 wake: Callable[[], None]) -> None:
        """Call ``wake`` on ``loop`` after each build (the reader then takes it back)."""
        super().__init__(name)
        self._loop = loop
        self._wake = wake
        self._done: queue.SimpleQueue[tuple[int, int, Built | BaseException]] = \
            queue.SimpleQueue()

    def build(self, pid: int, tid: int, build: Callable[[], Built]) -> None:
        """Queue one build; :meth:`finished` hands it (or its error) back."""
        def job() -> None:
            try:
                result: Built | BaseException = build()
            except Exception as exc:  # handed to the reader, which decides
                result = exc
            self._done.put((pid, tid, result))
            with contextlib.suppress(RuntimeError):  # the loop is closed
                self._loop.call_soon_threadsafe(self._wake)

        self.put(job)

    def finished(self) -> list[tuple[int, int, Built | BaseException]]:
        """(pid, tid, what was built or the error) of every build done since last asked."""
        out = []
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(self._done.get_nowait())
        return out


class Closer(Worker):
    """Closes what a session hands it, in order, counting in the session's stats."""

    def __init__(self, name: str, stats: SessionStats) -> None:
        """Count each close handed over (``closes_queued``) and each done (``closes_done``)."""
        super().__init__(name)
        self._stats = stats

    def close(self, what: Callable[[], None]) -> None:
        """Run ``what`` (closing a ring or an fd) on the thread; a failure to close is
        ignored (the fd is gone either way)."""
        self._stats.closes_queued += 1

        def job() -> None:
            with contextlib.suppress(OSError, ValueError):
                what()
            self._stats.closes_done += 1

        self.put(job)
