"""Alert publish → subscriber receipt over loopback Mosquitto, and the hot-path cost.

A publisher (this process, one asyncio loop, like the engine) sends N alerts at a steady
rate through :class:`AlertPublisher` to an embedded Mosquitto; a subscriber in a second
process (QoS 1) timestamps each receipt. Latency = receipt CLOCK_MONOTONIC minus the
alert's ``iteration_end_ns`` (stamped just before ``publish()``; the clock is system-wide,
so two processes can subtract). Run with the durable outbox on (the default setup) and
off (memory only) to show what the disk costs the latency, and with the outbox through
the queued path (``direct=False``: writer and sender tasks) for comparison. The
``publish()`` column is
the wall time of the call while connected: with nothing queued it writes the outbox (a
WAL append, no fsync) and the socket itself. Hot path while the broker is away: one
``publish()`` call only queues, against a synchronous ``Outbox.put``.

    .venv/bin/python bench/alert_latency.py [--n 10000] [--rate 1000] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiomqtt  # noqa: E402

from alerting.broker import EmbeddedBroker  # noqa: E402
from alerting.config import ALERT_SUBSCRIPTION, BrokerConfig, parse_broker_url  # noqa: E402
from alerting.outbox import Outbox  # noqa: E402
from alerting.publisher import AlertPublisher  # noqa: E402
from alerting.schema import Alert, Suspect, rfc3339  # noqa: E402


def make_alert(i: int) -> Alert:
    """A realistic alert (≈640 bytes of JSON), stamped with the monotonic clock now."""
    now = time.time()
    return Alert(id=f"bench-{i}", fingerprint=f"fp-{i % 8}", status="firing",
                 severity="critical", host="gpu-node-1", target_pid=4242, target_name="vllm",
                 device="cuda:0", stage="device_sync", phase="decode", observed_ms=41.5,
                 predicted_ms=30.25, error=0.375, ucl=0.2, window=i,
                 started_at=rfc3339(now - 1), detected_at=rfc3339(now),
                 iteration_end_ns=time.monotonic_ns(),
                 summary="device_sync 41.5 ms vs 30.2 ms predicted on cuda:0 (decode)",
                 suspects=(Suspect("device_sync", "cuda:0", "sm_clock", 3.5, 0.25),),
                 labels={"team": "serving"})


# ---------------------------------------------------------------------- subscriber process
async def subscribe(url: str, n: int, timeout: float) -> None:
    """Child mode: receive alerts, print one JSON line of latencies (ms) per alert id."""
    _, host, port = parse_broker_url(url)
    latencies: dict[str, float] = {}
    duplicates = 0
    async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(ALERT_SUBSCRIPTION, qos=1)
        print("ready", flush=True)

        async def receive() -> None:
            nonlocal duplicates
            async for message in client.messages:
                now = time.monotonic_ns()
                doc = json.loads(message.payload)  # type: ignore[arg-type]
                if doc["id"] in latencies:
                    duplicates += 1
                    continue
                latencies[doc["id"]] = (now - doc["iteration_end_ns"]) / 1e6
                if len(latencies) >= n:
                    return

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(receive(), timeout)
    print(json.dumps({"latencies": list(latencies.values()), "duplicates": duplicates}),
          flush=True)


# ---------------------------------------------------------------------- publisher side
async def run_once(url: str, n: int, rate: float, outbox: Outbox | None,
                   direct: bool = True) -> dict[str, Any]:
    """Publish ``n`` alerts at ``rate``/s while a subscriber process measures receipt."""
    sub = subprocess.Popen([sys.executable, __file__, "--subscriber", url, str(n)],
                           stdout=subprocess.PIPE, text=True)
    assert sub.stdout is not None
    assert (await asyncio.to_thread(sub.stdout.readline)).strip() == "ready"
    call_us: list[float] = []
    pub = AlertPublisher(BrokerConfig(url=url), host="gpu-node-1", outbox=outbox,
                         direct=direct)
    async with pub:
        while pub.status.state != "connected":
            await asyncio.sleep(0.01)
        start = time.monotonic()
        for sent in range(n):  # alert i is due at start + i / rate
            delay = start + sent / rate - time.monotonic()
            if delay > 0.0005:
                await asyncio.sleep(delay)
            alert = make_alert(sent)
            t0 = time.perf_counter_ns()
            pub.publish(alert)
            call_us.append((time.perf_counter_ns() - t0) / 1e3)
            if sent % 64 == 63:
                await asyncio.sleep(0)  # a producer yields to the loop now and then
        elapsed = time.monotonic() - start
        out = await asyncio.to_thread(sub.stdout.readline)
        while pub.status.pending:
            await asyncio.sleep(0.01)
    sub.wait()
    sub.stdout.close()
    doc = json.loads(out)
    arrival = doc["latencies"]
    lat = sorted(arrival)
    slow = [i for i, x in enumerate(arrival) if x > 5.0]
    return {"outbox": outbox is not None, "path": "direct" if direct else "queued", "n": n,
            "received": len(lat),
            "duplicates": doc["duplicates"], "rate_per_s": round(n / elapsed),
            "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "max_ms": lat[-1] if lat else None,
            "over_5ms": len(slow), "over_5ms_last_index": slow[-1] if slow else None,
            "publish_call_p50_us": pct(sorted(call_us), 50),
            "publish_call_p99_us": pct(sorted(call_us), 99)}


def pct(values: list[float], p: float) -> float | None:
    """The p-th percentile of sorted values (nearest rank), rounded for the table."""
    if not values:
        return None
    k = min(len(values) - 1, max(0, round(p / 100 * len(values) + 0.5) - 1))
    return round(values[k], 3)


def hot_path(tmp: Path, n: int) -> dict[str, float]:
    """µs per publish() call with the broker away (it queues) vs one synchronous Outbox.put."""
    alerts = [make_alert(i) for i in range(n)]

    async def calls() -> float:
        box = Outbox(tmp / "hot.sqlite")
        pub = AlertPublisher(BrokerConfig(url="mqtt://127.0.0.1:1"), host="h", outbox=box)
        t0 = time.perf_counter_ns()
        for alert in alerts:
            pub.publish(alert)
        per_call = (time.perf_counter_ns() - t0) / 1e3 / n
        await pub.aclose()  # writes them to the outbox (not timed)
        box.close()
        return per_call

    per_call = asyncio.run(calls())
    with Outbox(tmp / "sync.sqlite") as box:
        t0 = time.perf_counter_ns()
        for alert in alerts[: min(n, 2000)]:
            box.put(alert)
        put_us = (time.perf_counter_ns() - t0) / 1e3 / min(n, 2000)
    return {"publish_call_us": round(per_call, 3), "outbox_put_sync_us": round(put_us, 1),
            "ratio": round(put_us / per_call, 1)}


def main() -> int:
    """Run the benchmark and print a table (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="alerts per run")
    parser.add_argument("--rate", type=float, default=1000.0, help="alerts per second")
    parser.add_argument("--quick", action="store_true", help="2,000 alerts per run")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--subscriber", nargs=2, metavar=("URL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.subscriber:
        url, n = args.subscriber
        asyncio.run(subscribe(url, int(n), timeout=120))
        return 0
    n = 2000 if args.quick else args.n
    rows = []
    with tempfile.TemporaryDirectory(prefix="alert-bench-") as tmp, EmbeddedBroker() as b:
        for with_outbox, direct in ((True, True), (True, False), (False, True)):
            box = Outbox(Path(tmp) / f"outbox-{with_outbox}-{direct}.sqlite") \
                if with_outbox else None
            rows.append(asyncio.run(run_once(b.url, n, args.rate, box, direct)))
            if box is not None:
                box.close()
        hot = hot_path(Path(tmp), 20_000)
        broker_version = subprocess.run([b._binary or "mosquitto", "-h"], capture_output=True,
                                        text=True, check=False).stdout.splitlines()[:1]
    result = {"python": platform.python_version(), "cores": os.cpu_count(),
              "broker": (broker_version or ["?"])[0], "runs": rows, "hot_path": hot}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"python {result['python']}, {result['cores']} cores, {result['broker']}")
    print("| outbox | path | alerts | rate (/s) | received | dup | p50 (ms) | p99 (ms) "
          "| max (ms) | > 5 ms (count, last arrival #) | publish() p50 / p99 (µs) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {'on' if r['outbox'] else 'off'} | {r['path']} | {r['n']} | "
              f"{r['rate_per_s']} | "
              f"{r['received']} | {r['duplicates']} | {r['p50_ms']} | {r['p99_ms']} | "
              f"{r['max_ms']:.3f} | {r['over_5ms']}, #{r['over_5ms_last_index']} | "
              f"{r['publish_call_p50_us']} / {r['publish_call_p99_us']} |")
    print()
    print(f"broker away: publish() with the outbox on = {hot['publish_call_us']} µs/call "
          f"(it queues); a synchronous Outbox.put = {hot['outbox_put_sync_us']} µs/alert")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
