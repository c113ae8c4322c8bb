"""Bad input to the real `prism` command: one line on stderr, no traceback, its exit code.

Each test runs the command line as a subprocess, as a user would; the permission cases
drop root with ``setpriv`` (uid 65534) and point the command at a root-owned process or
file, so the kernel itself refuses the read.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

PRISM = [sys.executable, "-m", "prism_tui.cli"]
ROOT = Path(__file__).resolve().parent.parent
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def prism(*args: str, as_user: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``prism ARGS`` (optionally under ``as_user``, a setpriv prefix) and return it."""
    cmd = [*(as_user or []), *PRISM, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a refused command (fails on a traceback or several lines)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    return lines[0]


def need_root_and_setpriv() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test drops root to check the permission path; run it as root")
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to run prism as an unprivileged user")


def test_symbols_of_a_process_we_may_not_read_exits_3_naming_maps(python_child: Any) -> None:
    """The issue's traceback: /proc/PID/maps of another user's process is refused."""
    need_root_and_setpriv()
    child = python_child("import time\ntime.sleep(60)\n")
    result = prism("symbols", "--pid", str(child.pid), as_user=[*NOBODY, "--inh-caps=-all"])
    assert result.returncode == 3, (result.returncode, result.stderr)
    line = one_line(result)
    assert line.startswith("prism symbols: ")
    assert f"/proc/{child.pid}/maps" in line and "permission denied" in line
    assert "CAP_SYS_PTRACE" in line and "root" in line


@pytest.mark.parametrize("command", [
    ["trace", "--probe", "libc:nosuchfn"],
    ["watch", "--profile", "cpython", "--headless", "--duration", "2", "--no-history"],
])
def test_perf_events_alone_cannot_read_a_root_process_exit_3(python_child: Any,
                                                             command: list[str]) -> None:
    """CAP_SYS_ADMIN passes the perf check, but without CAP_SYS_PTRACE the target's
    files stay out of reach."""
    need_root_and_setpriv()
    child = python_child("import time\ntime.sleep(60)\n")
    as_user = [*NOBODY, "--inh-caps=+sys_admin", "--ambient-caps=+sys_admin"]
    result = prism(*command, "--pid", str(child.pid), as_user=as_user)
    assert result.returncode == 3, (result.returncode, result.stderr)
    line = one_line(result)
    assert line.startswith(f"prism {command[0]}: ") and "permission denied" in line
    assert "root" in line


SYMBOLS = ["symbols"]
WATCH = ["watch", "--headless", "--duration", "2", "--no-history"]


@pytest.mark.parametrize("args, needle", [  # trace's own cases are in tests/test_cli.py
    ([*SYMBOLS, "--pid", "999999999"], "no process with pid 999999999"),
    ([*SYMBOLS, "--pid", "-3"], "no process with pid -3"),
    ([*SYMBOLS, "--match", "no-such-process-xyzzy-[0-9]"], "no process command line matches"),
    ([*WATCH, "--pid", "999999999"], "no process with pid 999999999"),
    ([*WATCH, "--match", "no-such-process-xyzzy-[0-9]"], "no process command line matches"),
    ([*WATCH, "--match", "("], "bad pattern"),
])
def test_a_target_that_is_not_there_exits_2(args: list[str], needle: str) -> None:
    result = prism(*args)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert needle in one_line(result)


def _kernel_thread() -> int | None:
    """A kernel thread's pid (no command line, parent kthreadd), if this pid namespace shows one."""
    for entry in sorted(os.listdir("/proc"), key=lambda e: (len(e), e)):
        if not entry.isdigit() or entry in ("1", "2"):
            continue
        try:
            if Path(f"/proc/{entry}/cmdline").read_bytes():
                continue
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2:].split()[1] == "2":  # ppid: kthreadd
            return int(entry)
    return None


def test_symbols_of_a_kernel_thread_says_so_and_exits_2() -> None:
    pid = _kernel_thread()
    if pid is None:
        pytest.skip("no kernel thread is visible in this pid namespace (a container)")
    result = prism("symbols", "--pid", str(pid))
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "kernel thread" in one_line(result)


def test_history_of_a_file_we_may_not_read_exits_3(tmp_path: Path) -> None:
    need_root_and_setpriv()
    tmp_path.chmod(0o755)
    db = tmp_path / "history.sqlite"
    db.write_bytes(b"")
    db.chmod(0o600)  # root's own history
    result = prism("history", "--db", str(db), as_user=[*NOBODY, "--inh-caps=-all"])
    assert result.returncode == 3, (result.returncode, result.stderr)
    line = one_line(result)
    assert str(db) in line and "permission denied" in line
