"""Workload-aware detector, SLO rule and root-cause ranking on synthetic data.

The latency law is known: ``y = 5 + 0.3·B + 0.002·B·kv`` ms with 2 % noise, so the model
can be checked, a same-workload slowdown must fire, and a workload shift must not.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prism_tui.engine.detector import (
    RULES,
    BaselineModel,
    Detector,
    DetectorRule,
    SloRule,
    TreeEnsemble,
    Verdict,
    Workload,
    compute_ucl,
    feature_matrix,
    features,
    fit_baseline,
    relative_errors,
    smooth_errors,
)
from prism_tui.engine.rca import _column, _mean_std, rank_suspects, summarize
from tests.conftest import ROOT

WARMUP = 600

PRISM_MEAN5 = dataclasses.replace(
    RULES["prism"], window=5, smoothing="mean", form="gbdt", event_factor=None,
    ucl_floor=0.22)
"""The ``prism`` rule with a GBDT and a mean of 5, every warm-up row calibrating (the
benches' ``prism-gbdt-fast-fire`` without its fast firing, bench/detector_variants.py): the
resolve and re-fire mechanisms' iteration counts below were worked out on it; they act
on the raw errors, whatever the smoothing."""


def law(w: Workload) -> float:
    return 5.0 + 0.3 * w.batch_size + 0.002 * w.batch_size * w.kv_len


def workloads(rng: np.random.Generator, n: int, b_lo: int = 1, b_hi: int = 64) -> list[Workload]:
    out = []
    for _ in range(n):
        b = int(rng.integers(b_lo, b_hi + 1))
        i = float(rng.uniform(100, 1500))
        o = float(rng.uniform(1, 800))
        out.append(Workload(b, i, o))
    return out


def noisy(rng: np.random.Generator, w: Workload, factor: float = 1.0) -> float:
    return law(w) * factor * float(1 + rng.normal(0, 0.02))


_WARMED: dict[str, tuple[Detector, np.random.Generator]] = {}


def warmed(
    rule: str | DetectorRule = "paper", seed: int = 0, **kw: object
) -> tuple[Detector, np.random.Generator]:
    """A detector fitted on ``WARMUP`` iterations of the law, and the generator after them.

    Warm-up data and fit are seeded, so the same arguments give the same detector: it is
    fitted once (5-6 s of model fits) and each call gets its own deep copy of it and of
    the generator, which the caller may then drive as if it had warmed it up itself.
    """
    key = repr((rule, seed, sorted(kw.items())))
    if key not in _WARMED:
        rng = np.random.default_rng(seed)
        det = Detector(rule=rule, warmup=WARMUP, **kw)  # type: ignore[arg-type]
        for k, w in enumerate(workloads(rng, WARMUP)):
            assert det.observe(k, noisy(rng, w), w) is None
        assert det.fitted
        _WARMED[key] = (det, rng)
    det, rng = _WARMED[key]
    return copy.deepcopy(det), copy.deepcopy(rng)


def test_features_are_the_papers_five() -> None:
    assert features(Workload(4, 100, 20)) == (4.0, 100.0, 20.0, 120.0, 480.0)
    m = feature_matrix([4, 2], [100, 10], [20, 5])
    assert m.tolist() == [[4, 100, 20, 120, 480], [2, 10, 5, 15, 30]]
    assert relative_errors([10, 10], [8, 12]).tolist() == pytest.approx([0.2, 0.0])


def law_data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    """``n`` random workloads' features and their noisy latencies under ``law``."""
    rng = np.random.default_rng(seed)
    ws = workloads(rng, n)
    x = np.asarray([features(w) for w in ws])
    return x, np.asarray([noisy(rng, w) for w in ws]), rng


@pytest.mark.parametrize("target", ["linear", "log"])
def test_model_fits_known_law(target: str) -> None:
    x, y, _ = law_data(1, 2000)
    m = BaselineModel(target).fit(x[:1500], y[:1500])  # type: ignore[arg-type]
    mape = float(np.mean(np.abs(m.predict(x[1500:]) - y[1500:]) / y[1500:]))
    assert mape < 0.05


@pytest.mark.parametrize("target", ["linear", "log"])
def test_flattened_trees_predict_what_scikit_learn_predicts(target: str) -> None:
    # rows from training (values that sit next to split points), far outside it, and
    # integers: the walk must round to float32 and go left on <= as sklearn's trees do
    x, y, rng = law_data(7, 1500)
    model = BaselineModel(target).fit(x, y)  # type: ignore[arg-type]
    est = model._est
    trees = TreeEnsemble.of(est)
    assert trees is not None
    probes = np.vstack([x[:300], rng.uniform(-1e3, 1e6, (100, 5)),
                        np.floor(rng.uniform(0, 80, (100, 5)))])
    want = np.asarray(est.predict(probes))  # type: ignore[union-attr]
    for chunk in np.array_split(probes, 50):
        got = trees.predict(chunk)
        assert np.allclose(got, np.asarray(est.predict(chunk)),  # type: ignore[union-attr]
                           rtol=1e-12, atol=1e-12)
    assert np.allclose(model.predict(probes), np.exp(want) if target == "log" else want)
    one = model.predict(probes[0])  # the engine's one-row call goes through the arrays
    assert one.shape == (1,) and one[0] == pytest.approx(float(
        np.exp(want[0]) if target == "log" else want[0]), rel=1e-12)


@pytest.mark.parametrize("depth", [1, 5, 6])
def test_tabled_trees_of_any_depth_predict_what_scikit_learn_predicts(depth: int) -> None:
    # depth 5 and 6 have more leaves than 16 bits: the wide masks' path; depth 1 is a stump
    from sklearn.ensemble import GradientBoostingRegressor

    x, y, rng = law_data(11, 1200)
    est = GradientBoostingRegressor(n_estimators=40, max_depth=depth, random_state=0).fit(x, y)
    trees = TreeEnsemble.of(est)
    assert trees is not None
    probes = np.vstack([x[:200], rng.uniform(-1e3, 1e6, (50, 5)), x[:50] + 1e-3])
    assert np.allclose(trees.predict(probes), est.predict(probes), rtol=1e-12, atol=1e-12)


def test_one_row_prediction_is_the_bulk_prediction() -> None:
    x, y, _ = law_data(5, 1200)
    for model in (BaselineModel("log", min_samples_leaf=20).fit(x, y),
                  BaselineModel("linear").fit(x, y),
                  BaselineModel("log", form="robust").fit(x, y)):
        for row in x[:40]:
            assert model.predict_one(tuple(row)) == pytest.approx(
                float(model.predict(row)[0]), rel=1e-12)


def test_a_pickled_model_predicts_alike_without_importing_scikit_learn(tmp_path: Path) -> None:
    """The monitor unpickles the fit worker's models: from the tables alone, with
    scikit-learn and SciPy never imported into it (~30 MiB of modules)."""
    x, y, _ = law_data(5, 1200)
    model = BaselineModel("log", form="robust", min_samples_leaf=20).fit(x, y)
    rows = [tuple(float(v) for v in row) for row in x[:200]]
    (tmp_path / "model.pkl").write_bytes(pickle.dumps((model, rows)))
    script = (
        "import pickle, sys, json\n"
        f"model, rows = pickle.load(open({str(tmp_path / 'model.pkl')!r}, 'rb'))\n"
        "one = [model.predict_one(r) for r in rows]\n"
        "bulk = model.predict(rows).tolist()\n"
        "print(json.dumps({'one': one, 'bulk': bulk,\n"
        "                  'imported': sorted(m for m in sys.modules\n"
        "                                     if m.split('.')[0] in ('sklearn', 'scipy'))}))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, cwd=ROOT, timeout=120)
    doc = json.loads(out.stdout)
    assert doc["imported"] == []
    assert doc["one"] == pytest.approx([model.predict_one(r) for r in rows], rel=1e-12)
    assert doc["bulk"] == pytest.approx(model.predict(np.asarray(rows)).tolist(), rel=1e-9)


def test_only_a_squared_loss_gbdt_is_flattened() -> None:
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import LinearRegression

    x = np.arange(40, dtype=float).reshape(20, 2)
    assert TreeEnsemble.of(LinearRegression().fit(x, x[:, 0])) is None
    assert TreeEnsemble.of(HistGradientBoostingRegressor(max_iter=3).fit(x, x[:, 0])) is None


def test_slowdown_fires_fast_and_resolves_with_hysteresis() -> None:
    det, rng = warmed("prism")
    assert det.ucl is not None and 0 < det.ucl <= 0.5
    verdicts: list[Verdict] = []
    t = WARMUP
    for phase, n, factor in (("normal", 300, 1.0), ("slow", 60, 1.3), ("after", 100, 1.0)):
        for w in workloads(rng, n):
            v = det.observe(t, noisy(rng, w, factor), w)
            assert v is not None
            verdicts.append(v)
            t += 1
        if phase == "normal":
            assert not any(v.firing for v in verdicts), "false alarm on normal traffic"
    fired = [k for k, v in enumerate(verdicts) if v.transition == "firing"]
    resolved = [k for k, v in enumerate(verdicts) if v.transition == "resolved"]
    assert fired and 300 <= fired[0] <= 305, fired
    assert all(v.firing for v in verdicts[fired[0] : 360])
    # resolves after the slowdown ends: at once on a clearly normal iteration
    # (resolve_clear), at the latest when the window drained (W) and K were below h·UCL
    spec = det.rule_spec
    assert len(resolved) == 1, resolved
    latest = 360 + spec.window + spec.resolve_after + 10
    assert 360 <= resolved[0] <= latest
    assert not any(v.firing for v in verdicts[resolved[0] :])
    assert [v.transition for v in verdicts if v.transition] == ["firing", "resolved"]


def test_resolving_on_raw_errors_ends_the_alert_when_the_slowdown_ends() -> None:
    """The smoothed error lags the fault's end by up to W iterations; judging each
    iteration's own error resolves ``resolve_after`` iterations after it instead."""
    ends = {}
    for resolve_on in ("raw", "smoothed"):
        rule = dataclasses.replace(RULES["prism"], window=10, resolve_on=resolve_on,
                                   resolve_clear=None)
        det, rng = warmed(rule, seed=3)
        t = WARMUP
        verdicts = []
        for n, factor in ((100, 1.0), (40, 1.5), (60, 1.0)):
            for w in workloads(rng, n):
                verdicts.append(det.observe(t, noisy(rng, w, factor), w))
                t += 1
        resolved = [k for k, v in enumerate(verdicts) if k >= 100 and v is not None
                    and v.transition == "resolved"]
        assert len(resolved) == 1, (resolve_on, resolved)  # and no flapping after it
        assert not any(v is not None and v.firing for v in verdicts[resolved[0]:])
        ends[resolve_on] = resolved[0]
    assert ends["raw"] == 140 + 3 - 1  # the third normal iteration
    assert ends["smoothed"] > ends["raw"] + 3  # waits for the window to drain

def test_two_clearly_normal_iterations_end_the_alert_but_one_inside_a_fault_does_not(
) -> None:
    """With ``resolve_clear`` 2 iterations in a row back on the prediction resolve (the
    fault's tail of false positives is one iteration, not two). A fault that lets one
    normal iteration through now and then (every fourth here, as a CPU squeeze does)
    keeps firing; with ``clear_after=1`` it flapped. Milder dips need three in a row.
    (``prism`` resolves on two below 0.5 × UCL: docs/detection.md.)"""
    ends = {}
    for clear_after, clear in ((1, 0.1), (2, 0.1), (2, None)):
        rule = dataclasses.replace(PRISM_MEAN5, resolve_clear=clear,
                                   clear_after=clear_after)
        det, rng = warmed(rule, seed=3)
        t = WARMUP
        verdicts = []
        for k, w in enumerate(workloads(rng, 200)):
            fault = 100 <= k < 160
            factor = 1.6 if fault and k % 4 != 1 else 1.0
            lat = law(w) * factor if fault else noisy(rng, w)
            verdicts.append(det.observe(t, lat, w))
            t += 1
        transitions = [(k, v.transition) for k, v in enumerate(verdicts)
                       if v is not None and v.transition]
        ends[(clear_after, clear)] = transitions
    assert len(ends[(1, 0.1)]) > 2  # ended on a dip and fired again
    for key, last in (((2, 0.1), 161), ((2, None), 162)):
        assert [tr for _, tr in ends[key]] == ["firing", "resolved"], (key, ends[key])
        assert ends[key][1][0] == last  # the second (clear) or third normal iteration
    prism = RULES["prism"]
    assert (prism.resolve_clear, prism.clear_after, prism.flap_within) == (0.5, 2, 50)


def test_an_alert_that_fires_again_soon_after_a_resolve_needs_three_normal_iterations(
) -> None:
    """Two clearly normal iterations end an alert, unless it fired within
    ``flap_within`` iterations of the previous resolve: the fault is still on and lets
    normal iterations through (a CPU squeeze), and the ordinary three in a row apply."""
    def run(rule: DetectorRule, gap: int) -> list[tuple[int, str]]:
        det, _ = warmed(rule, seed=4)
        ucl = det.ucl
        assert ucl is not None
        slow = [2.2 * ucl] * 8
        errors = [0.0] * 10 + slow + [0.0] * gap + slow + [0.0] * 10
        verdicts = [det.observe_predicted(WARMUP + k, 10.0 / (1 - e), 10.0)
                    for k, e in enumerate(errors)]
        return [(k, v.transition) for k, v in enumerate(verdicts)
                if v is not None and v.transition]

    prism = PRISM_MEAN5
    assert RULES["prism"].flap_within == prism.flap_within == 50
    # fired again 9 iterations after the resolve (past refire_within): flapping
    assert run(prism, 10) == [(12, "firing"), (19, "resolved"), (30, "firing"),
                              (38, "resolved")]
    assert run(dataclasses.replace(prism, flap_within=0), 10) == [
        (12, "firing"), (19, "resolved"), (30, "firing"), (37, "resolved")]
    # 60 iterations later it is a new alert, ended by two clear iterations
    assert run(prism, 60) == [(12, "firing"), (19, "resolved"), (80, "firing"),
                              (87, "resolved")]


def test_one_clearly_slow_iteration_soon_after_a_resolve_fires_again() -> None:
    """A CPU squeeze alternates slow and normal iterations: two clearly normal ones resolve
    the alert. Within ``refire_within`` iterations of that, one iteration above
    ``refire_level × UCL`` fires again; a milder one, or one later, does not alone."""
    def run(rule: DetectorRule, after_resolve: list[float]) -> list[str | None]:
        det, _ = warmed(rule, seed=4)
        ucl = det.ucl
        assert ucl is not None
        errors = [0.0] * 10 + [2.2 * ucl] * 8 + [0.0] * 2 + [e * ucl for e in after_resolve]
        verdicts = [det.observe_predicted(WARMUP + k, 10.0 / (1 - e), 10.0)
                    for k, e in enumerate(errors)]
        assert all(v is not None for v in verdicts)
        return [v.transition for v in verdicts[10:] if v is not None]

    prism = PRISM_MEAN5
    assert (RULES["prism"].refire_within, RULES["prism"].refire_level) == (5, 2.0)
    fault = [None, None, "firing"] + [None] * 6 + ["resolved"]  # two clear ones end it
    assert run(prism, [0.0, 2.5]) == [*fault, None, "firing"]
    assert run(prism, [0.0, 1.5, 0.0]) == fault + [None] * 3  # not clearly slow
    assert run(prism, [0.0] * 6 + [2.5]) == fault + [None] * 7  # too late to count
    assert run(dataclasses.replace(prism, refire_within=0), [0.0, 2.5]) == fault + [None] * 2


def test_larger_leaves_do_not_learn_a_handful_of_odd_rows() -> None:
    """A regime refit holds ~100 rows of the new regime; with leaves of one row the
    trees learnt a few slow ones at the edge of its range and predicted everything
    beyond that edge high (a later fault hid under it). Leaves of 20 rows average them
    away; the flattened trees still predict what scikit-learn predicts."""
    rng = np.random.default_rng(7)
    ws = workloads(rng, 1000, b_lo=8, b_hi=32)
    x = np.asarray([features(w) for w in ws])
    y = np.asarray([noisy(rng, w) for w in ws])
    edge = np.argsort(x[:, 4])[-6:]  # the six largest B·kv
    y[edge] *= 1.4  # start-up stalls that happened to land there
    beyond = np.asarray([features(Workload(32, 1600.0, 900.0))])
    truth = law(Workload(32, 1600.0, 900.0))
    over = {}
    for leaf in (1, 20):
        m = BaselineModel("log", min_samples_leaf=leaf).fit(x, y)
        over[leaf] = float(m.predict(beyond)[0]) / truth - 1
        assert m._est is not None
        np.testing.assert_allclose(m.predict(x[:10]),
                                   np.exp(np.asarray(m._est.predict(x[:10]))), rtol=1e-9)
    assert over[1] > 0.15 and abs(over[20]) < 0.1, over
    assert RULES["prism"].min_samples_leaf == 20


def test_a_few_stray_small_batches_do_not_hide_a_regime_below_the_trained_one() -> None:
    """The trained range runs between the 1st and 99th percentiles under ``prism``: a
    warm-up of batches 16-32 with a handful of tiny ones (a ramp-up) still sees a step
    down to batch 8 as a new regime and refits for it; min-max ranges do not."""
    seen = {}
    for q in (0.01, 0.0):
        rng = np.random.default_rng(5)
        det = Detector(rule=dataclasses.replace(RULES["prism"], range_quantile=q),
                       warmup=WARMUP)
        ws = workloads(rng, WARMUP, b_lo=16, b_hi=32)
        for k in range(3):
            ws[k] = Workload(2, ws[k].avg_input, ws[k].avg_output)  # the stray rows
        for k, w in enumerate(ws):
            det.observe(k, noisy(rng, w), w)
        assert det.fitted
        for k, w in enumerate(workloads(rng, 120, b_lo=8, b_hi=8)):
            det.observe(WARMUP + k, noisy(rng, w), w)
        seen[q] = (det.novel_seen, det.refit_due)
    assert seen[0.01] == (120, True)  # learnt as a new regime
    assert seen[0.0] == (0, False)  # inside min-max: judged by a model that barely saw it


def test_paper_rule_fires_on_slowdown_but_its_in_sample_ucl_is_tight() -> None:
    """The paper's UCL comes from training-set errors, which a GBDT under-states.

    With 600 warm-up iterations and 2 % noise it sits below the out-of-sample error
    level, so the paper's rule also alarms on some normal iterations; the ``prism`` rule
    (held-out calibration) does not (previous test). Measured on real data in
    docs/detection.md.
    """
    det, rng = warmed("paper", hysteresis=1.0, resolve_after=1)
    prism, _ = warmed("prism")
    assert det.ucl is not None and prism.ucl is not None and det.ucl < prism.ucl
    normal = [det.observe(k, noisy(rng, w), w) for k, w in enumerate(workloads(rng, 300))]
    slow = [det.observe(k, noisy(rng, w, 1.3), w) for k, w in enumerate(workloads(rng, 60))]
    assert all(v is not None and v.firing for v in slow[5:])
    assert sum(1 for v in normal if v is not None and v.firing) < 0.5 * len(normal)


def test_workload_shift_is_explained_and_does_not_fire() -> None:
    det, rng = warmed("prism")
    # small batches, short contexts, then big batches with long contexts (several
    # times slower, but inside the workloads seen during warm-up)
    small = [Workload(int(rng.integers(2, 9)), 400.0, 200.0) for _ in range(200)]
    big = [Workload(int(rng.integers(48, 61)), 1200.0, 600.0) for _ in range(200)]
    lat_small = [noisy(rng, w) for w in small]
    lat_big = [noisy(rng, w) for w in big]
    assert np.mean(lat_big) > 5 * np.mean(lat_small)
    for k, (w, y) in enumerate(zip(small + big, lat_small + lat_big, strict=True)):
        v = det.observe(WARMUP + k, y, w)
        assert v is not None and not v.firing, (k, v)


def test_a_workload_beyond_training_is_learnt_not_judged() -> None:
    """Warm-up saw batches 1-16 only; the load more than doubles (batch 28-40).

    Trees do not extrapolate, so the model under-predicts the larger batches by far; the
    ``prism`` rule marks them novel instead of firing, refits once it has
    ``novelty_refit`` of them, and then judges the new regime: a slowdown there fires.
    """
    rng = np.random.default_rng(3)
    det = Detector(rule="prism", warmup=WARMUP)
    for k, w in enumerate(workloads(rng, WARMUP, 1, 16)):
        det.observe(k, noisy(rng, w), w)
    assert det.fitted and det.baseline is not None
    assert det.baseline.batch_range == (1.0, 16.0)
    t = WARMUP
    bigger = workloads(rng, RULES["prism"].novelty_refit, 28, 40)
    for w in bigger:
        v = det.observe(t, noisy(rng, w), w)
        t += 1
        assert v is not None and v.novel and v.novel.startswith("batch") and not v.firing
    assert det.novel_seen == RULES["prism"].novelty_refit and det.refit_due
    det.refit_now()
    assert det.baseline.batch_range is not None and det.baseline.batch_range[1] >= 28
    normal = [det.observe(t + k, noisy(rng, w), w) for k, w in
              enumerate(workloads(rng, 200, 28, 40))]
    assert all(v is not None and v.novel is None for v in normal)
    assert sum(v.firing for v in normal if v is not None) == 0
    slow = [det.observe(t + 500 + k, noisy(rng, w, 1.4), w) for k, w in
            enumerate(workloads(rng, 60, 28, 40))]
    assert any(v is not None and v.transition == "firing" for v in slow)


def test_a_fault_beyond_the_trained_load_fires_instead_of_being_learnt() -> None:
    """Warm-up saw batches 1-16; then batches 28-40 (novel) run 6x as long as the law says.

    A fault strong enough to queue requests grows the batch past the trained range. Its
    steps are slower than ``novelty_ceiling`` times the extrapolated prediction, so they
    are judged against that ceiling and fire, and they count neither as novel nor towards
    the refit that would learn them as the new load's cost.
    """
    rng = np.random.default_rng(5)
    det = Detector(rule="prism", warmup=WARMUP)
    for k, w in enumerate(workloads(rng, WARMUP, 1, 16)):
        det.observe(k, noisy(rng, w), w)
    assert det.baseline is not None and det.baseline.batch_range == (1.0, 16.0)
    t = WARMUP
    slow = []
    for w in workloads(rng, 2 * RULES["prism"].novelty_refit, 28, 40):
        slow.append(det.observe(t, noisy(rng, w, 6.0), w))
        t += 1
    assert all(v is not None and v.novel is None for v in slow)
    assert any(v is not None and v.transition == "firing" for v in slow)
    assert det.firing and det.novel_seen == 0 and not det.refit_due


def test_a_new_load_over_the_ceiling_is_learnt_after_the_hold() -> None:
    """The same 6x-slower large batches, one every 100 ms, for longer than
    ``novelty_hold_s``: they fire, then (a new load whose cost outgrows the extrapolation,
    not a fault) they are learnt as novel, the model is refitted and the alert resolves."""
    rule = RULES["prism"]
    assert rule.novelty_ceiling is not None
    rng = np.random.default_rng(5)
    det = Detector(rule="prism", warmup=WARMUP)
    for k, w in enumerate(workloads(rng, WARMUP, 1, 16)):
        det.observe(k, noisy(rng, w), w)
    step = 100_000_000  # 100 ms
    start = WARMUP + step
    hold_steps = int(rule.novelty_hold_s * 1e9 / step)
    verdicts = []
    for k, w in enumerate(workloads(rng, hold_steps + rule.novelty_refit, 28, 40)):
        verdicts.append(det.observe(start + k * step, noisy(rng, w, 6.0), w))
    before, after = verdicts[:hold_steps], verdicts[hold_steps:]
    assert any(v is not None and v.transition == "firing" for v in before)
    assert all(v is not None and v.novel is None for v in before)
    assert all(v is not None and v.novel is not None for v in after)
    assert det.novel_seen >= rule.novelty_refit and det.refit_due  # (+ any below range)
    det.refit_now()
    t = start + len(verdicts) * step
    later = [det.observe(t + k * step, noisy(rng, w, 6.0), w)
             for k, w in enumerate(workloads(rng, 100, 28, 40))]
    assert any(v is not None and v.transition == "resolved" for v in later)
    assert not det.firing


def test_a_workload_below_training_is_judged_and_then_learnt() -> None:
    """Warm-up saw batches 16-64; the load drops to batches 1-4.

    A decode step does not get slower with fewer sequences, so the prediction for the
    smallest trained batch bounds it from above: the iterations are judged (no false
    alarm) and counted towards the refit that learns the regime; after it (and the
    refit once the regime settled) a 3x slowdown fires. Before it, the bound is loose:
    1.5x the truth here with one-row leaves (a 3x slowdown fires at once), 2.6x with
    ``prism``'s leaves of 20 rows, which average the edge of the trained range with more
    of it (docs/detection.md).
    """
    for leaf in (1, 20):
        rng = np.random.default_rng(5)
        det = Detector(rule=dataclasses.replace(RULES["prism"], min_samples_leaf=leaf),
                       warmup=WARMUP)
        for k, w in enumerate(workloads(rng, WARMUP, 16, 64)):
            det.observe(k, noisy(rng, w), w)
        assert det.baseline is not None and det.baseline.batch_range == (16.0, 64.0)
        t = WARMUP
        small = [det.observe(t + k, noisy(rng, w), w)
                 for k, w in enumerate(workloads(rng, 50, 1, 4))]
        assert all(v is not None and v.novel is None and not v.firing for v in small)
        assert det.novel_seen == 50 and not det.refit_due
        t += 50
        if leaf == 1:
            slow = [det.observe(t + k, noisy(rng, w, 3.0), w) for k, w in
                    enumerate(workloads(rng, 20, 1, 4))]
            assert any(v is not None and v.transition == "firing" for v in slow)
            continue
        for k, w in enumerate(workloads(rng, 50, 1, 4)):
            v = det.observe(t + k, noisy(rng, w), w)
            assert v is not None and not v.firing
        assert det.refit_due
        det.refit_now()  # the regime's refit, as the engine does it in its worker
        t += 50
        # until the regime's settling refit the previous model still bounds it
        for k, w in enumerate(workloads(rng, 200, 1, 4)):
            v = det.observe(t + k, noisy(rng, w), w)
            assert v is not None and not v.firing
        assert det.refit_due
        det.refit_now()
        t += 200
        slow = [det.observe(t + k, noisy(rng, w, 3.0), w) for k, w in
                enumerate(workloads(rng, 20, 1, 4))]
        assert any(v is not None and v.transition == "firing" for v in slow)


@pytest.mark.parametrize("bound", [True, False])
def test_a_new_regimes_first_iterations_do_not_make_the_rest_of_it_an_alarm(
        bound: bool) -> None:
    """The load drops to batches 1-4; its first 100 iterations run 30 % faster than the
    ones after (in ``mixed``: the step down to 8 requests). The refit for the regime
    learnt the fast ones; until the regime's settling refit, the previous model's
    prediction bounds the smaller workload from above, so the rest is no alarm (without
    the bound it is), while a real slowdown there still fires."""
    rule = dataclasses.replace(RULES["prism"], bound_by_previous=bound)
    rng = np.random.default_rng(7)
    det = Detector(rule=rule, warmup=WARMUP)
    for k, w in enumerate(workloads(rng, WARMUP, 16, 64)):
        det.observe(k, noisy(rng, w), w)
    t = WARMUP
    for w in workloads(rng, rule.novelty_refit, 1, 4):
        det.observe(t, noisy(rng, w, 0.7), w)
        t += 1
    assert det.refit_due
    det.refit_now()  # the regime's refit, on its first (fast) iterations
    rest = [det.observe(t + k, noisy(rng, w), w) for k, w in enumerate(workloads(rng, 80, 1, 4))]
    t += 80
    assert not det.refit_due  # still before the settling refit
    fired = any(v is not None and v.transition == "firing" for v in rest)
    assert fired is not bound
    if bound:
        slow = [det.observe(t + k, noisy(rng, w, 3.0), w)
                for k, w in enumerate(workloads(rng, 20, 1, 4))]
        assert any(v is not None and v.transition == "firing" for v in slow)


@pytest.mark.parametrize("rule", ["paper", "prism"])
def test_the_first_verdicts_after_a_fit_are_not_compared_with_the_limit(rule: str) -> None:
    """The limit was calibrated on errors smoothed over W; right after a fit the window
    holds fewer, so one slow iteration would be the whole mean (live, the model lands a
    few seconds into the run: the smoke test's alerts 0.1-0.3 s before its fault). A
    slowdown that lasts fires once the window is full."""
    det, rng = warmed(rule)
    window = det.rule_spec.window
    w = workloads(rng, 1)[0]
    first = det.observe(WARMUP, noisy(rng, w, 3.0), w)
    assert first is not None and first.smoothed > first.ucl and not first.firing
    verdicts = [det.observe(WARMUP + 1 + k, noisy(rng, w, 3.0), w)
                for k, w in enumerate(workloads(rng, window))]
    fired = [k for k, v in enumerate(verdicts) if v is not None and v.transition == "firing"]
    assert fired and fired[0] == window - 2  # the W-th error since the fit


def test_a_quiet_warm_up_gives_the_prism_rules_floor_not_a_hair_trigger() -> None:
    """2 % noise calibrates a limit of a few percent: it stays at the floor, 0.1, below
    a 1.2x slowdown's error (0.167), the mildest slowdown the goals ask to see."""
    det, _ = warmed("prism")
    assert det.ucl == RULES["prism"].ucl_floor == 0.1


def test_a_new_regimes_settling_refit_keeps_the_limit_of_before_the_regime() -> None:
    """A settling refit calibrates on the regime's start (transitions, the noisy first
    seconds): it may not widen the limit that held before the regime came."""
    det, rng = warmed("prism")
    assert det.rule_spec.settle_keeps_limit
    ws = workloads(rng, WARMUP)
    x = np.asarray([features(w) for w in ws])
    y = np.asarray([noisy(rng, w) for w in ws])
    fb = fit_baseline(x, y, det.rule_spec, n_estimators=50)
    first = det.ucl
    assert first is not None
    det.install(dataclasses.replace(fb, ucl=first * 0.6))  # a quiet refit narrowed it
    t = WARMUP
    for w in workloads(rng, det.rule_spec.novelty_refit, 150, 200):
        det.observe(t, noisy(rng, w), w)
        t += 1
    assert det.refit_due
    det.install(dataclasses.replace(fb, ucl=first * 0.8))  # the regime's refit
    det.install(dataclasses.replace(fb, ucl=first * 0.9))  # and its settling refit
    assert det.ucl == pytest.approx(first * 0.6)
    det.install(dataclasses.replace(fb, ucl=first * 0.9))  # a later, ordinary refit
    assert det.ucl == pytest.approx(first * 0.9)


def test_a_new_regime_is_learnt_even_while_an_alert_fires() -> None:
    """Novel iterations the extrapolation does not explain (1.6x: over the limit, under
    the ceiling) leave a firing state as it is: without a refit while firing, an alert
    that fired just before the load grew would stay firing for good."""
    det, rng = warmed("prism")
    t = WARMUP
    for w in workloads(rng, 30):
        det.observe(t, noisy(rng, w, 1.6), w)
        t += 1
    assert det.firing and not det.refit_due
    for w in workloads(rng, RULES["prism"].novelty_refit, 150, 200):
        v = det.observe(t, noisy(rng, w, 1.6), w)
        t += 1
        assert v is not None and v.novel is not None and v.firing
    assert det.refit_due
    det.refit_now()
    after = [det.observe(t + k, noisy(rng, w), w) for k, w in
             enumerate(workloads(rng, 40, 150, 200))]
    assert any(v is not None and v.transition == "resolved" for v in after)


def test_novel_iterations_the_extrapolation_explains_end_an_alert() -> None:
    """An alert fires; then the load grows past the trained range and its steps run as
    the law says: a few of them in a row end the alert before any refit (the
    fault that grew the batch is over), and the next judged slow step does not re-fire
    from the fault's errors still in the smoothing window."""
    det, rng = warmed("prism")
    t = WARMUP
    for w in workloads(rng, 30):
        det.observe(t, noisy(rng, w, 1.6), w)
        t += 1
    assert det.firing
    novel = []
    for w in workloads(rng, 10, 150, 200):
        novel.append(det.observe(t, noisy(rng, w), w))
        t += 1
    assert all(v is not None and v.novel is not None for v in novel)
    ends = [k for k, v in enumerate(novel) if v is not None and v.transition == "resolved"]
    assert len(ends) == 1 and ends[0] < det.rule_spec.resolve_after
    assert not det.firing and not det.refit_due
    w = workloads(rng, 1)[0]
    v = det.observe(t, noisy(rng, w), w)
    assert v is not None and v.novel is None and not v.firing


def test_block_calibration_keeps_bursts_of_noise_in_the_limit() -> None:
    """Runs of slow iterations (a noisy VM's bursts) must be in the UCL's errors as runs.

    Drawing calibration rows at random spreads each burst over many windows and the
    smoothed limit lands below the burst level (every burst would alarm); out-of-fold
    errors over runs of iterations keep the burst level, and every row is used.
    """
    rng = np.random.default_rng(7)
    ws = workloads(rng, 1000)
    y = np.array([noisy(rng, w) for w in ws])
    for start in range(50, 1000, 100):
        y[start:start + 8] *= 1.12  # 8 iterations 12 % slow every 100
    x = np.array([features(w) for w in ws])
    burst_error = 1 - 1 / 1.12
    bare = dataclasses.replace(RULES["prism"], ucl_scale=1.0, ucl_floor=0.0)
    blocks = fit_baseline(x, y, dataclasses.replace(bare, calibration="blocks"),
                          n_estimators=100)
    # the alternative (not adopted): a model fitted on 80 % of the rows drawn at random,
    # calibrated on the other 20 % in arrival order
    order = np.random.default_rng(0).permutation(1000)
    held, fitted = np.sort(order[:200]), order[200:]
    model = BaselineModel("log", n_estimators=100, form="robust",
                          min_samples_leaf=bare.min_samples_leaf).fit(x[fitted], y[fitted])
    random_rows_ucl, _, _ = compute_ucl(relative_errors(y[held], model.predict(x[held])), bare)
    assert blocks.n_calibration == 1000
    assert random_rows_ucl < burst_error < blocks.ucl


def test_a_one_off_start_up_burst_does_not_set_the_limit_but_a_recurring_one_does() -> None:
    """The server's first iterations ran 35 % slow in one tmux demo of five: that one
    episode put the limit at 0.45 and hid the fault. A level reached once and far above
    everything else is left out; one reached in two separate stretches is kept."""
    rng = np.random.default_rng(3)
    ws = workloads(rng, 1000)
    clean = np.array([noisy(rng, w) for w in ws])
    x = np.array([features(w) for w in ws])
    rule = dataclasses.replace(RULES["prism"], event_factor=None)
    once = clean.copy()
    once[:25] *= 1.35  # start-up
    twice = once.copy()
    twice[600:625] *= 1.35  # the same again later: part of this host's normal
    burst_error = 1 - 1 / 1.35

    def limit(y: np.ndarray, r: DetectorRule = rule) -> float:
        return fit_baseline(x, y, r, n_estimators=100).ucl

    once_limit = limit(once)  # a fit (seeded): once for both checks
    assert once_limit == pytest.approx(limit(clean), rel=0.25)
    assert once_limit < burst_error
    assert limit(twice) > burst_error
    # before: every episode set the limit
    assert limit(once, dataclasses.replace(rule, ucl_skip_episodes=0)) > burst_error
    # the default leaves every stretch the workload does not explain (at most 5 % of the
    # rows) out of the calibration: neither sets the limit; live, both would fire
    assert limit(twice, RULES["prism"]) < burst_error


def test_iterations_of_the_settling_period_are_not_trained_on() -> None:
    rng = np.random.default_rng(4)
    det = Detector(rule="prism", warmup=WARMUP, settle_ns=2_000_000_000)
    ws = workloads(rng, WARMUP + 200)
    for k, w in enumerate(ws):  # one iteration every 10 ms: the first 200 settle
        assert det.observe(1_000_000_000 + k * 10_000_000, noisy(rng, w, 3.0 if k < 200
                                                                 else 1.0), w) is None
    assert det.skipped == {"settling": 200}
    assert det.fitted
    assert det.ucl is not None and det.ucl < 0.3  # the slow start is not in the limit


def test_live_smoothing_is_the_calibrations_moving_mean() -> None:
    rule = dataclasses.replace(RULES["prism"], window=5, smoothing="mean")
    assert smooth_errors([0, 0, 1, 1, 1], rule).tolist() == [0, 0, 1 / 3, 0.5, 0.6]
    det, rng = warmed(rule)
    verdicts = [det.observe(WARMUP + k, noisy(rng, w, 1.15 if k % 10 in (5, 6) else 1.0), w)
                for k, w in enumerate(workloads(rng, 40))]
    assert all(v is not None and not v.firing for v in verdicts)  # no resolve trims it
    live = [v.smoothed for v in verdicts if v is not None]
    errors = [v.error for v in verdicts if v is not None]
    assert live == pytest.approx(smooth_errors(errors, rule).tolist())


def test_the_paper_rule_judges_every_workload() -> None:
    rng = np.random.default_rng(4)
    det = Detector(rule="paper", warmup=WARMUP)
    for k, w in enumerate(workloads(rng, WARMUP, 1, 16)):
        det.observe(k, noisy(rng, w), w)
    verdicts = [det.observe(WARMUP + k, noisy(rng, w), w)
                for k, w in enumerate(workloads(rng, 100, 24, 32))]
    assert all(v is not None and v.novel is None for v in verdicts)
    assert any(v is not None and v.firing for v in verdicts)  # the reference's blind spot


def test_warmup_without_auto_fit_waits_for_install() -> None:
    rng = np.random.default_rng(2)
    det = Detector(warmup=50, auto_fit=False, n_estimators=20)
    ws = workloads(rng, 60)
    for k, w in enumerate(ws):
        assert det.observe(k, noisy(rng, w), w) is None
    assert det.needs_fit and not det.fitted
    x, y = det.training_data()
    assert x.shape == (60, 5) and y.shape == (60,)
    det.install(fit_baseline(x, y, "paper", n_estimators=20))
    assert not det.needs_fit
    assert det.training_data()[0].shape[0] == 0
    v = det.observe(61, noisy(rng, ws[0]), ws[0])
    assert isinstance(v, Verdict) and v.predicted_ms > 0


def test_drift_guard_keeps_alerting_iterations_out_of_refit_data() -> None:
    det, rng = warmed("prism", refit_every=100, recent_capacity=10_000)
    t = WARMUP
    for w in workloads(rng, 150):
        det.observe(t, noisy(rng, w), w)
        t += 1
    n_before = len(det.recent_training_data()[1])
    assert n_before >= 140
    slow_lat: list[float] = []
    for w in workloads(rng, 50):
        y = noisy(rng, w, 1.5)
        slow_lat.append(y)
        v = det.observe(t, y, w)
        t += 1
    assert v is not None and v.firing
    assert not det.refit_due  # never while firing
    x, y_recent = det.recent_training_data()
    assert len(y_recent) <= n_before  # nothing added; the lead-in was removed
    assert not set(np.round(y_recent, 9)) & set(np.round(slow_lat, 9))
    for w in workloads(rng, 60):
        det.observe(t, noisy(rng, w), w)
        t += 1
    assert not det.firing
    assert not det.refit_due  # fewer than `warmup` recent iterations yet
    for w in workloads(rng, WARMUP):
        det.observe(t, noisy(rng, w), w)
        t += 1
    assert det.refit_due
    x, y_recent = det.recent_training_data()
    assert len(y_recent) >= WARMUP
    det.install(fit_baseline(x, y_recent, det.rule_spec, n_estimators=50))
    assert not det.refit_due
    assert det.baseline is not None and det.baseline.n_calibration > 0
    fb = det.refit_now()
    assert det.baseline is fb


def test_a_refit_never_widens_the_warm_up_limit_but_may_narrow_it() -> None:
    # the rule's floor (0.1) is above this quiet law's limits: the mechanism below it,
    # with trees that fit this smooth law down to its noise (leaves of one row)
    det, rng = warmed(dataclasses.replace(RULES["prism"], ucl_floor=0.0,
                                          min_samples_leaf=1))
    first = det.ucl
    assert first is not None

    def refit_on(noise: float) -> float:
        ws = workloads(rng, WARMUP)
        x = np.asarray([features(w) for w in ws])
        y = np.asarray([law(w) * float(1 + abs(rng.normal(0, noise))) for w in ws])
        fb = fit_baseline(x, y, det.rule_spec, n_estimators=50)
        det.install(fb)
        return fb.ucl

    # recent data with a mild slowdown mixed in (a fault too small to fire): its own
    # limit is wider, and would hide the next fault of that size
    assert refit_on(0.3) > first
    assert det.ucl == first
    assert refit_on(0.002) < first  # quieter recent data: the tighter limit is taken
    assert det.ucl is not None and det.ucl < first
    # the reference rule recalibrates freely
    ref, rng = warmed("paper")
    assert ref.rule_spec.refit_ucl_growth is None


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=-(2**63), max_value=2**63 - 1),
            st.floats(allow_nan=True, allow_infinity=True),
            st.floats(allow_nan=True, allow_infinity=True),
            st.floats(allow_nan=True, allow_infinity=True),
            st.floats(allow_nan=True, allow_infinity=True),
        ),
        max_size=40,
    )
)
def test_detector_never_raises(rows: list[tuple[int, float, float, float, float]]) -> None:
    det = Detector(warmup=5, n_estimators=5)
    good = 0
    for t, lat, b, i, o in rows:
        v = det.observe(t, lat, Workload(b, i, o))
        assert v is None or math.isfinite(v.smoothed)
        if math.isfinite(lat) and lat > 0:
            good += 1
    n_skipped = sum(det.skipped.values())
    assert n_skipped <= len(rows)
    bad_lat = sum(1 for r in rows if math.isfinite(r[1]) and r[1] <= 0)
    assert det.skipped.get("nonpositive_latency", 0) == bad_lat


