"""Regenerate ``sim_spans.jsonl.gz``: 14 s of the simulator traced by the real monitor.

Two ranks under continuous batching; rank 1's device slows down (intensity 0.5) from the
8th second for 4 s. The tests replay it through the engine with a fixed clock.

    .venv/bin/python tests/data/record_sim.py
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from prism_sim.scenario import parse_scenario  # noqa: E402
from prism_sim.server import SimServer  # noqa: E402
from prism_tui.engine.core import DetectionConfig  # noqa: E402
from prism_tui.engine.monitor import (  # noqa: E402
    Monitor,
    MonitorConfig,
    Subscribers,
)
from prism_tui.engine.recording import save_spans  # noqa: E402
from probes.catalog import load_profile  # noqa: E402
from probes.target import Target  # noqa: E402

SCENARIO = """
[scenario]
name = "recording"
seed = 11
duration_s = 14

[topology]
ranks = 2
layers = 8
hidden = 4096

[[phase]]
start_s = 0
arrival_rate = 20.0
max_batch = 8
prompt = { dist = "uniform", min = 16, max = 64 }
output = { dist = "uniform", min = 50, max = 150 }

[[fault]]
type = "device_slowdown"
start_s = 8
duration_s = 4
rank = 1
intensity = 0.5
"""
OUT = Path(__file__).resolve().parent / "sim_spans.jsonl.gz"


def main() -> None:
    spans: list[object] = []
    tmp = tempfile.TemporaryDirectory(prefix="prism-record-")
    path = Path(tmp.name) / "recording.toml"
    path.write_text(SCENARIO)
    with SimServer(parse_scenario(SCENARIO, str(path)), metrics_port=None) as server:
        stop = threading.Event()
        runner = threading.Thread(target=server.run, args=(14, stop), daemon=True)
        runner.start()
        targets = [Target(pid) for pid in server.rank_pids.values()]
        with Monitor(targets, load_profile("cuda"), extra_profiles=[load_profile("nccl")],
                     detection=DetectionConfig(warmup=100_000),
                     config=MonitorConfig(telemetry=False),
                     subscribers=Subscribers(spans=spans.extend)) as monitor:
            asyncio.run(monitor.run(14))
            procs = monitor.recorded_processes()
        stop.set()
        runner.join(10)
    tmp.cleanup()
    n = save_spans(str(OUT), procs, spans)  # type: ignore[arg-type]
    print(f"{OUT}: {n} spans of {len(procs)} processes, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
