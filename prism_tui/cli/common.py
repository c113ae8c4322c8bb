"""What the ``prism`` commands share: the usage error, the target and realtime flags, the
loop's scheduling, the ``[mqtt]`` broker config and the span recorder."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from prism_tui.errors import UsageError

__all__ = ["UsageError"]  # the commands raise it; defined in prism_tui.errors

LOOP_SWITCH_INTERVAL_S = 0.0005
"""The GIL switch interval of a monitoring process (Python's default is 5 ms)."""


def favour_the_loop() -> None:
    """Let the monitor's loop get the GIL back within 0.5 ms instead of 5 ms, and the
    CPU sooner after a wake-up.

    The loop mostly waits; when an anchor probe wakes it, any thread busy in Python (a
    model fit, the recorder, the UI's workers) holds the GIL until the switch interval
    ends, and the alert waits with it. A short scheduler slice (Linux 6.12+, no more CPU
    time, see :mod:`prism_tui.scheduling`) lets it preempt a busy process sooner.
    Measured in docs/performance.md.
    """
    sys.setswitchinterval(LOOP_SWITCH_INTERVAL_S)
    from prism_tui.scheduling import request_short_slice

    request_short_slice()  # this (the loop's) thread preempts a CPU hog sooner on wake-up


def try_realtime(priority: int, what: str = "the monitor's loop", tid: int = 0) -> None:
    """Run ``tid`` (0: this thread) under ``SCHED_FIFO`` at ``priority`` (0: leave it).

    A refusal is one line on stderr and the run goes on at normal priority.
    """
    from prism_tui.scheduling import go_realtime

    why = go_realtime(priority, what, tid)
    if why is not None:
        print(f"prism: {why}", file=sys.stderr)


def broker_config(mqtt: Any) -> Any:
    """The alerting package's broker config from the ``[mqtt]`` settings (None: no MQTT)."""
    from alerting.config import BrokerConfig

    if not mqtt.broker:
        return None
    return BrokerConfig(url=mqtt.broker, username=mqtt.username, password=mqtt.password,
                        tls_ca=mqtt.tls_ca, tls_cert=mqtt.tls_cert, tls_key=mqtt.tls_key,
                        client_id=mqtt.client_id, topic_root=mqtt.topic_root)


def target_args(sp: argparse.ArgumentParser) -> None:
    """``--pid PID`` or ``--match REGEX``, one of them required."""
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--pid", type=int, help="process id of the target")
    g.add_argument("--match", metavar="REGEX",
                   help="regular expression on the target's command line")


def realtime_arg(sp: argparse.ArgumentParser, default: int | None) -> None:
    """``--realtime [PRIO]`` of the monitoring commands (``watch`` defaults to settings)."""
    sp.add_argument("--realtime", type=int, nargs="?", const=1, default=default,
                    metavar="PRIO",
                    help="run the loop, its helper threads (and an embedded "
                         "broker) under SCHED_FIFO at PRIO (default 1): alerts are "
                         "not delayed by busy CPUs; needs root or CAP_SYS_NICE")
