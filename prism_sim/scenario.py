"""Simulator scenarios: a seeded workload timeline, a topology and a fault timeline (TOML).

A scenario says what load the simulated server gets (Poisson arrivals, prompt and output
length distributions, a concurrency cap, in phases that change over time — changes that
are *not* anomalies), how many tensor-parallel ranks it has, and which faults are injected
when. ``docs/scenarios.md`` documents every key. A malformed file raises
:class:`~prism_sim.errors.ScenarioError` whose message is ``FILE[:LINE]: KEY: REASON``.
"""

from __future__ import annotations

import difflib
import math
import random
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

from prism_sim.errors import ScenarioError

__all__ = [
    "BUILTIN_DIR",
    "DIST_KINDS",
    "FAULT_INFO",
    "FAULT_TYPES",
    "MAX_RANKS",
    "MAX_TOKENS",
    "Dist",
    "FaultSpec",
    "FaultType",
    "Phase",
    "Scenario",
    "Topology",
    "available_scenarios",
    "load_scenario",
    "parse_scenario",
    "scenario_text",
]

BUILTIN_DIR: Path = Path(__file__).resolve().parent / "scenarios"
"""Directory of the built-in scenarios (``NAME.toml``)."""

MAX_TOKENS = 131072
"""Largest prompt or output length a distribution may produce (tokens)."""

MAX_RANKS = 16
"""Most tensor-parallel ranks a scenario may ask for."""

DIST_KINDS = ("fixed", "uniform", "lognormal", "choice")
"""Length distributions: a constant, uniform integers, a clipped lognormal, a weighted pick."""


# --------------------------------------------------------------------------- fault types


@dataclass(frozen=True)
class FaultType:
    """What the parser knows about one fault type.

    Attributes:
        name: the ``type`` string in a scenario.
        default: intensity when the ``[[fault]]`` leaves it out.
        max: largest intensity allowed (``speed = 1 - intensity`` must stay above 0).
        all_ranks: whether ``rank = "all"`` is allowed.
        rank_required: whether ``rank`` must be written out (one rank, never all).
        resource: the per-rank setting it owns; two faults owning the same one may not
            overlap in time on a common rank (None: overlaps are fine).
        summary: one line for ``docs/scenarios.md`` and ``prism sim --help``.
    """

    name: str
    default: float
    max: float
    all_ranks: bool
    rank_required: bool
    resource: str | None
    summary: str


FAULT_INFO: dict[str, FaultType] = {t.name: t for t in (
    FaultType("cpu_squeeze", 1.0, 1.0, True, False, None,
              "dense floating-point loops in external processes on the rank's CPUs"),
    FaultType("cpu_throttle", 0.5, 0.95, True, False, "cpu_throttle",
              "the rank gets (1 - intensity) of a CPU (cgroup quota or SIGSTOP duty cycle)"),
    FaultType("device_slowdown", 0.5, 0.95, True, False, "speed",
              "the fake device runs at (1 - intensity) speed (locked GPU clock)"),
    FaultType("interconnect_squeeze", 0.7, 0.95, True, False, "link",
              "collective bandwidth drops to (1 - intensity) (NVLink / PCIe squeeze)"),
    FaultType("straggler", 0.5, 0.95, False, True, "speed",
              "one rank's device runs at (1 - intensity) speed; the others wait for it"),
    FaultType("device_preemption", 0.5, 0.9, True, False, "preempt",
              "competing work takes an intensity share of the fake device"),
    FaultType("memory_pressure", 1.0, 1.0, True, False, None,
              "an external process churns intensity x 2 GiB of memory (page faults)"),
    FaultType("gc_storm", 0.5, 1.0, True, False, "gc_storm",
              "cyclic garbage in the rank's host loop (real CPython GC pauses)"),
    FaultType("gil_contention", 0.5, 1.0, True, False, "gil_contention",
              "1 + round(3 x intensity) busy Python threads in the rank (real GIL waits)"),
)}
"""Every fault type, in the order the docs list them."""

