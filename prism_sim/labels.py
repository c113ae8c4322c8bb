"""Ground-truth labels: which faults were on when, and every iteration, as JSON lines.

The first line describes the run (``kind = "scenario"``); a ``fault`` line is written
when a fault window ends (or when the file is closed), with its measured ``effect``
where one was measured (files written before it have none); an ``iteration`` line per
iteration per rank says whether a fault was active while it ran. Times are
CLOCK_MONOTONIC nanoseconds (:func:`time.monotonic_ns`), the clock of the monitor's
uprobe timestamps, so detections can be scored sample by sample as the paper does.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from prism_sim.errors import SimError
from prism_sim.scenario import FaultSpec, Scenario

__all__ = [
    "ITERATION_PHASES",
    "SCHEMA",
    "STRENGTH_BUCKETS",
    "FaultEffect",
    "FaultRecord",
    "FaultTimeline",
    "IterationRecord",
    "LabelWriter",
    "Labels",
    "ScenarioRecord",
    "fault_bit",
    "fault_effects",
    "read_labels",
    "strength_bucket",
]

SCHEMA = 1
"""Version of the labels format, written in the scenario line."""

ITERATION_PHASES = ("prefill", "decode", "mixed")
"""Values of an iteration's ``phase``."""


def _overlaps(f_start: int, f_end: int | None, start_ns: int, end_ns: int) -> bool:
    """Whether a fault on ``[f_start, f_end)`` was on during ``[start_ns, end_ns]``.

    An iteration that ends exactly when the fault starts, or starts exactly when it ends,
    did not run under it; a zero-length iteration counts when its instant is inside.
    """
    end = max(end_ns, start_ns + 1)
    return (f_end is None or start_ns < f_end) and f_start < end


def _applies(fault_rank: int | None, rank: int | None) -> bool:
    """A fault on ``fault_rank`` (None: all) concerns ``rank`` (None: any rank)."""
    return fault_rank is None or rank is None or fault_rank == rank


@dataclass
class _Window:
    spec: FaultSpec
    start_ns: int
    end_ns: int | None = None


class FaultTimeline:
    """Which faults were on when; thread-safe (the orchestrator writes, readers query)."""

    def __init__(self) -> None:
        """An empty timeline."""
        self._lock = threading.Lock()
        self._windows: list[_Window] = []

    def started(self, spec: FaultSpec, start_ns: int) -> None:
        """Record that ``spec`` came on at ``start_ns``."""
        with self._lock:
            self._windows.append(_Window(spec, start_ns))

    def ended(self, spec: FaultSpec, end_ns: int) -> None:
        """Record that ``spec`` went off at ``end_ns`` (ValueError if it is not on)."""
        with self._lock:
            for w in reversed(self._windows):
                if w.spec == spec and w.end_ns is None:
                    w.end_ns = max(end_ns, w.start_ns)
                    return
        raise ValueError(f"fault {spec.type} at {spec.start_s:g} s is not on")

    def start_of(self, spec: FaultSpec) -> int | None:
        """When the latest window of ``spec`` started (None if it never did)."""
        with self._lock:
            for w in reversed(self._windows):
                if w.spec == spec:
                    return w.start_ns
        return None

    def is_on(self, spec: FaultSpec) -> bool:
        """True while ``spec`` has a window that has not ended."""
        with self._lock:
            return any(w.spec == spec and w.end_ns is None for w in self._windows)

    def windows(self) -> list[tuple[FaultSpec, int, int | None]]:
        """Every window as ``(spec, start_ns, end_ns or None while on)``, in start order."""
        with self._lock:
            return [(w.spec, w.start_ns, w.end_ns) for w in self._windows]

    def active(self, rank: int | None, start_ns: int, end_ns: int) -> list[str]:
        """Types of the faults on ``rank`` overlapping ``[start_ns, end_ns]``.

        A fault with rank None acts on every rank; ``rank`` None asks about any rank.
        Each type appears once, in the order the faults started.
        """
        out: list[str] = []
        with self._lock:
            for w in self._windows:
                if (_applies(w.spec.rank, rank) and w.spec.type not in out
                        and _overlaps(w.start_ns, w.end_ns, start_ns, end_ns)):
                    out.append(w.spec.type)
        return out


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ScenarioRecord:
    """The first line: what ran, from when."""

    name: str
    seed: int
    ranks: int
    started_ns: int
    duration_s: float | None = None
    source: str = ""


