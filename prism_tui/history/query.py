"""``prism history``: quantiles over time from merged window digests, and alerts.

Times given by the user are wall-clock: durations (``90s``, ``15m``, ``2h``, ``1d``,
meaning "that long before now") or RFC 3339 timestamps with an offset
(``2026-01-02T03:04:05Z``). Stored windows carry a wall-clock column (see
:mod:`prism_tui.history.store`), so "the last hour" works across monitor restarts.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import time
from datetime import datetime, timezone
from typing import Any

from prism_tui.engine.sketches import SeriesKey
from prism_tui.history.store import HistoryError, HistoryStore

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_S = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_STEPS = (1, 5, 10, 30, 60, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600, 86400, 7 * 86400)
MAX_POINTS = 60


def parse_duration(text: str) -> float:
    """``90s``/``15m``/``2h``/``1d``/``1w`` (a bare number is seconds) → seconds."""
    m = _DURATION.match(text)
    if m is None:
        raise HistoryError(f"bad duration {text!r}: use a number and a unit, e.g. 90s, 15m, "
                           "2h, 1d")
    return float(m.group(1)) * _UNIT_S[m.group(2) or "s"]


def parse_time(text: str, now_ns: int) -> int:
    """A duration before ``now_ns`` or an RFC 3339 timestamp → wall-clock ns."""
    if _DURATION.match(text):
        return now_ns - int(parse_duration(text) * 1e9)
    raw = text.strip()
    iso = raw[:-1] + "+00:00" if raw.endswith(("Z", "z")) else raw
    try:
        dt = datetime.fromisoformat(iso.replace(" ", "T", 1))
    except ValueError:
        raise HistoryError(f"bad time {text!r}: use a duration (15m, 2h, 1d) or RFC 3339 "
                           "(2026-01-02T03:04:05Z)") from None
    if dt.tzinfo is None:
        raise HistoryError(f"bad time {text!r}: an RFC 3339 time needs an offset "
                           "(Z or +HH:MM)")
    return int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000


def rfc3339(ns: int) -> str:
    """Wall-clock ns → RFC 3339 UTC with microseconds."""
    dt = datetime.fromtimestamp(ns // 1_000_000_000, tz=timezone.utc)
    dt = dt.replace(microsecond=(ns % 1_000_000_000) // 1000)
    return dt.isoformat().replace("+00:00", "Z")


def pick_step(range_s: float, max_points: int = MAX_POINTS) -> int:
    """The smallest round step giving at most ``max_points`` buckets."""
    for step in _STEPS:
        if range_s / step <= max_points:
            return step
    return math.ceil(range_s / max_points)


async def history_report_async(
    path: str | os.PathLike[str], since: str | None = "1h", until: str | None = None,
    stage: str | None = None, device: str | None = None, *, phase: str | None = None,
    step_s: float | None = None, now_ns: int | None = None,
) -> dict[str, Any]:
    """What ``prism history`` prints (see :func:`history_report`)."""
    now = time.time_ns() if now_ns is None else now_ns
    since_ns = parse_time(since or "1h", now)
    until_ns = now if until is None else parse_time(until, now)
    if until_ns <= since_ns:
        raise HistoryError(f"empty time range: --since {since} is not before --until {until}")
    step = step_s if step_s is not None else pick_step((until_ns - since_ns) / 1e9)
    async with HistoryStore(path, create=False) as store:
        totals = await store.quantiles(stage=stage, device=device, phase=phase,
                                       since_ns=since_ns, until_ns=until_ns)
        points = await store.quantiles(stage=stage, device=device, phase=phase,
                                       since_ns=since_ns, until_ns=until_ns, step_s=step)
        alerts = await store.alerts(since_ns, until_ns)
    series: dict[str, dict[str, Any]] = {}
    for row in totals:
        key = SeriesKey.parse(row.series)
        st, dev, ph = key.stage, key.device, key.phase
        d = row.as_dict()
        del d["series"], d["start_ns"]
        series[row.series] = {"series": row.series, "stage": st, "device": dev, "phase": ph,
                              "total": d, "points": []}
    for row in points:
        d = row.as_dict()
        del d["series"]
        d["start"] = rfc3339(row.start_ns)
        series[row.series]["points"].append(d)
    return {
        "db": str(path),
        "since": rfc3339(since_ns),
        "until": rfc3339(until_ns),
        "since_ns": since_ns,
        "until_ns": until_ns,
        "step_s": step,
        "filter": {"stage": stage, "device": device, "phase": phase},
        "series": list(series.values()),
        "alerts": [{"at": rfc3339(a["at_ns"]), **a} for a in alerts],
    }


def history_report(
    path: str | os.PathLike[str], since: str | None = "1h", until: str | None = None,
    stage: str | None = None, device: str | None = None, *, phase: str | None = None,
    step_s: float | None = None, now_ns: int | None = None,
) -> dict[str, Any]:
    """Quantiles over time (per series: a total and points per step) and alerts in range.

    ``since`` (default 1h) and ``until`` (default now): durations before now or RFC 3339.
    Raises :class:`HistoryError` (``exit_code`` 2) for a missing/corrupt file or bad
    input. Runs its own event loop: from async code use :func:`history_report_async`.
    """
    return asyncio.run(history_report_async(path, since, until, stage, device, phase=phase,
                                            step_s=step_s, now_ns=now_ns))
