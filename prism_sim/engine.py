"""The simulated inference engine: one tensor-parallel rank per process.

Rank 0 is the driver: it runs the load generator and a continuous-batching scheduler
(a request queue, chunked prefill and decode iterations) and sends every iteration's plan
to the other ranks. Every rank then does the same work the way a GPU engine does it:
host-side preparation in Python, a host-to-device copy of the batch's token ids, per
layer a GEMM, an attention kernel and an all-reduce, a device-to-host copy of the sampled
tokens, and a stream synchronisation. Rank 0 then samples and detokenises in Python.

The workload reaches the runtime through call arguments, as on a real engine, so a
monitor can recover it non-intrusively: copy sizes are ``8 × tokens`` (H2D input ids),
``4 × kv_len`` (H2D KV-slot indices), ``8 × batch`` (D2H), all-reduce counts
``tokens × hidden``. Decode latency follows
``a + b·B + c·B·kv_len``: weight reads (a), GEMM FLOPs per token (b) and KV-cache reads (c).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import IO, Any

from prism_sim.control import ControlBlock
from prism_sim.errors import SimError
from prism_sim.runtime import Kernel, SimDevice
from prism_sim.scenario import Scenario, load_scenario

PREFILL_CHUNK_TOKENS = 256
# Host-side CPU work per iteration, as a real engine spends it (scheduling, input
# preparation, sampling, detokenisation): real Python work sized to these times on an
# idle core, so CPU faults slow it the way they slow a real engine's host loop.
HOST_BASE_US = 1800.0
HOST_PER_SEQ_US = 60.0
SAMPLE_PER_SEQ_US = 40.0
KV_CAPACITY_TOKENS = 65536
BYTES_PER_PARAM = 2  # fp16 weights and KV cache


@dataclass
class Request:
    """One generation request as the scheduler tracks it."""

    rid: int
    arrival_ns: int
    prompt_len: int
    output_len: int
    prefilled: int = 0
    generated: int = 0
    first_token_ns: int = 0
    last_token_ns: int = 0
    itl_ns: list[int] = field(default_factory=list)

    @property
    def kv_len(self) -> int:
        """Tokens in this sequence's KV cache."""
        return self.prefilled + self.generated


@dataclass(frozen=True)
class Plan:
    """What one iteration computes; rank 0 sends it to the other ranks."""

    index: int
    phase: str  # "prefill" | "decode"
    batch_size: int
    tokens: int
    kv_total: int

    def to_line(self) -> bytes:
        """One JSON line (well under PIPE_BUF, so pipe writes are atomic)."""
        return (json.dumps(self.__dict__) + "\n").encode()


