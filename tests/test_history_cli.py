"""`prism history` on real SQLite files: JSON and text output, bad files in one line."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from prism_tui.history import HistoryStore
from tests.test_history import KEY, make_windows

ROOT = Path(__file__).resolve().parent.parent


def prism_history(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prism_tui.cli", "history", *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def write_db(path: Path, seconds: int) -> None:
    """Windows of the last ``seconds`` seconds, stamped with this host's real clocks."""

    async def go() -> None:
        mono_now = time.monotonic_ns()
        windows = make_windows(seconds, [KEY], base_ns=mono_now - seconds * 1_000_000_000)
        async with HistoryStore(path) as store:
            await store.write_windows(windows)

    asyncio.run(go())


def test_history_json_has_quantiles_of_the_range(tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite"
    write_db(db, 30)
    result = prism_history("--db", str(db), "--since", "10m", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    [series] = doc["series"]
    assert (series["stage"], series["device"], series["phase"]) == (
        "device_sync", "cuda:0", "decode")
    assert series["total"]["count"] == 30 * 20
    assert series["total"]["p50"] <= series["total"]["p99"] <= series["total"]["max"]
    assert sum(p["count"] for p in series["points"]) == 30 * 20
    assert doc["alerts"] == []


def test_history_text_and_filters(tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite"
    write_db(db, 5)
    text = prism_history("--db", str(db), "--since", "1h")
    assert text.returncode == 0, text.stderr
    assert "device_sync/cuda:0/decode" in text.stdout and "p99" in text.stdout
    other = prism_history("--db", str(db), "--stage", "gemm", "--json")
    assert json.loads(other.stdout)["series"] == []


def test_bad_history_input_is_one_line_exit_2(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not sqlite" * 100)
    before = garbage.read_bytes()
    cases = [
        (["--db", str(garbage)], "not a LatencyPrism history database"),
        (["--db", str(tmp_path / "missing.sqlite")], "missing.sqlite"),
        (["--db", str(garbage), "--since", "yesterday"], "yesterday"),
    ]
    for args, needle in cases:
        result = prism_history(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert needle in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert garbage.read_bytes() == before  # nothing lost
    assert not (tmp_path / "missing.sqlite").exists()


def test_history_reads_the_file_the_settings_name(tmp_path: Path) -> None:
    """`prism watch` writes where the settings' history.db says; `prism history` reads
    the same file (and `--db` still wins); a malformed settings file is one line."""
    db = tmp_path / "from-settings.sqlite"
    write_db(db, 10)
    config = tmp_path / "config.toml"
    config.write_text(f'[history]\ndb = "{db}"\n')
    result = prism_history("--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["series"][0]["total"]["count"] == 10 * 20
    other = tmp_path / "other.sqlite"
    write_db(other, 3)
    result = prism_history("--config", str(config), "--db", str(other), "--json")
    assert json.loads(result.stdout)["series"][0]["total"]["count"] == 3 * 20
    config.write_text("[history\n")
    bad = prism_history("--config", str(config))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "invalid TOML" in bad.stderr and "Traceback" not in bad.stderr
