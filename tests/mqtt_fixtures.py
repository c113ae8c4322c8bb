"""Shared MQTT test helpers: a real Mosquitto per test/module, a subscriber, TLS material.

Import the fixtures into a test module (``from tests.mqtt_fixtures import broker``); the
helpers are plain functions. Nothing here is mocked: the broker is the real Mosquitto
binary on a free loopback port, the certificates come from the openssl CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import anyio
import pytest

from alerting.broker import EmbeddedBroker, find_mosquitto
from alerting.config import parse_broker_url
from alerting.schema import Alert, Suspect, rfc3339

_ids = itertools.count()


def sample_alert(fingerprint: str = "fp-1", *, seq: int = 0, host: str = "gpu-node-1",
                 pid: int = 4242, name: str = "vllm", severity: str = "critical") -> Alert:
    """A valid schema-1 alert; ``seq`` goes into ``window`` so tests can check order."""
    now = time.time()
    return Alert(id=f"a-{os.getpid()}-{next(_ids)}", fingerprint=fingerprint,
                 status="firing", severity=severity, host=host, target_pid=pid,
                 target_name=name, device="cuda:0", stage="device_sync", phase="decode",
                 observed_ms=41.5, predicted_ms=30.25, error=0.375, ucl=0.2, window=seq,
                 started_at=rfc3339(now - 1), detected_at=rfc3339(now),
                 iteration_end_ns=time.monotonic_ns(),
                 summary=f"device_sync slow on {host} cuda:0",
                 suspects=(Suspect("device_sync", "cuda:0", "sm_clock", 3.5, 0.25),),
                 labels={"team": "serving"})


def _mosquitto_or_skip() -> None:
    """Fail loudly when Mosquitto is missing (the test machine installs it)."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed (apt-get install mosquitto)")


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    """A fresh real Mosquitto broker for one test (``.url``, ``.port``, ``stop()/start()``)."""
    _mosquitto_or_skip()
    with EmbeddedBroker(prefer="mosquitto") as b:
        yield b


@pytest.fixture(scope="module")
def module_broker() -> Iterator[EmbeddedBroker]:
    """One real Mosquitto broker shared by a test module (faster; tests must use own topics)."""
    _mosquitto_or_skip()
    with EmbeddedBroker(prefer="mosquitto") as b:
        yield b


def client_for(url: str, **kwargs: Any) -> aiomqtt.Client:
    """An aiomqtt client for a ``mqtt://host:port`` URL (extra kwargs go to aiomqtt)."""
    _, host, port = parse_broker_url(url)
    return aiomqtt.Client(host, port, **kwargs)


async def collect(url: str, topic: str, n: int, timeout: float = 10.0,
                  **kwargs: Any) -> list[aiomqtt.Message]:
    """Subscribe to ``topic`` (QoS 1) and return the first ``n`` messages (fewer on timeout).

    Retained messages count. Extra kwargs go to :class:`aiomqtt.Client`.
    """
    got: list[aiomqtt.Message] = []
    async with client_for(url, **kwargs) as client:
        await client.subscribe(topic, qos=1)
        with anyio.move_on_after(timeout):
            async for message in client.messages:
                got.append(message)
                if len(got) >= n:
                    break
    return got


class Subscriber:
    """A background subscriber that records every message (start before publishing).

    It reconnects on its own when the broker goes away; pass ``identifier=...`` and
    ``clean_session=False`` to keep its session (and queued messages) across an outage.
    """

    def __init__(self, url: str, topic: str, **kwargs: Any) -> None:
        self.url, self.topic, self.kwargs = url, topic, kwargs
        self.messages: list[aiomqtt.Message] = []
        self.reconnects = 0
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Subscriber:
        self._task = asyncio.create_task(self._run())
        with anyio.fail_after(10):
            await self._ready.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        # aiomqtt's reconnect pattern: with ``clean_session=False`` and a fixed
        # ``identifier`` the broker keeps our subscription and queues QoS 1 messages
        # for us while we (or it) are away.
        client = client_for(self.url, **self.kwargs)
        while True:
            try:
                async with client:
                    await client.subscribe(self.topic, qos=1)
                    self._ready.set()
                    async for message in client.messages:
                        self.messages.append(message)
            except aiomqtt.MqttError:
                self.reconnects += 1
                await asyncio.sleep(0.1)

    async def wait_for(self, n: int, timeout: float = 10.0) -> list[aiomqtt.Message]:
        """Wait until ``n`` messages arrived (returns what arrived on timeout)."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return list(self.messages)


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(folder: Path) -> TlsFiles:
    """Generate the certificates with the openssl CLI (EC keys: fast)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl CLI not installed")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=folder)

    def key(name: str) -> None:
        run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", name)

    key("ca.key")
    run("req", "-x509", "-new", "-key", "ca.key", "-sha256", "-days", "2",
        "-subj", "/CN=LatencyPrism test CA", "-out", "ca.crt")
    for name, subject, ext in (
            ("server", "/CN=localhost",
             "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
            ("client", "/CN=prism-client", "extendedKeyUsage=clientAuth\n")):
        key(f"{name}.key")
        run("req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr")
        (folder / f"{name}.ext").write_text(ext)
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-sha256", "-extfile", f"{name}.ext",
            "-out", f"{name}.crt")
    for path in folder.glob("*.key"):
        path.chmod(0o600)
    return TlsFiles(folder / "ca.crt", folder / "server.crt", folder / "server.key",
                    folder / "client.crt", folder / "client.key")
