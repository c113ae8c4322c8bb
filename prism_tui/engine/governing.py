"""Governing: the overhead governor of every watched target, one window a second.

The monitor's loop calls :meth:`Governing.tick` every ``GOVERN_S``; each target's
:class:`~probes.governor.OverheadGovernor` (made by :meth:`Governing.equip` once the
target's anchor is known) estimates its probes' cost from the kernel's hit counts and the
hit costs of the session's backend (``HitCosts.for_backend``: a bpf session's hits and
wake-ups are not perf's), and detaches or duty-cycles the costliest ones but the anchor
and the detector's inputs. Decisions go to :attr:`Governing.decisions`, the engine's counters
(metrics), the target's recent list (the view) and a notice. The view's probe cost
(:meth:`Governing.overhead_pct`) is computed from the same hit costs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prism_tui.engine.attachment import Attached, detector_probes
from prism_tui.engine.config import ProbingConfig
from prism_tui.engine.view import GovernorAction, GovernorStatus
from probes.catalog import Profile
from probes.errors import ProbeError
from probes.governor import (
    DEFAULT_COSTS,
    GovernorDecision,
    HitCosts,
    OverheadGovernor,
    wakeups,
)

GOVERN_S = 1.0
"""How often each target's overhead governor closes a window and decides."""


class Governing:
    """The governors of one monitor's targets (none when ``probing.overhead_budget`` is None)."""

    def __init__(self, probing: ProbingConfig, *,
                 count: Callable[[int, str], None],
                 notice: Callable[[str], None]) -> None:
        """``count(pid, status)`` is told of every decision (the engine's metrics counter),
        ``notice`` gets one line per decision. A bad budget or action fails here, not at
        the first window."""
        self.budget = probing.overhead_budget
        self.action = probing.governor_action
        self.costs: HitCosts | None = probing.costs
        self._count = count
        self._notice = notice
        self.decisions: list[tuple[int, GovernorDecision, float]] = []
        """(pid, decision, epoch seconds) of every governor decision, in order."""
        if self.budget is not None:
            OverheadGovernor([], self.costs or DEFAULT_COSTS, lambda i: None, lambda i: None,
                             budget=self.budget, action=self.action)

    def equip(self, att: Attached, anchor: str, profile: Profile) -> None:
        """Give ``att`` its governor (once; never over ``anchor`` or the detector's inputs)."""
        if self.budget is None or att.governor is not None:
            return
        session = att.session
        costs = (self.costs or DEFAULT_COSTS).for_backend(session.backend)
        att.governor = OverheadGovernor(
            session.sites, costs, session.detach_site,
            session.reattach_site, budget=self.budget, action=self.action, anchor=anchor,
            urgent=att.urgent, wake_gap_s=session.wake_gap_s,
            protected=detector_probes(profile, session.sites))

    def costs_for(self, att: Attached) -> HitCosts | None:
        """The hit costs of ``att``'s session backend (None: no costs were given)."""
        return None if self.costs is None else self.costs.for_backend(att.session.backend)

    def tick(self, attached: Iterable[tuple[int, Attached]]) -> None:
        """Close a window of every target's governor; record and announce its decisions.

        Detaching hands the events to the session's closer thread; restoring (and a
        duty cycle's on-period) opens them again on this thread.
        """
        for pid, att in list(attached):
            gov = att.governor
            if gov is None or att.session.closed:
                continue
            try:
                made = gov.update(dict(att.session.kernel_hits()))
            except (ProbeError, OSError) as exc:  # a reattach the kernel refused
                self._notice(f"governor on pid {pid}: {exc}")
                continue
            for d in made:
                wall = time.time()
                self.decisions.append((pid, d, wall))
                self._count(pid, d.status)
                att.recent.append(GovernorAction(d.probe, d.status, 100 * d.overhead,
                                                 d.hits_per_s, d.cost_ns / 1000, d.reason,
                                                 wall))
                self._notice(f"governor: {d.probe} {d.status} on pid {pid}: {d.reason}")

    @staticmethod
    def status(att: Attached) -> GovernorStatus | None:
        """The view's governor line of ``att`` (None: not governed)."""
        gov = att.governor
        return None if gov is None else GovernorStatus(100 * gov.budget, gov.action,
                                                       tuple(att.recent))

    @staticmethod
    def governed_reasons(att: Attached) -> dict[str, tuple[str, str]]:
        """Probe → (status, reason) of the probes the governor holds now."""
        gov = att.governor
        if gov is None:
            return {}
        last = {a.probe: a.reason for a in att.recent}
        return {p: ("detached" if how == "detach" else "duty-cycled", last.get(p, ""))
                for p, how in gov.governed().items()}

    def overhead_pct(self, att: Attached, delta: dict[str, int], dt: float) -> float | None:
        """CPU share the probes cost the target over the last view: Σ hits/s × cost per
        hit, the reader's wake-ups for urgent probes included (at most one per the
        session's wake gap), at the session's backend's costs."""
        costs = self.costs_for(att)
        if costs is None:
            return None
        ns = 0.0
        gap = att.session.wake_gap_s
        seen: set[str] = set()
        for placement in att.placements:
            for site in placement.sites:
                if site.probe in seen:  # kernel counts are per probe, all sites together
                    continue
                seen.add(site.probe)
                n = delta.get(site.probe, 0)
                calls = n / 2 if site.ret else n
                ns += calls * costs.site_cost_ns(site.site, site.ret)
                if site.probe in att.urgent:
                    ns += costs.wakeup_ns * wakeups(calls, dt, gap)
        return 100.0 * ns / (dt * 1e9)
