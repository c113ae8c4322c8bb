"""Pure text rendering for the dashboard: numbers, sparklines, stacked bars, charts.

No widgets and no Textual here (only Rich ``Text``), so every function is deterministic
and cheap to test; the widgets call these with the data of the view they show.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timezone

from rich.text import Text

BLOCKS = " ▁▂▃▄▅▆▇█"
"""Eighth-height blocks: index 0 is empty, 8 is a full cell."""

STAGE_COLOURS = (
    "#4e9a06", "#3465a4", "#c4a000", "#75507b", "#06989a", "#ce5c00",
    "#cc0000", "#8ae234", "#729fcf", "#ad7fa8", "#fcaf3e", "#34e2e2",
)
"""Colours of stages in stacked bars (cycled; the same stage keeps its colour)."""

STAGE_GLYPHS = "█▓▒░▚▞"
"""Glyphs alternated in stacked bars so stages stay distinguishable without colour."""


def fmt_ms(value: float | None) -> str:
    """A latency in ms in at most 6 characters (``0.123``, ``12.34``, ``123.4``, ``12.3s``)."""
    if value is None or not math.isfinite(value):
        return "–"
    if value < 1:
        return f"{value:.3f}"
    if value < 10:
        return f"{value:.2f}"
    if value < 1000:
        return f"{value:.1f}"
    if value < 10_000:
        return f"{value:.0f}"
    return f"{value / 1000:.1f}s"


def fmt_rate(value: float) -> str:
    """A rate per second in at most 5 characters (``9.5``, ``120``, ``2.4k``, ``1.2M``)."""
    if not math.isfinite(value):
        return "–"
    if value < 10:
        return f"{value:.1f}"
    if value < 1000:
        return f"{value:.0f}"
    if value < 1_000_000:
        return f"{value / 1000:.1f}k"
    return f"{value / 1e6:.1f}M"


def fmt_share(share: float | None) -> str:
    """A share of the iteration as a percentage (``42%``), ``–`` when unknown."""
    if share is None or not math.isfinite(share):
        return "–"
    return f"{share * 100:.0f}%"


def fmt_clock(epoch_s: float) -> str:
    """Epoch seconds as ``HH:MM:SS`` UTC (the alert feed's clock column)."""
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).strftime("%H:%M:%S")


def sparkline(values: Sequence[float | None], width: int, *, lo: float | None = None,
              hi: float | None = None) -> str:
    """The last ``width`` values as eighth-blocks scaled to ``[lo, hi]``; None is a space."""
    tail = list(values)[-width:] if width > 0 else []
    present = [v for v in tail if v is not None and math.isfinite(v)]
    if not present:
        return " " * len(tail)
    low = min(present) if lo is None else lo
    high = max(present) if hi is None else hi
    span = high - low
    out = []
    for v in tail:
        if v is None or not math.isfinite(v):
            out.append(" ")
        elif span <= 0:
            out.append(BLOCKS[4])
        else:
            level = 1 + round((min(max(v, low), high) - low) / span * 7)
            out.append(BLOCKS[level])
    return "".join(out)


def stage_colour(stage: str, order: Sequence[str]) -> str:
    """The colour of ``stage`` given the ordered list of stages shown."""
    idx = order.index(stage) if stage in order else len(order)
    return STAGE_COLOURS[idx % len(STAGE_COLOURS)]


def stacked_bar(shares: Sequence[tuple[str, float]], width: int, order: Sequence[str]) -> Text:
    """A bar ``width`` cells wide split by stage share (largest remainders; rest is blank)."""
    if width <= 0:
        return Text()
    total = sum(max(0.0, s) for _, s in shares)
    scale = 1.0 if total <= 1.0 else 1.0 / total
    exact = [(stage, max(0.0, s) * scale * width) for stage, s in shares]
    cells = [int(x) for _, x in exact]
    target = min(width, round(sum(x for _, x in exact)))
    rest = sorted(range(len(exact)), key=lambda i: exact[i][1] - cells[i], reverse=True)
    for i in rest[: max(0, target - sum(cells))]:
        cells[i] += 1
    bar = Text()
    for (stage, _), n in zip(exact, cells, strict=True):
        if n:
            idx = order.index(stage) if stage in order else len(order)
            bar.append(STAGE_GLYPHS[idx % len(STAGE_GLYPHS)] * n,
                       style=stage_colour(stage, order))
    used = sum(cells)
    if used < width:
        bar.append("·" * (width - used), style="dim")
    return bar


def legend(order: Sequence[str]) -> Text:
    """``█ host ▓ launch ...`` in the stages' colours."""
    text = Text()
    for i, stage in enumerate(order):
        if i:
            text.append(" ")
        text.append(STAGE_GLYPHS[i % len(STAGE_GLYPHS)], style=stage_colour(stage, order))
        text.append(f" {stage}")
    return text


def level_chart(values: Sequence[float], width: int, limit: float | None = None,
                *, hi: float | None = None) -> Text:
    """One row of blocks from 0 to ``hi``; cells above ``limit`` are red (error vs UCL)."""
    tail = list(values)[-width:] if width > 0 else []
    top = hi if hi is not None else max([*tail, limit or 0.0, 1e-9])
    text = Text()
    for v in tail:
        level = 0 if top <= 0 else min(8, max(0, round(v / top * 8)))
        char = BLOCKS[level] if level else "▁"
        style = "bold red" if limit is not None and v > limit else "green"
        text.append(char, style=style)
    return text
