"""Where notifications go: webhook, PagerDuty Events API v2, exec, JSON-lines file, stdout.

Every sink raises :class:`SinkError` on failure, saying whether the error can recover
(connection refused, timeout, HTTP 5xx/429, a temporary exec failure): only those are
retried by :func:`send_with_retry`, with exponential backoff. HTTP uses the standard
library in a thread (no extra dependency); exec never goes through a shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import random
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TextIO

from alerting.gateway.config import (
    ExecSinkConfig,
    FileSinkConfig,
    PagerDutySinkConfig,
    RetryPolicy,
    SinkConfig,
    StdoutSinkConfig,
    WebhookSinkConfig,
)
from alerting.gateway.errors import GatewayError
from alerting.gateway.pipeline import Notification
from alerting.schema import Alert

log = logging.getLogger("alerting.gateway")

PAGERDUTY_SEVERITY = {"critical": "critical", "error": "error", "warning": "warning",
                      "info": "info"}
"""Alert severity → PagerDuty ``payload.severity`` (the same four words)."""
EX_TEMPFAIL = 75
"""An exec sink exiting with this status (sysexits.h) asks to be retried."""
USER_AGENT = "LatencyPrism-gateway/1"


class SinkError(GatewayError):
    """A failed delivery; ``recoverable`` says whether retrying may help."""

    def __init__(self, message: str, *, recoverable: bool,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.recoverable = recoverable
        self.retry_after = retry_after


class Sink(Protocol):
    """One delivery target."""

    name: str

    async def send(self, notification: Notification) -> None:
        """Deliver ``notification``; raises :class:`SinkError` on failure."""
        ...


def _json(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def post_json(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> int:
    """POST ``body`` as JSON (blocking; call it in a thread); returns the HTTP status.

    Raises:
        SinkError: connection problems, timeouts and 5xx/429 are recoverable; other
            non-2xx answers are not.
    """
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": USER_AGENT, **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        text = exc.read(200).decode("utf-8", "replace").strip().replace("\n", " ")
        retry_after = None
        raw = exc.headers.get("Retry-After") if exc.headers else None
        if raw:
            with contextlib.suppress(ValueError):
                retry_after = float(raw)
        recoverable = exc.code >= 500 or exc.code == 429
        raise SinkError(f"{url}: HTTP {exc.code} {exc.reason}: {text}"[:300],
                        recoverable=recoverable, retry_after=retry_after) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        recoverable = not isinstance(reason, str) or "unknown url type" not in reason
        raise SinkError(f"{url}: {reason}", recoverable=recoverable) from None
    except TimeoutError:
        raise SinkError(f"{url}: no answer in {timeout:g} s", recoverable=True) from None
    except (ConnectionError, OSError) as exc:
        raise SinkError(f"{url}: {exc}", recoverable=True) from None


class WebhookSink:
    """POST the notification document (all alerts of the group) as JSON."""

    def __init__(self, config: WebhookSinkConfig, name: str = "webhook") -> None:
        self.config = config
        self.name = name

    async def send(self, notification: Notification) -> None:
        """One POST per notification."""
        await asyncio.to_thread(post_json, self.config.url, _json(notification.to_doc()),
                                self.config.headers, self.config.timeout_s)


def pagerduty_event(alert: Alert, routing_key: str, client_url: str | None = None
                    ) -> dict[str, Any]:
    """The PagerDuty Events API v2 event for one alert (trigger or resolve)."""
    if alert.status == "resolved":
        return {"routing_key": routing_key, "event_action": "resolve",
                "dedup_key": alert.fingerprint}
    event: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": alert.fingerprint,
        "payload": {
            "summary": alert.summary[:1024] or f"{alert.stage} latency on {alert.host}",
            "source": alert.host,
            "severity": PAGERDUTY_SEVERITY[alert.severity],
            "timestamp": alert.detected_at,
            "component": alert.target_name,
            "group": alert.device,
            "class": f"{alert.phase} {alert.stage} latency",
            "custom_details": {
                "alert_id": alert.id, "fingerprint": alert.fingerprint,
                "pid": alert.target_pid, "device": alert.device, "stage": alert.stage,
                "phase": alert.phase, "observed_ms": alert.observed_ms,
                "predicted_ms": alert.predicted_ms, "error": alert.error, "ucl": alert.ucl,
                "window": alert.window, "started_at": alert.started_at,
                "detected_at": alert.detected_at, "source": alert.source,
                "suspects": [s.to_dict() for s in alert.suspects],
                "labels": dict(alert.labels),
            },
        },
        "client": "LatencyPrism",
    }
    if client_url:
        event["client_url"] = client_url
    return event


class PagerDutySink:
    """One Events API v2 event per alert: trigger for firing, resolve for resolved."""

    def __init__(self, config: PagerDutySinkConfig, name: str = "pagerduty") -> None:
        self.config = config
        self.name = name

    async def send(self, notification: Notification) -> None:
        """Events in order (firing, then resolved); a failure retries the whole batch,
        which PagerDuty's dedup_key makes harmless."""
        for alert in (*notification.firing, *notification.resolved):
            body = _json(pagerduty_event(alert, self.config.routing_key, self.config.client_url))
            await asyncio.to_thread(post_json, self.config.url, body, {},
                                    self.config.timeout_s)


