"""The overhead governor: calibration on this kernel, decisions driven by a fake clock over
real probe sites of the C target, and one end-to-end run detaching a real uprobe."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from probes.catalog import parse_profile
from probes.governor import GovernorDecision, HitCosts, OverheadGovernor, calibrate
from probes.placement import ProbeSite, place_profile
from probes.target import Target
from probes.uprobes import Span, UprobeSession
from tests.conftest import CTARGET_PROFILE, CTarget

COSTS = HitCosts(1000.0, 20000.0, 1000.0)


class FakeClock:
    """Monotonic seconds read from a list; tests move it with :meth:`advance`."""

    def __init__(self) -> None:
        self.readings: list[float] = [0.0]

    def __call__(self) -> float:
        return self.readings[-1]

    def advance(self, seconds: float) -> None:
        self.readings.append(self.readings[-1] + seconds)


class Levers:
    """The governor's callbacks, recording every call in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def detach(self, index: int) -> None:
        self.calls.append(("detach", index))

    def reattach(self, index: int) -> None:
        self.calls.append(("reattach", index))


@pytest.fixture
def sites(ctarget: CTarget) -> list[ProbeSite]:
    placement = place_profile(Target(ctarget.pid), parse_profile(CTARGET_PROFILE), "deepdive")
    found = placement.sites
    assert [s.probe for s in found] == ["work", "args6", "struct", "outer", "inner",
                                        "recurse"]
    assert all(s.site == "emulated" for s in found)  # endbr64 skipped: push %rbp
    return found


def index_of(sites: list[ProbeSite], probe: str) -> int:
    return next(i for i, s in enumerate(sites) if s.probe == probe)


def governor(sites: list[ProbeSite], levers: Levers, clock: FakeClock,
             **options: object) -> OverheadGovernor:
    gov = OverheadGovernor(sites, COSTS, levers.detach, levers.reattach, clock=clock,
                           **options)  # type: ignore[arg-type]
    assert gov.update({}) == []  # the first call only opens the window
    return gov


# ------------------------------------------------------------------ calibration


def test_calibrate_measures_the_cost_classes() -> None:
    costs = calibrate(calls=2000, rounds=3)
    assert costs.measured, costs.note
    assert costs.note == ""
    assert 0 < costs.emulated_ns < costs.single_step_ns
    assert costs.return_ns > 0
    assert costs.site_cost_ns("emulated", ret=True) == costs.emulated_ns + costs.return_ns
    assert costs.site_cost_ns("single-step", ret=False) == costs.single_step_ns


# ------------------------------------------------------------------ decisions (fake clock)


def test_under_budget_makes_no_decision(sites: list[ProbeSite]) -> None:
    clock, levers = FakeClock(), Levers()
    gov = governor(sites, levers, clock)
    clock.advance(1.0)
    # 1000 calls/s x 1 us = 0.1 % < 0.5 %; args6: 500 calls x 2 us = 0.1 %
    assert gov.update({"work": 1000, "args6": 1000}) == []
    assert gov.last_overhead == pytest.approx(0.002)
    assert levers.calls == []


def test_hot_site_over_budget_is_detached(sites: list[ProbeSite]) -> None:
    clock, levers = FakeClock(), Levers()
    gov = governor(sites, levers, clock)
    clock.advance(1.0)
    made = gov.update({"work": 10_000, "args6": 100})
    work = index_of(sites, "work")
    assert levers.calls == [("detach", work)]
    [decision] = made
    assert (decision.probe, decision.action) == ("work", "detach")
    assert decision.hits_per_s == pytest.approx(10_000)
    assert decision.cost_ns == 1000
    assert decision.overhead == pytest.approx(0.01)
    assert "budget" in decision.reason and "0.50%" in decision.reason
    assert gov.decisions == made
    # still hot in the next window: it is detached already, nothing more happens
    clock.advance(1.0)
    assert gov.update({"work": 30_000, "args6": 100}) == []
    assert levers.calls == [("detach", work)]


