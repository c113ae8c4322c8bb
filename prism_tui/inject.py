"""``prism inject``: a host fault in any live process, from outside, with its measured effect.

The simulator's injectors (:mod:`prism_sim.faults`) act through the kernel and need
nothing from the target: CPU hogs and memory churners beside it, a cgroup quota or a
SIGSTOP/SIGCONT duty cycle on it. The fault window goes to a labels file in the
simulator's format (CLOCK_MONOTONIC), with what it did to the target's threads (their
run-queue delay and CPU per second, against the second before it started).

Nothing outlives ``prism inject``, even a SIGKILL: the hogs die with it
(``PR_SET_PDEATHSIG``) and a guard process (:mod:`prism_sim.guard`), started before
anything changes, continues a stopped target and removes the throttle's cgroup.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from prism_sim.errors import SimError
from prism_sim.faults import (
    HOST_FAULTS,
    PAUSE_DEFAULT,
    PAUSE_MAX,
    EffectMeter,
    FaultContext,
    cgroup_homes,
    make_injector,
)
from prism_sim.guard import release
from prism_sim.labels import FaultTimeline, LabelWriter, fault_bit
from prism_sim.scenario import FAULT_INFO, FaultSpec
from probes.errors import EXIT_PERMISSION, EXIT_USAGE, ProbeError
from probes.target import resolve_target

BASELINE_S = 1.0
"""How long the target is measured before the fault starts (the effect's baseline)."""


class InjectUsageError(ProbeError):
    """Bad input to ``prism inject`` (exit 2)."""

    exit_code = EXIT_USAGE


class InjectPermissionError(ProbeError):
    """The target cannot be signalled from here (exit 3)."""

    exit_code = EXIT_PERMISSION


def intensity_range(kind: str) -> tuple[float, float]:
    """(default, largest) intensity of a host fault kind."""
    if kind == "pause":
        return PAUSE_DEFAULT, PAUSE_MAX
    info = FAULT_INFO[kind]
    return info.default, info.max


def check_kind(kind: str, intensity: float | None, duration: float | None) -> float:
    """The intensity to use; InjectUsageError for an unknown kind or a bad number."""
    if kind not in HOST_FAULTS:
        why = (" (it acts inside the simulator's ranks; use prism sim)" if kind in FAULT_INFO
               else "")
        raise InjectUsageError(f"unknown fault kind {kind!r}{why}: one of "
                               f"{', '.join(HOST_FAULTS)}")
    default, top = intensity_range(kind)
    value = default if intensity is None else intensity
    if not (math.isfinite(value) and 0 < value <= top):
        raise InjectUsageError(f"--intensity {value:g} is out of range for {kind}: "
                               f"above 0, at most {top:g}")
    if duration is not None and not (math.isfinite(duration) and duration > 0):
        raise InjectUsageError(f"--duration {duration:g} must be a positive number of "
                               "seconds")
    return value


def check_signal(pids: list[int]) -> None:
    """InjectPermissionError unless this process may signal (and so act on) every target."""
    for pid in pids:
        try:
            os.kill(pid, 0)
        except PermissionError:
            raise InjectPermissionError(
                f"no permission to act on pid {pid}: run prism inject as root or as the "
                "target's user") from None
        except ProcessLookupError:
            raise InjectUsageError(f"no process with pid {pid}") from None


def start_guard(session: str, pids: list[int]) -> subprocess.Popen[bytes]:
    """The guard that undoes everything if this process dies without cleaning up."""
    cmd = [sys.executable, "-m", "prism_sim.guard", "--session", session]
    for pid in pids:
        cmd += ["--cont", str(pid)]
    for pid, home in cgroup_homes(pids).items():
        cmd += ["--home", f"{pid}={home}"]
    # its stdin is a pipe only this process holds (close_fds for every child): EOF there
    # means this process is gone
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            close_fds=True)


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def summary(kind: str, pids: list[int], intensity: float, effect: dict[str, Any]) -> str:
    """One line: what was injected, for how long, and what it measurably did."""
    t, b = effect["target"], effect.get("baseline")
    inj = effect.get("injector") or {}
    bit = fault_bit(effect)
    base = (f" (before: {b['run_delay_ms_per_s']:g} and {b['cpu_ms_per_s']:g})"
            if b else "")
    extra = "".join(f", {k.replace('_ms_per_s', '')} {v:g} ms/s" for k, v in inj.items()
                    if k.endswith("_ms_per_s"))
    return (f"{kind} {intensity:g} on pid {','.join(map(str, pids))} for "
            f"{t['window_s']:g} s ({inj.get('mode', '?')}): run-queue delay "
            f"{t['run_delay_ms_per_s']:g} ms/s and CPU {t['cpu_ms_per_s']:g} ms/s{base}"
            f"{extra}; bit: {'yes' if bit else 'no' if bit is False else 'unknown'}")


def run_inject(pid: int | None, match: str | None, kind: str, intensity: float | None,
               duration: float | None, labels_path: str | None) -> int:
    """Inject one fault into the target until ``duration`` ends, a signal or its exit."""
    value = check_kind(kind, intensity, duration)
    targets = resolve_target(pid, match, allow_many=True)
    pids = [t.pid for t in targets]
    check_signal(pids)
    session = f"prism-inject-{os.getpid()}"
    stop = threading.Event()

    def on_signal(_sig: int, _frame: object) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    timeline = FaultTimeline()
    try:
        writer = LabelWriter(labels_path, timeline) if labels_path else None
    except OSError as exc:
        raise InjectUsageError(f"cannot write the labels to {labels_path}: "
                               f"{exc.strerror}") from None
    guard = start_guard(session, pids)
    spec = FaultSpec(kind, 0.0, duration if duration is not None else math.inf, None, value)
    injector = make_injector(spec, FaultContext(None, dict(enumerate(pids)), session))
    try:
        started_ns = time.monotonic_ns()
        if writer is not None:
            writer.header("inject", len(pids), started_ns, duration,
                          f"prism inject {kind} --intensity {value:g}", pids)
        meter = EffectMeter(pids)
        stop.wait(BASELINE_S)
        token = meter.fault_on()
        start_ns = time.monotonic_ns()
        timeline.started(spec, start_ns)
        try:
            injector.start()
            deadline = None if duration is None else time.monotonic() + duration
            while not stop.is_set() and any(_alive(p) for p in pids):
                left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                if left <= 0:
                    break
                stop.wait(left)
        finally:
            injector.stop()
            end_ns = time.monotonic_ns()
            effect = meter.fault_off(token, injector.effect())
            if writer is not None:
                writer.fault(spec, start_ns, end_ns, effect)
            else:
                timeline.ended(spec, end_ns)
    except SimError as exc:
        if "is gone" in str(exc):  # the target exited before the fault could start
            raise InjectUsageError(str(exc)) from None
        raise
    finally:
        injector.stop()
        if writer is not None:
            writer.close()
        release(guard)
    print(summary(kind, pids, value, effect))
    return 0
