"""``prism gateway``: run the paging router, and manage its silences.

``prism gateway [--broker URL] [--config FILE] [--state PATH]`` runs until SIGINT or
SIGTERM; ``prism gateway silence add|list|expire`` edit the state database, which a running
gateway re-reads every second. Exit codes: 0 ok, 2 usage or bad input (one line on
stderr), 1 anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import logging
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from alerting.errors import AlertingError
from alerting.gateway.config import GatewayConfig, load_gateway_config, parse_duration
from alerting.gateway.errors import EXIT_OTHER, EXIT_USAGE, GatewayConfigError
from alerting.gateway.matchers import parse_matcher
from alerting.gateway.pipeline import Silence
from alerting.gateway.state import GatewayState
from alerting.schema import rfc3339

log = logging.getLogger("alerting.gateway")


def add_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``prism gateway`` options and its ``silence`` subcommands to ``parser``."""
    parser.add_argument("--broker", metavar="URL",
                        help="MQTT broker (mqtt://host:1883, mqtts://...); overrides the config")
    parser.add_argument("--config", metavar="FILE", help="gateway TOML file (docs/gateway.md)")
    parser.add_argument("--state", metavar="PATH", help="state database (default: the "
                        "config's [state] path, else ~/.local/state/latencyprism/"
                        "gateway.sqlite)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        default="info", help="what the gateway logs on stderr")
    sub = parser.add_subparsers(dest="gateway_command", metavar="SUBCOMMAND")
    silence = sub.add_parser("silence", help="add, list or expire silences")
    ssub = silence.add_subparsers(dest="silence_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                       help="gateway TOML file (for its [state] path)")
        p.add_argument("--state", metavar="PATH", default=argparse.SUPPRESS,
                       help="state database")

    add = ssub.add_parser("add", help="mute alerts matching every --match for a while")
    add.add_argument("--match", action="append", required=True, metavar="KEY=VALUE",
                     help="matcher: key=value, key!=value, key=~regex, key!~regex "
                          "(repeatable; keys: severity, host, target, pid, stage, device, "
                          "phase, source, status, fingerprint, labels.NAME)")
    add.add_argument("--duration", required=True, help="how long, e.g. 30m, 2h, 1d")
    add.add_argument("--comment", default="", help="why (shown by silence list)")
    add.add_argument("--author", default=None, help="who (default: user@host)")
    add.add_argument("--json", action="store_true", help="print the silence as JSON")
    common(add)
    lst = ssub.add_parser("list", help="silences not yet expired")
    lst.add_argument("--all", action="store_true", help="expired ones too")
    lst.add_argument("--json", action="store_true", help="print one JSON document")
    common(lst)
    exp = ssub.add_parser("expire", help="end a silence now")
    exp.add_argument("id", help="silence id (a unique prefix is enough)")
    common(exp)


def run_gateway_command(args: argparse.Namespace) -> int:
    """Run ``prism gateway`` or one of its subcommands; returns the exit code."""
    try:
        if getattr(args, "gateway_command", None) == "silence":
            return _silence(args)
        return _serve(args)
    except AlertingError as exc:
        print(f"prism gateway: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", EXIT_OTHER))
    except KeyboardInterrupt:
        return 130


def _config(args: argparse.Namespace) -> GatewayConfig:
    config = load_gateway_config(getattr(args, "config", None))
    return config.with_overrides(broker=getattr(args, "broker", None),
                                 state=getattr(args, "state", None))


# ------------------------------------------------------------------------------ serve
def _serve(args: argparse.Namespace) -> int:
    from alerting.gateway.service import GatewayService

    config = _config(args)
    root = logging.getLogger("alerting.gateway")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s prism gateway: %(message)s",
                                               "%H:%M:%S"))
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(getattr(logging, str(getattr(args, "log_level", "info")).upper()))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        with GatewayState(config.state_file) as state:
            service = GatewayService(config, state)
            log.info("routing %s from %s to %s (state %s)", config.broker.topic,
                     config.broker.url, ", ".join(config.receivers), config.state_file)
            try:
                await service.run(stop)
            finally:
                service.close()
                counts = {k: v for k, v in sorted(service.stats.items()) if v}
                log.info("stopped: %s", json.dumps(counts))

    asyncio.run(main())
    return 0


# ------------------------------------------------------------------------------ silences
def silence_doc(silence: Silence, now: float) -> dict[str, Any]:
    """JSON form of a silence for ``silence list --json``."""
    return {"id": silence.id, "matchers": [str(m) for m in silence.matchers],
            "starts_at": rfc3339(silence.starts_at), "ends_at": rfc3339(silence.ends_at),
            "state": silence.state(now), "created_by": silence.created_by,
            "comment": silence.comment}


def _silence(args: argparse.Namespace) -> int:
    config = _config(args)
    now = time.time()
    action = args.silence_command
    if action == "add":
        matchers = [parse_matcher(text) for text in args.match]
        try:
            duration = parse_duration(args.duration)
        except ValueError as exc:
            raise GatewayConfigError(f"--duration: {exc}") from None
        if duration <= 0:
            raise GatewayConfigError("--duration must be positive")
        author = args.author or f"{_user()}@{socket.gethostname()}"
        with GatewayState(config.state_file) as state:
            silence = state.add_silence(matchers, now, now + duration, author, args.comment,
                                        now)
        print(json.dumps(silence_doc(silence, now)) if args.json else silence.id)
        return 0
    if action == "list":
        with GatewayState(config.state_file) as state:
            silences = state.silences(now, include_expired=args.all)
        docs = [silence_doc(s, now) for s in silences]
        if args.json:
            print(json.dumps({"silences": docs}, indent=2))
        else:
            _print_table(docs)
        return 0
    if action == "expire":
        with GatewayState(config.state_file) as state:
            silence = state.expire_silence(args.id, now)
        print(f"expired {silence.id}" if silence.ends_at > now
              else f"{silence.id} had already expired")
        return 0
    raise GatewayConfigError(f"unknown silence action {action!r}")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _print_table(docs: Sequence[dict[str, Any]]) -> None:
    if not docs:
        print("no silences")
        return
    rows = [("ID", "STATE", "ENDS (UTC)", "MATCHERS", "BY", "COMMENT")]
    rows += [(d["id"], d["state"], d["ends_at"][:19].replace("T", " "),
              " ".join(d["matchers"]), d["created_by"], d["comment"]) for d in docs]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m alerting.gateway``: the same command without the ``prism`` wrapper."""
    parser = argparse.ArgumentParser(prog="prism gateway",
                                     description="Route LatencyPrism alerts to pagers.")
    add_gateway_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_USAGE
    return run_gateway_command(args)
