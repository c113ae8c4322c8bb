"""The dashboard fed by the real engine replaying spans recorded through real uprobes.

``tests/data/sim_spans.jsonl.gz`` (see ``tests/test_engine_core.py``): two simulator
ranks, rank 1's device at half speed from the 8th second for 4 s. The engine runs on a
:class:`~prism_tui.engine.recording.ReplayClock` and a fixed wall clock, so every view is
exact; the app is the real :class:`~prism_tui.ui.app.PrismApp` under Textual's pilot.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from prism_tui.dashboard_view import DashboardView
from prism_tui.engine.core import DetectionConfig, Engine, SloSpec
from prism_tui.engine.episodes import EpisodeHolds
from prism_tui.engine.recording import ReplayClock, load_spans, replay
from prism_tui.engine.sketches import ITERATION
from prism_tui.ui.app import PrismApp
from prism_tui.ui.render import fmt_ms
from prism_tui.ui.screens import AlertDetailScreen
from prism_tui.ui.widgets import AlertsFeed, PrismTable

pytestmark = pytest.mark.anyio

RECORDING = Path(__file__).resolve().parent / "data" / "sim_spans.jsonl.gz"
WALL = 1_790_000_000.0


@pytest.fixture(scope="module")
def replayed() -> tuple[list[DashboardView], list[str]]:
    """Views taken every ~0.25 s of replayed time, and the devices of the two ranks."""
    procs, spans = load_spans(str(RECORDING))
    clock = ReplayClock(spans[0].start_ns)
    engine = Engine(DetectionConfig(rule="prism", warmup=150,
                                    slos=(SloSpec("decode p99 <= 15ms over 1s"),),
                                    holds=EpisodeHolds(1, 0.0, 1, 0.0)),
                    # the 14 s replay resolves in it
                    clock=clock, wall_clock=lambda: WALL, host="replay-host")
    views: list[DashboardView] = []
    last = [0]

    def every(now_ns: int) -> None:
        if now_ns - last[0] >= 250_000_000:
            last[0] = now_ns
            views.append(DashboardView.of(engine.view(now_ns)))  # as a session without a broker

    replay(engine, clock, procs, spans, every=every)
    views.append(DashboardView.of(engine.view()))
    return views, [p.device for p in procs]


def _first_firing(views: list[DashboardView]) -> int:
    return next(i for i, v in enumerate(views)
                if any(a.status == "firing" and a.source == "detector" for a in v.alerts))


async def test_stage_rows_carry_the_engines_quantiles(
        replayed: tuple[list[DashboardView], list[str]]) -> None:
    views, devices = replayed
    app = PrismApp()
    async with app.run_test(size=(120, 40)) as pilot:
        app.show_view(views[-1])
        await pilot.pause()
        table = app.query_one(PrismTable)
        snap = views[-1].snapshot(10.0)
        assert snap is not None
        shown = set(table.rows_shown)
        for device in devices:
            assert (ITERATION, device) in shown
        stages = {stage for stage, _ in shown} - {ITERATION}
        assert {"device_sync", "memcpy", "collective", "host"} <= stages, stages
        for stage, device in table.rows_shown:
            stats = snap.get(stage, device, "decode")
            assert stats is not None
            assert table.cells[(stage, device)]["p99"] == fmt_ms(stats.p99)
            assert table.cells[(stage, device)]["p50"] == fmt_ms(stats.p50)


async def test_the_fault_alert_reaches_the_feed_and_its_detail(
        replayed: tuple[list[DashboardView], list[str]]) -> None:
    views, devices = replayed
    i = _first_firing(views)
    app = PrismApp()
    async with app.run_test(size=(120, 40)) as pilot:
        for v in views[max(0, i - 3): i + 1]:
            app.show_view(v)
            await pilot.pause()
        feed = app.query_one(AlertsFeed)
        firing = [a for a in feed.alerts if a.status == "firing" and a.source == "detector"]
        assert firing, feed.alerts
        assert firing[0].device in devices and firing[0].stage == ITERATION
        feed.focus()
        feed.move_cursor(row=feed.alerts.index(firing[0]), animate=False)
        await pilot.press("enter")
        screen = app.screen
        assert isinstance(screen, AlertDetailScreen)
        assert screen.alert.id == firing[0].id
        assert screen.alert.suspects, "the engine ranks root-cause suspects at alert time"
        await pilot.press("escape")
        assert not isinstance(app.screen, AlertDetailScreen)


async def test_the_slo_breach_and_the_resolution_are_shown(
        replayed: tuple[list[DashboardView], list[str]]) -> None:
    views, _ = replayed
    app = PrismApp()
    async with app.run_test(size=(120, 40)) as pilot:
        for v in views[_first_firing(views):]:
            app.show_view(v)
            await pilot.pause()
        feed = app.query_one(AlertsFeed)
        statuses = {(a.source, a.status) for a in feed.alerts}
        assert ("detector", "resolved") in statuses, statuses
        assert any(a.source == "slo" for a in feed.alerts), statuses
