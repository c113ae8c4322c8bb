"""Prometheus/OpenMetrics exposition of a live monitor: ``prism watch --metrics-port``.

A custom ``prometheus_client`` collector reads the latest :class:`DashboardView` the session
published (the object the dashboard draws, so a scrape shows the dashboard's numbers)
and turns it into metric families at scrape time; it never writes into the engine.
``prometheus_client`` negotiates OpenMetrics from the scraper's ``Accept`` header and
defines the formats, which :mod:`prism_tui.exposition` writes with each label set
escaped once. Latencies are in seconds (the engine's milliseconds / 1000),
counters end in ``_total``; docs/metrics.md lists every metric and label.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.samples import Sample

from prism_tui.dashboard_view import DashboardView
from prism_tui.engine.sketches import QUANTILES, SeriesKey, SeriesStats
from prism_tui.engine.view import TargetStatus
from prism_tui.exposition import start_server
from prism_tui.fleet_view import FleetView

PREFIX = "latencyprism"
QUANTILE_WINDOW_S = 10.0
"""The snapshot the summaries' quantiles come from: the dashboard's default window."""
DEFAULT_ADDR = "127.0.0.1"
SERIES_LABELS = ("target", "pid", "stage", "phase", "device")
FLEET_LABELS = ("profile", "stage", "phase", "device_kind")
TARGET_LABELS = ("target", "pid")


class EngineCollector:
    """Metric families from the latest published :class:`DashboardView` (see module doc).

    Args:
        latest_view: returns the view most recently published (None before the first).
        window_s: which of the view's snapshots the quantiles come from.
    """

    def __init__(self, latest_view: Callable[[], DashboardView | None],
                 window_s: float = QUANTILE_WINDOW_S) -> None:
        self._latest_view = latest_view
        self.window_s = window_s
        self._lost_high: dict[int, int] = {}
        """Per pid, the most lost events seen: the monitor's count may dip while records
        are in flight, and a counter must not go down."""

    def describe(self) -> list[Metric]:
        """No families up front: the registry then calls :meth:`collect` only on scrapes."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Every family, built from one view so that a scrape is consistent."""
        view = self._latest_view()
        if view is None:
            return
        yield from self._series_families(view)
        yield from self._target_families(view)
        yield from self._alert_families(view)

    # -- stage latency ----------------------------------------------------------------

    def _series_families(self, view: DashboardView) -> Iterator[Metric]:
        """The latency summary (window quantiles, cumulative sum/count), the window's
        max and each stage's share of the iteration."""
        name = f"{PREFIX}_stage_latency_seconds"
        latency = SummaryMetricFamily(
            name, "Stage latency per iteration: quantiles over the last "
            f"{self.window_s:g} s of closed windows (t-digest), sum and count since start",
            labels=SERIES_LABELS)
        peak = GaugeMetricFamily(
            f"{PREFIX}_stage_latency_max_seconds",
            f"Largest stage latency in the last {self.window_s:g} s", labels=SERIES_LABELS)
        share = GaugeMetricFamily(
            f"{PREFIX}_stage_share_ratio",
            f"Stage time / iteration time over the last {self.window_s:g} s",
            labels=SERIES_LABELS)
        snap = view.snapshot(self.window_s)
        stats = snap.series if snap is not None else {}
        owners = _owners(view.targets)
        for key in sorted(set(view.series_totals) | set(stats)):
            base = _series_labels(key, owners)
            total = view.series_totals.get(key)
            row = stats.get(key)
            if row is not None:
                for q, value in zip(QUANTILES, _quantiles(row), strict=True):
                    latency.samples.append(Sample(
                        name, {**base, "quantile": _quantile_label(q)}, value / 1000))
                peak.add_metric(list(base.values()), row.max / 1000)
                if row.share is not None:
                    share.add_metric(list(base.values()), row.share)
            count, sum_ms = (total.count, total.sum_ms) if total is not None else (0, 0.0)
            latency.add_metric(list(base.values()), count, sum_ms / 1000)
        yield latency
        yield peak
        yield share

    # -- targets and probes -----------------------------------------------------------

    def _target_families(self, view: DashboardView) -> Iterator[Metric]:
        up = GaugeMetricFamily(f"{PREFIX}_target_attached",
                               "1 while the target is attached, 0 once it exited",
                               labels=(*TARGET_LABELS, "profile", "device"))
        iterations = CounterMetricFamily(f"{PREFIX}_iterations",
                                         "Iterations completed since the watch began",
                                         labels=(*TARGET_LABELS, "device", "phase"))
        hits = CounterMetricFamily(f"{PREFIX}_probe_hits",
                                   "Kernel uprobe hits since the probe was attached",
                                   labels=(*TARGET_LABELS, "probe", "stage"))
        lost = CounterMetricFamily(f"{PREFIX}_lost_events",
                                   "Probe records the kernel produced that the monitor "
                                   "never read", labels=TARGET_LABELS)
        overhead = GaugeMetricFamily(f"{PREFIX}_probe_overhead_ratio",
                                     "Estimated share of the target's CPU time the probes "
                                     "cost", labels=TARGET_LABELS)
        governor = CounterMetricFamily(f"{PREFIX}_governor_decisions",
                                       "Overhead-governor decisions since start",
                                       labels=(*TARGET_LABELS, "action"))
        names = {t.pid: t.name for t in view.targets}
        for t in view.targets:
            who = [t.name, str(t.pid)]
            up.add_metric([*who, t.profile, t.device], 1.0 if t.state == "attached" else 0.0)
            for phase, n in t.iterations:
                iterations.add_metric([*who, t.device, phase], n)
            for p in t.probes:
                if p.status == "attached":
                    hits.add_metric([*who, p.probe, p.stage], p.hits)
            high = self._lost_high[t.pid] = max(self._lost_high.get(t.pid, 0), t.lost)
            lost.add_metric(who, high)
            if t.overhead_pct is not None:
                overhead.add_metric(who, t.overhead_pct / 100)
        for g in view.governor_counts:
            governor.add_metric([names.get(g.pid, ""), str(g.pid), g.action], g.count)
        yield from (up, iterations, hits, lost, overhead, governor)

    # -- alerts and detectors ---------------------------------------------------------

    def _alert_families(self, view: DashboardView) -> Iterator[Metric]:
        names = {t.pid: t.name for t in view.targets}
        alerts = CounterMetricFamily(f"{PREFIX}_alerts",
                                     "Alert state changes emitted since start",
                                     labels=(*TARGET_LABELS, "status", "severity", "source"))
        for a in view.alert_counts:
            alerts.add_metric([names.get(a.pid, ""), str(a.pid), a.status, a.severity,
                               a.source], a.count)
        firing = GaugeMetricFamily(f"{PREFIX}_detector_firing",
                                   "1 while the workload-aware detector fires",
                                   labels=(*TARGET_LABELS, "device", "phase", "state"))
        for d in view.detectors:
            firing.add_metric([names.get(d.pid, ""), str(d.pid), d.device, d.phase, d.state],
                              1.0 if d.firing else 0.0)
        pending = GaugeMetricFamily(f"{PREFIX}_alerts_pending",
                                    "Alerts in the outbox not yet acknowledged by the broker")
        pending.add_metric([], view.delivery.pending)
        yield from (alerts, firing, pending)


