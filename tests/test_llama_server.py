"""`prism watch` on llama.cpp's C++ server, checked against the server's own numbers.

``llama-server`` (built by the Makefile from the llama.cpp that llama-cpp-python 0.3.36
vendors: scripts/build_llama_server.sh) serves the tests' tiny random-weight model with
three slots: unlike ``llama_cpp.server`` it batches the requests in flight into one
step (continuous batching). It steps through ``llama_process``, not ``llama_decode``:
the ``llama_cpp`` profile names both as anchors and the monitor takes the one that
fires. A step's tokens are the ``llama_batch_ext_add_token`` calls that built its batch
(``calls.add_token``), checked here against the token counts the HTTP responses report
(``timings.prompt_n`` for the prompt tokens it decoded, its prompt cache's left out).
One ``prism watch --match`` session with real uprobes and a SQLite history serves the
module, while a single client, then three at once, send completions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from math import ceil
from pathlib import Path
from typing import Any

import pytest

from tests.llama_fixtures import (
    CPP_SLOTS,
    N_BATCH,
    Completion,
    LlamaServer,
    cpp_server,
    read_iterations,
    tiny_llama,
    watched_phases,
)

__all__ = ["cpp_server", "tiny_llama"]  # fixtures, imported for pytest

MAX_TOKENS = 12
MULTI_MAX_TOKENS = 96
"""Longer requests with several clients, so the three clients' requests overlap in the
engine even when a loaded host delays a client thread: at 32 tokens (~15 ms a request on a
quiet host) a full-suite run once saw every multi-client decode step carry one token."""
SINGLE_REQUESTS = 4
MULTI_REQUESTS = 3
ANCHOR_NOTICE = ("iteration anchor: process, the first of profile 'llama_cpp''s anchors "
                 "to fire (not decode)")


@dataclass
class WatchedRun:
    """What the `prism watch` session saw and said, and what the clients were told."""

    iterations: list[dict[str, Any]]
    notices: list[str]
    single: list[Completion]
    multi: list[Completion]
    single_started_ns: int
    multi_started_ns: int


def tokens_decoded(completions: list[Completion]) -> int:
    """Tokens the server put in its batches for these requests: the prompt tokens it
    decoded, then each completion token but the last (sampled, never decoded)."""
    total = 0
    for c in completions:
        assert c.prompt_decoded is not None, "llama-server reports timings.prompt_n"
        total += c.prompt_decoded + c.completion_tokens - 1
    return total


def tokens_seen(iterations: list[dict[str, Any]], after_ns: int, before_ns: int | None = None
                ) -> int:
    """``llama_batch_ext_add_token`` calls in the iterations that ended in the window."""
    return int(sum(it["features"].get("calls.add_token", 0) for it in iterations
                   if it["end_ns"] > after_ns and (before_ns is None or it["end_ns"] < before_ns)))


@pytest.fixture(scope="module")
def watched(cpp_server: LlamaServer, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[WatchedRun]:
    """Watch llama-server while one client, then three at once, send completions."""
    db = tmp_path_factory.mktemp("watch") / "history.sqlite"
    port = cpp_server.url.rsplit(":", 1)[1]
    # every probe stays on (a loaded host's calibration can put graph_compute over the
    # default budget, and a detached probe's stage would be missing from the checks)
    with watched_phases(
            cpp_server, db, match=rf"llama-server .*--port {port}\b",
            config_text="[probe]\noverhead_budget = 0.9\n", clients=CPP_SLOTS,
            single_requests=SINGLE_REQUESTS, single_tokens=MAX_TOKENS,
            multi_requests=MULTI_REQUESTS, multi_tokens=MULTI_MAX_TOKENS,
            caught_up=lambda t0, cs: db.exists() and tokens_seen(
                read_iterations(db), t0) >= tokens_decoded(cs)) as run:
        yield WatchedRun(read_iterations(db), run.notices, run.single, run.multi,
                         run.single_started_ns, run.multi_started_ns)


def test_the_monitor_steps_at_llama_process_the_anchor_that_fires(watched: WatchedRun) -> None:
    """llama-server never calls ``llama_decode``: of the profile's two anchors the
    monitor takes ``process`` as soon as it fires, and says so once."""
    said = [line for line in watched.notices if "iteration anchor" in line]
    assert len(said) == 1 and ANCHOR_NOTICE in said[0], watched.notices
    assert not [line for line in watched.notices if "has not fired" in line]
    for c in watched.single:
        assert (c.finish_reason, c.completion_tokens) == ("length", MAX_TOKENS)
    for c in watched.multi:
        assert (c.finish_reason, c.completion_tokens) == ("length", MULTI_MAX_TOKENS)


def test_one_client_decode_steps_equal_the_servers_completion_tokens(
        watched: WatchedRun) -> None:
    """One client: a decode iteration per decoded token (one ``add_token`` call, one
    sampling call each) and the prompt steps apart, exactly as the responses report."""
    its = [it for it in watched.iterations
           if watched.single_started_ns < it["end_ns"] < watched.multi_started_ns]
    steps = [(it["phase"], it["features"].get("calls.add_token")) for it in its]
    decode = [it for it in its if it["phase"] == "decode"]
    assert len(decode) == sum(c.completion_tokens - 1 for c in watched.single), steps
    assert all(it["features"]["calls.add_token"] == 1 for it in decode), steps
    assert all(it["features"]["calls.common_sample"] == 1 for it in decode), steps
    prompt = [it for it in its if it["phase"] != "decode"]
    assert len(prompt) == sum(ceil((c.prompt_decoded or 0) / N_BATCH)
                              for c in watched.single), steps
    assert tokens_seen(watched.iterations, watched.single_started_ns,
                       watched.multi_started_ns) == tokens_decoded(watched.single), steps


def test_several_clients_are_batched_and_every_token_is_counted(watched: WatchedRun) -> None:
    """Three clients, three slots: decode steps carry one token per request in flight
    (more than one: batched; never more than the clients had open), and the tokens of
    all steps add up to the responses'."""
    its = [it for it in watched.iterations if it["end_ns"] > watched.multi_started_ns]
    decode = [it for it in its if it["phase"] == "decode"]
    per_step = [int(it["features"]["calls.add_token"]) for it in decode]
    sampled = [int(it["features"]["calls.common_sample"]) for it in decode]
    # the most requests the clients had open at once bounds the sequences of a step
    open_at_once = max(sum(1 for b in watched.multi if b.sent_ns <= a.sent_ns < b.done_ns)
                       for a in watched.multi)
    assert per_step and set(per_step) <= set(range(1, CPP_SLOTS + 1)), per_step
    assert 2 <= max(per_step) <= open_at_once, (per_step, open_at_once)
    assert all(it["features"]["sequences"] == n for it, n in zip(decode, per_step, strict=True))
    # a step decodes the tokens sampled before it, less those that ended a request
    assert all(n <= k for n, k in zip(per_step, sampled, strict=True)), (per_step, sampled)
    assert tokens_seen(watched.iterations, watched.multi_started_ns) == \
        tokens_decoded(watched.multi)


