"""The main screen's widgets; each takes a view in ``show`` and updates itself in place.

Widgets keep what they last drew and change only what differs (cells of a table, the
text of a panel), so a refresh rate of several views per second does not flicker or
rebuild the DOM. None of them mutates a view.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.cells import cell_len
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text
from textual.widget import Widget
from textual.widgets import DataTable, Static

from prism_tui.dashboard_view import DashboardView
from prism_tui.engine.sketches import ITERATION, SeriesStats, Snapshot
from prism_tui.engine.view import (
    AlertRecord,
    DetectorPoint,
    EngineView,
    ProbeStatus,
    SloStatus,
)
from prism_tui.ui.render import (
    fmt_clock,
    fmt_ms,
    fmt_rate,
    fmt_share,
    legend,
    level_chart,
    sparkline,
    stacked_bar,
)

SORTS = ("stage", "device", "p99", "share", "rate")
"""Orders of the prism table (``s`` cycles): by stage, by device, then descending values."""

_QUANTILE_FIELD = {0.5: "p50", 0.9: "p90", 0.99: "p99", 0.999: "p999"}


def _window_label(span_s: float) -> str:
    return f"{span_s:.0f} s" if span_s < 60 else f"{span_s / 60:.0f} min"


def stage_order(stages: Sequence[str]) -> list[str]:
    """``iteration`` first, then the other stages alphabetically."""
    rest = sorted(s for s in set(stages) if s != ITERATION)
    return ([ITERATION] if ITERATION in stages else []) + rest


GOVERNED = ("detached", "duty-cycled")
"""Probe statuses set by the overhead governor (shown as its decisions, not failures)."""


class HeaderBar(Static):
    """Host, targets, probe health and the overhead governor, alert delivery and history
    path (three lines)."""

    def show(self, view: DashboardView) -> None:
        """Redraw for ``view`` (only when the text changed)."""
        lines = [self._targets(view), self._probes(view), self._delivery(view)]
        text = Text("\n").join(lines)
        text.no_wrap, text.overflow = True, "ellipsis"
        if text.plain != self._last:
            self._last = text.plain
            self.update(text)

    _last = ""

    @staticmethod
    def _targets(view: EngineView) -> Text:
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append("LatencyPrism ", style="bold")
        t.append(view.host, style="bold cyan")
        t.append(f" │ {len(view.targets)} target{'s' if len(view.targets) != 1 else ''}:")
        if not view.targets:
            t.append("  no targets yet", style="yellow")
        for tg in view.targets:
            t.append("  ")
            t.append(f"{tg.pid} {tg.name}", style="bold" if tg.state == "attached" else "red")
            t.append(f" [{tg.profile}] {tg.device}")
            if tg.state != "attached":
                t.append(f" {tg.state}", style="bold red")
        return t

    @staticmethod
    def _probes(view: EngineView) -> Text:
        t = Text(no_wrap=True, overflow="ellipsis")
        probes = [p for tg in view.targets for p in tg.probes]
        ok = sum(1 for p in probes if p.status == "attached")
        t.append("probes ")
        t.append(f"{ok}/{len(probes)} attached", style="green" if ok == len(probes) else
                 "yellow")
        hits = sum(tg.hits_per_s for tg in view.targets)
        lost = sum(tg.lost for tg in view.targets)
        t.append(f" · {fmt_rate(hits)} hits/s · lost ")
        t.append(str(lost), style="bold red" if lost else "")
        costs = [tg.overhead_pct for tg in view.targets if tg.overhead_pct is not None]
        t.append(f" · overhead ≈{max(costs):.2f}%" if costs else " · overhead n/a")
        budgets = [tg.governor.budget_pct for tg in view.targets if tg.governor is not None]
        if budgets:
            t.append(f" of {min(budgets):.2f}%")
        if any(not tg.costs_measured for tg in view.targets if tg.overhead_pct is not None):
            t.append(" (default costs)", style="yellow")
        HeaderBar._governor(view, probes, t)
        failed = [p for p in probes if p.status not in ("attached", *GOVERNED)]
        if failed:
            first = failed[0]
            why = f": {first.reason}" if first.reason else ""
            t.append(f" · failed: {first.probe} {first.status}{why}", style="yellow")
            if len(failed) > 1:
                t.append(f" (+{len(failed) - 1})", style="yellow")
        return t

    @staticmethod
    def _governor(view: EngineView, probes: Sequence[ProbeStatus], t: Text) -> None:
        """The governor's latest decision (probe, what it did, its estimated cost)."""
        actions = sorted((a for tg in view.targets if tg.governor is not None
                          for a in tg.governor.decisions), key=lambda a: a.wall_time)
        if not actions:
            return
        last = actions[-1]
        t.append(f" · governor: {last.probe} {last.status} ≈{last.overhead_pct:.2f}%",
                 style="green" if last.status == "restored" else "yellow")
        others = {p.probe for p in probes if p.status in GOVERNED} - {last.probe}
        if others:
            t.append(f" (+{len(others)} governed)", style="yellow")

    @staticmethod
    def _delivery(view: DashboardView) -> Text:
        t = Text(no_wrap=True, overflow="ellipsis")
        d = view.delivery
        colour = {"connected": "green", "connecting": "yellow", "down": "bold red"}.get(
            d.state, "dim")
        t.append("alerts → ")
        t.append(d.broker or "local only", style="bold" if d.broker else "dim")
        t.append(f" {d.state}", style=colour)
        t.append(" · outbox ")
        t.append(str(d.pending), style="bold yellow" if d.pending else "")
        if d.last_error and d.state != "connected":
            t.append(f" ({d.last_error})", style="red")
        t.append(" │ history ")
        t.append(view.history_path or "off", style="dim" if not view.history_path else "")
        return t


