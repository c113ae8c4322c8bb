"""The small simulator scenarios the end-to-end tests share: two ranks, steady load.

:func:`scenario_text`: two ranks (8 layers, hidden 4096) under continuous batching with
short prompts of varied lengths, plus an optional device slowdown: fast to warm up, and
every stage of the `cuda` and `nccl` profiles shows. :func:`steady_text`: a saturated
server (a request every 5 ms, fixed 32-token prompts) whose batch, model size, output
length and extra tables the test chooses.
"""

from __future__ import annotations

from pathlib import Path

from prism_sim.scenario import parse_scenario
from prism_sim.server import SimServer

_SCENARIO = """
[scenario]
name = "{name}"
seed = {seed}
duration_s = {duration}

[topology]
ranks = 2
layers = 8
hidden = 4096

[[phase]]
start_s = 0
arrival_rate = 20.0
max_batch = 8
prompt = {{ dist = "uniform", min = 16, max = 64 }}
output = {{ dist = "uniform", min = 50, max = 150 }}
{fault}
"""


_STEADY = """
[scenario]
name = "{name}"
description = "test scenario"
seed = 3
duration_s = {duration}

[topology]
ranks = 2
layers = {layers}
hidden = {hidden}

[[phase]]
start_s = 0
arrival_rate = 200.0
max_batch = {batch}
prompt = {{ dist = "fixed", value = 32 }}
output = {{ dist = "fixed", value = {output} }}
{extra}
"""


def steady_text(name: str, duration: float, *, batch: int = 8, layers: int = 4,
                hidden: int = 2048, output: int = 400, extra: str = "") -> str:
    """The saturated two-rank scenario's TOML; ``extra`` is appended (faults, phases)."""
    return _STEADY.format(name=name, duration=duration, batch=batch, layers=layers,
                          hidden=hidden, output=output, extra=extra)


def slowdown(start_s: float, duration_s: float, *, rank: int = 1,
             intensity: float = 0.5) -> str:
    """A ``device_slowdown`` fault as scenario TOML."""
    return (f"\n[[fault]]\ntype = \"device_slowdown\"\nstart_s = {start_s}\n"
            f"duration_s = {duration_s}\nrank = {rank}\nintensity = {intensity}\n")


def scenario_text(duration: float, fault: str = "", *, seed: int = 5,
                  name: str = "runtime") -> str:
    """The scenario's TOML."""
    return _SCENARIO.format(name=name, seed=seed, duration=duration, fault=fault)


def scenario_file(tmp_path: Path, duration: float, fault: str = "", *, seed: int = 5,
                  name: str = "runtime") -> Path:
    """The scenario written to ``tmp_path/<name>.toml``."""
    path = tmp_path / f"{name}.toml"
    path.write_text(scenario_text(duration, fault, seed=seed, name=name))
    return path


def sim_server(path: Path) -> SimServer:
    """A simulator on that scenario file (no /metrics endpoint)."""
    return SimServer(parse_scenario(path.read_text(), str(path)), metrics_port=None)
