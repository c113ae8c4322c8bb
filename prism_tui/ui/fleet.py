"""``prism fleet``'s dashboard: every host, fleet-wide quantiles, outliers and alerts.

Fed with immutable :class:`FleetView` messages (the newest replaces any still queued, as
in :mod:`prism_tui.ui.app`); Enter on a host opens its drill-down, whose rows come from
the session through :class:`FleetControl` (one host's merge, on demand).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import ClassVar, Protocol

from rich.text import Text
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Label, Static
from textual.worker import Worker

from prism_tui.fleet_view import FleetView, HostSeries
from prism_tui.ui.render import fmt_clock, fmt_ms

FleetFeed = Callable[[Callable[[FleetView], None], asyncio.Event], Awaitable[None]]
"""``await feed(show_view, stop_event)``: follows the broker until ``stop_event`` is set."""


class FleetControl(Protocol):
    """What the drill-down asks of the session."""

    def host_series(self, host: str) -> tuple[HostSeries, ...]:
        """One host's series over the window."""
        ...


class FleetUpdated(Message):
    """A new fleet view; a newer one queued behind it replaces it."""

    def __init__(self, view: FleetView) -> None:
        super().__init__()
        self.view = view

    def can_replace(self, message: Message) -> bool:
        """Any older queued view is superseded by this one."""
        return isinstance(message, FleetUpdated)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


class FleetHeader(Static):
    """Broker, hosts online/offline, series, messages, lag."""

    def show(self, view: FleetView) -> None:
        """Redraw for ``view``."""
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append("LatencyPrism fleet ", style="bold")
        t.append(view.broker, style="cyan")
        offline = len(view.hosts) - view.online
        t.append(f" │ {len(view.hosts)} hosts: ")
        t.append(f"{view.online} online", style="bold green")
        if offline:
            t.append(f", {offline} offline", style="bold red")
        t.append(f" │ {len(view.fleet)} series over {view.window_s:g} s")
        t.append(f" │ {view.messages} msgs")
        if view.lag_p99_s is not None:
            t.append(f" │ lag p99 {view.lag_p99_s:.2f} s")
        if view.rejected:
            t.append(f" │ {view.rejected} rejected", style="yellow")
        self.update(t)


class HostsTable(DataTable[Text | str]):
    """One row per host; Enter drills down."""

    def show(self, view: FleetView) -> None:
        """Rows for ``view``'s hosts (keeps the cursor on the same host)."""
        if not self.columns:
            self.cursor_type = "row"
            self.add_columns("host", "status", "last seen", "targets", "firing")
        current = self.selected()
        self.clear()
        for h in view.hosts:
            status = Text(h.state, style="bold green" if h.state == "online" else "bold red")
            firing = Text(str(h.firing), style="bold red" if h.firing else "dim")
            self.add_row(h.host, status, _age(h.last_seen_s_ago), ",".join(h.targets),
                         firing, key=h.host)
        if current is not None and current in self.rows:
            self.move_cursor(row=self.get_row_index(current))

    def selected(self) -> str | None:
        """The host under the cursor."""
        if not self.row_count:
            return None
        key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        return None if key.value is None else str(key.value)


class FleetTable(DataTable[str]):
    """Fleet-wide quantiles per (profile, stage, phase, device kind)."""

    def show(self, view: FleetView) -> None:
        """Rows for ``view``'s groups."""
        if not self.columns:
            self.cursor_type = "row"
            self.add_columns("profile", "stage", "phase", "dev", "hosts", "p50", "p90", "p99",
                             "p99.9")
        self.clear()
        for r in view.fleet:
            self.add_row(r.profile, r.stage, r.phase, r.device_kind, str(r.hosts),
                         fmt_ms(r.p50), fmt_ms(r.p90), fmt_ms(r.p99), fmt_ms(r.p999))


class OutliersTable(DataTable[Text | str]):
    """The hosts furthest above the fleet's p99."""

    def show(self, view: FleetView) -> None:
        """Rows for ``view``'s outliers."""
        if not self.columns:
            self.cursor_type = "row"
            self.add_columns("host", "stage", "phase", "p99", "fleet p99", "×")
        self.clear()
        for o in view.outliers:
            ratio = Text(f"{o.ratio:.2f}", style="bold red" if o.ratio > 1.2 else "")
            self.add_row(o.host, o.stage, o.phase, fmt_ms(o.p99), fmt_ms(o.fleet_p99), ratio)


class FleetAlerts(DataTable[Text | str]):
    """Every host's alerts, newest first."""

    def show(self, view: FleetView) -> None:
        """Rows for ``view``'s alerts."""
        if not self.columns:
            self.cursor_type = "row"
            self.add_columns("time", "host", "status", "sev", "summary")
        self.clear()
        for a in reversed(view.alerts):
            status = Text(a.status, style="bold red" if a.status == "firing" else "green")
            self.add_row(fmt_clock(a.received_at), a.host, status, a.severity, a.summary)