@dataclass(frozen=True)
class TableState:
    """What the prism table shows: window, phase, sort order and filter text."""

    window_s: float = 10.0
    phase: str = "decode"
    sort: str = "stage"
    filter: str = ""


_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("stage", "stage", 12), ("device", "device", 7), ("rate", "rate/s", 7),
    ("p50", "p50", 6), ("p90", "p90", 6), ("p99", "p99", 6), ("p999", "p99.9", 6),
    ("max", "max", 6), ("slo", "SLO", 5), ("share", "share", 6), ("spark", "p99 trend", 0),
)
_LEFT = {"stage", "device", "spark"}
SPARK_MIN, SPARK_MAX = 10, 30


class PrismTable(DataTable[RenderableType]):
    """Rows per (stage, device) of the selected phase; a row is redrawn only if it changed.

    Each row is one pre-formatted line (one DataTable column): a change anywhere makes a
    DataTable re-render every visible cell, so fewer, wider cells keep an update cheap
    (measured in ``bench/ui_render.py``). Fixed widths, numbers right-aligned with a
    leading gap, fit 80 columns; the p99 trend takes the room that is left (10 to 30 s).
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True, cell_padding=0)
        self._sigs: dict[str, str] = {}
        self._order: tuple[str, ...] = ()
        self._spark_w = SPARK_MIN
        self._last: tuple[DashboardView, TableState, set[tuple[str, str]]] | None = None
        self.rows_shown: tuple[tuple[str, str], ...] = ()
        """The (stage, device) rows in display order (for tests and Enter)."""
        self.cells: dict[tuple[str, str], dict[str, str]] = {}
        """Plain text of every cell shown, by (stage, device) and column key."""

    def on_mount(self) -> None:
        """Create the (single) column once."""
        self._add_column()

    def _widths(self) -> list[int]:
        return [w or self._spark_w + 1 for _, _, w in _COLUMNS]

    def _add_column(self) -> None:
        header = [Text(" " + label if key in _LEFT else label,
                       justify="left" if key in _LEFT else "right")
                  for key, label, _ in _COLUMNS]
        self.add_column(_line(header, self._widths()), key="row", width=sum(self._widths()))

    def on_resize(self) -> None:
        """Give the trend column the width that is left; rebuild only if it changed."""
        fixed = sum(w for _, _, w in _COLUMNS) + 3  # + gap + vertical scrollbar
        spark = max(SPARK_MIN, min(SPARK_MAX, self.size.width - fixed))
        if spark == self._spark_w:
            return
        self._spark_w = spark
        self.clear(columns=True)
        self._order, self._sigs = (), {}
        self._add_column()
        if self._last is not None:
            self.show(*self._last)

    def show(self, view: DashboardView, state: TableState, firing: set[tuple[str, str]]) -> int:
        """Show the snapshot of ``state.window_s``; returns the number of rows redrawn."""
        self._last = (view, state, firing)
        snap = view.snapshot(state.window_s)
        rows = _select(snap, state) if snap is not None else []
        keys = tuple(f"{r.key.stage}|{r.key.device}" for r in rows)
        widths = self._widths()
        cells = {k: _cells(r, view.slos, firing, self._spark_w)
                 for k, r in zip(keys, rows, strict=True)}
        sigs = {k: "\x01".join(_plain(c) for c in v) for k, v in cells.items()}
        changed = 0
        if keys != self._order:
            cursor = self._order[self.cursor_row] if 0 <= self.cursor_row < len(
                self._order) else None
            self.clear()
            for k in keys:
                self.add_row(_line(cells[k], widths), key=k)
            changed = len(keys)
            self._order = keys
            if cursor in keys:
                self.move_cursor(row=keys.index(cursor), animate=False)
        else:
            for k in keys:
                if self._sigs.get(k) != sigs[k]:
                    self.update_cell(k, "row", _line(cells[k], widths))
                    changed += 1
        self._sigs = sigs
        self.rows_shown = tuple((r.key.stage, r.key.device) for r in rows)
        self.cells = {(r.key.stage, r.key.device): {
            col: str(getattr(c, "plain", c)).strip()
            for (col, _, _), c in zip(_COLUMNS, cells[k], strict=True)}
            for k, r in zip(keys, rows, strict=True)}
        return changed

    def selected(self) -> tuple[str, str] | None:
        """The (stage, device) under the cursor."""
        if 0 <= self.cursor_row < len(self.rows_shown):
            return self.rows_shown[self.cursor_row]
        return None


def _line(cells: Sequence[RenderableType], widths: Sequence[int]) -> Text:
    """Cells (single-style texts) padded or cut to their column widths, joined into a line."""
    line = Text(no_wrap=True)
    for cell, width in zip(cells, widths, strict=True):
        if isinstance(cell, Text):
            plain, style, right = cell.plain[:width], cell.style, cell.justify == "right"
        else:
            plain, style, right = str(cell)[:width], "", False
        pad = " " * (width - cell_len(plain))
        if right:
            line.append(pad)
            line.append(plain, style)
        else:
            line.append(plain, style)
            line.append(pad)
    return line


def _plain(cell: RenderableType | str) -> str:
    if isinstance(cell, Text):
        return f"{cell.plain}\x00{cell.style}\x00{[str(s.style) for s in cell.spans]}"
    return str(cell)


def _select(snap: Snapshot, state: TableState) -> list[SeriesStats]:
    rows = [r for r in snap.rows if r.key.phase == state.phase]
    if state.filter:
        needle = state.filter.lower()
        rows = [r for r in rows if needle in r.key.stage.lower() or needle in
                r.key.device.lower()]
    order = stage_order([r.key.stage for r in rows])
    rank = {s: i for i, s in enumerate(order)}
    if state.sort == "device":
        rows.sort(key=lambda r: (r.key.device, rank[r.key.stage]))
    elif state.sort in ("p99", "share", "rate"):
        def value(r: SeriesStats) -> float:
            v = getattr(r, state.sort)
            return -1.0 if v is None else float(v)
        rows.sort(key=lambda r: (-value(r), rank[r.key.stage], r.key.device))
    else:
        rows.sort(key=lambda r: (rank[r.key.stage], r.key.device))
    return rows


def _slo_for(stage: str, slos: Sequence[SloStatus]) -> SloStatus | None:
    for s in slos:
        if s.stage == stage:
            return s
    return None


def _cells(r: SeriesStats, slos: Sequence[SloStatus], firing: set[tuple[str, str]],
           spark_w: int) -> tuple[RenderableType, ...]:
    key = r.key
    slo = _slo_for(key.stage, slos)
    breach_field: str | None = None
    slo_cell: Text = Text(" –", style="dim")
    if slo is not None:
        field = _QUANTILE_FIELD.get(slo.quantile)
        value = getattr(r, field) if field else slo.value_ms
        breached = slo.breached if value is None else value > slo.limit_ms
        slo_cell = Text(" BRCH", style="bold red") if breached else Text(
            " ok", style="green")
        if breached and field:
            breach_field = field
    hot = (key.stage, key.device) in firing
    stage = Text(("▲" if hot else " ") + key.stage,
                 style="bold red" if hot else ("bold" if key.stage == ITERATION else ""))

    def num(field: str, value: float) -> Text:
        style = "bold red" if field == breach_field else ""
        return Text(fmt_ms(value), style=style, justify="right")

    spark_style = "red" if breach_field or hot else "cyan"
    return (
        stage, Text(" " + key.device), Text(fmt_rate(r.rate), justify="right"),
        num("p50", r.p50), num("p90", r.p90), num("p99", r.p99), num("p999", r.p999),
        num("max", r.max), slo_cell,
        Text(fmt_share(r.share) if key.stage != ITERATION else "", justify="right"),
        Text(" " + sparkline(r.sparkline, spark_w), style=spark_style),
    )


class IterationBreakdown(Widget):
    """Stacked bars of stage shares for recent iterations, per device (selected phase)."""

    DEFAULT_CSS = "IterationBreakdown { height: auto; }"

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._view: DashboardView | None = None
        self._phase = "decode"
        self._sig: tuple[object, ...] = ()

    def show(self, view: DashboardView, phase: str) -> None:
        """Draw the iterations of ``view`` (refreshes only when they changed)."""
        sig = (len(view.iterations), view.iterations[-1] if view.iterations else None, phase)
        if sig == self._sig:
            return
        self._sig = sig
        self._view, self._phase = view, phase
        self.refresh()

    def render(self) -> RenderableType:
        """Legend, then per device its last iterations as bars with their latency."""
        view = self._view
        if view is None or not view.iterations:
            return Text("no iterations yet", style="dim")
        bars = [b for b in view.iterations if b.phase == self._phase]
        devices = sorted({b.device for b in bars})
        order = stage_order([s for b in bars for s, _ in b.shares])
        order = [s for s in order if s != ITERATION]
        width = max(10, self.size.width - 18)
        key = legend(order)
        key_lines = -(-len(key.plain) // max(1, self.size.width))
        room = (self.parent.size.height if isinstance(self.parent, Widget) else
                self.size.height) - key_lines
        rows_each = max(1, room // max(1, len(devices)))
        out = Text()
        out.append_text(key)
        for d in devices:
            mine = [b for b in bars if b.device == d][-rows_each:]
            for i, b in enumerate(mine):
                out.append("\n")
                out.append(f"{d:<8}" if i == 0 else " " * 8, style="bold")
                out.append(f"{fmt_ms(b.latency_ms):>7}ms ")
                out.append_text(stacked_bar(b.shares, width, order))
        return out


class DetectorPanel(Widget):
    """Per device: detector state, observed vs predicted, and smoothed error vs UCL."""

    DEFAULT_CSS = "DetectorPanel { height: auto; }"

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._view: DashboardView | None = None
        self._sig: tuple[object, ...] = ()

    def show(self, view: DashboardView) -> None:
        """Draw ``view``'s detector points (refreshes only when they changed)."""
        sig = (len(view.detector), view.detector[-1] if view.detector else None,
               view.detectors)
        if sig == self._sig:
            return
        self._sig = sig
        self._view = view
        self.refresh()

    def render(self) -> RenderableType:
        """Three lines per device: state, the two latencies, the error chart."""
        view = self._view
        if view is None or not (view.detectors or view.detector):
            return Text("no detector yet", style="dim")
        width = max(10, self.size.width - 22)
        out = Text(no_wrap=True, overflow="ellipsis")
        states = {(s.device, s.phase): s for s in view.detectors}
        keys = sorted({(p.device, p.phase) for p in view.detector} | set(states))
        for n, (device, phase) in enumerate(keys):
            pts = [p for p in view.detector if (p.device, p.phase) == (device, phase)]
            st = states.get((device, phase))
            if n:
                out.append("\n")
            out.append(f"{device} {phase} ", style="bold")
            if st is None or st.state == "live":
                firing = (st.firing if st else False) or (pts[-1].firing if pts else False)
                out.append("FIRING" if firing else "live", style="bold white on red" if firing
                           else "green")
            elif st.state == "warming":
                done = st.progress / st.warmup if st.warmup else 0.0
                filled = round(done * 10)
                out.append(f"warming {st.progress}/{st.warmup} ", style="yellow")
                out.append("▰" * filled + "▱" * (10 - filled), style="yellow")
            else:
                out.append(st.state, style="yellow")
            if pts:
                out.append_text(_latest(pts[-1]))
                out.append_text(_charts(pts, width))
        return out


