"""The ``prism`` command line (docs/architecture.md §Command line).

One module per command (``prism_tui/cli/<command>.py``: its flags in ``add_parser``, its
work in ``run``), read top to bottom; this module only builds the parser and maps the
errors of every layer to one line on stderr with the exit code of its kind (2 bad input,
3 permission, 1 anything else). ``--json`` prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from alerting.errors import AlertingError
from prism_sim.errors import SimError
from prism_tui import __version__
from prism_tui.cli import (
    broker_config,
    demo,
    evaluate,
    fleet,
    gateway,
    history,
    inject,
    sim,
    symbols,
    trace,
    watch,
)
from prism_tui.cli.common import UsageError
from prism_tui.history.store import HistoryError
from prism_tui.settings import SettingsError
from probes.errors import EXIT_OTHER, ProbeError

__all__ = ["UsageError", "main"]

COMMANDS: dict[str, ModuleType] = {
    "symbols": symbols, "trace": trace, "watch": watch, "eval": evaluate, "inject": inject,
    "history": history, "sim": sim, "gateway": gateway, "broker-config": broker_config,
    "fleet": fleet, "demo": demo}
"""Each command's module, in the order ``prism --help`` lists them."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prism",
        description="LatencyPrism: zero-intrusion latency monitor for LLM inference servers.")
    p.add_argument("--version", action="version", version=f"prism {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``prism`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        code: int = COMMANDS[args.command].run(args)
        return code
    except (ProbeError, SettingsError, AlertingError, HistoryError, SimError) as exc:
        print(f"prism {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OTHER
