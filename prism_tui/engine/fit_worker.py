"""Baseline fits in a child process at a low CPU priority.

A fit takes about a second of CPU per thousand iterations. At normal priority it
competes with the monitored server for the host's cores (on a small host it slows the
very iterations being judged, which then look anomalous). In a thread at low priority it
holds the GIL while the kernel leaves it waiting for a CPU, and the monitor's loop, with
the alert it was about to send, waits too (~90 ms measured in ``prism eval``).

So a child process fits, under ``SCHED_IDLE``: it runs on CPU time nobody else wants,
and a server thread that wakes up takes its CPU at once. At niceness 10 (before) it got
about a tenth of a CPU the server wanted, and every fit slowed the simulated server's
iterations by 10-15 % for 2-3 s (the warm-up's end and each refit, visible in every
recording; one smoke test alarm came from it). An idle-class process can starve when
the host is saturated (two CPU hogs on this 2-vCPU host), so a fit still running after
``PROMOTE_AFTER_S`` is promoted to ``SCHED_OTHER`` at niceness 10 (not 19, about 1.5 %:
with two hogs the demo's first fit then did not finish within 45 s), and the worker goes
back to the idle class at its next request. The promotion is checked again every
``PROMOTE_AFTER_S`` until the answer comes, as a worker promoted while it was still
starting up goes back to the idle class when it takes the request. Where promotion is
not permitted (an unprivileged monitor without ``RLIMIT_NICE``) the fit stays idle.

The child runs its numeric libraries on one thread (``ONE_THREAD``): a fit is a
background job, and BLAS or OpenMP threads on every core would compete with the server
on all of them at once.

The child is a plain ``python -m prism_tui.engine.fit_worker`` talking length-prefixed
pickles over its stdin and stdout: no multiprocessing machinery, so nothing is left in
``/dev/shm`` and no probe fd is inherited (they are close-on-exec). One request at a
time; a worker that dies is started again by the next fit, and if it cannot run at all
the fit runs in the calling thread instead (slower for the loop, never lost).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import subprocess
import sys
import threading
from typing import IO, Any

FIT_NICENESS = 10
"""Niceness of the process that fits baseline models (once promoted, see below)."""

PROMOTE_AFTER_S = 5.0
"""A fit still running after this long leaves ``SCHED_IDLE`` for ``SCHED_OTHER``."""

ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                     "MKL_NUM_THREADS", "BLIS_NUM_THREADS")}
"""Environment that keeps the worker's numeric libraries on one thread."""

_HEADER = struct.Struct("<Q")


class FitWorkerError(RuntimeError):
    """The worker could not be started, died, or answered with an error."""


class FitWorkerUnavailableError(FitWorkerError):
    """The worker process cannot be started here at all."""


