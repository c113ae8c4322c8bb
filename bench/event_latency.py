"""How long a probe hit takes to reach an asyncio consumer: urgent vs default probes.

The C target calls ``pl_work`` about every 5 ms from a background thread; a session
attached with ``UprobeSession.batches()`` (wake-ups through ``loop.add_reader``) receives
the spans. Latency = receipt time (CLOCK_MONOTONIC) minus the hit's timestamp. An urgent
probe wakes the reader on every hit; a default probe waits for the next drain
(``drain_interval_s``) or a half-full ring.

    .venv/bin/python bench/event_latency.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from probes.placement import place_symbol  # noqa: E402
from probes.target import Target  # noqa: E402
from probes.uprobes import UprobeSession  # noqa: E402


def build_target(tmp: Path) -> Path:
    """Compile the C target into ``tmp``."""
    exe = tmp / "ctarget"
    cc = shutil.which("cc") or "gcc"
    subprocess.run([cc, "-O0", "-g", "-fcf-protection=full", "-pthread",
                    str(ROOT / "tests/targets/ctarget.c"), "-o", str(exe)], check=True)
    return exe


async def measure(pid: int, urgent: bool, seconds: float, drain_s: float) -> list[float]:
    """Receipt latency in ms of every span seen in ``seconds``."""
    target = Target(pid)
    sites = place_symbol(target, "ctarget", "pl_work", ret=False)
    latencies: list[float] = []
    session = UprobeSession([target], sites, mode="thread",
                            urgent={sites[0].probe} if urgent else (),
                            drain_interval_s=drain_s)
    with session:
        deadline = time.monotonic() + seconds

        async def consume() -> None:
            async for batch in session.batches():
                now = time.monotonic_ns()
                latencies.extend((now - s.start_ns) / 1e6 for s in batch)
                if time.monotonic() > deadline:
                    return

        await asyncio.wait_for(consume(), seconds + 5)
    return latencies


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    seconds = 2.0 if args.quick else 6.0
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_target(Path(tmp))
        proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdout.readline()
        proc.stdin.write("spin_start 5000\n")
        proc.stdin.flush()
        proc.stdout.readline()
        rows = []
        try:
            for urgent, drain in ((True, 0.02), (False, 0.02), (False, 0.1)):
                lat = asyncio.run(measure(proc.pid, urgent, seconds, drain))
                lat.sort()
                rows.append((urgent, drain, len(lat), statistics.median(lat),
                             lat[int(0.99 * (len(lat) - 1))], lat[-1]))
        finally:
            proc.kill()
            proc.wait()
    print(f"Hit → asyncio consumer latency, pl_work every ~5 ms, {seconds:g} s per row\n")
    print("| probe | drain interval | spans | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|")
    for urgent, drain, n, p50, p99, mx in rows:
        kind = "urgent (wakes per hit)" if urgent else "default (watermark)"
        print(f"| {kind} | {drain * 1000:.0f} ms | {n} | {p50:.3f} | {p99:.3f} | {mx:.3f} |")


if __name__ == "__main__":
    main()
