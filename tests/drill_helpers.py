"""Helpers of the operator drills: ``prism watch`` as a child process and its probe sites.

Real parts only: the C target, ``prism watch`` run as the operator runs it, the kernel's
uprobes observed from outside (the target's text read through ``/proc/PID/mem``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from probes.catalog import parse_profile
from probes.symbols import resolve
from tests.conftest import CTARGET_PROFILE

ROOT = Path(__file__).resolve().parent.parent
PRISM = [sys.executable, "-m", "prism_tui.cli"]
TRACEFS_UPROBE_EVENTS = ("/sys/kernel/tracing/uprobe_events",
                         "/sys/kernel/debug/tracing/uprobe_events")
CODE_BYTES = 16
"""Bytes compared at each probed function's entry (the probe sits in the first 4)."""


def profile_file(folder: Path) -> Path:
    """The C target's profile as a file ``prism watch --profile`` can load."""
    path = folder / "ctarget.toml"
    path.write_text(CTARGET_PROFILE)
    return path


def watch_env(state: Path) -> dict[str, str]:
    """A minimal environment: the worktree on the path, state (the outbox) under ``state``."""
    return {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(state),
            "XDG_STATE_HOME": str(state), "PYTHONPATH": str(ROOT)}


def start_watch(pid: int, folder: Path, *args: str,
                preexec: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """``prism watch --pid PID --headless`` on the C target; stdout/stderr to files."""
    folder.mkdir(parents=True, exist_ok=True)
    out = open(folder / "watch.out", "ab")  # noqa: SIM115 (the child owns it)
    err = open(folder / "watch.err", "ab")  # noqa: SIM115
    try:
        return subprocess.Popen(
            [*preexec, *PRISM, "watch", "--pid", str(pid), "--profile",
             str(profile_file(folder)), "--headless", *args],
            stdout=out, stderr=err, cwd=ROOT, env=watch_env(folder / "state"))
    finally:
        out.close()
        err.close()


def probed_functions() -> list[str]:
    """The symbols the C target's profile probes (those that exist)."""
    profile = parse_profile(CTARGET_PROFILE, "ctarget")
    return sorted({p.symbol for p in profile.probes if p.symbol != "pl_does_not_exist"})


def _vaddr(pid: int, exe: Path, file_offset: int) -> int:
    """Where ``file_offset`` of ``exe`` is mapped in ``pid`` (from /proc/PID/maps)."""
    real = os.path.realpath(exe)
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) < 6 or fields[5] != real:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            offset = int(fields[2], 16)
            if offset <= file_offset < offset + (end - start):
                return start + file_offset - offset
    raise AssertionError(f"offset {file_offset:#x} of {exe} is not mapped in pid {pid}")


def changed_code(pid: int, exe: Path) -> dict[str, tuple[bytes, bytes]]:
    """Probed functions whose bytes in the running ``pid`` differ from ``exe`` on disk.

    A uprobe is an ``int3`` the kernel writes into the process's copy of the text
    page: while one is registered the bytes differ, once it is gone they match again.
    """
    changed = {}
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem, open(exe, "rb") as elf:
        for name in probed_functions():
            (sym,) = resolve(str(exe), name)
            elf.seek(sym.file_offset)
            on_disk = elf.read(CODE_BYTES)
            mem.seek(_vaddr(pid, exe, sym.file_offset))
            in_memory = mem.read(CODE_BYTES)
            if in_memory != on_disk:
                changed[name] = (on_disk, in_memory)
    return changed


def tracefs_uprobes(exe: Path) -> list[str] | None:
    """Lines of the tracefs ``uprobe_events`` naming ``exe`` (None: tracefs not mounted)."""
    for path in TRACEFS_UPROBE_EVENTS:
        try:
            with open(path) as f:
                return [line for line in f if str(exe) in line]
        except OSError:
            continue
    return None


async def wait_for(what: str, predicate: Callable[[], bool], timeout_s: float = 30.0,
                   proc: subprocess.Popen[bytes] | None = None,
                   log: Path | None = None) -> None:
    """Poll ``predicate`` (the loop runs meanwhile); fail with ``what`` and the watcher's
    stderr when ``proc`` exits or after the timeout."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"prism watch exited {proc.returncode} before: {what}\n"
                        f"{log.read_text() if log else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s:g} s: {what}\n"
                        f"{log.read_text() if log and log.exists() else ''}")
        await asyncio.sleep(0.05)


def kill_hard(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL (no handler, no cleanup of its own) and reap."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