def test_nonpositive_latency_is_skipped_and_counted() -> None:
    det = Detector(warmup=5)
    w = Workload(1, 10, 1)
    assert det.observe(0, 0.0, w) is None
    assert det.observe(1, -3.0, w) is None
    assert det.observe(2, float("nan"), w) is None
    assert det.observe(3, 5.0, Workload(0, 10, 1)) is None
    assert det.skipped == {"nonpositive_latency": 2, "bad_latency": 1, "invalid_workload": 1}


def test_unknown_rule_and_bad_params() -> None:
    with pytest.raises(ValueError, match="unknown detector rule"):
        Detector(rule="nope")
    with pytest.raises(ValueError, match="hysteresis"):
        Detector(hysteresis=0)
    assert set(RULES) >= {"paper", "prism"}


# --------------------------------------------------------------------------- SLO rule


def test_slo_parse() -> None:
    r = SloRule.parse("decode p99 <= 60ms over 10s")
    assert (r.phase, r.stat, r.threshold_ms, r.window_s, r.strict) == (
        "decode",
        "p99",
        60.0,
        10.0,
        False,
    )
    r = SloRule.parse("p99.9 < 1.5s over 2m")
    assert (r.phase, r.stat, r.threshold_ms, r.window_s, r.strict) == (
        None,
        "p99.9",
        1500.0,
        120.0,
        True,
    )
    assert SloRule.parse("mean <= 500us over 500ms").threshold_ms == pytest.approx(0.5)
    d = SloRule.parse({"phase": "decode", "quantile": 0.95, "threshold_ms": 40, "window_s": 5})
    assert (d.stat, d.threshold_ms, d.window_s) == ("p95", 40.0, 5.0)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("decode p99 60ms", "cannot parse SLO"),
        ("decode p99 <= 60 over 10s", "cannot parse SLO"),
        ("decode p100 <= 60ms over 10s", "pNN, mean or max"),
        ("decode p99 <= 0ms over 10s", "threshold must be > 0"),
        ("decode p99 <= 60ms over 0s", "window must be > 0"),
        ({"stat": "p99", "window_s": 10}, "needs 'threshold_ms'"),
        ({"stat": "p99", "threshold_ms": "60", "window_s": 10}, "must be a number"),
        ({"quantile": 1.5, "threshold_ms": 60, "window_s": 10}, "quantile must be in"),
        ({"stat": "p99", "threshold_ms": 60, "window_s": 10, "typo": 1}, "unknown SLO keys"),
        (42, "string or a mapping"),
    ],
)
def test_slo_parse_errors_are_clear(spec: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SloRule.parse(spec)  # type: ignore[arg-type]


def test_slo_fires_and_resolves_with_injected_clock() -> None:
    rule = SloRule.parse("decode p99 <= 60ms over 10s")
    s = 1_000_000_000
    transitions = []
    # 100 ms cadence: 20 s good, 5 s bad, then good again
    for k in range(600):
        t = k * s // 10
        lat = 80.0 if 200 <= k < 250 else 30.0
        tr = rule.observe(t, lat)
        if tr:
            transitions.append((k, tr))
    # nearest-rank p99 of ~100 samples is the 2nd largest: two bad samples are needed
    assert transitions[0] == (201, "firing")
    # ... and it holds again once only one bad sample (k=249) is left in the window
    assert transitions[1] == (348, "resolved")
    assert len(transitions) == 2
    assert rule.observe(600 * s // 10, float("nan")) is None


def test_slo_min_samples() -> None:
    rule = SloRule(stat="max", threshold_ms=10, window_s=1, min_samples=3)
    assert rule.observe(0, 50) is None
    assert rule.observe(1, 50) is None
    assert rule.observe(2, 50) == "firing"


# ------------------------------------------------------------------------------- RCA


def _shares(rng: np.random.Generator, n: int, gemm: float) -> list[dict[str, float]]:
    rows = []
    for _ in range(n):
        raw = {
            "gemm@gpu0": gemm * float(rng.uniform(0.95, 1.05)),
            "allreduce@gpu0": 0.2 * float(rng.uniform(0.95, 1.05)),
            "host@cpu": 0.2 * float(rng.uniform(0.95, 1.05)),
            "sampling@cpu": 0.1 * float(rng.uniform(0.95, 1.05)),
        }
        tot = sum(raw.values())
        rows.append({k: v / tot for k, v in raw.items()})
    return rows


def test_rca_ranks_the_stage_whose_share_doubled() -> None:
    rng = np.random.default_rng(3)
    base = _shares(rng, 200, 0.5)
    anom = _shares(rng, 50, 1.0)  # gemm time doubles
    got = rank_suspects(base, anom, top=3)
    assert got[0].stage == "gemm" and got[0].device == "gpu0" and got[0].metric is None
    assert got[0].delta_share > 0
    assert len(got) == 3
    assert rank_suspects(base, anom, top=3) == got  # deterministic


def test_rca_a_stage_that_held_almost_nothing_does_not_outrank_the_one_that_took_the_time(
        ) -> None:
    """A throttled process (shares from a simulator recording): its copies, 0.1 % of the
    step with almost no spread, grow to 10 %; its run-queue wait grows from 3 % to 70 %.
    With the share's spread floored at 1 % of its mean only, the copies read as hundreds
    of standard deviations and led; floored at 1 % of the iteration too, the wait leads."""
    rng = np.random.default_rng(5)

    def rows(n: int, copy: float, wait: float, spread: float) -> list[dict[str, float]]:
        out = []
        for _ in range(n):
            c = max(0.0, float(rng.normal(copy, copy * 0.2)))
            w = min(0.95, max(0.0, float(rng.normal(wait, spread))))
            out.append({"memcpy": c, "runqueue": w, "device_sync": 0.68 * (1 - c - w),
                        "host": 0.32 * (1 - c - w)})
        return out

    got = rank_suspects(rows(300, 0.001, 0.03, 0.03), rows(60, 0.10, 0.70, 0.1), top=2)
    assert [s.stage for s in got] == ["runqueue", "memcpy"], got


def test_rca_related_metric_raises_the_score() -> None:
    rng = np.random.default_rng(4)
    base = _shares(rng, 200, 0.5)
    anom = _shares(rng, 50, 1.0)
    ub = [
        {"sm_clock_mhz@gpu0": float(rng.normal(1400, 10)), "cpu_util@cpu": float(rng.normal(50, 2))}
        for _ in range(200)
    ]
    ua = [
        {"sm_clock_mhz@gpu0": float(rng.normal(700, 10)), "cpu_util@cpu": float(rng.normal(50, 2))}
        for _ in range(50)
    ]
    plain = rank_suspects(base, anom, top=0)
    with_mu = rank_suspects(base, anom, ub, ua, top=0)
    g0 = next(s for s in plain if s.stage == "gemm")
    g1 = next(s for s in with_mu if s.stage == "gemm")
    assert g1.metric == "sm_clock_mhz@gpu0"
    assert g1.score > g0.score
    assert with_mu[0].stage == "gemm"
    # host stage on the cpu device is not related to the gpu clock
    h = next(s for s in with_mu if s.stage == "host")
    assert h.metric != "sm_clock_mhz@gpu0"
    # explicit relations
    rel = rank_suspects(base, anom, ub, ua, related={"gemm": ["cpu_util@cpu"]}, top=0)
    assert next(s for s in rel if s.stage == "gemm").metric in (None, "cpu_util@cpu")


_share_rows = st.lists(st.dictionaries(
    st.sampled_from(["host", "gemm@gpu0", "sync@gpu0", "nccl"]),
    st.one_of(st.floats(0, 1), st.just(float("nan")), st.just(float("inf"))),
    max_size=4), max_size=30)


@settings(max_examples=200, deadline=None)
@given(_share_rows, _share_rows)
def test_rca_against_a_summary_ranks_exactly_as_against_the_rows(
        base: list[dict[str, float]], anom: list[dict[str, float]]) -> None:
    # the engine summarises its baseline ahead of the alert: same suspects, same scores
    assert rank_suspects(summarize(base), anom, top=0) == rank_suspects(base, anom, top=0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["a", "b", "c"]), st.one_of(
    st.floats(0, 1), st.integers(0, 3), st.booleans(), st.just(float("nan")),
    st.just(float("inf")), st.just(-float("inf"))), max_size=3), max_size=30))
