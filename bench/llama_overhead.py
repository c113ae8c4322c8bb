"""What `prism watch` costs a real llama.cpp server: tokens/s without and with it.

A ``llama_cpp.server`` (llama-cpp-python, the tiny random-weight model of
tests/llama_fixtures.py, two compute threads), or with ``--server cpp`` llama.cpp's
``llama-server`` (three slots: the clients' requests batched into one step), is driven
by closed-loop HTTP clients in interleaved rounds of three configurations, the order
rotated every round:

``bare``     no monitor;
``watch``    ``prism watch --pid P --profile llama_cpp --headless --no-history``
             (the profile's sentinel probes: ``llama_decode``, the ggml graph compute,
             sampling; plus any companion profile that resolves);
``mul_mat``  the same with a user profile adding ``ggml_compute_forward_mul_mat``, a
             per-operation probe that every compute thread hits tens of thousands of
             times a second (the hot probe the overhead governor is for).

With ``--wake-gaps 0,2`` the monitored configurations are instead ``watch`` with each
``probe.wake_gap_ms`` listed (``gap=0``, ``gap=2``): the bpf backend's least time
between two wake-ups of the monitor by the anchor's records.

Each configuration first drives the server for ``--settle-s`` seconds (the monitor
attaches its threads' probes then; those tokens/s are printed apart), then measures for
``--round-s``. Per round and configuration it prints the completion tokens/s the HTTP
responses report, the ratio to the same round's ``bare``, the server's and the monitor's CPU
(``/proc/PID/stat``) over the driven window, and the monitor's CPU per iteration (one
``llama_decode`` call: the server's own step count, from the responses; llama-server's
steps are its ``llamacpp:n_decode_total`` metric). The summary is the median ratio and
its spread (min-max) over the rounds.

    python bench/llama_overhead.py --rounds 3 --round-s 15 --settle-s 10
    python bench/llama_overhead.py --pin ...   # server alone on a CPU, monitor on another
    python bench/llama_overhead.py --server cpp ...   # llama-server

``--pin`` measures what the monitor costs when it does not share the server's CPU: the
server, with one compute thread, alone on the first CPU; the monitor (its threads and
children) and the clients on the others.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from math import ceil
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.llama_fixtures import (  # noqa: E402
    N_BATCH,
    Completion,
    LineReader,
    drive,
    running_cpp_server,
    running_server,
    server_missing,
    stop_process,
    write_tiny_llama,
)

CONFIGS = ("bare", "watch", "mul_mat")
MATMUL_PROFILE = """\
[profile]
name = "llama_ops"
description = "one ggml CPU operation, run by every compute thread"

[[library]]
id = "ggml"
soname = ["libggml-cpu*.so*", "libggml*.so*"]

[[probe]]
id = "mul_mat"
library = "ggml"
symbol = "ggml_compute_forward_mul_mat"
stage = "mul_mat"
ret = true
"""
CLK_TCK = os.sysconf("SC_CLK_TCK")
PINNED_SERVER_ARGS = ("--n_threads", "1", "--n_threads_batch", "1")
"""With ``--pin`` the server has one CPU: two compute threads would spin against each other."""
PINNED_CPP_SERVER_ARGS = ("--threads", "1", "--threads-batch", "1")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def pin_process(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` to ``cpus`` (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):  # exited meanwhile
            os.sched_setaffinity(int(tid), cpus)


def start_watch(server_pid: int, profile_dir: Path | None, duration_s: float,
                cpus: set[int] | None = None, config: Path | None = None
                ) -> tuple[subprocess.Popen[str], LineReader]:
    """`prism watch` on the server, returned once its first snapshot says it is attached;
    on ``cpus`` (it, its threads and its children) when given; with settings ``config``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PRISM_PROFILE_PATH", None)
    if profile_dir is not None:
        env["PRISM_PROFILE_PATH"] = str(profile_dir)
    proc = subprocess.Popen(
        [sys.executable, "-m", "prism_tui.cli", "watch", "--pid", str(server_pid),
         "--profile", "llama_cpp", "--headless", "--no-history", "--duration",
         str(duration_s), *(() if config is None else ("--config", str(config)))],
        cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, start_new_session=True,
        preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus))
    assert proc.stdout is not None
    out = LineReader(proc.stdout)  # drained all along: a full pipe would stall the monitor
    if out.wait_for('{"snapshot"', timeout_s=600) is None:
        stop_process(proc)  # type: ignore[arg-type]
        raise RuntimeError(f"prism watch did not start: {''.join(out.lines)[-500:]!r}")
    return proc, out


