"""bench/noise_floor.py: the floor's arithmetic, what counts as normal, one rank end to end
on synthetic iterations through the real detector, and usage errors as one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "noise_floor.py"
sys.path.insert(0, str(ROOT / "bench"))

from detector_sim import DecodeStep  # noqa: E402
from noise_floor import floor_of, normal_mask, rank_floor  # noqa: E402

from prism_sim.labels import FaultRecord  # noqa: E402
from prism_tui.engine.detector import Workload  # noqa: E402


def test_the_floor_is_the_quantile_and_the_slowdown_it_lets_through() -> None:
    errors = np.concatenate([np.zeros(990), np.full(10, 0.2)])  # 1 % at 0.2
    assert floor_of(errors, 0.005).limit == pytest.approx(0.2)
    assert floor_of(errors, 0.005).mildest_slowdown == pytest.approx(1.25)
    assert floor_of(errors, 0.02).limit == 0.0  # 2 % may fire: nothing to clear
    assert floor_of(errors, 0.02).mildest_slowdown == 1.0
    assert floor_of(np.ones(10), 0.1).mildest_slowdown == float("inf")


def _step(i: int, *, fault: bool = False, ms: float = 5.0) -> DecodeStep:
    return DecodeStep(0, (i + 1) * 10_000_000, ms, Workload(4, 100, 10), fault, 4, 110)


def test_fault_iterations_and_their_tail_are_not_normal() -> None:
    # iteration i ends at (i + 1) * 10 ms: a fault on 100-199 (last end 2.0 s), its tail
    # the iterations ending less than 3 s later (200-498)
    steps = [_step(i, fault=100 <= i < 200) for i in range(600)]
    keep = normal_mask(steps)
    assert keep[:100].all() and not keep[100:499].any() and keep[499:].all()


def test_a_quiet_law_has_a_low_floor_and_a_noisy_one_a_higher_one() -> None:
    rng = np.random.default_rng(3)

    def run(noise: float) -> tuple[float, float]:
        steps = []
        for i in range(3000):
            b = int(rng.integers(1, 16))
            kv = int(rng.integers(100, 2000))
            ms = (2.0 + 0.2 * b + 0.0005 * b * kv) * (1 + abs(rng.normal(0, noise)))
            steps.append(DecodeStep(0, (i + 1) * 5_000_000, ms,
                                    Workload(b, kv - 20, 20), False, b, kv))
        found = rank_floor(0, steps, 0.005, settle_s=0.0, warmup=500, warmup_s=0.0)
        assert found is not None and found[0].normal > 2000
        return found[0].live.limit, found[0].fitted.limit

    quiet_live, quiet_fitted = run(0.01)
    noisy_live, noisy_fitted = run(0.2)
    assert quiet_live < 0.05 and quiet_fitted < 0.05
    assert noisy_fitted > 3 * quiet_fitted and noisy_live > 3 * quiet_live


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the bench script with the project's interpreter; never raises on failure."""
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_a_missing_recording_is_one_line(tmp_path: Path) -> None:
    res = run_cli("--spans", str(tmp_path / "none.spans.gz"), "--labels",
                  str(tmp_path / "none.labels"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"noise_floor: no such file: {tmp_path / 'none.spans.gz'}"]


def test_an_impossible_rate_is_a_usage_error(tmp_path: Path) -> None:
    res = run_cli("--spans", "x", "--labels", "y", "--fpr", "1.5")
    assert res.returncode == 2 and "--fpr must be between 0 and 1" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_fault_that_only_grows_the_batch_is_not_unexplained() -> None:
    rng = np.random.default_rng(5)
    steps = []
    for i in range(4000):
        t = (i + 1) * 5_000_000
        grow = 2000 <= i < 2400  # the batch grows: steps slower, as the law says
        slow = 3000 <= i < 3400  # the same load, every step 1.5x
        b = int(rng.integers(12, 16)) if grow else int(rng.integers(1, 8))
        kv = int(rng.integers(100, 2000))
        ms = (2.0 + 0.5 * b + 0.0005 * b * kv) * (1 + abs(rng.normal(0, 0.01)))
        steps.append(DecodeStep(0, t, ms * (1.5 if slow else 1.0),
                                Workload(b, kv - 20, 20), grow or slow, b, kv))
    faults = [FaultRecord("device_preemption", None, 2000 * 5_000_000, 2400 * 5_000_000, 0.5),
              FaultRecord("device_slowdown", 0, 3000 * 5_000_000, 3400 * 5_000_000, 0.5),
              FaultRecord("straggler", 1, 3000 * 5_000_000, 3400 * 5_000_000, 0.5)]
    found = rank_floor(0, steps, 0.005, settle_s=0.0, warmup=500, warmup_s=0.0,
                       faults=faults)
    assert found is not None
    grew, slowed = found[1]  # the straggler is on another rank
    assert grew.type == "device_preemption" and slowed.type == "device_slowdown"
    assert grew.slowdown is not None and grew.slowdown > 1.5
    assert 0.9 < grew.unexplained < 1.15 and not grew.above_floor
    assert slowed.unexplained == pytest.approx(1.5, abs=0.1) and slowed.above_floor
    assert slowed.fired > slowed.judged / 2
