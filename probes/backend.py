"""Which probe backend opens a session: the perf rings, or the eBPF program.

The seam between the monitor and the two session classes: both give the same
:class:`~probes.uprobes.Span` objects through the same methods (``read``, ``deliver``,
``batches``, ``detach_site``, ``kernel_hits``...), so the monitor holds a
:data:`ProbeSession` and never asks which one it has.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from probes.bpf.loader import BpfUnavailableError
from probes.bpf.session import BpfSession
from probes.placement import ProbeSite
from probes.target import Target
from probes.uprobes import UprobeSession

ProbeSession = UprobeSession | BpfSession
BACKENDS = ("auto", "perf", "bpf")


def open_session(targets: Sequence[Target], sites: Sequence[ProbeSite], *,
                 backend: str = "auto", mode: str = "auto", ring_pages: int = 64,
                 urgent: Collection[str] = (), drain_interval_s: float = 0.02,
                 wake_gap_s: float = 0.0) -> tuple[ProbeSession, str | None]:
    """Open a session with ``backend``; returns it and, when ``auto`` fell back to perf,
    one line saying why (for the user: the monitor's costs differ a lot).

    ``bpf`` raises :class:`~probes.bpf.loader.BpfUnavailableError` instead of falling
    back; ``mode`` is the perf backend's ring layout (the bpf one has a single ring);
    ``wake_gap_s`` spaces the bpf backend's wake-ups by urgent spans (perf: each wakes).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown probe backend {backend!r} (one of {', '.join(BACKENDS)})")
    why = None
    if backend != "perf":
        try:
            return BpfSession(targets, sites, ring_pages=ring_pages, urgent=urgent,
                              drain_interval_s=drain_interval_s,
                              wake_gap_s=wake_gap_s).open(), None
        except BpfUnavailableError as exc:
            if backend == "bpf":
                raise
            why = f"probe backend: perf, as eBPF is unavailable: {exc}"
    session = UprobeSession(targets, sites, mode=mode, ring_pages=ring_pages, urgent=urgent,
                            drain_interval_s=drain_interval_s).open()
    return session, why
