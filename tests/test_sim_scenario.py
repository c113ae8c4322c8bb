"""Scenarios (parsing, built-ins, timelines, distributions) and ground-truth labels."""

from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prism_sim.errors import ScenarioError, SimError
from prism_sim.labels import FaultTimeline, LabelWriter, fault_bit, read_labels
from prism_sim.scenario import (
    DIST_KINDS,
    FAULT_INFO,
    FAULT_TYPES,
    Dist,
    FaultSpec,
    Scenario,
    available_scenarios,
    load_scenario,
    parse_scenario,
)

HEAD = '[scenario]\nname = "t"\nduration_s = 100\n'


# --------------------------------------------------------------------------- built-ins


def test_every_builtin_parses_and_round_trips_through_its_source() -> None:
    names = available_scenarios()
    assert set(names) >= {"smoke", "paper", "mixed", "demo", "soak"}
    for name, description in names.items():
        s = load_scenario(name)
        assert s.name == name and description and s.description.startswith(description)
        assert Path(s.source).is_absolute()
        assert load_scenario(s.source) == s  # rank processes reload it by path
        for f in s.faults:
            assert f.type in FAULT_TYPES and 0 < f.intensity <= FAULT_INFO[f.type].max
            if s.duration_s is not None:
                assert f.end_s <= s.duration_s


def test_builtins_have_the_shapes_the_docs_promise() -> None:
    smoke = load_scenario("smoke")
    assert smoke.duration_s is not None and smoke.duration_s <= 60
    assert [(f.type, f.rank) for f in smoke.faults] == [("device_slowdown", 1)]

    paper = load_scenario("paper")
    assert [f.type for f in paper.faults] == [
        "cpu_squeeze", "cpu_throttle", "device_slowdown", "interconnect_squeeze",
        "interconnect_squeeze"]
    assert paper.faults[0].start_s >= 60  # a long normal stretch first
    assert paper.faults[3].rank != paper.faults[4].rank  # NVLink vs the PCIe stand-in
    gaps = [b.start_s - a.end_s for a, b in zip(paper.faults, paper.faults[1:], strict=False)]
    assert all(g > 0 for g in gaps)

    mixed = load_scenario("mixed")
    assert {f.type for f in mixed.faults} == set(FAULT_TYPES)
    starts = [p.start_s for p in mixed.phases]
    assert len(starts) >= 5
    assert any(p.arrival_rate == 0 for p in mixed.phases)  # an idle gap
    assert len({p.max_batch for p in mixed.phases}) >= 3  # concurrency steps
    assert len({p.prompt for p in mixed.phases}) >= 2  # prompt surge
    assert len({p.output for p in mixed.phases}) >= 2  # output-length change

    demo = load_scenario("demo")
    assert demo.duration_s is None and demo.repeat_every_s is not None
    soak = load_scenario("soak")
    assert soak.duration_s is not None and soak.duration_s >= 1800 and soak.faults


def test_demo_fault_timeline_expands_repeats() -> None:
    demo = load_scenario("demo")
    every = demo.repeat_every_s
    assert every is not None
    cycles = 3
    until = demo.repeat_from_s + cycles * every
    timeline = demo.fault_timeline(until)
    assert len(timeline) == cycles * len(demo.faults)
    assert [f.start_s for f in timeline] == sorted(f.start_s for f in timeline)
    for k in range(cycles):
        chunk = timeline[k * len(demo.faults):(k + 1) * len(demo.faults)]
        for base, inst in zip(demo.faults, chunk, strict=True):
            assert inst.type == base.type and inst.rank == base.rank
            assert inst.start_s == pytest.approx(base.start_s + k * every)
            assert inst.duration_s == base.duration_s
    # windows partition the timeline
    halves = demo.faults_between(0, until / 2) + demo.faults_between(until / 2, until)
    assert halves == timeline
    # the workload cycle repeats too
    for t in (65.0, 105.0, 145.0, 225.0, 250.0):
        assert demo.phase_at(t + 2 * every) == demo.phase_at(t)


