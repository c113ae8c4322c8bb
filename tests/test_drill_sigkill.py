"""Drill: ``prism watch`` killed with SIGKILL mid-run (no handler runs, nothing is flushed).

Real parts: the C target (``pl_work`` every 2 ms), ``prism watch`` as a child process with
real uprobes, a real Mosquitto broker, the real SQLite history and outbox. An SLO the
target cannot meet (``p99 <= 1ms`` on 2-ms iterations) fires within a second or two.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from alerting.broker import EmbeddedBroker
from alerting.config import BrokerConfig
from tests.conftest import CTarget
from tests.drill_helpers import (
    changed_code,
    kill_hard,
    start_watch,
    tracefs_uprobes,
    wait_for,
)
from tests.mqtt_fixtures import Subscriber, broker  # noqa: F401  (the fixture)

IMPOSSIBLE_SLO = "p99 <= 1ms over 1s"
KEEPALIVE_S = BrokerConfig(url="mqtt://127.0.0.1:1").keepalive_s


def _integrity(path: Path) -> str:
    """``PRAGMA integrity_check`` of a file another process wrote (read-only)."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


def _rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            return db.execute(sql).fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []


def _docs(sub: Subscriber) -> list[dict[str, object]]:
    return [json.loads(bytes(m.payload)) for m in sub.messages]  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_sigkill_leaves_a_last_will_a_sound_history_and_no_breakpoint(
        broker: EmbeddedBroker, ctarget: CTarget, ctarget_exe: Path,  # noqa: F811
        tmp_path: Path) -> None:
    ctarget.cmd("spin_start 2000")
    db = tmp_path / "history.sqlite"
    async with Subscriber(broker.url, "latencyprism/v1/+/status") as status, \
            Subscriber(broker.url, "latencyprism/v1/+/+/alert") as alerts:
        watch = start_watch(ctarget.pid, tmp_path, "--broker", broker.url, "--db", str(db),
                            "--slo", IMPOSSIBLE_SLO)
        err = tmp_path / "watch.err"
        try:
            await wait_for("the probes' int3 in the target's text",
                     lambda: "pl_work" in changed_code(ctarget.pid, ctarget_exe),
                     proc=watch, log=err)
            await wait_for("the monitor online", lambda: any(
                d.get("state") == "online" for d in _docs(status)), proc=watch, log=err)
            await alerts.wait_for(1, timeout=30)
            assert _docs(alerts) and _docs(alerts)[0]["source"] == "slo", err.read_text()
            await wait_for("iterations in the history", lambda: bool(
                _rows(db, "SELECT 1 FROM iterations LIMIT 1")), proc=watch, log=err)
            seen = len(status.messages)
            watch.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            watch.wait(10)
        finally:
            kill_hard(watch)
        # the broker publishes the will: the socket closed without a DISCONNECT
        while len(status.messages) == seen and time.monotonic() - killed_at < 1.5 * KEEPALIVE_S:
            await status.wait_for(seen + 1, timeout=0.1)
        will = _docs(status)[seen:]
        assert will and will[0]["state"] == "offline", _docs(status)
        assert will[0]["reason"] == "connection lost" and will[0]["pid"] == watch.pid

    assert _integrity(db) == "ok"
    assert _rows(db, "SELECT count(*) FROM iterations")[0][0] > 0
    assert _integrity(tmp_path / "state" / "latencyprism" / "outbox.sqlite") == "ok"
    # the kernel dropped every uprobe with the monitor's perf fds: text as on disk again
    assert changed_code(ctarget.pid, ctarget_exe) == {}
    assert tracefs_uprobes(ctarget_exe) in (None, [])
    assert ctarget.cmd("work 3") >= 0  # and the target runs on untouched


@pytest.mark.anyio
async def test_alerts_not_acknowledged_before_a_sigkill_go_out_on_the_next_start(
        broker: EmbeddedBroker, ctarget: CTarget, tmp_path: Path) -> None:  # noqa: F811
    """The broker is down while the SLO fires: the alert waits in the durable outbox,
    the monitor is killed, the broker comes back, the next ``prism watch`` (no SLO now,
    so it raises nothing new) delivers exactly the alert that was waiting."""
    ctarget.cmd("spin_start 2000")
    outbox = tmp_path / "state" / "latencyprism" / "outbox.sqlite"
    err = tmp_path / "watch.err"
    broker.stop()
    first = start_watch(ctarget.pid, tmp_path, "--broker", broker.url, "--no-history",
                        "--slo", IMPOSSIBLE_SLO)
    try:
        await wait_for("the SLO alert queued in the outbox", lambda: bool(
            _rows(outbox, "SELECT payload FROM outbox")), proc=first, log=err)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        kill_hard(first)
    waiting = [json.loads(p) for (p,) in _rows(outbox, "SELECT payload FROM outbox")]
    assert waiting and {a["source"] for a in waiting} == {"slo"}

    broker.start()
    async with Subscriber(broker.url, "latencyprism/v1/+/+/alert") as alerts:
        second = start_watch(ctarget.pid, tmp_path, "--broker", broker.url, "--no-history")
        try:
            await alerts.wait_for(len(waiting), timeout=30)
            await wait_for("the outbox emptied by the acknowledgements", lambda: not _rows(
                outbox, "SELECT seq FROM outbox"), proc=second, log=err)
        finally:
            second.send_signal(signal.SIGINT)
            try:
                second.wait(30)
            finally:
                kill_hard(second)
        delivered = _docs(alerts)
    assert [a["id"] for a in delivered] == [a["id"] for a in waiting], err.read_text()
    assert second.returncode == 0, err.read_text()
