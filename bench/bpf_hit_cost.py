"""What a probe hit costs the target, perf backend vs eBPF backend, side by side.

The C target (``tests/targets/ctarget.c``) times N calls of ``pl_work`` in-process
(``time work N``) with no probe, then with an entry+return probe on it through each
backend, interleaved over the rounds (medians). Neither wakes the reader (the ring holds
every record; it is drained after each timing). The perf backend writes two records a
call (entry, return) into a per-thread ring; the eBPF program stores the entry in a hash
map and writes one span record at the return. The added nanoseconds per call are the
probe's cost on the server's thread; the ratio is bpf over perf. The monitor's side:
CPU time of the ``read()`` that turns the round's records into spans (ring read,
decoding, pairing), per span. Last, the governor's self-calibration of both backends
(``calibrate(bpf=True)``) in the same run: what each costs a session with, per hit class
and per call of an urgent entry+return anchor (the governor counts a wake-up per perf
record, one per bpf span).

    .venv/bin/python bench/bpf_hit_cost.py [--rounds N] [--calls N]   # needs `make bpf`
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from probes.bpf.session import BpfSession  # noqa: E402
from probes.catalog import parse_profile  # noqa: E402
from probes.governor import calibrate  # noqa: E402
from probes.placement import place_profile  # noqa: E402
from probes.target import Target  # noqa: E402
from probes.uprobes import UprobeSession  # noqa: E402

PROFILE = """
[profile]
name = "hit"
description = "pl_work, entry and return"

[[library]]
id = "exe"
soname = ["ctarget*"]

[[probe]]
id = "work"
library = "exe"
symbol = "pl_work"
stage = "host"
ret = true
[probe.args]
x = "arg1"
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=3000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "ctarget"
        subprocess.run(["cc", "-O0", "-g", "-fcf-protection=full", "-pthread",
                        str(ROOT / "tests/targets/ctarget.c"), "-o", str(exe)], check=True)
        proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, bufsize=1)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdout.readline()

        def timed(n: int) -> float:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(f"time work {n}\n")
            proc.stdin.flush()
            return float(proc.stdout.readline().split()[1])

        target = Target(proc.pid)
        sites = place_profile(target, parse_profile(PROFILE, "hit.toml"), "sentinel").sites
        ns: dict[str, list[float]] = {"none": [], "perf": [], "bpf": []}
        spans: dict[str, int] = {"perf": 0, "bpf": 0}
        read_s: dict[str, float] = {"perf": 0.0, "bpf": 0.0}
        try:
            timed(100_000)  # warm
            for _ in range(args.rounds):
                ns["none"].append(timed(args.calls * 10))
                for name in ("perf", "bpf"):
                    session: UprobeSession | BpfSession
                    if name == "perf":
                        session = UprobeSession([target], sites, mode="thread",
                                                ring_pages=256)
                    else:
                        session = BpfSession([target], sites, ring_pages=256)
                    with session:
                        time.sleep(0.05)
                        ns[name].append(timed(args.calls))
                        time.sleep(0.05)
                        c0 = time.process_time()
                        spans[name] += len(session.read())
                        read_s[name] += time.process_time() - c0
        finally:
            proc.kill()
            proc.wait()
    base = statistics.median(ns["none"])
    added = {k: statistics.median(v) - base for k, v in ns.items()}
    print(f"pl_work entry+return, {args.rounds} rounds of {args.calls} calls (medians); "
          f"spans read: perf {spans['perf']}, bpf {spans['bpf']} of "
          f"{args.rounds * args.calls} each")
    print("\n| probe | ns per call | added ns per call | ratio to perf "
          "| reader µs per span | ratio to perf |\n|---|---:|---:|---:|---:|---:|")
    for name in ("none", "perf", "bpf"):
        if name == "none":
            print(f"| none | {statistics.median(ns[name]):,.0f} | 0 | - | - | - |")
            continue
        per_span = 1e6 * read_s[name] / max(1, spans[name])
        print(f"| {name} | {statistics.median(ns[name]):,.0f} | {added[name]:,.0f} "
              f"| {added[name] / added['perf']:.2f} | {per_span:.2f} "
              f"| {per_span / (1e6 * read_s['perf'] / max(1, spans['perf'])):.2f} |")
    costs = calibrate(bpf=True)
    print("\n| calibration | emulated ns | single-step ns | return ns | wake-up ns "
          "| urgent emulated entry+return ns per call |\n|---|---:|---:|---:|---:|---:|")
    for name in ("perf", "bpf"):
        c = costs.for_backend(name)
        note = "" if c.measured else f" ({c.note})"
        print(f"| {name}{note} | {c.emulated_ns:,.0f} | {c.single_step_ns:,.0f} "
              f"| {c.return_ns:,.0f} | {c.wakeup_ns:,.0f} "
              f"| {c.site_cost_ns('emulated', True, urgent=True):,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
