"""``prism eval`` on a live llama.cpp server: every host fault kind at two intensities.

Starts a real ``llama_cpp.server`` on a tiny random-weight model (tests/llama_fixtures.py),
or with ``--server cpp`` llama.cpp's ``llama-server`` (three slots, batching the
clients' requests), keeps it busy with concurrent clients, and runs ``prism eval --pid
SERVER --faults FILE --json`` with a timeline of eight faults: ``cpu_squeeze``, ``cpu_throttle``,
``memory_pressure`` and ``pause``, each at a mild and a strong intensity, ``--on-s``
seconds each with ``--gap-s`` seconds of normal load between them (the default, 30 s
and 40 s, is about 10 minutes after the baseline). Prints one table: per fault, its
measured effect, the share of the iterations under it that fired (recall), whether an
alert episode opened for it, then the run's per-iteration and episode figures.

    .venv/bin/python bench/eval_llama.py [--on-s 30] [--gap-s 40] [--clients 3] [--json]
    .venv/bin/python bench/eval_llama.py --server cpp ...

Results and the command: docs/llama_cpp.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.llama_fixtures import (  # noqa: E402
    drive,
    running_cpp_server,
    running_server,
    server_missing,
    write_tiny_llama,
)

FAULTS = (("cpu_squeeze", 0.5), ("cpu_squeeze", 1.0), ("cpu_throttle", 0.5),
          ("cpu_throttle", 0.9), ("memory_pressure", 0.5), ("memory_pressure", 1.0),
          ("pause", 0.3), ("pause", 0.7))
"""(kind, intensity): a mild and a strong setting of each host fault."""


def timeline(on_s: float, gap_s: float) -> str:
    """The ``[[fault]]`` tables: the first after one gap, then one every on + gap."""
    return "".join(f"[[fault]]\ntype = \"{kind}\"\nstart_s = {gap_s + i * (on_s + gap_s):g}\n"
                   f"duration_s = {on_s:g}\nintensity = {x:g}\n\n"
                   for i, (kind, x) in enumerate(FAULTS))


def table(doc: dict[str, Any]) -> str:
    """The per-fault rows and the run's figures, as Markdown."""
    lines = ["| fault | intensity | bit | target run-queue delay (ms/s) | judged | recall "
             "| detected |", "|---|---:|---|---:|---:|---:|---|"]
    for f in doc["faults"]:
        target = (f.get("effect") or {}).get("target") or {}
        lines.append(f"| {f['type']} | {f['intensity']:g} | {f['bit']} | "
                     f"{target.get('run_delay_ms_per_s', '-')} | {f['judged']} | "
                     f"{f['recall']} | {f['detected']} |")
    ep = doc["episodes"]
    lines += ["", f"per iteration: precision {doc['precision']}, recall {doc['recall']}, "
              f"F1 {doc['f1']}, FPR {doc['fpr']} ({doc['iterations']} judged, "
              f"{doc['abnormal']} abnormal)",
              f"episodes: {ep['episodes_detected']} of {ep['fault_episodes']} faults paged, "
              f"{ep['false_episodes']} false, firings per fault "
              f"{ep['firings_per_fault_episode']}, delay {ep['detection_delay_ms']} ms; "
              f"root cause per kind: " + ", ".join(
                  f"{k} → {v['top_suspect']}" for k, v in ep["by_fault_kind"].items()),
              f"alerts: {doc['alerts']} ({doc['alerts_received']} received), latency "
              f"{doc['alert_latency_ms']} ms; baseline ready after "
              f"{doc['baseline_ready_s']} s, run {doc['duration_s']} s"]
    return "\n".join(lines)


def main() -> int:
    """Run the server, the load and the eval; print the table (or the eval's JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--on-s", type=float, default=30.0)
    ap.add_argument("--gap-s", type=float, default=40.0)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--server", choices=("python", "cpp"), default="python",
                    help="llama_cpp.server (python) or llama.cpp's llama-server (cpp)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--record", metavar="PREFIX", help="keep the spans (PREFIX.spans.gz) and "
                    "the fault windows (PREFIX.faults.json) for an offline replay: "
                    "bench/detector_sim.py --spans ... --faults ...")
    ap.add_argument("--eval-args", default="", help="more arguments for prism eval "
                    "(e.g. '--rule paper')")
    args = ap.parse_args()
    missing = server_missing(args.server)
    if missing is not None:
        print(f"eval_llama: {missing}", file=sys.stderr)
        return 2
    record = ([] if args.record is None else
              ["--record", f"{args.record}.spans.gz", "--labels", f"{args.record}.faults.json"])
    total_s = 600.0 + len(FAULTS) * (args.on_s + args.gap_s)
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_llama(Path(tmp) / "tiny-llama.gguf")
        faults = Path(tmp) / "faults.toml"
        faults.write_text(timeline(args.on_s, args.gap_s))
        serving = running_cpp_server(model) if args.server == "cpp" else running_server(model)
        with serving as server:
            def keep_busy() -> None:  # until the server stops under it
                with contextlib.suppress(Exception):
                    drive(server.url, clients=args.clients, duration_s=total_s,
                          max_tokens=args.max_tokens)

            load = threading.Thread(target=keep_busy, daemon=True)
            load.start()
            result = subprocess.run(
                [sys.executable, "-m", "prism_tui.cli", "eval", "--pid", str(server.pid),
                 "--faults", str(faults), "--profile", "llama_cpp", "--json", *record,
                 *args.eval_args.split()],
                capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        print(f"eval_llama: prism eval failed: {result.stderr.strip()}", file=sys.stderr)
        return 1
    doc = json.loads(result.stdout)
    print(json.dumps(doc, indent=2) if args.json else table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
