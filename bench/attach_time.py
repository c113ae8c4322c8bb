"""How long `prism watch` takes to attach, phase by phase, this tree beside an older one.

Targets: a live ``llama_cpp.server`` (the tiny GGUF of tests/llama_fixtures.py, one
client driving it) and a simulator rank (the ``cuda`` + ``nccl`` profiles). For each
tree, a fresh interpreter (cold caches, as a new ``prism watch`` has) runs the steps
``prism watch`` runs before its first iteration, timed one by one:

* ``target``: resolving the target (``--match`` for the llama server, ``--pid`` for the
  simulator);
* ``pick profile``: the profile picked unasked (every profile's anchor tried);
* ``companions``: the other profiles with a sentinel probe that resolves (cpython, blas,
  nccl...);
* ``calibrate``: the uprobe hit-cost calibration;
* ``placement``: the chosen profiles placed again, as the monitor's attach does;
* ``uprobes``: perf_event_open of every site (per thread or per CPU) and the ring mmaps;
* ``re-attach``: the placement of a target restarted or matched again (same libraries).

Symbol lookups are also summed per library (``probes.placement.resolve`` wrapped). Then,
end to end, ``prism watch --headless`` of each tree is started and timed to its first
snapshot line (iterations flowing). The older tree is a ``git worktree`` of ``--baseline``
(default ``main``) made for the run and removed after.

Run: ``.venv/bin/python bench/attach_time.py [--baseline REF] [--skip-e2e]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

PHASES = ("target", "pick profile", "companions", "calibrate", "placement", "uprobes",
          "re-attach")

SCENARIO = """
[scenario]
name = "attach"
seed = 1
duration_s = 900

[topology]
ranks = 1
layers = 8
hidden = 4096

[[phase]]
start_s = 0
arrival_rate = 20.0
max_batch = 8
prompt = { dist = "uniform", min = 16, max = 64 }
output = { dist = "uniform", min = 50, max = 150 }
"""


# ------------------------------------------------------------------ child: one tree, cold
def child(pid: int, match: str | None) -> dict[str, Any]:
    """Time the attach steps of ``prism watch`` in this (fresh) interpreter."""
    import probes.placement as placement
    from prism_tui.session import companion_profiles, pick_profile
    from probes.governor import calibrate
    from probes.target import resolve_target
    from probes.uprobes import UprobeSession

    per_lib: dict[str, float] = defaultdict(float)
    original = getattr(placement, "resolve")  # noqa: B009 - wrapped below, as imported there

    def timed_resolve(path: str, symbol: str, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(path, symbol, **kw)
        finally:
            per_lib[os.path.basename(kw.get("display_name") or path)] += \
                time.perf_counter() - t0

    setattr(placement, "resolve", timed_resolve)  # noqa: B010 - the name placement calls
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def timed(phase: str, fn: Callable[[], Any]) -> Any:
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times[phase] = time.perf_counter() - t0
        cpu[phase] = time.process_time() - c0
        return out

    targets = timed("target", lambda: resolve_target(None if match else pid, match,
                                                     allow_many=True))
    target = next(t for t in targets if t.pid == pid)
    profile = timed("pick profile", lambda: pick_profile(target, None))
    extras = timed("companions", lambda: companion_profiles(target, profile))
    timed("calibrate", calibrate)

    def place() -> list[Any]:
        return [s for p in (profile, *extras)
                for s in placement.place_profile(target, p, "sentinel").sites]

    sites = timed("placement", place)
    session = timed("uprobes", lambda: UprobeSession(
        [target], sites, urgent=set(profile.anchors)).open())
    events = sum(len(r.fds) for r in [*session._rings.values(), *session._watchers.values()])
    rings = len(session._rings) + len(session._watchers)
    session.close()
    timed("re-attach", place)
    return {"times": times, "cpu": cpu, "per_lib": dict(per_lib), "profile": profile.name,
            "extras": [p.name for p in extras], "sites": len(sites), "events": events,
            "rings": rings, "mode": session.mode}


def run_child(tree: Path, pid: int, match: str | None) -> dict[str, Any]:
    """``child`` in a new interpreter importing the monitor from ``tree``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(pid)]
    if match:
        cmd += ["--match", match]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True,
                         timeout=900, cwd=tree)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def first_snapshot_s(tree: Path, target_args: list[str], timeout_s: float = 600) -> float:
    """Seconds from starting ``prism watch --headless`` of ``tree`` to its first snapshot."""
    cmd = [sys.executable, "-m", "prism_tui.cli", "watch", *target_args, "--headless",
           "--no-history", "--duration", str(int(timeout_s))]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=tree, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith('{"snapshot"'):
                return time.perf_counter() - t0
        return float("nan")
    finally:
        proc.terminate()
        proc.wait(30)