def test_rca_summary_checks_each_value_only_where_the_sum_says_so(
        rows: list[dict[str, float]]) -> None:
    # the fast path (all floats, finite sum) and the value-by-value path agree
    want = {k: (_mean_std(c) if (c := _column(rows, k, 0.0)) else None)
            for k in sorted({k for r in rows for k in r})}
    assert dict(summarize(rows).stats) == want


def test_rca_edge_cases() -> None:
    assert rank_suspects([], [{"a": 1.0}]) == []
    same = [{"a": 0.5, "b": 0.5}] * 5
    assert rank_suspects(same, same) == []
    # zero-spread baseline does not divide by zero
    got = rank_suspects(same, [{"a": 0.9, "b": 0.1}] * 5, top=1)
    assert got[0].stage == "a" and math.isfinite(got[0].score)




@pytest.mark.parametrize(("gap_ms", "fitted_at"), [
    (10.0, 201),  # 2 s spanned by the 201st iteration: the time bound comes first
    (1.0, 1000),  # 1,000 iterations in 1 s: the count comes first
    (100.0, 200),  # 2 s after 21 iterations, too few: the minimum of 200 binds
])
def test_warm_up_ends_on_iterations_or_seconds_whichever_first(gap_ms: float,
                                                                fitted_at: int) -> None:
    rng = np.random.default_rng(11)
    det = Detector(rule="prism", warmup=1000, warmup_s=2.0)
    fitted = None
    for k, w in enumerate(workloads(rng, 1000), start=1):
        det.observe(int(k * gap_ms * 1e6), noisy(rng, w), w)
        if det.fitted:
            fitted = k
            break
    assert fitted == fitted_at
    with pytest.raises(ValueError, match="warmup_s"):
        Detector(warmup_s=-1.0)


