"""Gateway sinks against real endpoints: a loopback HTTP server, real child processes, files."""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from alerting.gateway.config import (
    ExecSinkConfig,
    FileSinkConfig,
    PagerDutySinkConfig,
    RetryPolicy,
    WebhookSinkConfig,
)
from alerting.gateway.pipeline import Notification
from alerting.gateway.sinks import (
    ExecSink,
    FileSink,
    PagerDutySink,
    SinkError,
    StdoutSink,
    WebhookSink,
    send_with_retry,
)
from tests.test_gateway_pipeline import T0, make_alert


class Recorder:
    """A loopback HTTP server that records POSTs and answers with scripted statuses."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: list[tuple[int, dict[str, str]]] = []
        self.delay = 0.0
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                recorder.requests.append({"path": self.path, "headers": dict(self.headers),
                                          "json": json.loads(body)})
                if recorder.delay:
                    time.sleep(recorder.delay)
                status, headers = recorder.script.pop(0) if recorder.script else (202, {})
                reply = json.dumps({"status": "success" if status < 300 else "error"}).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (the timeout test)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop serving (idempotent)."""
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http() -> Iterator[Recorder]:
    """A recording HTTP server on a free loopback port."""
    recorder = Recorder()
    yield recorder
    recorder.close()


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def notification(status: str = "firing") -> Notification:
    """A group with one firing critical and one resolved warning (or only the resolved)."""
    firing = make_alert("fp-crit", severity="critical", labels={"team": "serving"})
    resolved = make_alert("fp-warn", status="resolved", severity="warning", at=T0 + 5)
    return Notification("pager", 0, "root:{host='gpu-node-1'}", {"host": "gpu-node-1"},
                        (firing,) if status == "firing" else (), (resolved,), T0 + 10)


async def no_sleep(_: float) -> None:
    """Retry without waiting (the delays are checked in the pipeline tests)."""


# ------------------------------------------------------------------ PagerDuty
@pytest.mark.anyio
async def test_pagerduty_events_v2_fields_exact(http: Recorder) -> None:
    note = notification()
    sink = PagerDutySink(PagerDutySinkConfig("R0UT1NGKEY", f"{http.url}/v2/enqueue",
                                             client_url="https://grafana.example/d/x"))
    await sink.send(note)
    assert [r["path"] for r in http.requests] == ["/v2/enqueue", "/v2/enqueue"]
    assert http.requests[0]["headers"]["Content-Type"] == "application/json"
    firing = note.firing[0]
    assert http.requests[0]["json"] == {
        "routing_key": "R0UT1NGKEY",
        "event_action": "trigger",
        "dedup_key": "fp-crit",
        "payload": {
            "summary": "device_sync slow on gpu-node-1",
            "source": "gpu-node-1",
            "severity": "critical",
            "timestamp": firing.detected_at,
            "component": "vllm",
            "group": "cuda:0",
            "class": "decode device_sync latency",
            "custom_details": {
                "alert_id": firing.id, "fingerprint": "fp-crit", "pid": 4242,
                "device": "cuda:0", "stage": "device_sync", "phase": "decode",
                "observed_ms": 42.5, "predicted_ms": 30.0, "error": 0.29, "ucl": 0.2,
                "window": 10, "started_at": firing.started_at,
                "detected_at": firing.detected_at, "source": "detector",
                "suspects": [{"stage": "device_sync", "device": "cuda:0",
                              "metric": "sm_clock", "score": 3.5, "delta_share": 0.2}],
                "labels": {"team": "serving"},
            },
        },
        "client": "LatencyPrism",
        "client_url": "https://grafana.example/d/x",
    }
    assert http.requests[1]["json"] == {"routing_key": "R0UT1NGKEY",
                                        "event_action": "resolve", "dedup_key": "fp-warn"}


@pytest.mark.parametrize(("severity", "expected"), [
    ("critical", "critical"), ("error", "error"), ("warning", "warning"), ("info", "info")])
@pytest.mark.anyio
async def test_pagerduty_severity_mapping(http: Recorder, severity: str, expected: str) -> None:
    alert = make_alert(severity=severity)
    note = Notification("pager", 0, "g", {}, (alert,), (), T0)
    await PagerDutySink(PagerDutySinkConfig("k", http.url)).send(note)
    assert http.requests[0]["json"]["payload"]["severity"] == expected


# ------------------------------------------------------------------ webhook and retry
@pytest.mark.anyio
async def test_webhook_posts_the_group_document(http: Recorder) -> None:
    note = notification()
    sink = WebhookSink(WebhookSinkConfig(f"{http.url}/hook",
                                         {"Authorization": "Bearer t0k3n"}))
    await sink.send(note)
    [request] = http.requests
    assert request["path"] == "/hook"
    assert request["headers"]["Authorization"] == "Bearer t0k3n"
    doc = request["json"]
    assert doc["status"] == "firing" and doc["receiver"] == "pager"
    assert doc["group_labels"] == {"host": "gpu-node-1"}
    assert [a["fingerprint"] for a in doc["alerts"]] == ["fp-crit", "fp-warn"]
    assert doc["alerts"][0] == note.firing[0].to_dict()


