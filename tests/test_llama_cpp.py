"""`prism watch` on a real llama.cpp server, checked against the server's own numbers.

One ``llama_cpp.server`` (llama-cpp-python built from source for the CPU, a tiny
random-weight model written at test time: tests/llama_fixtures.py) serves the whole
module. One ``prism watch`` session attaches real uprobes to it (by ``--match`` on its
command line) while a single client, then three concurrent clients, send completions;
the tests read the iterations the monitor wrote to its SQLite history and compare them
with the token counts in the HTTP responses. A per-operation probe checks that the ggml
worker threads are seen.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from math import ceil
from pathlib import Path
from typing import Any

import pytest

from probes.catalog import parse_profile
from probes.placement import place_profile
from probes.target import Target
from probes.uprobes import Span, UprobeSession
from tests.llama_fixtures import (
    N_BATCH,
    Completion,
    LlamaServer,
    count_iterations,
    drive,
    llama_server,
    read_iterations,
    tiny_llama,
    watched_phases,
)

__all__ = ["llama_server", "tiny_llama"]  # fixtures, imported for pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 12
SINGLE_REQUESTS = 5
MULTI_CLIENTS = 3
MULTI_REQUESTS = 2
MATMUL_PROFILE = """\
[profile]
name = "llama_ops"
description = "one ggml CPU operation, run by every compute thread"

[[library]]
id = "llama"
soname = ["libllama.so*"]

[[library]]
id = "ggml"
soname = ["libggml-cpu*.so*"]

[[probe]]
id = "decode"
library = "llama"
symbol = "llama_decode"
stage = "decode"
ret = true

[[probe]]
id = "mul_mat"
library = "ggml"
symbol = "ggml_compute_forward_mul_mat"
stage = "mul_mat"
ret = true
"""


@dataclass
class WatchedRun:
    """What one `prism watch` session saw and what the clients were told, per phase."""

    iterations: list[dict[str, Any]]
    single: list[Completion]
    multi: list[Completion]
    single_started_ns: int
    multi_started_ns: int


@pytest.fixture(scope="module")
def watched(llama_server: LlamaServer, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[WatchedRun]:
    """Watch the server while one client, then three at once, send completions."""
    db = tmp_path_factory.mktemp("watch") / "history.sqlite"
    port = llama_server.url.rsplit(":", 1)[1]

    def caught_up(single_started_ns: int, completions: list[Completion]) -> bool:
        steps = sum(c.completion_tokens - 1 + ceil((c.prompt_tokens - 1) / N_BATCH)
                    for c in completions)
        return count_iterations(db, single_started_ns) >= steps

    # llama_cpp.server runs each request on one of anyio's worker threads, which start
    # on demand and end after 10 s idle: watched_phases keeps it busy until the counted
    # phases. Every probe stays on for the correctness run: a loaded host's hit-cost
    # calibration can put graph_compute over the default 0.5 % budget, and a detached
    # probe's stage is then missing from the iterations this file checks. Per-CPU rings
    # (mode "cpu"): this test process maps libllama too (it imported llama_cpp), so
    # "auto" would pick per-thread rings, and a worker thread the server starts during
    # the counted phases (three clients waiting on its lock can need one more) would
    # lose its first calls before it is attached: 64 decode steps counted for 66 in one
    # full-suite run
    with watched_phases(
            llama_server, db, match=rf"llama_cpp\.server .*--port {port}\b",
            config_text='[probe]\noverhead_budget = 0.9\nmode = "cpu"\n',
            clients=MULTI_CLIENTS, single_requests=SINGLE_REQUESTS, single_tokens=MAX_TOKENS,
            multi_requests=MULTI_REQUESTS, multi_tokens=MAX_TOKENS,
            caught_up=caught_up) as run:
        yield WatchedRun(read_iterations(db), run.single, run.multi, run.single_started_ns,
                         run.multi_started_ns)


def decode_steps_of(completions: list[Completion]) -> int:
    """Single-token decode steps the server ran for these completions: it samples a
    request's last token without decoding it, so N tokens cost N - 1 steps."""
    return sum(c.completion_tokens - 1 for c in completions)


def prompt_steps_of(completions: list[Completion]) -> int:
    """``llama_decode`` calls for the prompts: chunks of ``n_batch`` tokens, the BOS
    token each prompt starts with reused from the previous request's cache."""
    return sum(ceil((c.prompt_tokens - 1) / N_BATCH) for c in completions)


def test_every_completion_runs_to_max_tokens(watched: WatchedRun) -> None:
    """The model never samples end-of-stream, so the expected step counts are exact."""
    for c in watched.single + watched.multi:
        assert (c.finish_reason, c.completion_tokens) == ("length", MAX_TOKENS)


def test_decode_iterations_equal_the_servers_completion_tokens(watched: WatchedRun) -> None:
    """One client: one decode iteration per decoded token, the prompt chunks counted
    apart (each request's first chunk closes the iteration the previous one left open)."""
    its = [it for it in watched.iterations
           if watched.single_started_ns < it["end_ns"] < watched.multi_started_ns]
    decode = [it for it in its if it["phase"] == "decode"]
    prompt = [it for it in its if it["phase"] != "decode"]
    steps = [(it["phase"], it["features"]["decode.n_tokens"]) for it in its]
    assert len(decode) == decode_steps_of(watched.single), steps
    assert len(prompt) == prompt_steps_of(watched.single), steps
    assert all(it["features"]["decode.n_tokens"] == 1 for it in decode)
    assert all(it["features"]["decode.n_tokens"] > 1 for it in prompt)


