"""The `prism` command against real processes and real libraries, as a user runs it."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from probes.catalog import load_profile
from probes.placement import place_profile
from probes.target import Target
from probes.uprobes import Span, UprobeSession
from tests.conftest import CTarget

PRISM = [sys.executable, "-m", "prism_tui.cli"]


def prism(*args: str, timeout: float = 60, user: str | None = None
          ) -> subprocess.CompletedProcess[str]:
    cmd = [*PRISM, *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",
               "--inh-caps=-all", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parent.parent)


def trace_json(*args: str, timeout: float = 60) -> dict[str, Any]:
    result = prism("trace", *args, "--json", timeout=timeout)
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def test_trace_sleeping_python_child(python_child: Any) -> None:
    child = python_child(
        "import sys, time\nsys.stdin.readline()\n"
        "for _ in range(100): time.sleep(0.01)\n")
    tracer = subprocess.Popen(
        [*PRISM, "trace", "--pid", str(child.pid), "--probe", "libc:clock_nanosleep",
         "--ret", "--duration", "30", "--json"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)  # attached (the tracer prints nothing before it is)
    child.stdin.write("go\n")
    child.stdin.flush()
    out, err = tracer.communicate(timeout=60)
    assert tracer.returncode == 0, err
    doc = json.loads(out)
    assert doc["count"] == 100
    assert doc["target_exited"] is True  # the child finished: the trace ended by itself
    # The bound: a median within 5 % of the sleep (a sleep never ends early).
    assert 10.0 * 0.99 <= doc["p50_ms"] < 10.0 * 1.05, doc["p50_ms"]
    for key in ("rate_hz", "p90_ms", "p99_ms", "p999_ms", "max_ms", "lost"):
        assert key in doc
    assert doc["lost"] == 0


def test_trace_text_output_has_a_histogram(ctarget: CTarget) -> None:
    ctarget.cmd("spin_start 2000")
    result = prism("trace", "--pid", str(ctarget.pid), "--probe", "ctarget:pl_sleep_us",
                   "--ret", "--duration", "1.5")
    assert result.returncode == 0, result.stderr
    assert "distribution" in result.stdout and "p99.9" in result.stdout
    assert "calls in" in result.stdout


def test_trace_entry_only_reports_interval_between_calls(ctarget: CTarget) -> None:
    ctarget.cmd("spin_start 5000")  # pl_work about every 5 ms
    doc = trace_json("--pid", str(ctarget.pid), "--probe", "ctarget:pl_work",
                     "--duration", "1.5")
    assert doc["measure"] == "interval"
    assert doc["count"] > 100
    assert 5.0 <= doc["p50_ms"] < 7.5


def test_numpy_openblas_sgemm_by_glob(python_child: Any) -> None:
    child = python_child(
        "import sys\nimport numpy as np\n"
        "a = np.ones((64, 64), dtype=np.float32)\n"
        "print('ready', flush=True)\nsys.stdin.readline()\n"
        "for _ in range(40): a @ a\n"
        "print('done', flush=True)\nsys.stdin.readline()\n")
    assert child.stdout.readline().strip() == "ready"
    target = Target(child.pid)
    placement = place_profile(target, load_profile("blas"), "sentinel")
    sites = [s for s in placement.sites if "sgemm" in s.symbol]
    assert any(s.symbol == "scipy_cblas_sgemm64_" for s in sites), placement.decisions
    with UprobeSession([target], sites) as session:
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "done"
        time.sleep(0.05)
        spans = session.read()
    assert len(spans) == 40
    # M, N, K captured from the integer argument registers
    assert {(s.args["M"], s.args["N"], s.args["K"]) for s in spans} == {(64, 64, 64)}


def _libpython_or_fail(pid: int) -> None:
    target = Target(pid)
    libs = [f for f in target.mapped_files() if f.name.startswith("libpython")]
    if not libs:
        pytest.fail("this interpreter has no libpython mapped (a static build): take_gil "
                    "and gc_collect_main would have to be probed in the executable")


def test_cpython_gc_and_gil_probes(python_child: Any) -> None:
    child = python_child(
        "import gc, sys, threading, time\n"
        "stop = False\n"
        "def spin():\n"
        "    x = 0\n"
        "    while not stop: x += 1\n"
        "print('ready', flush=True)\nsys.stdin.readline()\n"
        "t = threading.Thread(target=spin); t.start()\n"
        "for _ in range(30):\n"
        "    gc.collect(); y = sum(range(20000))\n"
        "stop = True; t.join()\n"
        "print('done', flush=True)\nsys.stdin.readline()\n")
    assert child.stdout.readline().strip() == "ready"
    _libpython_or_fail(child.pid)
    target = Target(child.pid)
    placement = place_profile(target, load_profile("cpython"), "sentinel")
    status = {d.probe: d for d in placement.decisions}
    assert status["gc"].status == "resolved", status["gc"].reason
    assert status["gil_wait"].status == "resolved", status["gil_wait"].reason
    spans: list[Span] = []
    with UprobeSession([target], placement.sites) as session:
        child.stdin.write("go\n")
        child.stdin.flush()
        answer: list[str] = []
        reader = threading.Thread(target=lambda: answer.append(child.stdout.readline()))
        reader.start()
        while reader.is_alive():  # poll while it runs: the spinning thread is new
            spans += session.poll(0.02)
        time.sleep(0.05)
        spans += session.read()
    assert answer == ["done\n"]
    gc_spans = [s for s in spans if s.probe == "gc"]
    gil_spans = [s for s in spans if s.probe == "gil_wait"]
    assert len(gc_spans) >= 30
    assert gil_spans and {s.tid for s in gil_spans} >= {child.pid}
    assert all(s.duration_ns > 0 for s in gc_spans)


CUDART_CALLER = r"""
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                ctypes.c_int, ctypes.c_void_p]
print("ready", flush=True)
sys.stdin.readline()
codes = set()
for i in range(25):
    codes.add(lib.cudaStreamSynchronize(None))
    codes.add(lib.cudaMemcpyAsync(None, None, 4096 * (i + 1), 2, None))
