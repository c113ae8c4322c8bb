"""Screens pushed over the dashboard: help, alert detail, series detail, picker, history."""

from __future__ import annotations

import json
from typing import Any, ClassVar

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Input, Label, Static

from prism_tui.dashboard_view import DashboardView
from prism_tui.engine.sketches import SeriesKey
from prism_tui.engine.view import WINDOWS_S, AlertRecord, Candidate
from prism_tui.history.query import history_report_async
from prism_tui.history.store import HistoryError
from prism_tui.ui.control import EngineControl
from prism_tui.ui.render import fmt_clock, fmt_ms, fmt_rate, fmt_share, sparkline

HELP_KEYS: tuple[tuple[str, str], ...] = (
    ("q / ctrl+c", "quit (probes are detached first)"),
    ("?", "this help"),
    ("/", "filter rows by stage or device (Enter keeps, Esc clears)"),
    ("p", "pause: freeze the view; data is still collected"),
    ("s", "sort: stage, device, p99, share, rate"),
    ("w", "window: 10 s, 1 min, 5 min"),
    ("f", "phase: decode / prefill / mixed"),
    ("1-4", "bottom pane: alerts, iterations, detector, telemetry"),
    ("Enter", "details of the selected row or alert"),
    ("Esc", "back / close"),
    ("Tab", "move focus between the table and the panes"),
    ("a", "process picker: attach and detach"),
    ("h", "history from the SQLite database"),
    ("e", "export the last seconds of spans as a Chrome/Perfetto trace"),
    ("ctrl+s / S", "save an SVG screenshot"),
    ("t", "toggle light / dark theme"),
    ("ctrl+p", "command palette"),
)


class HelpScreen(ModalScreen[None]):
    """The keys, what they do."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,question_mark", "dismiss", "Close"),
    ]

    def compose(self) -> ComposeResult:
        """A table of keys in a box."""
        table = Table(box=None, padding=(0, 1), show_header=False)
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for key, what in HELP_KEYS:
            table.add_row(key, what)
        with VerticalScroll(id="help-box", classes="dialog"):
            yield Label("LatencyPrism — keys", classes="dialog-title")
            yield Static(table)
            yield Label("Esc closes", classes="dim")


class AlertDetailScreen(ModalScreen[None]):
    """One alert: every field and its root-cause suspects."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q", "dismiss", "Back")]

    def __init__(self, alert: AlertRecord) -> None:
        super().__init__()
        self.alert = alert

    def compose(self) -> ComposeResult:
        """Fields, then the suspects table."""
        a = self.alert
        fields = Table(box=None, padding=(0, 1), show_header=False)
        fields.add_column(style="bold", no_wrap=True)
        fields.add_column()
        status = Text(a.status, style="bold red" if a.status == "firing" else "green")
        for name, value in (
            ("status", status), ("severity", a.severity), ("time (UTC)", fmt_clock(a.wall_time)),
            ("series", f"{a.stage} on {a.device} ({a.phase}), pid {a.pid}"),
            ("observed", f"{fmt_ms(a.observed_ms)} ms"),
            ("predicted", f"{fmt_ms(a.predicted_ms)} ms" if a.predicted_ms is not None
             else "–"),
            ("error / UCL", f"{a.error:.3f} / {a.ucl:.3f}"),
            ("delivery", a.delivery), ("source", a.source), ("fingerprint", a.fingerprint),
            ("id", a.id),
        ):
            fields.add_row(name, value)
        with VerticalScroll(id="alert-box", classes="dialog"):
            yield Label(f"Alert: {a.summary}", classes="dialog-title")
            yield Static(fields)
            yield Label("Root-cause suspects", classes="section")
            yield Static(suspects_table(self.alert), id="suspects")
            yield Label("Esc back", classes="dim")


def suspects_table(alert: AlertRecord) -> RenderableType:
    """Suspects ranked by score (stage, device, metric, score, change of share)."""
    if not alert.suspects:
        return Text("no suspects (resolved alerts and short baselines have none)", style="dim")
    table = Table(box=None, padding=(0, 1))
    for col in ("#", "stage", "device", "metric", "score", "Δshare"):
        table.add_column(col, justify="right" if col in ("#", "score", "Δshare") else "left")
    for i, s in enumerate(alert.suspects, 1):
        delta = s.get("delta_share")
        table.add_row(str(i), str(s.get("stage", "")), str(s.get("device", "")),
                      str(s.get("metric", "")), f"{float(s.get('score', 0.0)):.3f}",
                      "–" if delta is None else f"{float(delta) * 100:+.1f}%")
    return table


