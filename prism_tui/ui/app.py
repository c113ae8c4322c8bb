"""The LatencyPrism dashboard: a Textual app fed with immutable :class:`DashboardView` messages.

The engine (when given) runs in a worker on the app's own loop and calls
:meth:`PrismApp.show_view`; each view becomes a :class:`ViewUpdated` message that
replaces any older one still queued, so a slow terminal shows the newest view instead
of falling behind. Widgets update in place from the view; nothing mutates it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import events, on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.containers import Container, Vertical, VerticalScroll
from textual.message import Message
from textual.notifications import SeverityLevel
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Static, TabbedContent, TabPane
from textual.worker import Worker

from prism_tui.dashboard_view import DashboardView
from prism_tui.engine.view import WINDOWS_S
from prism_tui.ui.control import EngineControl
from prism_tui.ui.screens import (
    AlertDetailScreen,
    HelpScreen,
    HistoryScreen,
    PickerScreen,
    SeriesDetailScreen,
)
from prism_tui.ui.widgets import (
    SORTS,
    AlertsFeed,
    DetectorPanel,
    HeaderBar,
    IterationBreakdown,
    PrismTable,
    TableState,
    TelemetryPanel,
    mode_line,
)

Engine = Callable[[Callable[[DashboardView], None], asyncio.Event], Awaitable[None]]
"""``await engine(show_view, stop_event)``: runs until ``stop_event`` is set."""

PHASES = ("decode", "prefill", "mixed")
PANES = ("alerts", "iterations", "detector", "telemetry")
STOP_TIMEOUT_S = 30.0
WIDE_COLUMNS = 150
"""From this width on, the panes sit beside the table (the table needs ~80 columns)."""
DARK, LIGHT = "textual-dark", "textual-light"


class ViewUpdated(Message):
    """A new engine view; a newer one queued behind it replaces it (no backlog)."""

    def __init__(self, view: DashboardView, seq: int = 0) -> None:
        super().__init__()
        self.view = view
        self.seq = seq
        """Position of the view in the order ``show_view`` was called (from 1)."""

    def can_replace(self, message: Message) -> bool:
        """Any older queued view is superseded by this one."""
        return isinstance(message, ViewUpdated)


class PrismApp(App[int]):
    """The dashboard. Returns 0 on quit, 1 when the engine stopped with an error.

    The engine, when given, runs as a worker on the app's loop; when it returns by itself
    (a ``--duration`` ran out) the app exits; when it raises, the error is shown and the
    app stays until the user quits.
    """

    CSS_PATH = str(Path(__file__).with_name("app.tcss"))
    TITLE = "LatencyPrism"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("question_mark", "help", "Help"),
        Binding("slash", "filter", "Filter"),
        Binding("p", "pause", "Pause"),
        Binding("s", "sort", "Sort"),
        Binding("w", "window", "Window"),
        Binding("f", "phase", "Phase", show=False),
        Binding("a", "picker", "Attach"),
        Binding("h", "history", "History"),
        Binding("e", "export", "Export"),
        Binding("t", "toggle_theme", "Theme"),
        Binding("ctrl+s,S", "save_screenshot", "Screenshot", show=False),
        Binding("1", "pane('alerts')", "Alerts", show=False),
        Binding("2", "pane('iterations')", "Iterations", show=False),
        Binding("3", "pane('detector')", "Detector", show=False),
        Binding("4", "pane('telemetry')", "Telemetry", show=False),
    ]

    export_seconds: float = 30.0
    """How many seconds of spans ``e`` exports."""
    export_dir: str = "."
    """Where ``e`` and the screenshot key write their files."""

    def __init__(self, *, engine: Engine | None = None, control: EngineControl | None = None,
                 history_db: str | None = None, title: str = "LatencyPrism",
                 window_s: float = WINDOWS_S[0]) -> None:
        """``window_s``: the span the table shows first (one of ``WINDOWS_S``; ``w``
        cycles)."""
        super().__init__()
        self.title = title
        self.engine = engine
        self.control = control
        self.history_db = history_db
        self.state = TableState(window_s=window_s)
        self.paused = False
        self.posted = 0
        """Views handed to :meth:`show_view` in total."""
        self.received = 0
        """View messages handled (fewer than posted when newer ones replaced queued ones)."""
        self.rendered = 0
        """Views drawn (fewer than received when paused or when newer ones replaced them)."""
        self.shown: DashboardView | None = None
        """The view on screen."""
        self.latest: DashboardView | None = None
        """The newest view received (differs from ``shown`` while paused)."""
        self.engine_error: str | None = None
        self._shown_seq = 0
        self._latest_seq = 0
        self.last_export: str | None = None
        self.last_screenshot: str | None = None
        self._stop = asyncio.Event()
        self._engine_worker: Worker[None] | None = None
        self._status_text = ""
        self.messages: deque[str] = deque(maxlen=50)
        """The latest notifications, oldest first (what the toasts said)."""
        self._notice = ""

    # -- layout -----------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        """Header, prism table and filter, panes (below, or beside when wide), status, footer."""
        yield HeaderBar(id="header")
        with Container(id="body"):
            with Vertical(id="left"):
                yield PrismTable(id="prism")
                yield Input(placeholder="filter: stage or device (Enter keeps, Esc clears)",
                            id="filter")
            yield from self._panes()
        yield Static("", id="status")
        yield Footer()

    def _panes(self) -> ComposeResult:
        with TabbedContent(id="panes", initial="alerts"):
            with TabPane("Alerts 1", id="alerts"):
                yield AlertsFeed(id="alerts-feed")
            with TabPane("Iterations 2", id="iterations"), VerticalScroll():
                yield IterationBreakdown(id="breakdown")
            with TabPane("Detector 3", id="detector"), VerticalScroll():
                yield DetectorPanel(id="detector-panel")
            with TabPane("Telemetry 4", id="telemetry"), VerticalScroll():
                yield TelemetryPanel(id="telemetry-panel")

    def on_resize(self, event: events.Resize) -> None:
        """Wide terminals put the panes beside the table instead of below it."""
        self.set_class(event.size.width >= WIDE_COLUMNS, "-wide")

    def on_mount(self) -> None:
        """Dark theme, focus on the table, start the engine worker."""
        self.theme = DARK
        self.query_one(PrismTable).focus()
        self._set_status()
        if self.engine is not None:
            self._engine_worker = self.run_worker(self._run_engine(), name="engine",
                                                  group="engine", exit_on_error=False)

    def on_unmount(self) -> None:
        """However the app ends, tell the engine to stop (its worker is cancelled next)."""
        self._stop.set()

    async def _run_engine(self) -> None:
        assert self.engine is not None
        try:
            await self.engine(self.show_view, self._stop)
        except Exception as exc:  # the engine's own errors; shown, never a traceback
            self.engine_error = f"engine stopped: {exc or type(exc).__name__}"
            self.notify(self.engine_error, severity="error", timeout=10)
            self._set_status()
            return
        if not self._stop.is_set():  # it ran its course (e.g. --duration): we are done
            self.exit(0, return_code=0)

    # -- views ------------------------------------------------------------------------------

    def show_view(self, view: DashboardView) -> None:
        """Hand a new view to the UI (safe from the app's loop or any thread)."""
        self.posted += 1
        self.post_message(ViewUpdated(view, self.posted))

    @on(ViewUpdated)
    def _on_view(self, message: ViewUpdated) -> None:
        self.received += 1
        self.latest, self._latest_seq = message.view, message.seq
        if self.paused:
            self._set_status()
            return
        self._draw(message.view, message.seq)

    @property
    def behind(self) -> int:
        """Views received after the one on screen (while paused; replaced ones count)."""
        return max(0, self._latest_seq - self._shown_seq)

    def _draw(self, view: DashboardView, seq: int) -> None:
        self.shown, self._shown_seq = view, seq
        if view.notices:
            self._notice = view.notices[-1]
        self.rendered += 1
        firing = _firing(view)
        self.query_one(HeaderBar).show(view)
        self.query_one(PrismTable).show(view, self.state, firing)
        self.query_one(AlertsFeed).show(view)
        self.query_one(IterationBreakdown).show(view, self.state.phase)
        self.query_one(DetectorPanel).show(view)
        self.query_one(TelemetryPanel).show(view)
        self._set_status()

    def _redraw(self) -> None:
        """Draw the view on screen again (the table's window, sort or filter changed)."""
        if self.shown is not None:
            self._draw(self.shown, self._shown_seq)
        else:
            self._set_status()

    def _set_status(self, extra: str | None = None) -> None:
        text = Text(mode_line(self.state), style="bold")
        if self.paused:
            text.append(" │ ")
            text.append(" PAUSED ", style="bold reverse")
            text.append(f" {self.behind} updates behind (p resumes)")
        if self.engine_error:
            text.append(" │ ")
            text.append(self.engine_error, style="bold red")
        tail = extra or self._notice or (
            "" if self.paused or self.engine_error else
            "waiting for the first view…" if self.shown is None else "live")
        if tail:
            text.append(f" │ {tail}")
        if text.plain != self._status_text:
            self._status_text = text.plain
            self.query_one("#status", Static).update(text)

    def notify(self, message: str, *, title: str = "", severity: SeverityLevel = "information",
               timeout: float | None = None, markup: bool = False) -> None:
        """Show a toast (plain text by default: paths and errors are not markup)."""
        self.messages.append(message)
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)

    @property
    def status_text(self) -> str:
        """The status line's plain text (for tests and the tmux check)."""
        return self._status_text

    # -- actions ----------------------------------------------------------------------------

    async def action_quit(self) -> None:
        """Stop the engine (bounded wait so probes are detached), then exit."""
        self._stop.set()
        worker = self._engine_worker
        if worker is not None and not worker.is_finished:
            self._set_status("stopping: detaching probes…")
            try:
                await asyncio.wait_for(worker.wait(), STOP_TIMEOUT_S)
            except (asyncio.TimeoutError, Exception):
                worker.cancel()
        code = 1 if self.engine_error else 0
        self.exit(code, return_code=code)

    def action_help(self) -> None:
        """Show the keys."""
        self.push_screen(HelpScreen())

    def action_filter(self) -> None:
        """Show and focus the filter input."""
        box = self.query_one("#filter", Input)
        box.value = self.state.filter
        box.add_class("visible")
        box.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.state = replace(self.state, filter=event.value.strip())
        self._redraw()

    @on(Input.Submitted, "#filter")
    def _filter_done(self, _: Input.Submitted) -> None:
        self._close_filter()

    def _close_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.remove_class("visible")
        self.query_one(PrismTable).focus()
        self._set_status()

    def action_pause(self) -> None:
        """Freeze (or unfreeze) the displayed view; views are still received."""
        self.paused = not self.paused
        if not self.paused and self.latest is not None and self.latest is not self.shown:
            self._draw(self.latest, self._latest_seq)
        self._set_status()

    def action_sort(self) -> None:
        """Next sort order."""
        i = SORTS.index(self.state.sort)
        self.state = replace(self.state, sort=SORTS[(i + 1) % len(SORTS)])
        self._redraw()

    def action_window(self) -> None:
        """Next window: 10 s → 1 min → 5 min."""
        i = WINDOWS_S.index(self.state.window_s) if self.state.window_s in WINDOWS_S else -1
        self.state = replace(self.state, window_s=WINDOWS_S[(i + 1) % len(WINDOWS_S)])
        self._redraw()

    def action_phase(self) -> None:
        """Cycle decode / prefill / mixed rows."""
        i = PHASES.index(self.state.phase) if self.state.phase in PHASES else -1
        self.state = replace(self.state, phase=PHASES[(i + 1) % len(PHASES)])
        self._redraw()

    def action_pane(self, pane: str) -> None:
        """Show one of the bottom panes."""
        self.query_one("#panes", TabbedContent).active = pane

    def action_toggle_theme(self) -> None:
        """Light ↔ dark."""
        self.theme = LIGHT if self.theme == DARK else DARK

    def action_picker(self) -> None:
        """The process picker (needs the engine's control)."""
        if self.control is None:
            self.notify("process picker not available in this mode", severity="warning")
            return
        self.push_screen(PickerScreen(self.control))

    def action_history(self) -> None:
        """The history screen over the SQLite database."""
        db = self.history_db or (self.shown.history_path if self.shown else "")
        if not db:
            self.notify("history not available in this mode (no database)", severity="warning")
            return
        self.push_screen(HistoryScreen(os.path.expanduser(db)))

    def action_export(self) -> None:
        """Export the last seconds of spans as a Chrome/Perfetto trace (in a thread)."""
        if self.control is None:
            self.notify("trace export not available in this mode", severity="warning")
            return
        name = time.strftime("prism-trace-%Y%m%d-%H%M%S.json")
        self._export(str(Path(self.export_dir) / name))

    @work(thread=True, group="export", exit_on_error=False)
    def _export(self, path: str) -> None:
        assert self.control is not None
        try:
            written = self.control.export_trace(self.export_seconds, path)
        except Exception as exc:  # one line, never a traceback
            self.call_from_thread(self.notify, f"export failed: {exc}", severity="error")
            return
        self.last_export = written
        self.call_from_thread(self.notify, f"trace written: {written}")

    def action_save_screenshot(self) -> None:
        """Save an SVG screenshot of the current screen."""
        try:
            path = self.save_screenshot(path=self.export_dir)
        except OSError as exc:
            self.notify(f"screenshot failed: {exc.strerror or exc}", severity="error")
            return
        self.last_screenshot = path
        self.notify(f"screenshot saved: {path}")

    # -- keys and selections ------------------------------------------------------------------

    def on_key(self, event: events.Key) -> None:
        """Esc in the filter clears it and returns to the table."""
        if event.key == "escape" and self.focused is self.query_one("#filter", Input):
            self.query_one("#filter", Input).value = ""
            self._close_filter()
            event.stop()

    @on(DataTable.RowSelected, "#alerts-feed")
    def _alert_selected(self, _: DataTable.RowSelected) -> None:
        alert = self.query_one(AlertsFeed).selected()
        if alert is not None:
            self.push_screen(AlertDetailScreen(alert))

    @on(DataTable.RowSelected, "#prism")
    def _series_selected(self, _: DataTable.RowSelected) -> None:
        sel = self.query_one(PrismTable).selected()
        if sel is not None and self.shown is not None:
            self.push_screen(SeriesDetailScreen(self.shown, sel[0], sel[1], self.state.phase))

    def get_system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        """The palette: the dashboard's actions besides Textual's own."""
        yield from super().get_system_commands(screen)
        for title, help_text, action in (
            ("Pause / resume", "Freeze the view; data is still collected", self.action_pause),
            ("Next window", "10 s → 1 min → 5 min", self.action_window),
            ("Next sort order", "stage, device, p99, share, rate", self.action_sort),
            ("Toggle phase", "decode / prefill / mixed rows", self.action_phase),
            ("Toggle light/dark", "Switch theme", self.action_toggle_theme),
            ("Export trace", "Chrome/Perfetto JSON of the last seconds", self.action_export),
            ("Screenshot", "Save an SVG screenshot", self.action_save_screenshot),
            ("Process picker", "Attach to or detach from processes", self.action_picker),
            ("History", "Quantiles and alerts from SQLite", self.action_history),
            ("Keys", "Show the help screen", self.action_help),
        ):
            yield SystemCommand(title, help_text, action)


def _firing(view: DashboardView) -> set[tuple[str, str]]:
    """(stage, device) pairs whose latest alert state is ``firing``."""
    state: dict[str, tuple[str, str, str]] = {}
    for a in view.alerts:
        state[a.fingerprint] = (a.status, a.stage, a.device)
    return {(st, dev) for status, st, dev in state.values() if status == "firing"}