FAULT_TYPES: dict[str, float] = {name: info.default for name, info in FAULT_INFO.items()}
"""Fault type -> default intensity."""


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Dist:
    """A distribution of token counts (prompt or output lengths), sampled as integers.

    Attributes:
        kind: one of :data:`DIST_KINDS`.
        value: the constant of ``fixed``.
        min: smallest value (``uniform`` bound, ``lognormal`` clip), at least 1.
        max: largest value (``uniform`` bound, ``lognormal`` clip), at most MAX_TOKENS.
        mean: mean of the unclipped ``lognormal``.
        sigma: shape of the ``lognormal`` (standard deviation of its log).
        values: the candidates of ``choice``.
        weights: relative weights of ``choice`` (empty: equal).
    """

    kind: str
    value: int = 1
    min: int = 1
    max: int = MAX_TOKENS
    mean: float = 1.0
    sigma: float = 0.0
    values: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()

    @classmethod
    def fixed(cls, value: int) -> Dist:
        """Always ``value``."""
        return cls("fixed", value=value, min=value, max=value)

    @classmethod
    def uniform(cls, lo: int, hi: int) -> Dist:
        """Integers from ``lo`` to ``hi`` inclusive, equally likely."""
        return cls("uniform", min=lo, max=hi)

    def sample(self, rng: random.Random) -> int:
        """Draw one value with ``rng`` (deterministic for a seeded generator)."""
        if self.kind == "fixed":
            return self.value
        if self.kind == "uniform":
            return rng.randint(self.min, self.max)
        if self.kind == "lognormal":
            mu = math.log(self.mean) - self.sigma * self.sigma / 2
            drawn = rng.lognormvariate(mu, self.sigma)
            return max(self.min, min(self.max, round(drawn)))
        if self.kind == "choice":
            weights = self.weights or None
            return rng.choices(self.values, weights=weights)[0]
        raise ValueError(f"unknown distribution kind {self.kind!r}")

    @property
    def expected(self) -> float:
        """Approximate mean of the samples (ignores lognormal clipping)."""
        if self.kind == "fixed":
            return float(self.value)
        if self.kind == "uniform":
            return (self.min + self.max) / 2
        if self.kind == "lognormal":
            return max(float(self.min), min(float(self.max), self.mean))
        weights = self.weights or tuple(1.0 for _ in self.values)
        return sum(v * w for v, w in zip(self.values, weights, strict=True)) / sum(weights)


@dataclass(frozen=True)
class Phase:
    """A stretch of workload; it lasts until the next phase starts (or forever).

    Attributes:
        start_s: when it starts, seconds from the scenario's start.
        arrival_rate: Poisson arrivals, requests per second (0: an idle gap).
        max_batch: concurrency cap, the most sequences running at once.
        prompt: prompt lengths (tokens).
        output: output lengths (tokens generated per request).
        name: what the phase is, for logs ("prompt surge"); not a label.
    """

    start_s: float
    arrival_rate: float
    max_batch: int
    prompt: Dist
    output: Dist
    name: str = ""


@dataclass(frozen=True)
class FaultSpec:
    """One fault window: what, when (seconds from the scenario's start), where, how hard.

    ``rank`` None means every rank. Two specs with equal fields are the same window.
    """

    type: str
    start_s: float
    duration_s: float
    rank: int | None
    intensity: float

    @property
    def end_s(self) -> float:
        """When the fault stops, seconds from the scenario's start."""
        return self.start_s + self.duration_s

    def targets(self, nranks: int) -> tuple[int, ...]:
        """The ranks it acts on in a run with ``nranks`` ranks."""
        return tuple(range(nranks)) if self.rank is None else (self.rank,)

    def shifted(self, offset_s: float) -> FaultSpec:
        """The same fault, ``offset_s`` seconds later."""
        return replace(self, start_s=self.start_s + offset_s)


