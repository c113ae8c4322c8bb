"""Typed errors of the paging gateway; each reaches the user as one clear line."""

from __future__ import annotations

from alerting.errors import AlertingError

EXIT_OTHER = 1
EXIT_USAGE = 2


class GatewayError(AlertingError):
    """Base of the gateway's deliberate errors (exit code 1 unless a subclass says 2)."""

    exit_code = EXIT_OTHER


class GatewayConfigError(GatewayError):
    """A malformed gateway TOML file or a bad option value (``file:line: reason``)."""

    exit_code = EXIT_USAGE


class GatewayStateError(GatewayError):
    """The state database cannot be used (corrupt, foreign, unreadable) or a bad silence id."""

    exit_code = EXIT_USAGE


class BrokerRefusedError(GatewayError):
    """The broker refused us for a reason retrying cannot fix (credentials, TLS trust)."""

    exit_code = EXIT_USAGE