class CostModel:
    """Kernels of one iteration on one rank, from the model shape and the workload."""

    def __init__(self, device: SimDevice, layers: int, hidden: int, world: int) -> None:
        """Precompute per-token costs for a ``layers`` × ``hidden`` model split ``world`` ways."""
        self.device = device
        self.layers = layers
        self.hidden = hidden
        self.world = world
        params_per_layer = 12 * hidden * hidden / world
        self.weight_bytes = params_per_layer * BYTES_PER_PARAM
        self.flops_per_token = 2 * params_per_layer
        self.kv_bytes_per_token = 2 * hidden / world * BYTES_PER_PARAM

    def kernels(self, plan: Plan) -> list[tuple[Kernel, Kernel]]:
        """(gemm, attention) kernel descriptors of every layer for ``plan``."""
        d = self.device
        gemm = d.kernel("gemm", self.flops_per_token * plan.tokens, self.weight_bytes)
        attn_flops = 4 * self.hidden / self.world * plan.kv_total * max(1, plan.tokens
                                                                          // plan.batch_size)
        attn = d.kernel("attention", attn_flops, self.kv_bytes_per_token * plan.kv_total)
        return [(gemm, attn)] * self.layers


class Rank:
    """One rank process: owns its device, runs plans, reports iterations."""

    def __init__(self, args: argparse.Namespace, scenario: Scenario) -> None:
        """Open the device and the control block named on the command line."""
        self.args = args
        self.rank = args.rank
        self.world = args.world
        self.scenario = scenario
        topo = scenario.topology
        self.report: IO[bytes] = os.fdopen(args.report_fd, "wb", buffering=0)
        self.control = ControlBlock.attach(args.control)
        self.device = SimDevice(
            args.rank, args.world, bytes.fromhex(args.comm_id), control=args.control,
            flops_per_s=topo.flops_per_s, mem_bw=topo.mem_bw, link_bw=topo.link_bw,
            pcie_bw=topo.pcie_bw, jitter=topo.jitter, seed=scenario.seed * 100 + args.rank)
        self.model = CostModel(self.device, topo.layers, topo.hidden, args.world)
        self.host = HostWork()
        self.garbage: list[Any] = []
        self.busy_threads: list[threading.Thread] = []
        self.busy_stop = threading.Event()
        self.stopping = False

    # ------------------------------------------------------------------ faults in-process
    def _apply_host_faults(self) -> None:
        """gc_storm and gil_contention act inside the rank's own interpreter."""
        ctl = self.control.get(self.rank)
        if ctl.gc_storm > 0:
            for _ in range(ctl.gc_storm * 1000):
                a: list[Any] = []
                b: list[Any] = [a]
                a.append(b)  # a reference cycle only the cyclic GC can free
        wanted = max(0, ctl.gil_contention)
        if wanted != len(self.busy_threads):
            self.busy_stop.set()
            for t in self.busy_threads:
                t.join()
            self.busy_threads = []
            self.busy_stop = threading.Event()
            for _ in range(wanted):
                t = threading.Thread(target=_spin, args=(self.busy_stop,), daemon=True)
                t.start()
                self.busy_threads.append(t)

    # ------------------------------------------------------------------ one iteration
    def host_prepare(self, plan: Plan) -> bytes:
        """Build the batch's input ids in Python after the host stage's calibrated work."""
        self.host.run(HOST_BASE_US + HOST_PER_SEQ_US * plan.batch_size)
        ids = bytearray(8 * plan.tokens)
        for i in range(0, len(ids), 8):
            ids[i] = (i * 31 + plan.index) & 0x7F
        return bytes(ids)

    def execute(self, plan: Plan) -> bytes:
        """Run ``plan`` on the device; returns the sampled token ids (D2H bytes)."""
        self._apply_host_faults()
        ids = self.host_prepare(plan)
        d = self.device
        d.memcpy_h2d(ids, len(ids))
        # the attention metadata: int32 KV-cache slot indices of every sequence (FlashInfer's
        # kv_indices with SGLang's page size of 1), so the copy grows with the context
        d.memcpy_h2d(None, 4 * plan.kv_total)
        for gemm, attn in self.model.kernels(plan):
            # tensor parallelism all-reduces twice a layer: after attention, after the MLP
            d.launch(attn)
            d.allreduce(plan.tokens * self.model.hidden)
            d.launch(gemm)
            d.allreduce(plan.tokens * self.model.hidden)
        d.memcpy_d2h(8 * plan.batch_size)
        d.synchronize()
        return d.read_d2h()

    def send(self, record: dict[str, Any]) -> None:
        """A JSON line to the orchestrator (iterations, requests, state)."""
        try:
            self.report.write((json.dumps(record) + "\n").encode())
        except BrokenPipeError:
            self.stopping = True

    def iteration_record(self, plan: Plan, start_ns: int, end_ns: int) -> None:
        """Report one finished iteration (the orchestrator writes the label)."""
        self.send({"kind": "iteration", "rank": self.rank, "index": plan.index,
                   "start_ns": start_ns, "end_ns": end_ns, "phase": plan.phase,
                   "batch_size": plan.batch_size, "tokens": plan.tokens,
                   "kv_len": plan.kv_total})

    def close(self) -> None:
        """Release the device, the control block and the report pipe (idempotent)."""
        self.busy_stop.set()
        self.device.close()
        self.control.close()
        if not self.report.closed:
            self.report.close()


class HostWork:
    """Real CPU work in Python, calibrated once so ``run(us)`` takes ``us`` when idle."""

    def __init__(self) -> None:
        """Measure how many work units fit in a microsecond on this host."""
        self.units_per_us = 1.0
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            self._units(2000)
            best = min(best, time.perf_counter() - t0)
        self.units_per_us = 2000 / (best * 1e6)

    @staticmethod
    def _units(n: int) -> int:
        table: dict[int, list[int]] = {}
        total = 0
        for i in range(n):
            block = table.setdefault(i & 63, [])
            block.append(i)
            total += len(block) ^ i
            if len(block) > 16:
                block.clear()
        return total

    def run(self, us: float) -> int:
        """Do ``us`` microseconds' worth of work (longer when the CPU is contended)."""
        return self._units(max(1, int(us * self.units_per_us)))


def _spin(stop: threading.Event) -> None:
    """A busy pure-Python background thread (metrics, tokeniser...): bursts of ~2 ms of
    GIL-holding work with short pauses, so the rank waits for the GIL at every handoff."""
    while not stop.is_set():
        end = time.perf_counter() + 0.002
        x = 0
        while time.perf_counter() < end:
            x += 1
        time.sleep(0.0005)


class Scheduler:
    """Continuous batching on rank 0: arrivals, admission, chunked prefill, decode."""

    def __init__(self, scenario: Scenario, started_ns: int) -> None:
        """Seeded from the scenario, so a run is reproducible up to timing noise."""
        self.scenario = scenario
        self.rng = random.Random(scenario.seed)
        self.started_ns = started_ns
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished: list[Request] = []
        self.next_rid = 0
        self.next_arrival_ns = started_ns
        self.index = 0
        self._schedule_arrival(started_ns)

    def _schedule_arrival(self, now_ns: int) -> None:
        phase = self.scenario.phase_at((now_ns - self.started_ns) / 1e9)
        if phase.arrival_rate <= 0:
            self.next_arrival_ns = now_ns + 50_000_000  # idle gap: look again in 50 ms
            self._pending_arrival = False
            return
        gap = self.rng.expovariate(phase.arrival_rate)
        self.next_arrival_ns = now_ns + int(gap * 1e9)
        self._pending_arrival = True

    def admit_arrivals(self, now_ns: int) -> None:
        """Turn every arrival due by ``now_ns`` into a waiting request."""
        while self.next_arrival_ns <= now_ns:
            at = self.next_arrival_ns
            phase = self.scenario.phase_at((at - self.started_ns) / 1e9)
            if self._pending_arrival:
                self.waiting.append(Request(self.next_rid, at, phase.prompt.sample(self.rng),
                                            phase.output.sample(self.rng)))
                self.next_rid += 1
            self._schedule_arrival(at)

    def kv_used(self) -> int:
        """Tokens held in the KV cache by running sequences."""
        return sum(r.kv_len for r in self.running)

    def next_plan(self, now_ns: int) -> tuple[Plan, list[Request]] | None:
        """The next iteration, or None when there is nothing to do."""
        self.admit_arrivals(now_ns)
        phase = self.scenario.phase_at((now_ns - self.started_ns) / 1e9)
        while (self.waiting and len(self.running) < phase.max_batch
               and self.kv_used() + self.waiting[0].prompt_len < KV_CAPACITY_TOKENS):
            self.running.append(self.waiting.popleft())
        prefill = [r for r in self.running if r.prefilled < r.prompt_len]
        if prefill:
            budget = PREFILL_CHUNK_TOKENS
            chosen: list[Request] = []
            tokens = 0
            for r in prefill:
                take = min(budget, r.prompt_len - r.prefilled)
                if take <= 0:
                    break
                chosen.append(r)
                tokens += take
                budget -= take
            plan = Plan(self.index, "prefill", len(chosen), tokens,
                        sum(r.kv_len for r in chosen) + tokens)
            self.index += 1
            return plan, chosen
        if not self.running:
            return None
        plan = Plan(self.index, "decode", len(self.running), len(self.running),
                    sum(r.kv_len + 1 for r in self.running))
        self.index += 1
        return plan, list(self.running)

    def complete(self, plan: Plan, batch: list[Request], now_ns: int) -> list[Request]:
        """Advance the batch's sequences after ``plan``; returns requests that finished."""
        done: list[Request] = []
        if plan.phase == "prefill":
            budget = PREFILL_CHUNK_TOKENS
            for r in batch:
                take = min(budget, r.prompt_len - r.prefilled)
                r.prefilled += take
                budget -= take
                if r.prefilled >= r.prompt_len and r.first_token_ns == 0:
                    r.first_token_ns = r.last_token_ns = now_ns  # prefill yields token 1
                    r.generated = 1
        else:
            for r in batch:
                r.generated += 1
                r.itl_ns.append(now_ns - r.last_token_ns)
                r.last_token_ns = now_ns
        for r in list(self.running):
            if r.prefilled >= r.prompt_len and r.generated >= r.output_len:
                self.running.remove(r)
                done.append(r)
        return done


def sample_and_detokenize(token_bytes: bytes, batch: int) -> list[str]:
    """Rank 0's post-processing in Python: pick tokens and turn them into text."""
    pieces = []
    for i in range(batch):
        tok = token_bytes[8 * i] if 8 * i < len(token_bytes) else 0
        logits = [math.sin(tok + j) for j in range(16)]
        best = max(range(16), key=logits.__getitem__)
        pieces.append(f"tok{tok}_{best}".replace("_", " ").strip())
    return pieces


def run_driver(rank: Rank, plan_fds: list[int]) -> None:
    """Rank 0: schedule, broadcast plans, execute, post-process, report."""
    sched = Scheduler(rank.scenario, time.monotonic_ns())
    outs = [os.fdopen(fd, "wb", buffering=0) for fd in plan_fds]
    try:
        while not rank.stopping:
            now = time.monotonic_ns()
            step = sched.next_plan(now)
            if step is None:
                wait_ns = max(0, min(sched.next_arrival_ns - now, 50_000_000))
                time.sleep(wait_ns / 1e9)
                continue
            plan, batch = step
            start = time.monotonic_ns()
            line = plan.to_line()
            for out in outs:
                out.write(line)
            tokens = rank.execute(plan)
            sample_and_detokenize(tokens, plan.batch_size)
            rank.host.run(SAMPLE_PER_SEQ_US * plan.batch_size)
            end = time.monotonic_ns()
            rank.iteration_record(plan, start, end)
            for r in sched.complete(plan, batch, end):
                itl = sum(r.itl_ns) / len(r.itl_ns) if r.itl_ns else 0.0
                rank.send({"kind": "request", "ttft_s": (r.first_token_ns - r.arrival_ns) / 1e9,
                           "itl_s": itl / 1e9, "output_tokens": r.generated,
                           "prompt_tokens": r.prompt_len})
            rank.send({"kind": "state", "running": len(sched.running),
                       "waiting": len(sched.waiting),
                       "kv_usage": sched.kv_used() / KV_CAPACITY_TOKENS})
    finally:
        for out in outs:
            try:
                out.write(b'{"stop": true}\n')
                out.close()
            except OSError:
                pass


def run_worker(rank: Rank, plan_fd: int) -> None:
    """Ranks 1..n-1: execute each plan rank 0 sends, until it says stop."""
    with os.fdopen(plan_fd, "rb") as plans:
        for line in plans:
            msg = json.loads(line)
            if msg.get("stop") or rank.stopping:
                return
            plan = Plan(**msg)
            start = time.monotonic_ns()
            rank.execute(plan)
            rank.iteration_record(plan, start, time.monotonic_ns())


PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies; False if it already did.

    SIGKILL, not SIGTERM: it also ends a process a SIGSTOP duty cycle (``cpu_throttle``)
    left stopped, and needs no handler. The parent may have died before the ``prctl``
    (this process would then never get the signal), so the parent pid is checked after.

    Args:
        parent: the pid the parent had when it started this process (0: not checked).
    """
    # not Linux (no prctl): the orchestrator's close() still stops the rank
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL),
                                                0, 0, 0)
    return parent == 0 or os.getppid() == parent


def main(argv: list[str] | None = None) -> int:
    """Entry point of a rank process (started by :mod:`prism_sim.server`)."""
    p = argparse.ArgumentParser(prog="prism_sim.engine")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--scenario", required=True)
    p.add_argument("--comm-id", required=True)
    p.add_argument("--control", required=True)
    p.add_argument("--report-fd", type=int, required=True)
    p.add_argument("--plan-fds", default="", help="rank 0: fds to send plans on")
    p.add_argument("--plan-fd", type=int, default=-1, help="ranks > 0: fd plans arrive on")
    p.add_argument("--parent-pid", type=int, default=0,
                   help="the orchestrator's pid: the rank dies with it")
    args = p.parse_args(argv)
    if not die_with_parent(args.parent_pid):
        print(f"prism-sim rank {args.rank}: the orchestrator is gone", file=sys.stderr)
        return 1
    # Ctrl-C in a terminal reaches the whole process group: the orchestrator decides.
    # Only rank 0 stops on SIGTERM; it finishes its iteration and tells the others, so no
    # rank ever leaves a collective its peers are still in.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if args.rank != 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        scenario = load_scenario(args.scenario)
        rank = Rank(args, scenario)
    except SimError as exc:
        print(f"prism-sim rank {args.rank}: {exc}", file=sys.stderr)
        return 1

    def on_term(_sig: int, _frame: object) -> None:
        rank.stopping = True

    if args.rank == 0:
        signal.signal(signal.SIGTERM, on_term)
    rank.send({"kind": "ready", "rank": args.rank, "pid": os.getpid()})
    gc.collect()
    try:
        if args.rank == 0:
            fds = [int(x) for x in args.plan_fds.split(",") if x]
            run_driver(rank, fds)
        else:
            run_worker(rank, args.plan_fd)
    except SimError as exc:
        print(f"prism-sim rank {args.rank}: {exc}", file=sys.stderr)
        return 1
    finally:
        rank.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