def test_protected_probe_is_never_detached(sites: list[ProbeSite]) -> None:
    clock, levers = FakeClock(), Levers()
    gov = governor(sites, levers, clock, protected={"work"})
    clock.advance(1.0)
    # work 1.0 % (protected, hottest), args6 2000 calls x 2 us = 0.4 %
    made = gov.update({"work": 10_000, "args6": 4000})
    assert [d.probe for d in made] == ["args6"]
    assert levers.calls == [("detach", index_of(sites, "args6"))]
    clock.advance(1.0)
    gov.update({"work": 30_000, "args6": 4000})
    assert ("detach", index_of(sites, "work")) not in levers.calls


def test_detaching_the_hottest_may_suffice(sites: list[ProbeSite]) -> None:
    clock, levers = FakeClock(), Levers()
    gov = governor(sites, levers, clock)
    clock.advance(2.0)
    # work 0.8 %, recurse 0.1 %: total 0.9 %, 0.1 % once work is gone
    made = gov.update({"work": 16_000, "recurse": 2000})
    assert [d.probe for d in made] == ["work"]
    assert made[0].hits_per_s == pytest.approx(8000)
    assert levers.calls == [("detach", index_of(sites, "work"))]


def test_detaching_goes_on_while_over_budget(sites: list[ProbeSite]) -> None:
    clock, levers = FakeClock(), Levers()
    gov = governor(sites, levers, clock)
    clock.advance(1.0)
    # args6 1.0 % (5000 calls x 2 us) then work 0.8 %: both must go, hottest first
    made = gov.update({"work": 8000, "args6": 10_000, "recurse": 200})
    assert [d.probe for d in made] == ["args6", "work"]
    assert levers.calls == [("detach", index_of(sites, "args6")),
                            ("detach", index_of(sites, "work"))]


def test_duty_cycle(sites: list[ProbeSite]) -> None:
    clock, levers = FakeClock(), Levers()
    gov = governor(sites, levers, clock, action="duty-cycle", period_s=10.0)
    work = index_of(sites, "work")
    clock.advance(1.0)  # t=1: 1.0 % against 0.5 %: on half of the time
    [decision] = gov.update({"work": 10_000})
    assert decision.action == "duty-cycle"
    assert "on 50% of every 10 s" in decision.reason
    assert levers.calls == [("detach", work)]
    clock.advance(2.0)  # t=3: still inside the 5 s off period
    assert gov.update({"work": 10_000}) == []
    assert levers.calls == [("detach", work)]
    clock.advance(3.0)  # t=6: off period over
    assert gov.update({"work": 10_000}) == []
    assert levers.calls == [("detach", work), ("reattach", work)]
    clock.advance(5.0)  # t=11: the 5 s on period (10000 calls/s again) is over
    assert gov.update({"work": 60_000}) == []
    assert levers.calls == [("detach", work), ("reattach", work), ("detach", work)]
    clock.advance(5.0)  # t=16
    assert gov.update({"work": 60_000}) == []
    assert levers.calls[-1] == ("reattach", work)
    assert len(levers.calls) == 4
    assert [d.action for d in gov.decisions] == ["duty-cycle"]


def test_duty_cycle_on_period_survives_an_update_inside_it(sites: list[ProbeSite]) -> None:
    clock, levers = FakeClock(), Levers()
    gov = governor(sites, levers, clock, action="duty-cycle", period_s=10.0)
    work = index_of(sites, "work")
    clock.advance(1.0)  # t=1: duty 50 %, off until t=6
    gov.update({"work": 10_000})
    clock.advance(5.0)  # t=6: reattached, on until t=11
    gov.update({"work": 10_000})
    assert levers.calls == [("detach", work), ("reattach", work)]
    clock.advance(2.0)  # t=8: the monitor's periodic update, mid on-period
    gov.update({"work": 30_000})
    assert levers.calls == [("detach", work), ("reattach", work)]
    assert [d.action for d in gov.decisions] == ["duty-cycle"]


