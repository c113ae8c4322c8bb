"""A profile that names no anchor, or one that never fires: the monitor chooses one from
the spans (a simulator rank's; the C target's serve loop).

Real parts only: the simulator's ranks, real uprobes on its fake CUDA runtime, and the
``cuda`` profile copied without its ``anchor`` key. The same rank is watched at the same
time with the named anchor, so the discovered one can be compared iteration for iteration.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from prism_tui.engine.core import DetectionConfig
from prism_tui.engine.monitor import (
    Monitor,
    MonitorConfig,
    Observation,
    ProbingConfig,
    Subscribers,
)
from probes.catalog import BUILTIN_DIR, Profile, load_profile, parse_profile
from probes.target import Target
from tests.conftest import SERVER_PROFILE, CTarget
from tests.sim_scenarios import scenario_file, scenario_text, sim_server

ROOT = Path(__file__).resolve().parent.parent

IDLE_S = 8
"""The scenario's first seconds: no request arrives, the ranks make no call."""


def _anchorless_cuda(tmp_path: Path) -> Profile:
    """The built-in ``cuda`` profile without its ``anchor = ...`` line."""
    lines = (BUILTIN_DIR / "cuda.toml").read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith("anchor =")]
    assert len(kept) == len(lines) - 1
    path = tmp_path / "cuda_anchorless.toml"
    path.write_text("".join(kept))
    profile = load_profile(str(path))
    assert profile.anchors == ()
    return profile


def _decode_ends(observations: list[Observation]) -> list[int]:
    return sorted(o.iteration.end_ns for o in observations if o.iteration.phase == "decode")


def _run_both(*monitors: Monitor, seconds: float, until: Callable[[], bool]) -> None:
    """Run the monitors side by side until ``until()`` holds (checked every 0.1 s) or
    ``seconds`` passed."""
    async def both() -> None:
        stop = asyncio.Event()

        async def stop_once_done() -> None:
            while not stop.is_set():
                if until():
                    stop.set()
                await asyncio.sleep(0.1)

        checker = asyncio.create_task(stop_once_done())
        await asyncio.gather(*(m.run(seconds, stop) for m in monitors))
        stop.set()
        await checker

    asyncio.run(both())


