"""The layering rules of docs/architecture.md, checked on every run of the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_linter_contracts_are_kept() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" in result.stdout and ", 0 broken" in result.stdout


def _modules_loaded_by(statement: str) -> set[str]:
    code = f"{statement}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    return set(out.split())


def test_probe_layer_loads_no_ui_engine_or_mqtt() -> None:
    loaded = _modules_loaded_by(
        "import probes.target, probes.symbols, probes.perf, probes.uprobes, probes.pairing, "
        "probes.delivery, probes.placement, probes.catalog, probes.governor, probes.telemetry")
    forbidden = {"textual", "aiomqtt", "paho", "prism_tui", "alerting"}
    assert not {m.split(".")[0] for m in loaded} & forbidden


def test_the_shared_package_loads_only_the_standard_library() -> None:
    """prism_common is imported by every layer: it must not drag any package in."""
    before = _modules_loaded_by("pass")
    loaded = _modules_loaded_by("import prism_common, prism_common.toml_lines")
    outside = {m.split(".")[0] for m in loaded - before} - set(sys.stdlib_module_names)
    assert outside == {"prism_common"}


def test_the_cli_does_not_load_textual_for_probe_commands() -> None:
    loaded = _modules_loaded_by("import prism_tui.cli")
    assert "textual" not in {m.split(".")[0] for m in loaded}
