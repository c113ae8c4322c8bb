"""Workload-aware latency anomaly detection (pure computation: no asyncio, no I/O).

The method follows the LatencyPrism paper: a gradient-boosted regression predicts the
latency a decode iteration *should* have from its workload (:mod:`.features`,
:mod:`.model`); the positive relative residual ``E_t = max(0, (Y - Ŷ) / Y)`` is smoothed
over W iterations and compared with an upper control limit (:mod:`.calibration`); the
rule's policies fire and resolve (:mod:`.policies`, :mod:`.rule`) in a streaming
:class:`Detector` (:mod:`.streaming`). SLO rules are apart (:mod:`.slo`). Two named
rules: ``prism`` (the default) and ``paper`` (the reference); docs/detection.md
describes both and their measurements.

A verdict's ``firing`` is the per-iteration state (what the paper's scoring reads); the
engine makes alerts from episodes of it (:mod:`prism_tui.engine.episodes`).
"""

from prism_tui.engine.detector.calibration import (
    FittedBaseline,
    compute_ucl,
    fit_and_calibrate,
    fit_baseline,
    rule_model,
    smooth_errors,
    trained_range,
    without_episodes,
    without_events,
)
from prism_tui.engine.detector.features import (
    FEATURE_NAMES,
    Workload,
    feature_matrix,
    features,
    relative_errors,
)
from prism_tui.engine.detector.model import BaselineModel
from prism_tui.engine.detector.policies import (
    FirePolicy,
    LimitGuard,
    ResolvePolicy,
    Transition,
)
from prism_tui.engine.detector.rule import RULES, DetectorRule, get_rule
from prism_tui.engine.detector.slo import SloRule
from prism_tui.engine.detector.streaming import (
    BELOW_MARGIN,
    MIN_WARMUP,
    Detector,
    Verdict,
)
from prism_tui.engine.detector.trees import TreeEnsemble

__all__ = [
    "BELOW_MARGIN",
    "FEATURE_NAMES",
    "MIN_WARMUP",
    "RULES",
    "BaselineModel",
    "Detector",
    "DetectorRule",
    "FirePolicy",
    "FittedBaseline",
    "LimitGuard",
    "ResolvePolicy",
    "SloRule",
    "Transition",
    "TreeEnsemble",
    "Verdict",
    "Workload",
    "compute_ucl",
    "feature_matrix",
    "features",
    "fit_and_calibrate",
    "fit_baseline",
    "get_rule",
    "relative_errors",
    "rule_model",
    "smooth_errors",
    "trained_range",
    "without_episodes",
    "without_events",
]
