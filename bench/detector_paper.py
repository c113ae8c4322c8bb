"""Reproduce the LatencyPrism paper's model and detection numbers on its own data.

Data: ``../shared/datasets/latencyprism/`` from the repository root (not in the repo).

1. Model accuracy on ``normal_vllm.csv``: seeded random 80/20 split, test MAPE and the
   share of predictions within 10 %, next to the paper's 7.09 % / 95.7 %.
2. Detection: models fitted once on the 80 % training split and reused by every trial
   (the training set is the same for all trials). Each trial streams 1,000 held-out
   normal iterations followed by 200 abnormal ones; 20 Monte Carlo trials; pooled
   per-iteration precision / recall / F1 / FPR and detection lag (iterations from the
   first abnormal iteration to the first alert). Scenarios:

   * ``sglang``: the artifact's 300 SGLang decode iterations under a fault (200
     consecutive ones from a random offset). They come from a different engine and model
     (SGLang / Qwen3-32B vs vLLM / Llama-70B), about 4x slower than the vLLM model
     predicts for the same workload, so detection is trivial there.
   * ``x1.1``, ``x1.2``, ``x1.5``: 200 *other* held-out normal vLLM iterations with their
     latency scaled by that factor (same workload, slower): the harder, honest test.

   Development (the ``prism`` rule's smoothing, event filter and window were chosen on
   these): ``--seed 0`` and ``--seed 1``. Held out (never used to choose anything):
   ``--seed 2`` and ``--seed 3``. The seed draws the 80/20 split and the trials
   (trial ``k`` of seed ``s`` uses ``default_rng(1000 · (s + 1) + k)``).

    .venv/bin/python bench/detector_paper.py [--seed 2] [--explore] [--trials 20] [--no-curve]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from detector_variants import (  # noqa: E402
    PRISM_GBDT_FAST_FIRE,
    PRISM_GBDT_FAST_FIRE_POLICY,
)

from prism_tui.engine.detector import (  # noqa: E402
    RULES,
    BaselineModel,
    Detector,
    DetectorRule,
    FirePolicy,
    FittedBaseline,
    compute_ucl,
    feature_matrix,
    fit_and_calibrate,
)

DATA = ROOT.parent / "shared" / "datasets" / "latencyprism"
PAPER = {"precision": 0.971, "recall": 0.999, "f1": 0.985, "fpr": 0.0059}
N_NORMAL, N_ABNORMAL = 1000, 200


def load_normal() -> tuple[np.ndarray, np.ndarray]:
    with open(DATA / "normal_vllm.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    x = feature_matrix(
        [float(r["batch_size"]) for r in rows],
        [float(r["avg_input_length"]) for r in rows],
        [float(r["avg_output_length"]) for r in rows],
    )
    y = np.asarray([float(r["duration_us"]) / 1000.0 for r in rows])
    return x, y


def load_sglang() -> tuple[np.ndarray, np.ndarray]:
    with open(DATA / "abnormal_sglang.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["compute_forward_mode"] == "2"]
    x = feature_matrix(
        [float(r["compute_batch_size"]) for r in rows],
        [float(r["compute_avg_input_length"]) for r in rows],
        [float(r["compute_avg_output_length"]) for r in rows],
    )
    y = np.asarray([float(r["duration_us"]) / 1000.0 for r in rows])
    return x, y


def accuracy(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    ape = np.abs(y - p) / y
    return float(ape.mean()), float((ape <= 0.10).mean())


@dataclass
class Fit:
    model: BaselineModel
    cal_errors: np.ndarray
    n_train: int
    seconds: float


def fit_model(x: np.ndarray, y: np.ndarray, rule: DetectorRule, seed: int) -> Fit:
    """The rule's model and calibration errors, exactly as the detector computes them."""
    t0 = time.perf_counter()
    model, errs, n, _ = fit_and_calibrate(x, y, rule, seed=seed)
    return Fit(model, errs, n, time.perf_counter() - t0)