def test_finite_timeline_stops_at_the_end_and_with_duration_overrides() -> None:
    smoke = load_scenario("smoke")
    assert smoke.fault_timeline(1e9) == list(smoke.faults)
    assert smoke.fault_timeline(10) == []
    short = smoke.with_duration(15)
    assert short.duration_s == 15 and short.fault_timeline(1e9) == []
    assert smoke.with_duration(0).duration_s is None
    with pytest.raises(ScenarioError, match="--duration"):
        smoke.with_duration(-1)


def test_repeating_finite_scenario_expands_until_its_end() -> None:
    s = parse_scenario(HEAD + "repeat_every_s = 30\nrepeat_from_s = 10\n"
                       '[[fault]]\ntype = "gc_storm"\nstart_s = 15\nduration_s = 5\n')
    assert [f.start_s for f in s.fault_timeline(1e9)] == [15, 45, 75]


# --------------------------------------------------------------------------- bad input


def _fault(body: str) -> str:
    return HEAD + '[[fault]]\ntype = "device_slowdown"\nstart_s = 10\nduration_s = 5\n' + body


BAD = [
    # (text, expected key, expected reason fragment)
    ("[scenario\n", "invalid TOML", "line 1"),
    ("", "scenario", "missing table"),
    ('[scenario]\nnme = "x"\n', "scenario.nme", "did you mean 'name'"),
    ("[scenario]\nseed = 1\n", "scenario.name", "missing"),
    ('[scenario]\nname = "a b"\n', "scenario.name", "letters"),
    (HEAD.replace("100", "-5"), "scenario.duration_s", "must be >= 0, got -5"),
    (HEAD.replace("100", '"long"'), "scenario.duration_s", "must be a number"),
    (HEAD.replace("100", "inf"), "scenario.duration_s", "finite"),
    (HEAD + "seed = true\n", "scenario.seed", "must be an integer"),
    (HEAD + "[topologee]\n", "topologee", "did you mean 'topology'"),
    (HEAD + "[topology]\nranks = 0\n", "topology.ranks", "between 1 and 16"),
    (HEAD + "[topology]\nranks = 3\n", "topology.hidden", "multiple of ranks"),
    (HEAD + "[topology]\nflops_per_s = 0\n", "topology.flops_per_s", "more than 0"),
    (HEAD + "[topology]\njitter = 0.9\n", "topology.jitter", "between 0 and 0.5"),
    (_fault("intensity = 1.5\n"), "fault[0].intensity", "must be between 0 and 0.95, got 1.5"),
    (_fault("intensity = 0\n"), "fault[0].intensity", "more than 0"),
    (_fault("rank = 2\n"), "fault[0].rank", "between 0 and 1"),
    (_fault('rank = "both"\n'), "fault[0].rank", 'or "all"'),
    (_fault("rnak = 1\n"), "fault[0].rnak", "did you mean 'rank'"),
    (HEAD + '[[fault]]\ntype = "slowdown"\nstart_s = 1\nduration_s = 1\n',
     "fault[0].type", "did you mean 'device_slowdown'"),
    (HEAD + '[[fault]]\ntype = "straggler"\nstart_s = 1\nduration_s = 1\n',
     "fault[0].rank", "needs one rank"),
    (HEAD + '[[fault]]\ntype = "straggler"\nstart_s = 1\nduration_s = 1\nrank = "all"\n',
     "fault[0].rank", "not 'all'"),
    (HEAD + '[[fault]]\ntype = "gc_storm"\nstart_s = 1\nduration_s = -2\n',
     "fault[0].duration_s", "must be > 0, got -2"),
    (HEAD + '[[fault]]\ntype = "gc_storm"\nduration_s = 2\n', "fault[0].start_s", "missing"),
    (HEAD + '[[fault]]\ntype = "gc_storm"\nstart_s = 95\nduration_s = 10\n',
     "fault[0].duration_s", "past the end"),
    (HEAD + '[[fault]]\ntype = "gc_storm"\nstart_s = 150\nduration_s = 10\n',
     "fault[0].start_s", "past the end"),
    (_fault('[[fault]]\ntype = "straggler"\nstart_s = 12\nduration_s = 5\nrank = 0\n'),
     "fault[1].start_s", "overlaps fault[0]"),
    (HEAD + "[[phase]]\nstart_s = 5\n", "phase[0].start_s", "first phase must start at 0"),
    (HEAD + "[[phase]]\n[[phase]]\nstart_s = 20\n[[phase]]\nstart_s = 10\n",
     "phase[2].start_s", "time order"),
    (HEAD + "[[phase]]\n[[phase]]\narrival_rate = 2\n", "phase[1].start_s", "missing"),
    (HEAD + "[[phase]]\n[[phase]]\nstart_s = 100\n", "phase[1].start_s", "at or after the end"),
    (HEAD + "[[phase]]\narrival_rate = -1\n", "phase[0].arrival_rate", "between 0"),
    (HEAD + "[[phase]]\nmax_batch = 2.5\n", "phase[0].max_batch", "integer"),
    (HEAD + '[[phase]]\nprompt = { dist = "normal", mean = 5 }\n', "phase[0].prompt.dist",
     "unknown distribution"),
    (HEAD + '[[phase]]\nprompt = { dist = "uniform", min = 50, max = 10 }\n',
     "phase[0].prompt.max", "must be >= min (50)"),
    (HEAD + '[[phase]]\nprompt = { dist = "fixed", value = 8, sigma = 1 }\n',
     "phase[0].prompt.sigma", "unknown key"),
    (HEAD + '[[phase]]\nprompt = { dist = "choice", values = [] }\n',
     "phase[0].prompt.values", "non-empty"),
    (HEAD + '[[phase]]\nprompt = { dist = "choice", values = [1, 2], weights = [1] }\n',
     "phase[0].prompt.weights", "array of 2"),
    (HEAD + '[[phase]]\noutput = { dist = "lognormal", sigma = 1 }\n',
     "phase[0].output.mean", "missing"),
    (HEAD + "[[phase]]\noutput = 5\n", "phase[0].output", "must be a table"),
    (HEAD + "phase = 3\n", "scenario.phase", "unknown key"),
    (HEAD + "repeat_from_s = 3\n", "scenario.repeat_from_s", "repeat_every_s"),
    (HEAD + "repeat_every_s = 30\n"
     '[[fault]]\ntype = "gc_storm"\nstart_s = 25\nduration_s = 10\n',
     "fault[0].duration_s", "within its cycle"),
    (HEAD + "repeat_every_s = 30\n[[phase]]\n[[phase]]\nstart_s = 40\n",
     "phase[1].start_s", "first cycle"),
]


