"""Settings: defaults, TOML file, PRISM_* environment, overrides, and one-line errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from prism_tui.engine.episodes import EpisodeHolds
from prism_tui.settings import Settings, SettingsError, load_settings


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


def error_of(**kwargs: object) -> SettingsError:
    with pytest.raises(SettingsError) as info:
        load_settings(**kwargs)  # type: ignore[arg-type]
    err = info.value
    assert err.exit_code == 2
    assert "\n" not in str(err)
    return err


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.config/latencyprism/config.toml
    s = load_settings(env={})
    assert s == Settings()
    assert s.probe.mode == "auto" and s.probe.overhead_budget == 0.005
    assert s.probe.governor_action == "detach"
    assert s.engine.warmup_iterations == 1000 and s.engine.detector_rule == "prism"
    assert s.engine.warmup_s == 10.0
    assert s.engine.episode_holds() == EpisodeHolds(3, 500.0, 10, 5000.0)
    assert s.engine.window_s == 10 and s.engine.snapshot_hz == 4
    assert s.engine.slo == () and s.engine.escalation_s == 30
    assert s.history.db == "~/.local/state/latencyprism/history.sqlite"
    assert s.history.path == tmp_path / ".local/state/latencyprism/history.sqlite"
    assert s.history.retention_days == 7 and s.history.max_iterations == 1_000_000
    assert s.mqtt.broker is None and s.mqtt.topic_root == "latencyprism/v1"
    assert s.watch.profile is None and s.watch.duration_s is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.engine.warmup_iterations = 5  # type: ignore[misc]


def test_default_file_in_home_is_read(tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    conf = tmp_path / ".config/latencyprism/config.toml"
    conf.parent.mkdir(parents=True)
    conf.write_text("[engine]\nwarmup_iterations = 42\n")
    assert load_settings(env={}).engine.warmup_iterations == 42
    other = tmp_path / "other.toml"
    other.write_text("[engine]\nwarmup_iterations = 7\n")
    assert load_settings(env={"PRISM_CONFIG": str(other)}).engine.warmup_iterations == 7


def test_file_then_env_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, """
[probe]
mode = "thread"
ring_pages = 128
overhead_budget = 0.01
governor_action = "duty-cycle"

[engine]
warmup_iterations = 200
detector_rule = "paper"
alert_close_ms = 2500
window_s = 60
slo = ["decode p99 <= 60ms over 10s", "p50 < 20ms over 1m",
       "device_sync: decode p99 <= 5ms over 10s"]

[mqtt]
broker = "mqtt://localhost:1883"
password = "hunter2"

