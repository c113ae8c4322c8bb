"""The engine's closed windows as digest messages (schema in :mod:`alerting.digests`).

:class:`DigestFeed` follows the engine's sketches with the history writer's cursor
pattern (``closed_windows_since`` then ``closed_until_ns``): every closed window is sent
once. At most once a second (on the engine's clock) it builds one plain dict per target
with one entry per series: the windows that series closed since the last message,
merged when there are several (after a stall), so a series is on the wire at most once
a second. The dicts are schema 2 (each entry's centroids as ``means``/``weights``
arrays, packed by :func:`alerting.digests.encode`); the alerting package publishes
them and never sees the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from alerting.digests import DIGEST_SCHEMA_VERSION, series_centroids
from prism_tui.engine.core import Engine
from prism_tui.engine.sketches import SeriesKey, Window, merge_digests
from prism_tui.engine.view import TargetStatus

PUBLISH_EVERY_S = 1.0


class DigestFeed:
    """Turns newly closed windows into digest messages, handed to ``send(key, doc)``.

    Args:
        engine: whose sketches are followed (its ``clock`` paces the feed).
        send: takes a target key (``name-pid``) and its message dict.
        every_s: the least time between two messages of one target.
    """

    def __init__(self, engine: Engine, send: Callable[[str, dict[str, Any]], None],
                 every_s: float = PUBLISH_EVERY_S) -> None:
        self.engine = engine
        self.send = send
        self.every_ns = int(every_s * 1e9)
        self._cursor: int | None = None
        self._last_ns: int | None = None
        self.sent = 0
        """Messages handed to ``send``."""

    def poll(self, targets: Sequence[TargetStatus], now_ns: int | None = None) -> int:
        """Send what closed since the last message when ``every_s`` has passed; returns
        the number of messages sent. ``targets``: the view's, to name each series' owner."""
        now = self.engine.clock() if now_ns is None else now_ns
        if self._last_ns is not None and now - self._last_ns < self.every_ns:
            return 0
        sketches = self.engine.sketches
        sketches.tick(now)
        until = sketches.closed_until_ns
        if until is None:
            return 0
        windows = sketches.closed_windows_since(
            self._cursor if self._cursor is not None else -(2**63))
        self._cursor = until
        if not windows:
            return 0
        self._last_ns = now
        owner = _owners(targets)
        by_target: dict[int, dict[SeriesKey, list[Window]]] = {}
        for w in windows:
            t = owner.get(w.key.device)
            if t is not None:
                by_target.setdefault(t.pid, {}).setdefault(w.key, []).append(w)
        wall_offset = self.engine.wall_clock() - now / 1e9
        published_at = self.engine.wall_clock()
        sent = 0
        for t in targets:
            series = by_target.get(t.pid)
            if not series:
                continue
            doc = {"schema": DIGEST_SCHEMA_VERSION, "host": self.engine.host,
                   "target": {"pid": t.pid, "name": t.name, "profile": t.profile},
                   "published_at": round(published_at, 6),
                   "series": [entry for key, ws in sorted(series.items())
                              if (entry := _entry(key, ws, wall_offset)) is not None]}
            self.send(f"{t.name}-{t.pid}", doc)
            sent += 1
        self.sent += sent
        return sent


def _owners(targets: Sequence[TargetStatus]) -> dict[str, TargetStatus]:
    """Per device, the target its series go with: the lowest pid on it (a series is
    sent once, so merging hosts' messages never counts a value twice)."""
    out: dict[str, TargetStatus] = {}
    for t in sorted(targets, key=lambda t: t.pid):
        out.setdefault(t.device, t)
    return out


def _entry(key: SeriesKey, windows: list[Window],
           wall_offset: float) -> dict[str, Any] | None:
    """One series' windows as one entry (their digests merged when several); None when
    they hold no value (a closed window always holds one)."""
    digest = windows[0].digest if len(windows) == 1 else merge_digests(
        w.digest for w in windows)
    if digest is None:
        return None
    start, end = windows[0].start_ns, windows[-1].end_ns
    return {"stage": key.stage, "phase": key.phase, "device": key.device,
            "start_ns": start, "end_ns": end, "start": round(start / 1e9 + wall_offset, 6),
            "count": sum(w.count for w in windows), "sum_ms": sum(w.sum for w in windows),
            "min_ms": min(w.min for w in windows), "max_ms": max(w.max for w in windows),
            **series_centroids(digest)}