@pytest.mark.parametrize(("text", "key", "reason"), BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_scenario_names_key_and_reason(text: str, key: str, reason: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, "bad.toml")
    message = str(info.value)
    assert message.startswith("bad.toml"), message
    assert key in message and reason in message, message
    assert "\n" not in message
    assert info.value.exit_code == 2


def test_error_names_the_line_of_the_bad_key() -> None:
    text = _fault("rank = 1\nintensity = 1.5\n")
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, "smoke.toml")
    line = text.splitlines().index("intensity = 1.5") + 1
    assert str(info.value).startswith(
        f"smoke.toml:{line}: fault[0].intensity: must be between 0 and 0.95, got 1.5")


def test_load_scenario_errors(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"no such scenario.*built-ins: .*smoke"):
        load_scenario("no-such-scenario")
    bad = tmp_path / "mine.toml"
    bad.write_text(_fault("intensity = 2\n"))
    with pytest.raises(ScenarioError, match=r"^.*mine\.toml:\d+: fault\[0\]\.intensity"):
        load_scenario(str(bad))
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(str(binary))


def test_defaults_and_inheritance() -> None:
    s = parse_scenario(
        '[scenario]\nname = "x"\n'
        "[[phase]]\narrival_rate = 3\nmax_batch = 4\n"
        '[[phase]]\nstart_s = 10\nprompt = { dist = "fixed", value = 99 }\n'
        '[[fault]]\ntype = "gil_contention"\nstart_s = 1\nduration_s = 2\n'
        '[[fault]]\ntype = "cpu_squeeze"\nstart_s = 1\nduration_s = 2\nrank = "all"\n')
    assert s.duration_s is None and s.seed == 0 and s.topology.ranks == 2
    second = s.phases[1]
    assert (second.arrival_rate, second.max_batch) == (3, 4)
    assert second.prompt == Dist.fixed(99) and second.output == s.phases[0].output
    assert s.faults[0] == FaultSpec("gil_contention", 1, 2, 0, FAULT_TYPES["gil_contention"])
    assert s.faults[1].rank is None and s.faults[1].targets(3) == (0, 1, 2)
    assert FaultSpec("gc_storm", 1, 2, 1, 0.5).targets(3) == (1,)


