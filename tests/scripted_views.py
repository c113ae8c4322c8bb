"""Scripted dashboard input: a deterministic sequence of :class:`DashboardView` and a control.

:func:`replay_views` plays a short, scripted workload with a fixed clock and a seeded
generator through the engine's real :class:`~prism_tui.engine.sketches.WindowedSketches`,
so the snapshots carry real t-digest quantiles; the detector states and alerts are
scripted (8 devices × 12 stages for the render benchmark, exact snapshots for the tests).
The real engine replaying spans recorded through real uprobes drives the dashboard in
``tests/test_ui_engine.py``. The story: devices warm up their detectors,
the workload's batch size swings (slower iterations the model explains), then a
device slowdown on the last device inflates its ``sync`` stage, an alert fires (queued,
then acknowledged by the broker) and resolves after the fault. One telemetry metric is
unavailable throughout. Tests, snapshots and the benchmark all use it; nothing here reads
the wall clock.
"""

from __future__ import annotations

import math
import os
import random
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from prism_tui.dashboard_view import DashboardView, DeliveryStatus
from prism_tui.engine.sketches import ITERATION, SeriesKey, Snapshot, WindowedSketches
from prism_tui.engine.trace_export import write_chrome_trace
from prism_tui.engine.view import (
    WINDOWS_S,
    AlertRecord,
    Candidate,
    DetectorPoint,
    DetectorState,
    GovernorAction,
    GovernorStatus,
    IterationBar,
    ProbeStatus,
    SloStatus,
    TargetStatus,
    TelemetryValue,
    frozen_snapshots,
)

DEVICES = ("cuda:0", "cuda:1")
STAGES = ("host", "launch", "sync", "memcpy", "collective")
BASE_MS = {"host": 4.0, "launch": 3.0, "sync": 11.0, "memcpy": 2.0, "collective": 4.0}
GOVERNED_AT_S = 12
"""When the replay's overhead governor detaches rank 0's launch probe."""
MONO0 = 1_000_000_000_000
"""The replay's CLOCK_MONOTONIC origin (ns)."""
WALL0 = 1_767_225_600.0
"""Its wall-clock origin: 2026-01-01T00:00:00Z."""
HOST = "gpu-node-7"
BROKER = "mqtt://127.0.0.1:1883"
HISTORY = "~/.local/state/prism/history.db"
WARMUP = 240
UCL = 0.12


@dataclass(frozen=True)
class ReplaySpan:
    """A recorded probed call (fits the engine's ``SpanLike``) for trace exports."""

    probe: str
    pid: int
    tid: int
    start_ns: int
    end_ns: int
    args: Mapping[str, int | float] = field(default_factory=dict)


@dataclass
class _Dev:
    pid: int
    history: deque[float] = field(default_factory=lambda: deque(maxlen=10))
    decode_seen: int = 0
    firing: bool = False
    quiet: int = 0
    alert_seq: int = 0
    fault_start_ns: int = 0
    normal: deque[dict[str, float]] = field(default_factory=lambda: deque(maxlen=200))
    recent: deque[dict[str, float]] = field(default_factory=lambda: deque(maxlen=20))


def _stage_names(n: int) -> tuple[str, ...]:
    if n <= len(STAGES):
        return STAGES[:n]
    extra = ("gemm", "attention", "sampling", "detokenize", "gc", "gil", "runqueue",
             "allgather", "kv-copy", "softmax")
    names = list(STAGES) + [extra[i % len(extra)] + ("" if i < len(extra) else str(i))
                            for i in range(n - len(STAGES))]
    return tuple(names)


def _suspects(dev: _Dev, device: str) -> tuple[dict[str, float | str], ...]:
    if not dev.normal or not dev.recent:
        return ()
    stages = sorted({k for r in (*dev.normal, *dev.recent) for k in r})
    scored = []
    for st in stages:
        mb = sum(r.get(st, 0.0) for r in dev.normal) / len(dev.normal)
        ma = sum(r.get(st, 0.0) for r in dev.recent) / len(dev.recent)
        if ma - mb > 0.005:
            scored.append((round((ma - mb) * 10, 4), st, round(ma - mb, 4)))
    scored.sort(reverse=True)
    return tuple({"stage": st, "device": device, "metric": "share", "score": score,
                  "delta_share": delta} for score, st, delta in scored[:3])


