"""Device labels of real processes, and automatic anchor choice on synthetic span streams."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from prism_tui.engine import devices
from prism_tui.engine.anchor_discovery import AnchorDiscovery
from prism_tui.engine.anchors import choose_anchor, dominant_period_ms, rank_anchors
from prism_tui.engine.core import DetectionConfig
from prism_tui.engine.devices import VISIBLE_DEVICE_VARS, NvmlDevices, device_of, read_environ
from prism_tui.engine.monitor import Monitor, MonitorConfig, Subscribers
from probes.catalog import parse_profile
from probes.target import Target
from probes.uprobes import Span
from tests.conftest import CTARGET_PROFILE, CTarget, nvml_loadable

# --------------------------------------------------------------------------- devices


@pytest.fixture
def child() -> Iterator[object]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(**extra: str) -> int:
        env = {k: v for k, v in os.environ.items() if not k.endswith("VISIBLE_DEVICES")}
        env.update(extra)
        p = subprocess.Popen(
            [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
            env=env, stdout=subprocess.PIPE)
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline() == b"up\n"  # exec'd: env is its own
        return p.pid

    yield start
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.parametrize(("env", "label"), [
    ({"CUDA_VISIBLE_DEVICES": "2,3"}, "cuda:2"),
    ({"CUDA_VISIBLE_DEVICES": "GPU-5c1a2b3d-aaaa-bbbb-cccc-0123456789ab"}, "cuda:GPU-5c1a2b3d"),
    ({"HIP_VISIBLE_DEVICES": "1"}, "rocm:1"),
    ({"ROCR_VISIBLE_DEVICES": "0,1"}, "rocm:0"),
    ({"ASCEND_RT_VISIBLE_DEVICES": "4"}, "npu:4"),
    ({"CUDA_VISIBLE_DEVICES": ""}, "cpu"),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, "cpu"),
    ({}, "cpu"),
])
def test_device_from_a_real_process_environment(child: object, env: dict[str, str],
                                                label: str) -> None:
    pid = child(**env)  # type: ignore[operator]
    assert device_of(pid) == label
    assert read_environ(pid).get("CUDA_VISIBLE_DEVICES") == env.get("CUDA_VISIBLE_DEVICES")



def test_nvml_processes_come_first(child: object) -> None:
    pid = child(CUDA_VISIBLE_DEVICES="3")  # type: ignore[operator]
    other = child(HIP_VISIBLE_DEVICES="1")  # type: ignore[operator]
    # shaped as NvmlSampler.processes() gives it: every GPU process of the host
    listed = {pid: [1], other: [0, 2], 1: [0]}
    assert device_of(pid, nvml_processes=listed) == "cuda:1"
    assert device_of(other, nvml_processes=listed) == "cuda:0+2"  # over its HIP variable
    assert device_of(pid, nvml_processes={pid: []}) == "cuda:3"  # no GPU listed: env
    assert device_of(pid, nvml_processes={pid: [1]}) == "cuda:1"
    assert device_of(pid, nvml_processes={pid: [2, 0]}) == "cuda:0+2"
    assert device_of(pid, nvml_processes={pid + 1: [1]}) == "cuda:3"  # not listed: env
    assert device_of(pid, nvml_processes={}) == "cuda:3"


def test_the_default_labeller_falls_back_to_the_environment(child: object) -> None:
    """NvmlDevices on this host: NVML's list when it has one, the environment otherwise."""
    pid = child(CUDA_VISIBLE_DEVICES="3")  # type: ignore[operator]
    labeller = NvmlDevices()
    assert labeller.unavailable_reason is None  # nothing asked yet
    assert labeller(pid) == "cuda:3"  # a sleeping interpreter holds no GPU context
    reason = labeller.unavailable_reason
    if not nvml_loadable():
        assert reason is not None and "libnvidia-ml" in reason, reason
    if reason is not None:
        assert labeller.processes() == {}  # not tried again, and no exception
        assert labeller.unavailable_reason == reason
        assert labeller.samples() == []  # the telemetry's GPU side: nothing, no error
    else:  # a host with NVML: it answered, without our child
        assert pid not in labeller.processes()
        assert [g.index for g in labeller.samples()] == list(range(len(labeller.samples())))
    labeller.close()
    labeller.close()
    assert labeller(pid) == "cuda:3"
    assert labeller.unavailable_reason == "NVML closed"
    assert labeller.samples() == []


