"""Spans as a Chrome / Perfetto trace (the JSON "Trace Event Format"), for ``e`` in the UI.

Complete events (``ph: X``) with microsecond timestamps on CLOCK_MONOTONIC; one track per
thread, named after its process. Open the file in https://ui.perfetto.dev or
chrome://tracing to see every probed call of the last seconds on a timeline.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from prism_tui.engine.iterations import SpanLike


def chrome_trace(spans: Iterable[SpanLike], names: Mapping[int, str] | None = None,
                 stage_of: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The trace document: one complete event per span, process names as metadata."""
    events: list[dict[str, Any]] = []
    pids: set[int] = set()
    for s in spans:
        pids.add(s.pid)
        event: dict[str, Any] = {
            "name": s.probe, "cat": (stage_of or {}).get(s.probe, "probe"), "ph": "X",
            "ts": s.start_ns / 1000, "dur": max(0, s.end_ns - s.start_ns) / 1000,
            "pid": s.pid, "tid": s.tid,
        }
        if s.args:
            event["args"] = {k: v for k, v in s.args.items()}
        events.append(event)
    for pid in sorted(pids):
        events.append({"name": "process_name", "ph": "M", "pid": pid,
                       "args": {"name": f"{(names or {}).get(pid, 'pid')} {pid}"}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"clock": "CLOCK_MONOTONIC", "source": "LatencyPrism"}}


def write_chrome_trace(spans: Iterable[SpanLike], path: str,
                       names: Mapping[int, str] | None = None) -> str:
    """Write :func:`chrome_trace` to ``path`` atomically (mode 0600); returns the path."""
    doc = chrome_trace(spans, names)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh)
    os.replace(tmp, path)
    return path