def replay_views(n: int = 60, *, devices: Sequence[str] = DEVICES, stages: int = 5,
                 iterations_per_s: int = 20, fault: tuple[float, float] | None = (30.0, 42.0),
                 seed: int = 7) -> list[DashboardView]:
    """``n`` views, one per simulated second, of a workload on ``devices``.

    Args:
        n: number of views (one per second of replayed time).
        devices: device names; the last one gets the fault.
        stages: stages per iteration besides ``iteration`` (5: host, launch, sync, memcpy,
            collective; more adds gemm, attention, sampling...).
        iterations_per_s: iterations per second and device.
        fault: ``(start_s, end_s)`` of the slowdown on the last device, or None.
        seed: the generator's seed (same seed, same views).
    """
    rng = random.Random(seed)
    names = _stage_names(stages)
    base = {s: BASE_MS.get(s, 1.0 + (i % 4)) for i, s in enumerate(names)}
    now = MONO0
    sk = WindowedSketches(1.0, 300.0, clock=lambda: now, lateness_s=0.5)
    devs = {d: _Dev(pid=4242 + i) for i, d in enumerate(devices)}
    faulty = devices[-1]
    bars: deque[IterationBar] = deque(maxlen=40 * len(devices))
    points: deque[DetectorPoint] = deque(maxlen=120 * len(devices))
    alerts: deque[AlertRecord] = deque(maxlen=50)
    queued: set[str] = set()
    views: list[DashboardView] = []
    step = 1_000_000_000 // iterations_per_s
    for sec in range(n):
        t0 = MONO0 + sec * 1_000_000_000
        in_fault = fault is not None and fault[0] <= sec < fault[1]
        batch = 24 + 20 * math.sin(sec / 9.0)
        notices: list[str] = []
        if fault is not None and sec == int(fault[0]):
            notices.append(f"sim: fault device-slowdown on {faulty} (sync x3) started")
        if fault is not None and sec == int(fault[1]):
            notices.append(f"sim: fault device-slowdown on {faulty} ended")
        for k in range(iterations_per_s):
            end = t0 + (k + 1) * step - 1
            for d, dev in devs.items():
                prefill = k % 8 == 0
                phase = "prefill" if prefill else "decode"
                scale = (0.6 + batch / 40.0) * (3.5 if prefill else 1.0)
                times = {s: base[s] * scale * rng.lognormvariate(0.0, 0.08) for s in names}
                if in_fault and d == faulty:
                    times["sync"] *= 3.0
                total = sum(times.values()) * 1.02
                for s, v in times.items():
                    sk.add(SeriesKey(s, d, phase), end, v)
                sk.add(SeriesKey(ITERATION, d, phase), end, total)
                shares = tuple((s, v / total) for s, v in times.items())
                bars.append(IterationBar(dev.pid, d, phase, end, total, shares, batch))
                if prefill:
                    continue
                dev.decode_seen += 1
                predicted = sum(base.values()) * (0.6 + batch / 40.0) * 1.02
                err = max(0.0, (total - predicted) / total)
                dev.history.append(err)
                smoothed = sum(dev.history) / len(dev.history)
                live = dev.decode_seen > WARMUP
                row = dict(shares)
                (dev.recent if dev.firing or (live and smoothed > UCL) else dev.normal).append(
                    row)
                firing_now = live and smoothed > UCL
                points.append(DetectorPoint(dev.pid, d, "decode", end, total, predicted,
                                            smoothed, UCL, firing_now))
                if not live:
                    continue
                wall = WALL0 + (end - MONO0) / 1e9
                if firing_now and not dev.firing:
                    dev.firing, dev.quiet, dev.alert_seq = True, 0, dev.alert_seq + 1
                    dev.fault_start_ns = end
                    aid = f"a-{d}-{dev.alert_seq}-firing"
                    sus = _suspects(dev, d)
                    top = f"; top suspect: {sus[0]['stage']}" if sus else ""
                    alerts.append(AlertRecord(
                        aid, f"fp-{d}-decode", "firing", "critical", "detector", dev.pid, d,
                        ITERATION, "decode", total, predicted, smoothed, UCL, end, wall,
                        f"decode iterations on {d} {smoothed * 100:.0f}% slower than the "
                        f"workload explains{top}", sus, "queued"))
                    queued.add(aid)
                elif dev.firing and smoothed < UCL / 2:
                    dev.quiet += 1
                    if dev.quiet >= 20:
                        dev.firing = False
                        aid = f"a-{d}-{dev.alert_seq}-resolved"
                        alerts.append(AlertRecord(
                            aid, f"fp-{d}-decode", "resolved", "info", "detector", dev.pid,
                            d, ITERATION, "decode", total, predicted, smoothed, UCL, end, wall,
                            f"decode iterations on {d} back to predicted latency", (),
                            "queued"))
                        queued.add(aid)
                        dev.recent.clear()
                elif dev.firing:
                    dev.quiet = 0
        now = t0 + 1_600_000_000
        sk.tick(now)
        snaps = frozen_snapshots({w: sk.snapshot(now, w) for w in WINDOWS_S})
        # the broker acknowledges a queued alert on the next view
        shown = tuple(replace(a, delivery="sent") if a.id not in queued else a for a in alerts)
        pending = len(queued)
        queued.clear()
        views.append(DashboardView(
            now_ns=now, host=HOST,
            targets=tuple(_target(d, dev, names, iterations_per_s, sec)
                          for d, dev in devs.items()),
            snapshots=snaps,
            iterations=tuple(bars),
            detector=tuple(points),
            detectors=tuple(_detector_state(d, dev) for d, dev in devs.items()),
            alerts=shown,
            telemetry=_telemetry(devices, faulty, in_fault, batch),
            delivery=DeliveryStatus(BROKER, "connected", pending, sum(
                1 for a in alerts) - pending),
            slos=_slos(snaps.get(60.0), devices, float(round(sum(base.values()) * 2.1))),
            history_path=HISTORY,
            notices=tuple(notices),
        ))
    return views