def test_stages_are_sane_and_never_exceed_their_iteration(watched: WatchedRun) -> None:
    """Every stage is non-negative and they add up to the iteration; every step computes
    a graph inside ``llama_process``, and a decode step samples what it decodes."""
    assert watched.iterations
    for it in watched.iterations:
        stages, total_ms = it["stages"], (it["end_ns"] - it["start_ns"]) / 1e6
        assert all(ms >= 0 for ms in stages.values()), stages
        assert sum(stages.values()) == pytest.approx(total_ms, abs=1e-4 * len(stages))
        assert stages.get("graph_compute", 0) > 0, it
        assert stages.get("decode", 0) > 0, it
        if it["phase"] == "decode":
            assert stages.get("sampling", 0) > 0, it


def test_prompt_steps_read_as_prefill_or_mixed(watched: WatchedRun) -> None:
    """The phase rule on llama-server: a step whose batch holds a prompt is ``mixed``
    when tokens were sampled before it (other slots decoding, or the previous request's
    last token), else ``prefill``; never ``decode``."""
    for it in watched.iterations:
        f = it["features"]
        tokens = f.get("calls.add_token", 0)
        sampled = f.get("calls.common_sample", 0)
        if tokens > sampled:
            assert it["phase"] == ("mixed" if sampled else "prefill"), it
    assert any(it["phase"] == "mixed" for it in watched.iterations)


def test_the_server_binary_is_the_one_the_makefile_built(cpp_server: LlamaServer) -> None:
    """The fixture's server maps the libraries built beside it (the profile's
    ``libllama.so*``), not the Python bindings' copies."""
    maps = Path(f"/proc/{cpp_server.pid}/maps").read_text()
    libllama = {line.split()[-1] for line in maps.splitlines() if "/libllama.so" in line}
    assert libllama and all("latencyprism/llama-server-" in p for p in libllama), libllama
