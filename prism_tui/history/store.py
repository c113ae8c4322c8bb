"""The history database: one owner (:class:`HistoryStore`) of one SQLite file in WAL mode.

All SQLite work runs on aiosqlite's thread; merging digests for queries runs in
``asyncio.to_thread``; the loop only moves data.

Clocks
    Window starts, iteration and alert ``*_ns`` fields from the engine are CLOCK_MONOTONIC
    ns (the probes' clock). Monotonic time restarts at every boot and means nothing to a
    user asking for "the last hour", so every row also gets a wall-clock (CLOCK_REALTIME,
    Unix epoch ns) column ``wall_ns``, computed at write time as
    ``mono_ns + (wall_clock() - mono_clock())`` — the offset is sampled for every batch,
    so it follows NTP steps and suspends (a window written a second after it closed is
    placed within that error). Each process that writes gets a ``sessions`` row with the
    (monotonic, realtime) pair at its first write and the kernel's ``boot_id``, so
    monotonic values can still be compared within one boot. All query ranges
    (``since_ns``/``until_ns``) and the ``at_ns`` of alerts, targets and probe decisions
    are wall-clock ns.

Schema versions
    ``PRAGMA user_version`` is the schema version; :data:`MIGRATIONS` is an ordered list of
    ``(version, description, statements)``; opening applies the missing ones, each in one
    transaction together with its ``user_version`` bump. A file from a newer version, a
    foreign SQLite file, or a corrupt file raises :class:`HistoryError` and is never
    modified.

    * v1: sessions, windows, iterations, alerts, targets, probe_decisions.
    * v2: ``iterations.stages``, the iteration's exclusive time per stage as JSON
      ``{stage: ms}`` (``host`` is the time no span covered); rows written before it
      read back as ``{}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiosqlite

from prism_tui.engine.sketches import SeriesKey, Window, digest_from_bytes, merge_digests
from prism_tui.scheduling import follow_priority, leave_realtime, realtime_priority

Migration = tuple[int, str, tuple[str, ...]]

MIGRATIONS: tuple[Migration, ...] = (
    (1, "initial schema", (
        """CREATE TABLE sessions (
            id INTEGER PRIMARY KEY,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            boot_id TEXT,
            mono_ns INTEGER NOT NULL,
            wall_ns INTEGER NOT NULL)""",
        """CREATE TABLE windows (
            series TEXT NOT NULL,
            stage TEXT NOT NULL,
            device TEXT NOT NULL,
            phase TEXT NOT NULL,
            start_ns INTEGER NOT NULL,
            wall_ns INTEGER NOT NULL,
            width_ns INTEGER NOT NULL,
            session INTEGER REFERENCES sessions(id),
            digest BLOB NOT NULL,
            count INTEGER NOT NULL,
            sum REAL NOT NULL,
            min REAL NOT NULL,
            max REAL NOT NULL)""",
        "CREATE INDEX windows_series_start ON windows(series, start_ns)",
        "CREATE INDEX windows_wall ON windows(wall_ns)",
        """CREATE TABLE iterations (
            target TEXT NOT NULL,
            pid INTEGER NOT NULL,
            device TEXT NOT NULL,
            phase TEXT NOT NULL,
            idx INTEGER NOT NULL,
            start_ns INTEGER NOT NULL,
            end_ns INTEGER NOT NULL,
            wall_ns INTEGER NOT NULL,
            session INTEGER REFERENCES sessions(id),
            latency_ms REAL NOT NULL,
            features TEXT NOT NULL,
            predicted_ms REAL,
            error REAL)""",
        "CREATE INDEX iterations_wall ON iterations(wall_ns)",
        """CREATE TABLE alerts (
            rowid INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            fingerprint TEXT,
            status TEXT,
            severity TEXT,
            stage TEXT,
            device TEXT,
            phase TEXT,
            target_pid INTEGER,
            summary TEXT,
            iteration_end_ns INTEGER,
            json TEXT NOT NULL,
            at_ns INTEGER NOT NULL)""",
        "CREATE INDEX alerts_at ON alerts(at_ns)",
        """CREATE TABLE targets (
            pid INTEGER NOT NULL,
            name TEXT NOT NULL,
            profile TEXT,
            device TEXT NOT NULL,
            first_seen_ns INTEGER NOT NULL,
            last_seen_ns INTEGER NOT NULL,
            UNIQUE (pid, name, device))""",
        """CREATE TABLE probe_decisions (
            target_pid INTEGER NOT NULL,
            probe TEXT NOT NULL,
            status TEXT NOT NULL,
            reason TEXT,
            at_ns INTEGER NOT NULL)""",
        "CREATE INDEX probe_decisions_at ON probe_decisions(at_ns)",
    )),
    (2, "iteration stages", (
        "ALTER TABLE iterations ADD COLUMN stages TEXT NOT NULL DEFAULT '{}'",
    )),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
TABLES = ("sessions", "windows", "iterations", "alerts", "targets", "probe_decisions")
_MAGIC = b"SQLite format 3\x00"


class HistoryError(Exception):
    """A history database that cannot be used; one clear line for the user (exit code 2)."""

    exit_code = 2


class HistoryPermissionError(HistoryError):
    """The history file or its directory is not ours to read or create (exit code 3)."""

    exit_code = 3


def _refused(path: Path, exc: OSError) -> HistoryError:
    """The typed error for an OSError on ``path``: a refusal is exit 3, the rest exit 2."""
    if isinstance(exc, PermissionError):
        return HistoryPermissionError(
            f"{path}: permission denied; run as the user who owns it or pass a --db "
            f"this user may read and write")
    return HistoryError(f"{path}: cannot read history database: {exc.strerror}")


@dataclass(frozen=True, slots=True)
class IterationRecord:
    """One iteration as stored (``*_ns`` are CLOCK_MONOTONIC).

    ``stages`` is the iteration's exclusive time per stage in ms (``host``: what no span
    covered), so a slow stored iteration still says where its time went.
    """

    target: str
    pid: int
    device: str
    phase: str
    index: int
    start_ns: int
    end_ns: int
    latency_ms: float
    features: Mapping[str, float] = field(default_factory=dict)
    predicted_ms: float | None = None
    error: float | None = None
    stages: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TargetRecord:
    """A watched process as stored; ``*_seen_ns`` are wall-clock ns.

    ``last_seen_ns`` advances while the process stays attached (see
    :meth:`HistoryStore.touch_targets`), so retention keeps a long-watched target.
    """

    pid: int
    name: str
    profile: str | None
    device: str
    first_seen_ns: int
    last_seen_ns: int


@dataclass(frozen=True, slots=True)
class ProbeDecisionRecord:
    """Whether one probe was attached to a target, and why not; ``at_ns`` is wall clock."""

    target_pid: int
    probe: str
    status: str
    reason: str | None
    at_ns: int


@dataclass(frozen=True, slots=True)
class QuantileRow:
    """Quantiles (ms) of one series over ``[start_ns, start_ns + step)`` (wall-clock ns)."""

    series: str
    start_ns: int
    count: int
    p50: float
    p90: float
    p99: float
    p999: float
    max: float

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return {"series": self.series, "start_ns": self.start_ns, "count": self.count,
                "p50": self.p50, "p90": self.p90, "p99": self.p99, "p999": self.p999,
                "max": self.max}


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _not_a_db(path: Path, why: str) -> HistoryError:
    return HistoryError(
        f"{path}: not a LatencyPrism history database ({why}); it was left untouched — "
        f"move it aside (mv '{path}' '{path}.bad') or pass another --db")


def _check_file(path: Path) -> None:
    """Cheap checks that never write: header magic, truncation. Raises HistoryError."""
    if path.is_dir():
        raise HistoryError(f"{path}: is a directory, not a history database file")
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            header = f.read(100)
    except OSError as exc:
        raise _refused(path, exc) from exc
    if size == 0:
        return  # SQLite treats an empty file as an empty database
    if len(header) < 100 or not header.startswith(_MAGIC):
        raise _not_a_db(path, "file is not a database")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    valid = header[24:28] == header[92:96]  # change counter == version-valid-for
    wal = path.with_name(path.name + "-wal")
    wal_size = wal.stat().st_size if wal.exists() else 0
    if valid and pages and wal_size == 0 and size < pages * page_size:
        raise _not_a_db(path, f"file is truncated: {size} of {pages * page_size} bytes")


def _probe_readonly(path: Path, latest: int) -> int:
    """Read the schema version without writing; raise HistoryError on anything odd."""
    uri = f"file:{path}?mode=ro"
    try:
        con = sqlite3.connect(uri, uri=True)
        try:
            version = int(con.execute("PRAGMA user_version").fetchone()[0])
            tables = {r[0] for r in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.OperationalError as exc:  # locked, unreadable...: the file may be fine
        raise HistoryError(f"{path}: cannot open history database: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        raise _not_a_db(path, str(exc)) from exc
    if version > latest:
        raise HistoryError(
            f"{path}: history schema v{version} is newer than this LatencyPrism "
            f"(knows up to v{latest}); upgrade LatencyPrism or pass another --db")
    foreign = sorted(t for t in tables if not t.startswith("sqlite_"))
    if version == 0 and foreign:
        raise _not_a_db(path, f"schema version 0 with foreign tables: {', '.join(foreign)}")
    return version


async def _rollback(db: aiosqlite.Connection) -> None:
    """Roll back the open transaction, if SQLite has not already (it does on a full disk:
    a second ROLLBACK would then hide the real error behind "no transaction is active")."""
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            await db.execute("ROLLBACK")


def _create_private(path: Path) -> None:
    """Create ``path`` with mode 0600 whatever the umask (parents 0700)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise _refused(path, exc) from exc
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    except PermissionError as exc:
        raise _refused(path, exc) from exc
    except OSError as exc:
        raise HistoryError(f"{path}: cannot create history database: {exc.strerror}") from exc
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class HistoryStore:
    """Owner of one history database file (async context manager).

    Args:
        path: the SQLite file.
        create: create the file (mode 0600) when missing; otherwise a missing file is a
            HistoryError (for read-only commands such as ``prism history``).
        mono_clock / wall_clock: CLOCK_MONOTONIC and CLOCK_REALTIME in ns (injected).
        migrations: ordered schema migrations (tests pass extra ones).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        mono_clock: Callable[[], int] = time.monotonic_ns,
        wall_clock: Callable[[], int] = time.time_ns,
        migrations: Sequence[Migration] = MIGRATIONS,
        busy_timeout_ms: int = 5000,
    ) -> None:
        self.path = Path(path)
        self._create = create
        self._mono = mono_clock
        self._wall = wall_clock
        self._migrations = tuple(sorted(migrations, key=lambda m: m[0]))
        self._busy = busy_timeout_ms
        self._db: aiosqlite.Connection | None = None
        self._session: int | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def schema_version(self) -> int:
        """The newest schema version this store migrates to."""
        return self._migrations[-1][0] if self._migrations else 0

    async def open(self) -> HistoryStore:
        """Open (creating and migrating as needed); idempotent. Raises HistoryError."""
        if self._db is not None:
            return self
        if self._closed:
            raise HistoryError(f"{self.path}: history store already closed")
        await asyncio.to_thread(self._precheck)
        priority = realtime_priority()  # the loop's: its SQLite thread runs at it too

        def connect() -> sqlite3.Connection:
            follow_priority(priority)  # runs in aiosqlite's thread, before it connects
            return sqlite3.connect(self.path, isolation_level=None)

        try:
            db = await aiosqlite.Connection(connect, 64)
        except sqlite3.Error as exc:
            raise HistoryError(f"{self.path}: cannot open history database: {exc}") from exc
        try:
            await db.execute(f"PRAGMA busy_timeout = {int(self._busy)}")
            mode = await self._one(db, "PRAGMA journal_mode = WAL")
            if str(mode).lower() != "wal":
                raise HistoryError(f"{self.path}: cannot switch to WAL journal (got {mode})")
            await db.execute("PRAGMA synchronous = NORMAL")
            await self._migrate(db)
        except sqlite3.OperationalError as exc:
            await db.close()
            raise HistoryError(f"{self.path}: cannot open history database: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            await db.close()
            raise _not_a_db(self.path, str(exc)) from exc
        except BaseException:
            await db.close()
            raise
        self._db = db
        return self

    def _precheck(self) -> None:
        try:
            exists = self.path.exists()
        except OSError as exc:  # a directory on the way we may not search
            raise _refused(self.path, exc) from exc
        if not exists:
            if not self._create:
                raise HistoryError(f"{self.path}: no such history database")
            _create_private(self.path)
        _check_file(self.path)
        _probe_readonly(self.path, self.schema_version)

    async def close(self) -> None:
        """Close the connection; idempotent."""
        self._closed = True
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    async def __aenter__(self) -> HistoryStore:
        return await self.open()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    @staticmethod
    async def _one(db: aiosqlite.Connection, sql: str, args: Sequence[Any] = ()) -> Any:
        async with db.execute(sql, args) as cur:
            row = await cur.fetchone()
        return None if row is None else row[0]

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        for version, _desc, statements in self._migrations:
            if int(await self._one(db, "PRAGMA user_version")) >= version:
                continue
            await db.execute("BEGIN IMMEDIATE")
            try:
                # another process may have migrated while we waited for the write lock
                if int(await self._one(db, "PRAGMA user_version")) < version:
                    for sql in statements:
                        await db.execute(sql)
                    await db.execute(f"PRAGMA user_version = {int(version)}")
                await db.execute("COMMIT")
            except BaseException:
                await _rollback(db)
                raise

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise HistoryError(f"{self.path}: history store is not open")
        return self._db

    async def _write(self, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> int:
        """Run ``executemany`` statements in one transaction; returns rows changed."""
        db = self._conn()
        async with self._lock:
            try:
                before = db.total_changes
                await db.execute("BEGIN IMMEDIATE")
                try:
                    for sql, rows in statements:
                        await db.executemany(sql, rows)
                    await db.execute("COMMIT")
                except BaseException:
                    await _rollback(db)
                    raise
                return int(db.total_changes - before)
            except sqlite3.Error as exc:
                raise HistoryError(f"{self.path}: history write failed: {exc}") from exc

    async def _fetch(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        db = self._conn()
        try:
            async with db.execute(sql, args) as cur:
                return list(await cur.fetchall())
        except sqlite3.Error as exc:
            raise HistoryError(f"{self.path}: history read failed: {exc}") from exc

    async def _session_id(self) -> int:
        if self._session is None:
            db = self._conn()
            async with self._lock:
                try:
                    cur = await db.execute(
                        "INSERT INTO sessions(host, pid, boot_id, mono_ns, wall_ns)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (socket.gethostname(), os.getpid(), _boot_id(), self._mono(),
                         self._wall()))
                except sqlite3.Error as exc:
                    raise HistoryError(f"{self.path}: history write failed: {exc}") from exc
                self._session = int(cur.lastrowid or 0)
        return self._session

    def _offset(self) -> int:
        """CLOCK_REALTIME - CLOCK_MONOTONIC now (ns)."""
        return self._wall() - self._mono()

    # -- writes ---------------------------------------------------------------------------

    async def write_windows(self, windows: Iterable[Window]) -> int:
        """Store closed windows (one transaction); returns how many."""
        ws = list(windows)
        if not ws:
            return 0
        session, off = await self._session_id(), self._offset()
        rows = [(w.key.name, w.key.stage, w.key.device, w.key.phase, w.start_ns,
                 w.start_ns + off, w.width_ns, session, w.digest_bytes(), w.count, w.sum,
                 w.min, w.max) for w in ws]
        await self._write([(
            "INSERT INTO windows(series, stage, device, phase, start_ns, wall_ns, width_ns,"
            " session, digest, count, sum, min, max) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            rows)])
        return len(rows)

    async def write_iterations(self, iterations: Iterable[IterationRecord]) -> int:
        """Store iterations (one transaction); returns how many."""
        its = list(iterations)
        if not its:
            return 0
        session, off = await self._session_id(), self._offset()
        rows = [(i.target, i.pid, i.device, i.phase, i.index, i.start_ns, i.end_ns,
                 i.end_ns + off, session, i.latency_ms,
                 json.dumps(dict(i.features), sort_keys=True), i.predicted_ms, i.error,
                 json.dumps(dict(i.stages), sort_keys=True))
                for i in its]
        await self._write([(
            "INSERT INTO iterations(target, pid, device, phase, idx, start_ns, end_ns,"
            " wall_ns, session, latency_ms, features, predicted_ms, error, stages)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)])
        return len(rows)

    async def write_alert(self, alert: Mapping[str, Any], at_ns: int | None = None) -> bool:
        """Store one alert state change (alert JSON, schema 1); a repeated ``id`` is ignored.

        ``at_ns``: wall-clock ns of the change (default: now). Returns whether it was new.
        """
        return await self.write_alerts([alert], at_ns) == 1

    async def write_alerts(self, alerts: Iterable[Mapping[str, Any]],
                           at_ns: int | None = None) -> int:
        """Store alert state changes in one transaction; returns how many were new."""
        at = self._wall() if at_ns is None else at_ns
        rows = []
        for a in alerts:
            target = a.get("target")
            pid = target.get("pid") if isinstance(target, Mapping) else None
            rows.append((str(a.get("id") or uuid.uuid4()), a.get("fingerprint"),
                         a.get("status"), a.get("severity"), a.get("stage"), a.get("device"),
                         a.get("phase"), pid, a.get("summary"), a.get("iteration_end_ns"),
                         json.dumps(dict(a), sort_keys=True, default=str), at))
        if not rows:
            return 0
        return await self._write([(
            "INSERT OR IGNORE INTO alerts(id, fingerprint, status, severity, stage, device,"
            " phase, target_pid, summary, iteration_end_ns, json, at_ns)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)])

    async def write_target(self, pid: int, name: str, profile: str | None, device: str,
                           seen_ns: int | None = None) -> None:
        """Record that a target was seen (first/last seen, wall-clock ns)."""
        at = self._wall() if seen_ns is None else seen_ns
        await self._write([(
            "INSERT INTO targets(pid, name, profile, device, first_seen_ns, last_seen_ns)"
            " VALUES (?,?,?,?,?,?) ON CONFLICT(pid, name, device) DO UPDATE SET"
            " last_seen_ns = max(last_seen_ns, excluded.last_seen_ns),"
            " profile = coalesce(excluded.profile, profile)",
            [(pid, name, profile, device, at, at)])])

    async def touch_targets(self, keys: Iterable[tuple[int, str, str]],
                            seen_ns: int | None = None) -> int:
        """Advance ``last_seen_ns`` of the ``(pid, name, device)`` targets still attached.

        One transaction for them all, meant once per history flush rather than per view;
        a target never written by :meth:`write_target` is left out, and a time earlier
        than the stored one changes nothing. Returns how many rows matched.
        """
        at = self._wall() if seen_ns is None else seen_ns
        rows = [(at, pid, name, device) for pid, name, device in keys]
        if not rows:
            return 0
        return await self._write([(
            "UPDATE targets SET last_seen_ns = max(last_seen_ns, ?)"
            " WHERE pid = ? AND name = ? AND device = ?", rows)])

    async def write_probe_decisions(self, target_pid: int,
                                    decisions: Iterable[tuple[str, str, str | None]],
                                    at_ns: int | None = None) -> int:
        """Record (probe, status, reason) decisions for a target in one transaction."""
        at = self._wall() if at_ns is None else at_ns
        rows = [(target_pid, probe, status, reason, at) for probe, status, reason in decisions]
        if rows:
            await self._write([(
                "INSERT INTO probe_decisions(target_pid, probe, status, reason, at_ns)"
                " VALUES (?,?,?,?,?)", rows)])
        return len(rows)

    async def purge(self, older_than_ns: int | None = None,
                    max_iterations: int | None = None) -> dict[str, int]:
        """Delete rows older than ``older_than_ns`` (wall clock) and all but the newest
        ``max_iterations`` iterations, in one transaction. Returns deleted rows per table."""
        db = self._conn()
        deleted: dict[str, int] = {}
        async with self._lock:
            try:
                await db.execute("BEGIN IMMEDIATE")
                try:
                    if older_than_ns is not None:
                        for table, col in (("windows", "wall_ns"), ("iterations", "wall_ns"),
                                           ("alerts", "at_ns"), ("probe_decisions", "at_ns"),
                                           ("targets", "last_seen_ns")):
                            cur = await db.execute(
                                f"DELETE FROM {table} WHERE {col} < ?", (older_than_ns,))
                            deleted[table] = deleted.get(table, 0) + cur.rowcount
                    if max_iterations is not None:
                        cur = await db.execute(
                            "DELETE FROM iterations WHERE rowid NOT IN (SELECT rowid FROM"
                            " iterations ORDER BY wall_ns DESC, rowid DESC LIMIT ?)",
                            (max(0, max_iterations),))
                        deleted["iterations"] = deleted.get("iterations", 0) + cur.rowcount
                    await db.execute("COMMIT")
                except BaseException:
                    await _rollback(db)
                    raise
            except sqlite3.Error as exc:
                raise HistoryError(f"{self.path}: history purge failed: {exc}") from exc
        return deleted

    # -- reads ----------------------------------------------------------------------------

    async def _count(self, table: str) -> int:
        rows = await self._fetch(f"SELECT count(*) FROM {table}")
        return int(rows[0][0])

    async def counts(self) -> dict[str, int]:
        """Rows per table."""
        return {t: await self._count(t) for t in TABLES}

    async def journal_mode(self) -> str:
        """The journal mode in effect (``wal``)."""
        return str((await self._fetch("PRAGMA journal_mode"))[0][0])

    async def user_version(self) -> int:
        """``PRAGMA user_version`` (the schema version)."""
        return int((await self._fetch("PRAGMA user_version"))[0][0])

    async def series(self) -> list[SeriesKey]:
        """All series with stored windows."""
        rows = await self._fetch(
            "SELECT DISTINCT stage, device, phase FROM windows ORDER BY stage, device, phase")
        return [SeriesKey(r[0], r[1], r[2]) for r in rows]

    async def quantiles(self, *, stage: str | None = None, device: str | None = None,
                        phase: str | None = None, since_ns: int | None = None,
                        until_ns: int | None = None,
                        step_s: float | None = None) -> list[QuantileRow]:
        """Quantiles per series and step, from merged window digests (not raw values).

        ``since_ns``/``until_ns``: wall-clock ns (window wall start in ``[since, until)``).
        ``step_s``: bucket width; None gives one row per series over the whole range.
        Rows are sorted by (series, start_ns); a bucket's ``start_ns`` is
        ``since + k * step`` (or the first window's wall start without ``since``).
        """
        where: list[str] = ["1"]
        args: list[Any] = []
        for col, val in (("stage", stage), ("device", device), ("phase", phase)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        if since_ns is not None:
            where.append("wall_ns >= ?")
            args.append(since_ns)
        if until_ns is not None:
            where.append("wall_ns < ?")
            args.append(until_ns)
        rows = await self._fetch(
            "SELECT series, wall_ns, digest, count, max FROM windows WHERE "
            + " AND ".join(where) + " ORDER BY series, wall_ns", args)
        # merging digests over a long range is CPU work: a normal-priority thread, not the
        # default executor (whose threads run real-time with ``--realtime``)
        return await asyncio.get_running_loop().run_in_executor(
            _query_pool(), _bucket, self.path, rows, since_ns, step_s)

    async def alerts(self, since_ns: int | None = None,
                     until_ns: int | None = None) -> list[dict[str, Any]]:
        """Alert state changes with ``since <= at_ns < until`` (wall clock), oldest first."""
        rows = await self._fetch(
            "SELECT at_ns, json FROM alerts WHERE at_ns >= ? AND at_ns < ?"
            " ORDER BY at_ns, rowid",
            (-(2**63) if since_ns is None else since_ns,
             2**63 - 1 if until_ns is None else until_ns))
        out = []
        for at, text in rows:
            try:
                alert = json.loads(text)
            except ValueError:
                alert = {"unparsed": text}
            out.append({"at_ns": int(at), "alert": alert})
        return out

    async def targets(self, since_ns: int | None = None) -> list[TargetRecord]:
        """Targets last seen at or after ``since_ns`` (wall clock; None: all), in the
        order they were first seen."""
        rows = await self._fetch(
            "SELECT pid, name, profile, device, first_seen_ns, last_seen_ns FROM targets"
            " WHERE last_seen_ns >= ? ORDER BY first_seen_ns, rowid",
            (-(2**63) if since_ns is None else since_ns,))
        return [TargetRecord(int(r[0]), r[1], r[2], r[3], int(r[4]), int(r[5])) for r in rows]

    async def probe_decisions(self, target_pid: int | None = None,
                              since_ns: int | None = None) -> list[ProbeDecisionRecord]:
        """Probe decisions (of ``target_pid``, or of every target) made at or after
        ``since_ns`` (wall clock; None: all), oldest first."""
        where, args = "at_ns >= ?", [-(2**63) if since_ns is None else since_ns]
        if target_pid is not None:
            where += " AND target_pid = ?"
            args.append(target_pid)
        rows = await self._fetch(
            "SELECT target_pid, probe, status, reason, at_ns FROM probe_decisions WHERE "
            + where + " ORDER BY at_ns, rowid", args)
        return [ProbeDecisionRecord(int(r[0]), r[1], r[2], r[3], int(r[4])) for r in rows]

    async def iterations(self, since_ns: int | None = None, until_ns: int | None = None,
                         limit: int = 10_000) -> list[IterationRecord]:
        """Stored iterations with wall end in ``[since, until)``, oldest first (with their
        stages; ``{}`` for rows written before schema v2)."""
        rows = await self._fetch(
            "SELECT target, pid, device, phase, idx, start_ns, end_ns, latency_ms, features,"
            " predicted_ms, error, stages FROM iterations WHERE wall_ns >= ? AND wall_ns < ?"
            " ORDER BY wall_ns, rowid LIMIT ?",
            (-(2**63) if since_ns is None else since_ns,
             2**63 - 1 if until_ns is None else until_ns, limit))
        return [IterationRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7],
                                json.loads(r[8]), r[9], r[10], json.loads(r[11]))
                for r in rows]


_QUERY_POOL: ThreadPoolExecutor | None = None


def _query_pool() -> ThreadPoolExecutor:
    """The thread that merges window digests for queries, at normal priority even when
    the loop runs real-time (a long range is seconds of CPU)."""
    global _QUERY_POOL
    if _QUERY_POOL is None:
        _QUERY_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prism-query",
                                         initializer=leave_realtime)
    return _QUERY_POOL


def _bucket(path: Path, rows: Sequence[sqlite3.Row], since_ns: int | None,
            step_s: float | None) -> list[QuantileRow]:
    """Group (series, wall_ns, digest, count, max) rows into buckets and merge digests."""
    step = None if step_s is None else max(1, int(step_s * 1e9))
    groups: dict[tuple[str, int], list[tuple[bytes, int, float]]] = {}
    first: dict[str, int] = {}
    for series, wall, blob, count, mx in rows:
        first.setdefault(series, int(wall))
        if step is None:
            start = since_ns if since_ns is not None else first[series]
        else:
            origin = since_ns if since_ns is not None else 0
            start = origin + (int(wall) - origin) // step * step
        groups.setdefault((series, start), []).append((blob, int(count), float(mx)))
    out: list[QuantileRow] = []
    for (series, start), items in sorted(groups.items()):
        try:
            digest = merge_digests(digest_from_bytes(b) for b, _, _ in items)
        except ValueError as exc:
            raise HistoryError(f"{path}: corrupt digest in series {series}: {exc}") from exc
        if digest is None:
            continue
        p50, p90, p99, p999 = (digest.quantile(q) for q in (0.5, 0.9, 0.99, 0.999))
        mx = max(m for _, _, m in items)
        out.append(QuantileRow(series, start, sum(c for _, c, _ in items), p50, p90, p99,
                               p999, mx if math.isfinite(mx) else digest.max()))
    return out


__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "HistoryError",
    "HistoryStore",
    "IterationRecord",
    "ProbeDecisionRecord",
    "QuantileRow",
    "TargetRecord",
]