@dataclass
class Score:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    lags: list[int] | None = None
    missed: int = 0

    def row(self) -> dict[str, float]:
        p = self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0
        r = self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        fpr = self.fp / (self.fp + self.tn) if self.fp + self.tn else 0.0
        lag = float(np.mean(self.lags)) if self.lags else float("nan")
        return {
            "precision": p,
            "recall": r,
            "f1": f1,
            "fpr": fpr,
            "lag": lag,
            "missed": float(self.missed),
        }


def run_stream(
    fb: FittedBaseline, obs: np.ndarray, pred: np.ndarray, hysteresis: bool, score: Score,
    fire: Callable[[DetectorRule], FirePolicy] = FirePolicy,
) -> None:
    det = Detector(
        rule=fb.rule,
        warmup=2,
        hysteresis=0.8 if hysteresis else 1.0,
        resolve_after=10 if hysteresis else 1,
        fire_policy=fire,
    )
    det.install(fb)
    first: int | None = None
    for i, (yo, yp) in enumerate(zip(obs.tolist(), pred.tolist(), strict=True)):
        v = det.observe_predicted(i, yo, yp)
        firing = bool(v is not None and v.firing)
        abnormal = i >= N_NORMAL
        if abnormal:
            if firing:
                score.tp += 1
                if first is None:
                    first = i - N_NORMAL
            else:
                score.fn += 1
        elif firing:
            score.fp += 1
        else:
            score.tn += 1
    assert score.lags is not None
    if first is None:
        score.missed += 1
    else:
        score.lags.append(first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--explore", action="store_true", help="also score rule variants")
    ap.add_argument("--no-curve", action="store_true", help="skip the learning curve")
    args = ap.parse_args()
    t_start = time.perf_counter()

    x, y = load_normal()
    xs, ys = load_sglang()
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(y))
    n_train = round(len(y) * 0.8)
    tr, te = np.sort(order[:n_train]), np.sort(order[n_train:])
    print(
        f"normal_vllm: {len(y)} rows, train {len(tr)}, test {len(te)}; "
        f"sglang decode rows: {len(ys)}\n"
    )

    # ---- fits (cached by model form)
    rules: dict[str, DetectorRule] = {
        "paper": RULES["paper"],
        "prism": RULES["prism"],
        "prism-gbdt-fast-fire": PRISM_GBDT_FAST_FIRE,
    }
    fires = {"prism-gbdt-fast-fire": PRISM_GBDT_FAST_FIRE_POLICY}
    if args.explore:
        rules.update(
            {
                "paper+log": replace(RULES["paper"], name="paper+log", target="log"),
                "log+holdout 3σ": replace(
                    RULES["prism"], name="log+holdout 3σ", ucl_method="sigma"
                ),
                "lin+holdout sq0.995": replace(
                    RULES["prism"], name="lin+holdout sq0.995", target="linear"
                ),
                "log+holdout sq0.99": replace(
                    RULES["prism"], name="log+holdout sq0.99", quantile=0.99
                ),
                "log+holdout sq0.999": replace(
                    RULES["prism"], name="log+holdout sq0.999", quantile=0.999
                ),
            }
        )
    fits: dict[tuple[str, str, int, str], Fit] = {}
    for r in rules.values():
        key = (r.target, r.calibration, r.window, r.form)
        if key not in fits:
            fits[key] = fit_model(x[tr], y[tr], r, seed=args.seed)

    # ---- 1. accuracy
    print("## 1. Model accuracy (normal_vllm.csv, random 80/20 split)\n")
    print("| model | trained on | test MAPE | test within 10 % | fit s |")
    print("|---|---:|---:|---:|---:|")
    print("| paper's figure (vllm_curve.csv) | 29943 | 7.09 % | 95.7 % | |")
    for (target, calib, window, form), f in fits.items():
        mape, w10 = accuracy(y[te], f.model.predict(x[te]))
        print(
            f"| {form} {target} ({calib}, W {window}) | {f.n_train} | {mape * 100:.2f} % | "
            f"{w10 * 100:.1f} % | {f.seconds:.1f} |"
        )
    if not args.no_curve:
        print("\nLearning curve (GBDT linear, paper's form, same test set):\n")
        print("| train rows | test MAPE | within 10 % |")
        print("|---:|---:|---:|")
        for n in (1000, 5000, 15000):
            sub = tr[np.random.default_rng(args.seed + n).permutation(len(tr))[:n]]
            m = BaselineModel("linear", random_state=args.seed).fit(x[sub], y[sub])
            mape, w10 = accuracy(y[te], m.predict(x[te]))
            print(f"| {n} | {mape * 100:.2f} % | {w10 * 100:.1f} % |")
        fpaper = fits[("linear", "train", RULES["paper"].window, "gbdt")]
        mape, w10 = accuracy(y[te], fpaper.model.predict(x[te]))
        print(f"| {len(tr)} | {mape * 100:.2f} % | {w10 * 100:.1f} % |")

    # ---- 2. detection
    print(
        "\n## 2. Detection (1,000 normal then 200 abnormal, "
        f"{args.trials} trials, pooled per-iteration)\n"
    )
    fbs: dict[str, FittedBaseline] = {}
    preds_te: dict[str, np.ndarray] = {}
    preds_sg: dict[str, np.ndarray] = {}
    for name, r in rules.items():
        f = fits[(r.target, r.calibration, r.window, r.form)]
        ucl, mean, std = compute_ucl(f.cal_errors, r)
        fbs[name] = FittedBaseline(f.model, ucl, mean, std, f.n_train, len(f.cal_errors), r)
        preds_te[name] = f.model.predict(x[te])
        preds_sg[name] = f.model.predict(xs)
    print("| rule | UCL | calibration errors mean / std |")
    print("|---|---:|---:|")
    for name, fb in fbs.items():
        print(f"| {name} | {fb.ucl:.4f} | {fb.error_mean:.4f} / {fb.error_std:.4f} |")
    sg_ratio = ys / preds_sg["paper"]
    print(
        f"\nSGLang decode latency / paper-model prediction: median {np.median(sg_ratio):.2f}x,"
        f" min {sg_ratio.min():.2f}x, max {sg_ratio.max():.2f}x\n"
    )

    scenarios = ["sglang", "x1.1", "x1.2", "x1.5"]
    results: dict[tuple[str, str, bool], Score] = {}
    yte = y[te]
    for trial in range(args.trials):
        trng = np.random.default_rng(1000 * (args.seed + 1) + trial)
        pick = trng.permutation(len(te))
        normal = np.sort(pick[:N_NORMAL])
        other = np.sort(pick[N_NORMAL : N_NORMAL + N_ABNORMAL])
        off = int(trng.integers(0, len(ys) - N_ABNORMAL + 1))
        sg = np.arange(off, off + N_ABNORMAL)
        for sc in scenarios:
            for name in rules:
                pt = preds_te[name]
                if sc == "sglang":
                    obs = np.concatenate([yte[normal], ys[sg]])
                    pred = np.concatenate([pt[normal], preds_sg[name][sg]])
                else:
                    factor = float(sc[1:])
                    obs = np.concatenate([yte[normal], yte[other] * factor])
                    pred = np.concatenate([pt[normal], pt[other]])
                for hyst in (False, True):
                    s = results.setdefault((name, sc, hyst), Score(lags=[]))
                    run_stream(fbs[name], obs, pred, hyst, s,
                               fires.get(name, FirePolicy))

    print(
        "| rule | alerting | scenario | precision | recall | F1 | FPR | lag (iter) | "
        "missed trials |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    print(
        f"| paper's figure | threshold | their fault | {PAPER['precision']:.3f} | "
        f"{PAPER['recall']:.3f} | {PAPER['f1']:.3f} | {PAPER['fpr'] * 100:.2f} % | 0.2 | |"
    )
    for sc in scenarios:
        for name in rules:
            for hyst in (False, True):
                row = results[(name, sc, hyst)].row()
                mode = "hysteresis 0.8×10" if hyst else "threshold"
                print(
                    f"| {name} | {mode} | {sc} | {row['precision']:.3f} | {row['recall']:.3f} | "
                    f"{row['f1']:.3f} | {row['fpr'] * 100:.2f} % | {row['lag']:.1f} | "
                    f"{int(row['missed'])}/{args.trials} |"
                )
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
