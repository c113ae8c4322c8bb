"""``prism broker-config``: an edge Mosquitto's configuration (``alerting.bridge``)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``broker-config`` sub-command and its flags."""
    from alerting.bridge import add_arguments as add_bridge_arguments

    bc = sub.add_parser("broker-config", help="print the mosquitto.conf of an edge broker "
                        "that bridges a rack's monitors to core brokers")
    add_bridge_arguments(bc)
    return bc


def run(args: argparse.Namespace) -> int:
    """Print the edge broker's ``mosquitto.conf``."""
    from alerting.bridge import main as bridge_config

    print(bridge_config(args), end="")
    return 0
