"""The alerting package's one base error (DESIGN.md §3 rule 4)."""

from __future__ import annotations


class AlertingError(Exception):
    """Base of every error the alerting package raises on purpose (one clear line each)."""