def test_phase_at() -> None:
    s = parse_scenario(HEAD + "[[phase]]\narrival_rate = 1\n[[phase]]\nstart_s = 10\n"
                       "arrival_rate = 2\n[[phase]]\nstart_s = 20\narrival_rate = 0\n")
    rates = [s.phase_at(t).arrival_rate for t in (-1, 0, 9.999, 10, 15, 20, 99, 1e6)]
    assert rates == [1, 1, 1, 2, 2, 0, 0, 0]


# --------------------------------------------------------------------------- distributions


DISTS = [
    Dist.fixed(7),
    Dist.uniform(3, 9),
    Dist("lognormal", mean=256, sigma=0.8, min=16, max=1024),
    Dist("choice", min=5, max=50, values=(5, 10, 50), weights=(1, 0, 3)),
]


@pytest.mark.parametrize("dist", DISTS, ids=[d.kind for d in DISTS])
def test_dist_is_deterministic_and_bounded(dist: Dist) -> None:
    a = [dist.sample(random.Random(11)) for _ in range(3)]
    rng1, rng2 = random.Random(5), random.Random(5)
    xs = [dist.sample(rng1) for _ in range(2000)]
    assert xs == [dist.sample(rng2) for _ in range(2000)]
    assert len(set(a)) == 1
    assert all(isinstance(x, int) and dist.min <= x <= dist.max for x in xs)
    if dist.kind == "choice":
        assert set(xs) == {5, 50}  # weight 0 is never drawn
    if dist.kind == "lognormal":
        mean = sum(xs) / len(xs)
        assert 0.8 * dist.expected < mean < 1.2 * dist.expected
    if dist.kind == "uniform":
        assert set(xs) == set(range(3, 10))
    assert set(DIST_KINDS) == {d.kind for d in DISTS}


# --------------------------------------------------------------------------- fuzzing

_KEYS = ["name", "seed", "duration_s", "repeat_every_s", "repeat_from_s", "ranks", "hidden",
         "layers", "jitter", "start_s", "duration_s", "type", "rank", "intensity",
         "arrival_rate", "max_batch", "prompt", "output", "dist", "value", "min", "max",
         "mean", "sigma", "values", "weights", "bogus"]
_HEADERS = ["[scenario]", "[topology]", "[[phase]]", "[[fault]]", "[[scenario]]", "[phase]",
            "[fault.x]", "[other]"]
_scalars = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(
        lambda f: "nan" if f != f else ("inf" if f == float("inf") else
                                        "-inf" if f == float("-inf") else repr(f))),
    st.sampled_from(['"smoke"', '"all"', '"device_slowdown"', '"straggler"', '"fixed"',
                     '"choice"', '"lognormal"', '"uniform"', "true", "false", '""',
                     "1979-05-27"]),
    st.sampled_from(list(FAULT_TYPES)).map(lambda t: f'"{t}"'),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.lists(st.tuples(st.sampled_from(_KEYS), inner), max_size=4).map(
            lambda kv: "{ " + ", ".join(f"{k} = {v}" for k, v in dict(kv).items()) + " }")),
    max_leaves=8)
_lines = st.one_of(
    st.sampled_from(_HEADERS),
    st.tuples(st.sampled_from(_KEYS), _values).map(lambda kv: f"{kv[0]} = {kv[1]}"),
    st.text(max_size=20),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_lines, max_size=25))
