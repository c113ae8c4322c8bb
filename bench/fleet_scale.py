"""Scale of ``prism fleet``: N simulated hosts through bridged brokers into one fleet.

Each host publishes, once a second, one real digest message (schema 2 as the monitor
sends, or schema 1 with ``--wire 1``; 16 series of ``--values`` lognormal latencies
each, t-digests built by fastdigest as the monitor does)
to one of ``--edges`` edge Mosquittos, each bridged to one core Mosquitto by the config
``alerting.bridge`` generates; ``prism fleet --headless`` follows the core, pinned to one
CPU (``taskset -c 0``). Host processes (``--procs``) run on the other CPUs.

Printed: the fleet process's CPU per wall second (merge, decode and MQTT together), the
broker message rate the fleet took, the lag from a window's close to its ingest into the
fleet's state (p50/p99/max as the fleet reports), how long after a window's close the
publishers had handed that second's last message to their MQTT client (the part of the
lag spent before any broker), the snapshot (fold and quantiles) time, and the
fleet p99 of series 0 against the p99 of every host's raw values of it, the fleet's
peak memory, and the load average. ``--profile PATH`` runs the fleet under cProfile
(where its time goes: MQTT receive, decode, fold, snapshot, output).

    python bench/fleet_scale.py --hosts 50 --seconds 30
    python bench/fleet_scale.py --merge-only --hosts 1000 --seconds 40 --wire 1
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from alerting.bridge import EdgeBroker, bridge_section  # noqa: E402
from alerting.broker import EmbeddedBroker  # noqa: E402
from alerting.digests import V2_MAGIC, V2_PREFIX, V2_SERIES, encode, series_centroids  # noqa: E402

SERIES = 16
POOL = 32
"""Distinct digests per (speed, series) a publisher picks from."""
TOPIC_ROOT = "latencyprism/v1"


def _message(host: str, second: int, start: float, values: int,
             picks: list[tuple[np.ndarray, str, dict[str, np.ndarray]]], wire: int) -> bytes:
    """One host's digest message for one second, in wire schema ``wire``."""
    series = []
    for s, (vals, text, centroids) in enumerate(picks):
        entry: dict[str, Any] = {
            "stage": f"stage{s:02d}", "phase": "decode", "device": "cuda:0",
            "start_ns": second * 10**9, "end_ns": (second + 1) * 10**9,
            "start": start, "count": values, "sum_ms": float(vals.sum()),
            "min_ms": float(vals.min()), "max_ms": float(vals.max())}
        series.append({**entry, "digest": text} if wire == 1 else {**entry, **centroids})
    doc = {"schema": wire, "host": host,
           "target": {"pid": 4242, "name": "vllm", "profile": "cuda"},
           "published_at": time.time(), "series": series}
    if wire == 1:
        doc["encoding"] = "fastdigest-bytes-base64"
    return encode(doc)


class _FastV2:
    """Schema-2 messages assembled from pre-encoded parts of a pool's digests (the
    layout of :func:`alerting.digests.encode`, checked by the fleet's decoder: its
    ``rejected`` count must stay 0), so that two publisher processes keep up with a
    thousand hosts on a loaded machine."""

    def __init__(self, pool: list[list[tuple[np.ndarray, str, dict[str, np.ndarray]]]],
                 values: int) -> None:
        self.rows = np.zeros((SERIES, POOL), dtype=V2_SERIES)
        self.means: list[list[bytes]] = []
        self.weights: list[list[bytes]] = []
        for s, items in enumerate(pool):
            self.means.append([c["means"].astype("<f4").tobytes() for _, _, c in items])
            self.weights.append([c["weights"].astype("<u4").tobytes() for _, _, c in items])
            for k, (vals, _, c) in enumerate(items):
                self.rows[s, k] = (0, 0, 0.0, values, vals.sum(), vals.min(), vals.max(),
                                   c["means"].size)
        self.strings = json.dumps({"stage": [f"stage{s:02d}" for s in range(SERIES)],
                                   "phase": ["decode"] * SERIES,
                                   "device": ["cuda:0"] * SERIES})[1:-1]

    def message(self, host: str, second: int, start: float, picks: np.ndarray) -> bytes:
        """One host's message of one second, series ``s`` from pool item ``picks[s]``."""
        head = (f'{{"schema":2,"host":"{host}","target":{{"pid":4242,"name":"vllm",'
                f'"profile":"cuda"}},"published_at":{time.time()},{self.strings}}}').encode()
        table = self.rows[np.arange(SERIES), picks]
        table["start_ns"], table["end_ns"], table["start"] = \
            second * 10**9, (second + 1) * 10**9, start
        return b"".join((V2_PREFIX.pack(V2_MAGIC, 2, len(head)), head, table.tobytes(),
                         *(self.means[s][k] for s, k in enumerate(picks)),
                         *(self.weights[s][k] for s, k in enumerate(picks))))


