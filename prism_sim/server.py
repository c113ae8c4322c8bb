"""The simulated inference server: ranks, the fault timeline, labels and ``/metrics``.

:class:`SimServer` owns every resource of a run: the rank processes (``python -m
prism_sim.engine``), the pipes between them, the shared-memory control block, the fault
injectors and their child processes, the labels file and the metrics HTTP server.
``close()`` (idempotent, also on Ctrl-C, SIGTERM and errors) stops them all and removes
the run's shared-memory segments, so nothing is left behind.

When the orchestrator cannot run ``close()`` (SIGKILL, a crash), nothing is left either:
the rank processes and the fault helpers are SIGKILLed by the kernel when their parent
dies (``PR_SET_PDEATHSIG``; a rank a ``cpu_throttle`` left stopped dies too), the control
block and the communicator are unlinked as soon as every rank has mapped them, and a
guard process (:mod:`prism_sim.guard`) removes whatever remains (a throttle's cgroups, or
shared memory of a run killed while starting). ``PR_SET_PDEATHSIG`` fires when the
*thread* that started a child exits, so :meth:`SimServer.start` must run on a thread that
lives as long as the server (as the ``with`` statement of the main thread does).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prism_sim.control import ControlBlock
from prism_sim.errors import SimError
from prism_sim.faults import (
    EffectMeter,
    FaultContext,
    Injector,
    cleanup_session,
    make_injector,
    stop_all,
)
from prism_sim.guard import release
from prism_sim.labels import FaultTimeline, LabelWriter
from prism_sim.runtime import SimDevice
from prism_sim.scenario import FaultSpec, Scenario

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


@dataclass
class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count)."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        """Add one observation."""
        if not self.counts:
            self.counts = [0] * len(self.buckets)
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.n += 1

    def render(self, name: str, help_text: str) -> list[str]:
        """Text exposition lines."""
        counts = self.counts or [0] * len(self.buckets)
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        for bound, c in zip(self.buckets, counts, strict=True):
            lines.append(f'{name}_bucket{{le="{bound}"}} {c}')
        lines += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}",
                  f"{name}_count {self.n}"]
        return lines


@dataclass
class ServerStats:
    """What ``/metrics`` shows and ``prism sim`` prints at the end (vLLM metric names)."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    iterations: dict[int, int] = field(default_factory=dict)
    requests: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def render(self) -> str:
        """Prometheus text format."""
        with self.lock:
            lines = [
                "# HELP vllm:num_requests_running Requests being decoded or prefilled.",
                "# TYPE vllm:num_requests_running gauge",
                f"vllm:num_requests_running {self.running}",
                "# HELP vllm:num_requests_waiting Requests waiting to be scheduled.",
                "# TYPE vllm:num_requests_waiting gauge",
                f"vllm:num_requests_waiting {self.waiting}",
                "# HELP vllm:gpu_cache_usage_perc KV-cache usage (1 = full).",
                "# TYPE vllm:gpu_cache_usage_perc gauge",
                f"vllm:gpu_cache_usage_perc {self.kv_usage:.6f}",
                "# HELP vllm:request_success_total Finished requests.",
                "# TYPE vllm:request_success_total counter",
                f"vllm:request_success_total {self.requests}",
                "# HELP vllm:prompt_tokens_total Prefilled tokens.",
                "# TYPE vllm:prompt_tokens_total counter",
                f"vllm:prompt_tokens_total {self.prompt_tokens}",
                "# HELP vllm:generation_tokens_total Generated tokens.",
                "# TYPE vllm:generation_tokens_total counter",
                f"vllm:generation_tokens_total {self.generation_tokens}",
            ]
            lines += self.ttft.render("vllm:time_to_first_token_seconds",
                                      "Time to first token.")
            lines += self.itl.render("vllm:time_per_output_token_seconds",
                                     "Inter-token latency.")
        return "\n".join(lines) + "\n"