def _target(device: str, dev: _Dev, names: Sequence[str], ips: int, sec: int) -> TargetStatus:
    probes = [ProbeStatus(f"cuda:{s}", s, "attached", "libcudart.so.12", "",
                          float(ips * (3 if s == "launch" else 1))) for s in names]
    probes.append(ProbeStatus("cuda:cudaMemcpyPeerAsync", "memcpy", "missing",
                              "libcudart.so.12", "symbol not exported by this libcudart"))
    rank = device.rsplit(":", 1)[-1]
    decisions: tuple[GovernorAction, ...] = ()
    if rank == "0" and sec >= GOVERNED_AT_S:  # the launch probe costs too much: detached
        launch = ips * 3.0 * 40  # 40 kernel launches a step on a busy rank
        reason = (f"estimated {launch * 1.5e-6:.2%} of the target's time ({launch:.0f} "
                  "calls/s x 1.5 us, emulated site); total 0.61% > budget 0.50%")
        probes = [replace(p, status="detached", reason=reason, hits_per_s=0.0)
                  if p.probe == "cuda:launch" else p for p in probes]
        decisions = (GovernorAction("cuda:launch", "detached", 100 * launch * 1.5e-6,
                                    launch, 1.5, reason, WALL0 + GOVERNED_AT_S),)
    hits = sum(p.hits_per_s for p in probes)
    return TargetStatus(dev.pid, f"sim-rank{rank}", "cuda", device, "attached",
                        tuple(probes), hits, 0 if sec < 20 else 3,
                        0.31 if not decisions else 0.27,
                        governor=GovernorStatus(0.5, "detach", decisions))


def _detector_state(device: str, dev: _Dev) -> DetectorState:
    if dev.decode_seen < WARMUP:
        return DetectorState(dev.pid, device, "decode", "warming", dev.decode_seen, WARMUP)
    if dev.decode_seen < WARMUP + 20:
        return DetectorState(dev.pid, device, "decode", "fitting", WARMUP, WARMUP)
    return DetectorState(dev.pid, device, "decode", "live", WARMUP, WARMUP, dev.firing)