class SeriesDetailScreen(ModalScreen[None]):
    """One (stage, device): quantiles over every window and the p99 trend."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q", "dismiss", "Back")]

    def __init__(self, view: DashboardView, stage: str, device: str, phase: str) -> None:
        super().__init__()
        self.view, self.stage, self.device, self.phase = view, stage, device, phase

    def compose(self) -> ComposeResult:
        """A row per window and the sparkline of the shortest."""
        table = Table(box=None, padding=(0, 1))
        for col in ("window", "count", "rate/s", "p50", "p90", "p99", "p99.9", "max", "share"):
            table.add_column(col, justify="left" if col == "window" else "right")
        trend = ""
        for span in WINDOWS_S:
            snap = self.view.snapshot(span)
            r = snap.get(self.stage, self.device, self.phase) if snap else None
            label = f"{span:.0f} s" if span < 60 else f"{span / 60:.0f} min"
            if r is None:
                table.add_row(label, "0", *(["–"] * 7))
                continue
            trend = trend or sparkline(r.sparkline, 30)
            table.add_row(label, str(r.count), fmt_rate(r.rate), fmt_ms(r.p50), fmt_ms(r.p90),
                          fmt_ms(r.p99), fmt_ms(r.p999), fmt_ms(r.max), fmt_share(r.share))
        with Vertical(id="series-box", classes="dialog"):
            yield Label(f"{self.stage} on {self.device} ({self.phase})",
                        classes="dialog-title")
            yield Static(table)
            yield Label(f"p99 per second: {trend}")
            yield Label("Esc back", classes="dim")


class PickerScreen(Screen[None]):
    """Inference-like processes: Enter/a attaches, d detaches, r refreshes."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("a", "attach", "Attach"),
        Binding("d", "detach", "Detach"),
        Binding("r", "refresh", "Refresh"),
    ]

    def __init__(self, control: EngineControl) -> None:
        super().__init__()
        self.control = control
        self.candidates: list[Candidate] = []

    def compose(self) -> ComposeResult:
        """Title, table, result line, footer."""
        yield Label("Process picker — inference-like processes", classes="dialog-title")
        table: DataTable[str] = DataTable(id="picker", cursor_type="row", zebra_stripes=True)
        yield table
        yield Label("", id="picker-status")
        yield Footer()

    def on_mount(self) -> None:
        """Columns, then the first listing."""
        table = self.query_one("#picker", DataTable)
        table.add_column("pid", key="pid", width=8)
        table.add_column("watched", key="watched", width=8)
        table.add_column("name", key="name", width=14)
        table.add_column("command line", key="cmdline")
        self.action_refresh()

    def _status(self, text: str, error: bool = False) -> None:
        label = self.query_one("#picker-status", Label)
        label.update(Text(text, style="bold red" if error else "green"))

    def action_refresh(self) -> None:
        """List the candidates again (in a thread: it reads /proc)."""
        self._load()

    @work(thread=True, exclusive=True, group="picker")
    def _load(self) -> None:
        try:
            cands = list(self.control.candidates())
        except Exception as exc:  # the engine's own error types; one line
            self.app.call_from_thread(self._status, f"cannot list processes: {exc}", True)
            return
        self.app.call_from_thread(self._fill, cands)

    def _fill(self, cands: list[Candidate]) -> None:
        table = self.query_one("#picker", DataTable)
        row = table.cursor_row
        table.clear()
        for c in cands:
            table.add_row(str(c.pid), "yes" if c.watched else "", c.name, c.cmdline,
                          key=str(c.pid))
        self.candidates = cands
        if cands:
            table.move_cursor(row=min(max(row, 0), len(cands) - 1), animate=False)

    def selected(self) -> Candidate | None:
        """The candidate under the cursor."""
        row = self.query_one("#picker", DataTable).cursor_row
        return self.candidates[row] if 0 <= row < len(self.candidates) else None

    @on(DataTable.RowSelected, "#picker")
    def _enter(self, _: DataTable.RowSelected) -> None:
        self.action_attach()

    def action_attach(self) -> None:
        """Attach to the selected process."""
        c = self.selected()
        if c is not None:
            self._act("attach", c)

    def action_detach(self) -> None:
        """Detach from the selected process."""
        c = self.selected()
        if c is not None:
            self._act("detach", c)

    @work(thread=True, group="picker-act")
    def _act(self, what: str, c: Candidate) -> None:
        try:
            if what == "attach":
                err = self.control.attach(c.pid)
            else:
                self.control.detach(c.pid)
                err = None
        except Exception as exc:  # one line, never a traceback
            err = str(exc) or type(exc).__name__
        if err:
            self.app.call_from_thread(self._status, err, True)
        else:
            done = "attached to" if what == "attach" else "detached from"
            self.app.call_from_thread(self._status, f"{done} {c.pid} ({c.name})")
        self._load()


