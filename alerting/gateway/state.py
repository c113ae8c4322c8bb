"""The gateway's SQLite state: silences, the notification log and the firing alerts.

A restart reads them back, so it neither re-pages (the notification log says what each
sink was last sent, and when) nor forgets (silences; alerts still firing, which a later
``resolved`` must close). The file is created with mode 0600 and uses WAL, so the
``prism gateway silence`` commands can write while a gateway runs. Calls block: the
service runs them in a thread (docs/architecture.md §Rules 3).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from alerting.gateway.errors import GatewayStateError
from alerting.gateway.matchers import Matcher
from alerting.gateway.pipeline import NflogEntry, NflogKey, Notification, Silence
from alerting.schema import Alert, AlertSchemaError

APPLICATION_ID = 0x50524757  # "PRGW"
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS silences (
    id TEXT PRIMARY KEY, matchers TEXT NOT NULL, starts_at REAL NOT NULL,
    ends_at REAL NOT NULL, created_by TEXT NOT NULL, comment TEXT NOT NULL,
    created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS nflog (
    group_key TEXT NOT NULL, receiver TEXT NOT NULL, sink INTEGER NOT NULL,
    firing TEXT NOT NULL, resolved TEXT NOT NULL, sent_at REAL NOT NULL,
    PRIMARY KEY (group_key, receiver, sink));
CREATE TABLE IF NOT EXISTS sent (
    id INTEGER PRIMARY KEY AUTOINCREMENT, sent_at REAL NOT NULL, receiver TEXT NOT NULL,
    sink INTEGER NOT NULL, group_key TEXT NOT NULL, fingerprint TEXT NOT NULL,
    status TEXT NOT NULL, alert_id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS sent_fingerprint ON sent (fingerprint, sent_at);
CREATE TABLE IF NOT EXISTS alerts (
    fingerprint TEXT PRIMARY KEY, payload BLOB NOT NULL, updated_at REAL NOT NULL);
"""


