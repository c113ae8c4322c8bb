"""The short scheduler slice of the monitor's loop, on this machine's real kernel."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

import pytest

from prism_tui.gc_pauses import freeze_heap
from prism_tui.history.store import HistoryStore, _query_pool
from prism_tui.scheduling import (
    SHORT_SLICE_NS,
    current_slice_ns,
    go_realtime,
    helper_executor,
    leave_realtime,
    realtime_priority,
    request_realtime,
    request_short_slice,
)

RESET_ON_FORK = 0x40000000

T = TypeVar("T")


def _in_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread (slices are per thread: the test's own stays as is)."""
    out: list[T] = []
    t = threading.Thread(target=lambda: out.append(fn()))
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

    why, mine, child, thread = _in_thread(work)
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


def test_a_real_time_process_starts_children_at_normal_priority() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; sys.stdin.readline(); "
         "print(subprocess.run([sys.executable, '-c', 'import os; "
         "print(os.sched_getscheduler(0))'], capture_output=True, text=True).stdout)"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        why = request_realtime(child.pid)
        if why is not None and "Operation not permitted" in why:
            pytest.skip(f"{why} (needs CAP_SYS_NICE)")
        assert why is None
        assert os.sched_getscheduler(child.pid) & ~RESET_ON_FORK == os.SCHED_FIFO
        assert os.sched_getparam(child.pid).sched_priority == 1
        out, _ = child.communicate("go\n", timeout=30)
        assert int(out) == os.SCHED_OTHER  # the ranks of prism eval stay normal
    finally:
        child.kill()
        child.wait()


def test_real_time_for_a_missing_thread_is_one_line() -> None:
    why = request_realtime(2**22 + 12345)
    assert why is not None and why.startswith("sched_setscheduler:") and "\n" not in why
    # what --realtime shows when the kernel refuses (here: no such priority)
    line = go_realtime(100, "the monitor's loop")
    assert line is not None and "\n" not in line
    assert line.startswith("the monitor's loop stays at normal priority (sched_setscheduler:")
    assert "CAP_SYS_NICE" in line
    assert os.sched_getscheduler(0) & ~RESET_ON_FORK == os.SCHED_OTHER
    assert go_realtime(0, "the monitor's loop") is None  # not asked: nothing done


def test_freezing_the_heap_takes_it_out_of_collections() -> None:
    try:
        frozen = freeze_heap()
        assert frozen > 10_000 and gc.get_freeze_count() == frozen
        assert sum(gc.get_count()) == 0 and len(gc.get_objects(2)) < 1000
    finally:
        gc.unfreeze()


def _policy(tid: int = 0) -> tuple[int, int]:
    return os.sched_getscheduler(tid) & ~RESET_ON_FORK, os.sched_getparam(tid).sched_priority


def _as_real_time(fn: Callable[[], T], priority: int = 3) -> T:
    """Run ``fn`` in a fresh thread under SCHED_FIFO (as ``--realtime`` runs the loop)."""
    def work() -> tuple[str | None, T | None]:
        why = request_realtime(0, priority)
        return (why, None) if why is not None else (None, fn())

    why, out = _in_thread(work)
    if why is not None and "Operation not permitted" in why:
        pytest.skip(f"{why} (needs CAP_SYS_NICE)")
    assert why is None, why
    return cast(T, out)  # fn ran: out is its result


def test_a_real_time_loops_helpers_run_at_its_priority_and_heavy_work_does_not() -> None:
    def work() -> tuple[object, ...]:
        with helper_executor(2, "t-helper") as pool:
            helper = pool.submit(_policy).result()
        return helper, _policy(), realtime_priority()

    helper, mine, seen = _as_real_time(work)
    assert mine == (os.SCHED_FIFO, 3) and seen == 3
    assert helper == (os.SCHED_FIFO, 3)  # no GIL inversion with the loop
    # created by a normal thread: a plain pool
    with helper_executor(1, "t-plain") as pool:
        assert pool.submit(_policy).result() == (os.SCHED_OTHER, 0)

    def leave() -> tuple[int, int]:
        leave_realtime()
        return _policy()

    assert _as_real_time(leave) == (os.SCHED_OTHER, 0)  # before a fit in-thread


def test_a_real_time_history_writes_at_its_priority_and_queries_at_normal(
        tmp_path: Path) -> None:
    async def session() -> tuple[tuple[int, int], tuple[int, int]]:
        store = await HistoryStore(tmp_path / "h.sqlite").open()
        try:
            sqlite_thread = await store._db._execute(_policy)  # type: ignore[union-attr]
            await store.quantiles()
            query_thread = await asyncio.get_running_loop().run_in_executor(
                _query_pool(), _policy)
        finally:
            await store.close()
        return sqlite_thread, query_thread

    sqlite_thread, query_thread = _as_real_time(lambda: asyncio.run(session()))
    assert sqlite_thread == (os.SCHED_FIFO, 3)  # every write passes through it
    assert query_thread == (os.SCHED_OTHER, 0)  # merging digests: seconds of CPU


def test_the_probe_layers_workers_run_at_their_starters_priority() -> None:
    from probes.workers import Worker

    def policy_of_a_worker() -> tuple[int, int]:
        seen: list[tuple[int, int]] = []
        worker = Worker("t-opener")
        worker.put(lambda: seen.append(_policy()))
        worker.finish()
        return seen[0]

    # started by a real-time loop: the opener and closer follow it
    assert _as_real_time(policy_of_a_worker, 2) == (os.SCHED_FIFO, 2)
    assert policy_of_a_worker() == (os.SCHED_OTHER, 0)
