"""bench/detector_heldout.py: seed lists, usage errors, and the table from saved evals.

Running ``prism eval`` on a generated scenario takes minutes (the bench's job); here the
table is built from saved ``prism eval --json`` documents (``--out DIR --reuse``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "detector_heldout.py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the bench script with the project's interpreter; never raises on failure."""
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def _fault(strength: str, judged: int, fired: int) -> dict[str, object]:
    return {"type": "device_slowdown", "rank": None, "intensity": 0.5, "start_s": 80.0,
            "duration_s": 10.0, "slowdown": None, "strength": strength, "judged": judged,
            "fired": fired, "recall": fired / judged, "detected": fired > 0}


def test_the_table_reads_saved_evals_by_fault_strength(tmp_path: Path) -> None:
    docs = {
        1001: {"rule": "paper", "f1": 0.9, "fpr": 0.01, "tp": 90, "fp": 10, "fn": 10,
               "tn": 990, "faults": [_fault(">=1.5x", 60, 60), _fault("<1.1x", 40, 30)]},
        1002: {"rule": "paper", "f1": 0.5, "fpr": 0.0, "tp": 10, "fp": 0, "fn": 20,
               "tn": 1000, "faults": [_fault("1.2-1.5x", 30, 10)]},
    }
    for seed, doc in docs.items():
        (tmp_path / f"random-{seed}.json").write_text(json.dumps(doc), encoding="utf-8")
    res = run("--seeds", "1001-1002", "--out", str(tmp_path), "--reuse", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    summary = out["summary"]
    assert summary["seeds"] == [1001, 1002] and summary["development_seeds_included"] == []
    # strong faults: tp 60 + 10, fn 0 + 20, every false positive (10) counts
    assert summary["f1_strong"] == round(2 * 70 / (2 * 70 + 10 + 20), 4)
    assert summary["f1_all"] == round(2 * 100 / (2 * 100 + 10 + 30), 4)
    assert summary["fpr"] == round(10 / 2000, 4)
    assert summary["buckets"]["<1.1x"] == {"faults": 1, "detected": 1, "judged": 40,
                                           "fired": 30}
    table = run("--seeds", "1001,1002", "--out", str(tmp_path), "--reuse").stdout
    assert "| 1001 | " in table and "1.00 (1/1)" in table and "0.33 (1/1)" in table
    assert "NOTE" not in table


def test_development_seeds_are_flagged(tmp_path: Path) -> None:
    doc = {"rule": "paper", "f1": 1.0, "fpr": 0.0, "tp": 1, "fp": 0, "fn": 0, "tn": 1,
           "faults": []}
    (tmp_path / "random-1.json").write_text(json.dumps(doc), encoding="utf-8")
    res = run("--seeds", "1", "--out", str(tmp_path), "--reuse")
    assert res.returncode == 0, res.stderr
    assert "| 1 (dev) |" in res.stdout and "NOTE: development seeds included" in res.stdout


def test_usage_errors_exit_2_with_one_line() -> None:
    for args in (("--seeds", "10-x"), ("--reuse",)):
        res = run(*args)
        assert res.returncode == 2 and res.stdout == ""
        assert res.stderr.startswith("detector_heldout: ") and res.stderr.count("\n") == 1