def test_random_tomlish_text_only_raises_scenario_error(lines: list[str]) -> None:
    try:
        s = parse_scenario("\n".join(lines), "fuzz.toml")
    except ScenarioError as exc:
        assert str(exc).startswith("fuzz.toml")
        return
    assert isinstance(s, Scenario)
    s.phase_at(12.5)
    s.fault_timeline(1000)
    rng = random.Random(0)
    for ph in s.phases:
        assert ph.prompt.min <= ph.prompt.sample(rng) <= ph.prompt.max


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_random_text_only_raises_scenario_error(text: str) -> None:
    with contextlib.suppress(ScenarioError):
        parse_scenario(text)


_TEMPLATE: dict[str, object] = {
    "scenario": {"name": "fuzz", "seed": 3, "duration_s": 100},
    "topology": {"ranks": 2, "layers": 4, "hidden": 1024},
    "phase": [{"start_s": 0, "arrival_rate": 4.0, "max_batch": 8,
               "prompt": {"dist": "lognormal", "mean": 100, "sigma": 0.5, "min": 8,
                          "max": 400},
               "output": {"dist": "uniform", "min": 8, "max": 64}},
              {"start_s": 50, "prompt": {"dist": "choice", "values": [8, 16],
                                         "weights": [1, 2]}}],
    "fault": [{"type": "straggler", "start_s": 10, "duration_s": 5, "rank": 1},
              {"type": "cpu_squeeze", "start_s": 12, "duration_s": 5, "rank": "all",
               "intensity": 0.5}],
}
_objs = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64),
              st.floats(allow_nan=True), st.text(max_size=8),
              st.sampled_from(["all", *FAULT_TYPES, *DIST_KINDS])),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(_KEYS), inner, max_size=3)),
    max_leaves=6)


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else
                                     "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()
                                if x is not None) + " }"
    return '"none"'


def _to_toml(doc: dict[str, object]) -> str:
    out: list[str] = []
    for name, body in doc.items():
        tables = body if isinstance(body, list) else [body]
        for t in tables:
            if not isinstance(t, dict):
                out.append(f"{name} = {_toml_value(body)}")
                break
            out.append(f"[[{name}]]" if isinstance(body, list) else f"[{name}]")
            out.extend(f"{k} = {_toml_value(v)}" for k, v in t.items() if v is not None)
    return "\n".join(out) + "\n"


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_scenarios_only_raise_scenario_error(data: st.DataObject) -> None:
    doc = json.loads(json.dumps(_TEMPLATE))
    for _ in range(data.draw(st.integers(1, 3))):
        node: object = doc
        while True:  # walk to a random table, then replace or add one key
            if isinstance(node, list) and node:
                node = node[data.draw(st.integers(0, len(node) - 1))]
                continue
            if isinstance(node, dict) and node and data.draw(st.booleans()):
                child = node[data.draw(st.sampled_from(sorted(node)))]
                if isinstance(child, (dict, list)) and child:
                    node = child
                    continue
            break
        if isinstance(node, dict):
            node[data.draw(st.sampled_from([*node, *_KEYS]))] = data.draw(_objs)
    text = _to_toml(doc)
    try:
        s = parse_scenario(text, "m.toml")
    except ScenarioError as exc:
        assert str(exc).startswith("m.toml")
        return
    s.fault_timeline(500)
    rng = random.Random(1)
    for ph in s.phases:
        assert ph.output.min <= ph.output.sample(rng) <= ph.output.max


def test_template_is_valid() -> None:
    s = parse_scenario(_to_toml(_TEMPLATE))
    assert len(s.phases) == 2 and len(s.faults) == 2


# --------------------------------------------------------------------------- timeline, labels


def _spec(type_: str = "device_slowdown", rank: int | None = 1, start_s: float = 0.0
          ) -> FaultSpec:
    return FaultSpec(type_, start_s, 10.0, rank, 0.5)


