"""Seeded scenario generator: ``random:SEED`` draws a whole scenario from one integer.

The held-out evaluation source: a topology (1-4 ranks, model sizes), workload shifts that
are not faults (arrival rate, concurrency cap, prompt and output lengths, idle gaps) and
four or five faults of distinct kinds at intensities from mild to strong, separated in
time. The scenario is written as TOML and read back by the ordinary parser, so it obeys
every limit of the format; ``prism sim --scenario random:SEED --print`` shows it. The same
seed gives the same text on every machine (only :class:`random.Random` draws it).

Timeline: 60 s of steady load (the detector's warm-up), then per fault: optionally a
workload shift, at least :data:`SETTLE_S` seconds of the new load, the fault, and a
normal tail. No shift falls in the :data:`SETTLE_S` seconds before a fault or during it,
so a fault's measured effect (``prism_sim.labels.fault_effects``) compares it with the
same workload.
"""

from __future__ import annotations

import math
import random
import re

__all__ = [
    "INTENSITY_RANGE",
    "MAX_DURATION_S",
    "MAX_PROMPT_TOKENS_S",
    "MAX_RANK_COST",
    "PREFIX",
    "SETTLE_S",
    "WARMUP_S",
    "generate_toml",
    "parse_seed",
]

PREFIX = "random:"
"""What a scenario name starts with to be generated: ``random:SEED``."""

WARMUP_S = 60.0
"""Steady load before anything happens (the detector's baseline)."""

SETTLE_S = 12.0
"""Least time between a workload shift and the next fault's start."""

MAX_DURATION_S = 300.0
"""Longest a generated scenario runs (checked by the tests over many seeds)."""

MAX_RANK_COST = 8 * 4096 * 4096 // 2
"""Most ``layers × hidden²`` per rank (that of the built-in ``mixed``): a bigger model is
split over more ranks, so every scenario decodes fast enough to warm a detector up."""

MAX_PROMPT_TOKENS_S = 6000
"""Most prompt tokens a second a phase brings (rate × mean prompt length; ``mixed``
sustains 14 × 256 = 3,584): at 18 × 1024 a 4-rank scenario ran prefill and mixed batches
nearly all the time and left too few decode steps to measure a fault by."""

INTENSITY_RANGE: dict[str, tuple[float, float]] = {
    "cpu_squeeze": (0.125, 1.0),
    "cpu_throttle": (0.3, 0.9),
    "device_slowdown": (0.1, 0.7),
    "interconnect_squeeze": (0.3, 0.9),
    "straggler": (0.1, 0.7),
    "device_preemption": (0.1, 0.75),
    "memory_pressure": (0.25, 1.0),
    "gc_storm": (0.2, 1.0),
    "gil_contention": (0.2, 1.0),
}
"""Per fault type, the intensity of its mildest and its strongest draw."""

_SEED_RE = re.compile(r"[0-9]{1,18}")
_LAYERS = (4, 8, 12, 16)
_HIDDEN = (2048, 4096, 5120, 8192)


def parse_seed(name: str) -> int | None:
    """The seed of ``random:SEED`` (None when ``name`` is not one; ValueError if malformed)."""
    if not name.startswith(PREFIX):
        return None
    text = name[len(PREFIX):]
    if not _SEED_RE.fullmatch(text):
        raise ValueError(f"{name}: SEED must be a non-negative integer (random:SEED)")
    return int(text)


def _num(x: float) -> str:
    """A number as TOML: integers without a fraction, others rounded to 2 decimals."""
    r = round(x, 2)
    return str(int(r)) if r == int(r) else f"{r:g}"


def _prompt(rng: random.Random) -> tuple[str, str, int]:
    """A prompt-length distribution, a word for it and its mean."""
    mean = rng.choice((128, 256, 384, 512, 768, 1024))
    word = "short prompts" if mean <= 256 else "long prompts"
    return (f'{{ dist = "lognormal", mean = {mean}, sigma = {_num(rng.uniform(0.3, 0.6))}, '
            f"min = 16, max = {min(4 * mean, 4096)} }}", word, mean)


def _capped(rate: float, prompt_mean: int) -> float:
    """The arrival rate, lowered so prompts bring at most MAX_PROMPT_TOKENS_S tokens/s."""
    return min(rate, max(1.0, math.floor(2 * MAX_PROMPT_TOKENS_S / prompt_mean) / 2))


def _output(rng: random.Random) -> tuple[str, str]:
    """An output-length distribution and a word for it."""
    lo = rng.choice((16, 32, 64, 128))
    hi = lo * rng.choice((2, 4, 8))
    return f'{{ dist = "uniform", min = {lo}, max = {hi} }}', f"outputs {lo}-{hi}"