class HistoryScreen(Screen[None]):
    """Quantiles over time and alerts from the SQLite history (queries run in a worker)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
    ]

    def __init__(self, db: str) -> None:
        super().__init__()
        self.db = db
        self.report: dict[str, Any] | None = None
        """The last query's result (``prism history --json``'s document)."""

    def compose(self) -> ComposeResult:
        """Range and series inputs, the chart, the alerts."""
        yield Label(f"History — {self.db}", classes="dialog-title")
        with Horizontal(id="history-form"):
            yield Input("1h", placeholder="since (15m, 2h, RFC 3339)", id="since")
            yield Input("", placeholder="until (now)", id="until")
            yield Input("", placeholder="stage (all)", id="stage")
            yield Input("", placeholder="device (all)", id="device")
        yield Static("Enter runs the query", id="history-chart")
        alerts: DataTable[str] = DataTable(id="history-alerts", cursor_type="row")
        yield alerts
        yield Footer()

    def on_mount(self) -> None:
        """Columns, then the default query (the last hour)."""
        table = self.query_one("#history-alerts", DataTable)
        for col, width in (("at", 20), ("status", 8), ("severity", 8), ("stage", 10),
                           ("device", 7), ("summary", 60)):
            table.add_column(col, key=col, width=width)
        self.run_query()

    @on(Input.Submitted)
    def _submitted(self, _: Input.Submitted) -> None:
        self.run_query()

    def run_query(self) -> None:
        """Start the query in a worker (replacing one still running)."""
        values = {i.id or "": i.value.strip() for i in self.query(Input)}
        self.query_one("#history-chart", Static).update(Text("querying…", style="dim"))
        self._query(values)

    @work(exclusive=True, group="history", exit_on_error=False)
    async def _query(self, values: dict[str, str]) -> None:
        try:
            report = await history_report_async(
                self.db, values.get("since") or "1h", values.get("until") or None,
                values.get("stage") or None, values.get("device") or None)
        except HistoryError as exc:
            self.report = None
            self.query_one("#history-chart", Static).update(Text(str(exc), style="bold red"))
            return
        self.report = report
        self.query_one("#history-chart", Static).update(history_chart(report))
        table = self.query_one("#history-alerts", DataTable)
        table.clear()
        for item in report["alerts"]:
            a = item.get("alert", {})
            table.add_row(item["at"][:19], str(a.get("status", "")), str(a.get("severity", "")),
                          str(a.get("stage", "")), str(a.get("device", "")),
                          str(a.get("summary", json.dumps(a)[:60])))


def history_chart(report: dict[str, Any]) -> RenderableType:
    """One line per series: p99 over the range as a sparkline, with its total quantiles."""
    series = report["series"]
    if not series:
        return Text(f"no windows between {report['since']} and {report['until']}",
                    style="yellow")
    table = Table(box=None, padding=(0, 1))
    table.add_column("series", no_wrap=True)
    table.add_column("count", justify="right")
    table.add_column("p50", justify="right")
    table.add_column("p99", justify="right")
    table.add_column("max", justify="right")
    table.add_column(f"p99 every {report['step_s']:g} s", no_wrap=True)
    for s in series:
        total = s["total"]
        key = SeriesKey(s["stage"], s["device"], s["phase"])
        table.add_row(key.name, str(total["count"]), fmt_ms(total["p50"]), fmt_ms(total["p99"]),
                      fmt_ms(total["max"]), sparkline([p["p99"] for p in s["points"]], 40))
    return table