# ------------------------------------------------------------------ parent
def keep_busy(url: str) -> None:
    """One client sending completions until the server is stopped (its iterations)."""
    from tests.llama_fixtures import drive

    with contextlib.suppress(OSError):  # URLError when the server stops under it
        drive(url, clients=1, duration_s=1800)


def baseline_tree(ref: str, where: Path) -> Path:
    """A detached worktree of ``ref`` (its C library copied from this tree)."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), ref],
                   check=True, capture_output=True)
    for so in (ROOT / "prism_sim").glob("*.so"):
        (where / "prism_sim" / so.name).write_bytes(so.read_bytes())
    return where


def table(name: str, trees: dict[str, dict[str, Any]]) -> None:
    """Print the phase table of one target, one column per tree."""
    labels = list(trees)
    print(f"\n### {name}\n")
    print("| phase | " + " | ".join(f"{k}: wall s | {k}: CPU s" for k in labels)
          + " | CPU ratio |")
    print("|---|" + "---:|" * (2 * len(labels) + 1))
    for phase in [*PHASES, "total"]:
        cells, cpus = [], []
        for r in trees.values():
            wall = sum(r["times"].values()) if phase == "total" else r["times"][phase]
            cpu = sum(r["cpu"].values()) if phase == "total" else r["cpu"][phase]
            cells += [f"{wall:.3f}", f"{cpu:.3f}"]
            cpus.append(cpu)
        ratio = f"{cpus[0] / cpus[-1]:.1f}x" if cpus[-1] > 0 else "-"
        print(f"| {phase} | " + " | ".join(cells) + f" | {ratio} |")
    libs = sorted({lib for r in trees.values() for lib in r["per_lib"]})
    for lib in libs:
        cells = [c for r in trees.values() for c in (f"{r['per_lib'].get(lib, 0.0):.3f}", "")]
        print(f"| lookups in {lib} (wall) | " + " | ".join(cells) + " | |")
    for k, r in trees.items():
        print(f"\n{k}: profile {r['profile']} + {r['extras']}, {r['sites']} sites, "
              f"{r['events']} perf events in {r['rings']} rings ({r['mode']} mode)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="main", help="git ref of the older tree")
    parser.add_argument("--skip-e2e", action="store_true", help="phases only")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--match", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.match)))
        return

    sys.path.insert(0, str(ROOT))
    from prism_sim.scenario import parse_scenario
    from prism_sim.server import SimServer
    from tests.llama_fixtures import running_server, write_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        base = baseline_tree(args.baseline, Path(tmp) / "baseline")
        trees = {f"{args.baseline}": base, "this tree": ROOT}
        e2e: dict[str, dict[str, float]] = defaultdict(dict)
        try:
            model = write_tiny_llama(Path(tmp) / "tiny.gguf")
            with running_server(model) as server:
                threading.Thread(target=keep_busy, args=(server.url,), daemon=True).start()
                match = "llama_cpp.server"
                llama = {k: run_child(t, server.pid, match) for k, t in trees.items()}
                if not args.skip_e2e:
                    for k, t in trees.items():
                        e2e["llama.cpp server"][k] = first_snapshot_s(
                            t, ["--match", match])
            scen = Path(tmp) / "attach.toml"
            scen.write_text(SCENARIO)
            with SimServer(parse_scenario(SCENARIO, str(scen)), metrics_port=None) as sim:
                halt = threading.Event()
                threading.Thread(target=sim.run, args=(900, halt), daemon=True).start()
                rank = next(iter(sim.rank_pids.values()))
                time.sleep(1.0)
                simres = {k: run_child(t, rank, None) for k, t in trees.items()}
                if not args.skip_e2e:
                    for k, t in trees.items():
                        e2e["simulator rank"][k] = first_snapshot_s(t, ["--pid", str(rank)])
                halt.set()
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(base)], check=False, capture_output=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    table("llama.cpp server (`--match 'llama_cpp.server'`)", llama)
    table("simulator rank (`--pid`)", simres)
    if e2e:
        print("\n### `prism watch --headless` start to first snapshot\n")
        print("| target | " + " | ".join(f"{k} (s)" for k in trees) + " | ratio |")
        print("|---|" + "---:|" * (len(trees) + 1))
        for name, row in e2e.items():
            vals = list(row.values())
            print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals)
                  + f" | {vals[0] / vals[-1]:.1f}x |")


if __name__ == "__main__":
    main()
