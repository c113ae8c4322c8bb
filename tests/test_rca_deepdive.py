"""bench/rca_deepdive.py on a slice of the paper's DeepDive data, through the engine's rca."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from prism_tui.engine.rca import rank_suspects

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "rca_deepdive.py"
DATA = ROOT.parent / "shared" / "datasets" / "latencyprism" / "deepdive_sglang"

needs_data = pytest.mark.skipif(
    not (DATA / "Data" / "Processed" / "SGLang").is_dir(),
    reason=f"DeepDive dataset not found at {DATA} (../shared/datasets/latencyprism)",
)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the bench script with the project's interpreter; never raises on failure."""
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


@needs_data
def test_cpu_squeeze_slice_ranks_host_cpu_work_first() -> None:
    """Five cycles of each run of the CPU-squeeze case: on-CPU host time tops the list.

    The squeeze doubles the cycle (636 -> 1357 ms) and the host's on-CPU share rises by
    ~29 points against a spread of ~2: no other stage comes within a factor of ten.
    """
    res = run("--case", "cpu_compute_squeeze_out", "--cycles", "5", "--json")
    assert res.returncode == 0, res.stderr
    (case,) = json.loads(res.stdout)
    assert case["cycles"] == [5, 5]
    top = case["suspects"][0]
    assert (top["stage"], top["device"]) == ("oncpu", "Host")
    assert top["delta_share"] > 0.1
    assert case["consistent"] is True
    assert case["paper_first"].startswith("oncpu@Host")


def test_missing_data_skips_cleanly(tmp_path: Path) -> None:
    res = run("--data", str(tmp_path / "absent"))
    assert res.returncode == 0
    assert res.stdout == ""
    assert "skipped" in res.stderr and res.stderr.count("\n") == 1


def test_bad_cycles_is_a_usage_error() -> None:
    res = run("--cycles", "1")
    assert res.returncode == 2
    assert res.stderr.startswith("rca_deepdive: --cycles")


# ------------------------------------------- the two rules the DeepDive data motivated


def _rows(means: dict[str, float], spread: dict[str, float], n: int) -> list[dict[str, float]]:
    """``n`` iterations alternating each stage's share by +-spread around its mean."""
    return [{k: m + (spread[k] if i % 2 else -spread[k]) for k, m in means.items()}
            for i in range(n)]


def test_a_stage_whose_share_rose_ranks_before_one_whose_share_fell() -> None:
    """The host loop's share falls by 0.3 with a tiny spread (the larger score); the
    kernel's rises by 0.1: the kernel took the added time and leads."""
    spread = {"host": 0.001, "gemm@gpu0": 0.05, "nccl@gpu0": 0.05}
    base = _rows({"host": 0.6, "gemm@gpu0": 0.2, "nccl@gpu0": 0.2}, spread, 40)
    anom = _rows({"host": 0.3, "gemm@gpu0": 0.3, "nccl@gpu0": 0.4}, spread, 10)
    got = rank_suspects(base, anom, top=0)
    host = next(s for s in got if s.stage == "host")
    assert host.score > max(s.score for s in got if s.stage != "host")
    assert [s.stage for s in got] == ["nccl", "gemm", "host"]
    assert all(s.delta_share > 0 for s in got[:2]) and host.delta_share < 0


def test_a_metrics_z_score_does_not_depend_on_its_unit() -> None:
    """A clock in MHz or in GHz, and a metric near 1 with no baseline spread: the log
    spread is floored at a 1 % change, so the z-score is the same in every unit and
    finite."""
    share_b = _rows({"gemm@gpu0": 0.5, "host": 0.5}, {"gemm@gpu0": 0.01, "host": 0.01}, 20)
    share_a = _rows({"gemm@gpu0": 0.7, "host": 0.3}, {"gemm@gpu0": 0.01, "host": 0.01}, 10)

    def z(scale: float) -> float:
        ub = [{"sm_clock@gpu0": 1.4 * scale} for _ in range(20)]
        ua = [{"sm_clock@gpu0": 0.7 * scale} for _ in range(10)]
        top = rank_suspects(share_b, share_a, ub, ua, top=1)[0]
        assert top.stage == "gemm" and top.metric == "sm_clock@gpu0"
        return top.z_metric

    assert z(1.0) == pytest.approx(z(1000.0)) == pytest.approx(z(1e6))
    assert z(1.0) == pytest.approx(math.log(0.5) / math.log1p(0.01))