def _send(fh: IO[bytes], obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    fh.write(_HEADER.pack(len(data)))
    fh.write(data)
    fh.flush()


def _receive(fh: IO[bytes]) -> Any:
    head = fh.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError("fit worker closed its pipe")
    (size,) = _HEADER.unpack(head)
    data = fh.read(size)
    if len(data) < size:
        raise EOFError("fit worker closed its pipe mid-message")
    return pickle.loads(data)


class FitWorker:
    """A lazily started child process that runs :func:`fit_baseline` calls in turn."""

    def __init__(self, promote_after_s: float = PROMOTE_AFTER_S) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # one request at a time on the pipes
        self.promote_after_s = promote_after_s
        self.promotions = 0  # requests that outran promote_after_s and were promoted

    @property
    def pid(self) -> int | None:
        """The worker's pid while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def call(self, kind: str, *args: object) -> Any:
        """Send one request and wait for its answer (blocking: call it from a thread)."""
        with self._lock:
            proc = self._start()
            assert proc.stdin is not None and proc.stdout is not None
            answered = threading.Event()
            promoter = threading.Thread(target=self._promote_while_waiting,
                                        args=(proc.pid, answered), daemon=True,
                                        name="prism-fit-promoter")
            try:
                _send(proc.stdin, (kind, *args))
                promoter.start()
                status, value = _receive(proc.stdout)
            except (OSError, EOFError, pickle.UnpicklingError) as exc:
                self._stop(proc)
                raise FitWorkerError(f"fit worker died: {exc}") from None
            finally:
                answered.set()
        if status != "ok":
            raise FitWorkerError(str(value))
        return value

    def _promote_while_waiting(self, pid: int, answered: threading.Event) -> None:
        """Every ``promote_after_s`` until the answer comes, move the worker out of the
        idle class if it is in it, and count the request once as promoted.

        Not once: a worker promoted while it was still starting up (importing, on a
        saturated host) puts itself back in the idle class when it takes the request,
        and a single promotion lost that way left a fit starving for good."""
        counted = False
        while not answered.wait(self.promote_after_s):
            if _promote(pid) and not counted:
                counted = True
                self.promotions += 1

    def fit(self, x: object, y: object, rule: object) -> Any:
        """``fit_baseline(x, y, rule)`` in the worker."""
        return self.call("fit", x, y, rule)

    def _start(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "prism_tui.engine.fit_worker"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
                env={**os.environ, **ONE_THREAD})
        except OSError as exc:
            raise FitWorkerUnavailableError(f"cannot start the fit worker: {exc}") from None
        return self._proc

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes]) -> None:
        """End the worker, then close its answer pipe.

        The answer pipe is closed only once the worker is gone: a thread waiting for an
        answer holds that pipe's lock, so closing it first waited for an answer that an
        idle-class worker on a saturated host might never give."""
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if proc.poll() is None:  # not reaped (by another thread's _stop): its pid
            _promote(proc.pid)  # idle class: it may get no CPU to see its input end
        try:
            proc.wait(5)  # it exits at the end of its input
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            with contextlib.suppress(OSError):
                proc.stdout.close()

    def close(self) -> None:
        """Stop the worker: a fit in progress gets its answer if the worker finishes it
        within 5 s, else fails with :class:`FitWorkerError`."""
        proc, self._proc = self._proc, None
        if proc is not None:
            self._stop(proc)


def _promote(pid: int) -> bool:
    """Move ``pid`` from the idle class to ``SCHED_OTHER`` (its niceness, 10, stays);
    True when it was idle and was moved. Not permitted or gone: False."""
    try:
        if os.sched_getscheduler(pid) != os.SCHED_IDLE:
            return False
        os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
    except (AttributeError, OSError):
        return False
    return True


def _idle() -> None:
    """Back to the idle class (and niceness 10 for when it is promoted)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, 0, FIT_NICENESS)
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _thread_pools() -> dict[str, int]:
    """Threads of each numeric library loaded once a fit's modules are imported."""
    import sklearn.ensemble  # noqa: F401  (loads the OpenMP runtime a fit uses)
    from threadpoolctl import threadpool_info

    return {f"{p['internal_api']} {p['filepath']}": int(p["num_threads"])
            for p in threadpool_info()}


def main() -> int:
    """The worker: idle class, then answer requests until stdin closes."""
    _idle()
    requests = sys.stdin.buffer
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print() must not corrupt the answers
    from prism_tui.engine.detector import fit_baseline

    while True:
        try:
            kind, *args = _receive(requests)
        except (EOFError, OSError):
            return 0
        _idle()  # a promoted fit's worker starts the next one idle again
        answer: tuple[str, object]
        try:
            if kind == "fit":
                answer = ("ok", fit_baseline(*args))
            elif kind == "whoami":
                answer = ("ok", (os.getpid(), os.getpriority(os.PRIO_PROCESS, 0),
                                 os.sched_getscheduler(0)))
            elif kind == "threads":
                answer = ("ok", _thread_pools())
            else:
                raise ValueError(f"unknown request {kind!r}")
        except Exception as exc:  # an answer, not a dead worker
            answer = ("error", f"{type(exc).__name__}: {exc}")
        try:
            _send(answers, answer)
        except OSError:
            return 0  # the monitor is gone


if __name__ == "__main__":
    sys.exit(main())
