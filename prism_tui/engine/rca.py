"""Root-cause hints: which stage (and which resource metric) changed when latency did.

The LatencyPrism paper's score, per operation/stage ``i`` between a baseline window of
normal iterations and an anomalous window::

    score_i = |Δβ_i| × (|Z_β_i| + |Z_log μ_i|)

* ``β_i`` is the stage's share of the iteration's (cycle's) time;
* ``μ_i`` is the utilisation (or any positive metric) of a resource related to it;
* ``Δβ_i`` is the anomalous window's mean share minus the baseline's mean share;
* ``Z`` is the z-score of the anomalous window's mean against the baseline's
  per-iteration distribution: ``(mean_anomalous - mean_baseline) / std_baseline``.

A stage without a related metric scores ``|Δβ| × |Z_β|``. Among a stage's related
metrics the one with the largest ``|Z_log μ|`` is reported. Pure, deterministic: ties are
broken by stage then metric name.

Choices of our own, each run on the paper's DeepDive data (``bench/rca_deepdive.py``):

* Suspects whose share rose rank before those whose share fell. When an iteration slows,
  the stage that took the added time gains share; one that lost share grew by less than
  the iteration (a host loop waiting less in relative terms while its device slows). The
  score alone, on ``|Δβ|``, let such a bystander lead.
* The baseline spread of a ``log μ`` is floored at ``log(1.01)``, a 1 % change of the
  metric, rather than at 1 % of the mean of the logs, which depends on the metric's unit
  (about 0.2 for bytes/s, 0 for a metric near 1, where any change read as infinite).
* The baseline spread of a share is floored at 1 % of the iteration as well as at 1 % of
  the share's mean: a stage that held almost none of the iteration (a copy of a few
  bytes) has almost no spread, and any growth of it read as tens of standard deviations,
  outscoring the stage that took most of the added time (chosen on simulator
  recordings, where a throttled process's copies grew from 0.1 % to 10 % of the step
  while its run-queue wait grew from 3 % to 70 %; no DeepDive top suspect changed).

Keys may carry a device as ``"stage@device"`` / ``"metric@device"``; when ``related`` is
not given, a stage is related to every metric on the same device (or to every metric
when either has no device).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# A baseline with (near) zero spread would give infinite z-scores; a share's std is
# floored at this fraction of the baseline mean and at this share of the iteration.
_REL_STD_FLOOR = 0.01
_SHARE_STD_FLOOR = 0.01
_LOG_FLOOR = 1e-9
# The spread of a log metric is floored in log units: ~1 % of the metric's level,
# whatever its unit (a floor relative to the mean of the logs would depend on the unit:
# log MHz ~ 7, log % ~ 2).
_LOG_STD_FLOOR = math.log1p(_REL_STD_FLOOR)


@dataclass(frozen=True)
class Suspect:
    """One root-cause hint."""

    stage: str
    device: str | None
    metric: str | None
    score: float
    delta_share: float
    z_share: float = 0.0
    z_metric: float = 0.0


def _split(key: str) -> tuple[str, str | None]:
    name, sep, dev = key.partition("@")
    return (name, dev) if sep and dev else (key, None)


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    if n == 0:
        return 0.0, 0.0
    m = math.fsum(xs) / n
    var = math.fsum((x - m) ** 2 for x in xs) / n
    return m, math.sqrt(var)


def _mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs) if xs else 0.0


def _z_log(base: Sequence[float], anom: Sequence[float]) -> float:
    """z-score of the anomalous mean of log values against the baseline's, with the
    baseline's spread floored at :data:`_LOG_STD_FLOOR` (a 1 % relative change)."""
    if not base or not anom:
        return 0.0
    mb, sb = _mean_std(base)
    diff = _mean(anom) - mb
    return diff / max(sb, _LOG_STD_FLOOR) if diff else 0.0


def _z_of(mb: float, sb: float, ma: float) -> float:
    """z-score of the anomalous mean ``ma`` against a baseline of mean ``mb``, std ``sb``."""
    diff = ma - mb
    if diff == 0:
        return 0.0
    return diff / max(sb, _REL_STD_FLOOR * abs(mb), _SHARE_STD_FLOOR)


