"""The dashboard's view: the engine's facts plus what only the live session knows.

The engine publishes :class:`~prism_tui.engine.view.EngineView` (engine facts only: its
targets, series, verdicts, alerts, telemetry and its own notices). The live session
(``LiveSession.compose``, ``prism_tui/live.py``) makes a :class:`DashboardView` of each:
the alert path's state, each alert's delivery, the history file and the status-bar
notices of every part (engine, monitor, alert path, history). The UI, the metrics
endpoint and the headless printer read this type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

from prism_tui.engine.view import EngineView


@dataclass(frozen=True)
class DeliveryStatus:
    """The alert path: broker connection and the durable outbox."""

    broker: str = ""
    """Broker URL, or empty when alerts are not published."""
    state: str = "off"
    """``off`` | ``connecting`` | ``connected`` | ``down``."""
    pending: int = 0
    """Alerts in the outbox not yet acknowledged by the broker."""
    published: int = 0
    last_error: str = ""


@dataclass(frozen=True)
class DashboardView(EngineView):
    """An engine view as the dashboard draws it. Immutable."""

    delivery: DeliveryStatus = field(default_factory=DeliveryStatus)
    """The alert path's state."""
    history_path: str = ""
    """The history file ("" without one)."""
    notices: tuple[str, ...] = ()
    """The latest status-bar lines of every part: the engine's, the monitor's (attach,
    rescan, anchor, governor, DeepDive), the alert path's and the history's."""

    @classmethod
    def of(cls, view: EngineView, *, delivery: DeliveryStatus | None = None,
           history_path: str = "", notices: tuple[str, ...] | None = None,
           alert_delivery: Mapping[str, str] | None = None) -> DashboardView:
        """``view`` with the session's facts; ``notices`` None keeps the engine's;
        ``alert_delivery``: alert id → its delivery state (``sent``, ``queued``...)."""
        base = {f.name: getattr(view, f.name) for f in fields(EngineView)}
        if alert_delivery:
            base["alerts"] = tuple(replace(r, delivery=alert_delivery[r.id])
                                   if r.id in alert_delivery else r for r in view.alerts)
        if notices is not None:
            base["notices"] = notices
        return cls(**base, delivery=delivery or DeliveryStatus(), history_path=history_path)
