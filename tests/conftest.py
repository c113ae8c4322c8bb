"""Shared fixtures: the native C target (built here with the system compiler) and helpers.

Every probe test attaches real uprobes to real processes; nothing in the probe layer is
mocked.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # only for annotations: a test session need not import placement
    from probes.placement import ProbeSite


def nvml_loadable() -> bool:
    """Whether NVML's library loads here (it does not on a host without NVIDIA's driver)."""
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True

ROOT = Path(__file__).resolve().parent.parent
CTARGET_SRC = ROOT / "tests" / "targets" / "ctarget.c"
CFLAGS = ["-O0", "-g", "-fcf-protection=full", "-pthread"]


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Run anyio tests on asyncio only (the monitor's loop)."""
    return "asyncio"


@pytest.fixture(scope="session")
def ctarget_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The C target, compiled once per test session."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler (cc/gcc) on PATH: `make test` installs build-essential")
    out = tmp_path_factory.mktemp("ctarget") / "ctarget"
    subprocess.run([cc, *CFLAGS, str(CTARGET_SRC), "-o", str(out)], check=True)
    return out


class CTarget:
    """A running C target driven line by line over its stdin/stdout."""

    def __init__(self, exe: Path) -> None:
        self.exe = exe
        self.proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline().split()
        assert ready[0] == "ready", ready
        self.pid = self.proc.pid

    def cmd(self, line: str) -> int:
        """Send one command and return the value it answers."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().split()
        assert answer and answer[0] == "ok", f"{line!r} -> {answer!r}"
        return int(answer[1])

    def close(self) -> None:
        """Stop the target (idempotent)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def ctarget(ctarget_exe: Path) -> Iterator[CTarget]:
    """A fresh C target process, waiting for commands."""
    target = CTarget(ctarget_exe)
    yield target
    target.close()


@pytest.fixture
def python_child() -> Iterator[Callable[[str], subprocess.Popen[str]]]:
    """Start Python children running a script; every one is killed at teardown."""
    children: list[subprocess.Popen[str]] = []

    def start(code: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        children.append(proc)
        return proc

    yield start
    for proc in children:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        time.sleep(0.01)


def open_fds() -> set[str]:
    """This process's open file descriptors (to check that nothing leaks)."""
    return set(os.listdir("/proc/self/fd"))


CTARGET_PROFILE = """
[profile]
name = "ctarget"
description = "the test suite's C target"
anchor = "work"

[[library]]
id = "exe"
soname = ["ctarget*"]

[[probe]]
id = "work"
library = "exe"
symbol = "pl_work"
stage = "host"

[[probe]]
id = "args6"
library = "exe"
symbol = "pl_args6"
stage = "host"
ret = true
[probe.args]
a = "arg1"
b = "arg2"
c = "arg3"
d = "arg4"
e = "arg5"
f = "arg6"
sum = "ret"

[[probe]]
id = "struct"
library = "exe"
symbol = "pl_struct"
stage = "host"
[probe.args]
sa = "stack+8:i64"
sb = "stack+16:i64"
sc = "stack+24:i64"

[[probe]]
id = "outer"
library = "exe"
symbol = "pl_outer"
stage = "host"
ret = true

[[probe]]
id = "inner"
library = "exe"
symbol = "pl_inner"
stage = "device_sync"
ret = true
level = "deepdive"

[[probe]]
id = "recurse"
library = "exe"
symbol = "pl_recurse"
stage = "host"
ret = true
[probe.args]
depth = "arg1"

[[probe]]
id = "missing"
library = "exe"
symbol = "pl_does_not_exist"
stage = "host"
optional = true
"""


SERVER_PROFILE = """
[profile]
name = "ctarget-server"
description = "the C target's serve loop: one step per iteration, many ops per step"
anchor = "step"

[[library]]
id = "exe"
soname = ["ctarget*"]

[[probe]]
id = "step"
library = "exe"
symbol = "pl_step"
stage = "host"

[[probe]]
id = "op"
library = "exe"
symbol = "pl_op"
stage = "host"
"""
"""The C target's ``serve_start`` loop (``pl_step`` every iteration, ``pl_op`` many
times a step): the governor's tests and bench, and anchor discovery's."""


INT3 = 0xCC
"""The x86 breakpoint instruction a registered uprobe writes into the target's page."""


def breakpoints(pid: int, sites: Sequence[ProbeSite]) -> dict[str, bool]:
    """Whether each site's first byte in the target's memory is a breakpoint (int3).

    A registered uprobe is an ``int3`` written into the process's copy of the page, so
    this reads what the kernel has installed, whichever interface installed it.
    """
    out: dict[str, bool] = {}
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for site in sites:
            for line in maps:
                fields = line.split()
                if len(fields) < 6 or int(fields[4]) != site.inode:
                    continue
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                file_off = int(fields[2], 16)
                if file_off <= site.offset < file_off + (hi - lo):
                    mem.seek(lo + site.offset - file_off)
                    out[site.probe] = mem.read(1)[0] == INT3
                    break
    return out
