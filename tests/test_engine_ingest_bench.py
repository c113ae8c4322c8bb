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
    assert set(rows) == {"warm-up", "judged", "judged, headless"}

    def number(name: str, col: int) -> float:
        return float(rows[name][col].replace(",", ""))

    # the same iterations every way; only the judged engines predict and judge them, and
    # keeping no spans (headless) changes no verdict
    assert rows["warm-up"][0] == rows["judged"][0] == rows["judged, headless"][0]
    assert number("judged", 0) > 1500
    assert number("warm-up", 1) == 0 and number("judged", 1) > 1000
    assert rows["judged, headless"][1] == rows["judged"][1]
    spans, events = number("judged", 3), number("judged", 4)
    assert abs(events - 2 * spans) <= 1  # all entry+return sites: two records a span
