"""The dashboard driven by Textual's pilot, fed with the recorded replay (fixed clock).

Every screen and key binding is exercised against the real app; the engine side is the
recorded :func:`~tests.scripted_views.replay_views` sequence and
:class:`~tests.scripted_views.RecordedControl` (real attach/detach state, real trace files),
and the history screen reads a real SQLite file written by ``HistoryStore``.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from textual.command import CommandList, CommandPalette
from textual.pilot import Pilot
from textual.widgets import DataTable, Input

from prism_tui.dashboard_view import DashboardView
from prism_tui.engine.sketches import ITERATION, SeriesKey, WindowedSketches
from prism_tui.history.store import HistoryStore
from prism_tui.ui.app import DARK, LIGHT, PrismApp
from prism_tui.ui.control import EngineControl
from prism_tui.ui.render import fmt_ms, sparkline, stacked_bar
from prism_tui.ui.screens import (
    AlertDetailScreen,
    HelpScreen,
    HistoryScreen,
    PickerScreen,
    SeriesDetailScreen,
)
from prism_tui.ui.widgets import AlertsFeed, PrismTable
from tests.scripted_views import RecordedControl, replay_views

pytestmark = pytest.mark.anyio

FIRING_VIEW = 35
"""A view during the fault: the alert on cuda:1 is firing and acknowledged."""


@pytest.fixture(scope="module")
def views() -> list[DashboardView]:
    """The recorded sequence (60 views, fault from 30 s to 42 s on cuda:1)."""
    return replay_views()


async def _feed(app: PrismApp, pilot: Pilot[int], views: Sequence[DashboardView]) -> None:
    for v in views:
        app.show_view(v)
        await pilot.pause()


def _cell(table: PrismTable, stage: str, device: str, column: str) -> str:
    return table.cells[(stage, device)][column]


def _screen_text(app: PrismApp) -> str:
    """What the terminal shows now, as plain text (the exported screenshot's text)."""
    svg = app.export_screenshot()
    body = re.sub(r"<[^>]+>", "", svg.split("<g", 1)[1])
    return html.unescape(body).replace("\xa0", " ")


def _focused(app: PrismApp) -> object:
    return app.focused


def _toasts(app: PrismApp) -> str:
    return " | ".join(app.messages)


# -- pure rendering --------------------------------------------------------------------------


def test_sparkline_scales_and_keeps_gaps() -> None:
    assert sparkline([1.0, None, 3.0, 2.0], 4) == "▁ █▅"
    assert sparkline([5.0, 5.0], 2) == "▄▄"
    assert sparkline([None, None], 2) == "  "
    assert sparkline(list(range(40)), 10) == sparkline(list(range(30, 40)), 10)


def test_stacked_bar_fills_its_width_by_share() -> None:
    bar = stacked_bar([("host", 0.25), ("sync", 0.5)], 20, ["host", "sync"])
    assert len(bar.plain) == 20
    assert bar.plain.count("█") == 5 and bar.plain.count("▓") == 10
    assert bar.plain.endswith("·" * 5)
    over = stacked_bar([("host", 0.8), ("sync", 0.8)], 10, ["host", "sync"])
    assert len(over.plain) == 10 and "·" not in over.plain


def test_fmt_ms_fits_six_columns() -> None:
    for v in (0.0123, 1.5, 12.345, 123.45, 1234.5, 12345.0, 123456.0):
        assert len(fmt_ms(v)) <= 6
    assert fmt_ms(None) == "–"


def test_recorded_control_is_an_engine_control() -> None:
    assert isinstance(RecordedControl(), EngineControl)


# -- the main screen -------------------------------------------------------------------------


async def test_rows_show_the_snapshot_numbers(views: list[DashboardView]) -> None:
    app = PrismApp()
    async with app.run_test(size=(80, 24)) as pilot:
        await _feed(app, pilot, views[: FIRING_VIEW + 1])
        table = app.query_one(PrismTable)
        view = views[FIRING_VIEW]
        snap = view.snapshot(10.0)
        assert snap is not None
        assert len(table.rows_shown) == 12  # 6 series x 2 devices, decode only
        assert table.rows_shown[:2] == ((ITERATION, "cuda:0"), (ITERATION, "cuda:1"))
        for stage, device in table.rows_shown:
            stats = snap.get(stage, device, "decode")
            assert stats is not None
            assert _cell(table, stage, device, "p99") == fmt_ms(stats.p99)
            assert _cell(table, stage, device, "max") == fmt_ms(stats.max)
        # the alert is firing on cuda:1: marker on its row, SLO breached, not on cuda:0
        assert _cell(table, ITERATION, "cuda:1", "stage").startswith("▲")
        assert _cell(table, ITERATION, "cuda:1", "slo") == "BRCH"
        assert _cell(table, ITERATION, "cuda:0", "slo") == "ok"
        # 80 columns: the whole table fits without horizontal scrolling
        assert table.virtual_size.width <= table.size.width
        text = _screen_text(app)
        assert "gpu-node-7" in text and "4242 sim-rank0" in text
        assert "outbox 0" in text and "BRCH" in text
        assert "10 s · decode · sort stage" in app.status_text


async def test_older_queued_views_are_replaced(views: list[DashboardView]) -> None:
    app = PrismApp()
    async with app.run_test(size=(80, 24)) as pilot:
        for v in views[:30]:  # posted back to back: the app has not run in between
            app.show_view(v)
        await pilot.pause()
        assert app.shown is views[29]
        assert app.rendered < 30


async def test_a_view_from_another_thread_is_drawn(views: list[DashboardView]) -> None:
    app = PrismApp()
    async with app.run_test(size=(80, 24)) as pilot:
        thread = threading.Thread(target=app.show_view, args=(views[10],))
        thread.start()
        thread.join()
        for _ in range(50):
            await pilot.pause()
            if app.shown is views[10]:
                break
        assert app.shown is views[10]


async def test_updates_change_cells_in_place(views: list[DashboardView]) -> None:
    app = PrismApp()
    async with app.run_test(size=(80, 24)) as pilot:
        await _feed(app, pilot, views[20:21])
        table = app.query_one(PrismTable)
        before = table.rows_shown
        changed = table.show(views[21], app.state, set())
        assert table.rows_shown == before
        assert 0 < changed <= len(before)
        assert table.show(views[21], app.state, set()) == 0  # same view: nothing to do
        # a row's line is what the cells say, in column order
        line = str(table.get_cell(f"{ITERATION}|cuda:0", "row").plain)  # type: ignore[union-attr]
        cells = table.cells[(ITERATION, "cuda:0")]
        assert line.split()[:4] == [cells["stage"], cells["device"], cells["rate"], cells["p50"]]


# -- keys ------------------------------------------------------------------------------------


async def test_pause_freezes_and_counts_updates_behind(views: list[DashboardView]) -> None:
    app = PrismApp()
    async with app.run_test(size=(80, 24)) as pilot:
        await _feed(app, pilot, views[:20])
        await pilot.press("p")
        assert app.paused
        await _feed(app, pilot, views[20:23])
        assert app.shown is views[19] and app.latest is views[22]
        assert "PAUSED" in app.status_text and "3 updates behind" in app.status_text
        for v in views[23:30]:  # back to back: most replaced in the queue, still counted
            app.show_view(v)
        await pilot.pause()
        assert app.shown is views[19] and "10 updates behind" in app.status_text
        await pilot.press("p")
        assert not app.paused and app.shown is views[29]
        assert "PAUSED" not in app.status_text


async def test_sort_cycles_orders(views: list[DashboardView]) -> None:
    app = PrismApp()
    async with app.run_test(size=(80, 24)) as pilot:
        await _feed(app, pilot, views[FIRING_VIEW: FIRING_VIEW + 1])
        table = app.query_one(PrismTable)
        snap = views[FIRING_VIEW].snapshot(10.0)
        assert snap is not None
        await pilot.press("s")
        assert app.state.sort == "device"
        devices = [d for _, d in table.rows_shown]
        assert devices == sorted(devices) and table.rows_shown[0] == (ITERATION, "cuda:0")
        await pilot.press("s")
        assert app.state.sort == "p99"
        p99s = [snap.series[SeriesKey(s, d, "decode")].p99 for s, d in table.rows_shown]
        assert p99s == sorted(p99s, reverse=True)
        assert "sort p99" in app.status_text
        for _ in range(3):
            await pilot.press("s")
        assert app.state.sort == "stage"


async def test_window_cycles_snapshots(views: list[DashboardView]) -> None:
    app = PrismApp()
    async with app.run_test(size=(80, 24)) as pilot:
        view = views[-1]
        await _feed(app, pilot, [view])
        table = app.query_one(PrismTable)
        for span in (60.0, 300.0, 10.0):
            await pilot.press("w")
            assert app.state.window_s == span
            snap = view.snapshot(span)
            assert snap is not None
            stats = snap.get("sync", "cuda:1", "decode")
            assert stats is not None
            assert _cell(table, "sync", "cuda:1", "p99") == fmt_ms(stats.p99)
        await pilot.press("w")
        assert "1 min" in app.status_text


async def test_phase_toggle_shows_prefill_rows(views: list[DashboardView]) -> None:
    app = PrismApp()
    async with app.run_test(size=(80, 24)) as pilot:
        await _feed(app, pilot, views[-1:])
        await pilot.press("f")
        assert app.state.phase == "prefill"
        snap = views[-1].snapshot(10.0)
        assert snap is not None
        stats = snap.get(ITERATION, "cuda:0", "prefill")
        assert stats is not None
        assert _cell(app.query_one(PrismTable), ITERATION, "cuda:0", "p50") == fmt_ms(
            stats.p50)
        await pilot.press("f")  # chunked prefill beside decoding sequences
        assert app.state.phase == "mixed"
        await pilot.press("f")
        assert app.state.phase == "decode"


async def test_filter_keeps_matching_rows_and_escape_clears(views: list[DashboardView]) -> None:
    app = PrismApp()
    async with app.run_test(size=(80, 24)) as pilot:
        await _feed(app, pilot, views[-1:])
        table = app.query_one(PrismTable)
        await pilot.press("slash")
        box = app.query_one("#filter", Input)
        assert _focused(app) is box and box.display
        await pilot.press(*"sync")
        assert {s for s, _ in table.rows_shown} == {"sync"}
        await pilot.press("enter")
        assert _focused(app) is table and app.state.filter == "sync"
        assert len(table.rows_shown) == 2 and "filter 'sync'" in app.status_text
        await pilot.press("slash", "escape")
        assert app.state.filter == "" and len(table.rows_shown) == 12
        assert _focused(app) is table
        await pilot.press("slash", *"cuda:1", "enter")  # devices match too
        assert {d for _, d in table.rows_shown} == {"cuda:1"}


async def test_help_screen_opens_and_closes(views: list[DashboardView]) -> None:
    app = PrismApp()
    async with app.run_test(size=(80, 24)) as pilot:
        await _feed(app, pilot, views[:1])
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


async def test_tab_moves_focus_and_enter_opens_alert_detail(views: list[DashboardView]) -> None:
    app = PrismApp()
    async with app.run_test(size=(80, 24)) as pilot:
        await _feed(app, pilot, views[: FIRING_VIEW + 1])
        feed = app.query_one(AlertsFeed)
        assert _focused(app) is app.query_one(PrismTable)
        await pilot.press("tab")
        assert _focused(app) is not app.query_one(PrismTable)
        for _ in range(3):
            if _focused(app) is feed:
                break
            await pilot.press("tab")
        assert _focused(app) is feed
        await pilot.press("enter")
        screen = app.screen
        assert isinstance(screen, AlertDetailScreen)
        assert screen.alert.status == "firing" and screen.alert.device == "cuda:1"
        text = _screen_text(app)
        assert "Root-cause suspects" in text and "sync" in text.split("Root-cause", 1)[1]
        await pilot.press("escape")
        assert app.screen is not screen and _focused(app) is feed


async def test_enter_on_a_row_opens_its_detail(views: list[DashboardView]) -> None:
    app = PrismApp()
    async with app.run_test(size=(80, 24)) as pilot:
        await _feed(app, pilot, views[-1:])
        await pilot.press("down", "enter")
        screen = app.screen
        assert isinstance(screen, SeriesDetailScreen)
        assert (screen.stage, screen.device) == (ITERATION, "cuda:1")
        await pilot.press("escape")
        assert not isinstance(app.screen, SeriesDetailScreen)


async def test_number_keys_switch_bottom_panes(views: list[DashboardView]) -> None:
    app = PrismApp()
    async with app.run_test(size=(80, 24)) as pilot:
        await _feed(app, pilot, views[: FIRING_VIEW + 1])
        for key, pane in (("2", "iterations"), ("3", "detector"), ("4", "telemetry"),
                          ("1", "alerts")):
            await pilot.press(key)
            assert app.query_one("#panes").active == pane  # type: ignore[attr-defined]
        await pilot.press("3")
        await pilot.pause()
        text = _screen_text(app)
        assert "cuda:1 decode FIRING" in text and "UCL 0.120" in text
        await pilot.press("4")
        await pilot.pause()
        assert "n/a: cuda:1 power: not supported on this GPU" in _screen_text(app)
        await pilot.press("2")
        await pilot.pause()
        assert "cuda:0" in _screen_text(app) and "ms ▓" in _screen_text(app)


async def test_theme_toggles_light_and_dark(views: list[DashboardView]) -> None:
    app = PrismApp()
    async with app.run_test(size=(80, 24)) as pilot:
        await _feed(app, pilot, views[:1])
        assert app.theme == DARK
        await pilot.press("t")
        assert app.theme == LIGHT
        await pilot.press("t")
        assert app.theme == DARK


async def test_screenshot_key_writes_svg(views: list[DashboardView], tmp_path: Path) -> None:
    app = PrismApp()
    app.export_dir = str(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await _feed(app, pilot, views[:5])
        await pilot.press("ctrl+s")
        assert app.last_screenshot is not None
        text = Path(app.last_screenshot).read_text()
        assert text.lstrip().startswith("<svg") and "gpu-node-7" in text


async def test_export_writes_a_chrome_trace(views: list[DashboardView], tmp_path: Path) -> None:
    app = PrismApp(control=RecordedControl())
    app.export_dir = str(tmp_path)
    app.export_seconds = 1.0
    async with app.run_test(size=(80, 24)) as pilot:
        await _feed(app, pilot, views[:2])
        await pilot.press("e")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.last_export is not None
        doc = json.loads(Path(app.last_export).read_text())
        spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
        assert spans and {e["pid"] for e in spans} == {4242, 4243}
        assert max(e["ts"] for e in spans) - min(e["ts"] for e in spans) <= 1.1e6
        await pilot.pause(0.1)
        assert "trace written" in _toasts(app)


async def test_without_control_and_history_the_ui_says_so(views: list[DashboardView]) -> None:
    app = PrismApp()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("e", "a")
        await pilot.pause()
        toasts = _toasts(app)
        assert "trace export not available in this mode" in toasts
        assert "process picker not available in this mode" in toasts
        await pilot.press("h")
        await pilot.pause()
        assert "history not available in this mode" in _toasts(app)
        assert not isinstance(app.screen, (PickerScreen, HistoryScreen))


async def test_picker_attaches_and_detaches(views: list[DashboardView]) -> None:
    control = RecordedControl()
    app = PrismApp(control=control)
    async with app.run_test(size=(80, 24)) as pilot:
        await _feed(app, pilot, views[:1])
        await pilot.press("a")
        screen = app.screen
        assert isinstance(screen, PickerScreen)
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert [c.pid for c in screen.candidates] == [4242, 4243, 5150]
        await pilot.press("down", "down", "enter")  # vllm, not watched yet
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert {c.pid: c.watched for c in control.candidates()}[5150]
        assert "attached to 5150" in _screen_text(app)
        table = screen.query_one("#picker", DataTable)
        assert str(table.get_cell("5150", "watched")) == "yes"
        await pilot.press("enter")  # again: already watched is an error line
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert "already watched" in _screen_text(app)
        await pilot.press("d")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert not {c.pid: c.watched for c in control.candidates()}[5150]
        assert "detached from 5150" in _screen_text(app)
        await pilot.press("escape")
        assert not isinstance(app.screen, PickerScreen)


async def _write_history(path: Path) -> None:
    now = 5_000_000_000_000
    sk = WindowedSketches(1.0, 300.0, clock=lambda: now, lateness_s=0.0)
    for sec in range(30):
        for k in range(10):
            t = now - 40_000_000_000 + sec * 1_000_000_000 + k * 100_000_000
            slow = 3.0 if sec >= 20 else 1.0
            sk.add(SeriesKey("sync", "cuda:1", "decode"), t, 10.0 * slow + k * 0.1)
            sk.add(SeriesKey("host", "cuda:0", "decode"), t, 4.0 + k * 0.05)
    sk.flush()
    wall = time.time_ns()
    async with HistoryStore(path, mono_clock=lambda: now, wall_clock=lambda: wall) as store:
        await store.write_windows(sk)
        await store.write_alert({
            "schema": 1, "id": "a-1", "fingerprint": "fp-1", "status": "firing",
            "severity": "critical", "stage": "sync", "device": "cuda:1", "phase": "decode",
            "target": {"pid": 4243, "name": "sim-rank1"},
            "summary": "decode iterations on cuda:1 slower than the workload explains",
        }, at_ns=wall - 5_000_000_000)


async def test_history_screen_queries_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    await _write_history(db)
    app = PrismApp(history_db=str(db))
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("h")
        screen = app.screen
        assert isinstance(screen, HistoryScreen)
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert screen.report is not None
        names = [s["series"] for s in screen.report["series"]]
        assert names == ["host/cuda:0/decode", "sync/cuda:1/decode"]
        sync = screen.report["series"][1]
        assert sync["total"]["count"] == 300 and sync["total"]["max"] == pytest.approx(30.9)
        assert "sync/cuda:1/decode" in _screen_text(app)
        alerts = screen.query_one("#history-alerts", DataTable)
        assert alerts.row_count == 1
        assert "slower than the workload" in str(alerts.get_row_at(0)[-1])
        stage = screen.query_one("#stage", Input)
        stage.focus()
        await pilot.press(*"sync", "enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert [s["series"] for s in screen.report["series"]] == ["sync/cuda:1/decode"]
        since = screen.query_one("#since", Input)
        since.value = "yesterday"
        since.focus()
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert screen.report is None
        assert "bad time 'yesterday'" in _screen_text(app)
        await pilot.press("escape")
        assert not isinstance(app.screen, HistoryScreen)


async def test_history_screen_reports_a_missing_database(tmp_path: Path) -> None:
    app = PrismApp(history_db=str(tmp_path / "none.db"))
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("h")
        await app.workers.wait_for_complete()
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, HistoryScreen) and screen.report is None
        assert "none.db" in _screen_text(app)
        assert not (tmp_path / "none.db").exists()


async def test_command_palette_runs_dashboard_actions(views: list[DashboardView]) -> None:
    app = PrismApp()
    async with app.run_test(size=(80, 24)) as pilot:
        await _feed(app, pilot, views[:1])
        await pilot.press("ctrl+p")
        assert isinstance(app.screen, CommandPalette)
        await pilot.press(*"Next window")
        for _ in range(100):  # the palette searches asynchronously
            await pilot.pause(0.02)
            if app.screen.query_one(CommandList).option_count:
                break
        await pilot.press("enter")
        await pilot.pause()
        assert app.state.window_s == 60.0


# -- the engine worker -----------------------------------------------------------------------


async def test_q_stops_the_engine_before_exit(views: list[DashboardView]) -> None:
    events: list[str] = []

    async def engine(show: object, stop: asyncio.Event) -> None:
        assert callable(show)
        events.append("attached")
        try:
            for v in views:
                if stop.is_set():
                    break
                show(v)
                await asyncio.sleep(0.005)
            await stop.wait()
        finally:
            await asyncio.sleep(0.05)  # detaching probes takes a moment
            events.append("detached")

    app = PrismApp(engine=engine)
    async with app.run_test(size=(80, 24)) as pilot:
        for _ in range(200):
            await pilot.pause(0.01)
            if app.received >= 5:
                break
        assert app.shown is not None
        await pilot.press("q")
    assert events == ["attached", "detached"]
    assert app.return_value == 0 and app.return_code == 0


async def test_engine_error_is_shown_and_app_stays(views: list[DashboardView]) -> None:
    async def engine(show: object, stop: asyncio.Event) -> None:
        assert callable(show)
        show(views[0])
        await asyncio.sleep(0)
        raise RuntimeError("perf ring buffer vanished")

    app = PrismApp(engine=engine)
    async with app.run_test(size=(80, 24)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.is_running
        assert "engine stopped: perf ring buffer vanished" in app.status_text
        assert "perf ring buffer vanished" in _toasts(app)
        await pilot.press("w")  # still responsive
        assert app.state.window_s == 60.0
        await pilot.press("q")
    assert app.return_value == 1 and app.return_code == 1


async def test_app_exits_when_the_engine_finishes(views: list[DashboardView]) -> None:
    async def engine(show: object, stop: asyncio.Event) -> None:
        assert callable(show)
        show(views[0])
        await asyncio.sleep(0.01)

    app = PrismApp(engine=engine)
    async with app.run_test(size=(80, 24)) as pilot:
        for _ in range(100):
            await pilot.pause(0.01)
            if not app.is_running:
                break
    assert app.return_value == 0 and app.return_code == 0