def test_an_anchor_is_chosen_from_the_spans_and_cuts_the_same_iterations(
        tmp_path: Path) -> None:
    anchorless = _anchorless_cuda(tmp_path)
    load = "[[phase]]\nstart_s = 0\narrival_rate = 20.0\n"
    text = scenario_text(40)
    assert load in text
    path = tmp_path / "idle_then_load.toml"
    path.write_text(text.replace(load, "[[phase]]\nstart_s = 0\narrival_rate = 0\n\n"
                                 f"[[phase]]\nstart_s = {IDLE_S}\narrival_rate = 20.0\n"))
    with sim_server(path) as server:
        pid = server.rank_pids[0]
        # idle ranks: nothing recurs, the monitor says so once and keeps looking; no
        # iteration is made up
        notices: list[str] = []  # the monitor's own, told to its subscriber
        with Monitor([Target(pid)], anchorless, detection=DetectionConfig(warmup=100_000),
                     config=MonitorConfig(escalation_s=0, telemetry=False,
                                           anchor_discovery_s=1.0),
                     subscribers=Subscribers(notice=notices.append)) as idle:
            asyncio.run(idle.run(2.0))
            engine_notices = idle.engine.view().notices
        assert not any("anchor" in n for n in engine_notices), engine_notices  # not the engine's
        assert idle.anchor is None and idle.anchor_choice is None
        assert idle.engine.iterations_seen == 0
        assert sum("no iteration anchor after 1 s" in n for n in notices) == 1, notices

        # attached while idle, the requests start a few seconds later (the ranks serve
        # on their own; server.run only drives faults)
        found: list[Observation] = []
        named: list[Observation] = []
        notices.clear()
        with Monitor([Target(pid)], anchorless, detection=DetectionConfig(warmup=100_000),
                     config=MonitorConfig(escalation_s=0, telemetry=False),
                     subscribers=Subscribers(observation=found.append,
                                             notice=notices.append)) as discovering, \
                Monitor([Target(pid)], load_profile("cuda"),
                        detection=DetectionConfig(warmup=100_000),
                        config=MonitorConfig(escalation_s=0, telemetry=False),
                        subscribers=Subscribers(observation=named.append)) as reference:
            def both_saw_4_s_of_load() -> bool:
                mine, theirs = _decode_ends(found), _decode_ends(named)
                return bool(mine and theirs) and (
                    min(mine[-1], theirs[-1]) - max(mine[0], theirs[0]) >= 4e9)

            # until both saw 4 s of the load (at most IDLE_S + 4 s: as long as before)
            _run_both(discovering, reference, seconds=IDLE_S + 4.0,
                      until=both_saw_4_s_of_load)

    choice = discovering.anchor_choice
    assert choice is not None and choice.accepted
    # the simulator's step ends with cudaStreamSynchronize, once per iteration
    assert discovering.anchor == choice.probe == "stream_sync", choice
    assert any(n.startswith("iteration anchor: stream_sync") for n in notices), notices
    # its cycle was measured on the first 20-60 iterations of the load, while the batches
    # grow (measured 10-14 ms, then 13-14 ms): an iteration's length, not a kernel's
    # (< 1 ms) nor several iterations'
    first = sorted(named, key=lambda o: o.iteration.end_ns)[:60]
    ref_ms = statistics.median(o.iteration.latency_ms for o in first)
    print(f"\nchosen {choice.probe}: cycle {choice.median_cycle_ms:.2f} ms, "
          f"{choice.calls_per_s:.1f} calls/s ({choice.reason}); named-anchor median "
          f"iteration {ref_ms:.2f} ms (first 60), "
          f"{statistics.median(o.iteration.latency_ms for o in named):.2f} ms (all)")
    assert 0.5 * ref_ms <= choice.median_cycle_ms <= 1.5 * ref_ms

    # the held spans were fed through: over the time both watched, the same decode
    # iterations (each monitor's uprobes saw every call; allow one at either edge). The
    # choice needs 20 calls, so the first ~20 iterations of that time came from spans
    # held during discovery: had they been dropped, the counts would differ by as many.
    mine, theirs = _decode_ends(found), _decode_ends(named)
    assert len(mine) > 100 and len(theirs) > 100
    lo, hi = max(mine[0], theirs[0]), min(mine[-1], theirs[-1])
    common_mine = [t for t in mine if lo <= t <= hi]
    common_theirs = [t for t in theirs if lo <= t <= hi]
    rate_mine = (len(common_mine) - 1) / ((hi - lo) / 1e9)
    rate_theirs = (len(common_theirs) - 1) / ((hi - lo) / 1e9)
    print(f"decode iterations over {(hi - lo) / 1e9:.2f} s: discovered {len(common_mine)} "
          f"({rate_mine:.1f}/s), named {len(common_theirs)} ({rate_theirs:.1f}/s); "
          f"all: discovered {len(mine)}, named {len(theirs)}")
    assert abs(len(common_mine) - len(common_theirs)) <= 2
    assert abs(rate_mine - rate_theirs) <= 0.05 * rate_theirs


