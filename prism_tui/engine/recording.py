"""Spans saved to and replayed from a file (gzip JSON lines), for offline analysis and tests.

The first line is a header (format version, processes with their profile, anchor,
stage map and device); then one span per line (a JSON array; captured arguments are
numbers) and, from format 2, the run-queue readings that came with the spans (a JSON
object ``{"run_queue": [pid, tid, ns]}`` after the batch it came with; from format 3
``[pid, tid, ns, read_at_ns]``), so a replay has the live run's ``runqueue`` stage.
Replaying a recording through :class:`~prism_tui.engine.core.Engine` with a clock that
follows the spans gives the iterations, sketches and alerts of the live run, which makes
the engine and the dashboard testable without probes.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from prism_tui.engine.iterations import RunQueueSample, SpanLike
from probes.catalog import DerivedFeature

FORMAT = 3
READABLE_FORMATS = (1, 2, 3)
"""Format 1 had no run-queue readings; it reads as a recording without them. Format 2's
readings have no time; the replay then gives the iterations all of the wait."""


@dataclass(frozen=True)
class RecordedSpan:
    """A span read back from a recording (the probes' Span shape)."""

    probe: str
    pid: int
    tid: int
    start_ns: int
    end_ns: int
    args: Mapping[str, int | float] = field(
        default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class RecordedProcess:
    """What the engine needs to follow one recorded process."""

    pid: int
    name: str
    profile: str
    anchor: str
    device: str
    stage_of: Mapping[str, str]
    derived: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """The profile's derived features, name → expression (``kv_tokens`` and the like)."""
    phase_rule: str | None = None
    """The profile's phase rule (None: the built-in rule)."""


@dataclass(frozen=True)
class RunQueueReading:
    """A run-queue reading of ``pid`` taken live with a batch of spans.

    ``after`` is how many spans of the recording came before it: the batch it came
    with ends there. ``sample.at_ns`` is None in format 2.
    """

    after: int
    pid: int
    sample: RunQueueSample


@dataclass(frozen=True)
class Recording:
    """A recording read back: its processes, spans and run-queue readings, in order."""

    processes: list[RecordedProcess]
    spans: list[RecordedSpan]
    run_queue: list[RunQueueReading]


class RecordingError(ValueError):
    """A file that is not a span recording (the message says where it broke)."""


def save_spans(path: str, processes: Iterable[RecordedProcess],
               spans: Iterable[SpanLike]) -> int:
    """Write a recording; returns the number of spans written."""
    n = 0
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps(_header(processes)) + "\n")
        for s in spans:
            fh.write(_span_line(s))
            n += 1
    return n


def _span_line(s: SpanLike) -> str:
    return json.dumps([s.probe, s.pid, s.tid, s.start_ns, s.end_ns, dict(s.args)]) + "\n"


class SpanRecorder:
    """Streams spans to a recording while a monitor runs, without holding them in memory.

    ``add`` only queues the batch (it is called on the monitor's loop); a writer thread
    formats the lines into a temporary file next to ``path``. ``close(processes)`` writes
    the header, which needs every process the run attached, then the spans, into
    ``path``. Memory stays at the queue's backlog, not the run's length.
    ``add_run_queue`` takes the engine's run-queue readings (its ``on_run_queue``) into
    the same queue, so each lands after the batch it came with.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        fd, self._body_path = tempfile.mkstemp(prefix=".spans-", dir=directory)
        self._body = os.fdopen(fd, "w", encoding="utf-8")
        self._queue: queue.SimpleQueue[Sequence[SpanLike] | tuple[int, ...] | None] = \
            queue.SimpleQueue()
        self.count = 0
        self._closed = False
        self._thread = threading.Thread(target=self._write, name="span-recorder",
                                        daemon=True)
        self._thread.start()

    def add(self, spans: Sequence[SpanLike]) -> None:
        """Queue a batch of spans (cheap: safe to call from the monitor's loop)."""
        if not self._closed:
            self._queue.put(list(spans))

    def add_run_queue(self, pid: int, reading: RunQueueSample) -> None:
        """Queue a run-queue reading that came with the batch queued last for ``pid``."""
        if not self._closed:
            self._queue.put((pid, reading.tid, reading.waited_ns) if reading.at_ns is None
                            else (pid, reading.tid, reading.waited_ns, reading.at_ns))

    def _write(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, tuple):
                self._body.write(json.dumps({"run_queue": list(item)}) + "\n")
                continue
            self._body.write("".join(_span_line(s) for s in item))
            self.count += len(item)

    def discard(self) -> None:
        """Stop and delete what was written (a run that failed); harmless after close."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        self._body.close()
        with contextlib.suppress(OSError):
            os.unlink(self._body_path)

    def close(self, processes: Iterable[RecordedProcess]) -> int:
        """Finish the file with these processes in its header; returns spans written."""
        if self._closed:
            return self.count
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        self._body.close()
        try:
            with gzip.open(self.path, "wt", encoding="utf-8") as out, \
                    open(self._body_path, encoding="utf-8") as body:
                out.write(json.dumps(_header(processes)) + "\n")
                shutil.copyfileobj(body, out, 1 << 20)
        finally:
            os.unlink(self._body_path)
        return self.count


def _header(processes: Iterable[RecordedProcess]) -> dict[str, Any]:
    return {"format": FORMAT, "processes": [
        {"pid": p.pid, "name": p.name, "profile": p.profile, "anchor": p.anchor,
         "device": p.device, "stage_of": dict(p.stage_of), "derived": dict(p.derived),
         "phase_rule": p.phase_rule}
        for p in processes]}


def load_spans(path: str) -> tuple[list[RecordedProcess], list[RecordedSpan]]:
    """The processes of a recording and its spans, in file order."""
    rec = load_recording(path)
    return rec.processes, rec.spans


def load_recording(path: str) -> Recording:
    """A recording's processes, spans and run-queue readings, in file order."""
    spans: list[RecordedSpan] = []
    readings: list[RunQueueReading] = []
    lineno = 1
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            header = json.loads(fh.readline())
            if not isinstance(header, dict) or header.get("format") not in READABLE_FORMATS:
                *older, last = map(str, READABLE_FORMATS)
                raise RecordingError(f"{path}: not a span recording of format "
                                     f"{', '.join(older)} or {last}")
            procs = [RecordedProcess(p["pid"], p["name"], p["profile"], p["anchor"],
                                     p["device"], MappingProxyType(dict(p["stage_of"])),
                                     MappingProxyType(_derived_of(p)),
                                     _phase_rule_of(p))
                     for p in header["processes"]]
            for lineno, line in enumerate(fh, start=2):
                if line.startswith("{"):
                    values = json.loads(line)["run_queue"]
                    if (not isinstance(values, list) or len(values) not in (3, 4)
                            or not all(isinstance(v, int) for v in values)):
                        raise RecordingError(f"{path}:{lineno}: a run-queue reading "
                                             "holds 3 or 4 integers")
                    readings.append(RunQueueReading(len(spans), values[0],
                                                    RunQueueSample(*values[1:])))
                    continue
                probe, pid, tid, start, end, args = json.loads(line)
                if not all(isinstance(v, (int, float)) for v in args.values()):
                    raise RecordingError(f"{path}:{lineno}: arguments must be numbers")
                spans.append(RecordedSpan(probe, pid, tid, start, end,
                                          MappingProxyType(args)))
    except RecordingError:
        raise
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RecordingError(f"{path}:{lineno}: not a span recording ({exc})") from None
    return Recording(procs, spans, readings)


def _derived_of(process: Mapping[str, Any]) -> dict[str, str]:
    """A recorded process's derived features; recordings made before they were saved
    get those of the catalog profile of the same name (what the live run used)."""
    if "derived" in process:
        return {str(k): str(v) for k, v in dict(process["derived"]).items()}
    from probes.catalog import load_profile
    from probes.errors import CatalogError

    try:
        return {d.name: d.expr for d in load_profile(str(process["profile"])).derived}
    except (CatalogError, OSError, ValueError):
        return {}


def _phase_rule_of(process: Mapping[str, Any]) -> str | None:
    """A recorded process's phase rule; None in recordings made before rules were saved
    (no built-in profile had one then)."""
    rule = process.get("phase_rule")
    return str(rule) if rule is not None else None


class ReplayClock:
    """A CLOCK_MONOTONIC stand-in following the replayed spans (docs/architecture.md §Rules 7)."""

    def __init__(self, start_ns: int = 0) -> None:
        self.now_ns = start_ns

    def __call__(self) -> int:
        return self.now_ns

    def advance_to(self, t_ns: int) -> None:
        """Move forward to ``t_ns`` (never backwards)."""
        self.now_ns = max(self.now_ns, t_ns)


class _Feed(Protocol):
    def watch(self, pid: int, name: str, anchor: str, stage_of: Mapping[str, str], *,
              profile: str = ..., device: str = ...,
              derived: Sequence[DerivedFeature] = ..., phase_rule: str | None = ...) -> None: ...

    def add_spans(self, pid: int, spans: Sequence[SpanLike],
                  run_queue: RunQueueSample | None = ...) -> Any: ...


def replay(engine: _Feed, clock: ReplayClock, processes: Iterable[RecordedProcess],
           spans: Iterable[RecordedSpan], *, batch: int = 64,
           every: Callable[[int], None] | None = None,
           run_queue: Sequence[RunQueueReading] = ()) -> int:
    """Feed a recording to an engine built on ``clock``, in batches as a ring would deliver.

    ``every(now_ns)`` runs after each batch (to take views at replayed times). With
    ``run_queue`` (a recording's readings), a process that has readings is fed in the
    live run's batches: each ends at a reading and carries it, so its iterations get
    the live ``runqueue`` stage (``batch`` does not cut them). Returns the number of
    spans fed.
    """
    for p in processes:
        engine.watch(p.pid, p.name, p.anchor, p.stage_of, profile=p.profile, device=p.device,
                     derived=[DerivedFeature(n, e) for n, e in p.derived.items()],
                     phase_rule=p.phase_rule)
    pending: dict[int, list[RecordedSpan]] = {}
    n = 0
    read = {r.pid for r in run_queue}
    readings = iter(run_queue)
    upcoming = next(readings, None)

    def flush(pid: int, reading: RunQueueSample | None = None) -> None:
        group = pending.pop(pid, [])
        if group or reading is not None:
            if group:
                clock.advance_to(max(s.end_ns for s in group))
            if reading is None:
                engine.add_spans(pid, group)
            else:
                engine.add_spans(pid, group, reading)
            if every is not None:
                every(clock.now_ns)

    for s in spans:
        while upcoming is not None and upcoming.after <= n:
            flush(upcoming.pid, upcoming.sample)
            upcoming = next(readings, None)
        group = pending.setdefault(s.pid, [])
        group.append(s)
        n += 1
        if len(group) >= batch and s.pid not in read:
            flush(s.pid)
    while upcoming is not None:
        flush(upcoming.pid, upcoming.sample)
        upcoming = next(readings, None)
    for pid in list(pending):
        flush(pid)
    return n