[watch]
profile = "cuda"
duration_s = 30
""")
    s = load_settings(path, env={})
    assert s.probe.mode == "thread" and s.probe.ring_pages == 128
    assert s.probe.overhead_budget == 0.01 and s.probe.governor_action == "duty-cycle"
    assert s.engine.warmup_iterations == 200 and s.engine.detector_rule == "paper"
    assert s.engine.episode_holds().close_ms == 2500.0
    assert s.engine.window_s == 60.0 and isinstance(s.engine.window_s, float)
    assert s.engine.slo == ("decode p99 <= 60ms over 10s", "p50 < 20ms over 1m",
                            "device_sync: decode p99 <= 5ms over 10s")
    assert s.mqtt.broker == "mqtt://localhost:1883"
    assert s.watch.profile == "cuda" and s.watch.duration_s == 30.0

    env = {"PRISM_ENGINE_WARMUP_ITERATIONS": "500", "PRISM_PROBE_OVERHEAD_BUDGET": "0.002",
           "PRISM_ENGINE_WARMUP_S": "4.5",
           "PRISM_WATCH_HEADLESS": "yes", "PRISM_WATCH_DURATION_S": "",
           "PRISM_ENGINE_SLO": "decode p99 <= 50ms over 10s, p90 <= 40ms over 5s",
           "PRISM_DB": "/tmp/h.sqlite", "PRISM_PROFILE_PATH": "/x", "HOME": "/root"}
    s = load_settings(path, env=env)
    assert s.engine.warmup_iterations == 500 and s.engine.warmup_s == 4.5
    assert s.probe.overhead_budget == 0.002
    assert s.watch.headless is True and s.watch.duration_s is None
    assert s.engine.slo == ("decode p99 <= 50ms over 10s", "p90 <= 40ms over 5s")
    assert s.history.db == "/tmp/h.sqlite"
    assert s.probe.mode == "thread"  # untouched by env: from the file

    s = load_settings(path, env=env, overrides={"engine.warmup_iterations": 50,
                                                 "mqtt.broker": None,
                                                 "watch.duration_s": "12.5",
                                                 "watch.headless": False})
    assert s.engine.warmup_iterations == 50
    assert s.mqtt.broker == "mqtt://localhost:1883"  # None: not given
    assert s.watch.duration_s == 12.5 and s.watch.headless is False


def test_to_dict_is_json_and_redacts_password(tmp_path: Path) -> None:
    path = write(tmp_path, '[mqtt]\npassword = "hunter2"\n[engine]\nslo = ["p99 <= 5ms over 1s"]\n')
    s = load_settings(path, env={})
    d = s.to_dict()
    assert d["mqtt"]["password"] == "***"
    assert d["engine"]["slo"] == ["p99 <= 5ms over 1s"]
    assert set(d) == {"probe", "engine", "history", "mqtt", "metrics", "watch"}
    json.dumps(d)
    assert s.to_dict(redact=False)["mqtt"]["password"] == "hunter2"


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    err = error_of(path=str(tmp_path / "nope.toml"), env={})
    assert "nope.toml" in str(err) and "not found" in str(err)


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[engine]\nwarmup_iterations = 5\nwindow_s = = 3\n")
    err = error_of(path=path, env={})
    assert str(err).startswith(f"{path}:3: invalid TOML")


def test_unknown_key_names_line_and_suggests(tmp_path: Path) -> None:
    path = write(tmp_path, "[engine]\n\nwarmup_iteration = 5\n")
    msg = str(error_of(path=path, env={}))
    assert msg.startswith(f"{path}:3: [engine] warmup_iteration: unknown key")
    assert "did you mean 'warmup_iterations'?" in msg


def test_unknown_section_suggests(tmp_path: Path) -> None:
    path = write(tmp_path, "[engine]\nwindow_s = 60\n[histroy]\nretention_days = 1\n")
    msg = str(error_of(path=path, env={}))
    assert msg.startswith(f"{path}:3: unknown section 'histroy'")
    assert "did you mean 'history'?" in msg


@pytest.mark.parametrize(("text", "line", "needle"), [
    ('[engine]\nwarmup_iterations = "many"\n', 2, "must be an integer, not 'many'"),
    ("[engine]\nwarmup_iterations = 1.5\n", 2, "must be an integer"),
    ("[engine]\nwarmup_iterations = true\n", 2, "must be an integer, not a boolean"),
    ("[engine]\nwarmup_iterations = 0\n", 2, "must be >= 1"),
    ("[engine]\nrealtime_priority = 100\n", 2, "a SCHED_FIFO priority 1-99"),
    ("[engine]\nalert_close_ms = -5\n", 2, "must be >= 0"),
    ("[engine]\nalert_open_iterations = 0\n", 2, "must be >= 1"),
    ("[engine]\nwarmup_s = -1\n", 2, "must be >= 0"),
    ("[probe]\n\noverhead_budget = 1.5\n", 3, "must be in (0, 1)"),
    ("[probe]\noverhead_budget = 0\n", 2, "must be in (0, 1)"),
    ("[probe]\nring_pages = 48\n", 2, "power of two"),
    ("[probe]\nwake_gap_ms = -1\n", 2, "must be in [0, 1000] ms"),
    ("[engine]\nwindow_s = 5\n", 2, "must be one of 10, 60, 300"),
    ('[probe]\nmode = "threads"\n', 2, "did you mean 'thread'?"),
    ('[engine]\ndetector_rule = "papr"\n', 2, "must be one of 'paper', 'prism'"),
    ('[engine]\nslo = ["p99 under 60ms"]\n', 2, "cannot parse SLO"),
    ('[engine]\nslo = ["device_sync: p99 under 60ms"]\n', 2, "cannot parse SLO"),
    ("[engine]\nslo = [1, 2]\n", 2, "list of strings"),
    ('[mqtt]\nbroker = "http://x"\n', 2, "unknown scheme 'http'"),
    ('[watch]\nduration_s = -1\n', 2, "must be > 0"),
    ("[history]\nretention_days = inf\n", 2, "finite"),
])
def test_wrong_values_name_line_key_and_reason(tmp_path: Path, text: str, line: int,
                                               needle: str) -> None:
    path = write(tmp_path, text)
    msg = str(error_of(path=path, env={}))
    assert msg.startswith(f"{path}:{line}: [")
    assert needle in msg


def test_section_must_be_a_table(tmp_path: Path) -> None:
    path = write(tmp_path, "engine = 3\n")
    assert "must be a table" in str(error_of(path=path, env={}))


def test_env_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    msg = str(error_of(env={"PRISM_ENGINE_WARMUP_ITERATIONS": "lots"}))
    assert msg == "environment PRISM_ENGINE_WARMUP_ITERATIONS: must be an integer, not 'lots'"
    msg = str(error_of(env={"PRISM_ENGINE_WARMUP_ITERATONS": "5"}))
    assert "unknown setting" in msg and "PRISM_ENGINE_WARMUP_ITERATIONS" in msg
    msg = str(error_of(env={"PRISM_WATCH_HEADLESS": "maybe"}))
    assert "boolean" in msg
    msg = str(error_of(env={"PRISM_PROBE_OVERHEAD_BUDGET": "2"}))
    assert msg.startswith("environment PRISM_PROBE_OVERHEAD_BUDGET: must be in (0, 1)")
    # Variables of other parts of prism are not settings.
    assert load_settings(env={"PRISM_CACHE_DIR": "/x", "PRISM_PROFILE_PATH": "/y"}) == \
        Settings()


def test_override_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    msg = str(error_of(env={}, overrides={"engine.warmup_iteratons": 5}))
    assert msg.startswith("option engine.warmup_iteratons: unknown key")
    assert "warmup_iterations" in msg
    msg = str(error_of(env={}, overrides={"engin.window_s": 5}))
    assert "did you mean 'engine.window_s'?" in msg
    msg = str(error_of(env={}, overrides={"engine.window_s": "soon"}))
    assert msg == "option engine.window_s: must be a number, not 'soon'"
