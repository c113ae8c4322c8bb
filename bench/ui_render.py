"""Dashboard cost, 8 devices × 12 stages: time per view update, and the view rate it sustains.

Run: ``.venv/bin/python bench/ui_render.py [--size 160x48] [--append docs/performance.md]``

Measured headless through Textual's pilot on the real :class:`PrismApp`, with views from
the recorded replay (real t-digest snapshots of 8 × (12 stages + iteration) × 2 phases):

- *handler*: the view handler, every widget updated in place (wall time); *CPU per
  update*: process CPU time from ``show_view`` to the app being idle again (dispatch,
  handler, layout, repaint of what changed), minus what the idle wait costs alone.
- *frame*: a full repaint of the screen (compositor render of every line, written as ANSI
  to a string): the worst case of what the terminal receives per update.
- *sustained rate*: an engine worker posts views at a fixed rate for a few seconds; the
  app draws what it can and older queued views are replaced (never queued up). The rate
  is sustained when both the posted and the drawn rates reach 95 % of the aim (the
  engine shares the loop, so a slow UI also slows what the engine can post).

The replayed views are ``gc.freeze()``-d after generation: a full collection over them
takes ~100 ms on this machine and would otherwise land on a random update.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prism_tui.dashboard_view import DashboardView  # noqa: E402
from prism_tui.ui.app import PrismApp  # noqa: E402
from tests.scripted_views import replay_views  # noqa: E402

DEVICES = tuple(f"cuda:{i}" for i in range(8))
RATES = (2, 5, 10, 20, 50, 100)


def _p99(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return s[max(0, math.ceil(0.99 * len(s)) - 1)]  # nearest rank


def _frame_ms(app: PrismApp) -> float:
    w, h = app.size
    console = Console(width=w, height=h, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor", legacy_windows=False)
    t0 = time.perf_counter()
    console.print(app.screen._compositor.render_update(full=True))
    return (time.perf_counter() - t0) * 1e3


class _TimedApp(PrismApp):
    """The real app, timing its view handler (every widget's in-place update)."""

    def __init__(self) -> None:
        super().__init__()
        self.handler_ms: list[float] = []

    def _draw(self, view: DashboardView, seq: int) -> None:
        t0 = time.perf_counter()
        super()._draw(view, seq)
        self.handler_ms.append((time.perf_counter() - t0) * 1e3)


async def measure_updates(views: Sequence[DashboardView], size: tuple[int, int],
                          pane: str) -> dict[str, list[float]]:
    """Per view: handler ms, CPU ms from show to idle, the idle baseline, full-frame ms."""
    app = _TimedApp()
    idle: list[float] = []
    to_idle: list[float] = []
    frames: list[float] = []
    async with app.run_test(size=size) as pilot:
        await pilot.press(pane)
        for v in views[:5]:  # warm up: columns, caches
            app.show_view(v)
            await pilot.pause()
        for _ in range(10):  # what waiting for idle costs with nothing to do (CPU)
            t0 = time.process_time()
            await pilot.pause()
            idle.append((time.process_time() - t0) * 1e3)
        app.handler_ms.clear()
        for v in views:
            t0 = time.process_time()
            app.show_view(v)
            await pilot.pause()
            to_idle.append((time.process_time() - t0) * 1e3)
            frames.append(_frame_ms(app))
    base = statistics.median(idle)
    return {"handler": app.handler_ms, "update": [max(0.0, x - base) for x in to_idle],
            "idle": idle, "frame": frames}


async def measure_rate(views: Sequence[DashboardView], size: tuple[int, int], rate: float,
                       seconds: float) -> tuple[float, float, float]:
    """(posted/s, drawn/s, process CPU %) when an engine worker aims at ``rate`` views/s.

    The engine shares the app's loop (as the real one does), so a UI that cannot keep up
    shows as a lower posted rate as well as as views replaced before they were drawn.
    """
    posted = 0
    elapsed = 0.0
    cpu = 0.0

    async def engine(show: Callable[[DashboardView], None], stop: asyncio.Event) -> None:
        nonlocal posted, elapsed, cpu
        period = 1.0 / rate
        start = time.perf_counter()
        cpu0 = time.process_time()
        while not stop.is_set() and posted < rate * seconds:
            show(views[posted % len(views)])
            posted += 1
            delay = start + posted * period - time.perf_counter()
            await asyncio.sleep(max(0.0, delay))
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu0
        await stop.wait()

    app = PrismApp(engine=engine)
    async with app.run_test(size=size) as pilot:
        deadline = time.perf_counter() + seconds * 4 + 5
        while elapsed == 0.0 and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        drawn = app.rendered
        await pilot.press("q")
    span = elapsed or seconds
    return posted / span, drawn / span, 100.0 * cpu / span


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print (and optionally append) a results table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="160x48", help="terminal WxH (default 160x48)")
    ap.add_argument("--views", type=int, default=60, help="views to replay (default 60)")
    ap.add_argument("--seconds", type=float, default=3.0, help="per rate step (default 3)")
    ap.add_argument("--append", metavar="MD", help="append the results to this markdown file")
    args = ap.parse_args(argv)
    w, h = (int(x) for x in args.size.lower().split("x"))
    t0 = time.perf_counter()
    views = replay_views(args.views, devices=DEVICES, stages=12, iterations_per_s=20,
                         fault=(args.views * 0.5, args.views * 0.7))
    gen_s = time.perf_counter() - t0
    gc.collect()
    gc.freeze()  # the replayed views are long-lived: keep full collections off them
    last = views[-1].snapshot(10.0)
    rows = len(last.rows) // 2 if last is not None else 0
    print(f"{len(views)} views, {len(DEVICES)} devices x 12 stages ({rows} decode rows), "
          f"generated in {gen_s:.1f} s", flush=True)

    results: list[tuple[str, float, float, float, float, float, float]] = []
    idle_ms = 0.0
    for pane, label in (("1", "alerts"), ("2", "iterations"), ("3", "detector")):
        m = asyncio.run(measure_updates(views, (w, h), pane))
        idle_ms = statistics.median(m["idle"])
        row = (label, statistics.mean(m["handler"]), _p99(m["handler"]),
               statistics.mean(m["update"]), _p99(m["update"]),
               statistics.mean(m["frame"]), _p99(m["frame"]))
        results.append(row)
        print(f"pane {label:<10} handler {row[1]:6.2f}/{row[2]:6.2f} ms | CPU per update "
              f"{row[3]:6.2f}/{row[4]:6.2f} ms | full frame {row[5]:6.2f}/{row[6]:6.2f} ms "
              f"(mean/p99; idle wait's {idle_ms:.1f} ms CPU subtracted)", flush=True)

    rates: list[tuple[float, float, float, float]] = []
    for rate in RATES:
        posted, drawn, cpu = asyncio.run(measure_rate(views, (w, h), rate, args.seconds))
        rates.append((rate, posted, drawn, cpu))
        print(f"aim {rate:>4}/s: posted {posted:6.1f}/s, drawn {drawn:6.1f}/s, "
              f"CPU {cpu:5.1f}% of a core", flush=True)
    sustained = max((r for r, p, d, _ in rates if p >= 0.95 * r and d >= 0.95 * r),
                    default=0.0)
    print(f"sustained: {sustained:g} views/s")

    if args.append:
        cmd = "python bench/ui_render.py " + " ".join(argv if argv is not None else
                                                       sys.argv[1:])
        lines = [
            "",
            "## Dashboard render (`bench/ui_render.py`)",
            "",
            f"Command: `{cmd.strip()}` — {platform.python_version()}, {os.cpu_count()} cores, "
            f"headless pilot at {w}×{h}, {len(DEVICES)} devices × 12 stages "
            f"({rows} rows per phase), Textual {_textual_version()}.",
            "",
            "| bottom pane | view handler mean / p99 (ms) | CPU per update incl. layout and "
            "repaint, mean / p99 (ms) | full-screen frame mean / p99 (ms) |",
            "|---|---:|---:|---:|",
            *(f"| {r[0]} | {r[1]:.2f} / {r[2]:.2f} | {r[3]:.2f} / {r[4]:.2f} | "
              f"{r[5]:.2f} / {r[6]:.2f} |" for r in results),
            "",
            "*View handler*: the `ViewUpdated` handler (every widget updated in place), wall "
            "time. *CPU per update*: process CPU time from `show_view` until the app is idle "
            "again (dispatch, handler, layout, repaint of the changed regions), minus the "
            f"{idle_ms:.1f} ms CPU the pilot's idle wait costs with nothing to do. "
            "*Full-screen frame*: repainting every line of the screen as ANSI (the worst "
            "case a terminal receives).",
            "",
            "| engine aims at (views/s) | posted (views/s) | drawn (views/s) "
            "| process CPU (% of a core) |",
            "|---:|---:|---:|---:|",
            *(f"| {r:g} | {p:.1f} | {d:.1f} | {c:.0f} |" for r, p, d, c in rates),
            "",
            f"Sustained without falling behind (posted and drawn ≥ 95 % of the aim, engine "
            f"and UI on one loop): **{sustained:g} views/s**; the "
            "engine publishes a few per second. Above that, older queued views are replaced "
            "by newer ones (`ViewUpdated.can_replace`), so the screen shows the newest view "
            "instead of a growing backlog.",
            "",
        ]
        with open(args.append, "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines))
        print(f"appended to {args.append}")
    return 0


def _textual_version() -> str:
    from importlib.metadata import version

    return version("textual")


if __name__ == "__main__":
    raise SystemExit(main())