@pytest.mark.anyio
async def test_http_retry_on_5xx_and_429_but_not_4xx(http: Recorder) -> None:
    sink = WebhookSink(WebhookSinkConfig(http.url))
    policy = RetryPolicy(attempts=5, initial_backoff_s=0.01, max_backoff_s=0.05)
    http.script = [(503, {}), (429, {"Retry-After": "0"}), (500, {}), (200, {})]
    assert await send_with_retry(sink, notification(), policy, no_sleep) == 4
    assert len(http.requests) == 4
    http.requests.clear()
    http.script = [(400, {}), (200, {})]
    with pytest.raises(SinkError, match="HTTP 400") as info:
        await send_with_retry(sink, notification(), policy, no_sleep)
    assert not info.value.recoverable and len(http.requests) == 1
    http.script = [(429, {"Retry-After": "7"})]
    with pytest.raises(SinkError) as info:
        await sink.send(notification())
    assert info.value.recoverable and info.value.retry_after == 7.0


@pytest.mark.anyio
async def test_connection_refused_and_timeout_are_recoverable(http: Recorder) -> None:
    refused = WebhookSink(WebhookSinkConfig(f"http://127.0.0.1:{free_port()}/x", {}, 2.0))
    with pytest.raises(SinkError) as info:
        await refused.send(notification())
    assert info.value.recoverable
    http.delay = 1.0
    slow = WebhookSink(WebhookSinkConfig(http.url, {}, 0.2))
    with pytest.raises(SinkError, match=r"no answer in 0\.2 s") as info:
        await slow.send(notification())
    assert info.value.recoverable


# ------------------------------------------------------------------ exec
CHILD = """
import json, os, sys
doc = sys.stdin.read()
with open(sys.argv[1], "w") as out:
    json.dump({"stdin": doc, "env": {k: v for k, v in os.environ.items()
                                     if k.startswith("PRISM_")}, "argv": sys.argv[1:]}, out)
sys.exit(int(sys.argv[2]))
"""


@pytest.mark.anyio
async def test_exec_sink_gets_the_payload_on_stdin(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / "out.json"
    note = notification()
    sink = ExecSink(ExecSinkConfig((sys.executable, str(script), str(out), "0", "a b; rm -rf x")))
    await sink.send(note)
    seen = json.loads(out.read_text())
    assert json.loads(seen["stdin"]) == json.loads(json.dumps(note.to_doc()))
    assert seen["argv"] == [str(out), "0", "a b; rm -rf x"]  # no shell: passed verbatim
    assert seen["env"] == {"PRISM_RECEIVER": "pager", "PRISM_STATUS": "firing",
                           "PRISM_GROUP_KEY": note.group_key}


@pytest.mark.anyio
async def test_exec_sink_failures(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = str(tmp_path / "out.json")
    with pytest.raises(SinkError, match="exit status 3") as info:
        await ExecSink(ExecSinkConfig((sys.executable, str(script), out, "3"))).send(
            notification())
    assert not info.value.recoverable
    with pytest.raises(SinkError, match="exit status 75") as info:
        await ExecSink(ExecSinkConfig((sys.executable, str(script), out, "75"))).send(
            notification())
    assert info.value.recoverable
    sleeper = ExecSink(ExecSinkConfig(
        (sys.executable, "-c", "import time, sys; sys.stdin.read(); time.sleep(30)"), 0.3))
    started = time.monotonic()
    with pytest.raises(SinkError, match="timeout") as info:
        await sleeper.send(notification())
    assert info.value.recoverable and time.monotonic() - started < 10
    with pytest.raises(SinkError) as info:
        await ExecSink(ExecSinkConfig((str(tmp_path / "missing-program"),))).send(
            notification())
    assert not info.value.recoverable


# ------------------------------------------------------------------ file and stdout
@pytest.mark.anyio
async def test_file_sink_appends_json_lines_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "alerts.jsonl"
    sink = FileSink(FileSinkConfig(str(path)))
    await sink.send(notification())
    await sink.send(notification("resolved"))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [d["status"] for d in lines] == ["firing", "resolved"]
    assert lines[1]["alerts"][0]["fingerprint"] == "fp-warn"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    missing = FileSink(FileSinkConfig(str(tmp_path / "no" / "dir" / "x.jsonl")))
    with pytest.raises(SinkError, match="No such file") as info:
        await missing.send(notification())
    assert not info.value.recoverable


@pytest.mark.anyio
async def test_stdout_sink_prints_one_line() -> None:
    stream = io.StringIO()
    note = notification()
    await StdoutSink(stream=stream).send(note)
    [line] = stream.getvalue().splitlines()
    assert json.loads(line) == json.loads(json.dumps(note.to_doc()))