class GatewayState:
    """One owner of the state database; thread-safe, idempotent :meth:`close`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
        except OSError as exc:
            raise GatewayStateError(f"{self.path}: cannot open the gateway state: "
                                    f"{exc.strerror or exc}") from None
        try:
            db = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False,
                                 isolation_level=None)
        except sqlite3.Error as exc:
            raise GatewayStateError(f"{self.path}: cannot open the gateway state: {exc}") from None
        try:
            self._init(db)
        except sqlite3.DatabaseError as exc:
            db.close()
            raise GatewayStateError(
                f"{self.path}: not a usable gateway state database ({exc}); move it away "
                "to start afresh (silences and the notification log are lost)") from None
        self._db = db

    def _init(self, db: sqlite3.Connection) -> None:
        app = db.execute("PRAGMA application_id").fetchone()[0]
        tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app != APPLICATION_ID and tables:
            raise sqlite3.DatabaseError("another program's database")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"schema version {version} is newer than this "
                                        f"gateway's {SCHEMA_VERSION}")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {check}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA application_id={APPLICATION_ID}")
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        os.chmod(self.path, 0o600)

    # ------------------------------------------------------------------ plumbing
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise GatewayStateError(f"{self.path}: the gateway state is closed")
        return self._db

    def _run(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._conn().execute(sql, params).fetchall()
            except sqlite3.DatabaseError as exc:
                raise GatewayStateError(f"{self.path}: {exc}") from None

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> GatewayState:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ silences
    def add_silence(self, matchers: Sequence[Matcher], starts_at: float, ends_at: float,
                    created_by: str, comment: str, now: float) -> Silence:
        """Store a new silence; returns it with its id."""
        if not matchers:
            raise GatewayStateError("a silence needs at least one matcher")
        if ends_at <= starts_at:
            raise GatewayStateError("a silence must end after it starts")
        silence = Silence(uuid.uuid4().hex[:12], tuple(matchers), starts_at, ends_at,
                          created_by, comment)
        self._run("INSERT INTO silences VALUES (?, ?, ?, ?, ?, ?, ?)",
                  (silence.id, json.dumps([m.to_dict() for m in matchers]), starts_at,
                   ends_at, created_by, comment, now))
        return silence

    def silences(self, now: float | None = None, *, include_expired: bool = True
                 ) -> list[Silence]:
        """Silences by start time (only those not yet expired at ``now`` when asked)."""
        rows = self._run("SELECT id, matchers, starts_at, ends_at, created_by, comment "
                         "FROM silences ORDER BY starts_at, id")
        out = [Silence(r[0], tuple(Matcher.from_dict(m) for m in json.loads(r[1])),
                       r[2], r[3], r[4], r[5]) for r in rows]
        if not include_expired and now is not None:
            out = [s for s in out if s.ends_at > now]
        return out

    def expire_silence(self, silence_id: str, now: float) -> Silence:
        """End a silence now (a unique id prefix is enough); returns it as it was.

        Raises:
            GatewayStateError: no silence, or several, start with ``silence_id``.
        """
        found = [s for s in self.silences() if s.id.startswith(silence_id)] if silence_id else []
        if not found:
            raise GatewayStateError(f"no silence with id {silence_id!r} "
                                    "(prism gateway silence list shows them)")
        if len(found) > 1:
            raise GatewayStateError(f"silence id {silence_id!r} is ambiguous: "
                                    f"{', '.join(s.id for s in found)}")
        silence = found[0]
        if silence.ends_at > now:
            self._run("UPDATE silences SET ends_at = ? WHERE id = ?",
                      (max(now, silence.starts_at), silence.id))
        return silence

    # ------------------------------------------------------------------ notification log
    def record(self, notification: Notification, entry: NflogEntry) -> None:
        """Persist a delivered notification: its nflog entry and one row per alert."""
        group, receiver, sink = notification.key
        with self._lock:
            db = self._conn()
            try:
                with db:
                    db.execute("BEGIN")
                    db.execute("INSERT OR REPLACE INTO nflog VALUES (?, ?, ?, ?, ?, ?)",
                               (group, receiver, sink, json.dumps(sorted(entry.firing)),
                                json.dumps(sorted(entry.resolved)), entry.sent_at))
                    db.executemany(
                        "INSERT INTO sent (sent_at, receiver, sink, group_key, fingerprint, "
                        "status, alert_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [(entry.sent_at, receiver, sink, group, a.fingerprint, a.status, a.id)
                         for a in (*notification.firing, *notification.resolved)])
            except sqlite3.DatabaseError as exc:
                raise GatewayStateError(f"{self.path}: {exc}") from None

    def nflog(self) -> dict[NflogKey, NflogEntry]:
        """Every notification-log entry."""
        rows = self._run("SELECT group_key, receiver, sink, firing, resolved, sent_at "
                         "FROM nflog")
        return {(r[0], r[1], r[2]): NflogEntry(frozenset(json.loads(r[3])),
                                               frozenset(json.loads(r[4])), r[5])
                for r in rows}

    def sent_log(self, fingerprint: str | None = None) -> list[dict[str, Any]]:
        """What was sent to whom, oldest first (optionally for one fingerprint)."""
        sql = ("SELECT sent_at, receiver, sink, group_key, fingerprint, status, alert_id "
               "FROM sent")
        params: tuple[Any, ...] = ()
        if fingerprint is not None:
            sql += " WHERE fingerprint = ?"
            params = (fingerprint,)
        rows = self._run(sql + " ORDER BY id", params)
        keys = ("sent_at", "receiver", "sink", "group_key", "fingerprint", "status",
                "alert_id")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    # ------------------------------------------------------------------ alerts
    def save_alert(self, alert: Alert, now: float) -> None:
        """Keep a firing alert; forget one that resolved."""
        if alert.status == "firing":
            self._run("INSERT OR REPLACE INTO alerts VALUES (?, ?, ?)",
                      (alert.fingerprint, alert.to_json(), now))
        else:
            self._run("DELETE FROM alerts WHERE fingerprint = ?", (alert.fingerprint,))

    def firing_alerts(self) -> list[Alert]:
        """The alerts still firing when the gateway last stopped (unreadable rows skipped)."""
        out = []
        for (payload,) in self._run("SELECT payload FROM alerts ORDER BY updated_at"):
            try:
                out.append(Alert.from_json(payload))
            except AlertSchemaError:
                continue
        return out

    def prune(self, before: float) -> None:
        """Drop notification-log rows and expired silences older than ``before``."""
        for sql in ("DELETE FROM nflog WHERE sent_at < ?", "DELETE FROM sent WHERE sent_at < ?",
                    "DELETE FROM silences WHERE ends_at < ?"):
            self._run(sql, (before,))