def test_the_monitor_labels_its_targets_by_default(
        ctarget_exe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real C target started with CUDA_VISIBLE_DEVICES=3, real uprobes, the default
    labeller: the target, its recording header and its series are ``cuda:3``."""
    for var, _ in VISIBLE_DEVICE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # the child inherits it
    target = CTarget(ctarget_exe)
    try:
        target.cmd("spin_start 2000")  # the anchor every 2 ms
        notices: list[str] = []
        monitor = Monitor([Target(target.pid)], parse_profile(CTARGET_PROFILE, "ctarget"),
                          detection=DetectionConfig(warmup=100_000),
                          config=MonitorConfig(escalation_s=0, telemetry=False),
                          subscribers=Subscribers(notice=notices.append))
        try:
            asyncio.run(monitor.run(0.5))
        finally:
            monitor.close()
    finally:
        target.close()
    [shown] = monitor.engine.view().targets
    assert (shown.pid, shown.device) == (target.pid, "cuda:3")
    assert [p.device for p in monitor.recorded_processes()] == ["cuda:3"]
    devices_seen = {k.device for k in monitor.engine.sketches.keys()}  # noqa: SIM118
    assert devices_seen == {"cuda:3"}
    nvml_notices = [n for n in notices if "NVML unavailable" in n]
    if not nvml_loadable():  # said once, with NVML's own reason
        assert len(nvml_notices) == 1 and "libnvidia-ml" in nvml_notices[0], notices


def test_given_environ_and_unreadable_processes() -> None:
    assert device_of(123, environ={"HIP_VISIBLE_DEVICES": "2"}) == "rocm:2"
    assert device_of(123, environ={}) == "cpu"
    missing = 2**22 + 12345  # above pid_max's default: no such process
    assert read_environ(missing) == {}
    assert device_of(missing) == "cpu"


def test_unreadable_environ_falls_through(child: object) -> None:
    """Run devices.py as user nobody (a stdlib-only module) against a root-owned child."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a check as another user")
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 that user nobody can run")
    pid = child(CUDA_VISIBLE_DEVICES="1")  # type: ignore[operator]
    tmp_dir = Path(tempfile.mkdtemp(prefix="prism-devices-"))  # not under 0700 pytest dirs
    module = tmp_dir / "devices_copy.py"
    shutil.copy(devices.__file__, module)
    tmp_dir.chmod(0o755)
    module.chmod(0o644)
    code = (f"import sys; sys.path.insert(0, {str(tmp_dir)!r}); import devices_copy as d; "
            f"print(d.device_of({pid}), d.read_environ({pid}) == {{}})")
    try:
        out = subprocess.run([python, "-c", code], user=65534, group=65534, cwd="/",
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot run as nobody: {exc}")
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    if out.returncode != 0:
        pytest.skip(f"cannot run as nobody: {out.stderr.strip()[-200:]}")
    assert out.stdout.split() == ["cpu", "True"]  # permission denied: no exception


# --------------------------------------------------------------------------- anchors


@dataclass(frozen=True)
class S:
    probe: str
    pid: int
    tid: int
    start_ns: int
    end_ns: int
    args: Mapping[str, int | float] = field(default_factory=dict)


MS = 1_000_000


def inference_stream(pid: int = 100, iterations: int = 300, seed: int = 1,
                     with_sync: bool = True) -> list[S]:
    """Per iteration: 20 per-layer launches 0.3 ms apart, then a sync; 10 ms ± noise.

    Plus an irregular probe (Poisson arrivals, mean gap 7 ms) and a rare one.
    """
    rng = random.Random(seed)
    spans: list[S] = []
    t = 0
    for _ in range(iterations):
        period = int(rng.gauss(10 * MS, 0.3 * MS))
        for layer in range(20):
            start = t + int(0.5 * MS) + layer * int(0.3 * MS) + rng.randint(0, 20_000)
            spans.append(S("launch", pid, pid, start, start + 5_000))
        if with_sync:
            sync_start = t + int(7 * MS)
            sync_end = t + period - rng.randint(0, 50_000)
            spans.append(S("sync", pid, pid, sync_start, sync_end))
        t += period
    end = t
    t = 0
    while t < end:
        t += int(rng.expovariate(1 / (7 * MS)))
        spans.append(S("irregular", pid, pid + 1, t, t + rng.randint(1_000, 500_000)))
    for k in range(5):
        spans.append(S("rare", pid, pid, k * 300 * MS, k * 300 * MS + 1_000))
    rng.shuffle(spans)
    return spans


def test_the_per_iteration_sync_is_chosen() -> None:
    choice = choose_anchor(inference_stream())
    assert choice is not None and choice.accepted
    assert choice.probe == "sync"
    assert 9.5 < choice.median_cycle_ms < 10.5
    assert 90 < choice.calls_per_s < 110
    assert choice.cycle_cv < 0.1 and choice.processes == 1
    ranked = {c.probe: c for c in rank_anchors(inference_stream())}
    assert "cycle too short" in ranked["launch"].reason and not ranked["launch"].accepted
    assert "irregular" in ranked["irregular"].reason and not ranked["irregular"].accepted
    assert "does not recur" in ranked["rare"].reason and ranked["rare"].score == 0


@pytest.mark.parametrize("seed", range(10))
def test_the_sync_wins_across_seeds_and_lengths(seed: int) -> None:
    spans = inference_stream(iterations=50 + 100 * seed, seed=seed)
    choice = choose_anchor(spans)
    assert choice is not None and choice.probe == "sync"


def test_several_processes_and_real_span_type() -> None:
    spans: list[S | Span] = [*inference_stream(pid=1, seed=2), *inference_stream(pid=2, seed=3)]
    spans += [Span("sync2", 3, 3, k * 10 * MS, k * 10 * MS + MS) for k in range(5)]
    choice = choose_anchor(spans)
    assert choice is not None and choice.probe == "sync" and choice.processes == 2


def test_a_periodic_probe_far_slower_than_iterations_loses() -> None:
    spans = inference_stream(iterations=1000)
    spans += [S("timer", 100, 100, k * 100 * MS, k * 100 * MS + 1000) for k in range(100)]
    ranked = [c for c in rank_anchors(spans) if c.accepted]
    assert [c.probe for c in ranked] == ["sync", "timer"]
    assert ranked[0].score > ranked[1].score


def test_nothing_recurs_gives_none_with_reasons() -> None:
    spans = inference_stream(with_sync=False)
    assert choose_anchor(spans) is None
    ranked = rank_anchors(spans)
    assert ranked and not any(c.accepted for c in ranked)
    assert all(c.reason for c in ranked)
    assert choose_anchor([]) is None and rank_anchors([]) == []
    few = [S("sync", 1, 1, k * 10 * MS, k * 10 * MS + 1) for k in range(10)]
    assert choose_anchor(few) is None
    assert "10 calls" in rank_anchors(few)[0].reason


def test_unstable_durations_are_rejected() -> None:
    rng = random.Random(5)
    spans = [S("wobbly", 1, 1, k * 10 * MS, k * 10 * MS + rng.choice([1000, 10_000, 3 * MS]))
             for k in range(100)]
    (only,) = rank_anchors(spans)
    assert not only.accepted and "unstable duration" in only.reason


def test_dominant_period_recovers_the_iteration_period() -> None:
    for iterations in (100, 300, 1000):
        for seed in range(3):
            spans = inference_stream(iterations=iterations, seed=seed)
            period = dominant_period_ms([s.end_ns for s in spans])
            assert period is not None and abs(period - 10.0) / 10.0 < 0.05
            # Without the sync: the launch bursts alone still give the period.
            bursts = inference_stream(iterations=iterations, seed=seed, with_sync=False)
            period = dominant_period_ms([s.end_ns for s in bursts])
            assert period is not None and abs(period - 10.0) / 10.0 < 0.05
    # Periods that fall between bins are still found to a fraction of a bin.
    for true_ms in (1.3, 7.77, 23.7, 55.5):
        found = dominant_period_ms([int(k * true_ms * MS) for k in range(300)])
        assert found is not None and abs(found - true_ms) < 0.1


def test_dominant_period_of_aperiodic_or_tiny_streams_is_none() -> None:
    rng = random.Random(9)
    t, ts = 0, []
    for _ in range(3000):
        t += int(rng.expovariate(1 / (2 * MS)))
        ts.append(t)
    assert dominant_period_ms(ts) is None
    assert dominant_period_ms([]) is None
    assert dominant_period_ms([1, 2, 3]) is None
    assert dominant_period_ms([5 * MS] * 10) is None


def _real_spans(spans: list[S]) -> list[Span]:
    return [Span(s.probe, s.pid, s.tid, s.start_ns, s.end_ns) for s in spans]


def test_the_first_alternative_anchor_to_fire_is_taken_with_every_span_held() -> None:
    """Alternatives (``llama_decode`` / ``llama_process``): the one that fires wins at the
    next check, without ranking, and every span held so far is handed back to be cut."""
    notices: list[str] = []
    discovery = AnchorDiscovery("p", 5.0, notice=notices.append,
                                candidates=("decode", "sync"), candidates_s=10.0)
    discovery.start(0.0)
    assert notices == []  # nothing to say while an alternative may still fire
    spans = _real_spans(inference_stream(iterations=50))
    discovery.hold(spans[:400])
    discovery.hold(spans[400:])
    held = discovery.check(0.1)  # before the rate-limited ranking is due: no matter
    assert held is not None and len(held) == len(spans)
    assert discovery.chosen == "sync" and discovery.choice is None
    assert len(notices) == 1 and "the first of profile 'p''s anchors to fire" in notices[0]
    assert "(not decode)" in notices[0]


def test_alternatives_that_never_fire_give_way_to_a_ranked_choice_after_their_wait() -> None:
    notices: list[str] = []
    discovery = AnchorDiscovery("p", 5.0, notice=notices.append,
                                candidates=("decode", "process"), candidates_s=10.0)
    discovery.start(0.0)
    discovery.hold(_real_spans(inference_stream(iterations=300)))
    assert discovery.check(1.0) is None and discovery.check(9.0) is None
    assert discovery.chosen is None and notices == []
    held = discovery.check(10.5)
    assert held is not None and discovery.chosen == "sync"
    assert discovery.choice is not None and discovery.choice.probe == "sync"
    assert "none of profile 'p''s iteration anchors (decode, process) fired in 10 s" \
        in notices[0], notices
    assert notices[1].startswith("iteration anchor: sync, chosen from"), notices


def test_an_alternative_firing_late_still_beats_the_ranking() -> None:
    """A server idle past the wait: nothing qualifies to rank, then its step fires."""
    notices: list[str] = []
    discovery = AnchorDiscovery("p", 5.0, notice=notices.append,
                                candidates=("decode", "process"), candidates_s=1.0)
    discovery.start(0.0)
    assert discovery.check(2.0) is None and discovery.chosen is None
    late = [Span("launch", 1, 1, k * MS, k * MS + 10) for k in range(3)]
    late.append(Span("process", 1, 1, 5 * MS, 6 * MS))
    discovery.hold(late)
    held = discovery.check(2.1)
    assert held == late and discovery.chosen == "process", notices
