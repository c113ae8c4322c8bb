"""``prism gateway``: the paging router (``alerting.gateway``)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``gateway`` sub-command and its flags."""
    from alerting.gateway.cli import add_gateway_arguments

    g = sub.add_parser("gateway", help="route alerts from MQTT to pagers, webhooks, "
                       "commands; manage silences")
    add_gateway_arguments(g)
    return g


def run(args: argparse.Namespace) -> int:
    """Run the gateway or one of its ``silence`` sub-commands."""
    from alerting.gateway.cli import run_gateway_command

    return run_gateway_command(args)
