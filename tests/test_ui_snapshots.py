"""Snapshot tests of the dashboard (pytest-textual-snapshot) at 80×24 and 160×48.

The views come from the recorded replay with its fixed clock, so nothing in the picture
depends on the wall clock; baselines live in ``tests/__snapshots__/`` (update them with
``pytest tests/test_ui_snapshots.py --snapshot-update`` and review the SVGs).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import lru_cache

import pytest
from textual.pilot import Pilot

from prism_tui.dashboard_view import DashboardView
from prism_tui.ui.app import PrismApp
from prism_tui.ui.widgets import AlertsFeed
from tests.scripted_views import RecordedControl, replay_views

SIZES = [(80, 24), (160, 48)]
FIRING_VIEW = 35

SnapCompare = Callable[..., bool]


@lru_cache(maxsize=1)
def _views() -> tuple[DashboardView, ...]:
    return tuple(replay_views())


def _feed(upto: int) -> Callable[[Pilot[int]], Awaitable[None]]:
    async def run_before(pilot: Pilot[int]) -> None:
        app = pilot.app
        assert isinstance(app, PrismApp)
        for v in _views()[: upto + 1]:
            app.show_view(v)
            await pilot.pause()
    return run_before


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_main_screen(snap_compare: SnapCompare, size: tuple[int, int]) -> None:
    assert snap_compare(PrismApp(control=RecordedControl()), terminal_size=size,
                        run_before=_feed(FIRING_VIEW))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_alert_detail(snap_compare: SnapCompare, size: tuple[int, int]) -> None:
    feed = _feed(FIRING_VIEW)

    async def run_before(pilot: Pilot[int]) -> None:
        await feed(pilot)
        pilot.app.query_one(AlertsFeed).focus()
        await pilot.press("enter")

    assert snap_compare(PrismApp(), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_help(snap_compare: SnapCompare, size: tuple[int, int]) -> None:
    assert snap_compare(PrismApp(), terminal_size=size, run_before=_feed(5),
                        press=["question_mark"])


def test_detector_pane_after_resolution(snap_compare: SnapCompare) -> None:
    assert snap_compare(PrismApp(), terminal_size=(80, 24), run_before=_feed(59),
                        press=["3"])
