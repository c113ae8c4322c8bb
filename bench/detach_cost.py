"""What detaching costs: closing the perf events of the `cuda` + `nccl` profiles.

Attaches both profiles to the two ranks of the simulator (thread mode, as `prism demo`
does), then closes them three ways, side by side in one run: one fd after the other,
every fd from its own thread at once, and after the target processes were killed. The
kernel unregisters a uprobe with an RCU grace period per event, so the figure that
matters is milliseconds per event and whether anything makes it parallel.

    .venv/bin/python bench/detach_cost.py
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prism_sim.scenario import parse_scenario  # noqa: E402
from prism_sim.server import SimServer  # noqa: E402
from probes.catalog import load_profile  # noqa: E402
from probes.placement import place_profile  # noqa: E402
from probes.target import Target  # noqa: E402
from probes.uprobes import UprobeSession  # noqa: E402

SCENARIO = """
[scenario]
name = "detach"
seed = 1
duration_s = 120

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
"""


def _attach(pids: list[int]) -> list[UprobeSession]:
    sessions = []
    for pid in pids:
        target = Target(pid)
        sites = (place_profile(target, load_profile("cuda"), "sentinel").sites
                 + place_profile(target, load_profile("nccl"), "sentinel").sites)
        sessions.append(UprobeSession([target], sites, mode="thread").open())
    return sessions


def _fds(sessions: list[UprobeSession]) -> list[int]:
    return [fd for s in sessions for ring in [*s._rings.values(), *s._watchers.values()]
            for fd in ring.fds]


def _close_serial(sessions: list[UprobeSession]) -> None:
    for s in sessions:
        s.close()


def _close_parallel(sessions: list[UprobeSession]) -> None:
    fds = _fds(sessions)
    with ThreadPoolExecutor(len(fds)) as pool:
        list(pool.map(os.close, fds))
    for s in sessions:
        for ring in [*s._rings.values(), *s._watchers.values()]:
            ring.fds.clear()
        s.close()


def _run(label: str, pids: list[int], close: Callable[[list[UprobeSession]], None],
         before: Callable[[], None] = lambda: None) -> None:
    sessions = _attach(pids)
    time.sleep(1.0)
    n = len(_fds(sessions))
    before()
    t0 = time.perf_counter()
    close(sessions)
    dt = time.perf_counter() - t0
    print(f"| {label} | {n} | {dt:.2f} | {dt / n * 1e3:.1f} |", flush=True)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "detach.toml"
        path.write_text(SCENARIO)
        print("| close | events | seconds | ms per event |\n|---|---:|---:|---:|")
        with SimServer(parse_scenario(SCENARIO, str(path)), metrics_port=None) as server:
            stop = threading.Event()
            runner = threading.Thread(target=server.run, args=(120, stop), daemon=True)
            runner.start()
            pids = list(server.rank_pids.values())
            _run("one after the other", pids, _close_serial)
            _run("all at once, one thread per fd", pids, _close_parallel)

            def kill() -> None:
                stop.set()
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                time.sleep(0.5)

            _run("after the targets were killed", pids, _close_serial, kill)
            runner.join(10)


if __name__ == "__main__":
    main()