def _finite(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _column(rows: Sequence[Mapping[str, float]], key: str, missing: float | None) -> list[float]:
    out: list[float] = []
    for r in rows:
        v = r.get(key)
        if type(v) is float and v - v == 0.0:  # a finite float, as the engine's are: at once
            out.append(v)
            continue
        v = _finite(v) if key in r else missing
        if v is not None:
            out.append(v)
    return out


def _finite_sum(column: Sequence[float]) -> bool:
    try:
        return math.isfinite(math.fsum(column))
    except (OverflowError, ValueError):  # huge values, or inf and -inf together
        return False


def _log_column(rows: Sequence[Mapping[str, float]], key: str) -> list[float]:
    return [math.log(max(v, _LOG_FLOOR)) for v in _column(rows, key, None) if v >= 0]


@dataclass(frozen=True)
class BaselineSummary:
    """Per stage key, the mean and standard deviation of a baseline window's shares.

    What :func:`rank_suspects` needs of the baseline; a caller that ranks often (the
    engine, at every alert) summarises its window ahead of time, off the alert's path.
    """

    n: int
    stats: Mapping[str, tuple[float, float] | None]
    """None for a stage whose every value was non-finite (it gets no z-score)."""


def summarize(rows: Sequence[Mapping[str, float]]) -> BaselineSummary:
    """Summarise a baseline window (a stage missing from an iteration counts as 0)."""
    stats: dict[str, tuple[float, float] | None] = {}
    for key in sorted({k for r in rows for k in r}):
        column = [r.get(key, 0.0) for r in rows]
        # the engine's shares are finite floats: checked at once (a non-finite value
        # makes the sum non-finite), and only otherwise value by value
        if not all(type(v) is float for v in column) or not _finite_sum(column):
            column = _column(rows, key, 0.0)
        stats[key] = _mean_std(column) if column else None
    return BaselineSummary(len(rows), stats)


def rank_suspects(
    baseline: Sequence[Mapping[str, float]] | BaselineSummary,
    anomalous: Sequence[Mapping[str, float]],
    utilisation_baseline: Sequence[Mapping[str, float]] | None = None,
    utilisation_anomalous: Sequence[Mapping[str, float]] | None = None,
    *,
    related: Mapping[str, Sequence[str]] | None = None,
    top: int = 3,
) -> list[Suspect]:
    """Rank stages by the paper's score, most suspicious first.

    Args:
        baseline: per normal iteration, ``{stage: share of the iteration's time}``
            (a stage missing from an iteration counts as share 0), or its
            :func:`summarize` (same result).
        anomalous: the same for the anomalous iterations.
        utilisation_baseline: optional per-iteration ``{metric: value}`` (values > 0;
            log is taken) over the baseline window.
        utilisation_anomalous: the same over the anomalous window.
        related: optional ``{stage key: [metric keys]}``; see the module docstring.
        top: how many suspects to return (<= 0: all).

    Returns:
        Suspects with score > 0: those whose share rose, then those whose share fell,
        each by score descending.
    """
    summary = baseline if isinstance(baseline, BaselineSummary) else summarize(baseline)
    if not summary.n or not anomalous:
        return []
    stages = sorted({*summary.stats, *(k for r in anomalous for k in r)})
    ub = utilisation_baseline or []
    ua = utilisation_anomalous or []
    metrics = sorted({k for r in (*ub, *ua) for k in r})
    known = set(metrics)
    z_metric: dict[str, float] = {}  # computed for the metrics some stage is related to

    def z_of(m: str) -> float:
        z = z_metric.get(m)
        if z is None:
            z = z_metric[m] = _z_log(_log_column(ub, m), _log_column(ua, m))
        return z

    out: list[Suspect] = []
    for key in stages:
        base = summary.stats.get(key, (0.0, 0.0))  # absent from every baseline row: 0
        mb, sb = base or (0.0, 0.0)
        a = _column(anomalous, key, 0.0)
        ma = _mean(a)
        delta = ma - mb
        zb = _z_of(mb, sb, ma) if a and base is not None else 0.0
        stage, device = _split(key)
        if related is not None:
            cands = [m for m in related.get(key, related.get(stage, ())) if m in known]
        else:
            cands = [
                m
                for m in metrics
                if device is None or _split(m)[1] is None or _split(m)[1] == device
            ]
        best: str | None = None
        zm = 0.0
        for m in cands:  # sorted: ties keep the first name
            z = z_of(m)
            if abs(z) > abs(zm):
                best, zm = m, z
        score = abs(delta) * (abs(zb) + abs(zm))
        if score > 0 and math.isfinite(score):
            out.append(Suspect(stage, device, best, score, delta, zb, zm))
    # added latency went to the stages whose share rose: one whose share fell grew by
    # less than the iteration as a whole, so it ranks after every one that rose
    out.sort(key=lambda s: (s.delta_share <= 0, -s.score, s.stage, s.device or "",
                            s.metric or ""))
    return out if top <= 0 else out[:top]
