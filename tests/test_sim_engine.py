"""The simulated inference server end to end: workload model, faults, probes, cleanup."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from prism_sim.labels import read_labels
from prism_sim.scenario import parse_scenario
from prism_sim.server import SimServer
from probes.catalog import load_profile
from probes.placement import place_profile
from probes.target import Target
from probes.uprobes import Span, UprobeSession

ROOT = Path(__file__).resolve().parent.parent

STEADY = """
[scenario]
name = "{name}"
description = "test scenario"
seed = 3
duration_s = {duration}

[topology]
ranks = 2
layers = {layers}
hidden = {hidden}

[[phase]]
start_s = 0
arrival_rate = 200.0
max_batch = {batch}
prompt = {{ dist = "fixed", value = 32 }}
output = {{ dist = "fixed", value = 400 }}
{extra}
"""


def scenario_file(tmp_path: Path, name: str, duration: float, batch: int = 8,
                  extra: str = "") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(STEADY.format(name=name, duration=duration, batch=batch, extra=extra,
                                  layers=4, hidden=2048))
    return path


def sim_leftovers(session: str) -> list[str]:
    return glob.glob(f"/dev/shm/{session}*")


def decode_rows(labels: Any, rank: int = 0) -> list[Any]:
    return [it for it in labels.iterations if it.rank == rank and it.phase == "decode"]


def test_decode_latency_follows_the_workload_model(tmp_path: Path) -> None:
    # batch size and KV length must vary independently for the regression to tell b from
    # c: long generations make each sequence's KV grow from ~100 to ~1000 tokens at a
    # fixed batch size; arrivals track each phase's throughput (an overloaded queue would
    # serve the previous phase's backlog)
    phases = "".join(
        f"\n[[phase]]\nstart_s = {8 * i}\narrival_rate = {b / 3}\nmax_batch = {b}\n"
        f"prompt = {{ dist = \"uniform\", min = 16, max = 200 }}\n"
        f"output = {{ dist = \"uniform\", min = 100, max = 800 }}\n"
        for i, b in enumerate([4, 16, 10]))
    text = STEADY.format(name="model", duration=24, batch=2, extra="", layers=8, hidden=4096)
    text = text[:text.index("[[phase]]")] + phases
    path = tmp_path / "model.toml"
    path.write_text(text)
    labels_path = tmp_path / "labels.jsonl"
    with SimServer(parse_scenario(text, str(path)), labels=labels_path,
                   metrics_port=None) as server:
        server.run()
    rows = decode_rows(read_labels(labels_path))
    assert len(rows) > 500
    # drop the slowest 2 % (a GC pause, another process on the same two cores)
    cut = np.percentile([r.end_ns - r.start_ns for r in rows], 98)
    rows = [r for r in rows if r.end_ns - r.start_ns <= cut]
    b = np.array([r.batch_size for r in rows], dtype=float)
    kv = np.array([r.kv_len for r in rows], dtype=float)
    y = np.array([(r.end_ns - r.start_ns) / 1e6 for r in rows])
    design = np.column_stack([np.ones_like(b), b, kv])
    (a_hat, b_hat, c_hat), *_ = np.linalg.lstsq(design, y, rcond=None)
    pred = design @ np.array([a_hat, b_hat, c_hat])
    r2 = 1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert r2 > 0.75, (a_hat, b_hat, c_hat, r2)
    # what the cost model puts on the device (default device: 8 TFLOP/s, 400 GB/s), in ms;
    # the host adds its own fixed and per-sequence time on top of a and b
    scenario = parse_scenario(text, str(path))
    topo = scenario.topology
    params = 12 * topo.hidden**2 / topo.ranks
    a_dev = topo.layers * params * 2 / topo.mem_bw * 1e3
    b_dev = (topo.layers * 2 * params / topo.flops_per_s  # GEMM FLOPs per token
             + 2 * topo.layers * topo.hidden * 2 / topo.link_bw) * 1e3  # 2 all-reduces/layer
    # a and b within a factor of two of the device model (the host adds its own fixed,
    # 1.8 ms by design, and per-sequence time). c is not asserted here: at these context
    # lengths attention is ~10 % of a decode iteration (about its share on a real 70B
    # deployment at 1k context), below the host noise of two shared cores (seen from
    # -0.6x to 2.1x); the next test recovers it from device time
    assert a_dev <= a_hat <= 2 * a_dev + 2.0, (a_hat, a_dev)
    assert 0.8 * b_dev <= b_hat <= 2 * b_dev, (b_hat, b_dev)


def test_device_time_of_an_iteration_recovers_a_b_c_exactly() -> None:
    """The rank's kernels for a (B, kv) grid, timed with device events (no host noise)."""
    from prism_sim.engine import CostModel, Plan
    from prism_sim.runtime import SimDevice

    layers, hidden, flops, bw = 8, 4096, 8e12, 4e11
    rows = []
    with SimDevice(0, 1, None, flops_per_s=flops, mem_bw=bw, jitter=0.0) as dev:
        model = CostModel(dev, layers, hidden, world=1)
        for batch in (1, 4, 8, 16, 32):
            for kv_per_seq in (100, 600, 1500, 3000):
                plan = Plan(0, "decode", batch, batch, batch * kv_per_seq)
                start = dev.record_event()
                for gemm, attn in model.kernels(plan):
                    dev.launch(attn)
                    dev.launch(gemm)
                end = dev.record_event()
                dev.event_sync(end)
                rows.append((batch, batch * kv_per_seq, start.elapsed_ms(end)))
    data = np.array(rows, dtype=float)
    design = np.column_stack([np.ones(len(data)), data[:, 0], data[:, 1]])
    (a_hat, b_hat, c_hat), *_ = np.linalg.lstsq(design, data[:, 2], rcond=None)
    params = 12 * hidden**2
    a_dev = layers * params * 2 / bw * 1e3  # weight reads
    b_dev = layers * 2 * params / flops * 1e3  # GEMM FLOPs per token
    c_dev = layers * (2 * hidden * 2 / bw + 4 * hidden / flops) * 1e3  # KV reads + FLOPs
    for got, want in ((a_hat, a_dev), (b_hat, b_dev), (c_hat, c_dev)):
        assert abs(got - want) / want < 0.05, (a_hat, b_hat, c_hat, a_dev, b_dev, c_dev)