@dataclass(frozen=True)
class Topology:
    """Tensor-parallel shape and the fake device's cost model.

    Attributes:
        ranks: tensor-parallel ranks (one process and one fake device each).
        layers: transformer layers (a GEMM, an attention kernel, an all-reduce each).
        hidden: hidden size; all-reduce counts are ``tokens × hidden``.
        flops_per_s: fake device compute, FLOP/s.
        mem_bw: fake device memory bandwidth, bytes/s.
        link_bw: interconnect bandwidth between ranks (NVLink analogue), bytes/s.
        pcie_bw: host <-> device copy bandwidth, bytes/s.
        jitter: relative standard deviation of every kernel's duration.
    """

    ranks: int = 2
    layers: int = 8
    hidden: int = 4096
    flops_per_s: float = 8e12
    mem_bw: float = 400e9
    link_bw: float = 5e8
    pcie_bw: float = 12e9
    jitter: float = 0.02


@dataclass(frozen=True)
class Scenario:
    """A parsed scenario. ``source`` is an absolute path ``load_scenario`` accepts back.

    With ``repeat_every_s`` set, the workload phases and faults that start at or after
    ``repeat_from_s`` form a cycle that repeats every ``repeat_every_s`` seconds.
    """

    name: str
    description: str
    seed: int
    duration_s: float | None
    topology: Topology
    phases: tuple[Phase, ...]
    faults: tuple[FaultSpec, ...]
    source: str
    repeat_every_s: float | None = None
    repeat_from_s: float = 0.0

    def _cycle_time(self, t_s: float) -> float:
        """Map a time to its place in the first cycle (identity without repeats)."""
        if self.repeat_every_s is None or t_s < self.repeat_from_s + self.repeat_every_s:
            return t_s
        return self.repeat_from_s + (t_s - self.repeat_from_s) % self.repeat_every_s

    def phase_at(self, t_s: float) -> Phase:
        """The workload phase in force ``t_s`` seconds after the start (first before 0)."""
        t = self._cycle_time(t_s)
        current = self.phases[0]
        for phase in self.phases[1:]:
            if phase.start_s > t:
                break
            current = phase
        return current

    def faults_between(self, t0_s: float, t1_s: float) -> list[FaultSpec]:
        """Fault windows starting in ``[t0_s, t1_s)``, repeats expanded, by start time.

        Each returned spec carries its absolute start. A finite scenario has none at or
        after its end.
        """
        if self.duration_s is not None:
            t1_s = min(t1_s, self.duration_s)
        out: list[FaultSpec] = []
        if t1_s <= t0_s:
            return out
        every = self.repeat_every_s
        for spec in self.faults:
            if every is None or spec.start_s < self.repeat_from_s:
                if t0_s <= spec.start_s < t1_s:
                    out.append(spec)
                continue
            k = max(0, math.ceil((t0_s - spec.start_s) / every))
            while True:
                start = spec.start_s + k * every
                if start >= t1_s:
                    break
                if start >= t0_s:
                    out.append(spec if k == 0 else spec.shifted(k * every))
                k += 1
        out.sort(key=lambda f: (f.start_s, f.type, -1 if f.rank is None else f.rank))
        return out

    def fault_timeline(self, until_s: float) -> list[FaultSpec]:
        """Every fault window starting before ``until_s``, repeats expanded, by start."""
        return self.faults_between(0.0, until_s)

    def with_duration(self, duration_s: float | None) -> Scenario:
        """The same scenario run for ``duration_s`` (None: until stopped), as ``--duration``."""
        if duration_s is not None and (not math.isfinite(duration_s) or duration_s < 0):
            raise ScenarioError(f"--duration: must be a finite number >= 0, got {duration_s}")
        return replace(self, duration_s=duration_s or None)


# --------------------------------------------------------------------------- parsing

_SCENARIO_KEYS = ("name", "description", "seed", "duration_s", "repeat_every_s",
                  "repeat_from_s")
_TOPOLOGY_KEYS = ("ranks", "layers", "hidden", "flops_per_s", "mem_bw", "link_bw",
                  "pcie_bw", "jitter")
