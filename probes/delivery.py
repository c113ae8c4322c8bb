"""Hand a probe session's spans to an asyncio loop, or to a synchronous caller.

A session reads its rings in :meth:`SpanSource.read` and knows nothing of loops; this
module watches the session's fds (``loop.add_reader``), drains it every
``drain_interval_s`` and passes the spans on: inside the reader callback
(:meth:`LoopDelivery.deliver`, the latency-critical path) or through an async iterator
(:meth:`LoopDelivery.batches`). Both backends derive from :class:`DeliveredSession`, so
batching, wake-ups, the drain timer and the end of delivery are this module's code alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from probes.pairing import Span


class SpanSource(Protocol):
    """What delivery needs of a probe session (either backend's, or a test's)."""

    drain_interval_s: float
    wake_gap_s: float
    """The least time between two wake-ups by urgent records (0: every one wakes);
    records held back by it are read at most ``1.5 × wake_gap_s`` after the last."""

    def fds(self) -> list[int]:
        """The fds that become readable when records wait."""

    def read(self) -> list[Span]:
        """Drain every ring now and return the spans completed (never blocks)."""

    @property
    def all_exited(self) -> bool:
        """True once every target process has exited."""

    @property
    def closed(self) -> bool:
        """True once the session is closed."""


class LoopDelivery:
    """Watches a source's fds on the running loop and hands its spans over.

    The source registers fds it opens later with :meth:`watch` (and drops them with
    :meth:`unwatch`); both do nothing while no loop is attached.
    """

    def __init__(self, source: SpanSource) -> None:
        """Deliver ``source``'s spans; nothing is watched until a loop attaches."""
        self.source = source
        self.loop: asyncio.AbstractEventLoop | None = None
        """The loop delivering now, or None."""
        self._ready: asyncio.Event | None = None
        self._on_spans: Callable[[list[Span]], None] | None = None
        self._finished: asyncio.Future[None] | None = None
        self._follow_up: asyncio.TimerHandle | None = None

    def watch(self, fd: int) -> None:
        """Wake on ``fd`` too (a ring opened while delivering)."""
        if self.loop is not None:
            self.loop.add_reader(fd, self.on_readable)

    def unwatch(self, *fds: int) -> None:
        """Stop watching ``fds`` (a ring being closed); unknown fds are ignored."""
        if self.loop is None:
            return
        with contextlib.suppress(Exception):
            for fd in fds:
                self.loop.remove_reader(fd)

    def on_readable(self) -> None:
        """A watched fd has records (or a worker finished): read now, or wake the iterator.

        With a wake gap, urgent records within it of the last wake-up wake nobody: a
        read one and a half gaps later picks them up unless another wake-up comes first
        (re-armed at each, so it costs a timer only when the target goes quiet)."""
        if self._on_spans is not None:
            self._deliver_now()
            gap = self.source.wake_gap_s
            if gap > 0 and self.loop is not None:
                if self._follow_up is not None:
                    self._follow_up.cancel()
                self._follow_up = self.loop.call_later(1.5 * gap, self._deliver_now)
        elif self._ready is not None:
            self._ready.set()

    def _deliver_now(self) -> None:
        """Read every ring and hand the spans over, inside the loop's reader callback."""
        finished, on_spans = self._finished, self._on_spans
        if finished is None or finished.done() or on_spans is None:
            return
        try:
            spans = self.source.read()
            if spans:
                on_spans(spans)
        except BaseException as exc:  # handed to deliver()'s caller
            finished.set_exception(exc)
            return
        if self.source.all_exited or self.source.closed:
            finished.set_result(None)

    async def deliver(self, on_spans: Callable[[list[Span]], None]) -> None:
        """Call ``on_spans`` with new spans from the loop's reader callbacks.

        The alternative to :meth:`batches` for a latency-critical consumer: the wake-up
        of an urgent probe reads the rings and runs ``on_spans`` in the same callback,
        with no hop through a task and a queue (each hop waits behind every other ready
        callback of the loop). Rings are also drained every ``drain_interval_s``.
        Returns when every target has exited or the session is closed; an exception of
        ``on_spans`` or of reading ends it and is raised here.
        """
        source = self.source
        loop = asyncio.get_running_loop()
        self.loop = loop
        self._on_spans = on_spans
        self._finished = finished = loop.create_future()
        for fd in source.fds():
            loop.add_reader(fd, self.on_readable)
        timer: asyncio.TimerHandle | None = None

        def tick() -> None:
            nonlocal timer
            self._deliver_now()
            if not finished.done():
                timer = loop.call_later(source.drain_interval_s, tick)

        timer = loop.call_later(source.drain_interval_s, tick)
        try:
            await finished
        finally:
            timer.cancel()
            if self._follow_up is not None:
                self._follow_up.cancel()
                self._follow_up = None
            for fd in source.fds():
                with contextlib.suppress(Exception):
                    loop.remove_reader(fd)
            self.loop = None
            self._on_spans = None
            self._finished = None

    async def batches(self) -> AsyncIterator[list[Span]]:
        """Yield lists of spans as rings fill (wake-ups through ``loop.add_reader``).

        Ends when every target has exited. Rings are also drained every
        ``drain_interval_s``, so nothing waits longer than that.
        """
        source = self.source
        loop = self.loop = asyncio.get_running_loop()
        ready = self._ready = asyncio.Event()
        for fd in source.fds():
            loop.add_reader(fd, self.on_readable)
        try:
            while not source.closed:
                # a timer, not asyncio.wait_for: on Python 3.11 wait_for can swallow a
                # cancellation that races with the event, and the pump never ends
                drain = loop.call_later(source.drain_interval_s, ready.set)
                try:
                    await ready.wait()
                finally:
                    drain.cancel()
                ready.clear()
                spans = source.read()
                if spans:
                    yield spans
                if source.all_exited:
                    return
        finally:
            for fd in source.fds():
                with contextlib.suppress(Exception):
                    loop.remove_reader(fd)
            self.loop = None


