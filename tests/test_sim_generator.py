"""Generated scenarios (``random:SEED``) and each fault's measured effect from the labels."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prism_sim.errors import ScenarioError
from prism_sim.generator import (
    INTENSITY_RANGE,
    MAX_DURATION_S,
    MAX_PROMPT_TOKENS_S,
    MAX_RANK_COST,
    SETTLE_S,
    WARMUP_S,
    generate_toml,
    parse_seed,
)
from prism_sim.labels import (
    FaultRecord,
    IterationRecord,
    Labels,
    fault_effects,
    strength_bucket,
)
from prism_sim.scenario import FAULT_INFO, load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "scenarios.md"
seeds = st.integers(min_value=0, max_value=10**18 - 1)


@settings(max_examples=300, deadline=None)
@given(seeds)
def test_every_generated_scenario_parses_within_the_formats_limits(seed: int) -> None:
    """The text goes through the ordinary parser (every limit of the format) and what it
    draws stays in the documented shape: 1-4 ranks, 4-5 faults of distinct kinds at
    intensities in their ranges, a few minutes at most."""
    s = load_scenario(f"random:{seed}")
    assert s == parse_scenario(generate_toml(seed), f"random:{seed}")
    assert s.source == f"random:{seed}" and s.seed == seed
    topo = s.topology
    assert 1 <= topo.ranks <= 4 and topo.hidden % topo.ranks == 0
    assert topo.layers * topo.hidden ** 2 <= MAX_RANK_COST * topo.ranks
    assert s.duration_s is not None and 120 <= s.duration_s <= MAX_DURATION_S
    assert 4 <= len(s.faults) <= 5
    assert all(p.arrival_rate * p.prompt.mean <= MAX_PROMPT_TOKENS_S for p in s.phases)
    assert len({f.type for f in s.faults}) == len(s.faults)
    for f in s.faults:
        lo, hi = INTENSITY_RANGE[f.type]
        assert lo - 0.005 <= f.intensity <= min(hi, FAULT_INFO[f.type].max) + 0.005
        assert 8 <= f.duration_s <= 12 and f.end_s <= s.duration_s
        assert s.topology.ranks > 1 or f.type != "interconnect_squeeze"


@settings(max_examples=300, deadline=None)
@given(seeds)
def test_faults_are_separated_and_no_workload_shift_falls_near_one(seed: int) -> None:
    """Faults never overlap (a gap of 5 s at least), none starts in the warm-up, and no
    phase change falls in the settle time before a fault or during it, so the fault's
    measured effect compares it with the same workload."""
    s = load_scenario(f"random:{seed}")
    faults = sorted(s.faults, key=lambda f: f.start_s)
    assert faults[0].start_s >= WARMUP_S
    for a, b in itertools.pairwise(faults):
        assert b.start_s >= a.end_s + 5
    for f in faults:
        for p in s.phases[1:]:
            assert not f.start_s - SETTLE_S < p.start_s < f.end_s, (p, f)


@given(seeds)
def test_the_same_seed_gives_the_same_text(seed: int) -> None:
    assert generate_toml(seed) == generate_toml(seed)
    assert load_scenario(f"random:{seed}") == load_scenario(f"random:{seed}")


def test_seeds_draw_every_kind_topology_and_shift() -> None:
    """Over 50 seeds: every fault type, 1 to 4 ranks, idle gaps and each kind of shift."""
    scenarios = [load_scenario(f"random:{seed}") for seed in range(50)]
    assert {f.type for s in scenarios for f in s.faults} == set(FAULT_INFO)
    assert {s.topology.ranks for s in scenarios} == {1, 2, 3, 4}
    names = {p.name.split(" (")[0] for s in scenarios for p in s.phases}
    assert {"idle gap", "arrival rate change", "concurrency change", "load mix change",
            "prompt-length change", "output-length change"} <= names
    assert len({generate_toml(seed) for seed in range(50)}) == 50


@pytest.mark.parametrize("name", ["random:", "random:-1", "random:1.5", "random:x"])
def test_a_malformed_seed_is_one_clear_error(name: str) -> None:
    with pytest.raises(ScenarioError, match=re.escape(name) + ": SEED must be"):
        load_scenario(name)
    assert parse_seed("smoke") is None


def test_the_documented_seed_lists_are_disjoint_and_generate() -> None:
    """docs/scenarios.md names the development and held-out seeds; none is in both."""
    text = DOCS.read_text(encoding="utf-8")

    def listed(label: str) -> list[int]:
        m = re.search(rf"^{label} seeds: `([0-9 ,]+)`", text, re.M)
        assert m is not None, label
        return [int(x) for x in m.group(1).replace(",", " ").split()]

    dev, held = listed("Development"), listed("Held-out")
    assert len(held) >= 10 and dev and not set(dev) & set(held)
    for seed in dev + held:
        load_scenario(f"random:{seed}")


def test_prism_sim_print_shows_the_drawn_scenario() -> None:
    res = subprocess.run([sys.executable, "-m", "prism_tui.cli", "sim", "--scenario",
                          "random:7", "--print"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout == generate_toml(7)
    bad = subprocess.run([sys.executable, "-m", "prism_tui.cli", "sim", "--scenario",
                          "random:seven", "--print"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "random:seven" in bad.stderr


# --------------------------------------------------------------------------- effects

S = 1_000_000_000


def _run(before_ms: float, under_ms: float) -> Labels:
    """One rank decoding back to back: ``before_ms`` steps for 20 s, then a fault on
    rank 0 for 5 s with ``under_ms`` steps, then ``before_ms`` again."""
    fault = FaultRecord("device_slowdown", 0, 20 * S, 25 * S, 0.5)
    labels = Labels(None, [fault])
    t, index = 0, 0
    while t < 30 * S:
        step = int((under_ms if fault.overlaps(t, t + int(before_ms * 1e6)) else before_ms)
                   * 1e6)
        on = fault.overlaps(t, t + step)
        kinds = ("device_slowdown",) if on else ()
        labels.iterations.append(IterationRecord(0, index, t, t + step, "decode", 8, 8, 100,
                                                 on, kinds, kinds))
        labels.iterations.append(IterationRecord(1, index, t, t + step, "decode", 8, 8, 100,
                                                 on, kinds, ()))
        t, index = t + step, index + 1
    return labels


def test_fault_effect_is_the_ratio_of_medians_under_and_just_before() -> None:
    (effect,) = fault_effects(_run(10.0, 15.0))
    assert effect.slowdown == pytest.approx(1.5, rel=0.01)
    assert 800 <= effect.before <= 801 and 333 <= effect.under <= 335  # rank 0 only
    assert strength_bucket(effect.slowdown) == ">=1.5x"
    (mild,) = fault_effects(_run(10.0, 10.5))
    assert mild.slowdown == pytest.approx(1.05, rel=0.01)
    assert strength_bucket(mild.slowdown) == "<1.1x"


def test_fault_effect_needs_iterations_on_both_sides() -> None:
    labels = _run(10.0, 15.0)
    labels.iterations = [it for it in labels.iterations if it.start_ns >= 20 * S]
    (effect,) = fault_effects(labels)
    assert effect.slowdown is None and effect.before == 0
    assert strength_bucket(None) == "unmeasured"
    assert [strength_bucket(x) for x in (1.0, 1.1, 1.19, 1.2, 1.49, 1.5)] == [
        "<1.1x", "1.1-1.2x", "1.1-1.2x", "1.2-1.5x", "1.2-1.5x", ">=1.5x"]