def test_the_smoothed_error_is_the_median_of_the_window_live_and_in_calibration() -> None:
    """``prism`` smooths by the median of W errors: the live value and the calibration's
    (``smooth_errors``) are the same numbers, a lone large error moves it by nothing,
    and the paper's mean is computed alike."""
    rule = RULES["prism"]
    assert (rule.smoothing, rule.window) == ("median", 9)
    three = dataclasses.replace(rule, window=3)
    assert smooth_errors([0, 0.9, 0, 0.2, 0.3], three).tolist() == pytest.approx(
        [0, 0.45, 0, 0.2, 0.2])
    mean = dataclasses.replace(rule, window=3, smoothing="mean")
    assert smooth_errors([0, 0.9, 0, 0.2, 0.3], mean).tolist() == pytest.approx(
        [0, 0.45, 0.3, 1.1 / 3, 0.5 / 3])
    for r in (rule, dataclasses.replace(rule, smoothing="mean")):
        det, rng = warmed(r)
        verdicts = [det.observe(WARMUP + k, noisy(rng, w, 1.6 if k % 9 == 4 else 1.0), w)
                    for k, w in enumerate(workloads(rng, 60))]
        assert all(v is not None and not v.firing for v in verdicts)
        live = [v.smoothed for v in verdicts if v is not None]
        errors = [v.error for v in verdicts if v is not None]
        assert live == pytest.approx(smooth_errors(errors, r).tolist())


