"""The monitor's loop on the simulator: detection against ground truth, alerts, CLI."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from prism_sim.labels import read_labels
from prism_sim.scenario import parse_scenario
from prism_sim.server import SimServer
from prism_tui.engine.core import DetectionConfig, Engine
from prism_tui.engine.evaluate import match, score
from prism_tui.engine.iterations import Iteration
from prism_tui.engine.monitor import AlertEvent, Monitor, MonitorConfig, Observation, Subscribers
from prism_tui.engine.recording import ReplayClock, SpanRecorder, load_recording, replay
from probes.catalog import load_profile, parse_profile
from probes.target import Target
from tests.conftest import CTARGET_PROFILE, CTarget
from tests.sim_scenarios import scenario_file, sim_server, slowdown

ROOT = Path(__file__).resolve().parent.parent

FAULT = slowdown(20, 8, intensity=0.8)
"""The device at a fifth of its speed on rank 1. At 0.5 a clean-clone suite run measured
decode steps only 1.38x as long (the host part of a step is not slowed), an error of
~0.28 against the ``paper`` limits of 0.265 / 0.275 that run fitted: recall 0."""


class ListSink:
    def __init__(self) -> None:
        self.alerts: list[AlertEvent] = []

    def emit(self, alert: AlertEvent) -> None:
        self.alerts.append(alert)


def test_the_monitor_catches_a_fault_the_workload_does_not_explain(tmp_path: Path) -> None:
    path = scenario_file(tmp_path, 32, FAULT)
    labels_path = tmp_path / "labels.jsonl"
    sink = ListSink()
    judged: list[tuple[int, int, bool]] = []
    with SimServer(parse_scenario(path.read_text(), str(path)), labels=labels_path,
                   metrics_port=None) as server:
        rank_of = {pid: rank for rank, pid in server.rank_pids.items()}

        def on_observation(obs: Observation) -> None:
            if obs.verdict is not None:
                judged.append((rank_of[obs.iteration.pid], obs.iteration.end_ns,
                               obs.verdict.firing))

        stop = threading.Event()
        runner = threading.Thread(target=server.run, args=(32, stop), daemon=True)
        runner.start()
        targets = [Target(pid) for pid in server.rank_pids.values()]
        with Monitor(targets, load_profile("cuda"), extra_profiles=[load_profile("nccl")],
                     detection=DetectionConfig(rule="paper", warmup=500),
                     config=MonitorConfig(escalation_s=3),
                     subscribers=Subscribers(alerts=[sink], observation=on_observation)) as monitor:
            asyncio.run(monitor.run(32))
            series = monitor.engine.sketches.keys()  # a tuple, not a dict view
            deep_series = [k for k in series if k.phase == "deepdive"]
        stop.set()
        runner.join(10)
    labels = read_labels(labels_path)
    rows = [r for rank in (0, 1) for r in match(
        rank, [t for k, t, _ in judged if k == rank], [f for k, _, f in judged if k == rank],
        labels.iterations)]
    result = score(rows)
    # judged iterations: ~2,900 on a quiet host, 962 in one suite run on a slow one (the
    # simulator's steps run on the host's CPUs); enough to score the fault either way
    assert result["iterations"] > 500 and result["abnormal"] > 100, result
    # the fault is caught. False alarms are not asserted: the baseline sees batch size
    # only (context length is not in these call arguments yet), and they vary a lot
    # from run to run (FPR from 1.5 % to most of a run seen; docs/detection.md)
    # The reference rule (prism watch's default): this device slowdown (~1.6x) sits at
    # the prism rule's limit, which a noisy warm-up on this 2-vCPU VM puts at 0.3-0.46,
    # so with it the test measured the VM's noise (recall 0-0.5 in about half the runs);
    # docs/detection.md compares the two rules.
    # When it is missed, say with which limits.
    ucls = [round(d.ucl or 0.0, 3) for pid in monitor.engine.pids
            for d in monitor.engine._watched[pid].detectors.values()]
    assert result["recall"] > 0.5, (result, "UCL per rank", ucls)
    [fault] = labels.faults
    firing = [a for a in sink.alerts if a.status == "firing"]

    def episode_overlaps_fault(fire: AlertEvent) -> bool:
        ends = [a.iteration_end_ns for a in sink.alerts
                if a.status == "resolved" and a.fingerprint == fire.fingerprint
                and a.iteration_end_ns > fire.iteration_end_ns]
        resolved_at = min(ends, default=None)
        return fire.iteration_end_ns <= fault.end_ns and (
            resolved_at is None or resolved_at >= fault.start_ns)

    assert any(episode_overlaps_fault(a) for a in firing), sink.alerts
    for alert in sink.alerts:
        assert alert.iteration_end_ns <= alert.detected_at_ns  # emitted after the iteration
        assert alert.target["pid"] in rank_of and alert.phase == "decode"
        assert alert.predicted_ms is not None and alert.predicted_ms > 0
        assert alert.observed_ms > 0 and alert.summary
    resolved = [a for a in sink.alerts if a.status == "resolved"]
    assert {a.fingerprint for a in resolved} <= {a.fingerprint for a in firing}
    # DeepDive: a firing alert attached the deeper probes (kernel launches) for 3 s
    attached = [e for e in monitor.escalations if e[0] == "attached"]
    assert attached and all(n > 0 for _, _, n in attached), monitor.escalations
    assert len([e for e in monitor.escalations if e[0] == "detached"]) == len(attached)
    assert any(k.stage == "launch" for k in deep_series), deep_series


def test_prism_eval_prints_the_scores(tmp_path: Path) -> None:
    # 26 s: the monitor watches the child simulator from its attach to the scenario's
    # end, 1-3 s less than the scenario; the first 3 s are not trained on (eval starts
    # the ranks with the monitor), the warm-up ends 10 s later (about 16 iterations a
    # second per rank: 200 take longer) and the fit takes 1.5-3 s on a quiet host, more
    # under load, so > 100 judged iterations need the 8 s this leaves beyond 18 s (at 14 s
    # of scenario without the settling a loaded run judged 0-20 of them)
    path = scenario_file(tmp_path, 26)
    result = subprocess.run(
        [sys.executable, "-m", "prism_tui.cli", "eval", "--scenario", str(path),
         "--warmup", "200", "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    for key in ("precision", "recall", "f1", "fpr", "iterations", "alerts_firing",
                "alert_latency_ms", "detection_lag_iterations", "detection_delay_s",
                "alerts", "alerts_received"):
        assert key in doc
    assert set(doc["alert_latency_ms"]) >= {"p50", "p99"}
    # every alert went through the embedded broker to the subscriber
    assert doc["alerts_received"] == doc["alerts"], doc
    assert doc["iterations"] > 100 and doc["abnormal"] == 0  # no fault in this scenario
    # the default rule, and the episode figures beside the per-iteration ones
    assert doc["rule"] == "prism" and doc["warmup_s"] == 10.0 and doc["settle_s"] == 3.0
    episodes = doc["episodes"]
    assert episodes["fault_episodes"] == episodes["episodes_detected"] == 0
    assert episodes["false_episodes"] == episodes["alert_episodes"] == doc["alerts_firing"]


def test_prism_eval_overhead_runs_the_scenario_without_then_with_the_monitor() -> None:
    """``--overhead``: the same scenario first unwatched, then watched; their ratio.

    A sanity band only: this VM is noisy, and the figures belong in bench/. ``smoke``'s
    load is set by its arrivals, so its tokens/s hardly move with the monitor.
    """
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "prism_tui.cli", "eval", "--scenario", "smoke", "--duration",
         "6", "--overhead", "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    # two 6-s runs of the simulator, one after the other (not one under the monitor twice)
    assert time.monotonic() - started >= 12
    doc = json.loads(result.stdout)
    assert doc["scenario"] == "smoke" and doc["duration_s"] == 6
    without, with_monitor = doc["overhead"]["without"], doc["overhead"]["with"]
    # the unwatched run has the simulator's own figures only: nothing a monitor judged
    assert set(without) == set(with_monitor) == {"tokens_per_s", "iterations",
                                                 "decode_ms_mean"}, doc["overhead"]
    assert without["tokens_per_s"] > 0 and without["iterations"] > 0, without
    assert without["decode_ms_mean"] > 0, without
    assert with_monitor["tokens_per_s"] > 0 and with_monitor["iterations"] > 0, with_monitor
    ratio = doc["throughput_ratio"]
    assert isinstance(ratio, float) and math.isfinite(ratio), ratio
    assert 0.3 < ratio <= 1.5, doc["overhead"]
    assert ratio == round(with_monitor["tokens_per_s"] / without["tokens_per_s"], 4)
    latency = doc["decode_latency_ratio"]
    assert isinstance(latency, float) and 0.3 < latency < 3.0, doc["overhead"]
    # the monitor's own figures come from the watched run, through the embedded broker
    assert doc["alerts_received"] == doc["alerts"], doc


def test_prism_watch_headless_prints_snapshots_of_every_stage(tmp_path: Path) -> None:
    path = scenario_file(tmp_path, 30)
    with sim_server(path) as server:
        pid = server.rank_pids[0]
        result = subprocess.run(
            [sys.executable, "-m", "prism_tui.cli", "watch", "--pid", str(pid), "--headless",
             "--duration", "4"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    snaps = [x["snapshot"] for x in lines if "snapshot" in x]
    assert snaps
    stages = {row["stage"] for row in snaps[-1]["series"]}
    assert {"iteration", "device_sync", "collective", "memcpy", "host"} <= stages
    decode = [row for row in snaps[-1]["series"]
              if row["stage"] == "iteration" and row["phase"] == "decode"]
    assert decode and decode[0]["rate"] > 10 and decode[0]["p50_ms"] > 0
    row = decode[0]
    assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] <= row["p999_ms"] <= row["max_ms"]


def test_prism_watch_headless_stops_quietly_when_its_reader_goes_away(tmp_path: Path) -> None:
    """``prism watch --headless | head -1``: when the reader closes the pipe the monitor
    says so in one line and stops (probes detached), not a traceback per snapshot for
    the rest of ``--duration``."""
    path = scenario_file(tmp_path, 60)
    with sim_server(path) as server:
        watch = subprocess.Popen(
            [sys.executable, "-m", "prism_tui.cli", "watch", "--pid", str(server.rank_pids[0]),
             "--headless", "--no-history", "--duration", "50"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        assert watch.stdout is not None and watch.stderr is not None
        first = watch.stdout.readline()
        assert json.loads(first), first
        watch.stdout.close()  # the reader goes away, as `head -1` does
        try:
            err = watch.stderr.read()
            rc = watch.wait(timeout=40)  # well before --duration 50 ends
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait()
    assert rc == 0, err
    assert "standard output closed; stopping" in err, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_smoke_scenario_watched_headless_alerts_during_the_fault_only(tmp_path: Path) -> None:
    """The issue's end to end: built-in ``smoke`` → ``prism watch --headless`` by ``--match``
    → an alert during the device slowdown, none before it, resolved after it."""
    # the built-in smoke with its device at a quarter of its speed, not half: a half-speed
    # device makes iterations 40 % slower, and on a loaded host (noisy warm-up) the prism
    # rule's limit reaches its cap, a log error of 0.5 (x1.65), where runs missed the
    # fault entirely; at a quarter speed they are 2x slower (sensitivity to smaller
    # faults is measured by the benches, docs/detection.md)
    text = (ROOT / "prism_sim" / "scenarios" / "smoke.toml").read_text()
    assert "intensity = 0.5" in text
    scenario = parse_scenario(text.replace("intensity = 0.5", "intensity = 0.75"), "smoke")
    duration = scenario.duration_s
    assert duration is not None
    labels_path = tmp_path / "labels.jsonl"
    with SimServer(scenario, labels=labels_path, metrics_port=None) as server:
        started = time.monotonic()
        stop = threading.Event()
        runner = threading.Thread(target=server.run, args=(duration, stop), daemon=True)
        runner.start()
        try:
            # stop watching 4 s before the scenario ends: the watch ends a second or two
            # after its --duration (start-up, detach, final report), and the iterations
            # that ran beside that wind-down on the two CPUs were slow (a failed run: 22.8 ms
            # median, 37 ms max in the scenario's 41st second, 19.5 ms before) and fired
            watch_s = duration - (time.monotonic() - started) - 4
            result = subprocess.run(
                [sys.executable, "-m", "prism_tui.cli", "watch", "--match",
                 rf"prism_sim\.engine .*--comm-id {server.comm_id}", "--headless", "--json",
                 "--rule", "prism", "--warmup", "500", "--no-history",
                 "--record", str(tmp_path / "spans.jsonl.gz"), "--duration", f"{watch_s:.1f}"],
                capture_output=True, text=True, timeout=duration + 60, cwd=ROOT,
                # episodes close 2 s after the detector clears (default 5 s): the
                # resolve lands well inside the 9 s the scenario runs after its fault
                env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                     "XDG_STATE_HOME": str(tmp_path / "state"),
                     "PRISM_ENGINE_ALERT_CLOSE_MS": "2000"})
        finally:
            stop.set()
            runner.join(10)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert {t["pid"] for t in doc["targets"]} == set(server.rank_pids.values()), doc["targets"]
    # the default backend (auto) takes eBPF here (root, the compiled program), and says so
    assert {t["backend"] for t in doc["targets"]} == {"bpf"}, doc["targets"]
    assert doc["iterations"].get("decode", 0) > 1000, doc["iterations"]
    [fault] = read_labels(labels_path).faults
    alerts = [a for a in doc["alerts"] if a["source"] == "detector"]
    firing = [a for a in alerts if a["status"] == "firing"]
    summary = [(a["status"], a["fingerprint"][:8], (a["iteration_end_ns"] - fault.start_ns) / 1e9)
               for a in alerts]  # seconds from the fault's start, for the failure message
    assert firing, summary
    assert all(a["iteration_end_ns"] >= fault.start_ns for a in firing), summary  # none before
    assert any(a["iteration_end_ns"] <= fault.end_ns for a in firing), summary  # during it
    # every alert fired during the fault is resolved after it fired. Not asserted: that
    # one page lasts exactly the fault. The detector's per-iteration recall on this 10-s
    # fault ranged 0.43-0.9; with episodes closing 2 s after it clears, a run on a loaded
    # host resolved 9.3 s into the fault, and the backlog a fault leaves is real slowness
    # for seconds after it (a run's labels: decode medians of 26.7, 25.7, 21.4 ms in the
    # three seconds after it, 19.5 ms before, with 25 % more KV tokens), where another run
    # fired again 5.4 s after it. The false-positive check is the 20 s before the fault.
    for a in firing:
        if a["iteration_end_ns"] <= fault.end_ns:
            assert any(r["status"] == "resolved" and r["fingerprint"] == a["fingerprint"]
                       and r["iteration_end_ns"] > a["iteration_end_ns"]
                       for r in alerts), summary
    # the recording replays offline through the same engine and detector
    bench = subprocess.run(
        [sys.executable, "bench/detector_sim.py", "--spans", str(tmp_path / "spans.jsonl.gz"),
         "--labels", str(labels_path), "--warmup", "500", "--rules", "prism", "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bench.returncode == 0, bench.stderr
    replayed = json.loads(bench.stdout)
    assert replayed["input"]["iterations"] > 1000, replayed["input"]
    [prism] = replayed["results"]
    # the replay's own detection: the fault is an episode it pages (its per-iteration
    # recall on this 10-s fault ranged 0.43-0.9 over runs: not a figure to assert)
    assert prism["alerts"] >= 1 and prism["episodes"]["episodes_detected"] >= 1, prism


def test_the_profiles_phase_rule_reaches_the_live_iterations(ctarget: CTarget) -> None:
    """A profile whose rule says half of each step decodes: every iteration the monitor
    cuts from the real target by uprobes is ``mixed`` (the anchor is its one call)."""
    profile = parse_profile(CTARGET_PROFILE.replace(
        'anchor = "work"', 'anchor = "work"\nphase_rule = "calls.work / 2"'), "ctarget")
    phases: list[str] = []
    ctarget.cmd("spin_start 2000")
    with Monitor([Target(ctarget.pid)], profile, detection=DetectionConfig(warmup=100_000),
                 config=MonitorConfig(escalation_s=0, telemetry=False),
                 subscribers=Subscribers(
                     observation=lambda obs: phases.append(obs.iteration.phase))) as monitor:
        asyncio.run(monitor.run(1.0))
    assert len(phases) > 50
    assert set(phases) == {"mixed"}


_Row = tuple[int, float, float, int]
"""An iteration's end, latency in ms, runqueue stage in ms, and stages minus latency."""


