"""The simulated inference server end to end: workload model, faults, probes, cleanup."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from prism_sim.engine import Plan
from prism_sim.labels import IterationRecord, read_labels
from prism_sim.scenario import parse_scenario
from prism_sim.server import SimServer
from probes.catalog import load_profile
from probes.placement import place_profile
from probes.target import Target
from probes.uprobes import Span, UprobeSession
from tests.sim_scenarios import steady_text

ROOT = Path(__file__).resolve().parent.parent


def scenario_file(tmp_path: Path, name: str, duration: float, batch: int = 8,
                  extra: str = "", output: int = 400) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(steady_text(name, duration, batch=batch, extra=extra, output=output))
    return path


def sim_leftovers(session: str) -> list[str]:
    return glob.glob(f"/dev/shm/{session}*")


def decode_rows(labels: Any, rank: int = 0) -> list[Any]:
    return [it for it in labels.iterations if it.rank == rank and it.phase == "decode"]


def pin_ranks(server: SimServer) -> int:
    """Pin every thread of the server's ranks to one CPU (the last this process may use).

    On two shared cores the two ranks' host stages (2-3 ms each) run side by side or one
    after the other depending on what else runs there, a ~2 ms step in iteration latency
    that comes and goes every few seconds (measured: medians of 11.4 and 13.4 ms
    alternating, 17 % apart, in a run without faults). On one CPU they always take turns,
    and iteration latency is stable to ~1 %. Threads started later inherit the pinning.
    """
    cpu = max(os.sched_getaffinity(0))
    for pid in server.rank_pids.values():
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                os.sched_setaffinity(int(tid), {cpu})
    return cpu


def test_device_time_of_an_iteration_recovers_a_b_c_exactly() -> None:
    """The rank's kernels for a (B, kv) grid, timed with device events.

    The device clock does not stretch a kernel, but a kernel starts no earlier than it
    was launched: a launching thread held up between two launches leaves the device idle
    between the events, and one such gap in the 20 points put the per-KV-token cost 6.6 %
    off in a clean-clone run. Each point is the least of three runs (a gap only ever
    lengthens one). How closely the host-measured latency in the labels follows the same
    model is a measurement, not a test: ``bench/sim_cost_model.py``.
    """
    from prism_sim.engine import CostModel, Plan
    from prism_sim.runtime import SimDevice

    layers, hidden, flops, bw = 8, 4096, 8e12, 4e11
    rows = []
    with SimDevice(0, 1, None, flops_per_s=flops, mem_bw=bw, jitter=0.0) as dev:
        model = CostModel(dev, layers, hidden, world=1)
        for batch in (1, 4, 8, 16, 32):
            for kv_per_seq in (100, 600, 1500, 3000):
                plan = Plan(0, "decode", batch, batch, batch * kv_per_seq)
                runs = []
                for _ in range(3):
                    start = dev.record_event()
                    for gemm, attn in model.kernels(plan):
                        dev.launch(attn)
                        dev.launch(gemm)
                    end = dev.record_event()
                    dev.event_sync(end)
                    runs.append(start.elapsed_ms(end))
                rows.append((batch, batch * kv_per_seq, min(runs)))
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
    # device faults at 0.8-0.9: at their defaults they lengthen only the device part of an
    # iteration, and on a loaded host (load average ~15) the host part grew until a 0.5
    # device_preemption made iterations only 1.15x as long
    ("device_slowdown", 1, 0.8), ("straggler", 1, 0.8), ("interconnect_squeeze", 0, 0.9),
    ("device_preemption", 0, 0.8), ("cpu_squeeze", 0, None), ("cpu_throttle", 0, None),
    ("gil_contention", 0, None), ("memory_pressure", 0, None),
    # last, at 0.3: at 0.5 the rank at times stalled for 2 s or more during and after it
    # (collecting what the storm left, on a loaded host)
    ("gc_storm", 0, 0.3),
]
# 6 s first: under load the batch took 4 s to reach 8. Faults and gaps of 2.5 s leave
# >= 1.5 s of iterations on each side of a fault (~12 ms each on a quiet host, ~100 of
# them; the 3/5/5 asserted are for a loaded one); 3 s windows measured the same margins
ON_S, GAP_S, FIRST_S = 2.5, 2.5, 6.0


def test_every_fault_slows_iterations_while_on_and_labels_say_so(tmp_path: Path) -> None:
    """Each fault (device faults at 0.8-0.9, gc_storm at 0.3, the others at their
    defaults) makes the median iteration of the same workload (batch 8, decode) >= 1.2x
    as long as the median of the faster of the stretches before and after it;
    iterations are labelled with it exactly while it is on, the targeted rank's also in
    ``rank_faults``, and every window's label carries its measured effect (real-time
    children for the host faults).

    The ranks are pinned to one CPU (:func:`pin_ranks`): unpinned, the host's ~2 ms step
    alone moved medians 17 % between two windows without a fault; on a quiet host the
    before/after medians agreed within 3 %. How the margin was chosen: 19 runs of this
    test alone on the 2-vCPU VM while ~8 other agents loaded it (load average ~15), in
    which the host's load alone made the stretch after a fault up to 6x slower or faster
    than the one before it (why neither the slower neighbour nor an after/before ratio is
    asserted). Against the faster neighbour the smallest slowdown per fault was 1.2x
    (gil_contention) to 2.4x (cpu_squeeze, memory_pressure), except in one run where a
    device_preemption window measured 0.59x among neighbours 4.6x apart: under that load
    the test passed 4 of its last 5 runs; on a quiet host the margin is wide.
    """
    faults = ""
    for i, (kind, rank, intensity) in enumerate(FAULT_WINDOWS):
        start = FIRST_S + i * (ON_S + GAP_S)
        faults += (f"\n[[fault]]\ntype = \"{kind}\"\nstart_s = {start}\nduration_s = {ON_S}\n"
                   f"rank = {rank}\n" + (f"intensity = {intensity}\n" if intensity else ""))
    duration = FIRST_S + len(FAULT_WINDOWS) * (ON_S + GAP_S)
    path = tmp_path / "faults.toml"
    path.write_text(steady_text("faults", duration, extra=faults, layers=8, hidden=4096))
    labels_path = tmp_path / "labels.jsonl"
    with SimServer(parse_scenario(path.read_text(), str(path)), labels=labels_path,
                   metrics_port=None) as server:
        session = server.session
        pin_ranks(server)
        server.run()
    assert sim_leftovers(session) == []
    labels = read_labels(labels_path)
    assert labels.scenario is not None
    assert [f.type for f in labels.faults] == [k for k, _, _ in FAULT_WINDOWS]
    rows = [r for r in decode_rows(labels) if r.batch_size == 8]
    slowdowns, after_vs_before = {}, {}
    edges = [labels.scenario.started_ns, *[t for f in labels.faults
                                           for t in (f.start_ns, f.end_ns)], 2**63]
    for i, fault in enumerate(labels.faults):
        # the windows stop short of the neighbouring faults even when one took a while to
        # switch on or off (its label covers that time)
        prev_end, next_start = edges[2 * i], edges[2 * i + 3]
        during = [r for r in rows if r.start_ns >= fault.start_ns + 300_000_000
                  and r.end_ns <= fault.end_ns]
        after = [r for r in rows if fault.end_ns + 700_000_000 <= r.start_ns
                 and r.end_ns <= min(next_start, fault.end_ns + (GAP_S - 0.3) * 1e9)]
        before = [r for r in rows if max(prev_end + 700_000_000,
                                         fault.start_ns - (GAP_S - 0.7) * 1e9) <= r.start_ns
                  and r.end_ns <= fault.start_ns]
        # a fault on a loaded host can stretch iterations 10-50x (a gc_storm at 0.5 left
        # one iteration in its window, and 5 in the 2 s after it), and the host's other
        # load alone 10x at times (12 in a 2 s stretch with no fault): a few that long
        # are decisive
        assert len(during) >= 3 and len(after) >= 5 and len(before) >= 5, (
            fault.type, len(during), len(after), len(before))
        assert all(r.fault_active and r.faults == (fault.type,) for r in during), fault.type
        assert not any(r.fault_active or r.faults or r.rank_faults for r in after + before)
        # per rank: the targeted rank's iterations name it in rank_faults, the other's not
        for it in labels.iterations:
            if it.start_ns >= fault.start_ns + 300_000_000 and it.end_ns <= fault.end_ns:
                assert it.faults == (fault.type,), (fault.type, it)
                want = (fault.type,) if it.rank == fault.rank else ()
                assert it.rank_faults == want, (fault.type, fault.rank, it)
        slow = np.median([r.end_ns - r.start_ns for r in during])
        med_before = np.median([r.end_ns - r.start_ns for r in before])
        med_after = np.median([r.end_ns - r.start_ns for r in after])
        # against the faster of the stretches before and after: the host's other load
        # alone made one of them up to 2.4x slower than the other (after / before below)
        slowdowns[fault.type] = round(float(slow / min(med_before, med_after)), 3)
        after_vs_before[fault.type] = round(float(med_after / med_before), 3)
    print("slowdown while on:", slowdowns)
    print("after / before:", after_vs_before)
    # every window's label carries its measured effect: the ranks' threads while on and
    # before, and what the injector did (its children's CPU: 2 x 80 % of a CPU here; the
    # run-queue figures move with the host's other load, so their verdict is not asserted)
    effects = {f.type: f.effect for f in labels.faults}
    print("measured effect:", effects)
    assert all(f.effect is not None and f.effect["target"]["threads"] >= 2
               and "injector" in f.effect for f in labels.faults), effects
    for f in labels.faults:
        injector = f.effect["injector"]  # type: ignore[index]
        if f.type in ("cpu_squeeze", "memory_pressure"):  # root here: real-time children
            assert injector["mode"] == "rt" and injector["fault_cpu_ms_per_s"] >= 500, f
        elif f.type != "cpu_throttle":
            assert injector["mode"] == "control" and f.bit is True, f
    assert all(v >= 1.2 for v in slowdowns.values()), (slowdowns, after_vs_before)


def test_cuda_and_nccl_profiles_see_the_workload_in_a_rank(tmp_path: Path) -> None:
    """Uprobes of the unchanged cuda and nccl profiles on rank 1 see, within each labelled
    iteration, exactly what Rank.execute carries: H2D copies of the input ids
    (8 x tokens) and of the KV slot indices (4 x kv_len), 2 x layers launches and
    all-reduces of tokens x hidden, a D2H copy of the sampled tokens (8 x batch) and one
    stream synchronisation."""
    path = scenario_file(tmp_path, "probe", 30, batch=6)
    scenario = parse_scenario(path.read_text(), str(path))
    layers, hidden = scenario.topology.layers, scenario.topology.hidden
    labels_path = tmp_path / "labels.jsonl"
    with SimServer(scenario, labels=labels_path, metrics_port=None) as server:
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
            watched_from = time.monotonic_ns()
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                spans += session.poll(0.05)
                assert server.alive()
            watched_to = time.monotonic_ns()
            spans += session.poll(0.05)
    iterations = [it for it in read_labels(labels_path).iterations
                  if it.rank == 1 and watched_from <= it.start_ns and it.end_ns <= watched_to]
    assert len(iterations) > 20
    checked = 0
    for it in iterations:
        inside = sorted((s for s in spans if it.start_ns <= s.start_ns <= it.end_ns),
                        key=lambda s: s.start_ns)
        by_probe: dict[str, list[Span]] = {}
        for s in inside:
            by_probe.setdefault(s.probe, []).append(s)
        copies = [(s.args["bytes"], int(s.args["kind"]) & 0xFFFFFFFF)
                  for s in by_probe.get("memcpy_async", [])]
        assert copies == [(8 * it.tokens, 1), (4 * it.kv_len, 1), (8 * it.batch_size, 2)], it
        counts = [s.args["count"] for s in by_probe.get("all_reduce", [])]
        assert counts == [it.tokens * hidden] * (2 * layers), it
        assert len(by_probe.get("launch", [])) == 2 * layers, it
        assert len(by_probe.get("stream_sync", [])) == 1, it
        checked += 1
    assert checked == len(iterations)
    # the counts follow the workload: the KV length grew through the window
    assert len({it.kv_len for it in iterations}) > 10


def test_metrics_endpoint_speaks_prometheus(tmp_path: Path) -> None:
    """vLLM's metric names: running and waiting requests, KV usage, and TTFT and
    inter-token latency histograms that count the finished requests."""
    path = scenario_file(tmp_path, "metrics", 6, batch=4)
    # 20-token outputs: requests finish within the run (arrivals, 200/s, pile up waiting)
    path.write_text(path.read_text().replace("value = 400", "value = 20"))
    with SimServer(parse_scenario(path.read_text(), str(path))) as server:
        server.run(duration_s=4)
        assert server.metrics_url is not None
        bodies = []
        for _ in range(5):  # a few scrapes: a batch that just finished shows 0 running
            bodies.append(urllib.request.urlopen(server.metrics_url, timeout=5).read().decode())
            time.sleep(0.05)
    scrapes: list[dict[str, float]] = []
    for body in bodies:
        scrapes.append({})
        for line in body.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                scrapes[-1][name] = float(value)
    values = scrapes[-1]
    for name, kind in (("vllm:num_requests_running", "gauge"),
                       ("vllm:num_requests_waiting", "gauge"),
                       ("vllm:gpu_cache_usage_perc", "gauge"),
                       ("vllm:time_to_first_token_seconds", "histogram"),
                       ("vllm:time_per_output_token_seconds", "histogram")):
        assert f"# TYPE {name} {kind}" in bodies[-1], name
    running = [v["vllm:num_requests_running"] for v in scrapes]
    kv_usage = [v["vllm:gpu_cache_usage_perc"] for v in scrapes]
    assert all(0 <= n <= 4 for n in running) and max(running) >= 1, running
    assert all(0 <= u <= 1 for u in kv_usage) and max(kv_usage) > 0, kv_usage
    assert values["vllm:num_requests_waiting"] >= 50  # 200/s arrive, ~20/s are served
    finished = values["vllm:request_success_total"]
    assert finished > 0
    for hist in ("vllm:time_to_first_token_seconds", "vllm:time_per_output_token_seconds"):
        buckets = [v for k, v in values.items() if k.startswith(f"{hist}_bucket{{")]
        assert buckets == sorted(buckets), hist  # cumulative
        assert values[f'{hist}_bucket{{le="+Inf"}}'] == values[f"{hist}_count"], hist
        assert values[f"{hist}_sum"] > 0, hist
    assert values["vllm:time_to_first_token_seconds_count"] == finished


def test_workload_shifts_are_not_labelled_as_faults(tmp_path: Path) -> None:
    """A prompt-length surge, a concurrency step, longer outputs and an idle gap, and no
    fault: no fault line in the labels and no iteration with a fault.

    The surge comes right after the idle gap, so that requests queued behind a slow host
    do not hold its long prompts back past the end of the run (with the surge after an
    overloaded concurrency step, a host under load prefilled none of them in 6 s)."""
    phase = ("\n[[phase]]\nstart_s = {}\narrival_rate = {}\nmax_batch = {}\n"
             "prompt = {{ dist = \"uniform\", min = {}, max = {} }}\n"
             "output = {{ dist = \"uniform\", min = {}, max = {} }}\n")
    phases = (phase.format(0, 20, 4, 16, 60, 10, 30)  # steady
              + phase.format(1.5, 0, 4, 16, 60, 10, 30)  # idle gap
              + phase.format(2.5, 20, 12, 300, 600, 10, 30)  # prompt-length surge
              + phase.format(3.5, 80, 12, 16, 64, 10, 30)  # concurrency step
              + phase.format(4.5, 20, 12, 16, 64, 60, 90))  # longer outputs
    text = steady_text("shifts", 6, batch=4)
    text = text[:text.index("[[phase]]")] + phases
    path = tmp_path / "shifts.toml"
    path.write_text(text)
    labels_path = tmp_path / "labels.jsonl"
    with SimServer(parse_scenario(text, str(path)), labels=labels_path,
                   metrics_port=None) as server:
        server.run()
    labels = read_labels(labels_path)
    assert labels.scenario is not None and labels.faults == []
    assert labels.iterations
    assert not any(it.fault_active or it.faults or it.rank_faults for it in labels.iterations)
    lines = [json.loads(x) for x in labels_path.read_text().splitlines()]
    assert not [x for x in lines if x["kind"] == "fault"]
    # the shifts happened: 256-token prefill chunks after the gap (the steady phase's
    # prompts are 16-60 tokens, at most 4 a step: 240 at most before the surge), bigger batches
    # after the step
    t0 = labels.scenario.started_ns

    def since(s: float) -> list[IterationRecord]:
        return [it for it in labels.iterations if it.start_ns >= t0 + s * 1e9]

    before = [it for it in labels.iterations if it.start_ns < t0 + 2.5e9]
    assert max(it.tokens for it in before if it.phase == "prefill") < 256
    assert max(it.tokens for it in since(2.5) if it.phase == "prefill") >= 256
    assert max(it.batch_size for it in since(3.5)) > 4


def test_scheduler_is_deterministic_for_a_seed() -> None:
    """Arrivals and request lengths depend only on the scenario and its seed: two
    schedulers with the same seed draw the same 60 s of requests, another seed others;
    on the same clock (10 ms per iteration) they plan the same iterations."""
    from prism_sim.engine import Scheduler
    from prism_sim.scenario import load_scenario

    mixed = load_scenario("mixed")  # lognormal and uniform lengths, rate steps, a gap

    def requests(seed: int) -> list[tuple[int, int, int]]:
        sched = Scheduler(replace(mixed, seed=seed), started_ns=0)
        sched.admit_arrivals(60 * 10**9)
        return [(r.arrival_ns, r.prompt_len, r.output_len) for r in sched.waiting]

    def plans(seed: int) -> list[Plan]:
        sched = Scheduler(replace(mixed, seed=seed), started_ns=0)
        now, out = 0, list[Plan]()
        while len(out) < 3000:
            step = sched.next_plan(now)
            if step is None:
                now = max(now + 1, sched.next_arrival_ns)
                continue
            plan, batch = step
            now += 10_000_000
            sched.complete(plan, batch, now)
            out.append(plan)
        return out

    first = requests(7)
    assert len(first) > 100
    assert len({p for _, p, _ in first}) > 20 and len({o for _, _, o in first}) > 20
    assert requests(7) == first
    assert requests(8) != first
    assert plans(7) == plans(7)
    assert plans(7) != plans(8)


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
    simulator), then the counts it needs for the throughput ratio, and nothing else.

    Generated tokens count finished requests. With the steady scenario's 400-token
    outputs a request needs 400 decode steps, which a clean-clone suite run measured
    rank 0 not finishing in this 3-s run (387 steps of 6.7 ms, median): 16-token outputs
    finish a request every ~17 steps, 20x inside the steps a run gets.
    """
    path = scenario_file(tmp_path, "json", 3, batch=4, output=16)
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
