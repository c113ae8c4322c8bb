"""The monitor's own CPU per iteration and per event, and where it goes, on the simulator.

One ``prism sim`` run (a one-rank scenario with a small model, so iterations are short:
the simulator's host stage alone is ~2 ms, which caps it at a few hundred iterations a
second) is watched in turn by ``prism watch --headless --no-history --json`` of each
tree given (default: this one) and each probe backend given (``PRISM_PROBE_BACKEND``;
default: ``perf`` then ``bpf``), interleaved over the rounds. For each watch:

* CPU: utime + stime of the watch process from ``/proc/PID/stat`` over ``--window``
  seconds that start 2 s after its first snapshot with data (so calibrating, attaching
  and the first fit are left out; detaching too: the watch is then killed);
* iterations: the simulator's own labels (one line per finished iteration, monotonic
  clock) that ended inside the window, so attach and detach are left out;
* events: ring records per iteration, from a ``prism watch --record`` run before the
  rounds (an entry+return span is two records, an entry-only span one);
* with ``--profile``, a py-spy sample of the watch's stacks over the window (py-spy
  reads the process from outside, ``--nonblocking``), each sample charged to the
  innermost frame that names a part of the pipeline (table ``PARTS``).

Run: ``.venv/bin/python bench/monitor_cpu.py [--trees DIR ...] [--backends B ...]
[--rounds N] [--window S] [--profile]``. A tree is a checkout of this repository (e.g. the previous
commit in a ``git worktree``); its code runs with ``PYTHONPATH`` set to it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRISM = [sys.executable, "-m", "prism_tui.cli"]
TICKS = os.sysconf("SC_CLK_TCK")

SCENARIO = """
[scenario]
name = "monitor-cpu"
seed = 3
duration_s = 3600

[topology]
ranks = 1
layers = 2
hidden = 512