print("done", sorted(codes), flush=True)
sys.stdin.readline()
"""


def test_cuda_profile_traces_the_real_libcudart(python_child: Any) -> None:
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    assert spec is not None and spec.submodule_search_locations, \
        "nvidia-cuda-runtime-cu12 (a dev dependency) is not installed"
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib" / "libcudart.so.12"
    child = python_child(CUDART_CALLER.replace("sys.argv[1]", repr(str(lib))))
    assert child.stdout.readline().strip() == "ready"
    target = Target(child.pid)
    placement = place_profile(target, load_profile("cuda"), "sentinel")
    resolved = {d.probe for d in placement.decisions if d.status == "resolved"}
    assert {"stream_sync", "memcpy_async"} <= resolved
    with UprobeSession([target], placement.sites) as session:
        child.stdin.write("go\n")
        child.stdin.flush()
        answer = child.stdout.readline().split(maxsplit=1)
        time.sleep(0.05)
        spans = session.read()
    assert answer[0] == "done"  # the calls failed without a driver, but they were made
    syncs = [s for s in spans if s.probe == "stream_sync"]
    copies = [s for s in spans if s.probe == "memcpy_async"]
    assert len(syncs) == 25 and len(copies) == 25
    assert [s.args["bytes"] for s in copies] == [4096 * (i + 1) for i in range(25)]
    assert {int(s.args["kind"]) & 0xFFFFFFFF for s in copies} == {2}


def test_symbols_json_for_the_c_target(ctarget: CTarget, tmp_path: Path) -> None:
    from tests.conftest import CTARGET_PROFILE

    profile = tmp_path / "ctarget.toml"
    # pl_lea: endbr64 then a lea, which the kernel single-steps even after the endbr64
    profile.write_text(CTARGET_PROFILE + '\n[[probe]]\nid = "lea"\nlibrary = "exe"\n'
                       'symbol = "pl_lea"\nstage = "host"\n')
    result = prism("symbols", "--pid", str(ctarget.pid), "--profile", str(profile), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    probes = {p["probe"]: p for p in doc["profiles"][0]["probes"]}
    assert probes["work"]["status"] == "resolved"
    site = probes["work"]["sites"][0]
    assert site["skipped_endbr64"] and site["site"] == "emulated"
    assert probes["missing"]["status"] == "missing"
    # every site carries its estimated cost per call (the hit costs measured at start-up)
    sites = [s for p in probes.values() for s in p["sites"]]
    assert sites and all(s["est_cost_us_per_call"] > 0 for s in sites)
    lea = probes["lea"]["sites"][0]
    assert lea["skipped_endbr64"] and lea["site"] == "single-step"
    assert not site["ret"] and not lea["ret"]  # both entry-only: same cost terms
    assert site["est_cost_us_per_call"] <= lea["est_cost_us_per_call"]
    text = prism("symbols", "--pid", str(ctarget.pid), "--profile", str(profile))
    assert "after endbr64" in text.stdout and "pl_does_not_exist" in text.stdout


def test_symbols_without_profile_lists_applicable_ones(python_child: Any) -> None:
    child = python_child("import sys\nprint('ready', flush=True)\nsys.stdin.readline()\n")
    assert child.stdout.readline().strip() == "ready"
    result = prism("symbols", "--pid", str(child.pid), "--json")
    assert result.returncode == 0, result.stderr
    names = {p["profile"] for p in json.loads(result.stdout)["profiles"]}
    assert "cpython" in names and "cuda" not in names


@pytest.mark.parametrize("args, needle", [
    (["trace", "--pid", "999999999", "--probe", "libc:read"], "no process with pid"),
    (["trace", "--match", "no-such-process-xyzzy", "--probe", "libc:read"], "no process"),
    (["trace", "--pid", "{pid}", "--probe", "libc:clock_nanosleeep"], "clock_nanosleep"),
    (["trace", "--pid", "{pid}", "--probe", "libnotthere:foo"], "not mapped"),
    (["trace", "--pid", "{pid}", "--probe", "no-colon"], "LIB:SYMBOL"),
    (["symbols", "--pid", "{pid}", "--profile", "nope"], "nope"),
])
def test_bad_input_is_one_line_and_exit_2(python_child: Any, args: list[str],
                                          needle: str) -> None:
    child = python_child("import time\ntime.sleep(60)\n")
    result = prism(*[a.replace("{pid}", str(child.pid)) for a in args])
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_trace_match_of_two_processes_is_one_line_and_exit_2(python_child: Any) -> None:
    """Several processes match --match: trace wants one, so it lists them and stops."""
    code = "import time; time.sleep(60)  # prism-twin-7"  # one line: a cmdline may be listed
    first, second = python_child(code), python_child(code)
    # the pattern does not match its own text (`[` is no digit), nor pick prism itself
    result = prism("trace", "--match", "prism-twin-[0-9]", "--probe", "libc:clock_nanosleep",
                   "--duration", "1")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "2 processes match" in line and "--pid" in line
    assert str(first.pid) in line and str(second.pid) in line
    assert result.stdout == ""


def test_malformed_profile_names_file_and_line(python_child: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[profile]\nname = "bad"\ndescription = "x"\n\n[[probe]]\nid = 3\n')
    child = python_child("import time\ntime.sleep(60)\n")
    result = prism("symbols", "--pid", str(child.pid), "--profile", str(bad))
    assert result.returncode == 2
    assert "bad.toml:" in result.stderr and "Traceback" not in result.stderr


def test_no_permission_exits_3_with_what_to_grant(python_child: Any) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test drops root to check the permission path; run it as root")
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to run prism as an unprivileged user")
    child = python_child("import time\ntime.sleep(60)\n")
    result = prism("trace", "--pid", str(child.pid), "--probe", "libc:clock_nanosleep",
                   user="65534")
    assert result.returncode == 3, (result.returncode, result.stderr)
    assert "CAP_SYS_ADMIN" in result.stderr and "root" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_without_permission_exits_3_before_starting_anything() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test drops root to check the permission path; run it as root")
    before = set(os.listdir("/dev/shm"))
    result = prism("demo", "--headless", "--duration", "30", user="65534")
    assert result.returncode == 3, (result.returncode, result.stderr)
    assert "CAP_SYS_ADMIN" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr
    # nothing was started: no simulator ranks, no broker, no shared memory
    assert result.stdout == "" and set(os.listdir("/dev/shm")) == before


def test_trace_of_a_thread_already_running_in_the_c_target(ctarget: CTarget) -> None:
    """pl_sleep_us(2000) in a thread started before the trace: one call per span, ~2 ms."""
    ctarget.cmd("spin_start 2000")
    doc = trace_json("--pid", str(ctarget.pid), "--probe", "ctarget:pl_sleep_us", "--ret",
                     "--duration", "1.5")
    assert doc["count"] > 100
    # Never shorter than the sleep (paired entry and return of one call), never two calls
    # long; the upper margin is scheduling delay on a loaded 2-core runner.
    assert 2.0 * 0.99 <= doc["p50_ms"] < 2.0 * 1.4


def test_headless_watch_prints_each_new_notice_once() -> None:
    """The engine keeps its last five notices; the headless printer shows only new ones."""
    from prism_tui.cli.watch import new_notices

    assert new_notices((), ("a",)) == ("a",)
    assert new_notices(("a",), ("a",)) == ()
    assert new_notices(("a", "b"), ("a", "b", "c")) == ("c",)
    assert new_notices(("a", "b", "c", "d", "e"), ("b", "c", "d", "e", "f")) == ("f",)
    assert new_notices(("a", "b"), ("x", "y")) == ("x", "y")  # more than five came
