"""The simulated inference server in a child process (``prism sim --json``).

Its own process, as a real inference server is: run in a thread of the monitor's
process, the simulator's label writers, fault drivers and scheduler competed with the
monitor's event loop for the GIL and inflated the very latencies being measured (and
under ``--realtime`` its fault drivers ran beside a real-time loop). ``prism eval`` and
``prism demo`` both start it this way.
"""

from __future__ import annotations

import collections
import json
import re
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import IO, Any

from prism_sim.errors import SimError

_STAMP = re.compile(r"^\[\d\d:\d\d:\d\d\] ")


class SimChild:
    """``prism sim --json`` as a child process: its rank pids, its log, its final counts.

    ``duration``: None runs until :meth:`finish` (or this process's exit: the child
    stops when its parent is gone). ``labels``: where it writes the ground truth (None:
    nowhere). ``on_log``: called with each line the simulator logs (faults on and off),
    from a reader thread; without it the lines are only kept for error messages.
    """

    def __init__(self, scenario: str, duration: float | None = None,
                 labels: str | None = None, *,
                 on_log: Callable[[str], None] | None = None) -> None:
        self.argv = [sys.executable, "-m", "prism_tui.cli", "sim", "--scenario", scenario,
                     "--json"]
        if duration is not None:
            self.argv += ["--duration", repr(duration)]
        if labels is not None:
            self.argv += ["--labels", labels]
        self.rank_pids: dict[int, int] = {}
        self.started_ns = 0
        self.done: dict[str, Any] | None = None
        self._on_log = on_log
        self._tail: collections.deque[str] = collections.deque(maxlen=20)
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> SimChild:
        self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
        assert self._proc.stderr is not None
        self._reader = threading.Thread(target=self._read_log, args=(self._proc.stderr,),
                                        name="sim-log", daemon=True)
        self._reader.start()
        try:
            started = self._next("started", timeout_s=120)
        except BaseException:
            self.__exit__()
            raise
        self.rank_pids = {int(r): int(p) for r, p in started["ranks"].items()}
        self.started_ns = int(started["started_ns"])
        return self

    def _read_log(self, stream: IO[str]) -> None:
        for raw in stream:
            line = _STAMP.sub("", raw.rstrip())
            if not line:
                continue
            self._tail.append(line)
            if self._on_log is not None:
                self._on_log(line)

    def _next(self, event: str, timeout_s: float) -> dict[str, Any]:
        """The child's next JSON line, which must be ``event`` (else a SimError)."""
        assert self._proc is not None and self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
        line = self._proc.stdout.readline() if ready else ""
        try:
            doc: dict[str, Any] = json.loads(line)
        except ValueError:
            doc = {}
        if doc.get("event") != event:
            self._stop()
            if self._reader is not None:
                self._reader.join(5)  # the rest of its log, for the message
            tail = [ln for ln in self._tail if ln.strip()][-3:]
            raise SimError("the simulator stopped: " + (" / ".join(tail) or
                                                        f"exit status {self._proc.returncode}"))
        return doc

    def finish(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Stop the run now (SIGTERM: it ends cleanly, labels flushed); its final counts."""
        assert self._proc is not None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
        self.done = self._next("done", timeout_s)
        self._proc.wait(timeout_s)
        return self.done

    def _stop(self) -> None:
        """SIGTERM (it stops its ranks and fault processes), SIGKILL if that hangs."""
        assert self._proc is not None
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        self._stop()
        if self._reader is not None:
            self._reader.join(5)
        for stream in (self._proc.stdout, self._proc.stderr):
            if stream is not None:
                stream.close()
