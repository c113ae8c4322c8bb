"""A real llama.cpp server to watch: a tiny random-weight model and `llama_cpp.server`.

Nothing can be downloaded here, so the model is written at test time with the ``gguf``
package: a llama-architecture GGUF with random F32 weights and a small SentencePiece
vocabulary (printable characters, ``▁``-prefixed letters, the 256 byte-fallback tokens),
enough for llama.cpp to load it, tokenise any text and generate. The weights are random
but one thing is pinned: residual dimension 0 is 1 for every token (the embeddings set it
and no layer writes it), and the output row of every special and byte token is -100 there,
so the model never samples end-of-stream (every completion runs to ``max_tokens``: its
``finish_reason`` is ``length``) nor a piece that is not printable text.

The server is ``python -m llama_cpp.server`` (llama-cpp-python, installed by the
Makefile) on a free loopback port. It runs one ``Llama`` behind a lock: requests are
served one at a time, whatever the number of clients (see docs/llama_cpp.md). Per
request it decodes the prompt in chunks of ``n_batch`` tokens (one ``llama_decode`` call
each), then one token per ``llama_decode``; it samples the last token without decoding
it, so a completion of N tokens costs N - 1 single-token decode steps.

``llama-server``, llama.cpp's C++ server, is built by the Makefile from the same source
package's llama.cpp (scripts/build_llama_server.sh) and linked into the venv's ``bin/``:
:func:`running_cpp_server` starts it on the same model with three slots (requests are
batched together, continuous batching), and its responses carry its own timings
(``prompt_n``: the prompt tokens it decoded, its cache's left out).

Import the fixtures into a test module (``from tests.llama_fixtures import llama_server``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
N_EMBD = 128
N_LAYER = 4
N_HEAD = 4
N_FF = 256
N_CTX_TRAIN = 2048
UNK, BOS, EOS = 0, 1, 2
PRINTABLE = [chr(c) for c in range(0x21, 0x7F)]
WORDS = [f"▁{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
SERVER_ARGS = ("--n_threads", "2", "--n_threads_batch", "2", "--n_ctx", "512",
               "--n_batch", "32", "--n_ubatch", "32", "--logits_all", "false",
               "--verbose", "false", "--interrupt_requests", "false")
"""Two compute threads, a small context, prompts decoded in chunks of 32 tokens."""
N_BATCH = 32
LLAMA_SERVER_BIN = Path(sys.executable).parent / "llama-server"
"""llama.cpp's C++ server, linked into the venv by the Makefile."""
CPP_SLOTS = 3
CPP_SERVER_ARGS = ("--threads", "2", "--threads-batch", "2", "--ctx-size", str(512 * CPP_SLOTS),
                   "--parallel", str(CPP_SLOTS), "--batch-size", str(N_BATCH),
                   "--ubatch-size", str(N_BATCH), "--no-webui", "--log-disable")
"""Two compute threads, three slots of 512 tokens, prompts in chunks of 32 tokens."""


