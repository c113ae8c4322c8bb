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


def test_blips_too_short_to_page_do_not_hold_an_episode_open() -> None:
    """A sub-millisecond loop on a busy host fires on a few normal iterations every
    second: blips that could not open an episode let an open one close, 5 s after the
    anomaly ended, where any firing iteration used to restart the clear hold."""
    gate = EpisodeGate()
    # 0.5 ms iterations: firing 1-3 s (an anomaly), then normal load whose detector
    # fires on 2 iterations in a row every 100 ms (2 % of them)
    def firing(k: int) -> bool:
        t_ms = k * 0.5
        return 1000 <= t_ms < 3000 or (t_ms >= 3000 and k % 200 < 2)
    states = [(k * 500_000, firing(k)) for k in range(30_000)]
    changes = feed(gate, states)
    assert [c for _, c in changes] == ["opened", "closed"]
    opened, closed = (states[i][0] / 1e9 for i, _ in changes)
    assert opened == pytest.approx(1.5) and closed == pytest.approx(8.0, abs=0.01)
    # a firing run that meets the opening holds (500 ms) keeps it open as before
    gate = EpisodeGate()
    states = [(k * 500_000, 1000 <= k * 0.5 < 3000 or 5000 <= k * 0.5 < 5600)
              for k in range(30_000)]
    changes = feed(gate, states)
    assert [c for _, c in changes] == ["opened", "closed"]
    assert states[changes[1][0]][0] / 1e9 == pytest.approx(10.6, abs=0.01)


def test_holds_are_validated() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        EpisodeHolds(open_iterations=0)
    with pytest.raises(ValueError, match="finite"):
        EpisodeHolds(close_ms=float("inf"))
    with pytest.raises(ValueError, match="finite"):
        EpisodeHolds(open_ms=-1)


def _held(holds: EpisodeHolds, run: list[tuple[int, bool]], opening: bool) -> bool:
    """Whether ``run`` (iterations in a row) meets the opening or the closing holds."""
    n, hold_ms = ((holds.open_iterations, holds.open_ms) if opening else
                  (holds.close_iterations, holds.close_ms))
    return len(run) >= n and (run[-1][0] - run[0][0]) / MS >= hold_ms


def reference(holds: EpisodeHolds, states: list[tuple[int, bool]]) -> list[tuple[int, str]]:
    """The definition, recomputed from the history at every iteration: closed, an
    episode opens when the firing iterations in a row since the last change meet the
    opening holds; open, it closes on a clear iteration when, since the last time it
    opened or a firing run met the opening holds, the first clear iteration and the
    clear ones after it meet the closing holds (shorter firing runs between them are
    skipped, their time counted)."""
    out: list[tuple[int, str]] = []
    is_open = False
    for i in range(len(states)):
        since = out[-1][0] + 1 if out else 0
        if not is_open:
            j = i
            while j >= since and states[j][1]:
                j -= 1
            if _held(holds, states[j + 1:i + 1], opening=True):
                is_open = True
                out.append((i, "opened"))
            continue
        if states[i][1]:
            continue
        # the last time the anomaly was established: the opening, or a firing run (in
        # the episode, after a clear iteration) meeting the opening holds
        start = since
        k = since
        while k <= i and states[k][1]:  # still firing from the opening on
            k += 1
        while k <= i:
            if states[k][1]:
                r = k
                while r <= i and states[r][1]:
                    if _held(holds, states[k:r + 1], opening=True):
                        start = r + 1
                        break
                    r += 1
                k = r + 1 if r <= i and states[r][1] else r
                while k <= i and states[k][1]:  # the rest of an established run
                    k += 1
            else:
                k += 1
        c = start
        while c <= i and states[c][1]:
            c += 1
        clear = [st for st in states[c:i + 1] if not st[1]]
        if clear and len(clear) >= holds.close_iterations and \
                (states[i][0] - states[c][0]) / MS >= holds.close_ms:
            is_open = False
            out.append((i, "closed"))
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