def fault_bit(effect: dict[str, Any] | None) -> bool | None:
    """Whether a fault window measurably took time from its targets (None: not measured).

    Yes when the targets were stopped or cgroup-throttled for at least 10 % of the
    window, or ran at least 20 % less CPU than in the quiet stretch before it, or waited
    on the run queue at least 1.5 × as long plus 20 ms per second (100 ms per second
    when there is no baseline). Device and in-process faults set the fake runtime's
    field, which it obeys exactly: they count as biting.
    """
    if not effect:
        return None
    try:
        return _bit(effect)
    except (KeyError, TypeError, ValueError, AttributeError):  # a malformed effect
        return None


def _bit(effect: dict[str, Any]) -> bool | None:
    injector = effect.get("injector") or {}
    if injector.get("mode") == "control":
        return True
    held = max(float(injector.get("stopped_ms_per_s", 0.0)),
               float(injector.get("throttled_ms_per_s", 0.0)))
    if held >= 100.0:
        return True
    target = effect.get("target")
    if not target:
        return None
    delay = float(target["run_delay_ms_per_s"])
    base = effect.get("baseline")
    if base is None:
        return delay >= 100.0
    base_cpu = float(base["cpu_ms_per_s"])
    if base_cpu >= 10.0 and float(target["cpu_ms_per_s"]) <= 0.8 * base_cpu:
        return True
    return delay >= 1.5 * float(base["run_delay_ms_per_s"]) + 20.0


@dataclass(frozen=True)
class FaultRecord:
    """One fault window; ``rank`` None means every rank.

    ``effect`` is what was measured while it was on (see
    :meth:`prism_sim.faults.EffectMeter.fault_off`); None in files written before it.
    """

    type: str
    rank: int | None
    start_ns: int
    end_ns: int
    intensity: float
    effect: dict[str, Any] | None = field(default=None, compare=False, hash=False)

    @property
    def bit(self) -> bool | None:
        """Whether it measurably took time from its targets (:func:`fault_bit`)."""
        return fault_bit(self.effect)

    def applies_to(self, rank: int | None) -> bool:
        """Whether it acts on ``rank`` (None: any rank)."""
        return _applies(self.rank, rank)

    def overlaps(self, start_ns: int, end_ns: int) -> bool:
        """Whether it was on during ``[start_ns, end_ns]`` (same edges as the timeline)."""
        return _overlaps(self.start_ns, self.end_ns, start_ns, end_ns)


@dataclass(frozen=True)
class IterationRecord:
    """One iteration of one rank and the faults that were on while it ran.

    ``faults`` are the types active on any rank (tensor-parallel ranks run in lockstep,
    so a fault on one rank slows them all); ``rank_faults`` those aimed at this rank.
    ``fault_active`` is ``bool(faults)``: the sample's ground truth.
    """

    rank: int
    index: int
    start_ns: int
    end_ns: int
    phase: str
    batch_size: int
    tokens: int
    kv_len: int
    fault_active: bool
    faults: tuple[str, ...] = ()
    rank_faults: tuple[str, ...] = ()

    @property
    def duration_ns(self) -> int:
        """Latency of the iteration."""
        return self.end_ns - self.start_ns


@dataclass
class Labels:
    """A labels file read back: the run, its fault windows and its iterations."""

    scenario: ScenarioRecord | None
    faults: list[FaultRecord] = field(default_factory=list)
    iterations: list[IterationRecord] = field(default_factory=list)

    def decode(self, rank: int | None = None) -> list[IterationRecord]:
        """Decode iterations (what detection is scored on), of one rank or all."""
        return [it for it in self.iterations
                if it.phase == "decode" and (rank is None or it.rank == rank)]

    def faults_during(self, start_ns: int, end_ns: int, rank: int | None = None
                      ) -> list[str]:
        """Fault types on ``rank`` (None: any) overlapping ``[start_ns, end_ns]``."""
        out: list[str] = []
        for f in self.faults:
            if f.applies_to(rank) and f.overlaps(start_ns, end_ns) and f.type not in out:
                out.append(f.type)
        return out


# --------------------------------------------------------------------------- effects

EFFECT_BEFORE_S = 8.0
"""How far back before a fault :func:`fault_effects` looks for its reference iterations."""

MIN_EFFECT_ITERATIONS = 3
"""Fewest decode iterations on each side for a fault's effect to be measured."""

STRENGTH_BUCKETS: tuple[tuple[float, str], ...] = (
    (1.1, "<1.1x"), (1.2, "1.1-1.2x"), (1.5, "1.2-1.5x"), (float("inf"), ">=1.5x"))
