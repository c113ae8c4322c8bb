"""Cost of one uprobe hit on a real target, as ns per call and as a ratio.

The C target (tests/targets/ctarget.c) times ``N`` calls of a function in-process
(``time FN N``). Each configuration is timed without a probe and then with one, side by
side in the same round, for several rounds; the table shows medians. Configurations:

* ``pl_work+0``: on the ``endbr64`` at the function's first byte (single-stepped);
* ``pl_work+4``: on the ``push %rbp`` after it (``ResolvedSymbol.probe_offset``, emulated);
* ``pl_plain+0``: on a function starting with ``push %rbp`` (emulated, no endbr64);

each as an entry probe alone and with a uretprobe (entry + return), and each with
``wakeup_events=1`` (every hit wakes the reader) or 0 (wake-ups by watermark only). A
reader polls and drains the ring throughout, as the monitor does. The governor's
start-up self-calibration (:func:`probes.governor.calibrate`) runs in the same process
and its estimate is printed next to each measured cost.

Run: ``.venv/bin/python bench/probe_cost.py [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from probes.governor import HitCosts, calibrate  # noqa: E402
from probes.perf import EventSpec, PerfRing, open_uprobe  # noqa: E402
from probes.symbols import resolve  # noqa: E402

CTARGET_SRC = ROOT / "tests" / "targets" / "ctarget.c"
CFLAGS = ["-O0", "-g", "-fcf-protection=full", "-pthread"]


def build_ctarget(directory: str) -> str:
    """Compile the C target into ``directory``; returns the executable's path."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        sys.exit("no C compiler (cc/gcc) on PATH")
    exe = os.path.join(directory, "ctarget")
    subprocess.run([cc, *CFLAGS, str(CTARGET_SRC), "-o", exe], check=True)
    return exe


class CTarget:
    """The C target driven over its stdin/stdout; commands may run while we drain rings."""

    def __init__(self, exe: str) -> None:
        """Start ``exe`` and wait for its ``ready PID`` line."""
        self.proc = subprocess.Popen([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        self._out = self.proc.stdout.fileno()
        self._buf = b""
        ready = self._line(10.0).split()
        assert ready[0] == "ready", ready
        self.pid = int(ready[1])

    def _line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._out], [], [], left)[0]:
                raise TimeoutError("the C target did not answer")
            chunk = os.read(self._out, 4096)
            if not chunk:
                raise EOFError("the C target exited")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def send(self, line: str) -> None:
        """Send one command without waiting for its answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def answered(self) -> bool:
        """True when an answer line is waiting to be read."""
        return b"\n" in self._buf or bool(select.select([self._out], [], [], 0)[0])

    def answer(self, timeout: float = 60.0) -> int:
        """Read the answer to the last command."""
        words = self._line(timeout).split()
        assert words and words[0] == "ok", words
        return int(words[1])

    def cmd(self, line: str) -> int:
        """Send one command and return its value."""
        self.send(line)
        return self.answer()

    def close(self) -> None:
        """Stop the target."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@dataclass(frozen=True)
class Config:
    """One probed configuration."""

    label: str
    fn: str  # the target's ``time`` FN
    offset: int
    site: str  # emulated | single-step (the governor's cost classes)
    probes: str  # entry | entry+return | return
    wakeup: int
    calls: int
    reader: bool = True  # a reader polls and drains the ring while the target runs
    wake_on_return_only: bool = False  # an urgent entry+return site (UprobeSession)

    def estimate(self, costs: HitCosts) -> float:
        """The governor's estimate of what this configuration adds per call."""
        if self.probes == "return":
            return costs.return_ns
        return costs.site_cost_ns(self.site, self.probes == "entry+return")


@dataclass
class Result:
    """Per-round measurements of one configuration."""

    base: list[float]
    probed: list[int]
    samples: int = 0
    expected: int = 0
    lost: int = 0


def timed_with_probe(target: CTarget, exe: str, cfg: Config) -> tuple[int, int, int]:
    """Time ``cfg.calls`` calls with the probe(s) attached; returns (ns/call, samples, lost).

    With ``cfg.reader`` the reader polls the ring (20 ms timeout, the session's drain
    interval) and drains it while the target runs, so the ring never fills and wake-ups
    find a waiting reader; otherwise the ring is drained once the target answered.
    """
    with PerfRing(256) as ring:
        specs = []
        if cfg.probes != "return":
            specs.append(EventSpec(exe, cfg.offset))
        if cfg.probes != "entry":
            specs.append(EventSpec(exe, cfg.offset, is_return=True))
        for spec in specs:
            wakeup = 0 if cfg.wake_on_return_only and not spec.is_return else cfg.wakeup
            ring.add(open_uprobe(spec, target.pid, -1, wakeup_events=wakeup), spec)
        poller = select.poll()
        poller.register(ring.owner_fd, select.POLLIN)
        samples = 0
        target.send(f"time {cfg.fn} {cfg.calls}")
        while cfg.reader and not target.answered():
            poller.poll(20)
            samples += len(ring.read())
        value = target.answer()
        samples += len(ring.read())
        return value, samples, ring.stats.lost


