"""``prism inject``: a host fault injected from outside into a live process."""

from __future__ import annotations

import argparse

from prism_tui.cli.common import target_args


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``inject`` sub-command and its flags."""
    inj = sub.add_parser("inject", help="a host fault in any live process, from outside, "
                         "with its measured effect")
    target_args(inj)
    inj.add_argument("kind", metavar="KIND",
                     help="cpu_squeeze, cpu_throttle, memory_pressure or pause")
    inj.add_argument("--intensity", type=float, default=None, metavar="X",
                     help="how hard, in (0, max] (default: the kind's, as in scenarios; "
                          "pause: 0.5, the share of each 200 ms the target is stopped)")
    inj.add_argument("--duration", type=float, default=None, metavar="S",
                     help="seconds the fault stays on (default: until Ctrl-C or the "
                          "target exits)")
    inj.add_argument("--labels", metavar="FILE",
                     help="write the fault window and its measured effect here (the "
                          "simulator's labels format)")
    return inj


def run(args: argparse.Namespace) -> int:
    """Inject the fault and print its measured effect (``prism_tui.inject``)."""
    from prism_tui.inject import run_inject

    return run_inject(args.pid, args.match, args.kind, args.intensity, args.duration,
                      args.labels)
