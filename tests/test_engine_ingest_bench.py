"""bench/engine_ingest.py runs on the recorded simulator spans and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_ingest_bench_replays_the_recording_and_reports_events_per_second() -> None:
    result = subprocess.run([sys.executable, "bench/engine_ingest.py", "--rounds", "1"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in result.stdout.splitlines()
            if line.startswith("| warm-up") or line.startswith("| judged")}
    assert set(rows) == {"warm-up", "judged"}

    def number(name: str, col: int) -> float:
        return float(rows[name][col].replace(",", ""))

    # the same iterations both ways; only the judged engine predicts and judges them
    assert rows["warm-up"][0] == rows["judged"][0] and number("judged", 0) > 1500
    assert number("warm-up", 1) == 0 and number("judged", 1) > 1000
    spans, events = number("judged", 3), number("judged", 4)
    assert abs(events - 2 * spans) <= 1  # all entry+return sites: two records a span