"""Fault strength buckets by measured slowdown: (upper bound, exclusive; name)."""


@dataclass(frozen=True)
class FaultEffect:
    """How much one fault window slowed the decode steps it touched.

    Attributes:
        fault: the window.
        slowdown: median decode iteration time under the fault over the median of the
            fault-free decode iterations just before it (None: too few on either side).
        under: decode iterations (of the ranks it acts on) that ran under it.
        before: fault-free decode iterations of those ranks in the reference stretch.
    """

    fault: FaultRecord
    slowdown: float | None
    under: int
    before: int


def _median(xs: list[int]) -> float:
    ys = sorted(xs)
    mid = len(ys) // 2
    return float(ys[mid]) if len(ys) % 2 else (ys[mid - 1] + ys[mid]) / 2


def fault_effects(labels: Labels, before_s: float = EFFECT_BEFORE_S) -> list[FaultEffect]:
    """Each fault's measured effect, read from the labels alone, in start order.

    The reference is the decode iterations of the fault's ranks that ended in the
    ``before_s`` seconds before it started with no fault on; the medians make a stray
    long iteration (an admission, a GC pause) count for little. The ratio reads the
    fault's strength on this run, whatever its intensity meant on this machine.
    """
    before_ns = int(before_s * 1e9)
    decode = labels.decode()
    out: list[FaultEffect] = []
    for f in labels.faults:
        mine = [it for it in decode if f.applies_to(it.rank)]
        under = [it.duration_ns for it in mine if f.overlaps(it.start_ns, it.end_ns)]
        ref = [it.duration_ns for it in mine
               if f.start_ns - before_ns <= it.end_ns <= f.start_ns and not it.fault_active]
        slowdown = None
        if len(under) >= MIN_EFFECT_ITERATIONS and len(ref) >= MIN_EFFECT_ITERATIONS:
            base = _median(ref)
            slowdown = round(_median(under) / base, 4) if base > 0 else None
        out.append(FaultEffect(f, slowdown, len(under), len(ref)))
    return out


def strength_bucket(slowdown: float | None) -> str:
    """The :data:`STRENGTH_BUCKETS` name of a measured slowdown ("unmeasured" for None)."""
    if slowdown is None:
        return "unmeasured"
    return next(name for bound, name in STRENGTH_BUCKETS if slowdown < bound)


# --------------------------------------------------------------------------- writer


class LabelWriter:
    """Writes the labels file: one JSON object per line, each in a single ``write``.

    Lines reach the file as they are written (a reader can tail it). Thread-safe.
    ``close()`` writes the fault windows that were never written (ended now if still on).
    """

    def __init__(self, path: str | os.PathLike[str], timeline: FaultTimeline, *,
                 append: bool = False) -> None:
        """Create (or truncate; ``append`` keeps it) the file at ``path``."""
        self.path = Path(path)
        self.timeline = timeline
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        if not append:
            flags |= os.O_TRUNC
        self._fd: int | None = os.open(self.path, flags, 0o644)
        self._lock = threading.Lock()
        self._written: set[tuple[FaultSpec, int]] = set()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._fd is None

    def _write(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._fd is None:
                raise SimError(f"{self.path}: labels file is closed")
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]

    def scenario(self, scenario: Scenario, started_ns: int) -> None:
        """Write the first line: the run's scenario, seed, ranks and start time."""
        self._write({"kind": "scenario", "schema": SCHEMA, "name": scenario.name,
                     "seed": scenario.seed, "ranks": scenario.topology.ranks,
                     "started_ns": started_ns, "duration_s": scenario.duration_s,
                     "source": scenario.source, "clock": "CLOCK_MONOTONIC"})

    def header(self, name: str, ranks: int, started_ns: int, duration_s: float | None,
               source: str, pids: list[int]) -> None:
        """Write the first line for a run that is not a scenario (``prism inject``).

        The same ``scenario`` kind as :meth:`scenario` (readers need nothing new), seed 0,
        and the target ``pids`` (rank i is ``pids[i]``).
        """
        self._write({"kind": "scenario", "schema": SCHEMA, "name": name, "seed": 0,
                     "ranks": ranks, "started_ns": started_ns, "duration_s": duration_s,
                     "source": source, "clock": "CLOCK_MONOTONIC", "pids": pids})

    def fault(self, spec: FaultSpec, start_ns: int, end_ns: int,
              effect: dict[str, Any] | None = None) -> None:
        """Write one fault window (and end it in the timeline if it is still on).

        ``effect`` is what was measured while it was on (written when given).
        """
        if self.timeline.is_on(spec):
            self.timeline.ended(spec, end_ns)
        line: dict[str, Any] = {
            "kind": "fault", "type": spec.type, "rank": spec.rank, "start_ns": start_ns,
            "end_ns": end_ns, "intensity": spec.intensity, "scheduled_s": spec.start_s}
        if effect is not None:
            line["effect"] = effect
        self._write(line)
        self._written.add((spec, start_ns))

    def iteration(self, rank: int, index: int, start_ns: int, end_ns: int, phase: str,
                  batch_size: int, tokens: int, kv_len: int) -> None:
        """Write one iteration, labelled with the faults the timeline says were on."""
        faults = self.timeline.active(None, start_ns, end_ns)
        mine = self.timeline.active(rank, start_ns, end_ns)
        self._write({"kind": "iteration", "rank": rank, "index": index,
                     "start_ns": start_ns, "end_ns": end_ns, "phase": phase,
                     "batch_size": batch_size, "tokens": tokens, "kv_len": kv_len,
                     "fault_active": bool(faults), "faults": faults, "rank_faults": mine})

    def close(self) -> None:
        """Write the unwritten fault windows and close the file (idempotent)."""
        if self._fd is None:
            return
        now = time.monotonic_ns()
        for spec, start, end in self.timeline.windows():
            if (spec, start) not in self._written:
                try:
                    self.fault(spec, start, end if end is not None else max(now, start))
                except (SimError, OSError, ValueError):
                    break
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> LabelWriter:
        """Use as a context manager; closes on exit."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Close the file."""
        self.close()