def test_a_busy_cpu_shows_as_the_runqueue_stage(ctarget: CTarget, tmp_path: Path) -> None:
    """The anchor's thread computes 2 ms of CPU time per iteration on one CPU; with two
    busy processes on that CPU it waits for it two thirds of the time, and that wait is
    the iterations' ``runqueue`` stage (from ``schedstat``, read as each one arrives),
    taken out of ``host`` first: stages still add up to the iteration. A recording of the busy
    run keeps the readings: replayed, it gives every iteration the same stage."""
    cpu = max(os.sched_getaffinity(0))
    ctarget.cmd("burn_start 2000")
    for task in os.listdir(f"/proc/{ctarget.pid}/task"):
        os.sched_setaffinity(int(task), {cpu})
    profile = parse_profile(CTARGET_PROFILE, "ctarget")
    def row(it: Iteration) -> _Row:
        return (it.end_ns, it.latency_ms, it.stages.get("runqueue", 0) / 1e6,
                sum(it.stages.values()) - (it.end_ns - it.start_ns))

    def watch(recorder: SpanRecorder | None = None) -> list[_Row]:
        rows: list[_Row] = []
        with Monitor([Target(ctarget.pid)], profile, detection=DetectionConfig(warmup=100_000),
                     config=MonitorConfig(escalation_s=0, telemetry=False),
                     subscribers=Subscribers(
                         observation=lambda obs: rows.append(row(obs.iteration)),
                         spans=recorder.add if recorder else None,
                         run_queue=recorder.add_run_queue if recorder else None)) as monitor:
            asyncio.run(monitor.run(1.5))
            if recorder is not None:
                recorder.close(monitor.recorded_processes())
        assert len(rows) > 50 and {extra for *_, extra in rows} == {0}
        return rows

    def share(rows: list[_Row]) -> float:
        return sum(r[2] for r in rows) / sum(r[1] for r in rows)

    quiet = share(watch())
    code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
    hogs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    path = tmp_path / "busy.spans.gz"
    try:
        time.sleep(0.3)
        busy = watch(SpanRecorder(str(path)))
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert share(busy) > 0.4 and share(busy) > quiet + 0.3, (quiet, share(busy))
    assert sum(r[1] for r in busy) / len(busy) > 4.0  # 2 ms of work, 3x as long

    rec = load_recording(str(path))
    # one reading per batch the anchor's return wakes the reader for: one per iteration,
    # but two iterations share a batch when the loop was late (246 iterations gave 243
    # readings in one loaded run); the replay below must give every iteration its stage
    assert len(rec.run_queue) >= 0.9 * len(busy)
    clock = ReplayClock(rec.spans[0].start_ns)
    replayed: list[_Row] = []
    engine = Engine(DetectionConfig(warmup=100_000), clock=clock,
                    on_observation=lambda obs: replayed.append(row(obs.iteration)))
    replay(engine, clock, rec.processes, rec.spans, run_queue=rec.run_queue)
    assert replayed == busy
    # without the readings the replay has no runqueue stage at all
    plain: list[_Row] = []
    clock = ReplayClock(rec.spans[0].start_ns)
    engine = Engine(DetectionConfig(warmup=100_000), clock=clock,
                    on_observation=lambda obs: plain.append(row(obs.iteration)))
    replay(engine, clock, rec.processes, rec.spans)
    assert [r[:2] for r in plain] == [r[:2] for r in busy] and share(plain) == 0