def cpp_decode_calls(url: str) -> int:
    """llama-server's own count of its steps so far (``llamacpp:n_decode_total``)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("llamacpp:n_decode_total"):
                return int(float(line.split()[-1]))
    raise RuntimeError("llama-server's /metrics has no llamacpp:n_decode_total")


def tokens_per_s(done: list[Completion]) -> float:
    """Completion tokens per second over the span of these requests."""
    wall_s = (max(c.done_ns for c in done) - min(c.sent_ns for c in done)) / 1e9
    return sum(c.completion_tokens for c in done) / wall_s


def one_round(url: str, server_pid: int, config: str, profile_dir: Path, round_s: float,
              settle_s: float, clients: int, max_tokens: int, first_index: int,
              monitor_cpus: set[int] | None = None, cpp: bool = False) -> dict[str, Any]:
    """Drive the server for ``settle_s`` then ``round_s`` under ``config``; tokens/s of
    both windows, CPU figures of the second (the monitor's attach transient is left out
    of it: it is reported on its own as ``settle_tokens_per_s``)."""
    watch = None
    if config != "bare":
        gap = config.removeprefix("gap=") if config.startswith("gap=") else None
        settings = None
        if gap is not None:
            settings = profile_dir.parent / f"wake_gap_{gap}.toml"
            settings.write_text(f"[probe]\nwake_gap_ms = {float(gap)}\n")
        watch, _ = start_watch(server_pid, profile_dir if config == "mul_mat" else None,
                            settle_s + round_s + 60, monitor_cpus, settings)
    try:
        settle = drive(url, clients=clients, duration_s=settle_s, max_tokens=max_tokens,
                       first_index=first_index + 5000)
        server0 = cpu_s(server_pid)
        mon0 = cpu_s(watch.pid) if watch else 0.0
        decode0 = cpp_decode_calls(url) if cpp else 0
        done = drive(url, clients=clients, duration_s=round_s, max_tokens=max_tokens,
                     first_index=first_index)
        server1 = cpu_s(server_pid)
        mon1 = cpu_s(watch.pid) if watch else 0.0
        decode1 = cpp_decode_calls(url) if cpp else 0
    finally:
        if watch is not None:  # detached and gone before the next configuration runs
            stop_process(watch, grace_s=120)  # type: ignore[arg-type]
    wall_s = (max(c.done_ns for c in done) - min(c.sent_ns for c in done)) / 1e9
    tokens = sum(c.completion_tokens for c in done)
    steps = decode1 - decode0 if cpp else sum(
        c.completion_tokens - 1 + ceil((c.prompt_tokens - 1) / N_BATCH) for c in done)
    return {"config": config, "requests": len(done), "tokens": tokens, "wall_s": wall_s,
            "settle_tokens_per_s": tokens_per_s(settle), "tokens_per_s": tokens / wall_s,
            "steps_per_s": steps / wall_s,
            "server_cpu": (server1 - server0) / wall_s,
            "monitor_cpu": (mon1 - mon0) / wall_s if watch else None,
            "monitor_us_per_step": (mon1 - mon0) / steps * 1e6 if watch else None}


def main() -> int:
    """Run the interleaved rounds and print the table (or JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--round-s", type=float, default=20.0, help="measured seconds per config")
    ap.add_argument("--settle-s", type=float, default=10.0,
                    help="driven seconds before each measurement (the monitor's attach)")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--pin", action="store_true",
                    help="the server (one compute thread) alone on CPU 0; the monitor and "
                         "the clients on the other CPUs")
    ap.add_argument("--server", choices=("python", "cpp"), default="python",
                    help="llama_cpp.server (python) or llama.cpp's llama-server (cpp)")
    ap.add_argument("--wake-gaps", metavar="MS,MS", help="compare these probe.wake_gap_ms "
                    "values instead of watch / mul_mat (e.g. 0,2)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    configs = CONFIGS if args.wake_gaps is None else ("bare", *(
        f"gap={float(g):g}" for g in args.wake_gaps.split(",")))
    cpp = args.server == "cpp"
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and len(cpus) < 2:
        print("llama_overhead: --pin needs two CPUs", file=sys.stderr)
        return 2
    server_cpus = {cpus[0]} if args.pin else None
    monitor_cpus = set(cpus[1:]) if args.pin else None
    if monitor_cpus is not None:
        os.sched_setaffinity(0, monitor_cpus)  # the clients
    # SIGTERM unwinds like Ctrl-C: the server and any monitor are stopped on the way out
    # (once: a second SIGTERM, from `timeout` passing it on, must not cut the cleanup short)
    def on_term(_sig: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_term)
    missing = server_missing(args.server)
    if missing is not None:
        print(f"llama_overhead: {missing}", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_llama(Path(tmp) / "tiny-llama.gguf")
        profile_dir = Path(tmp) / "profiles"
        profile_dir.mkdir()
        (profile_dir / "llama_ops.toml").write_text(MATMUL_PROFILE)
        serving = (running_cpp_server(model, extra_args=(
            *(PINNED_CPP_SERVER_ARGS if args.pin else ()), "--metrics")) if cpp else
            running_server(model, extra_args=PINNED_SERVER_ARGS if args.pin else ()))
        with serving as server:
            if server_cpus is not None:
                pin_process(server.pid, server_cpus)
            drive(server.url, clients=args.clients, duration_s=3, max_tokens=args.max_tokens)
            for r in range(args.rounds):
                k = r % len(configs)
                order = configs[k:] + configs[:k]
                for config in order:
                    row = one_round(server.url, server.pid, config, profile_dir,
                                    args.round_s, args.settle_s, args.clients, args.max_tokens,
                                    first_index=len(rows) * 10_000,
                                    monitor_cpus=monitor_cpus, cpp=cpp)
                    row["round"] = r
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    for row in rows:
        bare = next(x for x in rows if x["round"] == row["round"] and x["config"] == "bare")
        row["ratio"] = row["tokens_per_s"] / bare["tokens_per_s"]
    summary = {}
    for config in configs[1:]:
        mine = [x for x in rows if x["config"] == config]
        ratios = [x["ratio"] for x in mine]
        summary[config] = {
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "monitor_cpu_median": statistics.median(x["monitor_cpu"] for x in mine),
            "monitor_us_per_step_median": statistics.median(
                x["monitor_us_per_step"] for x in mine)}
    doc = {"host": f"{platform.node()} {os.cpu_count()} CPUs", "server": args.server,
           "rounds": args.rounds,
           "round_s": args.round_s, "settle_s": args.settle_s, "clients": args.clients,
           "max_tokens": args.max_tokens, "pinned": args.pin,
           "rows": rows, "summary": summary}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"{'llama-server' if cpp else 'llama_cpp.server'}, tiny model, {args.clients} "
          f"clients, {args.rounds} rounds of "
          f"{args.settle_s:g} s settling + {args.round_s:g} s measured per configuration, "
          f"{os.cpu_count()} CPUs"
          + (f"; server (1 compute thread) pinned to CPU {cpus[0]}, monitor and clients to "
             f"{','.join(map(str, cpus[1:]))}" if args.pin else ", nothing pinned"))
    print("| round | config | tokens/s in the settle window | tokens/s | ratio to bare | "
          "steps/s | server CPU | monitor CPU | monitor µs/step |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for x in rows:
        mon = "" if x["monitor_cpu"] is None else f"{100 * x['monitor_cpu']:.0f} %"
        per = "" if x["monitor_us_per_step"] is None else f"{x['monitor_us_per_step']:.0f}"
        print(f"| {x['round']} | {x['config']} | {x['settle_tokens_per_s']:.0f} | "
              f"{x['tokens_per_s']:.0f} | "
              f"{x['ratio']:.3f} | {x['steps_per_s']:.0f} | {100 * x['server_cpu']:.0f} % | "
              f"{mon} | {per} |")
    print()
    print("| config | tokens/s ratio, median (min-max) | monitor CPU, median | "
          "monitor µs per step, median |")
    print("|---|---:|---:|---:|")
    for config, s in summary.items():
        print(f"| {config} | {s['ratio_median']:.3f} ({s['ratio_min']:.3f}-"
              f"{s['ratio_max']:.3f}) | {100 * s['monitor_cpu_median']:.0f} % | "
              f"{s['monitor_us_per_step_median']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