# --------------------------------------------------------------------------- reader


def _req(obj: dict[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    """``obj[key]`` checked against ``types`` (bool is never an int here)."""
    if key not in obj:
        raise SimError(f"{where}: missing {key!r}")
    value = obj[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple)
                                                else (types,)):
        raise SimError(f"{where}: {key!r} must not be a boolean")
    if not isinstance(value, types):
        raise SimError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def read_labels(path: str | os.PathLike[str]) -> Labels:
    """Read a labels file; a torn last line (a writer killed mid-write) is skipped.

    Unknown kinds are skipped (newer writers); malformed lines raise SimError with the
    file and line number.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SimError(f"{p}: cannot read labels: {exc}") from None
    lines = text.split("\n")
    torn = not text.endswith("\n")
    labels = Labels(None)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if torn and n == len(lines):
                break
            raise SimError(f"{where}: not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise SimError(f"{where}: not a JSON object")
        kind = obj.get("kind")
        if kind == "scenario":
            dur = obj.get("duration_s")
            labels.scenario = ScenarioRecord(
                _req(obj, "name", str, where), _req(obj, "seed", int, where),
                _req(obj, "ranks", int, where), _req(obj, "started_ns", int, where),
                float(dur) if isinstance(dur, (int, float)) and not isinstance(dur, bool)
                else None, str(obj.get("source", "")))
        elif kind == "fault":
            rank = obj.get("rank")
            if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
                raise SimError(f"{where}: 'rank' must be an integer or null")
            effect = obj.get("effect")
            if effect is not None and not isinstance(effect, dict):
                raise SimError(f"{where}: 'effect' must be an object")
            labels.faults.append(FaultRecord(
                _req(obj, "type", str, where), rank, _req(obj, "start_ns", int, where),
                _req(obj, "end_ns", int, where),
                float(_req(obj, "intensity", (int, float), where)), effect))
        elif kind == "iteration":
            faults = obj.get("faults", [])
            rank_faults = obj.get("rank_faults", [])
            if not (isinstance(faults, list) and isinstance(rank_faults, list)):
                raise SimError(f"{where}: 'faults' and 'rank_faults' must be arrays")
            labels.iterations.append(IterationRecord(
                _req(obj, "rank", int, where), _req(obj, "index", int, where),
                _req(obj, "start_ns", int, where), _req(obj, "end_ns", int, where),
                _req(obj, "phase", str, where), _req(obj, "batch_size", int, where),
                _req(obj, "tokens", int, where), _req(obj, "kv_len", int, where),
                _req(obj, "fault_active", bool, where),
                tuple(str(f) for f in faults), tuple(str(f) for f in rank_faults)))
    labels.faults.sort(key=lambda f: (f.start_ns, f.type))
    return labels