def test_duty_cycle_falls_back_to_detach_when_the_rest_is_over_budget(
        sites: list[ProbeSite]) -> None:
    clock, levers = FakeClock(), Levers()
    gov = governor(sites, levers, clock, action="duty-cycle", protected={"work"})
    clock.advance(1.0)
    made = gov.update({"work": 10_000, "args6": 4000})
    assert [(d.probe, d.action) for d in made] == [("args6", "detach")]
    assert levers.calls == [("detach", index_of(sites, "args6"))]


def test_duty_cycle_detach_decision_stays_detached(sites: list[ProbeSite]) -> None:
    clock, levers = FakeClock(), Levers()
    gov = governor(sites, levers, clock, action="duty-cycle", protected={"work"})
    args6 = index_of(sites, "args6")
    clock.advance(1.0)
    made = gov.update({"work": 10_000, "args6": 4000})
    assert [(d.probe, d.action) for d in made] == [("args6", "detach")]
    for step in range(2, 30):
        clock.advance(1.0)
        gov.update({"work": 10_000 * step, "args6": 4000})
    assert levers.calls == [("detach", args6)]


def test_report_keeps_untouched_probes(sites: list[ProbeSite]) -> None:
    clock, levers = FakeClock(), Levers()
    gov = governor(sites, levers, clock)
    clock.advance(1.0)
    gov.update({"work": 10_000})
    report = gov.report()
    assert [(d.probe, d.action) for d in report if d.action != "keep"] == [("work", "detach")]
    keep = {d.probe: d for d in report if d.action == "keep"}
    assert set(keep) == {"args6", "struct", "outer", "inner", "recurse"}
    assert all(d.reason == "within budget" and d.overhead == 0.0 for d in keep.values())
    assert keep["args6"].cost_ns == 2000  # entry + return
    assert keep["struct"].cost_ns == 1000
    assert all(isinstance(d, GovernorDecision) for d in report)


# ------------------------------------------------------------------ end to end


def run_polling(session: UprobeSession, target: CTarget, command: str) -> list[Span]:
    """Run a command in another thread while this one drains the rings."""
    spans: list[Span] = []
    worker = threading.Thread(target=target.cmd, args=(command,))
    worker.start()
    while worker.is_alive():
        spans += session.poll(0.01)
    worker.join()
    time.sleep(0.05)
    return spans + session.read()


@pytest.fixture
def session(ctarget: CTarget, sites: list[ProbeSite]) -> Iterator[UprobeSession]:
    with UprobeSession([Target(ctarget.pid)], sites) as s:
        yield s


def test_governor_detaches_a_real_uprobe(ctarget: CTarget, sites: list[ProbeSite],
                                         session: UprobeSession) -> None:
    clock = FakeClock()
    gov = OverheadGovernor(sites, COSTS, session.detach_site, session.reattach_site,
                           budget=0.001, protected={"inner"}, clock=clock)
    assert session.read() == []
    assert gov.update(session.stats.hits) == []
    spans = run_polling(session, ctarget, "work 200000")
    spans += run_polling(session, ctarget, "nested 2000")
    counts: dict[str, int] = {}
    for span in spans:
        counts[span.probe] = counts.get(span.probe, 0) + 1
    assert counts.get("work", 0) > 1000  # hot enough even if the ring dropped some
    assert counts.get("inner", 0) > 100
    clock.advance(1.0)
    made = gov.update(session.stats.hits)
    # work is far over 0.1 %; inner is over too but protected; outer (one call) goes
    # because the protected inner alone keeps the total over budget
    assert [d.probe for d in made] == ["work", "outer"]
    assert session.detached_sites == {index_of(sites, "work"), index_of(sites, "outer")}
    assert run_polling(session, ctarget, "work 1000") == []
    after = run_polling(session, ctarget, "nested 5")
    assert [s.probe for s in after] == ["inner"] * 5
    assert [s.probe for s in run_polling(session, ctarget, "args6 1 2 3 4 5 6")] == ["args6"]