_PHASE_KEYS = ("start_s", "arrival_rate", "max_batch", "prompt", "output", "name")
_FAULT_KEYS = ("type", "start_s", "duration_s", "rank", "intensity")
_DIST_KEYS: dict[str, tuple[str, ...]] = {
    "fixed": ("dist", "value"),
    "uniform": ("dist", "min", "max"),
    "lognormal": ("dist", "mean", "sigma", "min", "max"),
    "choice": ("dist", "values", "weights"),
}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
DEFAULT_PHASE = Phase(
    start_s=0.0, arrival_rate=4.0, max_batch=16,
    prompt=Dist("lognormal", mean=256.0, sigma=0.5, min=16, max=2048),
    output=Dist.uniform(32, 256))
"""The workload of a scenario without ``[[phase]]`` tables, and the first phase's defaults."""


class _Parser:
    """Walks the decoded TOML, turning each problem into one keyed ScenarioError."""

    def __init__(self, text: str, label: str) -> None:
        self.text = text
        self.label = label
        self.lines = text.splitlines()

    # ----------------------------------------------------------------- errors
    def _line_of(self, key: str) -> int | None:
        """Best-effort line number of ``key`` (``fault[2].intensity``) in the text."""
        m = re.fullmatch(r"(\w+)(?:\[(\d+)\])?(?:\.(\w+))?.*", key)
        if m is None:
            return None
        table, index, field = m.group(1), m.group(2), m.group(3)
        header = (re.compile(rf"^\s*\[\[\s*{table}\s*\]\]") if index is not None
                  else re.compile(rf"^\s*\[\s*{table}\s*\]"))
        seen = -1
        start = None
        for i, line in enumerate(self.lines):
            if header.match(line):
                seen += 1
                if index is None or seen == int(index):
                    start = i
                    break
        if start is None:
            return None
        if field is None:
            return start + 1
        key_re = re.compile(rf"^\s*{field}\s*=")
        for i in range(start + 1, len(self.lines)):
            if re.match(r"^\s*\[", self.lines[i]):
                break
            if key_re.match(self.lines[i]):
                return i + 1
        return start + 1

    def fail(self, key: str, reason: str) -> NoReturn:
        """Raise the ScenarioError for ``key``, with a line number when one is found."""
        line = self._line_of(key) if key else None
        where = f"{self.label}:{line}" if line is not None else self.label
        raise ScenarioError(f"{where}: {key}: {reason}" if key else f"{where}: {reason}")

    # ----------------------------------------------------------------- value checks
    def table(self, value: Any, key: str) -> dict[str, Any]:
        """``value`` as a table, or fail."""
        if not isinstance(value, dict):
            self.fail(key, f"must be a table, got {_show(value)}")
        return value

    def keys(self, table: Mapping[str, Any], allowed: tuple[str, ...], key: str) -> None:
        """Fail on the first unknown key, suggesting the closest allowed one."""
        for k in table:
            if k not in allowed:
                near = difflib.get_close_matches(k, allowed, n=1, cutoff=0.6)
                hint = f" (did you mean {near[0]!r}?)" if near else (
                    f" (known: {', '.join(allowed)})")
                self.fail(f"{key}.{k}" if key else k, f"unknown key{hint}")

    def number(self, value: Any, key: str, *, lo: float | None = None,
               hi: float | None = None, lo_open: bool = False) -> float:
        """A finite number (int or float, not bool) within the bounds, or fail."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(key, f"must be a number, got {_show(value)}")
        try:
            out = float(value)
        except OverflowError:
            self.fail(key, f"is out of range, got {_show(value)}")
        if not math.isfinite(out):
            self.fail(key, f"must be finite, got {_show(value)}")
        too_low = lo is not None and (out < lo or (lo_open and out == lo))
        if too_low or (hi is not None and out > hi):
            if lo is not None and hi is not None:
                reason = (f"must be more than {_num(lo)} and at most {_num(hi)}"
                          if lo_open and out == lo else
                          f"must be between {_num(lo)} and {_num(hi)}")
            elif lo is not None:
                reason = f"must be {'>' if lo_open else '>='} {_num(lo)}"
            else:
                reason = f"must be <= {_num(hi if hi is not None else 0)}"
            self.fail(key, f"{reason}, got {_show(value)}")
        return out

    def integer(self, value: Any, key: str, *, lo: int | None = None,
                hi: int | None = None) -> int:
        """An integer (not bool) within the bounds, or fail."""
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be an integer, got {_show(value)}")
        if lo is not None and hi is not None and not lo <= value <= hi:
            self.fail(key, f"must be between {lo} and {hi}, got {value}")
        if lo is not None and value < lo:
            self.fail(key, f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            self.fail(key, f"must be <= {hi}, got {value}")
        return value

    def string(self, value: Any, key: str) -> str:
        """A string, or fail."""
        if not isinstance(value, str):
            self.fail(key, f"must be a string, got {_show(value)}")
        return value

    # ----------------------------------------------------------------- sections
    def dist(self, value: Any, key: str) -> Dist:
        """A ``{ dist = KIND, ... }`` inline table."""
        t = self.table(value, key)
        if "dist" not in t:
            self.fail(f"{key}.dist", f"missing (one of {', '.join(DIST_KINDS)})")
        kind = self.string(t["dist"], f"{key}.dist")
        if kind not in _DIST_KEYS:
            near = difflib.get_close_matches(kind, DIST_KINDS, n=1, cutoff=0.6)
            hint = f"did you mean {near[0]!r}?" if near else f"one of {', '.join(DIST_KINDS)}"
            self.fail(f"{key}.dist", f"unknown distribution {kind!r} ({hint})")
        self.keys(t, _DIST_KEYS[kind], key)

        def tokens(k: str, default: int | None = None) -> int:
            if k not in t:
                if default is None:
                    self.fail(f"{key}.{k}", f"missing (required by dist = {kind!r})")
                return default
            return self.integer(t[k], f"{key}.{k}", lo=1, hi=MAX_TOKENS)

        if kind == "fixed":
            return Dist.fixed(tokens("value"))
        if kind == "uniform":
            lo, hi = tokens("min"), tokens("max")
            if hi < lo:
                self.fail(f"{key}.max", f"must be >= min ({lo}), got {hi}")
            return Dist.uniform(lo, hi)
        if kind == "lognormal":
            if "mean" not in t:
                self.fail(f"{key}.mean", "missing (required by dist = 'lognormal')")
            mean = self.number(t["mean"], f"{key}.mean", lo=1, hi=MAX_TOKENS)
            sigma = self.number(t.get("sigma", 0.5), f"{key}.sigma", lo=0, hi=3)
            lo, hi = tokens("min", 1), tokens("max", MAX_TOKENS)
            if hi < lo:
                self.fail(f"{key}.max", f"must be >= min ({lo}), got {hi}")
            return Dist("lognormal", mean=mean, sigma=sigma, min=lo, max=hi)
        if "values" not in t:
            self.fail(f"{key}.values", "missing (required by dist = 'choice')")
        raw = t["values"]
        if not isinstance(raw, list) or not raw:
            self.fail(f"{key}.values", f"must be a non-empty array, got {_show(raw)}")
        values = tuple(self.integer(v, f"{key}.values[{i}]", lo=1, hi=MAX_TOKENS)
                       for i, v in enumerate(raw))
        weights: tuple[float, ...] = ()
        if "weights" in t:
            wraw = t["weights"]
            if not isinstance(wraw, list) or len(wraw) != len(values):
                self.fail(f"{key}.weights",
                          f"must be an array of {len(values)} numbers (one per value), "
                          f"got {_show(wraw)}")
            weights = tuple(self.number(w, f"{key}.weights[{i}]", lo=0, hi=1e9)
                            for i, w in enumerate(wraw))
            if sum(weights) <= 0:
                self.fail(f"{key}.weights", "must not all be 0")
        return Dist("choice", min=min(values), max=max(values), values=values,
                    weights=weights)

    def topology(self, value: Any) -> Topology:
        """The ``[topology]`` table (every key optional)."""
        t = self.table(value, "topology")
        self.keys(t, _TOPOLOGY_KEYS, "topology")
        d = Topology()
        ranks = self.integer(t.get("ranks", d.ranks), "topology.ranks", lo=1, hi=MAX_RANKS)
        layers = self.integer(t.get("layers", d.layers), "topology.layers", lo=1, hi=256)
        hidden = self.integer(t.get("hidden", d.hidden), "topology.hidden", lo=64,
                              hi=65536)
        if hidden % ranks:
            self.fail("topology.hidden", f"must be a multiple of ranks ({ranks}) for tensor "
                      f"parallelism, got {hidden}")

        def rate(k: str, default: float) -> float:
            return self.number(t.get(k, default), f"topology.{k}", lo=0, hi=1e18,
                               lo_open=True)

        jitter = self.number(t.get("jitter", d.jitter), "topology.jitter", lo=0, hi=0.5)
        return Topology(ranks, layers, hidden, rate("flops_per_s", d.flops_per_s),
                        rate("mem_bw", d.mem_bw), rate("link_bw", d.link_bw),
                        rate("pcie_bw", d.pcie_bw), jitter)

    def phase(self, value: Any, i: int, prev: Phase) -> Phase:
        """One ``[[phase]]``; keys it leaves out are inherited from the previous phase."""
        key = f"phase[{i}]"
        t = self.table(value, key)
        self.keys(t, _PHASE_KEYS, key)
        if "start_s" not in t:
            if i:
                self.fail(f"{key}.start_s", "missing (every phase after the first needs one)")
            start = 0.0
        else:
            start = self.number(t["start_s"], f"{key}.start_s", lo=0)
        if i == 0 and start != 0:
            self.fail(f"{key}.start_s", f"the first phase must start at 0, got {_num(start)}")
        if i and start <= prev.start_s:
            self.fail(f"{key}.start_s", f"phases must be in time order: {_num(start)} is not "
                      f"after phase[{i - 1}].start_s = {_num(prev.start_s)}")
        rate = (self.number(t["arrival_rate"], f"{key}.arrival_rate", lo=0, hi=10000)
                if "arrival_rate" in t else prev.arrival_rate)
        max_batch = (self.integer(t["max_batch"], f"{key}.max_batch", lo=1, hi=4096)
                     if "max_batch" in t else prev.max_batch)
        prompt = self.dist(t["prompt"], f"{key}.prompt") if "prompt" in t else prev.prompt
        output = self.dist(t["output"], f"{key}.output") if "output" in t else prev.output
        name = self.string(t.get("name", ""), f"{key}.name")
        return Phase(start, rate, max_batch, prompt, output, name)

    def fault(self, value: Any, i: int, ranks: int) -> FaultSpec:
        """One ``[[fault]]``."""
        key = f"fault[{i}]"
        t = self.table(value, key)
        self.keys(t, _FAULT_KEYS, key)
        if "type" not in t:
            self.fail(f"{key}.type", f"missing (one of {', '.join(FAULT_INFO)})")
        type_ = self.string(t["type"], f"{key}.type")
        info = FAULT_INFO.get(type_)
        if info is None:
            near = difflib.get_close_matches(type_, list(FAULT_INFO), n=1, cutoff=0.6)
            hint = f"did you mean {near[0]!r}?" if near else f"one of {', '.join(FAULT_INFO)}"
            self.fail(f"{key}.type", f"unknown fault type {type_!r} ({hint})")
        for required in ("start_s", "duration_s"):
            if required not in t:
                self.fail(f"{key}.{required}", "missing")
        start = self.number(t["start_s"], f"{key}.start_s", lo=0)
        duration = self.number(t["duration_s"], f"{key}.duration_s", lo=0, lo_open=True)
        rank: int | None
        if "rank" not in t:
            if info.rank_required:
                self.fail(f"{key}.rank", f"missing ({type_} needs one rank, 0..{ranks - 1})")
            rank = 0
        elif t["rank"] == "all":
            if not info.all_ranks:
                self.fail(f"{key}.rank", f"{type_} acts on one rank, not 'all'")
            rank = None
        else:
            raw = t["rank"]
            if isinstance(raw, bool) or not isinstance(raw, int):
                self.fail(f"{key}.rank", f"must be a rank number or \"all\", got {_show(raw)}")
            if not 0 <= raw < ranks:
                self.fail(f"{key}.rank", f"must be between 0 and {ranks - 1} "
                          f"(topology.ranks = {ranks}), got {raw}")
            rank = raw
        intensity = info.default
        if "intensity" in t:
            intensity = self.number(t["intensity"], f"{key}.intensity", lo=0, hi=info.max,
                                    lo_open=True)
        return FaultSpec(type_, start, duration, rank, intensity)

    # ----------------------------------------------------------------- whole file
    def parse(self, source: str) -> Scenario:
        """Decode and check the whole file."""
        try:
            doc = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as exc:
            raise ScenarioError(f"{self.label}: invalid TOML: {exc}") from None
        except (ValueError, RecursionError) as exc:  # pragma: no cover - defensive
            raise ScenarioError(f"{self.label}: invalid TOML: {exc}") from None
        self.keys(doc, ("scenario", "topology", "phase", "fault"), "")
        if "scenario" not in doc:
            self.fail("scenario", "missing table [scenario] (with at least name = ...)")
        head = self.table(doc["scenario"], "scenario")
        self.keys(head, _SCENARIO_KEYS, "scenario")
        if "name" not in head:
            self.fail("scenario.name", "missing")
        name = self.string(head["name"], "scenario.name")
        if not _NAME_RE.fullmatch(name):
            self.fail("scenario.name", "must be letters, digits, '_', '-' or '.', "
                      f"starting with a letter or digit, got {name!r}")
        description = self.string(head.get("description", ""), "scenario.description")
        seed = self.integer(head.get("seed", 0), "scenario.seed", lo=0, hi=2**63 - 1)
        duration: float | None = self.number(head.get("duration_s", 0), "scenario.duration_s",
                                             lo=0)
        duration = duration or None
        every: float | None = None
        rep_from = 0.0
        if "repeat_every_s" in head:
            every = self.number(head["repeat_every_s"], "scenario.repeat_every_s", lo=0,
                                lo_open=True)
        if "repeat_from_s" in head:
            if every is None:
                self.fail("scenario.repeat_from_s", "only makes sense with repeat_every_s")
            rep_from = self.number(head["repeat_from_s"], "scenario.repeat_from_s", lo=0)
        if duration is not None and rep_from >= duration:
            self.fail("scenario.repeat_from_s", f"must be before the end (duration_s = "
                      f"{_num(duration)}), got {_num(rep_from)}")
        topo = self.topology(doc.get("topology", {}))

        raw_phases = doc.get("phase", [])
        if not isinstance(raw_phases, list):
            self.fail("phase", "must be an array of tables ([[phase]])")
        phases: list[Phase] = []
        prev = DEFAULT_PHASE
        for i, raw in enumerate(raw_phases):
            prev = self.phase(raw, i, prev)
            phases.append(prev)
        if not phases:
            phases.append(DEFAULT_PHASE)
        for i, ph in enumerate(phases):
            if duration is not None and i and ph.start_s >= duration:
                self.fail(f"phase[{i}].start_s", f"starts at or after the end (duration_s = "
                          f"{_num(duration)}), got {_num(ph.start_s)}")
            if every is not None and ph.start_s >= rep_from + every:
                self.fail(f"phase[{i}].start_s", f"must lie within the first cycle "
                          f"(before repeat_from_s + repeat_every_s = "
                          f"{_num(rep_from + every)}), got {_num(ph.start_s)}")

        raw_faults = doc.get("fault", [])
        if not isinstance(raw_faults, list):
            self.fail("fault", "must be an array of tables ([[fault]])")
        faults = [self.fault(raw, i, topo.ranks) for i, raw in enumerate(raw_faults)]
        for i, f in enumerate(faults):
            key = f"fault[{i}]"
            if every is not None:
                if f.start_s < rep_from and f.end_s > rep_from:
                    self.fail(f"{key}.duration_s", f"a fault before the cycle must end by "
                              f"repeat_from_s = {_num(rep_from)}, ends at {_num(f.end_s)}")
                if f.start_s >= rep_from and f.end_s > rep_from + every:
                    self.fail(f"{key}.duration_s", f"a repeating fault must end within its "
                              f"cycle (by {_num(rep_from + every)}), ends at {_num(f.end_s)}")
            elif duration is not None and f.end_s > duration:
                self.fail(f"{key}.duration_s" if f.start_s < duration else f"{key}.start_s",
                          f"runs past the end of the scenario (duration_s = "
                          f"{_num(duration)}): ends at {_num(f.end_s)}")
        self._check_overlaps(faults)
        return Scenario(name, description, seed, duration, topo, tuple(phases),
                        tuple(faults), source, every, rep_from)

    def _check_overlaps(self, faults: list[FaultSpec]) -> None:
        """Two faults owning the same per-rank setting may not overlap on a common rank."""
        for j, b in enumerate(faults):
            res_b = FAULT_INFO[b.type].resource
            if res_b is None:
                continue
            for i in range(j):
                a = faults[i]
                if FAULT_INFO[a.type].resource != res_b:
                    continue
                shared = a.rank is None or b.rank is None or a.rank == b.rank
                if shared and a.start_s < b.end_s and b.start_s < a.end_s:
                    self.fail(f"fault[{j}].start_s",
                              f"overlaps fault[{i}] ({a.type}, {_num(a.start_s)}.."
                              f"{_num(a.end_s)} s) on the same rank; both set the "
                              f"rank's {res_b}")


def _num(x: float) -> str:
    """A number as a person writes it (``20`` rather than ``20.0``)."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