[[phase]]
start_s = 0
arrival_rate = 200.0
max_batch = 16
prompt = { dist = "uniform", min = 16, max = 64 }
output = { dist = "uniform", min = 200, max = 400 }
"""

# (part, regex on "function (file)") — the first part whose pattern matches a frame,
# scanning from the innermost frame outwards, takes the sample
PARTS: list[tuple[str, re.Pattern[str]]] = [(name, re.compile(pat)) for name, pat in [
    ("ring read", r"(read_raw|pending_bytes|_lost_in|_split_at_losses) \(.*perf\.py"),
    ("bpf ring read and spans", r"read \(.*bpf/session\.py"),
    ("decoding", r"decode \(.*perf\.py"),
    ("pairing", r"(_pair|_entry_of_return|_drop_abandoned) \(.*pairing\.py"),
    ("thread watchers", r"(_read_watchers|rescan|_install_opened) \(.*uprobes\.py"),
    ("sketches", r"sketches\.py"),
    ("prediction", r"(predict|_predict\w*|TreeEnsemble|BaselineModel)\b.*detector/"),
    ("features", r"(workload_features|workload_of|features|feature_matrix) \("),
    ("judgement", r"engine/detector/"),
    ("stage attribution", r"iterations\.py"),
    ("snapshots / view", r"(view\.py|snapshots|prepare_view|_publish_views|_next_view|"
                         r"summary_docs|on_view)"),
    ("alerts / sinks", r"(alert_wire\.py|_emit|_detector_alert|_check_slos|publisher)"),
    ("engine other", r"core\.py"),
    ("reader other", r"uprobes\.py"),
    ("monitor loop", r"(engine/monitor|attachment|escalation|telemetry_poll)\.py"),
    ("event loop / wake-up", r"(base_events\.py|selector_events\.py|selectors\.py|"
                             r"events\.py|queues\.py|tasks\.py)"),
]]


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _env(tree: Path, backend: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    if backend is not None:
        env["PRISM_PROBE_BACKEND"] = backend
    return env


def _iterations_between(labels: Path, t0: int, t1: int) -> int:
    n = 0
    for line in labels.read_text().splitlines():
        if '"end_ns"' not in line:
            continue
        rec = json.loads(line)
        if rec.get("kind", "iteration") == "iteration" and "index" in rec \
                and t0 <= rec["end_ns"] < t1:
            n += 1
    return n


reap: list[subprocess.Popen[bytes]] = []  # killed watches, reaped at the end


def _events_per_iteration(tree: Path, pid: int, labels: Path, tmp: Path) -> tuple[float, float]:
    """Ring records and spans per iteration, from a short ``--record`` watch.

    Counted between the first and last recorded span (the perf clock is
    CLOCK_MONOTONIC, as are the simulator's labels), so attaching is left out.
    """
    out = tmp / "spans.jsonl.gz"
    watch = subprocess.Popen([*PRISM, "watch", "--pid", str(pid), "--headless",
                              "--no-history", "--json", "--record", str(out)],
                             env=_env(tree, "perf"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reap.append(watch)
    deadline = time.monotonic() + 90  # calibrating and attaching take a while
    while time.monotonic() < deadline and not any(
            b.stat().st_size for b in tmp.glob(".spans-*")):
        time.sleep(0.5)
    time.sleep(10)
    watch.kill()  # the recorder streams the spans into .spans-*: read up to the cut
    spans = events = 0
    first, last = 2**63, 0
    [body] = tmp.glob(".spans-*")
    with contextlib.suppress(json.JSONDecodeError), body.open() as f:
        for line in f:
            rec = json.loads(line)
            if not isinstance(rec, list):
                continue
            spans += 1
            events += 1 if rec[3] == rec[4] else 2
            first, last = min(first, rec[3]), max(last, rec[4])
    time.sleep(0.5)
    its = max(1, _iterations_between(labels, first, last))
    return events / its, spans / its


IDLE = re.compile(r"^(\w+Selector\.select \(selectors\.py|Condition\.wait \(threading\.py|"
                  r"_worker \(concurrent/futures/thread\.py|Event\.wait \(threading\.py|"
                  r"sleep \(|select \(|poll \()")
"""Innermost frames of a thread that waits: py-spy's ``--nonblocking`` mode cannot tell
an idle thread, and the event loop's epoll wait was half of all samples, charged as if
it were CPU."""


def _categorise(raw: Path) -> collections.Counter[str]:
    """Samples per part of the pipeline, idle (waiting) samples left out."""
    parts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        if IDLE.match(frames[-1]):
            continue
        for frame in reversed(frames):
            name = next((p for p, pat in PARTS if pat.search(frame)), None)
            if name is not None:
                break
        else:
            name = "other (gc, imports, threads)"
        parts[name] += int(count)
    return parts


def _wait_for_spans(watch: subprocess.Popen[str], timeout: float) -> None:
    """Return once the watch printed a snapshot with data (it calibrated, attached and
    saw iterations; under load attaching alone can take tens of seconds)."""
    assert watch.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = watch.stdout.readline()
        if not line:
            raise RuntimeError("the watch ended before it saw any iteration")
        if line.startswith('{"snapshot"') and json.loads(line)["snapshot"]["series"]:
            return
    raise RuntimeError(f"no snapshot with data within {timeout:.0f} s")


def one_watch(tree: Path, backend: str | None, pid: int, labels: Path, window: float,
              profile: Path | None) -> dict[str, float]:
    watch = subprocess.Popen(
        [*PRISM, "watch", "--pid", str(pid), "--headless", "--no-history"],
        env=_env(tree, backend), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)
    _wait_for_spans(watch, 180)
    assert watch.stdout is not None
    drain = threading.Thread(target=watch.stdout.read, daemon=True)  # keep the pipe empty
    drain.start()
    time.sleep(2)  # past the first fits
    spy = None
    if profile is not None:
        spy = subprocess.Popen(
            [shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
             "record", "--pid", str(watch.pid), "--rate", "500", "--nonblocking",
             "--format", "raw", "--duration", str(int(window)),
             "-o", str(profile)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0, c0 = time.monotonic_ns(), _cpu_s(watch.pid)
    time.sleep(window)
    t1, c1 = time.monotonic_ns(), _cpu_s(watch.pid)
    if spy is not None:
        spy.wait(30)
    # detaching takes ~80 ms per probe event, serialised machine-wide by the kernel
    # (docs/performance.md) and not measured here; SIGKILL lets the kernel do it, and
    # waiting keeps it out of the next round's attach
    watch.kill()
    watch.wait()
    time.sleep(0.5)  # the last labels are flushed
    its = _iterations_between(labels, t0, t1)
    return {"cpu_s": c1 - c0, "window_s": (t1 - t0) / 1e9, "iterations": its}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", nargs="+", type=Path, default=[ROOT])
    ap.add_argument("--backends", nargs="+", default=["perf", "bpf"],
                    help="probe backends (perf, bpf, auto); 'default': the tree's own")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--window", type=float, default=20.0,
                    help="seconds measured per watch, once it shows data")
    ap.add_argument("--profile", action="store_true", help="py-spy breakdown (this tree)")
    ap.add_argument("--keep-profile", metavar="PATH", help="keep py-spy's raw stacks here")
    args = ap.parse_args()
    trees = [t.resolve() for t in args.trees]
    runs = [(t, None if b == "default" else b) for t in trees for b in args.backends]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        scen, labels = tmp / "scenario.toml", tmp / "labels.jsonl"
        scen.write_text(SCENARIO)
        sim = subprocess.Popen([*PRISM, "sim", "--scenario", str(scen), "--json",
                                "--labels", str(labels)], env=_env(trees[-1]),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert sim.stdout is not None
            started = json.loads(sim.stdout.readline())
            [pid] = [int(p) for p in started["ranks"].values()]
            time.sleep(3)
            events_per_it, spans_per_it = _events_per_iteration(trees[-1], pid, labels, tmp)
            results: dict[tuple[Path, str | None], list[dict[str, float]]] = {
                run: [] for run in runs}
            parts: dict[tuple[Path, str | None], collections.Counter[str]] = {
                run: collections.Counter() for run in runs}
            for r in range(args.rounds):
                for tree, backend in runs:
                    prof = tmp / f"spy{r}.txt" if args.profile and tree == trees[-1] else None
                    res = one_watch(tree, backend, pid, labels, args.window, prof)
                    results[(tree, backend)].append(res)
                    if prof is not None and prof.exists():
                        parts[(tree, backend)] += _categorise(prof)
                        if args.keep_profile:
                            shutil.copy(prof, f"{args.keep_profile}.{backend}.{r}")
                        prof.unlink()
                    print(f"round {r} {tree} {backend}: {res}", file=sys.stderr, flush=True)
        finally:
            sim.send_signal(signal.SIGTERM)
            sim.wait(60)
            for proc in reap:
                proc.wait()
        print(f"ring records per iteration: {events_per_it:.1f} ({spans_per_it:.1f} spans)")
        print("\n| tree | backend | iterations/s | monitor CPU % of a core "
              "| µs per iteration | µs per event | ratio to the first row |"
              "\n|---|---|---:|---:|---:|---:|---:|")
        first = None
        per_its: dict[tuple[Path, str | None], float] = {}
        for tree, backend in runs:
            rs = results[(tree, backend)]
            rate = statistics.median(r["iterations"] / r["window_s"] for r in rs)
            pct = statistics.median(100 * r["cpu_s"] / r["window_s"] for r in rs)
            per_it = statistics.median(1e6 * r["cpu_s"] / max(1, r["iterations"]) for r in rs)
            per_its[(tree, backend)] = per_it
            first = first or per_it
            print(f"| {tree.name} | {backend or 'default'} | {rate:.0f} | {pct:.1f} "
                  f"| {per_it:.0f} | {per_it / events_per_it:.2f} | {per_it / first:.2f} |")
        for (tree, backend), counted in parts.items():
            if not counted:
                continue
            total = sum(counted.values())
            per_it = per_its[(tree, backend)]
            print(f"\n| part ({tree.name}, {backend or 'default'}) | share of busy samples "
                  "| µs per iteration |\n|---|---:|---:|")
            for name, n in counted.most_common():
                print(f"| {name} | {100 * n / total:.1f} % | {per_it * n / total:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