def test_the_limit_is_set_by_full_windows_only() -> None:
    """Live, the smoothed error is compared with the limit once W errors are in; the
    calibration leaves out the first W - 1 smoothed values too. A run's first four
    iterations 3x slower than the rest's noise (a process starting up) do not raise it."""
    rule = dataclasses.replace(RULES["prism"], ucl_skip_episodes=0)
    rng = np.random.default_rng(3)
    errors = [0.3] * 4 + rng.uniform(0, 0.1, 400).tolist()
    ucl, _, _ = compute_ucl(errors, rule)
    # every full window holds at most four 0.3s among nine: its median is noise (<= 0.1)
    assert ucl <= rule.ucl_scale * 0.1 + 1e-9
    assert compute_ucl(errors[4:], rule)[0] == pytest.approx(ucl, rel=0.1)


def test_lone_stalls_do_not_fire_but_a_sustained_twenty_percent_slowdown_does() -> None:
    """The paper's vLLM decode steps include prefill stalls 5x slower than the workload
    explains, a few in every window in its busiest jobs: four unexplained iterations
    in nine do not fire; a 1.2x slowdown of every iteration fires by its fifth."""
    det, _ = warmed("prism", seed=5)
    ucl = det.ucl
    assert ucl is not None and ucl < 1 - 1 / 1.2
    stall = 1 - 1 / 5.0
    errors = [0.0] * 9 + ([stall, 0.0, stall, 0.0, 0.0, stall, 0.0, stall, 0.0] * 5) + [0.0] * 9
    verdicts = [det.observe_predicted(WARMUP + k, 10.0 / (1 - e), 10.0)
                for k, e in enumerate(errors)]
    assert not any(v is not None and v.firing for v in verdicts)
    slow = [det.observe_predicted(WARMUP + 100 + k, 12.0, 10.0) for k in range(10)]
    fired = [k for k, v in enumerate(slow) if v is not None and v.transition == "firing"]
    assert fired == [RULES["prism"].window // 2]


def test_warm_up_stalls_the_workload_does_not_explain_do_not_set_the_limit() -> None:
    """Runs of steps 5x slower than the law (3 % of the warm-up, as the paper's prefill
    stalls are 2-3 % of its vLLM rows) put a limit calibrated on every row at the cap,
    blind to any slowdown below 2x; leaving the warm-up's events out of the calibration
    gives a limit below a 1.2x slowdown's error (0.167)."""
    x, y, _ = law_data(11, 1000)
    for start in range(40, 1000, 200):
        y[start:start + 6] *= 5.0  # 30 stalled rows in runs of 6
    with_events = fit_baseline(x, y, dataclasses.replace(RULES["prism"], event_factor=None),
                               n_estimators=100)
    without = fit_baseline(x, y, "prism", n_estimators=100)
    assert with_events.ucl == RULES["prism"].ucl_cap
    assert RULES["prism"].ucl_floor <= without.ucl < 1 - 1 / 1.2