def _show(value: Any) -> str:
    """A short rendering of a bad value for an error message."""
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array" if len(repr(value)) > 40 else repr(value)
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_scenario(text: str, source: str = "<string>") -> Scenario:
    """Parse scenario TOML; ScenarioError names ``source``, the key and the reason."""
    return _Parser(text, source).parse(source)


def available_scenarios() -> dict[str, str]:
    """Built-in scenario name -> its description (first line), sorted by name."""
    out: dict[str, str] = {}
    for path in sorted(BUILTIN_DIR.glob("*.toml")):
        try:
            desc = parse_scenario(path.read_text(encoding="utf-8"), str(path)).description
        except (ScenarioError, OSError) as exc:  # pragma: no cover - built-ins are tested
            desc = f"(broken: {exc})"
        out[path.stem] = desc.strip().splitlines()[0] if desc.strip() else ""
    return out


def scenario_text(name_or_path: str) -> tuple[str, str, str]:
    """The TOML of a scenario, a label for its errors and its ``source``.

    ``random:SEED`` is generated (:mod:`prism_sim.generator`), a name is a built-in, any
    other string a path; ScenarioError says why it cannot be had.
    """
    from prism_sim.generator import generate_toml, parse_seed

    try:
        seed = parse_seed(name_or_path)
    except ValueError as exc:
        raise ScenarioError(str(exc)) from None
    if seed is not None:
        return generate_toml(seed), name_or_path, name_or_path
    builtin = BUILTIN_DIR / f"{name_or_path}.toml"
    if _NAME_RE.fullmatch(name_or_path) and not name_or_path.endswith(".toml") \
            and builtin.is_file():
        path, label = builtin, builtin.name
    else:
        path, label = Path(name_or_path), name_or_path
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in BUILTIN_DIR.glob("*.toml")))
            raise ScenarioError(f"{name_or_path}: no such scenario file or built-in "
                                f"scenario (built-ins: {known}; or random:SEED)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{label}: cannot read: {exc}") from None
    return text, label, str(path.resolve())


def load_scenario(name_or_path: str) -> Scenario:
    """A built-in by name (``smoke``), a generated one (``random:SEED``) or a TOML file by
    path; ScenarioError says why not."""
    text, label, source = scenario_text(name_or_path)
    return _Parser(text, label).parse(source)
