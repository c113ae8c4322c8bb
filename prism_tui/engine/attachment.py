"""Attachment: a target's sentinel probes placed and opened, and what is kept of it.

The blocking half of an attach (:func:`open_sentinels`: ELF lookups, perf events, the
device label) runs in any thread; the :class:`~prism_tui.engine.monitor.Monitor`
registers the result on its loop as an :class:`Attached`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from prism_tui.engine.config import ProbingConfig
from prism_tui.engine.core import DETECTOR_FEATURES
from prism_tui.engine.iterations import MEMCPY_KINDS
from prism_tui.engine.view import GovernorAction, ProbeStatus
from probes.backend import ProbeSession, open_session
from probes.catalog import Profile, feature_names
from probes.governor import OverheadGovernor
from probes.placement import Placement, ProbeSite, place_profile
from probes.target import Target

RECENT_DECISIONS = 8
"""Governor decisions per target kept for the view."""


@dataclass
class Attached:
    """One watched process: its sentinel session, placements, device and governor."""

    target: Target
    session: ProbeSession
    placements: list[Placement]
    device: str = "cpu"
    """Its device label, found once at the attach (see :attr:`Monitor.device_of`)."""
    urgent: frozenset[str] = frozenset()
    """Probes whose every record wakes the reader (the named anchor)."""
    prev_hits: dict[str, int] = field(default_factory=dict)
    prev_t: float = field(default_factory=time.monotonic)
    governor: OverheadGovernor | None = None
    recent: deque[GovernorAction] = field(default_factory=lambda: deque(maxlen=RECENT_DECISIONS))


def open_sentinels(target: Target, profiles: Sequence[Profile], anchors: Sequence[str],
                   probing: ProbingConfig, device_of: Callable[[int], str],
                   on_fallback: Callable[[str], None] | None = None,
                   ) -> tuple[ProbeSession, list[Placement], str]:
    """Place the sentinel probes of ``profiles`` (the main one first) in ``target``, open
    them (``anchors`` urgent) and find its device label; blocking, any thread. Raises
    ValueError when none of ``anchors`` resolves, or nothing does without one.
    ``on_fallback`` is told why when ``probing.backend`` is ``auto`` and eBPF is not usable."""
    main = profiles[0]
    placements = []
    sites: list[ProbeSite] = []
    for profile in profiles:
        placement = place_profile(target, profile, "sentinel")
        placements.append(placement)
        sites += placement.sites
    if anchors and not any(s.probe in anchors for s in sites):
        named = " or ".join(repr(a) for a in anchors)
        raise ValueError(f"the anchor {named} of profile "
                         f"{main.name!r} does not resolve in pid {target.pid}")
    if not anchors and not sites:
        raise ValueError(f"no sentinel probe of profile {main.name!r} resolves "
                         f"in pid {target.pid}: nothing to choose an anchor from")
    urgent = set(anchors)
    session, fell_back = open_session([target], sites, backend=probing.backend,
                                      mode=probing.mode, urgent=urgent,
                                      ring_pages=probing.ring_pages,
                                      drain_interval_s=probing.drain_interval_s,
                                      wake_gap_s=probing.wake_gap_s)
    if fell_back is not None and on_fallback is not None:
        on_fallback(fell_back)
    try:
        device = device_of(target.pid)
    except BaseException:
        session.close()
        raise
    return session, placements, device


def detector_probes(profile: Profile, sites: Sequence[ProbeSite]) -> frozenset[str]:
    """Probes the detector's inputs come from: never governed.

    Detaching one mid-run would change the workload the baseline was fitted on (or the
    phase) and read as an anomaly. The inputs are :data:`DETECTOR_FEATURES` and the
    profile's phase rule, through its derived features; a feature comes from probe ``p``
    when it is ``calls.p``, ``p.arg``, an argument ``p`` captures (per-call derived
    expressions read those), or a copy's bytes by kind from a probe capturing ``kind``
    and ``bytes``.
    """
    needed = set(DETECTOR_FEATURES)
    if profile.phase_rule:
        needed |= feature_names(profile.phase_rule)
    grown = True
    while grown:  # derived features read other features, derived ones included
        more = {n for d in profile.derived if d.name in needed for n in d.names}
        grown = not more <= needed
        needed |= more
    out = set()
    for site in sites:
        args = {c.name for c in site.captures}
        names = {f"calls.{site.probe}"} | {f"{site.probe}.{a}" for a in args} | args
        if {"kind", "bytes"} <= args:
            names |= set(MEMCPY_KINDS.values()) | {"h2d_first_bytes"}
        if names & needed:
            out.add(site.probe)
    return frozenset(out)


def probe_statuses(placements: Sequence[Placement], hits: dict[str, int],
                    dt: float = 1.0, total: dict[str, int] | None = None,
                    governed: dict[str, tuple[str, str]] | None = None,
                    ) -> tuple[ProbeStatus, ...]:
    """One status per probe decision: attached with its hit rate (``hits`` in ``dt``)
    and its hits since attached (``total``), governed, or why not."""
    out = []
    governed = governed or {}
    for placement in placements:
        for d in placement.decisions:
            if d.status == "resolved" and d.probe in governed:
                status, reason = governed[d.probe]
                out.append(ProbeStatus(d.probe, d.stage, status,
                                       d.sites[0].library if d.sites else "", reason,
                                       hits_per_s=hits.get(d.probe, 0) / dt if dt else 0.0,
                                       hits=(total or {}).get(d.probe, 0)))
            elif d.status == "resolved":
                out.append(ProbeStatus(d.probe, d.stage, "attached",
                                       d.sites[0].library if d.sites else "",
                                       hits_per_s=hits.get(d.probe, 0) / dt if dt else 0.0,
                                       hits=(total or {}).get(d.probe, 0)))
            else:
                out.append(ProbeStatus(d.probe, d.stage, d.status, reason=d.reason))
    return tuple(out)
