"""The engine's alerts in the wire form: the MQTT schema, and JSON lines on stdout.

The engine emits :class:`~prism_tui.engine.core.AlertEvent` (monotonic clocks, plain
dicts) and never imports the alerting package; :func:`to_wire` turns one into the
alerting package's validated schema-1 :class:`~alerting.schema.Alert` — the one place the
two meet, used by the live session's MQTT sink, the history writer and the headless
printer.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from alerting.schema import Alert, Suspect, rfc3339
from prism_tui.engine.core import AlertEvent


def to_wire(event: AlertEvent) -> Alert:
    """The schema-1 alert of an engine event.

    ``started_at`` is derived from the wall-clock detection time minus how long ago (on
    CLOCK_MONOTONIC) the episode started, so no second clock read is needed.
    """
    wall = event.wall_time
    started = wall - max(0, event.detected_at_ns - event.started_at_ns) / 1e9
    suspects = tuple(
        Suspect(str(s.get("stage", "")), str(s.get("device", "")), str(s.get("metric", "")),
                float(s.get("score", 0.0)),
                None if s.get("delta_share") is None else float(s["delta_share"]))
        for s in event.suspects)
    return Alert(
        id=event.id, fingerprint=event.fingerprint, status=event.status,
        severity=event.severity, host=event.host, target_pid=int(event.target.get("pid", 0)),
        target_name=str(event.target.get("name", "")), device=event.device,
        stage=event.stage, phase=event.phase, observed_ms=event.observed_ms,
        predicted_ms=event.predicted_ms, error=event.error, ucl=event.ucl,
        window=event.window, started_at=rfc3339(started), detected_at=rfc3339(wall),
        iteration_end_ns=event.iteration_end_ns, summary=event.summary, suspects=suspects,
        source=event.source)


def event_doc(event: AlertEvent) -> dict[str, Any]:
    """The wire dict of an event plus ``alert_latency_ms`` (detection after iteration end)."""
    doc = to_wire(event).to_dict()
    doc["alert_latency_ms"] = round(event.alert_latency_ms, 3)
    return doc


class JsonLinesSink:
    """Writes each alert as ``{"alert": {...}}`` on one line (``prism watch --headless``)."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self.out = out or sys.stdout

    def emit(self, alert: AlertEvent) -> None:
        """Print one alert state change."""
        print(json.dumps({"alert": event_doc(alert)}), file=self.out, flush=True)