class FleetCollector:
    """``prism fleet --metrics-port``: the fleet's merged quantiles and host states from
    the latest :class:`FleetView` (the one the fleet screen draws).

    Args:
        latest_view: returns the view most recently published (None before the first).
    """

    def __init__(self, latest_view: Callable[[], FleetView | None]) -> None:
        self._latest_view = latest_view

    def describe(self) -> list[Metric]:
        """No families up front: the registry then calls :meth:`collect` only on scrapes."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Every family, built from one view."""
        view = self._latest_view()
        if view is None:
            return
        name = f"{PREFIX}_fleet_stage_latency_seconds"
        latency = SummaryMetricFamily(
            name, f"Stage latency merged over every host's digests of the last "
            f"{view.window_s:g} s (t-digest quantiles; count of values in that window)",
            labels=FLEET_LABELS)
        hosts = GaugeMetricFamily(f"{PREFIX}_fleet_series_hosts",
                                  "Hosts whose digests the series merges",
                                  labels=FLEET_LABELS)
        for r in view.fleet:
            base = {"profile": r.profile, "stage": r.stage, "phase": r.phase,
                    "device_kind": r.device_kind}
            for q, value in zip(QUANTILES, (r.p50, r.p90, r.p99, r.p999), strict=True):
                latency.samples.append(Sample(name, {**base, "quantile": _quantile_label(q)},
                                              value / 1000))
            latency.samples.append(Sample(f"{name}_count", base, float(r.count)))
            hosts.add_metric(list(base.values()), r.hosts)
        up = GaugeMetricFamily(f"{PREFIX}_fleet_host_online",
                               "1 while the host's status is online", labels=("host",))
        seen = GaugeMetricFamily(f"{PREFIX}_fleet_host_last_seen_age_seconds",
                                 "Seconds since the host was last heard from",
                                 labels=("host",))
        firing = GaugeMetricFamily(f"{PREFIX}_fleet_host_alerts_firing",
                                   "Alerts firing on the host", labels=("host",))
        for h in view.hosts:
            up.add_metric([h.host], 1.0 if h.state == "online" else 0.0)
            if h.last_seen_s_ago is not None:
                seen.add_metric([h.host], h.last_seen_s_ago)
            firing.add_metric([h.host], h.firing)
        messages = CounterMetricFamily(f"{PREFIX}_fleet_messages",
                                       "MQTT messages the fleet took since start")
        messages.add_metric([], view.messages)
        rejected = CounterMetricFamily(f"{PREFIX}_fleet_messages_rejected",
                                       "Messages that did not decode")
        rejected.add_metric([], view.rejected)
        yield from (latency, hosts, up, seen, firing, messages, rejected)


