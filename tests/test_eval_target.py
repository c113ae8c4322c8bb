"""``prism eval --pid ... --faults FILE``: a live process watched by real uprobes while host
faults are injected into it from outside, scored with the simulator eval's code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CTarget

ROOT = Path(__file__).resolve().parent.parent

STEP_PROFILE = """
[profile]
name = "ctarget-steps"
description = "the C target's serve loop: one step per iteration"
anchor = "step"
phase_rule = "calls.step"           # every step decodes

[[library]]
id = "exe"
soname = ["ctarget*"]

[[probe]]
id = "step"
library = "exe"
symbol = "pl_step"
stage = "host"
ret = true

[[derived]]                         # one sequence a step: the detector's batch size
name = "sequences"
expr = "calls.step"
"""

FAULTS = """
[[fault]]
type = "cpu_squeeze"
start_s = 4
duration_s = 4

[[fault]]
type = "pause"
start_s = 10
duration_s = 3
intensity = 0.6
"""


def prism_eval(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prism_tui.cli", "eval", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def pgrep(pattern: str) -> list[int]:
    """Pids whose command line contains ``pattern`` (this process excluded)."""
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if int(p) != os.getpid()]


def cgroup_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


def state_of(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_live_target_is_scored_against_the_faults_injected_into_it(
        ctarget: CTarget, tmp_path: Path) -> None:
    """The C target's serve loop (a step of 50 operations every ~2 ms, the anchor) under a
    CPU squeeze and a pause: every judged iteration that overlaps a fault window counts
    as abnormal, each window carries what it measurably did, and the document has the
    simulator eval's figures and the episode figures. Afterwards the target runs on, in
    its own cgroup, with no injector process left."""
    (tmp_path / "steps.toml").write_text(STEP_PROFILE)
    (tmp_path / "faults.toml").write_text(FAULTS)
    ctarget.cmd("serve_start 2000 50")
    home = cgroup_of(ctarget.pid)
    others = set(pgrep("prism-eval-"))  # another eval's guard, not this one's
    result = prism_eval("--pid", str(ctarget.pid), "--faults", str(tmp_path / "faults.toml"),
                        "--profile", str(tmp_path / "steps.toml"), "--warmup", "300",
                        "--warmup-s", "3", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["targets"] == [{"pid": ctarget.pid, "name": doc["targets"][0]["name"]}]
    # the timeline starts once the baseline judges, and ends 5 s after the last fault
    assert doc["duration_s"] >= doc["baseline_ready_s"] + 13 + 5 - 0.5
    assert [round(f["start_s"]) for f in doc["faults"]] == [4, 10]
    assert [f["type"] for f in doc["faults"]] == ["cpu_squeeze", "pause"]
    for fault in doc["faults"]:
        assert fault["judged"] > 0, fault  # the detector was live before every fault
        assert fault["effect"]["target"]["window_s"] > 0
    # scored: the iterations that overlap a window are the abnormal ones; a fault's own
    # figures count those that ended inside it, so each window's two edges may add one
    inside = sum(f["judged"] for f in doc["faults"])
    assert inside <= doc["abnormal"] <= inside + 2 * len(doc["faults"])
    assert doc["iterations"] > doc["abnormal"] > 0
    assert {"precision", "recall", "f1", "fpr", "tp", "fp", "fn", "tn"} <= set(doc)
    episodes = doc["episodes"]
    assert episodes["fault_episodes"] == 2
    assert {"episodes_detected", "false_episodes", "firings_per_fault_episode",
            "detection_delay_ms", "by_fault_kind"} <= set(episodes)
    assert doc["alerts_received"] == doc["alerts"]  # a real subscriber got each alert
    # nothing left behind: the target runs, in its own cgroup, with no hog beside it
    assert state_of(ctarget.pid) != "T"
    assert cgroup_of(ctarget.pid) == home
    assert ctarget.cmd("work 3") >= 0  # and still answers
    assert set(pgrep("prism-eval-")) - others == set()


@pytest.mark.parametrize("faults, said", [
    (None, "needs --faults"),
    ("nosuch.toml", "nosuch.toml"),
    ('[[fault]]\ntype = "gc_storm"\nstart_s = 1\nduration_s = 1\n', "unknown fault kind"),
    ('[[fault]]\ntype = "pause"\nstart_s = 1\n', "duration_s"),
    ('[[fault]]\ntype = "pause"\nstart_s = 1\nduration_s = 3\n'
     '[[fault]]\ntype = "cpu_squeeze"\nstart_s = 2\nduration_s = 1\n', "overlap"),
    ('[[fault]]\ntype = "pause"\nstart_s = 1\nduration_s = 1\nintensity = 3\n',
     "out of range"),
])
def test_bad_fault_timelines_are_one_line_and_exit_2(
        ctarget: CTarget, tmp_path: Path, faults: str | None, said: str) -> None:
    args = ["--pid", str(ctarget.pid)]
    if faults is not None:
        path = tmp_path / "faults.toml"
        if faults.endswith(".toml"):
            path = tmp_path / faults
        else:
            path.write_text(faults)
        args += ["--faults", str(path)]
    result = prism_eval(*args, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and said in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_faults_without_a_live_target_is_a_usage_error() -> None:
    result = prism_eval("--faults", "x.toml", timeout=60)
    assert result.returncode == 2 and "live target" in result.stderr


def test_watch_stops_after_the_settings_duration(ctarget: CTarget, tmp_path: Path) -> None:
    """``[watch] duration_s`` ends ``prism watch`` like ``--duration`` does (it was parsed
    and never read): without it this run would go on until the 60 s timeout."""
    (tmp_path / "steps.toml").write_text(STEP_PROFILE)
    (tmp_path / "prism.toml").write_text("[watch]\nduration_s = 3\n")
    ctarget.cmd("serve_start 2000 50")
    result = subprocess.run(
        [sys.executable, "-m", "prism_tui.cli", "watch", "--pid", str(ctarget.pid),
         "--profile", str(tmp_path / "steps.toml"), "--config", str(tmp_path / "prism.toml"),
         "--json", "--no-history"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["iterations"]["decode"] > 0