def _hosts_process(port: int, hosts: list[str], seconds: int, values: int, seed: int,
                   raw_path: str, ready: Any, wire: int) -> None:
    """Publish ``hosts``' digests once a second for ``seconds`` (every tenth host 50 %
    slower); save series 0's raw values (for the p99 check)."""
    import paho.mqtt.client as paho
    from fastdigest import TDigest
    from paho.mqtt.enums import CallbackAPIVersion

    rng = np.random.default_rng(seed)
    # a pool of real digests per (speed, series), built once: a host's second picks one,
    # so the publishers keep up with many hosts; the picks' raw values are the truth
    pool = {slow: [[_window(rng, 10.0 * (1.5 if slow else 1.0) * (1 + s / 4), values,
                            TDigest) for _ in range(POOL)] for s in range(SERIES)]
            for slow in (False, True)}
    fast = {slow: _FastV2(pool[slow], values) for slow in (False, True)}
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{seed}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    for host in hosts:
        client.publish(f"{TOPIC_ROOT}/{host}/status", json.dumps(
            {"state": "online", "at": "", "host": host}), qos=1, retain=True)
    raw: list[np.ndarray] = []
    late: list[float] = []
    ready.wait()  # every publisher has its pool: start together
    start = time.time() // 1 + 1
    for second in range(seconds):
        window_start = start + second
        time.sleep(max(0.0, window_start + 1 - time.time()))  # the window just closed
        for i, host in enumerate(hosts):
            slow = i % 10 == 0
            picks = rng.integers(POOL, size=SERIES)
            raw.append(pool[slow][0][picks[0]][0])
            payload = fast[slow].message(host, second, window_start, picks) if wire == 2 \
                else _message(host, second, window_start, values,
                              [pool[slow][s][k] for s, k in enumerate(picks)], wire)
            client.publish(f"{TOPIC_ROOT}/{host}/vllm-4242/digest", payload, qos=0)
        late.append(time.time() - window_start - 1)  # this second's last message is out
    time.sleep(1.0)
    client.loop_stop()
    client.disconnect()
    np.save(raw_path, np.concatenate(raw) if raw else np.zeros(0))
    np.save(raw_path.replace("raw", "late"), np.array(late))


