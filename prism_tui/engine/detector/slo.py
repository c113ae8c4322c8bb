"""Latency objectives (``"decode p99 <= 60ms over 10s"``) checked on a stream."""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from prism_tui.engine.detector.policies import Transition

_UNITS_MS = {"us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "min": 60_000.0}
_SLO_RE = re.compile(
    r"^\s*(?:(?P<phase>[a-z_][a-z0-9_]*)\s+)?"
    r"(?P<stat>p\d+(?:\.\d+)?|mean|max)\s*"
    r"(?P<op><=|<)\s*"
    r"(?P<thr>\d+(?:\.\d+)?)\s*(?P<thr_unit>us|µs|ms|s)\s+"
    r"over\s+(?P<win>\d+(?:\.\d+)?)\s*(?P<win_unit>ms|s|m|min)\s*$",
    re.IGNORECASE,
)
_STATS = ("mean", "max")


@dataclass
class SloRule:
    """A latency objective evaluated on a stream with an injected clock.

    ``"decode p99 <= 60ms over 10s"``: the 99th percentile (nearest rank) of the
    latencies observed in the last 10 s must stay at or under 60 ms. The rule fires when
    it is violated (with at least ``min_samples`` in the window) and resolves when it
    holds again.
    """

    stat: str
    threshold_ms: float
    window_s: float
    phase: str | None = None
    strict: bool = False
    min_samples: int = 1
    text: str = ""

    def __post_init__(self) -> None:
        s = self.stat.lower()
        if s not in _STATS:
            q = _parse_quantile(s)
            if q is None:
                raise ValueError(f"SLO statistic must be pNN, mean or max, got {self.stat!r}")
        self.stat = s
        if not (math.isfinite(self.threshold_ms) and self.threshold_ms > 0):
            raise ValueError(f"SLO threshold must be > 0 ms, got {self.threshold_ms!r}")
        if not (math.isfinite(self.window_s) and self.window_s > 0):
            raise ValueError(f"SLO window must be > 0 s, got {self.window_s!r}")
        if self.min_samples < 1:
            raise ValueError("SLO min_samples must be >= 1")
        self._window: deque[tuple[int, float]] = deque()
        self._latest_ns: int | None = None
        self.violated = False

    @classmethod
    def parse(cls, spec: str | Mapping[str, object]) -> SloRule:
        """From ``"[phase] pNN|mean|max <=|< N(us|ms|s) over N(ms|s|m)"`` or a dict.

        Dict keys: ``stat`` (or ``quantile`` as 0.99), ``threshold_ms``, ``window_s``,
        optional ``phase``, ``strict``, ``min_samples``.
        """
        if isinstance(spec, str):
            m = _SLO_RE.match(spec)
            if m is None:
                raise ValueError(
                    f"cannot parse SLO {spec!r}: expected like 'decode p99 <= 60ms over 10s'"
                )
            return cls(
                stat=m["stat"].lower(),
                threshold_ms=float(m["thr"]) * _UNITS_MS[m["thr_unit"].lower()],
                window_s=float(m["win"]) * _UNITS_MS[m["win_unit"].lower()] / 1000.0,
                phase=m["phase"].lower() if m["phase"] else None,
                strict=m["op"] == "<",
                text=spec.strip(),
            )
        if isinstance(spec, Mapping):
            return cls._from_mapping(spec)
        raise ValueError(f"SLO must be a string or a mapping, got {type(spec).__name__}")

    @classmethod
    def _from_mapping(cls, d: Mapping[str, object]) -> SloRule:
        unknown = set(d) - {
            "stat",
            "quantile",
            "threshold_ms",
            "window_s",
            "phase",
            "strict",
            "min_samples",
        }
        if unknown:
            raise ValueError(f"unknown SLO keys: {sorted(unknown)}")
        stat = d.get("stat")
        if stat is None and "quantile" in d:
            q = _number(d, "quantile")
            if not 0 < q < 1:
                raise ValueError(f"SLO quantile must be in (0, 1), got {q}")
            stat = f"p{q * 100:g}"
        if not isinstance(stat, str):
            raise ValueError("SLO needs 'stat' (e.g. 'p99') or 'quantile' (e.g. 0.99)")
        phase = d.get("phase")
        if phase is not None and not isinstance(phase, str):
            raise ValueError("SLO 'phase' must be a string")
        min_samples = d.get("min_samples", 1)
        if not isinstance(min_samples, int) or isinstance(min_samples, bool):
            raise ValueError("SLO 'min_samples' must be an integer")
        return cls(
            stat=stat,
            threshold_ms=_number(d, "threshold_ms"),
            window_s=_number(d, "window_s"),
            phase=phase,
            strict=bool(d.get("strict", False)),
            min_samples=min_samples,
        )

    def value(self) -> float | None:
        """The statistic over the current window, or None when it is empty."""
        if not self._window:
            return None
        vals = sorted(v for _, v in self._window)
        if self.stat == "mean":
            return sum(vals) / len(vals)
        if self.stat == "max":
            return vals[-1]
        q = _parse_quantile(self.stat)
        assert q is not None
        rank = max(1, math.ceil(q * len(vals)))
        return vals[rank - 1]

    def observe(self, t_ns: int, latency_ms: float) -> Transition | None:
        """Add one latency at time ``t_ns``; returns a transition when the state flips.

        Non-finite or negative latencies are ignored. Time that goes backwards does not
        shrink the window (the newest time seen defines it).
        """
        if not math.isfinite(latency_ms) or latency_ms < 0:
            return None
        latest = t_ns if self._latest_ns is None else max(self._latest_ns, t_ns)
        self._latest_ns = latest
        self._window.append((t_ns, float(latency_ms)))
        horizon = latest - int(self.window_s * 1e9)
        while self._window and self._window[0][0] <= horizon:
            self._window.popleft()
        v = self.value()
        bad = (
            v is not None
            and len(self._window) >= self.min_samples
            and (v >= self.threshold_ms if self.strict else v > self.threshold_ms)
        )
        if bad and not self.violated:
            self.violated = True
            return "firing"
        if not bad and self.violated:
            self.violated = False
            return "resolved"
        return None


def _parse_quantile(stat: str) -> float | None:
    m = re.fullmatch(r"p(\d{1,2}(?:\.\d+)?)", stat)
    if m is None:
        return None
    q = float(m[1]) / 100.0
    return q if 0 < q < 1 else None


def _number(d: Mapping[str, object], key: str) -> float:
    if key not in d:
        raise ValueError(f"SLO needs {key!r}")
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"SLO {key!r} must be a number, got {v!r}")
    return float(v)
