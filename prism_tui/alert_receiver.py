"""A real MQTT subscriber in its own process, timestamping alerts for ``prism eval``.

Its own process, so that neither the monitor's event loop nor its GIL (a thread waits up
to the 5 ms switch interval for it) delays the receipt: the figure measures the alert
path, not the measuring. It prints ``ready`` once subscribed, then one line per alert,
``<id> <CLOCK_MONOTONIC ns>`` (the spans' clock, shared by every process), and stops when
its stdin closes.

    python -m prism_tui.alert_receiver mqtt://127.0.0.1:1883 latencyprism/v1/+/+/alert
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time

import aiomqtt

from alerting.config import parse_broker_url
from prism_tui.scheduling import go_realtime, request_short_slice


async def _receive(url: str, topic: str, username: str | None, password: str | None) -> None:
    _, host, port = parse_broker_url(url)
    loop = asyncio.get_running_loop()
    stdin_closed = asyncio.Event()

    def on_stdin() -> None:
        if not sys.stdin.read(4096):  # EOF: the parent is done
            loop.remove_reader(sys.stdin.fileno())
            stdin_closed.set()

    loop.add_reader(sys.stdin.fileno(), on_stdin)
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


def main(argv: list[str]) -> int:
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
    try:
        asyncio.run(_receive(url, topic, username, password))
    except aiomqtt.MqttError as exc:
        print(f"alert receiver: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