def _telemetry(devices: Sequence[str], faulty: str, in_fault: bool,
               batch: float) -> tuple[TelemetryValue, ...]:
    out: list[TelemetryValue] = []
    for i, d in enumerate(devices):
        slow = in_fault and d == faulty
        out += [
            TelemetryValue(d, "util", round(60 + batch, 1), "%"),
            TelemetryValue(d, "sm_clock", 705.0 if slow else 1410.0 + 15 * i, "MHz"),
            TelemetryValue(d, "mem_used", round(61.5 + i * 0.7, 1), "GiB"),
            TelemetryValue(d, "temp", 64.0 + 2 * i + (6 if slow else 0), "°C"),
            TelemetryValue(d, "power", None if d == faulty else round(250 + 3 * batch), "W",
                           "not supported on this GPU" if d == faulty else None),
        ]
    out += [TelemetryValue("host", "cpu", round(35 + batch / 2, 1), "%"),
            TelemetryValue("host", "cpu_freq", 2600.0, "MHz")]
    return tuple(out)


def _slos(snap: Snapshot | None, devices: Sequence[str],
          limit_ms: float) -> tuple[SloStatus, ...]:
    value: float | None = None
    if snap is not None:
        vals = [s.p99 for d in devices if (s := snap.get(ITERATION, d, "decode")) is not None]
        value = max(vals) if vals else None
    return (SloStatus("decode-p99", ITERATION, 0.99, limit_ms, 60.0, value,
                      value is not None and value > limit_ms),)


class RecordedControl:
    """An :class:`~prism_tui.ui.control.EngineControl` over recorded processes and spans.

    Attach and detach change which candidates are watched (a pid that is not offered is
    an error line, like a process that exited); the export writes real Chrome trace JSON
    from recorded spans of the last ``seconds`` before the newest one.
    """

    def __init__(self, candidates: Sequence[Candidate] | None = None,
                 spans: Sequence[ReplaySpan] | None = None) -> None:
        self._cands = {c.pid: c for c in (candidates if candidates is not None else (
            Candidate(4242, "sim-rank0", "python -m prism_sim.rank --rank 0", True),
            Candidate(4243, "sim-rank1", "python -m prism_sim.rank --rank 1", True),
            Candidate(5150, "vllm", "python -m vllm.entrypoints.openai.api_server "
                      "--model llama-3-8b", False),
        ))}
        self._spans = list(spans) if spans is not None else recorded_spans()

    def candidates(self) -> list[Candidate]:
        """The recorded processes, by pid."""
        return [self._cands[p] for p in sorted(self._cands)]

    def attach(self, pid: int) -> str | None:
        """Watch ``pid``; an error line when it is not among the candidates."""
        c = self._cands.get(pid)
        if c is None:
            return f"pid {pid}: no such process"
        if c.watched:
            return f"pid {pid} ({c.name}) is already watched"
        self._cands[pid] = replace(c, watched=True)
        return None

    def detach(self, pid: int) -> None:
        """Stop watching ``pid`` (no-op when it is not watched)."""
        c = self._cands.get(pid)
        if c is not None:
            self._cands[pid] = replace(c, watched=False)

    def export_trace(self, seconds: float, path: str) -> str:
        """Write the recorded spans of the last ``seconds`` as Chrome trace JSON."""
        last = max((s.end_ns for s in self._spans), default=0)
        keep = [s for s in self._spans if s.end_ns >= last - int(seconds * 1e9)]
        names = {c.pid: c.name for c in self._cands.values()}
        return write_chrome_trace(keep, os.fspath(path), names)


def recorded_spans(seconds: int = 3, seed: int = 7) -> list[ReplaySpan]:
    """Probed calls of two ranks over ``seconds`` (launch, sync, memcpy per iteration)."""
    rng = random.Random(seed)
    out: list[ReplaySpan] = []
    for pid in (4242, 4243):
        t = MONO0
        while t < MONO0 + seconds * 1_000_000_000:
            for probe, ms in (("cudaLaunchKernel", 0.02), ("cudaMemcpyAsync", 0.3),
                              ("cudaStreamSynchronize", 11.0)):
                dur = int(ms * 1e6 * rng.lognormvariate(0.0, 0.1))
                out.append(ReplaySpan(probe, pid, pid, t, t + dur))
                t += dur + 200_000
            t += 10_000_000
    return out
