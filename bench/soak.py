"""Soak: ``prism watch`` on the simulator's ``soak`` scenario, its resources over time.

The simulator (two ranks, the built-in ``soak`` scenario: an hour of drifting load, a
30-s fault every 10 minutes) runs in this process; ``prism watch --match`` watches its
ranks headless, with a real Mosquitto broker (the outbox on) and the SQLite history. A
subscriber in this process timestamps every alert it receives. Every ``--every`` seconds
the bench samples the monitor process from outside:

- RSS (``/proc/PID/status`` VmRSS) and open fds (``/proc/PID/fd``);
- the history's size on disk (database + WAL) and the outbox's depth (rows not yet
  acknowledged, read-only);
- lost events: the monitor's own gauge per target, from its JSON-lines snapshots
  (records the kernel wrote that were not read yet: lost, or still in flight);
- alert latency: receipt by a subscriber in a process of its own (``prism eval``'s)
  minus the alert's ``iteration_end_ns`` (both CLOCK_MONOTONIC, system-wide).

The goal (issue 22): RSS growth <= 10 % after the first 10 minutes, no fd growth, no
event lost, outbox empty. Prints a table (markdown) and writes it, with a PNG plot when
matplotlib is installed, to ``--out``.

    .venv/bin/python bench/soak.py                      # the hour
    .venv/bin/python bench/soak.py --quick              # 11 min: through the first fault
    .venv/bin/python bench/soak.py --quick --duration 120 --every 10   # a smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from alerting.broker import EmbeddedBroker  # noqa: E402
from alerting.config import ALERT_SUBSCRIPTION, BrokerConfig, parse_broker_url  # noqa: E402
from prism_sim.scenario import load_scenario  # noqa: E402
from prism_sim.server import SimServer  # noqa: E402
from prism_tui.evaluation import AlertReceiver  # noqa: E402

HOUR_S = 3600.0
QUICK_S = 660.0
"""The quick run: 11 minutes, so that the first fault (600-630 s) is inside it."""
SETTLED_S = 600.0
"""RSS growth is measured from this point on (the first 10 minutes are warm-up)."""


@dataclass
class Sample:
    """One look at the monitor from outside."""

    t_s: float
    rss_mib: float
    fds: int
    history_mib: float
    outbox_depth: int
    lost: int
    alerts: int
    alert_p50_ms: float | None
    alert_max_ms: float | None


class AlertClock:
    """Receipt minus ``iteration_end_ns`` of every alert, in ms.

    Receipts are timestamped by ``prism eval``'s measuring subscriber, a process of its
    own (:class:`~prism_tui.evaluation.AlertReceiver`): a subscriber thread in this
    process waits for the GIL behind the simulator's threads (up to the 5 ms switch
    interval a time). The payloads' ``iteration_end_ns`` come from a second subscriber
    here, where a delay costs nothing.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.ends: dict[str, int] = {}
        self._lock = threading.Lock()
        self.receiver = AlertReceiver(BrokerConfig(url))
        self.client = paho.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"soak-{os.getpid()}")
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(ALERT_SUBSCRIPTION, qos=1)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> AlertClock:
        """Start both subscribers (the receiver first: it says when it is subscribed)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.receiver)
            _, host, port = parse_broker_url(self.url)
            self.client.connect(host, port)
            self.client.loop_start()
            stack.callback(self.client.disconnect)
            stack.callback(self.client.loop_stop)
            self._stack = stack.pop_all()
        return self

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        try:
            doc = json.loads(message.payload)
            alert_id, end_ns = str(doc["id"]), int(doc["iteration_end_ns"])
        except (ValueError, KeyError, TypeError):
            return
        with self._lock:
            self.ends[alert_id] = end_ns

    def snapshot(self) -> list[float]:
        """The latencies of the alerts both subscribers have seen so far."""
        received = dict(self.receiver.received)
        with self._lock:
            return [(received[i] - end) / 1e6 for i, end in self.ends.items()
                    if i in received]

    def __exit__(self, *exc: object) -> None:
        """Stop both subscribers (what they received stays readable)."""
        self._stack.close()


class TargetGauges:
    """Reads the monitor's JSON lines; keeps the latest lost-event count and probe
    backend per pid."""

    def __init__(self, stream: Any) -> None:
        self.lost: dict[int, int] = {}
        self.backends: dict[int, str] = {}
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            if not line.startswith('{"snapshot"'):
                continue
            try:
                targets = json.loads(line)["snapshot"].get("targets", [])
            except ValueError:
                continue
            for t in targets:
                self.lost[int(t["pid"])] = int(t["lost"])
                if t.get("backend"):
                    self.backends[int(t["pid"])] = t["backend"]

    @property
    def total_lost(self) -> int:
        """Lost events over every target seen."""
        return sum(self.lost.values())


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _size_mib(db: Path) -> float:
    total = 0
    for path in (db, db.with_name(db.name + "-wal")):
        if path.exists():
            total += path.stat().st_size
    return total / 2**20


def _outbox_depth(outbox: Path) -> int:
    if not outbox.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{outbox}?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])
    except sqlite3.Error:
        return -1


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(duration_s: float, every_s: float, work: Path) -> tuple[list[Sample], dict[str, Any]]:
    """Run the simulator, the broker and ``prism watch`` for ``duration_s``; sample."""
    scenario = load_scenario("soak").with_duration(duration_s + 30)
    db = work / "history.sqlite"
    outbox = work / "state" / "latencyprism" / "outbox.sqlite"
    samples: list[Sample] = []
    with EmbeddedBroker(prefer="mosquitto") as broker, \
            SimServer(scenario, labels=work / "labels.jsonl", metrics_port=None) as server, \
            AlertClock(broker.url) as clock:
        stop_sim = threading.Event()
        runner = threading.Thread(target=server.run, args=(duration_s + 30, stop_sim),
                                  daemon=True)
        runner.start()
        watch = subprocess.Popen(
            [sys.executable, "-m", "prism_tui.cli", "watch", "--match",
             rf"prism_sim\.engine .*--comm-id {server.comm_id}", "--headless",
             "--broker", broker.url, "--db", str(db), "--duration", str(duration_s)],
            stdout=subprocess.PIPE, stderr=open(work / "watch.err", "w"),  # noqa: SIM115
            text=True, cwd=ROOT,
            env={**os.environ, "XDG_STATE_HOME": str(work / "state"),
                 "PYTHONPATH": str(ROOT)})
        gauges = TargetGauges(watch.stdout)
        started = time.monotonic()
        try:
            while watch.poll() is None:
                time.sleep(every_s)
                if watch.poll() is not None or time.monotonic() - started > duration_s:
                    break  # ended, or detaching its probes (seconds to minutes): not a sample
                latencies = clock.snapshot()
                try:
                    samples.append(Sample(
                        t_s=round(time.monotonic() - started, 1), rss_mib=_rss_mib(watch.pid),
                        fds=len(os.listdir(f"/proc/{watch.pid}/fd")),
                        history_mib=round(_size_mib(db), 2),
                        outbox_depth=_outbox_depth(outbox), lost=gauges.total_lost,
                        alerts=len(latencies), alert_p50_ms=_percentile(latencies, 0.5),
                        alert_max_ms=max(latencies) if latencies else None))
                except FileNotFoundError:  # exited between poll and read
                    break
                print(json.dumps(asdict(samples[-1])), file=sys.stderr, flush=True)
            watch.wait(600)
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait()
            stop_sim.set()
            runner.join(30)
        latencies = clock.snapshot()
    meta = {"duration_s": duration_s, "every_s": every_s, "exit": watch.returncode,
            "backend": _backend_used(gauges.backends, work / "watch.err"),
            "alerts": len(latencies), "alert_p50_ms": _percentile(latencies, 0.5),
            "alert_p99_ms": _percentile(latencies, 0.99),
            "outbox_left": _outbox_depth(outbox),
            "lost_max": max((s.lost for s in samples), default=0),
            "machine": f"{platform.node()} {os.cpu_count()} CPUs, load "
                       f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end"}
    return samples, meta


def _backend_used(backends: dict[int, str], stderr: Path) -> str:
    """The probe backend(s) the monitor's snapshots named for the ranks, with the
    reason it gave on stderr when ``auto`` fell back to perf."""
    used = "/".join(sorted(set(backends.values()))) or "unknown"
    for line in stderr.read_text(errors="replace").splitlines():
        if "probe backend: perf, as " in line:
            return f"{used} ({line.split('probe backend: perf, as ', 1)[1].strip()})"
    return used


def verdict(samples: list[Sample], meta: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals, checked on the samples."""
    settled = [s for s in samples if s.t_s >= SETTLED_S]  # none in a smoke
    rss_growth = (settled[-1].rss_mib / settled[0].rss_mib - 1) if settled else None
    return {"rss_growth_after_settling": None if rss_growth is None else round(rss_growth, 4),
            "settled_from_s": settled[0].t_s if settled else None,
            "fd_growth": (settled[-1].fds - settled[0].fds) if settled else None,
            "lost_max": meta["lost_max"], "outbox_left": meta["outbox_left"]}


