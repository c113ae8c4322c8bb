"""bench/baseline_model.py end to end: the real script, as a subprocess, on a data slice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from prism_tui.engine.detector import RULES, BaselineModel, feature_matrix

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "baseline_model.py"
DATA = ROOT.parent / "shared" / "datasets" / "latencyprism"

needs_data = pytest.mark.skipif(
    not (DATA / "normal_vllm.csv").is_file(),
    reason=f"paper dataset not found at {DATA} (../shared/datasets/latencyprism)",
)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the bench script with the project's interpreter; never raises on failure."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


@needs_data
@pytest.mark.parametrize("split", ["random", "jobs"])
def test_json_has_sane_accuracy_on_a_slice(split: str) -> None:
    res = run("--data", str(DATA), "--split", split, "--seed", "1", "--limit", "3000", "--json")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert {"mape", "within10", "mape_all_rows", "n_train", "n_test", "split"} <= set(out)
    assert out["split"] == split and out["model"] == "prism"
    assert 0 < out["mape"] < 1
    assert 0 < out["within10"] <= 1
    assert out["mape_all_rows"] >= out["mape"]  # all rows include the sub-ms steps
    assert out["n_train"] + out["n_test"] == 3000
    if split == "random":
        assert out["n_test"] == 600
        # a model that learnt nothing would be far off: the slice spans 29 ms .. 50 ms
        assert out["mape"] < 0.10 and out["within10"] > 0.8


@needs_data
def test_compare_adds_the_papers_method_on_the_same_split() -> None:
    res = run("--data", str(DATA), "--limit", "2000", "--json", "--compare")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert 0 < out["paper_mape"] < 1 and 0 < out["paper_within10"] <= 1
    assert out["paper_mape"] != out["mape"]


@needs_data
def test_table_mode_prints_both_models() -> None:
    res = run("--data", str(DATA), "--limit", "1500", "--split", "random")
    assert res.returncode == 0, res.stderr
    assert "paper: GBDT on latency" in res.stdout
    assert "prism: physical shape + median GBDT on log-latency" in res.stdout
    assert "gbdt-log: GBDT on log-latency" in res.stdout
    assert "7.09 %" in res.stdout


def test_missing_data_is_one_clear_line(tmp_path: Path) -> None:
    res = run("--data", str(tmp_path / "absent"), "--json")
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no data at" in lines[0], res.stderr


def _law_data(
    rng: np.random.Generator, n: int, b_lo: int, b_hi: int, stalls: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Decode steps following ``5 + 0.3·B + 0.002·B·kv`` ms, 2 % noise, some 5x stalls."""
    b = rng.integers(b_lo, b_hi + 1, n).astype(np.float64)
    i = rng.uniform(100, 1500, n)
    o = rng.uniform(1, 800, n)
    y = (5.0 + 0.3 * b + 0.002 * b * (i + o)) * (1 + rng.normal(0, 0.02, n))
    y[rng.random(n) < stalls] *= 5.0
    return feature_matrix(b, i, o), y


def test_robust_form_extrapolates_and_ignores_stalls() -> None:
    """The prism rule's form's two claims, on a known law: unseen bigger batches, rare
    stalls; its per-iteration prediction gives the batch prediction's numbers."""
    rng = np.random.default_rng(3)
    x, y = _law_data(rng, 3000, 1, 32, stalls=0.03)
    xt, yt = _law_data(rng, 1000, 48, 64, stalls=0.0)
    err = {}
    for form in ("gbdt", "robust"):
        m = BaselineModel("log", form=form).fit(x, y)
        err[form] = float(np.mean(np.abs(m.predict(xt) - yt) / yt))
    assert err["robust"] < 0.05, err
    assert err["robust"] < err["gbdt"] / 2, err
    assert BaselineModel("log").form == "gbdt"  # the model's own default is the paper's
    assert RULES["prism"].form == "robust"
    m = BaselineModel("log", form="robust").fit(x, y)
    assert [m.predict_one(row) for row in xt[:50].tolist()] == pytest.approx(
        m.predict(xt[:50]).tolist(), rel=1e-9)