def _quantiles(row: SeriesStats) -> tuple[float, float, float, float]:
    """The row's p50, p90, p99, p99.9 (ms), in :data:`QUANTILES` order."""
    return row.p50, row.p90, row.p99, row.p999


def _quantile_label(q: float) -> str:
    return f"{q:g}"


def _owners(targets: Sequence[TargetStatus]) -> dict[str, tuple[str, str]]:
    """Per device, the ``(target, pid)`` labels of the targets on it. The sketches are
    per (stage, device, phase); targets sharing a device share its series, and their
    names and pids are joined with ``,``."""
    by_device: dict[str, list[TargetStatus]] = {}
    for t in targets:
        by_device.setdefault(t.device, []).append(t)
    return {device: (",".join(t.name for t in ts), ",".join(str(t.pid) for t in ts))
            for device, ts in by_device.items()}


def _series_labels(key: SeriesKey, owners: dict[str, tuple[str, str]]) -> dict[str, str]:
    target, pid = owners.get(key.device, ("", ""))
    return {"target": target, "pid": pid, "stage": key.stage, "phase": key.phase,
            "device": key.device}


@dataclass
class MetricsServer:
    """A running ``/metrics`` HTTP endpoint (``close()`` stops it)."""

    server: Any
    thread: Any
    registry: CollectorRegistry

    @property
    def port(self) -> int:
        """The bound port (useful when 0 asked for any free one)."""
        return int(self.server.server_port)

    @property
    def url(self) -> str:
        """``http://addr:port/metrics``."""
        host = self.server.server_address[0]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the socket."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def serve_metrics(latest_view: Callable[[], DashboardView | None], port: int,
                  addr: str = DEFAULT_ADDR) -> MetricsServer:
    """Serve :class:`EngineCollector` on ``addr:port`` in a daemon thread.

    Raises OSError when the address cannot be bound (in use, not local...).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(latest_view))
    server, thread = start_server(registry, port, addr)
    return MetricsServer(server, thread, registry)


def serve_fleet_metrics(latest_view: Callable[[], FleetView | None], port: int,
                        addr: str = DEFAULT_ADDR) -> MetricsServer:
    """Serve :class:`FleetCollector` on ``addr:port`` in a daemon thread (OSError when
    the address cannot be bound)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(latest_view))
    server, thread = start_server(registry, port, addr)
    return MetricsServer(server, thread, registry)