FAULT_WINDOWS = [  # (type, rank, intensity or None for the default)
    ("device_slowdown", 1, None), ("straggler", 1, None), ("interconnect_squeeze", 0, None),
    ("device_preemption", 0, None), ("cpu_squeeze", 0, None), ("cpu_throttle", 0, None),
    ("gc_storm", 0, None), ("gil_contention", 0, None), ("memory_pressure", 0, None),
]
ON_S, GAP_S, FIRST_S = 3.0, 3.0, 4.0


def test_every_fault_slows_iterations_while_on_and_labels_say_so(tmp_path: Path) -> None:
    faults = ""
    for i, (kind, rank, intensity) in enumerate(FAULT_WINDOWS):
        start = FIRST_S + i * (ON_S + GAP_S)
        faults += (f"\n[[fault]]\ntype = \"{kind}\"\nstart_s = {start}\nduration_s = {ON_S}\n"
                   f"rank = {rank}\n" + (f"intensity = {intensity}\n" if intensity else ""))
    duration = FIRST_S + len(FAULT_WINDOWS) * (ON_S + GAP_S)
    path = tmp_path / "faults.toml"
    path.write_text(STEADY.format(name="faults", duration=duration, batch=8, extra=faults,
                                  layers=8, hidden=4096))
    labels_path = tmp_path / "labels.jsonl"
    with SimServer(parse_scenario(path.read_text(), str(path)), labels=labels_path,
                   metrics_port=None) as server:
        session = server.session
        server.run()
    assert sim_leftovers(session) == []
    labels = read_labels(labels_path)
    assert [f.type for f in labels.faults] == [k for k, _, _ in FAULT_WINDOWS]
    rows = [r for r in decode_rows(labels) if r.batch_size == 8]
    slowdowns = {}
    for fault in labels.faults:
        during = [r for r in rows if r.start_ns >= fault.start_ns + 300_000_000
                  and r.end_ns <= fault.end_ns]
        after = [r for r in rows if fault.end_ns + 700_000_000 <= r.start_ns
                 <= fault.end_ns + (GAP_S - 0.3) * 1e9]
        before = [r for r in rows if fault.start_ns - (GAP_S - 0.7) * 1e9 <= r.start_ns
                  and r.end_ns <= fault.start_ns]
        assert during and after and before, fault.type
        assert all(r.fault_active and fault.type in r.faults for r in during)
        assert not any(r.fault_active for r in after + before)
        slow = np.median([r.end_ns - r.start_ns for r in during])
        # the mean of the windows before and after cancels a slow drift of the host
        base = (np.median([r.end_ns - r.start_ns for r in before])
                + np.median([r.end_ns - r.start_ns for r in after])) / 2
        slowdowns[fault.type] = round(float(slow / base), 3)
    print("slowdown while on / after:", slowdowns)
    assert all(v >= 1.2 for v in slowdowns.values()), slowdowns


