"""``/proc`` samplers: one process and its threads (CPU time, run-queue delay, switches).

:class:`ProcSampler` never raises: a process that exited, or a file the kernel will not
show, is a reading missing with its reason. Counters that only make sense as rates are
deltas since the previous ``sample()``; the first has them missing (:data:`FIRST_SAMPLE`).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from probes.telemetry.readings import (
    NOT_EXPOSED,
    PROCESS_EXITED,
    Clock,
    Reading,
    delta,
    os_reason,
    read_text,
    readings_of,
    sum_present,
)

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_NS_PER_TICK = 1_000_000_000 // _CLK_TCK


@dataclass(frozen=True)
class _Stat:
    """The fields of ``/proc/PID[/task/TID]/stat`` that the samplers use."""

    comm: str
    state: str
    majflt: int
    cpu_ticks: int  # utime + stime
    num_threads: int
    start_ticks: int
    rss_pages: int


def _parse_stat(text: str) -> _Stat:
    # comm may hold spaces and parentheses: fields resume after the last ')'
    lpar, rpar = text.index("("), text.rindex(")")
    rest = text[rpar + 2:].split()  # rest[0] is field 3 (state)
    return _Stat(comm=text[lpar + 1:rpar], state=rest[0], majflt=int(rest[9]),
                 cpu_ticks=int(rest[11]) + int(rest[12]), num_threads=int(rest[17]),
                 start_ticks=int(rest[19]), rss_pages=int(rest[21]))


def _parse_schedstat(text: str) -> int:
    """Second field of ``schedstat``: cumulative ns spent waiting on a run queue."""
    return int(text.split()[1])


_CSW = re.compile(r"^(voluntary|nonvoluntary)_ctxt_switches:\s*(\d+)", re.M)


def _parse_ctxt_switches(text: str) -> tuple[int, int] | None:
    """(voluntary, involuntary) context switches from a ``status`` file."""
    found = dict(_CSW.findall(text))
    if "voluntary" not in found or "nonvoluntary" not in found:
        return None
    return int(found["voluntary"]), int(found["nonvoluntary"])


def thread_runqueue_ns(pid: int, tid: int) -> int | None:
    """Cumulative ns thread ``tid`` of ``pid`` has waited on a CPU run queue; None if unknown."""
    try:
        return _parse_schedstat(read_text(f"/proc/{pid}/task/{tid}/schedstat"))
    except (OSError, ValueError, IndexError):
        return None


class RunQueueReader:
    """:func:`thread_runqueue_ns` for a reader called once per iteration: each thread's
    ``schedstat`` file stays open and is re-read with ``pread`` (1.2 µs against 11.7 µs
    for open, read and close here), at most ``max_open`` files at once.

    Never raises; a thread that exited reads as None and its file is closed.
    """

    def __init__(self, max_open: int = 64) -> None:
        self._fds: dict[tuple[int, int], int] = {}  # insertion order = age
        self._max = max_open

    def read(self, pid: int, tid: int) -> int | None:
        """Cumulative ns thread ``tid`` of ``pid`` has waited on a run queue, or None."""
        key = (pid, tid)
        fd = self._fds.get(key)
        if fd is None:
            try:
                fd = os.open(f"/proc/{pid}/task/{tid}/schedstat", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
            if len(self._fds) >= self._max:
                oldest = next(iter(self._fds))
                os.close(self._fds.pop(oldest))
            self._fds[key] = fd
        try:
            return _parse_schedstat(os.pread(fd, 128, 0).decode("ascii"))
        except (OSError, ValueError, IndexError):  # the thread exited (ESRCH, or empty)
            if self._fds.get(key) == fd:
                os.close(self._fds.pop(key))
            return None

    def forget(self, pid: int) -> None:
        """Close the files of ``pid``'s threads (it exited or is no longer watched)."""
        for key in [k for k in self._fds if k[0] == pid]:
            os.close(self._fds.pop(key))

    def close(self) -> None:
        """Close every open file."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _schedstat_exposed() -> bool:
    return os.path.exists(f"/proc/{os.getpid()}/schedstat")


@dataclass(frozen=True)
class ThreadSample:
    """One poll of one thread; deltas are since the previous sample of the same thread."""

    tid: int
    name: str
    runqueue_ns: Reading
    runqueue_delta_ns: Reading
    cpu_time_delta_ns: Reading
    voluntary_switches_delta: Reading
    involuntary_switches_delta: Reading

    def readings(self) -> dict[str, Reading]:
        """Every metric of this sample by name."""
        return readings_of(self)


@dataclass(frozen=True)
class ProcSample:
    """One poll of one process.

    Sums over threads (``runqueue_delta_ns`` and the context switches) cover the threads present
    in both this sample and the previous one; a thread that ended in between drops out. Once
    the process has exited (or its PID was reused) ``alive`` is False, ``threads`` is empty and
    every reading is missing with the reason :data:`PROCESS_EXITED`.
    """

    pid: int
    timestamp_ns: int
    alive: bool
    interval_ns: int | None
    cpu_time_ns: Reading
    cpu_time_delta_ns: Reading
    cpu_pct: Reading
    rss_bytes: Reading
    major_faults_delta: Reading
    thread_count: Reading
    runqueue_delta_ns: Reading
    voluntary_switches_delta: Reading
    involuntary_switches_delta: Reading
    threads: tuple[ThreadSample, ...]

    def readings(self) -> dict[str, Reading]:
        """Every process-level metric of this sample by name (threads not included)."""
        return readings_of(self)


@dataclass(frozen=True)
class _ThreadRaw:
    tid: int
    name: str
    start_ticks: int
    cpu_ticks: int
    runqueue_ns: int | None
    rq_reason: str | None
    csw: tuple[int, int] | None
    csw_reason: str | None


class ProcSampler:
    """Samples one process and its threads from ``/proc/PID``; ``sample()`` never raises.

    CPU time comes from ``stat`` (user + system, clock ticks converted to ns), run-queue delay
    from each thread's ``schedstat`` (2nd field), context switches from each thread's
    ``status``. The process start time is remembered so a reused PID reads as exited.
    """

    def __init__(self, pid: int, clock: Clock = time.monotonic_ns) -> None:
        """Bind to ``pid``; nothing is read until the first ``sample()``."""
        self.pid = pid
        self._clock = clock
        self._proc = f"/proc/{pid}"
        self._start_ticks: int | None = None
        self._exited = False
        self._schedstat = _schedstat_exposed()
        self._prev_t: int | None = None
        self._prev_cpu: int | None = None
        self._prev_majflt: int | None = None
        self._prev_threads: dict[int, _ThreadRaw] = {}

    def sample(self) -> ProcSample:
        """Read the process and its threads now and return deltas since the previous call."""
        now = self._clock()
        if self._exited:
            return self._gone(now, PROCESS_EXITED)
        try:
            stat = _parse_stat(read_text(f"{self._proc}/stat"))
        except OSError as err:
            reason = os_reason(err)
            if reason == PROCESS_EXITED or not os.path.exists(self._proc):
                self._exited = True
                return self._gone(now, PROCESS_EXITED)
            return self._gone(now, reason, alive=True)
        except (ValueError, IndexError):
            return self._gone(now, f"malformed {self._proc}/stat", alive=True)
        # a zombie leader with other threads still running (it called pthread_exit) is alive
        zombie = stat.state in ("Z", "X") and stat.num_threads <= 1
        if zombie or (self._start_ticks is not None and stat.start_ticks != self._start_ticks):
            self._exited = True
            return self._gone(now, PROCESS_EXITED)
        self._start_ticks = stat.start_ticks
        try:
            tids = sorted(int(t) for t in os.listdir(f"{self._proc}/task"))
        except OSError as err:
            if os_reason(err) == PROCESS_EXITED:
                self._exited = True
                return self._gone(now, PROCESS_EXITED)
            tids = []
        raws = [r for tid in tids if (r := self._read_thread(tid)) is not None]

        threads = tuple(self._thread_sample(r) for r in raws)
        interval = None if self._prev_t is None else now - self._prev_t
        cpu_ns = stat.cpu_ticks * _NS_PER_TICK
        cpu_delta = delta(cpu_ns, None, self._prev_cpu, "ns")
        cpu_pct = (Reading.of(100.0 * cpu_delta.value / interval, "%")
                   if cpu_delta.value is not None and interval
                   else Reading.missing("%", cpu_delta.reason or "zero interval"))
        sample = ProcSample(
            pid=self.pid,
            timestamp_ns=now,
            alive=True,
            interval_ns=interval,
            cpu_time_ns=Reading.of(cpu_ns, "ns"),
            cpu_time_delta_ns=cpu_delta,
            cpu_pct=cpu_pct,
            rss_bytes=Reading.of(stat.rss_pages * _PAGE_SIZE, "B"),
            major_faults_delta=delta(stat.majflt, None, self._prev_majflt, "faults"),
            thread_count=Reading.of(stat.num_threads, "threads"),
            runqueue_delta_ns=sum_present(t.runqueue_delta_ns for t in threads),
            voluntary_switches_delta=sum_present(t.voluntary_switches_delta for t in threads),
            involuntary_switches_delta=sum_present(t.involuntary_switches_delta for t in threads),
            threads=threads,
        )
        self._prev_t = now
        self._prev_cpu = cpu_ns
        self._prev_majflt = stat.majflt
        self._prev_threads = {r.tid: r for r in raws}
        return sample

    def _read_thread(self, tid: int) -> _ThreadRaw | None:
        """Raw counters of one thread, or None when it vanished while being read."""
        base = f"{self._proc}/task/{tid}"
        try:
            stat = _parse_stat(read_text(f"{base}/stat"))
        except (OSError, ValueError, IndexError):
            return None
        runqueue: int | None = None
        rq_reason: str | None = None
        if not self._schedstat:
            rq_reason = NOT_EXPOSED
        else:
            try:
                runqueue = _parse_schedstat(read_text(f"{base}/schedstat"))
            except OSError as err:
                if os_reason(err) == PROCESS_EXITED:
                    return None
                rq_reason = os_reason(err)
            except (ValueError, IndexError):
                rq_reason = "malformed schedstat"
        csw: tuple[int, int] | None = None
        csw_reason: str | None = None
        try:
            csw = _parse_ctxt_switches(read_text(f"{base}/status"))
            if csw is None:
                csw_reason = NOT_EXPOSED
        except OSError as err:
            if os_reason(err) == PROCESS_EXITED:
                return None
            csw_reason = os_reason(err)
        return _ThreadRaw(tid, stat.comm, stat.start_ticks, stat.cpu_ticks, runqueue, rq_reason,
                          csw, csw_reason)

    def _thread_sample(self, r: _ThreadRaw) -> ThreadSample:
        prev = self._prev_threads.get(r.tid)
        if prev is not None and prev.start_ticks != r.start_ticks:
            prev = None  # the TID was reused by a new thread
        vol, invol = r.csw if r.csw is not None else (None, None)
        pvol, pinvol = (prev.csw if prev is not None and prev.csw is not None
                        else (None, None))
        return ThreadSample(
            tid=r.tid,
            name=r.name,
            runqueue_ns=(Reading.of(r.runqueue_ns, "ns") if r.runqueue_ns is not None
                         else Reading.missing("ns", r.rq_reason or "unavailable")),
            runqueue_delta_ns=delta(r.runqueue_ns, r.rq_reason,
                                     None if prev is None else prev.runqueue_ns, "ns"),
            cpu_time_delta_ns=delta(r.cpu_ticks * _NS_PER_TICK, None,
                                     None if prev is None else prev.cpu_ticks * _NS_PER_TICK,
                                     "ns"),
            voluntary_switches_delta=delta(vol, r.csw_reason, pvol, "switches"),
            involuntary_switches_delta=delta(invol, r.csw_reason, pinvol, "switches"),
        )

    def _gone(self, now: int, reason: str, alive: bool = False) -> ProcSample:
        """A sample whose every reading is missing for ``reason``."""
        def m(unit: str) -> Reading:
            return Reading.missing(unit, reason)
        interval = None if self._prev_t is None else now - self._prev_t
        if not alive:
            self._prev_threads = {}
        return ProcSample(self.pid, now, alive, interval, m("ns"), m("ns"), m("%"), m("B"),
                          m("faults"), m("threads"), m("ns"), m("switches"), m("switches"), ())