def llama_cpp_importable() -> bool:
    """Whether llama-cpp-python (with its compiled libllama) loads in this interpreter."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # ImportError, or OSError from a library that fails to load
        return False
    return True


def server_missing(server: str) -> str | None:
    """Why the ``python`` (llama_cpp.server) or ``cpp`` (llama-server) server cannot be
    started here, in one line; None when it can."""
    if not llama_cpp_importable():
        return "llama-cpp-python is not installed (`make venv` builds it)"
    if server == "cpp" and not LLAMA_SERVER_BIN.exists():
        return f"{LLAMA_SERVER_BIN} is not built (`make venv` builds it)"
    return None


def write_tiny_llama(path: Path, seed: int = 0) -> Path:
    """Write a llama-architecture GGUF with random weights and a working vocabulary.

    Args:
        path: the file to write.
        seed: the weights' random seed.

    Returns:
        ``path``.
    """
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = ["<unk>", "<s>", "</s>", *byte_tokens, "▁", *PRINTABLE, *WORDS]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL,
             *[gguf.TokenType.BYTE] * 256,
             *[gguf.TokenType.NORMAL] * (1 + len(PRINTABLE) + len(WORDS))]
    # SentencePiece merges the pair whose piece scores highest: words over characters
    scores = [0.0] * (3 + 256) + [-1.0] + [-2.0] * len(PRINTABLE) + [-0.5] * len(WORDS)
    n_vocab = len(tokens)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("latencyprism-tiny-random")
    w.add_context_length(N_CTX_TRAIN)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types([int(t) for t in types])
    w.add_unk_token_id(UNK)
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    def rand(*shape: int) -> Any:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    # numpy shapes are (rows, cols) = ggml's ne reversed: a weight maps cols -> rows
    embd = rand(n_vocab, N_EMBD)
    embd[:, 0] = 1.0  # residual dimension 0: 1 for every token, never written below
    w.add_tensor("token_embd.weight", embd)
    for i in range(N_LAYER):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, np.float32))
        for name in ("attn_q", "attn_k", "attn_v"):
            w.add_tensor(f"blk.{i}.{name}.weight", rand(N_EMBD, N_EMBD))
        attn_out = rand(N_EMBD, N_EMBD)
        attn_out[0, :] = 0.0
        w.add_tensor(f"blk.{i}.attn_output.weight", attn_out)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(N_FF, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(N_FF, N_EMBD))
        down = rand(N_EMBD, N_FF)
        down[0, :] = 0.0
        w.add_tensor(f"blk.{i}.ffn_down.weight", down)
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    out = rand(n_vocab, N_EMBD)
    out[: 3 + 256, 0] = -100.0  # special and byte tokens: never sampled
    w.add_tensor("output.weight", out)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LlamaServer:
    """A running ``llama_cpp.server``: its process and base URL."""

    proc: subprocess.Popen[bytes]
    url: str
    model: Path

    @property
    def pid(self) -> int:
        """The server's process id (what ``prism watch --pid`` takes)."""
        return self.proc.pid


@dataclass(frozen=True)
class Completion:
    """One answered request: what the server reported and when, on CLOCK_MONOTONIC."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    sent_ns: int
    done_ns: int
    prompt_decoded: int | None = None
    """The prompt tokens the server decoded (llama-server's ``timings.prompt_n``: those
    its prompt cache held are left out); None where the server does not say."""


@contextlib.contextmanager
def running_server(model: Path, *, extra_args: Sequence[str] = (),
                   start_timeout_s: float = 60.0, log: Path | None = None
                   ) -> Iterator[LlamaServer]:
    """Start ``python -m llama_cpp.server`` on ``model``, wait until it answers, stop it.

    Args:
        model: the GGUF file.
        extra_args: more server options (``--n_threads 1``...).
        start_timeout_s: how long loading may take before this gives up.
        log: where the server's output goes (default: discarded).
    """
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
           "--host", "127.0.0.1", "--port", str(port), *SERVER_ARGS, *extra_args]
    with _serving(cmd, model, port, "/v1/models", start_timeout_s, log) as server:
        yield server


@contextlib.contextmanager
def running_cpp_server(model: Path, *, extra_args: Sequence[str] = (),
                       start_timeout_s: float = 60.0, log: Path | None = None
                       ) -> Iterator[LlamaServer]:
    """Start llama.cpp's ``llama-server`` on ``model`` (:data:`CPP_SERVER_ARGS`), wait
    until its health check answers, stop it; arguments as :func:`running_server`."""
    port = free_port()
    cmd = [str(LLAMA_SERVER_BIN), "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), *CPP_SERVER_ARGS, *extra_args]
    with _serving(cmd, model, port, "/health", start_timeout_s, log) as server:
        yield server


@contextlib.contextmanager
def _serving(cmd: list[str], model: Path, port: int, ready_path: str, start_timeout_s: float,
             log: Path | None) -> Iterator[LlamaServer]:
    """Run ``cmd`` in a session of its own until ``ready_path`` answers 200; stop it after."""
    out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode} "
                                   f"before serving ({' '.join(cmd)})")
            try:
                with urllib.request.urlopen(f"{url}{ready_path}", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} did not serve within {start_timeout_s} s")
            time.sleep(0.2)
        yield LlamaServer(proc, url, model)
    finally:
        stop_process(proc)
        if log is not None:
            out.close()  # type: ignore[union-attr]


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM ``proc`` (its whole session), then SIGKILL after ``grace_s``; reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def complete(url: str, prompt: str, max_tokens: int, timeout_s: float = 120.0) -> Completion:
    """POST one non-streaming completion and return the server's own token counts."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8,
                       "seed": 1}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    sent = time.monotonic_ns()
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        doc = json.loads(r.read())
    done = time.monotonic_ns()
    usage = doc["usage"]
    decoded = doc.get("timings", {}).get("prompt_n")
    return Completion(int(usage["prompt_tokens"]), int(usage["completion_tokens"]),
                      str(doc["choices"][0]["finish_reason"]), sent, done,
                      None if decoded is None else int(decoded))