def test_with_several_clients_each_step_decodes_the_one_request_in_the_engine(
        watched: WatchedRun) -> None:
    """Three clients at once: llama_cpp.server runs one request at a time (a lock), so
    the requests in flight in the engine are 1 and so are the tokens of every decode
    step, while the HTTP requests overlapped; the totals still match the responses."""
    its = [it for it in watched.iterations if it["end_ns"] > watched.multi_started_ns]
    decode = [it for it in its if it["phase"] == "decode"]
    assert len(decode) == decode_steps_of(watched.multi)
    assert {it["features"]["sequences"] for it in decode} == {1.0}
    assert len([it for it in its if it["phase"] != "decode"]) == prompt_steps_of(watched.multi)
    overlapping = sum(1 for a in watched.multi for b in watched.multi
                      if a is not b and a.sent_ns < b.done_ns and b.sent_ns < a.done_ns)
    assert overlapping > 0, "the clients never had two requests out at once"


def test_stages_are_sane_and_never_exceed_their_iteration(watched: WatchedRun) -> None:
    """Every stage is non-negative and they add up to the iteration; each
    iteration computes a graph, and each decode step samples the token it decodes."""
    assert watched.iterations
    for it in watched.iterations:
        stages, total_ms = it["stages"], (it["end_ns"] - it["start_ns"]) / 1e6
        assert all(ms >= 0 for ms in stages.values()), stages
        # the history keeps stage times in ms to 4 decimals
        assert sum(stages.values()) == pytest.approx(total_ms, abs=1e-4 * len(stages))
        assert stages.get("graph_compute", 0) > 0
        assert stages.get("decode", 0) > 0
        if it["phase"] == "decode":
            assert it["features"]["calls.sample"] == 1
            assert stages.get("sampling", 0) > 0


def test_prompt_chunks_are_prefill_and_the_first_after_a_request_is_mixed(
        watched: WatchedRun) -> None:
    """The profile's phase rule on the real engine: a prompt chunk after another chunk
    is ``prefill``; a request's first chunk holds the previous request's last sampling
    call (the iteration runs from one ``llama_decode`` return to the next), so the rule
    reads it as ``mixed`` with one decode token in n (docs/llama_cpp.md)."""
    for it in watched.iterations:
        f = it["features"]
        if f["decode.n_tokens"] > 1:
            expected = "mixed" if f.get("calls.sample", 0) else "prefill"
            assert it["phase"] == expected, it
    assert any(it["phase"] == "mixed" for it in watched.iterations)


def test_the_ggml_worker_threads_are_covered(llama_server: LlamaServer) -> None:
    """A per-operation probe of a user profile fires on every compute thread of the
    server (``--n_threads 2``: the thread in ``llama_decode`` and a ggml worker), as the
    monitor attaches it: per-thread rings, new threads attached as they appear. The
    server runs each request on a thread of its pool, so two requests may decode on two
    threads: every decode thread computes, and a worker that never decodes does too. Run
    through the probe layer directly: at tens of thousands of hits a second this probe
    is the governor's business, not the correctness run's."""
    profile = parse_profile(MATMUL_PROFILE, "llama_ops.toml")
    placement = place_profile(Target(llama_server.pid), profile, "sentinel")
    assert {s.probe for s in placement.sites} == {"decode", "mul_mat"}
    spans: list[Span] = []
    with UprobeSession([Target(llama_server.pid)], placement.sites) as session:
        client = threading.Thread(target=drive, args=(llama_server.url,), kwargs={
            "clients": 1, "requests_per_client": 2, "max_tokens": 8, "first_index": 700})
        client.start()
        while client.is_alive():
            spans += session.poll(0.05)
        time.sleep(0.2)
        spans += session.read()
    decode_tids = {s.tid for s in spans if s.probe == "decode"}
    matmul_tids = {s.tid for s in spans if s.probe == "mul_mat"}
    assert decode_tids and decode_tids < matmul_tids  # strictly: a ggml worker too
    assert all(Path(f"/proc/{llama_server.pid}/task/{t}").exists() for t in matmul_tids)


def test_symbols_resolve_in_the_real_libraries(llama_server: LlamaServer) -> None:
    """`prism symbols` finds every llama_cpp probe in the stripped wheel libraries."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "prism_tui.cli", "symbols", "--pid",
                          str(llama_server.pid), "--profile", "llama_cpp", "--json"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    [profile] = json.loads(out.stdout)["profiles"]
    status = {p["probe"]: p["status"] for p in profile["probes"]}
    for probe in ("decode", "graph_compute", "sample", "backend_compute", "tokenize",
                  "detokenize"):
        assert status[probe] == "resolved", (probe, status)
    assert any("libllama" in lib for lib in profile["libraries"])