def _latest(p: DetectorPoint) -> Text:
    t = Text()
    t.append(f"  obs {fmt_ms(p.observed_ms)} ms  pred {fmt_ms(p.predicted_ms)} ms  err ")
    t.append(f"{p.smoothed:.3f}", style="bold red" if p.smoothed > p.ucl else "green")
    t.append(f" / UCL {p.ucl:.3f}")
    return t


def _charts(pts: Sequence[DetectorPoint], width: int) -> Text:
    obs = [p.observed_ms for p in pts]
    pred = [p.predicted_ms for p in pts]
    tail = obs[-width:] + pred[-width:]
    lo, hi = min(tail), max(tail)
    t = Text()
    t.append("\n  observed   ", style="dim")
    t.append(sparkline(obs, width, lo=lo, hi=hi), style="magenta")
    t.append("\n  predicted  ", style="dim")
    t.append(sparkline(pred, width, lo=lo, hi=hi), style="blue")
    ucl = pts[-1].ucl
    errs = [p.smoothed for p in pts]
    t.append("\n  error/UCL  ", style="dim")
    t.append_text(level_chart(errs, width, ucl, hi=max(2 * ucl, *errs[-width:])))
    return t


_ALERT_COLUMNS = (("time", "UTC", 9), ("sev", "sev", 5), ("status", "status", 9),
                  ("stage", "stage", 11), ("device", "device", 8), ("delivery", "sent?", 7),
                  ("summary", "summary", 100))
