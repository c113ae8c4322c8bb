"""The short scheduler slice of the monitor's loop, on this machine's real kernel."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from prism_tui.scheduling import SHORT_SLICE_NS, current_slice_ns, request_short_slice


def _in_thread(fn: object) -> object:
    """Run ``fn`` in a fresh thread (slices are per thread: the test's own stays as is)."""
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn()))  # type: ignore[operator]
    t.start()
    t.join()
    return out[0]


def test_a_thread_gets_the_short_slice_and_keeps_its_nice_value() -> None:
    def work() -> tuple[str | None, int | None, int, int | None]:
        nice = os.getpriority(os.PRIO_PROCESS, 0)
        why = request_short_slice()
        child = subprocess.run(
            [sys.executable, "-c", "from prism_tui.scheduling import current_slice_ns as c;"
             "print(c())"], capture_output=True, text=True, check=True).stdout.strip()
        seen: list[int | None] = []
        t = threading.Thread(target=lambda: seen.append(current_slice_ns()))
        t.start()
        t.join()
        assert os.getpriority(os.PRIO_PROCESS, 0) == nice
        return why, current_slice_ns(), int(child), seen[0]

    why, mine, child, thread = _in_thread(work)  # type: ignore[misc]
    if why is not None and "no custom slices" in why:
        pytest.skip(why)
    assert why is None and mine == SHORT_SLICE_NS
    # nothing it starts afterwards inherits it (the simulator's ranks under prism eval)
    assert child != SHORT_SLICE_NS and thread != SHORT_SLICE_NS


def test_another_process_can_be_given_the_slice() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        why = request_short_slice(proc.pid)
        if why is not None and "no custom slices" in why:
            pytest.skip(why)
        assert why is None and current_slice_ns(proc.pid) == SHORT_SLICE_NS
    finally:
        proc.kill()
        proc.wait()


def test_a_missing_thread_is_one_line_not_an_exception() -> None:
    why = request_short_slice(2**22 + 12345)  # above pid_max's default: no such task
    assert why is not None and why.startswith("sched_getattr:") and "\n" not in why
    assert current_slice_ns(2**22 + 12345) is None
