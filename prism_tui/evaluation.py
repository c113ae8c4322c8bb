"""The evaluation harness of ``prism eval`` (the simulator) and of the live-target eval
(``prism_tui.eval_target``): throughput and percentiles of a run, per-fault scores, and
the alert receiver that timestamps each alert at a real MQTT subscriber.

The receiver runs in a process of its own, so that neither the monitor's event loop nor
its GIL (a thread waits up to the 5 ms switch interval for it) delays the receipt: the
figure measures the alert path, not the measuring. As a child it prints ``ready`` once
subscribed, then one line per alert, ``<id> <CLOCK_MONOTONIC ns>`` (the spans' clock,
shared by every process), and stops when its stdin closes::

    python -m prism_tui.evaluation mqtt://127.0.0.1:1883 latencyprism/v1/+/+/alert
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from alerting.config import parse_broker_url
from prism_tui.scheduling import go_realtime, request_short_slice


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50 / p99 / max of sorted ``values`` in ms (None when empty)."""
    if not values:
        return {"p50": None, "p99": None, "max": None}
    return {"p50": round(values[len(values) // 2], 3),
            "p99": round(values[min(len(values) - 1, int(len(values) * 0.99))], 3),
            "max": round(values[-1], 3)}


def throughput(done: dict[str, Any], labels_path: str, duration: float) -> dict[str, float]:
    """Generated tokens per second and mean decode iteration latency of one run, from the
    simulator child's final counts (``done``) and its labels."""
    from prism_sim.labels import read_labels

    decode = [it for it in read_labels(labels_path).iterations if it.phase == "decode"]
    mean_ms = (sum(it.end_ns - it.start_ns for it in decode) / len(decode) / 1e6
               if decode else 0.0)
    return {"tokens_per_s": round(int(done["generation_tokens"]) / duration, 3),
            "iterations": float(sum(int(n) for n in done["iterations"].values())),
            "decode_ms_mean": round(mean_ms, 4)}


class AlertReceiver:
    """A real MQTT subscriber in a child process (:func:`receiver_main`).

    A process of its own, so that the monitor's loop and GIL do not delay the receipt
    timestamps; CLOCK_MONOTONIC is shared by every process on the host.
    """

    def __init__(self, config: Any, realtime: int = 0) -> None:
        self.config = config
        self.realtime = realtime
        self.received: dict[str, int] = {}
        """Alert id → CLOCK_MONOTONIC ns of receipt (the spans' clock)."""
        self._proc: subprocess.Popen[str] | None = None
        self._reader: Any = None

    def __enter__(self) -> AlertReceiver:
        from prism_tui.scheduling import realtime_priority

        env = dict(os.environ, PRISM_RECEIVER_USERNAME=self.config.username or "",
                   PRISM_RECEIVER_PASSWORD=self.config.password or "")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "prism_tui.evaluation", self.config.url,
             f"{self.config.topic_root}/+/+/alert", str(self.realtime)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert self._proc.stdout is not None
        first = self._proc.stdout.readline().strip()
        if first != "ready":
            err = self._proc.stderr.read() if self._proc.stderr else ""
            self._proc.kill()
            self._proc.wait()
            raise RuntimeError(f"the measuring subscriber did not start: {err.strip()}")
        self._reader = threading.Thread(target=self._read, args=(realtime_priority(),),
                                        daemon=True)
        self._reader.start()
        return self

    def _read(self, priority: int) -> None:
        from prism_tui.scheduling import follow_priority

        follow_priority(priority)  # a normal thread holding the GIL would delay the loop
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            alert_id, _, ns = line.strip().partition(" ")
            if ns.isdigit():
                self.received[alert_id] = int(ns)

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(OSError):
            assert self._proc.stdin is not None
            self._proc.stdin.close()  # its signal to stop
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._reader is not None:
            self._reader.join(5)


def run_and_receive(session: Any, duration: float | None, realtime: int = 0, *,
                    until: threading.Event | None = None) -> dict[str, int]:
    """Run the session for ``duration`` seconds (or until ``until``) while a real MQTT
    subscriber timestamps each alert; alert id → CLOCK_MONOTONIC ns of receipt."""
    from prism_tui.session import run_headless

    with AlertReceiver(session.publisher.config, realtime) as receiver:
        run_headless(session, None, duration, until=until, signals=False)
        time.sleep(0.5)  # the last deliveries
    return dict(receiver.received)


def fault_scores(rows: Sequence[Any], labels: Any, started_ns: int) -> list[dict[str, Any]]:
    """Per fault window: its measured slowdown and strength bucket, whether the injector
    measurably bit and what it measured (``bit``, ``effect``), the judged decode
    iterations that ended inside it, the share of them that fired (recall) and whether
    any did (detected), so scores can be read by fault strength."""
    from prism_sim.labels import fault_effects, strength_bucket
    from prism_tui.engine.evaluate import window_recall

    out: list[dict[str, Any]] = []
    for effect in fault_effects(labels):
        f = effect.fault
        out.append({
            "type": f.type, "rank": f.rank, "intensity": f.intensity,
            "start_s": round((f.start_ns - started_ns) / 1e9, 3),
            "duration_s": round((f.end_ns - f.start_ns) / 1e9, 3),
            "slowdown": effect.slowdown, "strength": strength_bucket(effect.slowdown),
            "bit": f.bit, "effect": f.effect,
            **window_recall(rows, f.start_ns, f.end_ns)})
    return out


async def _receive(url: str, topic: str, username: str | None, password: str | None) -> None:
    _, host, port = parse_broker_url(url)
    loop = asyncio.get_running_loop()
    stdin_closed = asyncio.Event()

    def on_stdin() -> None:
        if not sys.stdin.read(4096):  # EOF: the parent is done
            loop.remove_reader(sys.stdin.fileno())
            stdin_closed.set()

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    import aiomqtt

    async with aiomqtt.Client(host, port, username=username, password=password) as client:
        await client.subscribe(topic, qos=1)
        print("ready", flush=True)

        async def read() -> None:
            async for message in client.messages:
                now = time.monotonic_ns()
                try:
                    doc = json.loads(bytes(message.payload))  # type: ignore[arg-type]
                    print(f"{doc['id']} {now}", flush=True)
                except (ValueError, KeyError, TypeError):
                    continue

        reader = asyncio.create_task(read())
        await stdin_closed.wait()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


def receiver_main(argv: list[str]) -> int:
    """``URL TOPIC [PRIO]`` (credentials from ``PRISM_RECEIVER_USERNAME``/``_PASSWORD``, not argv:
    argv is world-readable); exit 1 with one line when the broker refuses."""
    url, topic = argv[0], argv[1]
    realtime = int(argv[2]) if len(argv) > 2 else 0
    username = os.environ.get("PRISM_RECEIVER_USERNAME") or None
    password = os.environ.get("PRISM_RECEIVER_PASSWORD") or None
    # it stands in for a consumer on another host, which our CPU faults do not starve
    request_short_slice()
    why = go_realtime(realtime, "the alert receiver")  # with prism eval --realtime
    if why:
        print(f"alert receiver: {why}", file=sys.stderr)
    import aiomqtt

    try:
        asyncio.run(_receive(url, topic, username, password))
    except aiomqtt.MqttError as exc:
        print(f"alert receiver: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(receiver_main(sys.argv[1:]))
