"""Alert episodes from per-iteration firing states (injected clock, no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prism_tui.engine.episodes import EpisodeGate, EpisodeHolds

MS = 1_000_000


def feed(gate: EpisodeGate, states: list[tuple[int, bool]]) -> list[tuple[int, str]]:
    """The gate's changes as (index, change)."""
    out: list[tuple[int, str]] = []
    for i, (t, firing) in enumerate(states):
        change = gate.observe(t, firing)
        if change is not None:
            out.append((i, change))
    return out


def test_opens_once_both_holds_are_reached_and_closes_after_the_clear_holds() -> None:
    gate = EpisodeGate(EpisodeHolds(open_iterations=3, open_ms=500, close_iterations=10,
                                    close_ms=5000))
    # 10 ms iterations: 100 clear, 200 firing (2 s), 1000 clear
    states = [(k * 10 * MS, 100 <= k < 300) for k in range(1300)]
    changes = feed(gate, states)
    # the time hold binds: 500 ms after the first firing iteration (k = 100)
    assert changes == [(150, "opened"), (800, "closed")]


def test_the_iteration_hold_binds_on_a_slow_loop() -> None:
    gate = EpisodeGate(EpisodeHolds(open_iterations=3, open_ms=500, close_iterations=10,
                                    close_ms=5000))
    # one iteration a second: 3 firing ones (2 s), 10 clear ones (9 s)
    states = [(k * 1000 * MS, 5 <= k < 20) for k in range(40)]
    assert feed(gate, states) == [(7, "opened"), (29, "closed")]


def test_a_blip_on_a_sub_millisecond_loop_does_not_page() -> None:
    gate = EpisodeGate()
    # 0.2 ms iterations, firing for 100 ms (500 iterations) at a time, twice
    states = [(k * 200_000, 1000 <= k < 1500 or 4000 <= k < 4500) for k in range(10_000)]
    assert feed(gate, states) == []
    assert not gate.open and gate.started_ns is None


def test_a_flapping_20_s_fault_pages_once() -> None:
    gate = EpisodeGate()
    # 15 ms iterations; during the fault (10-30 s) the detector resolves on 3 normal
    # iterations in every 40 and fires again, as it does in a CPU squeeze
    def firing(k: int) -> bool:
        t = k * 15
        return 10_000 <= t < 30_000 and k % 40 >= 3
    states = [(k * 15 * MS, firing(k)) for k in range(3000)]
    changes = feed(gate, states)
    assert [c for _, c in changes] == ["opened", "closed"]
    opened, closed = (states[i][0] / 1e9 for i, _ in changes)
    assert 10.5 <= opened <= 11.2 and 35.0 <= closed <= 35.2
    assert not gate.open and gate.started_ns is None


def test_holds_are_validated() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        EpisodeHolds(open_iterations=0)
    with pytest.raises(ValueError, match="finite"):
        EpisodeHolds(close_ms=float("inf"))
    with pytest.raises(ValueError, match="finite"):
        EpisodeHolds(open_ms=-1)


def reference(holds: EpisodeHolds, states: list[tuple[int, bool]]) -> list[tuple[int, str]]:
    """The definition, recomputed from the whole history at every iteration."""
    out: list[tuple[int, str]] = []
    is_open = False
    for i in range(len(states)):
        want = not is_open  # the state that would change it: firing when closed
        j = i
        while j >= 0 and states[j][1] == want:
            j -= 1
        run = states[j + 1:i + 1]
        if out and run and out[-1][0] >= j + 1:
            # the run started before the last change: only its part after it counts
            run = states[out[-1][0] + 1:i + 1]
        n, hold_ms = ((holds.open_iterations, holds.open_ms) if want else
                      (holds.close_iterations, holds.close_ms))
        if run and len(run) >= n and (run[-1][0] - run[0][0]) / MS >= hold_ms:
            is_open = want
            out.append((i, "opened" if want else "closed"))
    return out


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(st.tuples(st.integers(0, 400), st.booleans()), min_size=1, max_size=200),
    holds=st.builds(EpisodeHolds, st.integers(1, 6), st.sampled_from([0.0, 1.0, 5.0, 50.0]),
                    st.integers(1, 6), st.sampled_from([0.0, 2.0, 20.0, 100.0])),
)
def test_the_gate_follows_its_definition(steps: list[tuple[int, bool]],
                                         holds: EpisodeHolds) -> None:
    t, states = 0, []
    for gap_us, firing in steps:  # gaps of 0-0.4 ms: blips and holds of every length
        t += gap_us * 1000
        states.append((t, firing))
    changes = feed(EpisodeGate(holds), states)
    assert changes == reference(holds, states)
    kinds = [c for _, c in changes]
    assert kinds == ["opened", "closed"] * (len(kinds) // 2) + ["opened"] * (len(kinds) % 2)
    # never more openings than runs of firing iterations
    runs = sum(1 for i, (_, f) in enumerate(states) if f and (i == 0 or not states[i - 1][1]))
    assert kinds.count("opened") <= runs
