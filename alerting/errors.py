"""The alerting package's one base error (docs/architecture.md §Rules 4)."""

from __future__ import annotations


class AlertingError(Exception):
    """Base of every error the alerting package raises on purpose (one clear line each)."""

    exit_code: int = 1
    """The CLI's exit status for this error (1; subclasses the user can fix say 2)."""