class HostScreen(Screen[None]):
    """One host: its status and its targets' series over the window."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q", "dismiss", "Back")]

    def __init__(self, host: str, view: FleetView, rows: tuple[HostSeries, ...]) -> None:
        super().__init__()
        self.host = host
        self.view = view
        self.rows = rows

    def compose(self) -> ComposeResult:
        """Status line, series table, alerts of this host."""
        me = next((h for h in self.view.hosts if h.host == self.host), None)
        line = Text(no_wrap=True, overflow="ellipsis")
        line.append(f"{self.host} ", style="bold cyan")
        if me is not None:
            line.append(me.state, style="bold green" if me.state == "online" else "bold red")
            if me.reason:
                line.append(f" ({me.reason})")
            line.append(f" │ last seen {_age(me.last_seen_s_ago)} │ targets: "
                        f"{', '.join(me.targets) or '–'} │ {me.firing} firing")
        yield Static(line, id="host-line")
        table: DataTable[str] = DataTable(id="host-series", cursor_type="row")
        table.add_columns("target", "stage", "phase", "device", "count", "p50", "p90", "p99",
                          "p99.9")
        for r in self.rows:
            table.add_row(r.target, r.stage, r.phase, r.device, str(r.count), fmt_ms(r.p50),
                          fmt_ms(r.p90), fmt_ms(r.p99), fmt_ms(r.p999))
        yield Label(f"Series over the last {self.view.window_s:g} s", classes="section")
        yield table
        alerts: DataTable[str] = DataTable(id="host-alerts", cursor_type="row")
        alerts.add_columns("time", "status", "stage", "device", "summary")
        for a in reversed(self.view.alerts):
            if a.host == self.host:
                alerts.add_row(fmt_clock(a.received_at), a.status, a.stage, a.device,
                               a.summary)
        yield Label("Alerts", classes="section")
        yield alerts
        yield Footer()


class FleetApp(App[int]):
    """The fleet dashboard. Returns 0 on quit, 1 when the feed stopped with an error."""

    CSS_PATH = str(Path(__file__).with_name("fleet.tcss"))
    TITLE = "LatencyPrism fleet"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("p", "pause", "Pause"),
        Binding("t", "toggle_theme", "Theme"),
    ]

    def __init__(self, *, feed: FleetFeed | None = None,
                 control: FleetControl | None = None) -> None:
        super().__init__()
        self.feed = feed
        self.control = control
        self.paused = False
        self.shown: FleetView | None = None
        self.latest: FleetView | None = None
        self.received = 0
        self.feed_error: str | None = None
        self._stop = asyncio.Event()
        self._worker: Worker[None] | None = None

    def compose(self) -> ComposeResult:
        """Header, hosts beside the fleet quantiles, outliers beside alerts, status."""
        yield FleetHeader(id="fleet-header")
        with Horizontal(id="fleet-top"):
            with Vertical(id="hosts-box"):
                yield Label("Hosts (Enter: drill down)", classes="section")
                yield HostsTable(id="hosts")
            with Vertical(id="quantiles-box"):
                yield Label("Fleet quantiles (ms)", classes="section")
                yield FleetTable(id="fleet")
        with Horizontal(id="fleet-bottom"):
            with Vertical(id="outliers-box"):
                yield Label("Furthest above the fleet p99", classes="section")
                yield OutliersTable(id="outliers")
            with Vertical(id="alerts-box"):
                yield Label("Alerts, every host", classes="section")
                yield FleetAlerts(id="fleet-alerts")
        yield Static("waiting for the first view…", id="fleet-status")
        yield Footer()

    def on_mount(self) -> None:
        """Dark theme, focus on the hosts, start the feed."""
        self.theme = "textual-dark"
        self.query_one(HostsTable).focus()
        if self.feed is not None:
            self._worker = self.run_worker(self._run_feed(), name="fleet", group="fleet",
                                           exit_on_error=False)

    def on_unmount(self) -> None:
        """However the app ends, stop the feed."""
        self._stop.set()

    async def _run_feed(self) -> None:
        assert self.feed is not None
        try:
            await self.feed(self.show_view, self._stop)
        except Exception as exc:  # shown, never a traceback
            self.feed_error = f"fleet feed stopped: {exc or type(exc).__name__}"
            self.query_one("#fleet-status", Static).update(Text(self.feed_error, "bold red"))
            return
        if not self._stop.is_set():  # --duration ran out
            self.exit(0, return_code=0)

    def show_view(self, view: FleetView) -> None:
        """Hand a new view to the UI (from the app's loop)."""
        self.post_message(FleetUpdated(view))

    @on(FleetUpdated)
    def _on_view(self, message: FleetUpdated) -> None:
        self.received += 1
        self.latest = message.view
        if not self.paused:
            self._draw(message.view)

    def _draw(self, view: FleetView) -> None:
        self.shown = view
        self.query_one(FleetHeader).show(view)
        self.query_one(HostsTable).show(view)
        self.query_one(FleetTable).show(view)
        self.query_one(OutliersTable).show(view)
        self.query_one(FleetAlerts).show(view)
        status = f"at {fmt_clock(view.at)} UTC" + (" │ PAUSED (p resumes)" if self.paused
                                                   else " │ live")
        if view.last_error:
            status += f" │ last rejected: {view.last_error}"
        self.query_one("#fleet-status", Static).update(status)

    @on(DataTable.RowSelected, "#hosts")
    def _host_selected(self, _: DataTable.RowSelected) -> None:
        host = self.query_one(HostsTable).selected()
        if host is None or self.shown is None:
            return
        rows = self.control.host_series(host) if self.control is not None else ()
        self.push_screen(HostScreen(host, self.shown, rows))

    async def action_quit(self) -> None:
        """Stop the feed (bounded wait), then exit."""
        self._stop.set()
        if self._worker is not None and not self._worker.is_finished:
            try:
                await asyncio.wait_for(self._worker.wait(), 10)
            except (asyncio.TimeoutError, Exception):
                self._worker.cancel()
        code = 1 if self.feed_error else 0
        self.exit(code, return_code=code)

    def action_pause(self) -> None:
        """Freeze (or unfreeze) the view; views are still received."""
        self.paused = not self.paused
        if self.latest is not None:
            self._draw(self.latest)

    def action_toggle_theme(self) -> None:
        """Light ↔ dark."""
        self.theme = "textual-light" if self.theme == "textual-dark" else "textual-dark"
