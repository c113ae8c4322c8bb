"""The cleanup guard of a simulator run: what a SIGKILLed orchestrator cannot remove.

:class:`~prism_sim.server.SimServer` starts ``python -m prism_sim.guard`` before it creates
anything and keeps the write end of the guard's stdin, a pipe nobody else holds. A normal
``close()`` cleans up itself, then writes ``done`` and closes the pipe: the guard exits.
If the orchestrator dies without closing (SIGKILL, a crash, a hang-up of its terminal),
the kernel closes the pipe and the guard, which outlives it, removes the run's
shared-memory entries (``/dev/shm/<session>*`` and the communicator named on its command
line) and the run's cgroups (``<session>-r*``, which a ``cpu_throttle`` made).

The processes need no guard: ranks and fault helpers ask the kernel to SIGKILL them when
their parent dies (``PR_SET_PDEATHSIG``), which also ends a rank a SIGSTOP duty cycle
left stopped. ``prism inject`` acts on processes it did not start: its guard also
continues them (``--cont``: a SIGSTOP duty cycle may have left them stopped) and moves
them back to their own cgroup (``--home``) before removing the throttle's.

The guard ignores SIGINT, SIGTERM and SIGHUP: a Ctrl-C or a hang-up sent to
the whole process group must not take it down before the orchestrator is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import signal
import subprocess
import sys

DONE = b"done"
"""What the orchestrator writes before closing the pipe when it cleaned up itself."""


def cleanup(session: str, shm_paths: list[str], cont: list[int] | None = None,
            homes: dict[int, str] | None = None) -> None:
    """Remove the run's shared memory and cgroups, continue stopped targets; never raises.

    Args:
        session: the run's name prefix (``SimServer.session``).
        shm_paths: further ``/dev/shm`` entries of the run (its communicator).
        cont: processes to send SIGCONT (targets of a SIGSTOP duty cycle).
        homes: pid -> the cgroup directory it goes back to.
    """
    for pid in cont or []:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGCONT)
    for path in [*glob.glob(f"/dev/shm/{glob.escape(session)}*"), *shm_paths]:
        with contextlib.suppress(OSError):
            os.unlink(path)
    with contextlib.suppress(Exception):
        # imported here: a normal exit (the common case) needs none of it
        from pathlib import Path

        from prism_sim.faults import cleanup_session

        cleanup_session(session, {pid: Path(d) for pid, d in (homes or {}).items()})
    for pid in cont or []:  # once more: a stop signal may have been on its way
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGCONT)


def release(guard: subprocess.Popen[bytes]) -> None:
    """Tell a guard its orchestrator cleaned up (``done`` on its stdin) and reap it; it
    then exits without touching anything. Never raises."""
    with contextlib.suppress(Exception):
        assert guard.stdin is not None
        guard.stdin.write(b"done\n")
        guard.stdin.close()
    try:
        guard.wait(5)
    except subprocess.TimeoutExpired:
        guard.kill()
        guard.wait()


def wait_for_parent(fd: int = 0) -> bool:
    """Read ``fd`` to its end; True when the orchestrator said it cleaned up itself."""
    data = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except InterruptedError:  # pragma: no cover - PEP 475 retries reads
            continue
        except OSError:
            return False
        if not chunk:
            return DONE in data.split()
        data = data[-64:] + chunk


def main(argv: list[str] | None = None) -> int:
    """Entry point (``python -m prism_sim.guard --session S [--shm PATH]...``)."""
    p = argparse.ArgumentParser(prog="prism_sim.guard")
    p.add_argument("--session", required=True, help="the run's name prefix")
    p.add_argument("--shm", action="append", default=[],
                   help="a further /dev/shm path of the run (repeatable)")
    p.add_argument("--cont", action="append", type=int, default=[],
                   help="a process to continue with SIGCONT (repeatable)")
    p.add_argument("--home", action="append", default=[], metavar="PID=DIR",
                   help="the cgroup directory a process goes back to (repeatable)")
    args = p.parse_args(argv)
    homes = {int(pid): d for pid, _, d in (h.partition("=") for h in args.home)}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if not wait_for_parent():
        cleanup(args.session, args.shm, args.cont, homes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