def test_prism_watch_takes_a_profile_without_an_anchor(tmp_path: Path) -> None:
    profile = _anchorless_cuda(tmp_path)
    assert profile.anchors == ()
    with sim_server(scenario_file(tmp_path, 30)) as server:
        result = subprocess.run(
            [sys.executable, "-m", "prism_tui.cli", "watch", "--pid",
             str(server.rank_pids[0]), "--profile", str(tmp_path / "cuda_anchorless.toml"),
             "--headless", "--no-history", "--duration", "4"],
            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    snaps = [json.loads(line)["snapshot"] for line in result.stdout.splitlines()
             if line.startswith('{"snapshot"')]
    decode = [row for row in snaps[-1]["series"]
              if row["stage"] == "iteration" and row["phase"] == "decode"]
    assert decode and decode[0]["rate"] > 10, snaps[-1]


SILENT_ANCHOR_PROFILE = SERVER_PROFILE.replace('anchor = "step"', 'anchor = "work"') + """
[[probe]]
id = "work"
library = "exe"
symbol = "pl_work"
stage = "host"
"""
"""The serve loop's profile with an anchor (``pl_work``) the loop never calls."""


def test_a_named_anchor_that_never_fires_is_replaced_by_one_chosen_from_the_spans(
        ctarget: CTarget) -> None:
    """The profile's anchor (``pl_work``) is never called by the serve loop, whose step
    (``pl_step``, every ~5 ms, 20 ``pl_op`` calls each) is what iterates: after the
    silence the monitor says so once, chooses ``step`` from the spans, and cuts
    iterations at it."""
    ctarget.cmd("serve_start 5000 20")
    profile = parse_profile(SILENT_ANCHOR_PROFILE, "ctarget-silent")
    notices: list[str] = []
    said_at: list[float] = []
    observed: list[Observation] = []

    def notice(line: str) -> None:
        notices.append(line)
        if "has not fired" in line:
            said_at.append(time.time())

    # a governor budget the op probe exceeds (~3,800 calls/s): it must not act before
    # the anchor is known (4 s: it would have detached op by then), and never on the
    # chosen one
    with Monitor([Target(ctarget.pid)], profile, detection=DetectionConfig(warmup=100_000),
                 probing=ProbingConfig(overhead_budget=0.0005),
                 config=MonitorConfig(escalation_s=0, telemetry=False, anchor_silence_s=4.0),
                 subscribers=Subscribers(notice=notice,
                                         observation=observed.append)) as monitor:
        asyncio.run(monitor.run(9.0))
    decisions = monitor.governor_decisions
    assert decisions and said_at, (decisions, notices)
    assert all(wall >= said_at[0] for _, _, wall in decisions), (decisions, notices)
    assert all(d.probe != "step" for _, d, _ in decisions), decisions
    silent = [n for n in notices if "has not fired" in n]
    assert len(silent) == 1 and "'work'" in silent[0], notices
    assert "choosing one from the spans" in silent[0]
    assert monitor.anchor == "step", notices
    choice = monitor.anchor_choice
    assert choice is not None and choice.probe == "step"
    # its cycle is a step's (~5 ms sleep + 20 ops), not an op's
    assert 3.0 <= choice.median_cycle_ms <= 50.0, choice
    ends = [o.iteration.end_ns for o in observed]
    assert len(ends) > 100, (len(ends), notices)
    assert {o.iteration.pid for o in observed} == {ctarget.pid}


def test_a_named_anchor_that_fires_is_kept(ctarget: CTarget) -> None:
    """The same profile with the loop calling its anchor: no silence notice, no change."""
    ctarget.cmd("spin_start 2000")
    ctarget.cmd("serve_start 5000 20")
    profile = parse_profile(SILENT_ANCHOR_PROFILE, "ctarget-silent")
    notices: list[str] = []
    observed: list[Observation] = []
    # keep_spans=False, as headless sessions run: iterations built, no spans kept
    with Monitor([Target(ctarget.pid)], profile, detection=DetectionConfig(warmup=100_000),
                 config=MonitorConfig(escalation_s=0, telemetry=False, anchor_silence_s=1.5,
                                      keep_spans=False),
                 subscribers=Subscribers(notice=notices.append,
                                         observation=observed.append)) as monitor:
        asyncio.run(monitor.run(3.0))
        assert observed and monitor.engine.recent_spans(60.0) == []
    assert monitor.anchor == "work" and monitor.anchor_choice is None
    assert not [n for n in notices if "has not fired" in n], notices


def test_of_a_profiles_alternative_anchors_the_one_that_fires_cuts_iterations(
        ctarget: CTarget) -> None:
    """``anchor = ["work", "step"]``, as llama.cpp's profile names ``llama_decode`` and
    ``llama_process``: the serve loop calls only ``pl_step``, which is taken as soon as
    it fires (no silence to wait out, no ranking), and the steps before the choice are
    cut too."""
    ctarget.cmd("serve_start 5000 20")
    profile = parse_profile(SILENT_ANCHOR_PROFILE.replace('anchor = "work"',
                                                          'anchor = ["work", "step"]'),
                            "ctarget-alternatives")
    assert profile.anchors == ("work", "step")
    notices: list[str] = []
    observed: list[Observation] = []
    with Monitor([Target(ctarget.pid)], profile, detection=DetectionConfig(warmup=100_000),
                 config=MonitorConfig(escalation_s=0, telemetry=False, anchor_silence_s=30.0),
                 subscribers=Subscribers(notice=notices.append,
                                         observation=observed.append)) as monitor:
        t0 = time.monotonic_ns()
        asyncio.run(monitor.run(3.0))
        t1 = time.monotonic_ns()
    assert monitor.anchor == "step" and monitor.anchor_choice is None, notices
    chosen = [n for n in notices if n.startswith("iteration anchor:")]
    assert chosen == [f"iteration anchor: step, the first of profile {profile.name!r}'s "
                      "anchors to fire (not work)"], notices
    assert not [n for n in notices if "has not fired" in n or "choosing" in n], notices
    ends = sorted(o.iteration.end_ns for o in observed)
    # a step every ~5 ms for 3 s: the held ones were cut as well (the first within
    # half a second of the start, not from the choice on)
    assert len(ends) > 200 and ends[0] - t0 < 500_000_000, (len(ends), notices)
    assert ends[-1] <= t1
