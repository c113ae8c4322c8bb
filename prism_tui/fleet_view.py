"""The fleet screen's immutable view: ``FleetState`` snapshots turned into plain dataclasses.

The fleet dashboard (:mod:`prism_tui.ui.fleet`) and the fleet's Prometheus collector read
these only: the UI layer never imports the MQTT side (``alerting``), so ``prism fleet``
converts each snapshot dict here before handing it over.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class FleetHost:
    """One monitor: online/offline from its retained status or last will, last heard of."""

    host: str
    state: str
    reason: str
    last_seen_s_ago: float | None
    targets: tuple[str, ...]
    firing: int


@dataclass(frozen=True, slots=True)
class FleetQuantiles:
    """Fleet-wide quantiles (ms) of one (profile, stage, phase, device kind)."""

    profile: str
    stage: str
    phase: str
    device_kind: str
    hosts: int
    count: int
    p50: float
    p90: float
    p99: float
    p999: float


@dataclass(frozen=True, slots=True)
class FleetOutlier:
    """A host's p99 of one group against the fleet's p99 of it."""

    host: str
    profile: str
    stage: str
    phase: str
    device_kind: str
    p99: float
    fleet_p99: float
    ratio: float


@dataclass(frozen=True, slots=True)
class FleetAlert:
    """One alert state change of any host, as received."""

    host: str
    target: str
    status: str
    severity: str
    stage: str
    phase: str
    device: str
    fingerprint: str
    summary: str
    detected_at: str
    received_at: float


@dataclass(frozen=True, slots=True)
class HostSeries:
    """One host's drill-down row: a (target, stage, phase, device) over the window."""

    target: str
    stage: str
    phase: str
    device: str
    count: int
    p50: float
    p90: float
    p99: float
    p999: float


@dataclass(frozen=True, slots=True)
class FleetView:
    """Everything the fleet screen draws at one instant."""

    at: float
    window_s: float
    broker: str
    hosts: tuple[FleetHost, ...]
    fleet: tuple[FleetQuantiles, ...]
    outliers: tuple[FleetOutlier, ...]
    alerts: tuple[FleetAlert, ...]
    rejected: int
    last_error: str
    messages: int
    lag_p99_s: float | None
    """99th percentile of the seconds from a window's close to its ingest."""

    @property
    def online(self) -> int:
        """Hosts whose status is online."""
        return sum(1 for h in self.hosts if h.state == "online")


def fleet_view(snapshot: Mapping[str, Any], broker: str = "") -> FleetView:
    """The view of one ``FleetState.snapshot()`` dict."""
    lag = snapshot.get("lag_s") or {}
    return FleetView(
        at=float(snapshot["at"]), window_s=float(snapshot["window_s"]), broker=broker,
        hosts=tuple(FleetHost(h["host"], h["state"], h.get("reason", ""),
                              h.get("last_seen_s_ago"), tuple(h.get("targets", ())),
                              int(h.get("firing", 0))) for h in snapshot["hosts"]),
        fleet=tuple(FleetQuantiles(r["profile"], r["stage"], r["phase"], r["device_kind"],
                                   int(r["hosts"]), int(r["count"]), float(r["p50"]),
                                   float(r["p90"]), float(r["p99"]), float(r["p999"]))
                    for r in snapshot["fleet"]),
        outliers=tuple(FleetOutlier(o["host"], o["profile"], o["stage"], o["phase"],
                                    o["device_kind"], float(o["p99"]),
                                    float(o["fleet_p99"]), float(o["ratio"]))
                       for o in snapshot["outliers"]),
        alerts=tuple(FleetAlert(a["host"], a["target"], a["status"], a["severity"],
                                a["stage"], a["phase"], a["device"], a["fingerprint"],
                                a["summary"], a["detected_at"], float(a["received_at"]))
                     for a in snapshot["alerts"]),
        rejected=int(snapshot.get("rejected", 0)), last_error=str(snapshot.get("last_error", "")),
        messages=int(snapshot.get("messages", 0)), lag_p99_s=lag.get("p99"))


def host_series(rows: Sequence[Mapping[str, Any]]) -> tuple[HostSeries, ...]:
    """The drill-down rows of ``FleetState.host_series()``."""
    return tuple(HostSeries(r["target"], r["stage"], r["phase"], r["device"], int(r["count"]),
                            float(r["p50"]), float(r["p90"]), float(r["p99"]),
                            float(r["p999"])) for r in rows)