def configs(work_entry: int, work_probe: int, plain_entry: int, calls: int) -> list[Config]:
    """Every configuration measured (single-stepped sites get fewer calls: 10x dearer)."""
    out: list[Config] = []
    sites = [("pl_work+0 (endbr64)", "work", work_entry, "single-step", max(calls // 5, 200)),
             ("pl_work+4 (push)", "work", work_probe, "emulated", calls),
             ("pl_plain+0 (push)", "plain", plain_entry, "emulated", calls)]
    for label, fn, offset, site, n in sites:
        for probes in ("entry", "entry+return"):
            for wakeup in (0, 1):
                out.append(Config(label, fn, offset, site, probes, wakeup, n))
    label, fn, offset, site, n = sites[1]
    # what calibrate() calls "return": a uretprobe alone (it still traps at the entry)
    out.append(Config(label, fn, offset, site, "return", 0, n))
    # a wake-up when no reader sleeps on the ring
    out.append(Config(label, fn, offset, site, "entry", 1, n, reader=False))
    # an urgent entry+return site as UprobeSession opens it: only the return wakes
    out.append(Config(label, fn, offset, site, "entry+return", 1, n,
                      wake_on_return_only=True))
    return out


def baseline_ns(target: CTarget, fn: str, calls: int = 10_000_000) -> float:
    """ns per call without a probe, to a fraction of a ns.

    The target answers whole ns (1 here), too coarse for a ratio, so this is the wall
    time of ``time FN calls`` minus that of an empty ``time FN 0``, divided by ``calls``.
    """
    t0 = time.perf_counter_ns()
    target.cmd(f"time {fn} 0")
    t1 = time.perf_counter_ns()
    target.cmd(f"time {fn} {calls}")
    t2 = time.perf_counter_ns()
    return max(0.0, ((t2 - t1) - (t1 - t0)) / calls)


def run(rounds: int, calls: int) -> tuple[list[tuple[Config, Result]], HitCosts, float]:
    """Measure every configuration; returns results, calibration and its duration."""
    t0 = time.perf_counter()
    costs = calibrate()
    cal_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="prism-bench-") as tmp:
        exe = build_ctarget(tmp)
        work = resolve(exe, "pl_work")[0]
        plain = resolve(exe, "pl_plain")[0]
        assert work.probe_offset == work.file_offset + 4, work
        assert plain.probe_offset == plain.file_offset, plain
        cfgs = configs(work.file_offset, work.probe_offset, plain.file_offset, calls)
        results = [Result([], []) for _ in cfgs]
        target = CTarget(exe)
        try:
            target.cmd("time work 1000000")  # warm up
            for _ in range(rounds):
                for cfg, res in zip(cfgs, results, strict=True):
                    res.base.append(baseline_ns(target, cfg.fn))
                    value, samples, lost = timed_with_probe(target, exe, cfg)
                    res.probed.append(value)
                    res.samples += samples
                    res.expected += cfg.calls * (2 if cfg.probes == "entry+return" else 1)
                    res.lost += lost
        finally:
            target.close()
    return list(zip(cfgs, results, strict=True)), costs, cal_s


def report(results: list[tuple[Config, Result]], costs: HitCosts, cal_s: float,
           rounds: int) -> str:
    """The Markdown tables."""
    lines = [
        f"Probe cost per call, median of {rounds} rounds "
        f"({platform.node()}, {os.cpu_count()} CPUs, kernel {platform.release()}, "
        f"{time.strftime('%Y-%m-%d')})",
        "",
        "| probe site | probes | wakeup_events | reader | calls/round | without (ns/call) "
        "| with (ns/call) | added (ns/call) | ratio with/without | governor estimate (ns) "
        "| samples / expected | lost |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cfg, res in results:
        base = statistics.median(res.base)
        probed = statistics.median(res.probed)
        ratio = probed / base if base else float("inf")
        lines.append(
            f"| {cfg.label}, {cfg.site} | {cfg.probes} "
            f"| {cfg.wakeup}{' (return only)' if cfg.wake_on_return_only else ''} "
            f"| {'polling' if cfg.reader else 'idle'} | {cfg.calls} | {base:.2f} "
            f"| {probed:,.0f} | {probed - base:,.0f} | {ratio:,.0f}x "
            f"| {cfg.estimate(costs):,.0f} | {res.samples}/{res.expected} | {res.lost} |")
    ok = all(r.samples == r.expected and r.lost == 0 for _, r in results)
    lines += [
        "",
        f"All samples received, none lost: {'yes' if ok else 'NO'}. `with` is the target's "
        "own timing of its loop; `without` is wall time of 10M unprobed calls (the target "
        "answers whole ns, too coarse here). Governor estimate: "
        "`HitCosts.site_cost_ns(site, ret)` from the calibration below.",
        "",
        f"Governor self-calibration (`probes.governor.calibrate()`, {cal_s * 1000:.0f} ms, "
        "same process):",
        "",
        "| figure | calibration (ns) |",
        "|---|---:|",
        f"| emulated entry hit | {costs.emulated_ns:,.0f} |",
        f"| single-stepped entry hit | {costs.single_step_ns:,.0f} |",
        f"| return (uretprobe alone) | {costs.return_ns:,.0f} |",
        f"| measured | {costs.measured} {costs.note} |",
    ]
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, measure, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, fewer calls")
    parser.add_argument("--rounds", type=int, help="rounds (default 7, quick 2)")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 7)
    calls = 2_000 if args.quick else 10_000
    results, costs, cal_s = run(rounds, calls)
    print(report(results, costs, cal_s, rounds))


if __name__ == "__main__":
    main()
