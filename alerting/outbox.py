"""The durable alert outbox: a small SQLite file, so an alert survives broker and process loss.

Every alert is written here before it is sent and deleted only when the broker
acknowledged it (QoS 1 PUBACK). Rows are numbered by an AUTOINCREMENT sequence, so the
backlog is replayed in the order the alerts were produced, even across restarts.

The file is opened in WAL mode with ``synchronous=NORMAL``: a commit survives the crash or
SIGKILL of this process (the case that matters on a monitored host) without an fsync per
alert; only an OS crash or power loss can lose the last commits. A file that is not a
readable SQLite outbox is never deleted: it is moved aside to ``<path>.corrupt-<time>``
and a fresh outbox is started, with the reason in :attr:`Outbox.notice`.

Methods are blocking and thread-safe (one lock). ``put_many`` and ``ack_many`` of a few
alerts run on the publisher's event loop: a commit is a write of WAL frames to the page
cache (~25-40 µs), never an fsync, because SQLite's automatic checkpoint (which fsyncs,
inside whichever commit crosses the threshold) is off; the publisher calls
:meth:`Outbox.checkpoint` from a worker thread instead, on a connection of its own, so
the hot path never waits for the disk.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from alerting.errors import AlertingError
from alerting.schema import Alert, AlertSchemaError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    fingerprint TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rejected (
    seq INTEGER PRIMARY KEY,
    payload BLOB NOT NULL,
    reason TEXT NOT NULL
);
"""
_APP_ID = 0x4C505258  # "LPRX": marks the file as a LatencyPrism outbox


class OutboxError(AlertingError):
    """The outbox cannot be used at all (e.g. its folder is not writable)."""


class Outbox:
    """A durable FIFO of alerts waiting for the broker's acknowledgement.

    Args:
        path: the SQLite file (created with mode 0600, its folder with parents).

    Raises:
        OutboxError: the file cannot be created or opened (permissions, missing disk).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.notice = ""
        """Set when the previous file was unreadable and was moved aside (one line)."""
        self._lock = threading.Lock()
        self._closed = False
        self._commits = 0  # since the last checkpoint
        self._checkpointer: sqlite3.Connection | None = None
        self._checkpoint_lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = self._open_or_recover()
        except OSError as exc:
            raise OutboxError(f"cannot open alert outbox {self.path}: {exc.strerror or exc}"
                              ) from None

    # ------------------------------------------------------------------ opening
    def _open_or_recover(self) -> sqlite3.Connection:
        try:
            return self._open()
        except sqlite3.DatabaseError as exc:
            reason = str(exc)
        aside = self.path.with_name(
            f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                src.replace(Path(f"{aside}{suffix}"))
        self.notice = (f"alert outbox {self.path} was unreadable ({reason}); moved it to "
                       f"{aside} and started a fresh outbox")
        try:
            return self._open()
        except sqlite3.DatabaseError as exc:
            raise OutboxError(f"cannot create alert outbox {self.path}: {exc}") from None

    def _open(self) -> sqlite3.Connection:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        os.chmod(self.path, 0o600)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            app_id = db.execute("PRAGMA application_id").fetchone()[0]
            tables = {r[0] for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type='table'")}
            if app_id not in (0, _APP_ID) or (tables and "outbox" not in tables):
                raise sqlite3.DatabaseError(
                    "not a LatencyPrism outbox (another application's SQLite file)")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA wal_autocheckpoint=0")  # see checkpoint()
            db.execute(f"PRAGMA application_id={_APP_ID}")
            db.executescript(_SCHEMA)
            db.execute("SELECT count(*) FROM outbox").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    # ------------------------------------------------------------------ API
    def put(self, alert: Alert) -> int:
        """Append one alert durably; returns its sequence number."""
        return self.put_many([alert])[0]

    def put_many(self, alerts: Iterable[Alert]) -> list[int]:
        """Append alerts in one transaction (one commit for a burst); returns their seqs."""
        now = time.time_ns()
        rows = [(a.fingerprint, a.to_json(), now) for a in alerts]
        seqs: list[int] = []
        with self._lock:
            db = self._live()
            db.execute("BEGIN IMMEDIATE")
            try:
                for row in rows:
                    cur = db.execute(
                        "INSERT INTO outbox (fingerprint, payload, created_ns) VALUES (?,?,?)",
                        row)
                    assert cur.lastrowid is not None
                    seqs.append(cur.lastrowid)
                db.execute("COMMIT")
                self._commits += 1
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return seqs

    def pending(self, limit: int = 1000, after: int = 0) -> list[tuple[int, Alert]]:
        """Up to ``limit`` unacknowledged alerts with seq > ``after``, oldest first.

        A row that no longer decodes (written by an incompatible version) is moved to the
        ``rejected`` table with its reason — kept, never silently deleted — and skipped.
        """
        out: list[tuple[int, Alert]] = []
        with self._lock:
            db = self._live()
            rows = db.execute("SELECT seq, payload FROM outbox WHERE seq > ? ORDER BY seq "
                              "LIMIT ?", (after, limit)).fetchall()
            for seq, payload in rows:
                try:
                    out.append((seq, Alert.from_json(payload)))
                except AlertSchemaError as exc:
                    db.execute("BEGIN IMMEDIATE")
                    db.execute("INSERT OR REPLACE INTO rejected VALUES (?,?,?)",
                               (seq, payload, str(exc)))
                    db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
                    db.execute("COMMIT")
                    self.notice = f"outbox row {seq} no longer decodes ({exc}); kept in " \
                                  "table 'rejected'"
        return out

    def ack(self, seq: int) -> None:
        """Forget one alert the broker acknowledged (unknown seqs are ignored)."""
        self.ack_many([seq])

    def ack_many(self, seqs: Iterable[int]) -> None:
        """Forget several acknowledged alerts in one transaction."""
        rows = [(s,) for s in seqs]
        if not rows:
            return
        with self._lock:
            db = self._live()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("DELETE FROM outbox WHERE seq = ?", rows)
                db.execute("COMMIT")
                self._commits += 1
            except BaseException:
                db.execute("ROLLBACK")
                raise

    CHECKPOINT_EVERY = 256
    """Commits between checkpoints (each commit adds at least one 4 KiB WAL frame)."""

    @property
    def checkpoint_due(self) -> bool:
        """True once enough commits went to the WAL since the last :meth:`checkpoint`."""
        return self._commits >= self.CHECKPOINT_EVERY

    def checkpoint(self) -> None:
        """Copy the WAL into the database file and fsync it (blocking: call it off the
        event loop). Its own connection: ``put``/``ack`` go on meanwhile (WAL lets one
        writer and a checkpoint run together)."""
        with self._checkpoint_lock:
            if self._closed:
                return
            self._commits = 0
            if self._checkpointer is None:
                self._checkpointer = sqlite3.connect(self.path, check_same_thread=False,
                                                     isolation_level=None)
            with contextlib.suppress(sqlite3.OperationalError):  # busy: the next one
                self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def __len__(self) -> int:
        with self._lock:
            return int(self._live().execute("SELECT count(*) FROM outbox").fetchone()[0])

    def close(self) -> None:
        """Close the file (idempotent); pending alerts stay for the next run."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with self._checkpoint_lock:
                if self._checkpointer is not None:
                    self._checkpointer.close()
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()

    def _live(self) -> sqlite3.Connection:
        if self._closed:
            raise OutboxError(f"alert outbox {self.path} is closed")
        return self._db

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
