"""Automatic choice of the iteration anchor when a profile names none.

An anchor is the probe whose span end closes an iteration (see
:mod:`prism_tui.engine.iterations`). Following the reference (docs/architecture.md: anchors are
chosen by call frequency and duration stability; candidates must recur; minimum cycle
1 ms), every probe seen in a sample of spans is a candidate and is measured per process:

* **calls** — it must recur: at least ``min_calls`` calls in one process;
* **cycle** — the time between the ends of successive calls; its median must be at least
  ``min_cycle_ms`` (a per-kernel or per-layer call, every 0.3 ms, is not an iteration);
* **cycle CV** and **duration CV** — robust coefficients of variation
  (``1.4826 · MAD / median``, insensitive to a rare GC pause) of the cycles and of the
  call durations; above ``max_cycle_cv`` / ``max_duration_cv`` the probe is irregular
  (called at random, or several times per iteration with different gaps).

Candidates that pass are scored; see :func:`rank_anchors`. The reference's
lower-precision method, the iteration period from the autocorrelation of the binned
event-count series of the whole probe stream (:func:`dominant_period_ms`), serves here
only to score how well a candidate's cycle fits that period: iterations are cut at the
end of an anchor's span, so when no single probe qualifies there is no anchor, and the
monitor (:mod:`prism_tui.engine.monitor`) keeps looking rather than cutting at a period.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from prism_tui.engine.iterations import SpanLike

MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class AnchorChoice:
    """One candidate anchor, measured; ``accepted`` False carries the rejection reason.

    Attributes:
        probe: probe id.
        calls_per_s: calls per second per process (mean over the processes measured).
        median_cycle_ms: median time between the ends of successive calls.
        cycle_cv: robust coefficient of variation of the cycles.
        duration_cv: robust coefficient of variation of the call durations (0 for
            entry-only probes).
        score: ranking score (0 when rejected).
        reason: why it was accepted or rejected, in words.
        accepted: whether it may serve as an anchor.
        processes: processes in which it recurred at least ``min_calls`` times.
    """

    probe: str
    calls_per_s: float
    median_cycle_ms: float
    cycle_cv: float
    duration_cv: float
    score: float
    reason: str
    accepted: bool
    processes: int = 0


def rank_anchors(spans: Sequence[SpanLike], *, min_cycle_ms: float = 1.0,
                 min_calls: int = 20, max_cycle_cv: float = 0.5,
                 max_duration_cv: float = 1.0) -> list[AnchorChoice]:
    """Every probe in ``spans`` as a candidate: accepted ones best first, then rejected.

    Scoring of an accepted candidate (higher is better)::

        score = stability × length × fit
        stability = 1 / (1 + cycle_cv / 0.1) × 1 / (1 + duration_cv)
        length    = log2(1 + median_cycle_ms / min_cycle_ms)
        fit       = 1 / (1 + |log2(median_cycle_ms / period_ms)|)   (1 when unknown)

    ``stability`` prefers regular cycles (a cycle CV of 0.1 halves it) and steady
    durations. ``length`` prefers the longest cycle: among probes that recur regularly,
    the one called once per iteration has the longest cycle (calls made several times
    per iteration recur faster), and the logarithm keeps a much rarer probe from winning
    on length alone. ``fit`` prefers a probe that recurs once per iteration: ``period_ms``
    is the dominant period of all spans of the process (:func:`dominant_period_ms`), so a
    periodic probe ten times slower than the iterations (a timer, a health check) scores
    about a quarter of one that matches it, and one twice as slow half.

    Args:
        spans: a sample of spans (any order, several processes allowed).
        min_cycle_ms: smallest median cycle accepted.
        min_calls: calls needed in one process.
        max_cycle_cv: largest robust cycle CV accepted.
        max_duration_cv: largest robust duration CV accepted.

    Returns:
        One :class:`AnchorChoice` per probe.
    """
    by_probe: dict[str, dict[int, list[SpanLike]]] = defaultdict(lambda: defaultdict(list))
    ends_by_pid: dict[int, list[int]] = defaultdict(list)
    for s in spans:
        by_probe[s.probe][s.pid].append(s)
        ends_by_pid[s.pid].append(s.end_ns)
    periods: dict[int, float | None] = {}
    accepted: list[AnchorChoice] = []
    rejected: list[AnchorChoice] = []
    for probe in sorted(by_probe):
        stats = []
        most_calls = 0
        for pid, calls in by_probe[probe].items():
            most_calls = max(most_calls, len(calls))
            if len(calls) >= min_calls:
                stats.append((pid, _measure(calls)))
        if not stats:
            rejected.append(AnchorChoice(
                probe, 0.0, math.nan, math.nan, math.nan, 0.0,
                f"does not recur: at most {most_calls} calls in a process, "
                f"{min_calls} needed", False, 0))
            continue
        rate = float(np.mean([m[0] for _, m in stats]))
        cycle = float(np.median([m[1] for _, m in stats]))
        cycle_cv = float(np.median([m[2] for _, m in stats]))
        dur_cv = float(np.median([m[3] for _, m in stats]))
        n = len(stats)

        def reject(why: str, probe: str = probe, rate: float = rate, cycle: float = cycle,
                   cycle_cv: float = cycle_cv, dur_cv: float = dur_cv, n: int = n) -> None:
            rejected.append(AnchorChoice(probe, rate, cycle, cycle_cv, dur_cv, 0.0, why,
                                         False, n))

        if not cycle >= min_cycle_ms:
            reject(f"cycle too short: median {cycle:.3g} ms < {min_cycle_ms:g} ms "
                   "(called many times per iteration)")
            continue
        if not cycle_cv <= max_cycle_cv:
            reject(f"irregular cycle: CV {cycle_cv:.2f} > {max_cycle_cv:g}")
            continue
        if not dur_cv <= max_duration_cv:
            reject(f"unstable duration: CV {dur_cv:.2f} > {max_duration_cv:g}")
            continue
        fits = []
        for pid, _ in stats:
            if pid not in periods:
                periods[pid] = dominant_period_ms(ends_by_pid[pid],
                                                  min_period_ms=min_cycle_ms)
            ref = periods[pid]
            if ref is not None and ref > 0:
                fits.append(1.0 / (1.0 + abs(math.log2(cycle / ref))))
        fit = float(np.median(fits)) if fits else 1.0
        stability = 1.0 / (1.0 + cycle_cv / 0.1) / (1.0 + dur_cv)
        length = math.log2(1.0 + cycle / min_cycle_ms)
        score = stability * length * fit
        ref_txt = "" if not fits else f", fit to stream period {fit:.2f}"
        accepted.append(AnchorChoice(
            probe, rate, cycle, cycle_cv, dur_cv, score,
            f"recurs every {cycle:.3g} ms (cycle CV {cycle_cv:.2f}, duration CV "
            f"{dur_cv:.2f}{ref_txt})", True, n))
    accepted.sort(key=lambda c: (-c.score, c.probe))
    return accepted + rejected


def choose_anchor(spans: Sequence[SpanLike], *, min_cycle_ms: float = 1.0,
                  min_calls: int = 20) -> AnchorChoice | None:
    """The best anchor of :func:`rank_anchors`, or None when no probe qualifies.

    Args:
        spans: a sample of spans.
        min_cycle_ms: smallest median cycle accepted.
        min_calls: calls needed in one process.

    Returns:
        The accepted candidate with the highest score, or None.
    """
    ranked = rank_anchors(spans, min_cycle_ms=min_cycle_ms, min_calls=min_calls)
    return ranked[0] if ranked and ranked[0].accepted else None


def _measure(calls: Sequence[SpanLike]) -> tuple[float, float, float, float]:
    """(calls/s, median cycle ms, cycle CV, duration CV) of one probe in one process."""
    ends = np.sort(np.asarray([s.end_ns for s in calls], dtype=np.float64))
    durations = np.asarray([s.end_ns - s.start_ns for s in calls], dtype=np.float64)
    cycles_ms = np.diff(ends) / 1e6
    elapsed_s = (ends[-1] - ends[0]) / 1e9
    rate = (len(ends) - 1) / elapsed_s if elapsed_s > 0 else math.inf
    median_cycle = float(np.median(cycles_ms))
    return rate, median_cycle, _robust_cv(cycles_ms), _robust_cv(durations)


def _robust_cv(values: npt.NDArray[np.float64]) -> float:
    """``1.4826 · MAD / median`` (0 for constant or all-zero values, inf when median 0)."""
    med = float(np.median(values))
    mad = float(np.median(np.abs(values - med)))
    if mad == 0:
        return 0.0
    if med <= 0:
        return math.inf
    return MAD_TO_SIGMA * mad / med


def dominant_period_ms(timestamps_ns: Sequence[int] | npt.NDArray[np.integer], *,
                       bin_ms: float = 0.25, min_period_ms: float = 1.0,
                       max_period_ms: float | None = None,
                       min_strength: float = 0.2) -> float | None:
    """Dominant period of an event stream by autocorrelation (the reference's fallback).

    The events are counted in bins of ``bin_ms``; the autocorrelation of the
    mean-removed count series (computed with an FFT, biased estimator so that multiples
    of the period score lower than the period itself) is searched for local maxima
    between ``min_period_ms`` and ``max_period_ms`` (default: a third of the stream, so
    that at least three cycles are seen). The highest peak may be a multiple of the
    period (jitter lowers every peak a little): the shortest ``lag / k`` whose every
    multiple up to the highest peak is itself a peak at least 0.7 times as strong is taken
    instead, so fine structure inside an iteration (launches every 0.3 ms, aliased by
    the bins) is not mistaken for the period. The highest peak's lag is refined by a
    parabola through its neighbours and divided by ``k``: precision is about
    ``bin_ms / (2k)``.

    Args:
        timestamps_ns: event times (any order), e.g. the span ends of every probe.
        bin_ms: bin width.
        min_period_ms: shortest period considered.
        max_period_ms: longest period considered.
        min_strength: smallest normalised autocorrelation accepted as periodic.

    Returns:
        The period in milliseconds, or None when the stream is too short or shows no
        periodicity.
    """
    ts = np.asarray(timestamps_ns, dtype=np.float64)
    if ts.size < 4 or bin_ms <= 0:
        return None
    t0 = float(ts.min())
    span_ms = (float(ts.max()) - t0) / 1e6
    nbins = int(span_ms / bin_ms) + 1
    if nbins < 8 or nbins > 1 << 25:
        return None
    idx = ((ts - t0) / 1e6 / bin_ms).astype(np.int64)
    counts = np.bincount(idx, minlength=nbins).astype(np.float64)
    counts -= counts.mean()
    var = float(np.dot(counts, counts))
    if var <= 0:
        return None
    size = 1 << int(2 * nbins - 1).bit_length()
    spectrum = np.fft.rfft(counts, size)
    acf = np.fft.irfft(spectrum * np.conj(spectrum), size)[:nbins] / var
    lo = max(1, math.ceil(min_period_ms / bin_ms))
    top = span_ms / 3 if max_period_ms is None else max_period_ms
    hi = min(nbins - 2, int(top / bin_ms))
    if hi <= lo:
        return None
    inner = acf[lo:hi + 1]
    left = acf[lo - 1:hi]
    right = acf[lo + 1:hi + 2]
    peaks = np.nonzero((inner > left) & (inner >= right))[0] + lo
    if peaks.size == 0:
        return None
    best_lag = int(peaks[np.argmax(acf[peaks])])
    best = float(acf[best_lag])
    if best < min_strength:
        return None
    divisor = _fundamental(acf, best_lag, lo)
    y0, y1, y2 = float(acf[best_lag - 1]), float(acf[best_lag]), float(acf[best_lag + 1])
    denom = y0 - 2 * y1 + y2
    shift = 0.5 * (y0 - y2) / denom if denom < 0 else 0.0
    return (best_lag + max(-0.5, min(0.5, shift))) * bin_ms / divisor


def _fundamental(acf: npt.NDArray[np.float64], best_lag: int, lo: int,
                 max_divisor: int = 12) -> int:
    """Largest ``k`` such that every multiple of ``best_lag / k`` is a strong peak (or 1).

    A peak's strength is the positive autocorrelation summed over the bins around it, so
    a period that falls between two bins (its peak split over both) still counts.
    """
    def mass(centre: float) -> float:
        c = round(centre)
        window = acf[max(0, c - 1):c + 2]
        return float(np.clip(window, 0.0, None).sum())

    strong = 0.7 * mass(best_lag)
    for k in range(max_divisor, 1, -1):
        cand = best_lag / k
        if cand < lo:
            continue
        if all(mass(j * cand) >= strong for j in range(1, k)):
            return k
    return 1
