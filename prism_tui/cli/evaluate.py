"""``prism eval``: the simulator under a headless monitor, scored against its labels, with
the alert latency measured at a real subscriber (a live target: ``prism_tui.eval_target``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time

from prism_tui.cli.common import (
    UsageError,
    favour_the_loop,
    realtime_arg,
    try_realtime,
)
from prism_tui.evaluation import fault_scores, percentiles, run_and_receive, throughput


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command and its flags."""
    ev = sub.add_parser("eval", help="simulator + headless monitor, scored against the labels; "
                        "or a live target with injected faults")
    live = ev.add_mutually_exclusive_group()
    live.add_argument("--pid", type=int, help="a live target instead of the simulator "
                      "(with --faults)")
    live.add_argument("--match", metavar="REGEX", help="a live target by its command line "
                      "(with --faults)")
    ev.add_argument("--faults", metavar="FILE", help="with --pid/--match: a TOML timeline of "
                    "[[fault]] tables (type, start_s, duration_s, intensity) injected into it")
    ev.add_argument("--profile", metavar="NAME|FILE", help="with --pid/--match: the probe "
                    "profile (default: chosen from the target's libraries, as prism watch)")
    ev.add_argument("--scenario", default="smoke", metavar="NAME|FILE",
                    help="built-in scenario name, a TOML file or random:SEED (default: smoke)")
    ev.add_argument("--duration", type=float, default=None, metavar="S")
    ev.add_argument("--rule", choices=("paper", "prism"), default=None,
                    help="detection rule (default: settings, prism)")
    ev.add_argument("--warmup", type=int, default=None, metavar="N",
                    help="decode iterations before the baseline is fitted (default 1000)")
    ev.add_argument("--warmup-s", type=float, default=None, metavar="S",
                    help="... or seconds they span, whichever comes first (default 10)")
    ev.add_argument("--labels", metavar="FILE", help="keep the labels file here")
    ev.add_argument("--record", metavar="FILE", help="save the spans (gzip JSON lines) "
                    "for offline replay, e.g. by bench/detector_sim.py")
    ev.add_argument("--overhead", action="store_true", help="also run the scenario without "
                    "the monitor first and report throughput_ratio (with / without)")
    ev.add_argument("--broker", metavar="URL", help="publish through this broker (default: "
                    "an embedded one); alert latency is measured at a real subscriber")
    ev.add_argument("--json", action="store_true", help="print one JSON document")
    realtime_arg(ev, default=0)
    return ev


