"""``prism demo``: the main job on an embedded default.

It starts the simulated tensor-parallel inference server in a child process (the
``demo`` scenario: steady load, then a fault every 40 s or so), an embedded MQTT broker
on a free loopback port, and the monitor attached to every rank by uprobes with the
unchanged ``cuda`` and ``nccl`` catalog profiles — exactly as it would attach to a real
engine — and opens the dashboard. Alerts go through the broker with a durable outbox;
history goes to SQLite. On quit, Ctrl-C or SIGTERM every child process stops and no
shared memory is left.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from typing import Any

from alerting.broker import EmbeddedBroker
from alerting.config import BrokerConfig
from prism_sim.errors import ScenarioError, SimError
from prism_sim.scenario import load_scenario
from prism_tui.alert_wire import JsonLinesSink
from prism_tui.dashboard_view import DashboardView
from prism_tui.engine.monitor import MonitorConfig
from prism_tui.live import LiveSession
from prism_tui.scheduling import go_realtime, request_short_slice
from prism_tui.session import SETTLE_S, SessionSpec, build_session, run_headless
from prism_tui.settings import EngineSettings, HistorySettings
from prism_tui.sim_child import SimChild
from probes.catalog import load_profile
from probes.governor import calibrate
from probes.perf import check_permission
from probes.target import Target


def run_demo(duration_s: float | None = None, *, scenario: str = "demo",
             warmup: int = 1000, warmup_s: float = 10.0, headless: bool = False,
             history_db: str | None = None,
             broker_url: str | None = None, realtime: int = 0) -> int:
    """Run the demo until quit (or ``duration_s``); returns the exit code.

    ``warmup``, ``warmup_s``: the baseline is fitted after that many decode iterations
    or seconds, whichever first (the detector rule and alert holds are the defaults of
    ``prism watch``). ``realtime``: a ``SCHED_FIFO`` priority for the loop and the
    embedded broker (0: off).
    """
    check_permission()  # exit 3 with what to grant, before anything starts
    try:
        spec = load_scenario(scenario)
    except ScenarioError as exc:
        print(f"prism demo: {exc}", file=sys.stderr)
        return 2
    costs = calibrate(bpf=True)  # the demo's backend is auto: bpf where it loads
    # the rule and alert holds prism watch uses by default, the warm-up asked for
    engine = EngineSettings(warmup_iterations=warmup, warmup_s=warmup_s)
    notices: list[str] = []
    tmp = tempfile.TemporaryDirectory(prefix="prism-demo-")
    broker: EmbeddedBroker | None = None
    why = go_realtime(realtime, "the monitor's loop")
    if why:
        notices.append(why)
    try:
        if broker_url is None:
            broker = EmbeddedBroker().start()
            broker_url = broker.url
            if broker.pid is not None:  # the alert's next hop: see prism_tui.scheduling
                request_short_slice(broker.pid)
                why = go_realtime(realtime, "the embedded broker", broker.pid)
                if why:
                    notices.append(why)
            if broker.notice:
                notices.append(broker.notice)
        # the server in its own process, as a real one is (see prism_tui.sim_child)
        with SimChild(scenario, duration_s, on_log=notices.append) as server:
            targets = [Target(pid) for pid in server.rank_pids.values()]
            history_db = history_db or os.path.join(tmp.name, "history.sqlite")
            session_spec = SessionSpec(
                targets, load_profile("cuda"), [load_profile("nccl")],
                engine=engine, monitor=MonitorConfig(), costs=costs, settle_s=SETTLE_S,
                history=HistorySettings(db=history_db), broker=BrokerConfig(url=broker_url),
                outbox_path=os.path.join(tmp.name, "outbox.sqlite"))
            session = build_session(session_spec, alert_sinks=[JsonLinesSink()] if headless else [])
            session.notice(f"simulator: {len(targets)} ranks, scenario "
                                  f"{spec.name!r}; broker {broker_url}")
            try:
                _run(session, notices, duration_s, headless, history_db)
            finally:
                session.close()
    except (SimError, OSError) as exc:
        print(f"prism demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if broker is not None:
            broker.close()
        tmp.cleanup()
    if headless:
        print("demo finished: every simulator process stopped, shared memory removed")
    return 0


def _run(session: LiveSession, notices: list[str], duration_s: float | None,
         headless: bool, history_db: str) -> None:
    def forward_notices() -> None:
        while notices:
            session.notice(notices.pop(0))

    if headless:
        def on_view(view: DashboardView) -> None:
            forward_notices()

        run_headless(session, on_view, duration_s)
        return
    from prism_tui.ui.app import PrismApp

    async def run_engine(show: Any, stop: asyncio.Event) -> None:
        def on_view(view: DashboardView) -> None:
            forward_notices()
            show(view)

        await session.run(on_view, stop, duration_s)

    app = PrismApp(engine=run_engine, control=session.monitor,
                   history_db=history_db,
                   title="LatencyPrism demo")
    app.run()