def test_cuda_and_nccl_profiles_see_the_workload_in_a_rank(tmp_path: Path) -> None:
    path = scenario_file(tmp_path, "probe", 30, batch=6)
    labels_path = tmp_path / "labels.jsonl"
    with SimServer(parse_scenario(path.read_text(), str(path)), labels=labels_path,
                   metrics_port=None) as server:
        pid = server.rank_pids[1]
        target = Target(pid)
        sites = []
        for name in ("cuda", "nccl"):
            placement = place_profile(target, load_profile(name), "deepdive")
            sites += placement.sites
        probes = {s.probe for s in sites}
        assert {"launch", "memcpy_async", "stream_sync", "all_reduce"} <= probes, probes
        spans: list[Span] = []
        with UprobeSession([target], sites) as session:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                spans += session.poll(0.05)
                assert server.alive()
    by_probe: dict[str, list[Span]] = {}
    for s in spans:
        by_probe.setdefault(s.probe, []).append(s)
    syncs = by_probe["stream_sync"]
    assert len(syncs) > 20
    copies = by_probe["memcpy_async"]
    h2d = [s for s in copies if s.args["kind"] & 0xFFFFFFFF == 1]
    d2h = [s for s in copies if s.args["kind"] & 0xFFFFFFFF == 2]
    assert h2d and d2h
    assert all(s.args["bytes"] % 4 == 0 for s in h2d)
    assert {s.args["bytes"] // 8 for s in d2h} <= set(range(1, 7))  # 8 bytes per sequence
    allreduce = by_probe["all_reduce"]
    assert len(allreduce) >= 8 * len(syncs) - 16  # two per layer per iteration
    assert all(s.args["count"] % 1024 == 0 for s in allreduce)  # tokens x hidden
    assert len(by_probe["launch"]) >= 8 * len(syncs) - 16  # gemm + attention per layer


def test_metrics_endpoint_speaks_prometheus(tmp_path: Path) -> None:
    path = scenario_file(tmp_path, "metrics", 6, batch=4)
    with SimServer(parse_scenario(path.read_text(), str(path))) as server:
        server.run(duration_s=4)
        assert server.metrics_url is not None
        body = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    assert "vllm:num_requests_running" in body
    assert 'vllm:time_per_output_token_seconds_bucket{le="+Inf"}' in body
    running = [line for line in body.splitlines()
               if line.startswith("vllm:num_requests_running ")]
    assert running and int(running[0].split()[1]) >= 0


def _prism_sim(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "prism_tui.cli", "sim", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout
    return {int(x) for x in out.split()}


def _session_cgroups(pid: int) -> list[str]:
    """cgroups of the runs of ``prism sim`` process ``pid`` (sessions ``prism-sim-<pid>-*``)
    in every mounted hierarchy."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] in ("cgroup", "cgroup2"):
            found += glob.glob(f"{parts[1]}/prism-sim-{pid}-*")
    return found


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL", "end"])
def test_prism_sim_leaves_nothing_behind(tmp_path: Path, how: str) -> None:
    """No child process, /dev/shm entry or cgroup of the run survives any exit path; with
    SIGKILL of prism sim itself, while a cpu_throttle holds rank 1 (in a cgroup, or
    stopped by SIGSTOP) and a cpu_squeeze's hogs run, the kernel and the run's guard
    process clean up what its close() would have."""
    from prism_sim.faults import throttle_mechanism

    duration = 4 if how == "end" else 60
    extra = ('\n[[fault]]\ntype = "cpu_squeeze"\nstart_s = 1\n'
             f'duration_s = {duration - 1.5}\nrank = 0\n')
    if how == "SIGKILL":
        extra += '\n[[fault]]\ntype = "cpu_throttle"\nstart_s = 1\nduration_s = 50\nrank = 1\n'
    path = scenario_file(tmp_path, "exit", duration, batch=4, extra=extra)
    before = set(glob.glob("/dev/shm/*"))
    proc = _prism_sim("--scenario", str(path), "--labels", str(tmp_path / "l.jsonl"))
    time.sleep(2.5)
    kids = _children(proc.pid)
    assert kids, "the ranks and the squeeze should be children of prism sim"
    if how == "SIGKILL":
        if throttle_mechanism().startswith("cgroup"):
            assert _session_cgroups(proc.pid), "the throttle's cgroup should be there"
        proc.kill()
    elif how != "end":
        proc.send_signal(getattr(signal, how))
    # ends when every process holding prism sim's stderr (ranks, guard) is gone
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == (-signal.SIGKILL if how == "SIGKILL" else 0), err
    assert "Traceback" not in err
    # a child SIGKILLed by the kernel when its parent died (a hog started just then,
    # which finds its parent gone) still has to be scheduled to exit: give it a moment
    deadline = time.monotonic() + 10
    while (any(Path(f"/proc/{kid}").exists() and not _is_zombie(kid) for kid in kids)
           and time.monotonic() < deadline):
        time.sleep(0.05)
    for kid in kids:
        assert not Path(f"/proc/{kid}").exists() or _is_zombie(kid), f"child {kid} survives"
    assert glob.glob(f"/dev/shm/prism-sim-{proc.pid}-*") == []
    assert set(glob.glob("/dev/shm/*")) - before == set()
    assert _session_cgroups(proc.pid) == []
    labels = read_labels(tmp_path / "l.jsonl")
    assert labels.iterations


@pytest.mark.parametrize("said_done", [True, False])
def test_guard_cleans_up_only_when_its_orchestrator_did_not(said_done: bool) -> None:
    """The guard removes the session's /dev/shm entries (and the extra path it was given)
    when its stdin closes without "done", and leaves everything alone after "done"."""
    session = f"prism-sim-{os.getpid()}-guardtest{int(said_done)}"
    paths = [Path(f"/dev/shm/{session}-ctl"), Path(f"/dev/shm/{session}x-comm")]
    for path in paths:
        path.write_bytes(b"x")
    try:
        guard = subprocess.Popen([sys.executable, "-m", "prism_sim.guard", "--session",
                                  session, "--shm", str(paths[1])],
                                 stdin=subprocess.PIPE, cwd=ROOT)
        assert guard.stdin is not None
        if said_done:
            guard.stdin.write(b"done\n")
        guard.stdin.close()
        assert guard.wait(10) == 0
        assert [path.exists() for path in paths] == [said_done] * 2
    finally:
        for path in paths:
            path.unlink(missing_ok=True)


def test_prism_sim_duration_is_what_runs_and_what_the_labels_say(tmp_path: Path) -> None:
    """--duration overrides a built-in's (smoke: 40 s) and the labels record the 3 s run."""
    labels_path = tmp_path / "smoke.jsonl"
    proc = _prism_sim("--scenario", "smoke", "--duration", "3", "--labels", str(labels_path))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    labels = read_labels(labels_path)
    assert labels.scenario is not None and labels.scenario.name == "smoke"
    assert labels.scenario.duration_s == 3.0
    assert labels.iterations
    # the last iteration started within the 3 s (it may end a little after)
    assert max(it.start_ns for it in labels.iterations) - labels.scenario.started_ns < 3.1e9
    assert labels.faults == []  # smoke's fault is at 20 s


def test_prism_sim_json_reports_the_ranks_and_the_final_counts(tmp_path: Path) -> None:
    """--json: the ranks' pids while they run (how prism eval attaches to a child
    simulator), then the counts it needs for the throughput ratio, and nothing else."""
    path = scenario_file(tmp_path, "json", 3, batch=4)
    proc = _prism_sim("--scenario", str(path), "--labels", str(tmp_path / "l.jsonl"),
                      "--json")
    assert proc.stdout is not None
    started = json.loads(proc.stdout.readline())
    assert started["event"] == "started" and sorted(started["ranks"]) == ["0", "1"]
    for pid in started["ranks"].values():
        assert Path(f"/proc/{pid}").exists()  # running when announced
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    done = json.loads(out)
    assert done["event"] == "done" and done["generation_tokens"] > 0
    assert set(done["iterations"]) == {"0", "1"} and min(done["iterations"].values()) > 0


def test_prism_sim_json_stops_when_its_parent_is_killed(tmp_path: Path) -> None:
    """prism eval drives prism sim --json as a child: if eval is SIGKILLed, the simulator
    and its ranks must not run on for the rest of the scenario."""
    path = scenario_file(tmp_path, "orphan", 120, batch=4)
    script = ("import subprocess, sys, time\n"
              "p = subprocess.Popen([sys.executable, '-m', 'prism_tui.cli', 'sim', "
              f"'--scenario', {str(path)!r}, '--json'], stdout=subprocess.PIPE, text=True)\n"
              "print(p.pid, p.stdout.readline().strip(), flush=True)\n"
              "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT)
    assert parent.stdout is not None
    sim_pid, started = parent.stdout.readline().split(" ", 1)
    pids = [int(sim_pid), *json.loads(started)["ranks"].values()]
    parent.kill()
    parent.wait()
    parent.stdout.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(not _is_zombie(p) for p in pids):
        time.sleep(0.2)
    assert all(_is_zombie(p) for p in pids), "the simulator outlived its parent"


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_dead_rank_stops_the_run_cleanly(tmp_path: Path) -> None:
    from prism_sim.errors import SimError

    path = scenario_file(tmp_path, "dead", 30, batch=4)
    before = set(glob.glob("/dev/shm/*"))
    server = SimServer(parse_scenario(path.read_text(), str(path)), metrics_port=None)
    with server:
        time.sleep(1.0)
        os.kill(server.rank_pids[1], signal.SIGKILL)
        with pytest.raises(SimError, match="rank 1"):
            server.run()
    assert all(p.poll() is not None for p in server.ranks)
    assert set(glob.glob("/dev/shm/*")) - before == set()


def test_bad_scenario_file_is_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[scenario]\nname = "bad"\nseed = 1\nduration_s = 5\n\n[[fault]]\n'
                   'type = "device_slowdown"\nstart_s = 1\nduration_s = 1\nintensity = 7\n')
    proc = _prism_sim("--scenario", str(bad))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "intensity" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_labels_are_json_lines_with_monotonic_times(tmp_path: Path) -> None:
    path = scenario_file(tmp_path, "labels", 3, batch=4)
    labels_path = tmp_path / "labels.jsonl"
    t0 = time.monotonic_ns()
    with SimServer(parse_scenario(path.read_text(), str(path)), labels=labels_path,
                   metrics_port=None) as server:
        server.run()
    t1 = time.monotonic_ns()
    lines = [json.loads(x) for x in labels_path.read_text().splitlines()]
    assert lines[0]["kind"] == "scenario"
    its = [x for x in lines if x["kind"] == "iteration"]
    assert its and all(t0 <= x["start_ns"] <= x["end_ns"] <= t1 for x in its)
    assert {x["rank"] for x in its} == {0, 1}
    for rank in (0, 1):
        idx = [x["index"] for x in its if x["rank"] == rank]
        assert idx == sorted(idx)