def prompt_for(i: int, words: int = 12) -> str:
    """A distinct prompt per request (its first word differs, so no prefix is reused)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    head = letters[i % 26] + letters[(i // 26) % 26]
    return " ".join([head, *(letters[(i * 7 + k) % 26] * 2 for k in range(words))])


def drive(url: str, *, clients: int, requests_per_client: int | None = None,
          duration_s: float | None = None, max_tokens: int = 16,
          first_index: int = 0) -> list[Completion]:
    """Send completions from ``clients`` threads at once, each one request after another.

    Each client stops after ``requests_per_client`` requests, or once ``duration_s`` has
    passed (a request under way is finished). Returns every completion, in no order.
    """
    if requests_per_client is None and duration_s is None:
        raise ValueError("give requests_per_client or duration_s")
    done: list[Completion] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    stop_at = None if duration_s is None else time.monotonic() + duration_s

    def client(c: int) -> None:
        n = 0
        while (requests_per_client is None or n < requests_per_client) and \
                (stop_at is None or time.monotonic() < stop_at):
            try:
                result = complete(url, prompt_for(first_index + c * 1000 + n), max_tokens)
            except BaseException as exc:  # reported by the caller's thread
                with lock:
                    errors.append(exc)
                return
            with lock:
                done.append(result)
            n += 1

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return done


def prism(*args: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen[str]:
    """Start the `prism` CLI of this checkout."""
    return subprocess.Popen([sys.executable, "-m", "prism_tui.cli", *args],
                            cwd=ROOT, text=True, env=env, **kw)


def read_iterations(db: Path) -> list[dict[str, Any]]:
    """Every iteration a monitor wrote to its SQLite history, in order."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT phase, start_ns, end_ns, features, stages FROM iterations "
                            "ORDER BY end_ns").fetchall()
    return [{"phase": p, "start_ns": s, "end_ns": e, "features": json.loads(f),
             "stages": json.loads(st)} for p, s, e, f, st in rows]


def count_iterations(db: Path, after_ns: int) -> int:
    """Iterations a monitor has written so far that ended after ``after_ns``."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            [(n,)] = conn.execute("SELECT count(*) FROM iterations WHERE end_ns > ?",
                                  (after_ns,)).fetchall()
    except sqlite3.OperationalError:  # not created yet
        return 0
    return int(n)


@dataclass
class ClientPhases:
    """What a watched server's clients were told: one client, then several at once."""

    single: list[Completion]
    multi: list[Completion]
    single_started_ns: int
    multi_started_ns: int
    notices: list[str]
    """The monitor's stderr lines (its notices)."""


