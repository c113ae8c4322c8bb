"""The monitor application's own setup error: a mistake in what was asked (exit 2).

Raised by the commands (``prism_tui.cli``), the session builder and the live-target
eval; it reaches the user as one line, as every ``ProbeError`` does.
"""

from __future__ import annotations

from probes.errors import EXIT_USAGE, ProbeError


class UsageError(ProbeError):
    """A command-line mistake argparse cannot see, or a session that cannot be put
    together as asked (no profile fits the target): exit 2."""

    exit_code = EXIT_USAGE