_SEVERITY = {"critical": "crit", "error": "err", "warning": "warn", "info": "info"}


class AlertsFeed(DataTable[RenderableType]):
    """Recent alerts, newest first; Enter opens the selected one."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True, cell_padding=0)
        self._sig: tuple[tuple[str, str], ...] = ()
        self.alerts: tuple[AlertRecord, ...] = ()
        """Alerts in display order (newest first)."""

    def on_mount(self) -> None:
        """Create the columns once."""
        for key, label, width in _ALERT_COLUMNS:
            self.add_column(" " + label, key=key, width=width)

    def show(self, view: DashboardView) -> None:
        """Rebuild only when an alert arrived or its delivery state changed."""
        sig = tuple((a.id, a.delivery) for a in view.alerts)
        if sig == self._sig:
            return
        self._sig = sig
        alerts = tuple(reversed(view.alerts))
        selected = self.selected()
        self.clear()
        for a in alerts:
            sev = {"critical": "bold white on red", "error": "bold red",
                   "warning": "yellow"}.get(a.severity, "")
            status = "bold red" if a.status == "firing" else "green"
            delivery = {"sent": "green", "queued": "yellow"}.get(a.delivery, "dim")
            self.add_row(Text(" " + fmt_clock(a.wall_time)),
                         Text(" " + _SEVERITY.get(a.severity, a.severity[:4]), style=sev),
                         Text(" " + a.status, style=status), Text(" " + a.stage),
                         Text(" " + a.device), Text(" " + a.delivery, style=delivery),
                         Text(" " + a.summary), key=a.id)
        self.alerts = alerts
        ids = [a.id for a in alerts]
        if selected is not None and selected.id in ids:
            self.move_cursor(row=ids.index(selected.id), animate=False)

    def selected(self) -> AlertRecord | None:
        """The alert under the cursor."""
        if 0 <= self.cursor_row < len(self.alerts):
            return self.alerts[self.cursor_row]
        return None


class TelemetryPanel(Static):
    """NVML metrics per device (or CPU figures); unavailable ones say why."""

    _last: tuple[object, ...] | None = None

    def show(self, view: DashboardView) -> None:
        """Redraw when the telemetry changed."""
        if view.telemetry != self._last:
            self._last = view.telemetry
            self.update(telemetry_table(view))


def telemetry_table(view: DashboardView) -> RenderableType:
    """A Rich table: one row per device, one column per metric, reasons below."""
    if not view.telemetry:
        return Text("no telemetry", style="dim")
    metrics: list[str] = []
    units: dict[str, str] = {}
    devices: list[str] = []
    for v in view.telemetry:
        if v.metric not in metrics:
            metrics.append(v.metric)
        units.setdefault(v.metric, v.unit)
        if v.device not in devices:
            devices.append(v.device)
    table = Table(box=None, padding=(0, 1), expand=False, show_edge=False)
    table.add_column("device", style="bold", no_wrap=True)
    for m in metrics:
        table.add_column(f"{m}\n{units[m]}", justify="right", no_wrap=True)
    cells = {(v.device, v.metric): v for v in view.telemetry}
    notes: list[str] = []
    for d in devices:
        row: list[RenderableType] = [d]
        for m in metrics:
            cell = cells.get((d, m))
            if cell is None:
                row.append("")
            elif cell.value is None:
                row.append(Text("n/a", style="dim yellow"))
                notes.append(f"{d} {m}: {cell.reason or 'unavailable'}")
            else:
                row.append(f"{cell.value:.0f}" if abs(cell.value) >= 100 else
                           f"{cell.value:.1f}")
        table.add_row(*row)
    if not notes:
        return table
    group = Table.grid()
    group.add_row(table)
    for n in notes:
        group.add_row(Text(f"n/a: {n}", style="dim"))
    return group


def mode_line(state: TableState) -> str:
    """``10 s · decode · sort stage · filter …`` for the header."""
    parts = [_window_label(state.window_s), state.phase, f"sort {state.sort}"]
    if state.filter:
        parts.append(f"filter '{state.filter}'")
    return " · ".join(parts)