@contextlib.contextmanager
def watched_phases(server: LlamaServer, db: Path, *, match: str, config_text: str,
                   clients: int, single_requests: int, single_tokens: int,
                   multi_requests: int, multi_tokens: int,
                   caught_up: Callable[[int, list[Completion]], bool]
                   ) -> Iterator[ClientPhases]:
    """`prism watch --match MATCH --profile llama_cpp --headless --db DB` on ``server``
    while one client, then ``clients`` at once, send completions.

    The server is kept busy from before the monitor attaches until the counted phases
    begin (its worker threads are attached, and the first counted step closes an
    iteration the busy requests opened). After the phases the monitor is given up to
    60 s to write what the server ran (``caught_up(single_started_ns, completions)``),
    then stopped with SIGINT; it must exit 0 and have governed no probe.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PRISM_PROFILE_PATH", None)
    config = db.with_name("prism.toml")
    config.write_text(config_text)
    stop_busy = threading.Event()

    def keep_busy() -> None:
        while not stop_busy.is_set():
            drive(server.url, clients=clients, requests_per_client=1, max_tokens=4,
                  first_index=300)

    busy = threading.Thread(target=keep_busy, daemon=True)
    busy.start()
    watch = prism("watch", "--match", match, "--profile", "llama_cpp", "--headless",
                  "--duration", "300", "--config", str(config), "--db", str(db), env=env,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert watch.stdout is not None and watch.stderr is not None
        out, err = LineReader(watch.stdout), LineReader(watch.stderr)
        first = out.wait_for('{"snapshot"', timeout_s=300)  # the session runs
        assert first is not None, "".join(err.lines)
        # decode steps in the snapshots: the threads' probes are in
        assert out.wait_for('"phase": "decode"', timeout_s=120, after=first) is not None, \
            "".join(err.lines)
        stop_busy.set()
        busy.join()
        single_started = time.monotonic_ns()
        single = drive(server.url, clients=1, requests_per_client=single_requests,
                       max_tokens=single_tokens)
        multi_started = time.monotonic_ns()
        multi = drive(server.url, clients=clients, requests_per_client=multi_requests,
                      max_tokens=multi_tokens, first_index=100)
        # on a loaded host the monitor may lag the server by seconds
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not caught_up(single_started, single + multi):
            time.sleep(0.5)
        watch.send_signal(signal.SIGINT)
        watch.wait(timeout=300)  # detaching: ~80 ms per perf event, more under load
        assert watch.returncode == 0, "".join(err.lines)
        assert not any('"governor"' in line for line in out.lines), "a probe was governed"
        yield ClientPhases(single, multi, single_started, multi_started, list(err.lines))
    finally:
        stop_busy.set()
        if watch.poll() is None:
            watch.kill()
            watch.wait()


class LineReader:
    """Reads a child's text output on a thread of its own, so the child never blocks on
    a full pipe (`prism watch --headless` prints a snapshot a few times a second), and
    lets the caller wait for a line."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait_for(self, text: str, timeout_s: float, after: int = 0) -> int | None:
        """Index of the first line from ``after`` on that contains ``text``; None when the
        stream ends or ``timeout_s`` passes first."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for i in range(after, len(self.lines)):
                    if text in self.lines[i]:
                        return i
                after = len(self.lines)
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    return None
                self._cond.wait(left)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random-weight GGUF, written once per test session."""
    if not llama_cpp_importable():
        pytest.skip("llama-cpp-python is not installed in this interpreter "
                    "(`make venv` builds it)")
    return write_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def llama_server(tiny_llama: Path) -> Iterator[LlamaServer]:
    """One ``llama_cpp.server`` shared by the session's tests (stopped at the end)."""
    with running_server(tiny_llama) as server:
        yield server


@pytest.fixture(scope="session")
def cpp_server(tiny_llama: Path) -> Iterator[LlamaServer]:
    """One llama.cpp ``llama-server`` shared by the session's tests (stopped at the end)."""
    if not LLAMA_SERVER_BIN.exists():
        pytest.skip(f"{LLAMA_SERVER_BIN} is not built (`make venv` builds it)")
    with running_cpp_server(tiny_llama) as server:
        yield server