def run(args: argparse.Namespace) -> int:
    """``prism eval``: the simulator watched by the monitor, scored against its labels
    (or, with ``--pid``/``--match``, a live target against injected faults)."""
    favour_the_loop()
    if args.pid is not None or args.match is not None:
        from prism_tui.eval_target import cmd_eval_target

        return cmd_eval_target(args)
    if args.faults is not None or args.profile is not None:
        raise UsageError("--faults and --profile go with a live target (--pid or --match)")
    from alerting.broker import EmbeddedBroker
    from alerting.config import BrokerConfig
    from prism_sim.errors import ScenarioError
    from prism_sim.labels import read_labels
    from prism_sim.scenario import load_scenario
    from prism_tui.engine.evaluate import (
        alert_episodes,
        detection_delay_s,
        detection_lag,
        match,
        score,
        score_episodes,
    )
    from prism_tui.engine.monitor import MonitorConfig, Observation
    from prism_tui.scheduling import request_short_slice
    from prism_tui.session import SETTLE_S, SessionSpec, build_session, span_recorder
    from prism_tui.settings import load_settings
    from prism_tui.sim_child import SimChild
    from probes.catalog import load_profile
    from probes.perf import check_permission
    from probes.target import Target

    engine_settings = dataclasses.replace(load_settings(None, overrides={
        "engine.detector_rule": args.rule, "engine.warmup_iterations": args.warmup,
        "engine.warmup_s": args.warmup_s}).engine, slo=())  # scored on the detector alone
    check_permission()
    try_realtime(args.realtime)
    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        raise UsageError(str(exc)) from exc
    duration = args.duration or scenario.duration_s
    if not duration:
        raise UsageError(f"scenario {scenario.name!r} runs until stopped: give --duration")
    tmp = tempfile.TemporaryDirectory(prefix="prism-eval-")
    labels_path = args.labels or os.path.join(tmp.name, "labels.jsonl")
    judged: dict[int, list[tuple[int, bool]]] = {}
    unwatched = None
    if args.overhead:  # the same scenario and seed, first without the monitor
        bare_labels = os.path.join(tmp.name, "bare.jsonl")
        with SimChild(args.scenario, duration, bare_labels) as bare:
            time.sleep(duration)
            unwatched = throughput(bare.finish(duration + 30), bare_labels, duration)
    with SimChild(args.scenario, duration, labels_path) as sim:
        rank_of = {pid: rank for rank, pid in sim.rank_pids.items()}

        def on_observation(obs: Observation) -> None:
            if obs.verdict is not None:
                judged.setdefault(rank_of[obs.iteration.pid], []).append(
                    (obs.iteration.end_ns, obs.verdict.firing))

        started_ns = sim.started_ns
        targets = [Target(pid) for pid in sim.rank_pids.values()]
        with contextlib.ExitStack() as stack:
            recorder = span_recorder(args.record)
            if recorder is not None:
                stack.callback(recorder.discard)  # a run that fails leaves no temp file
            broker_url = args.broker
            if broker_url is None:
                broker = stack.enter_context(EmbeddedBroker().start())
                broker_url = broker.url
                if broker.pid is not None:  # the alert's next hop
                    request_short_slice(broker.pid)
                    try_realtime(args.realtime, "the embedded broker", broker.pid)
            spec = SessionSpec(targets, load_profile("cuda"), [load_profile("nccl")],
                               engine=engine_settings, monitor=MonitorConfig(telemetry=False,
                                                                     keep_spans=False),
                               broker=BrokerConfig(url=broker_url),
                               outbox_path=os.path.join(tmp.name, "outbox.sqlite"),
                               settle_s=SETTLE_S)  # it starts the ranks with the monitor
            session = build_session(spec, observer=on_observation, recorder=recorder)
            monitor = session.monitor
            stack.callback(session.close)
            left = duration - (time.monotonic_ns() - started_ns) / 1e9
            received = run_and_receive(session, max(left, 0.0), args.realtime)
            alerts = list(monitor.alerts)
            if recorder is not None:
                n = recorder.close(monitor.recorded_processes())
                print(f"prism eval: {n} spans saved to {recorder.path}", file=sys.stderr)
        watched = throughput(sim.finish(), labels_path, duration)
    read = read_labels(labels_path)
    labels = read.iterations
    rows = [row for rank, items in sorted(judged.items())
            for row in match(rank, [t for t, _ in items], [f for _, f in items], labels)]
    result = score(rows)
    episodes = score_episodes(rows, alert_episodes(alerts, rank_of), read.faults)
    firing = [a for a in alerts if a.status == "firing"]
    # end to end: the anomalous iteration's end → receipt by a real MQTT subscriber
    latencies = sorted((received[a.id] - a.iteration_end_ns) / 1e6 for a in alerts
                       if a.id in received)
    # the two halves: iteration end → the engine's verdict, verdict → subscriber
    detect = sorted((a.detected_at_ns - a.iteration_end_ns) / 1e6 for a in alerts)
    deliver = sorted((received[a.id] - a.detected_at_ns) / 1e6 for a in alerts
                     if a.id in received)
    doc = {
        "scenario": scenario.name, "duration_s": duration,
        "rule": engine_settings.detector_rule, "warmup": engine_settings.warmup_iterations,
        "warmup_s": engine_settings.warmup_s, "settle_s": SETTLE_S,
        "alert_holds": dataclasses.asdict(engine_settings.episode_holds()),
        # the paper's per-iteration scores, then what an on-call sees: alert episodes
        **result, "episodes": episodes, "detection_lag_iterations": detection_lag(rows),
        "detection_delay_s": detection_delay_s(rows), "alerts": len(alerts),
        "alerts_firing": len(firing), "alerts_resolved": len(alerts) - len(firing),
        "alerts_received": len(received),
        "alert_latency_ms": {"p50": latencies[len(latencies) // 2] if latencies else None,
                             "p99": latencies[min(len(latencies) - 1,
                                                  int(len(latencies) * 0.99))]
                             if latencies else None,
                             "max": latencies[-1] if latencies else None},
        "detect_latency_ms": percentiles(detect),
        "delivery_latency_ms": percentiles(deliver),
        # every fault window: its measured slowdown and what the injector measurably did
        # (a window where it did not bite is scored as abnormal all the same, and shows
        # here), with the iterations judged under it
        "faults": fault_scores(rows, read, started_ns),
        # every alert's own figures, to find what the slow ones had in common
        "alert_log": [
            {"status": a.status, "pid": a.target.get("pid"), "at_s": round(
                (a.iteration_end_ns - started_ns) / 1e9, 3),
             "detect_ms": round((a.detected_at_ns - a.iteration_end_ns) / 1e6, 3),
             "delivery_ms": round((received[a.id] - a.detected_at_ns) / 1e6, 3)
             if a.id in received else None}
            for a in alerts],
        "faults_not_biting": sum(1 for f in read.faults if f.bit is False),
    }
    if unwatched is not None:
        doc["overhead"] = {"without": unwatched, "with": watched}
        doc["throughput_ratio"] = round(watched["tokens_per_s"] / unwatched["tokens_per_s"], 4) \
            if unwatched["tokens_per_s"] else None
        doc["decode_latency_ratio"] = round(
            watched["decode_ms_mean"] / unwatched["decode_ms_mean"], 4) \
            if unwatched["decode_ms_mean"] else None
    tmp.cleanup()
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"{scenario.name}: {result['iterations']} judged decode iterations, "
              f"{result['abnormal']} abnormal; precision {result['precision']}, recall "
              f"{result['recall']}, F1 {result['f1']}, FPR {result['fpr']}; "
              f"{episodes['episodes_detected']} of {episodes['fault_episodes']} fault "
              f"episodes paged, {episodes['false_episodes']} false; "
              f"{len(firing)} alerts, latency p50 {doc['alert_latency_ms']['p50']} ms; "
              f"{doc['faults_not_biting']} of {len(read.faults)} fault windows did not "
              "measurably bite")
    return 0
