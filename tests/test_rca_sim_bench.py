"""bench/rca_sim.py: a recording it cannot read is one line, not a traceback.

Replaying a recording takes a minute or more (the bench's job); the replay is the
product's own engine and scoring, tested in test_engine_core.py and test_evaluate.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "rca_sim.py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the bench script with the project's interpreter; never raises on failure."""
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_a_missing_recording_is_one_line(tmp_path: Path) -> None:
    labels = tmp_path / "run.labels"
    labels.write_text("", encoding="utf-8")
    res = run(f"{tmp_path / 'run.spans.gz'}:{labels}")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"rca_sim: no such file: {tmp_path / 'run.spans.gz'}"]


def test_a_recording_without_its_labels_is_a_usage_error() -> None:
    res = run("run.spans.gz")
    assert res.returncode == 2 and "give SPANS:LABELS" in res.stderr
    assert "Traceback" not in res.stderr