class ExecSink:
    """Run a program (argv list, no shell) with the notification JSON on stdin."""

    def __init__(self, config: ExecSinkConfig, name: str = "exec") -> None:
        self.config = config
        self.name = name

    async def send(self, notification: Notification) -> None:
        """Exit 0 is success; a timeout or exit 75 (EX_TEMPFAIL) is worth a retry."""
        argv = self.config.argv
        env = dict(os.environ, PRISM_RECEIVER=notification.receiver,
                   PRISM_STATUS=notification.status, PRISM_GROUP_KEY=notification.group_key)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True)
        except OSError as exc:
            raise SinkError(f"exec {argv[0]}: {exc.strerror or exc}",
                            recoverable=exc.errno in (errno.EAGAIN, errno.ENOMEM)) from None
        try:
            _, err = await asyncio.wait_for(
                proc.communicate(_json(notification.to_doc()) + b"\n"), self.config.timeout_s)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise SinkError(f"exec {argv[0]}: killed after {self.config.timeout_s:g} s "
                            "timeout", recoverable=True) from None
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise
        if proc.returncode != 0:
            tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] if err else []
            said = f": {tail[0][:200]}" if tail else ""
            raise SinkError(f"exec {argv[0]}: exit status {proc.returncode}{said}",
                            recoverable=proc.returncode == EX_TEMPFAIL)


class FileSink:
    """Append one JSON line per notification (file created with mode 0600)."""

    def __init__(self, config: FileSinkConfig, name: str = "file") -> None:
        self.config = config
        self.name = name

    def _append(self, line: bytes) -> None:
        try:
            fd = os.open(self.config.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SinkError(f"{self.config.path}: {exc.strerror}",
                            recoverable=exc.errno in (errno.ENOSPC, errno.EIO, errno.EMFILE,
                                                      errno.ENFILE)) from None
        try:
            os.write(fd, line)
        except OSError as exc:
            raise SinkError(f"{self.config.path}: {exc.strerror}",
                            recoverable=exc.errno in (errno.ENOSPC, errno.EIO)) from None
        finally:
            os.close(fd)

    async def send(self, notification: Notification) -> None:
        """Append in a thread (the loop only moves data)."""
        await asyncio.to_thread(self._append, _json(notification.to_doc()) + b"\n")


class StdoutSink:
    """Print one JSON line per notification."""

    def __init__(self, config: StdoutSinkConfig | None = None, name: str = "stdout",
                 stream: TextIO | None = None) -> None:
        self.name = name
        self.stream = stream

    async def send(self, notification: Notification) -> None:
        """Write and flush one line."""
        stream = self.stream or sys.stdout
        try:
            stream.write(_json(notification.to_doc()).decode() + "\n")
            stream.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise SinkError(f"stdout: {exc}", recoverable=False) from None


def build_sink(config: SinkConfig, name: str) -> Sink:
    """The sink object for a sink configuration."""
    if isinstance(config, WebhookSinkConfig):
        return WebhookSink(config, name)
    if isinstance(config, PagerDutySinkConfig):
        return PagerDutySink(config, name)
    if isinstance(config, ExecSinkConfig):
        return ExecSink(config, name)
    if isinstance(config, FileSinkConfig):
        return FileSink(config, name)
    return StdoutSink(config, name)


async def send_with_retry(sink: Sink, notification: Notification, policy: RetryPolicy,
                          sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                          jitter: Callable[[], float] = lambda: random.uniform(0.5, 1.0)
                          ) -> int:
    """Send, retrying only recoverable errors with exponential backoff.

    Returns:
        The number of attempts it took.

    Raises:
        SinkError: an error that cannot recover, or the last one after ``policy.attempts``.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            await sink.send(notification)
            return attempt
        except SinkError as exc:
            if not exc.recoverable or attempt >= policy.attempts:
                raise
            delay = policy.backoff(attempt) * jitter()
            if exc.retry_after is not None:
                delay = max(delay, min(exc.retry_after, policy.max_backoff_s))
            log.warning("%s: %s; retry %d/%d in %.2f s", sink.name, exc, attempt,
                        policy.attempts - 1, delay)
            await sleep(delay)