def test_fault_timeline_overlap_edges_and_ranks() -> None:
    tl = FaultTimeline()
    a = _spec(rank=1)
    tl.started(a, 100)
    assert tl.active(1, 150, 160) == ["device_slowdown"]  # still on: open-ended
    assert tl.active(1, 10_000, 20_000) == ["device_slowdown"]
    tl.ended(a, 200)
    assert tl.start_of(a) == 100 and not tl.is_on(a)
    assert tl.active(1, 50, 100) == []  # ends exactly when the fault starts
    assert tl.active(1, 50, 101) == ["device_slowdown"]
    assert tl.active(1, 199, 300) == ["device_slowdown"]
    assert tl.active(1, 200, 300) == []  # starts exactly when it ends
    assert tl.active(1, 100, 100) == ["device_slowdown"]  # zero-length, inside
    assert tl.active(1, 200, 200) == []
    assert tl.active(1, 50, 400) == ["device_slowdown"]  # covers the whole window
    assert tl.active(0, 150, 160) == []  # other rank
    assert tl.active(None, 150, 160) == ["device_slowdown"]  # any rank
    every = _spec("gc_storm", rank=None)
    tl.started(every, 150)
    tl.ended(every, 170)
    assert tl.active(0, 160, 165) == ["gc_storm"]
    assert tl.active(1, 160, 165) == ["device_slowdown", "gc_storm"]
    again = _spec(rank=1, start_s=100)  # a second window of the same type: listed once
    tl.started(again, 180)
    assert tl.active(1, 175, 185) == ["device_slowdown"]
    with pytest.raises(ValueError, match="not on"):
        tl.ended(_spec("straggler"), 5)


def test_label_writer_round_trip(tmp_path: Path) -> None:
    scenario = load_scenario("smoke")
    tl = FaultTimeline()
    path = tmp_path / "labels.jsonl"
    t0 = time.monotonic_ns()
    on, left_on = _spec(rank=1), _spec("gc_storm", rank=None, start_s=30)
    with LabelWriter(path, tl) as w:
        w.scenario(scenario, t0)
        w.iteration(0, 0, t0 + 10, t0 + 20, "prefill", 2, 300, 300)
        tl.started(on, t0 + 100)
        w.iteration(0, 1, t0 + 90, t0 + 110, "decode", 2, 2, 302)  # fault on rank 1 only
        w.iteration(1, 1, t0 + 90, t0 + 110, "decode", 2, 2, 302)
        tl.ended(on, t0 + 200)
        w.fault(on, t0 + 100, t0 + 200)
        w.iteration(0, 2, t0 + 200, t0 + 210, "mixed", 3, 40, 500)
        # a reader tails the file while it is written
        assert len(read_labels(path).iterations) == 4
        tl.started(left_on, t0 + 300)
    assert w.closed
    w.close()  # idempotent

    labels = read_labels(path)
    assert labels.scenario is not None
    assert (labels.scenario.name, labels.scenario.seed, labels.scenario.ranks,
            labels.scenario.started_ns) == ("smoke", 7, 2, t0)
    assert [(f.type, f.rank, f.start_ns) for f in labels.faults] == [
        ("device_slowdown", 1, t0 + 100), ("gc_storm", None, t0 + 300)]
    assert labels.faults[0].end_ns == t0 + 200 and labels.faults[0].intensity == 0.5
    assert labels.faults[1].end_ns >= t0 + 300  # ended at close
    its = labels.iterations
    assert [(i.rank, i.index, i.phase, i.fault_active) for i in its] == [
        (0, 0, "prefill", False), (0, 1, "decode", True), (1, 1, "decode", True),
        (0, 2, "mixed", False)]
    assert its[1].faults == ("device_slowdown",) and its[1].rank_faults == ()
    assert its[2].rank_faults == ("device_slowdown",)
    assert (its[3].batch_size, its[3].tokens, its[3].kv_len, its[3].duration_ns) == (
        3, 40, 500, 10)
    assert [i.index for i in labels.decode()] == [1, 1]
    assert labels.faults_during(t0 + 150, t0 + 160, rank=0) == []
    assert labels.faults_during(t0 + 150, t0 + 160) == ["device_slowdown"]
    first = json.loads(path.read_text().splitlines()[0])
    assert first["kind"] == "scenario" and first["clock"] == "CLOCK_MONOTONIC"
    with pytest.raises(SimError, match="closed"):
        w.iteration(0, 3, 0, 1, "decode", 1, 1, 1)