def _shift(rng: random.Random, rate: float, batch: int,
           prompt_mean: int) -> tuple[dict[str, str], float, int, int]:
    """One workload change that is not a fault: its keys, the new rate, batch cap and
    mean prompt length."""
    kind = rng.choice(("rate", "batch", "prompt", "output", "mix"))
    keys: dict[str, str] = {}
    if kind in ("rate", "mix"):
        rate = round(rng.choice((0.5, 0.7, 1.5, 2.0)) * rate, 1)
        rate = max(2.0, min(20.0, rate))
        keys["arrival_rate"] = _num(rate)
        keys["name"] = "arrival rate change"
    if kind in ("batch", "mix"):
        batch = batch // 2 if batch >= 16 and (batch >= 32 or rng.random() < 0.5) \
            else batch * 2
        keys["max_batch"] = str(batch)
        keys["name"] = "concurrency change"
    if kind == "prompt":
        keys["prompt"], word, prompt_mean = _prompt(rng)
        keys["name"] = f"prompt-length change ({word})"
    if kind == "output":
        keys["output"], keys["name"] = _output(rng)
        keys["name"] = f"output-length change ({keys['name']})"
    if kind == "mix":
        keys["name"] = "load mix change"
    if _capped(rate, prompt_mean) < rate:
        rate = _capped(rate, prompt_mean)
        keys["arrival_rate"] = _num(rate)
    return keys, rate, batch, prompt_mean


def generate_toml(seed: int) -> str:
    """The scenario TOML that ``random:SEED`` stands for (deterministic in ``seed``)."""
    rng = random.Random(f"prism-random-scenario-{seed}")
    ranks = rng.choice((1, 2, 2, 3, 4))
    layers, hidden = rng.choice([(layers, hidden) for layers in _LAYERS for hidden in _HIDDEN
                                 if layers * hidden * hidden <= MAX_RANK_COST * ranks])
    hidden -= hidden % (ranks * 64)
    rate = float(rng.choice((4, 6, 8, 10, 12)))
    batch = rng.choice((8, 16, 16, 32))
    prompt, _, prompt_mean = _prompt(rng)
    rate = _capped(rate, prompt_mean)
    output, _ = _output(rng)

    kinds = [k for k in INTENSITY_RANGE if ranks > 1 or k != "interconnect_squeeze"]
    rng.shuffle(kinds)
    kinds = kinds[:rng.choice((4, 5))]

    phases: list[dict[str, str]] = [{
        "start_s": "0", "name": "steady", "arrival_rate": _num(rate),
        "max_batch": str(batch), "prompt": prompt, "output": output}]
    faults: list[dict[str, str]] = []
    t = WARMUP_S
    for kind in kinds:
        roll = rng.random()
        if roll < 0.2:  # an idle gap: arrivals stop, running requests drain, then resume
            idle = float(rng.randint(4, 6))
            phases.append({"start_s": _num(t), "name": "idle gap", "arrival_rate": "0"})
            phases.append({"start_s": _num(t + idle), "name": "steady",
                           "arrival_rate": _num(rate)})
            t += idle
        elif roll < 0.8:
            keys, rate, batch, prompt_mean = _shift(rng, rate, batch, prompt_mean)
            phases.append({"start_s": _num(t), **keys})
        t += SETTLE_S + rng.randint(0, 5)
        duration = float(rng.randint(8, 12))
        lo, hi = INTENSITY_RANGE[kind]
        intensity = lo + rng.random() * (hi - lo)
        if kind == "straggler" or (ranks > 1 and rng.random() < 0.5):
            rank = str(rng.randrange(ranks))
        else:
            rank = '"all"'
        faults.append({"type": f'"{kind}"', "start_s": _num(t), "duration_s": _num(duration),
                       "rank": rank, "intensity": _num(intensity)})
        t += duration + rng.randint(5, 9)
    duration_s = t + 5

    lines = [
        f"# Generated by `random:{seed}` (prism_sim/generator.py); the same seed gives "
        "this text.",
        "",
        "[scenario]",
        f'name = "random-{seed}"',
        f'description = "Generated: {ranks} rank(s), {len(faults)} faults '
        f'({", ".join(kinds)}) between workload shifts, {_num(duration_s)} s."',
        f"seed = {seed % 2**63}",
        f"duration_s = {_num(duration_s)}",
        "",
        "[topology]",
        f"ranks = {ranks}",
        f"layers = {layers}",
        f"hidden = {hidden}",
    ]
    for table, rows in (("phase", phases), ("fault", faults)):
        for row in rows:
            lines += ["", f"[[{table}]]"]
            lines += [f'{k} = "{v}"' if k == "name" else f"{k} = {v}" for k, v in row.items()]
    return "\n".join(lines) + "\n"
