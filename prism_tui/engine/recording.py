"""Spans saved to and replayed from a file (gzip JSON lines), for offline analysis and tests.

The first line is a header (format version, processes with their profile, anchor,
stage map and device); then one span per line (captured arguments are numbers).
Replaying a recording through :class:`~prism_tui.engine.core.Engine` with a clock that
follows the spans gives the iterations, sketches and alerts of the live run, which makes
the engine and the dashboard testable without probes.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from prism_tui.engine.iterations import SpanLike

FORMAT = 1


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


class RecordingError(ValueError):
    """A file that is not a span recording (the message says where it broke)."""


def save_spans(path: str, processes: Iterable[RecordedProcess],
               spans: Iterable[SpanLike]) -> int:
    """Write a recording; returns the number of spans written."""
    n = 0
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        header = {"format": FORMAT, "processes": [
            {"pid": p.pid, "name": p.name, "profile": p.profile, "anchor": p.anchor,
             "device": p.device, "stage_of": dict(p.stage_of)} for p in processes]}
        fh.write(json.dumps(header) + "\n")
        for s in spans:
            args = dict(s.args)
            fh.write(json.dumps([s.probe, s.pid, s.tid, s.start_ns, s.end_ns, args]) + "\n")
            n += 1
    return n


def load_spans(path: str) -> tuple[list[RecordedProcess], list[RecordedSpan]]:
    """The processes of a recording and its spans, in file order."""
    spans: list[RecordedSpan] = []
    lineno = 1
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            header = json.loads(fh.readline())
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise RecordingError(f"{path}: not a span recording of format {FORMAT}")
            procs = [RecordedProcess(p["pid"], p["name"], p["profile"], p["anchor"],
                                     p["device"], MappingProxyType(dict(p["stage_of"])))
                     for p in header["processes"]]
            for lineno, line in enumerate(fh, start=2):
                probe, pid, tid, start, end, args = json.loads(line)
                if not all(isinstance(v, (int, float)) for v in args.values()):
                    raise RecordingError(f"{path}:{lineno}: arguments must be numbers")
                spans.append(RecordedSpan(probe, pid, tid, start, end,
                                          MappingProxyType(args)))
    except RecordingError:
        raise
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RecordingError(f"{path}:{lineno}: not a span recording ({exc})") from None
    return procs, spans


class ReplayClock:
    """A CLOCK_MONOTONIC stand-in that follows the replayed spans (DESIGN.md rule 7)."""

    def __init__(self, start_ns: int = 0) -> None:
        self.now_ns = start_ns

    def __call__(self) -> int:
        return self.now_ns

    def advance_to(self, t_ns: int) -> None:
        """Move forward to ``t_ns`` (never backwards)."""
        self.now_ns = max(self.now_ns, t_ns)


class _Feed(Protocol):
    def watch(self, pid: int, name: str, anchor: str, stage_of: Mapping[str, str], *,
              profile: str = ..., device: str = ...) -> None: ...

    def add_spans(self, pid: int, spans: Sequence[SpanLike]) -> Any: ...


def replay(engine: _Feed, clock: ReplayClock, processes: Iterable[RecordedProcess],
           spans: Iterable[RecordedSpan], *, batch: int = 64,
           every: Callable[[int], None] | None = None) -> int:
    """Feed a recording to an engine built on ``clock``, in batches as a ring would deliver.

    ``every(now_ns)`` runs after each batch (to take views at replayed times). Returns
    the number of spans fed.
    """
    for p in processes:
        engine.watch(p.pid, p.name, p.anchor, p.stage_of, profile=p.profile, device=p.device)
    pending: dict[int, list[RecordedSpan]] = {}
    n = 0

    def flush(pid: int) -> None:
        group = pending.pop(pid, [])
        if group:
            clock.advance_to(max(s.end_ns for s in group))
            engine.add_spans(pid, group)
            if every is not None:
                every(clock.now_ns)

    for s in spans:
        group = pending.setdefault(s.pid, [])
        group.append(s)
        n += 1
        if len(group) >= batch:
            flush(s.pid)
    for pid in list(pending):
        flush(pid)
    return n