def test_read_labels_skips_a_torn_last_line_and_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    good = ('{"kind":"scenario","name":"x","seed":1,"ranks":2,"started_ns":5}\n'
            '{"kind":"future","x":1}\n')
    path.write_text(good + '{"kind":"iteration","ra')
    labels = read_labels(path)
    assert labels.scenario is not None and labels.iterations == []
    path.write_text(good + "not json\n")
    with pytest.raises(SimError, match=r"l\.jsonl:3: not JSON"):
        read_labels(path)
    path.write_text(good + '{"kind":"fault","type":"x","rank":true,"start_ns":1,'
                    '"end_ns":2,"intensity":0.5}\n')
    with pytest.raises(SimError, match=r":3: 'rank'"):
        read_labels(path)
    path.write_text('{"kind":"iteration","rank":0}\n')
    with pytest.raises(SimError, match="missing 'index'"):
        read_labels(path)
    with pytest.raises(SimError, match="cannot read"):
        read_labels(tmp_path / "absent.jsonl")


def test_fault_effect_round_trips_and_old_files_read_without_it(tmp_path: Path) -> None:
    """A fault line's measured effect is written and read back; a line without one (files
    written before it existed) reads with ``effect`` None and ``bit`` None."""
    tl, path = FaultTimeline(), tmp_path / "labels.jsonl"
    spec = _spec("cpu_squeeze", rank=0)
    effect = {"target": {"window_s": 1.0, "threads": 3, "cpu_ms_per_s": 100.0,
                         "run_delay_ms_per_s": 900.0},
              "baseline": {"window_s": 1.0, "threads": 3, "cpu_ms_per_s": 400.0,
                           "run_delay_ms_per_s": 200.0},
              "injector": {"mode": "rt", "children": 1, "fault_cpu_ms_per_s": 790.0}}
    with LabelWriter(path, tl) as w:
        tl.started(spec, 100)
        w.fault(spec, 100, 200, effect)
    (fault,) = read_labels(path).faults
    assert fault.effect == effect and fault.bit is True
    path.write_text('{"kind":"fault","type":"cpu_squeeze","rank":0,"start_ns":1,'
                    '"end_ns":2,"intensity":1.0}\n')
    (old,) = read_labels(path).faults
    assert old.effect is None and old.bit is None
    path.write_text('{"kind":"fault","type":"cpu_squeeze","rank":0,"start_ns":1,'
                    '"end_ns":2,"intensity":1.0,"effect":[1]}\n')
    with pytest.raises(SimError, match="'effect' must be an object"):
        read_labels(path)


def test_fault_bit_says_when_a_fault_did_not_bite() -> None:
    def rates(cpu: float, delay: float) -> dict[str, float]:
        return {"window_s": 1.0, "threads": 2, "cpu_ms_per_s": cpu,
                "run_delay_ms_per_s": delay}

    same = {"target": rates(400, 200), "baseline": rates(410, 190),
            "injector": {"mode": "fair", "fault_cpu_ms_per_s": 300.0}}
    assert fault_bit(same) is False  # the 0.966x cpu_squeeze of issue 22
    assert fault_bit({**same, "target": rates(300, 200)}) is True  # 27 % less CPU
    assert fault_bit({**same, "target": rates(400, 320)}) is True  # delay 1.5x + 20 ms/s
    assert fault_bit({**same, "injector": {"mode": "signal", "stopped_ms_per_s": 450.0}})
    assert fault_bit({"target": rates(400, 50)}) is False  # no baseline: absolute 100 ms/s
    assert fault_bit({"target": rates(400, 150)}) is True
    assert fault_bit({"injector": {"mode": "control", "speed": 0.5}}) is True
    assert fault_bit(None) is None and fault_bit({"target": {"x": 1}}) is None