class SimServer:
    """One run of the simulator on a scenario. Use as a context manager."""

    def __init__(self, scenario: Scenario, *, labels: str | os.PathLike[str] | None = None,
                 metrics_port: int | None = 0, session: str | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        """Prepare a run; :meth:`start` launches it.

        Args:
            scenario: what to run.
            labels: JSON-lines ground-truth file to write (None: no labels).
            metrics_port: loopback port for ``/metrics`` (0: any free port, None: off).
            session: unique name prefix for shared memory and cgroups.
            log: where progress lines go (default: nowhere).
        """
        self.scenario = scenario
        self.session = session or f"prism-sim-{os.getpid()}-{time.monotonic_ns() % 10**6}"
        self.labels_path = labels
        self.metrics_port = metrics_port
        self.log = log or (lambda _line: None)
        self.stats = ServerStats()
        self.timeline = FaultTimeline()
        self.ranks: list[subprocess.Popen[bytes]] = []
        self.control: ControlBlock | None = None
        self.labels: LabelWriter | None = None
        self.injectors: dict[int, tuple[FaultSpec, Injector]] = {}
        self.started_ns = 0
        self.metrics_url: str | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._readers: list[threading.Thread] = []
        self._closed = False
        self._label_lock = threading.Lock()
        self._meter: EffectMeter | None = None
        self._meter_tokens: dict[int, Any] = {}
        self._ready: set[int] = set()
        self._comm_id: bytes | None = None
        self._guard: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def rank_pids(self) -> dict[int, int]:
        """Rank number → pid of its process."""
        return {i: p.pid for i, p in enumerate(self.ranks)}

    @property
    def comm_id(self) -> str | None:
        """This run's communicator id (hex), on every rank's command line: a ``--match``
        regex with it picks this server's ranks and no other's."""
        return None if self._comm_id is None else self._comm_id.hex()

    def start(self) -> SimServer:
        """Create the control block, start every rank, the metrics server and the labels."""
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        world = self.scenario.topology.ranks
        comm_id = self._comm_id = SimDevice.new_comm_id()
        self._start_guard("/dev/shm" + SimDevice.comm_shm_name(comm_id))
        self.control = ControlBlock.create(f"{self.session}-ctl", world)
        self.started_ns = time.monotonic_ns()
        if self.labels_path is not None:
            self.labels = LabelWriter(self.labels_path, self.timeline)
            self.labels.scenario(self.scenario, self.started_ns)
        plan_pipes = [os.pipe() for _ in range(world - 1)]
        for r in range(world):
            report_r, report_w = os.pipe()
            fds = [report_w]
            cmd = [sys.executable, "-m", "prism_sim.engine", "--rank", str(r),
                   "--world", str(world), "--scenario", self.scenario.source,
                   "--comm-id", comm_id.hex(), "--control", self.control.name,
                   "--report-fd", str(report_w), "--parent-pid", str(os.getpid())]
            if r == 0:
                writers = [w for _, w in plan_pipes]
                fds += writers
                cmd += ["--plan-fds", ",".join(map(str, writers))]
            else:
                reader = plan_pipes[r - 1][0]
                fds.append(reader)
                cmd += ["--plan-fd", str(reader)]
            # each rank owns one device, as a tensor-parallel worker does on a GPU host
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(r))
            proc = subprocess.Popen(cmd, pass_fds=fds, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=False)
            os.close(report_w)
            self.ranks.append(proc)
            t = threading.Thread(target=self._read_reports, args=(report_r,), daemon=True,
                                 name=f"report-r{r}")
            t.start()
            self._readers.append(t)
        for r, w in plan_pipes:
            os.close(r)
            os.close(w)
        self._wait_ready(world)
        # every rank mapped the control block (before it said ready): from now on a
        # SIGKILL of this process cannot leave its name behind
        self.control.unlink()
        if self.metrics_port is not None:
            self._start_metrics(self.metrics_port)
        self.log(f"simulator {self.scenario.name}: {world} ranks, pids "
                 f"{', '.join(str(p.pid) for p in self.ranks)}"
                 + (f", metrics {self.metrics_url}" if self.metrics_url else ""))

    def _start_guard(self, *shm_paths: str) -> None:
        """Start the guard that cleans up if this process dies without :meth:`close`."""
        cmd = [sys.executable, "-m", "prism_sim.guard", "--session", self.session]
        for path in shm_paths:
            cmd += ["--shm", path]
        # its stdin is a pipe only this process holds (close_fds for every child): EOF
        # there means this process is gone
        self._guard = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                       close_fds=True)

    def _release_guard(self) -> None:
        """Tell the guard everything is cleaned up and reap it (never raises)."""
        guard, self._guard = self._guard, None
        if guard is not None:
            release(guard)

    def _wait_ready(self, world: int, timeout_s: float = 60.0) -> None:
        """Block until every rank has opened its device (or fail if one exits)."""
        deadline = time.monotonic() + timeout_s
        while len(self._ready) < world:
            dead = [f"rank {i} rc={p.returncode}" for i, p in enumerate(self.ranks)
                    if p.poll() is not None]
            if dead:
                raise SimError("a rank process exited at start: " + ", ".join(dead))
            if time.monotonic() > deadline:
                raise SimError(f"ranks not ready after {timeout_s:g} s")
            time.sleep(0.01)

    def _start_metrics(self, port: int) -> None:
        stats = self.stats

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = stats.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                return

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.metrics_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/metrics"
        threading.Thread(target=self._httpd.serve_forever, daemon=True,
                         name="metrics").start()

    def _read_reports(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as stream:
            for line in stream:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                self._on_record(rec)

    def _on_record(self, rec: dict[str, Any]) -> None:
        kind = rec.get("kind")
        st = self.stats
        if kind == "ready":
            self._ready.add(rec["rank"])
        elif kind == "iteration":
            with st.lock:
                st.iterations[rec["rank"]] = st.iterations.get(rec["rank"], 0) + 1
            if self.labels is not None:
                with self._label_lock:
                    if not self.labels.closed:
                        self.labels.iteration(rec["rank"], rec["index"], rec["start_ns"],
                                              rec["end_ns"], rec["phase"], rec["batch_size"],
                                              rec["tokens"], rec["kv_len"])
        elif kind == "state":
            with st.lock:
                st.running, st.waiting, st.kv_usage = (rec["running"], rec["waiting"],
                                                       rec["kv_usage"])
        elif kind == "request":
            with st.lock:
                st.requests += 1
                st.prompt_tokens += rec["prompt_tokens"]
                st.generation_tokens += rec["output_tokens"]
                st.ttft.observe(rec["ttft_s"])
                if rec["itl_s"] > 0:
                    st.itl.observe(rec["itl_s"])

    # ------------------------------------------------------------------ running
    def alive(self) -> bool:
        """True while every rank process runs."""
        return bool(self.ranks) and all(p.poll() is None for p in self.ranks)

    def run(self, duration_s: float | None = None, stop: threading.Event | None = None
            ) -> None:
        """Drive the fault timeline until the duration ends, ``stop`` is set or a rank dies."""
        assert self.control is not None, "start() first"
        limit = duration_s if duration_s is not None else self.scenario.duration_s
        stop = stop or threading.Event()
        horizon = limit if limit else 24 * 3600.0
        timeline = sorted(self.scenario.fault_timeline(horizon), key=lambda f: f.start_s)
        ctx = FaultContext(self.control, self.rank_pids, self.session)
        if self._meter is None:  # the measured effect of each fault window
            self._meter = EffectMeter(self.rank_pids.values())
        pending = list(enumerate(timeline))
        while not stop.is_set():
            t = (time.monotonic_ns() - self.started_ns) / 1e9
            if limit and t >= limit:
                break
            if not self.alive():
                raise SimError("a rank process exited: "
                               + ", ".join(f"rank {i} rc={p.returncode}"
                                           for i, p in enumerate(self.ranks)
                                           if p.poll() is not None))
            for key, (spec, inj) in list(self.injectors.items()):
                if t >= spec.start_s + spec.duration_s:
                    self._end_fault(key, spec, inj)
            while pending and pending[0][1].start_s <= t:
                key, spec = pending.pop(0)
                inj = make_injector(spec, ctx)
                # on from the moment it starts switching on (iterations that end while
                # it does are labelled with it): a CPU squeeze's hogs burn, and spawning
                # them loads the CPUs, before the last one says ready
                self._meter_tokens[key] = self._meter.fault_on()
                self.timeline.started(spec, time.monotonic_ns())
                inj.start()
                self.injectors[key] = (spec, inj)
                self.log(f"fault on: {spec.type} rank {spec.rank} intensity {spec.intensity}")
            stop.wait(0.02)

    def _end_fault(self, key: int, spec: FaultSpec, inj: Injector) -> None:
        inj.stop()
        end = time.monotonic_ns()
        self.timeline.ended(spec, end)
        self.injectors.pop(key, None)
        token = self._meter_tokens.pop(key, None)
        effect = (self._meter.fault_off(token, inj.effect())
                  if token is not None and self._meter is not None else None)
        if self.labels is not None:
            start = self.timeline.start_of(spec)
            with self._label_lock:
                self.labels.fault(spec, start if start is not None else end, end, effect)
        self.log(f"fault off: {spec.type} rank {spec.rank}")

    # ------------------------------------------------------------------ cleanup
    def close(self) -> None:
        """Stop faults and ranks, close labels and metrics, remove shared memory."""
        if self._closed:
            return
        self._closed = True
        for key, (spec, inj) in list(self.injectors.items()):
            with contextlib.suppress(Exception):  # every exit path must finish cleaning up
                self._end_fault(key, spec, inj)
        stop_all(inj for _, inj in self.injectors.values())
        # rank 0 stops first and tells the others; they are killed only if they linger
        if self.ranks and self.ranks[0].poll() is None:
            self.ranks[0].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.ranks:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._comm_id is not None:
            SimDevice.unlink_comm(self._comm_id)
        for t in self._readers:
            t.join(2)
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self.labels is not None:
            with self._label_lock:
                self.labels.close()
        if self.control is not None:
            self.control.close()
            self.control.unlink()
        for leftover in glob.glob(f"/dev/shm/{self.session}*"):
            Path(leftover).unlink(missing_ok=True)
        cleanup_session(self.session)  # cgroups a throttle left if it was interrupted
        self._release_guard()