def poll(source: SpanSource, timeout_s: float) -> list[Span]:
    """Wait up to ``timeout_s`` for data, then drain (synchronous callers)."""
    fds = source.fds()
    if fds:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        with contextlib.suppress(InterruptedError):
            poller.poll(max(0, int(timeout_s * 1000)))
    elif timeout_s > 0:
        time.sleep(min(timeout_s, source.drain_interval_s))
    return source.read()


class DeliveredSession(ABC):
    """A probe session whose spans go out through one :class:`LoopDelivery`.

    A backend implements opening, reading and closing; :meth:`poll`, :meth:`deliver`
    and :meth:`batches` are the same for every backend. It registers the fds it opens
    later with ``self._delivery.watch`` and drops them with ``self._delivery.unwatch``.
    """

    drain_interval_s: float
    wake_gap_s: float = 0.0
    """See :attr:`SpanSource.wake_gap_s` (only the bpf backend spaces its wake-ups)."""

    def __init__(self) -> None:
        """Give the session its delivery (nothing is watched until a loop attaches)."""
        self._delivery = LoopDelivery(self)

    @abstractmethod
    def open(self) -> DeliveredSession:
        """Attach the probes (idempotent); raises a :class:`~probes.errors.ProbeError`."""

    @abstractmethod
    def fds(self) -> list[int]:
        """The fds that become readable when records wait."""

    @abstractmethod
    def read(self) -> list[Span]:
        """Drain every ring now and return the spans completed (never blocks)."""

    @property
    @abstractmethod
    def all_exited(self) -> bool:
        """True once every target process has exited."""

    @property
    @abstractmethod
    def closed(self) -> bool:
        """True once the session is closed."""

    def poll(self, timeout_s: float) -> list[Span]:
        """Wait up to ``timeout_s`` for data, then drain (synchronous callers)."""
        return poll(self, timeout_s)

    async def deliver(self, on_spans: Callable[[list[Span]], None]) -> None:
        """Call ``on_spans`` with new spans from the loop's reader callbacks.

        The alternative to :meth:`batches` for a latency-critical consumer: the wake-up
        of an urgent probe reads the rings and runs ``on_spans`` in the same callback
        (:meth:`LoopDelivery.deliver`). Returns when every target has exited or the
        session is closed; an exception of ``on_spans`` or of reading ends it and is
        raised here.
        """
        self.open()
        await self._delivery.deliver(on_spans)

    async def batches(self) -> AsyncIterator[list[Span]]:
        """Yield lists of spans as rings fill (wake-ups through ``loop.add_reader``).

        Ends when every target has exited. Rings are also drained every
        ``drain_interval_s``, so nothing waits longer than that.
        """
        self.open()
        async for spans in self._delivery.batches():
            yield spans