def _window(rng: np.random.Generator, scale: float, values: int,
            tdigest: Any) -> tuple[np.ndarray, str, dict[str, np.ndarray]]:
    """One series' second: its raw values and their t-digest as each wire schema
    carries it (schema 1's base64 text, schema 2's centroid arrays)."""
    vals = scale * rng.lognormal(0, 0.3, values)
    digest = tdigest.from_values(vals.tolist())
    return vals, base64.b64encode(bytes(digest.to_bytes())).decode(), \
        series_centroids(digest)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def run(hosts: int, seconds: int, edges: int, procs: int, values: int, wire: int,
        profile: str | None, cpus: str = "0") -> dict[str, object]:
    """One run; returns the figures."""
    tmp = Path(tempfile.mkdtemp(prefix="fleet-scale-"))
    with EmbeddedBroker() as core:
        edge_brokers = [EmbeddedBroker(extra_config=bridge_section(
            EdgeBroker(name=f"rack{i}", cores=(core.url,)))).start() for i in range(edges)]
        try:
            time.sleep(2.0)  # bridges connect
            python = [sys.executable, *(["-m", "cProfile", "-o", profile] if profile else [])]
            fleet = subprocess.Popen(
                ["taskset", "-c", cpus, *python, "-m", "prism_tui.cli", "fleet",
                 "--broker", core.url, "--headless", "--no-history",
                 "--window", str(seconds + 60)],
                cwd=ROOT, stdout=(tmp / "fleet.jsonl").open("w"),
                stderr=subprocess.PIPE, text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(tmp)})
            time.sleep(2.0)  # it subscribes
            names = [f"host-{i:05d}" for i in range(hosts)]
            workers = []
            ready = mp.Barrier(procs + 1)
            for p in range(procs):
                edge = edge_brokers[p % edges]
                w = mp.Process(target=_hosts_process, args=(
                    edge.port, names[p::procs], seconds, values, p,
                    str(tmp / f"raw{p}.npy"), ready, wire))
                w.start()
                workers.append(w)
            ready.wait()
            cpu0, t0 = _cpu_s(fleet.pid), time.monotonic()
            load = os.getloadavg()[0]
            for w in workers:
                w.join()
            cpu1, t1 = _cpu_s(fleet.pid), time.monotonic()
            load = max(load, os.getloadavg()[0])
            time.sleep(3.0)  # the last messages arrive
            rss = _peak_rss_mb(fleet.pid)
            fleet.send_signal(signal.SIGTERM)
            _, err = fleet.communicate(timeout=120)
        finally:
            for edge in edge_brokers:
                edge.close()
    lines = [json.loads(x)["fleet"] for x in (tmp / "fleet.jsonl").read_text().splitlines()
             if x.startswith("{")]
    if fleet.returncode != 0 or not lines:
        raise SystemExit(f"prism fleet failed ({fleet.returncode}): {err.strip()[-500:]}")
    last = lines[-1]
    raw = np.concatenate([np.load(tmp / f"raw{p}.npy") for p in range(procs)])
    late = np.concatenate([np.load(tmp / f"late{p}.npy") for p in range(procs)])
    row0 = next(r for r in last["fleet"] if r["stage"] == "stage00")
    truth = float(np.quantile(raw, 0.99))
    snapshots = sorted(x["snapshot_s"] for x in lines)
    return {
        "hosts": hosts, "series_per_host": SERIES, "seconds": seconds, "edges": edges,
        "wire_schema": wire, "publisher_procs": procs, "fleet_cpus": cpus,
        "load_average": round(load, 1),
        "hosts_seen": len(last["hosts"]), "fleet_peak_rss_mb": rss,
        "fleet_cpu_per_s": round((cpu1 - cpu0) / (t1 - t0), 3),
        "messages_per_s": round(last["messages"] / (t1 - t0), 1),
        "messages": last["messages"], "rejected": last["rejected"], "lag_s": last["lag_s"],
        "publishers_done_after_close_s": {"p50": round(float(np.median(late)), 4),
                                          "max": round(float(late.max()), 4)},
        "snapshot_s_p50": snapshots[len(snapshots) // 2], "snapshot_s_max": snapshots[-1],
        "values_series0": int(raw.size), "count_series0": row0["count"],
        "fleet_p99": round(row0["p99"], 4), "raw_p99": round(truth, 4),
        "p99_error_pct": round(100 * abs(row0["p99"] - truth) / truth, 3),
    }


def merge_only(hosts: int, seconds: int, values: int, wire: int) -> dict[str, object]:
    """The fleet's state alone (no brokers): CPU seconds per second of ingesting
    ``hosts`` digest messages (decode included) and of one snapshot, on a fixed clock
    with a 60 s window (the default), averaged over the second half of the simulated
    seconds (from ``seconds`` ≥ 122 on, with the window full throughout)."""
    from fastdigest import TDigest

    from alerting.fleet import FleetState

    rng = np.random.default_rng(0)
    pool = [[_window(rng, 10.0 * (1 + s / 4), values, TDigest) for _ in range(8)]
            for s in range(SERIES)]
    t0 = 1_780_000_000.0
    clock = [t0]
    state = FleetState(TOPIC_ROOT, window_s=60.0, clock=lambda: clock[0])
    ingest_s = snapshot_s = history_s = 0.0
    first = seconds // 2
    raw0: list[tuple[int, np.ndarray]] = []
    load = os.getloadavg()[0]
    snap: dict[str, Any] = {}
    for second in range(seconds):
        messages = [(f"{TOPIC_ROOT}/h{h:05d}/vllm-1/digest", _message(
            f"h{h:05d}", second, t0 + second, values,
            [pool[s][(h + second) % 8] for s in range(SERIES)], wire)) for h in range(hosts)]
        raw0.extend((second, pool[0][(h + second) % 8][0]) for h in range(hosts))
        clock[0] = t0 + second + 1.2
        a = time.process_time()
        for topic, payload in messages:
            state.ingest(topic, payload)
        b = time.process_time()
        snap = state.snapshot()
        c = time.process_time()
        state.drain_windows()  # what the history would write
        d = time.process_time()
        if second >= first:  # the second half: the window holds many buckets
            ingest_s += b - a
            snapshot_s += c - b
            history_s += d - c
    half = seconds - first
    horizon = clock[0] - 60.0
    truth = float(np.quantile(np.concatenate(
        [v for sec, v in raw0 if t0 + sec >= horizon]), 0.99))
    row0 = next(r for r in snap["fleet"] if r["stage"] == "stage00")
    return {"mode": "merge-only", "hosts": hosts, "series_per_host": SERIES,
            "wire_schema": wire, "seconds": seconds, "measured_seconds": half,
            "load_average": round(max(load, os.getloadavg()[0]), 1),
            "ingest_cpu_per_s": round(ingest_s / half, 3),
            "snapshot_cpu_per_s": round(snapshot_s / half, 3),
            "history_drain_cpu_per_s": round(history_s / half, 3),
            "cpu_per_s": round((ingest_s + snapshot_s + history_s) / half, 3),
            "fleet_p99": round(row0["p99"], 4), "raw_p99": round(truth, 4),
            "p99_error_pct": round(100 * abs(row0["p99"] - truth) / truth, 3),
            "peak_rss_mb_with_the_messages": _peak_rss_mb(os.getpid())}


def main() -> None:
    """Parse the arguments, run, print one JSON document."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--hosts", type=int, default=50)
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--edges", type=int, default=2)
    ap.add_argument("--procs", type=int, default=2, help="publishing processes")
    ap.add_argument("--values", type=int, default=200, help="values per series per second")
    ap.add_argument("--wire", type=int, choices=(1, 2), default=2,
                    help="digest wire schema the hosts send (2: binary, what monitors send)")
    ap.add_argument("--profile", metavar="PATH",
                    help="run the fleet under cProfile, its stats written to PATH")
    ap.add_argument("--cpus", default="0",
                    help="CPUs the fleet may run on (taskset -c); default one, CPU 0")
    ap.add_argument("--merge-only", action="store_true",
                    help="time the fleet's state alone (no brokers, no publishers)")
    args = ap.parse_args()
    if args.merge_only:
        print(json.dumps(merge_only(args.hosts, args.seconds, args.values, args.wire),
                         indent=2))
        return
    print(json.dumps(run(args.hosts, args.seconds, args.edges, args.procs, args.values,
                         args.wire, args.profile, args.cpus), indent=2))


if __name__ == "__main__":
    main()