def table(samples: list[Sample]) -> str:
    """The samples as a markdown table."""
    head = ("| t (s) | RSS (MiB) | fds | history (MiB) | outbox | lost | alerts "
            "| alert p50 (ms) | alert max (ms) |\n|---|---|---|---|---|---|---|---|---|")
    rows = [f"| {s.t_s:.0f} | {s.rss_mib:.1f} | {s.fds} | {s.history_mib:.2f} | "
            f"{s.outbox_depth} | {s.lost} | {s.alerts} | "
            f"{'' if s.alert_p50_ms is None else f'{s.alert_p50_ms:.1f}'} | "
            f"{'' if s.alert_max_ms is None else f'{s.alert_max_ms:.1f}'} |"
            for s in samples]
    return "\n".join([head, *rows])


def plot(samples: list[Sample], path: Path) -> bool:
    """RSS, fds, history size and outbox depth over time as a PNG (False: no matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    t = [s.t_s / 60 for s in samples]
    fig, axes = plt.subplots(6, 1, figsize=(8, 12), sharex=True)
    for ax, values, label in (
            (axes[0], [s.rss_mib for s in samples], "RSS (MiB)"),
            (axes[1], [s.fds for s in samples], "open fds"),
            (axes[2], [s.history_mib for s in samples], "history (MiB)"),
            (axes[3], [s.outbox_depth for s in samples], "outbox depth"),
            (axes[4], [s.lost for s in samples], "events lost")):
        ax.plot(t, values)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    for latencies, label in (([s.alert_p50_ms for s in samples], "p50 so far"),
                             ([s.alert_max_ms for s in samples], "max so far")):
        axes[5].plot(t, [float("nan") if v is None else v for v in latencies], label=label)
    axes[5].set_ylabel("alert latency (ms)")
    axes[5].legend(loc="upper left")
    axes[5].grid(True, alpha=0.3)
    axes[-1].set_xlabel("minutes")
    fig.suptitle("prism watch on the soak scenario")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main() -> int:
    """Parse the options, run, print and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_S / 60:.0f} min, not 1 h")
    ap.add_argument("--duration", type=float, default=None, metavar="S",
                    help="override the run's length (a smoke)")
    ap.add_argument("--every", type=float, default=30.0, metavar="S", help="sample period")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "soak",
                    help="folder for soak.md and soak.png")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args()
    duration = args.duration or (QUICK_S if args.quick else HOUR_S)
    with tempfile.TemporaryDirectory(prefix="prism-soak-") as tmp:
        samples, meta = run(duration, args.every, Path(tmp))
    result = {"meta": meta, "verdict": verdict(samples, meta),
              "samples": [asdict(s) for s in samples]}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    command = "bench/soak.py " + " ".join(sys.argv[1:])
    png = args.out / "soak.png"
    plotted = plot(samples, png)
    smoke = ("A smoke of the bench, not a soak: too short for the goals (they need the "
             "hour), run on the shared, loaded development machine.\n\n"
             if duration < QUICK_S else "")
    text = (f"# Soak: `{command}`\n\n{smoke}{meta['machine']}; probe backend "
            f"{meta['backend']}\n\n"
            f"Verdict: `{json.dumps(result['verdict'])}`; alerts received {meta['alerts']}, "
            f"latency p50 {meta['alert_p50_ms']} ms, p99 {meta['alert_p99_ms']} ms.\n\n"
            f"{table(samples)}\n\n"
            + (f"![soak]({png.name})\n" if plotted else "(no plot: matplotlib is not "
               "installed)\n"))
    (args.out / "soak.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
