"""bench/rca_deepdive.py on a slice of the paper's DeepDive data, through the engine's rca."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
