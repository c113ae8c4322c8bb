"""Local history in SQLite (aiosqlite, WAL): windows of digests, iterations, alerts."""

from prism_tui.history.query import history_report, parse_duration, parse_time
from prism_tui.history.store import (
    SCHEMA_VERSION,
    HistoryError,
    HistoryStore,
    IterationRecord,
    QuantileRow,
)

__all__ = [
    "SCHEMA_VERSION",
    "HistoryError",
    "HistoryStore",
    "IterationRecord",
    "QuantileRow",
    "history_report",
    "parse_duration",
    "parse_time",
]
