"""Target processes read from /proc: real children, real mappings, a file replaced on disk
after it was mapped, a zombie, and a process in another mount namespace."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from probes.errors import AmbiguousTargetError, TargetExitedError, TargetNotFoundError
from probes.placement import place_symbol
from probes.target import Target, find_targets, resolve_target
from probes.uprobes import UprobeSession
from tests.conftest import CTarget, wait_until

StartChild = Callable[[str], subprocess.Popen[str]]

WAIT_FOR_LINE = "import sys; print('ready', flush=True); sys.stdin.readline()"


def start_waiting(python_child: StartChild, marker: str) -> subprocess.Popen[str]:
    """A Python child carrying ``marker`` in its command line, blocked on stdin."""
    proc = python_child(f"{WAIT_FOR_LINE}  # {marker}")
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def proc_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2:].split()[0]


def unique_marker(tag: str) -> str:
    return f"prism-{tag}-{os.getpid()}-{time.monotonic_ns()}"


# ------------------------------------------------------------------ finding targets


def test_nonexistent_pid_raises() -> None:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    with pytest.raises(TargetNotFoundError):
        Target(pid_max + 1)
    with pytest.raises(TargetNotFoundError):
        resolve_target(pid=0)
    with pytest.raises(TargetNotFoundError):
        resolve_target(pid=-5)
    with pytest.raises(TargetNotFoundError):
        resolve_target()


def test_reaped_child_pid_raises(python_child: StartChild) -> None:
    proc = python_child("pass")
    proc.wait()
    with pytest.raises(TargetNotFoundError):
        Target(proc.pid)


def test_match_finds_the_marked_child_only(python_child: StartChild) -> None:
    marker = unique_marker("match")
    child = start_waiting(python_child, marker)
    [target] = resolve_target(match=re.escape(marker))
    assert target.pid == child.pid
    assert any(marker in arg for arg in target.cmdline)
    # resolve_target(pid=...) gives the same process
    [by_pid] = resolve_target(pid=child.pid)
    assert by_pid.pid == child.pid and by_pid.start_time == target.start_time


def test_match_excludes_the_monitor_itself(python_child: StartChild) -> None:
    marker = unique_marker("self")
    child = start_waiting(python_child, marker)
    own = Path("/proc/self/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    pattern = f"{re.escape(marker)}|^{re.escape(own)}$"
    # the pattern does match this very process when it is not excluded ...
    assert os.getpid() in {t.pid for t in find_targets(pattern, exclude_self=False)}
    # ... and the monitor leaves itself out
    pids = {t.pid for t in find_targets(pattern)}
    assert os.getpid() not in pids
    assert child.pid in pids


def test_two_matches_are_ambiguous(python_child: StartChild) -> None:
    marker = unique_marker("twin")
    first = start_waiting(python_child, marker)
    second = start_waiting(python_child, marker)
    with pytest.raises(AmbiguousTargetError) as err:
        resolve_target(match=re.escape(marker))
    message = str(err.value)
    assert str(first.pid) in message and str(second.pid) in message
    assert "--pid" in message
    both = resolve_target(match=re.escape(marker), allow_many=True)
    assert [t.pid for t in both] == sorted([first.pid, second.pid])


def test_listing_of_matches_stays_on_one_line() -> None:
    # `python -c` code spans lines; the ambiguity error names each match on one line
    from probes.target import _one_line

    assert _one_line(["python3", "-c", "import sys\nsys.stdin.readline()"]) == (
        "python3 -c import sys sys.stdin.readline("[:40])


def test_no_match_and_bad_regex_raise() -> None:
    with pytest.raises(TargetNotFoundError) as err:
        resolve_target(match=re.escape(unique_marker("nobody")))
    assert "no process" in str(err.value)
    with pytest.raises(TargetNotFoundError) as err:
        resolve_target(match="python(")
    assert "bad pattern" in str(err.value)


# ------------------------------------------------------------------ one target


def test_threads_grow_after_a_thread_starts(ctarget: CTarget) -> None:
    target = Target(ctarget.pid)
    before = target.threads()
    assert before == [ctarget.pid]
    ctarget.cmd("spin_start 1000")
    wait_until(lambda: len(target.threads()) == 2)
    after = target.threads()
    assert ctarget.pid in after
    [new] = set(after) - set(before)
    assert Path(f"/proc/{ctarget.pid}/task/{new}").is_dir()


def test_a_target_that_exits_before_its_name_is_asked_keeps_its_bind_time_name(
        ctarget_exe: Path) -> None:
    """The name is read when the target is bound: a process killed right after an attach
    is still named (the summary of ``prism watch --json`` once said ``?`` for it)."""
    proc = CTarget(ctarget_exe)
    try:
        target = Target(proc.pid)
    finally:
        proc.close()
    assert not target.alive()
    assert target.name == "ctarget"


def test_exe_cmdline_and_name(ctarget: CTarget, ctarget_exe: Path) -> None:
    target = Target(ctarget.pid)
    assert target.exe == os.path.realpath(ctarget_exe)
    assert target.cmdline == [str(ctarget_exe)]
    assert target.name == "ctarget"
    assert target.alive()
    ctarget.close()
    assert not target.alive()
    assert target.cmdline == []
    assert target.name == "ctarget"  # the last name read, once it has gone
    with pytest.raises(TargetExitedError):
        _ = target.exe
    with pytest.raises(TargetExitedError):
        target.threads()
    with pytest.raises(TargetExitedError):
        target.mapped_files()


def _maps_rows(pid: int, path: str) -> list[list[str]]:
    rows = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == path:
            rows.append(parts)
    return rows


def test_mapped_files_lists_libc(ctarget: CTarget) -> None:
    target = Target(ctarget.pid)
    files = target.mapped_files()
    [libc] = [f for f in files if f.name == "libc.so.6"]
    assert libc.path.startswith("/") and not libc.deleted
    assert libc.open_path == f"/proc/{ctarget.pid}/root{libc.path}"
    assert os.path.isfile(libc.open_path)
    assert os.stat(libc.open_path).st_ino == libc.inode == os.stat(libc.path).st_ino
    rows = _maps_rows(ctarget.pid, libc.path)
    assert len(rows) >= 2  # text, data, ...
    first = min(rows, key=lambda r: int(r[0].split("-")[0], 16))
    assert libc.base == int(first[0].split("-")[0], 16) - int(first[2], 16)
    assert libc.dev == first[3]
    # one entry per distinct file, and the executable is among them
    assert len({(f.dev, f.inode) for f in files}) == len(files)
    assert any(f.path == target.exe for f in files)


def test_find_library_names(python_child: StartChild) -> None:
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the nvidia-cuda-runtime-cu12 wheel is not installed in the venv")
    cudart = Path(next(iter(spec.submodule_search_locations))) / "lib" / "libcudart.so.12"
    # a process mapping both libc.so.6 and libcudart.so.12: "libc" must not take the latter
    proc = python_child(f"import ctypes; ctypes.CDLL({str(cudart)!r}); {WAIT_FOR_LINE}")
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    target = Target(proc.pid)

    def names(query: str) -> list[str]:
        return sorted(f.name for f in target.find_library(query))

    assert names("libc") == ["libc.so.6"]
    assert names("libc.so.6") == ["libc.so.6"]
    assert names("libcu") == []
    assert names("libcudart") == ["libcudart.so.12"]
    assert names("libc.so*") == ["libc.so.6"]
    assert names("libcudart*") == ["libcudart.so.12"]
    assert names("libc*") == sorted(["libc.so.6", "libcudart.so.12"])
    [libc] = target.find_library("libc")
    assert names(libc.path) == ["libc.so.6"]
    assert names(os.path.dirname(libc.path) + "/libc.so*") == ["libc.so.6"]
    assert names("lib") == []  # a bare prefix without a separator matches nothing


def test_library_replaced_on_disk_is_read_through_map_files(
        ctarget_exe: Path, tmp_path: Path) -> None:
    path = tmp_path / "ctarget-replaced"
    shutil.copyfile(ctarget_exe, path)
    path.chmod(0o755)
    original = path.read_bytes()
    target_proc = CTarget(path)
    try:
        target = Target(target_proc.pid)
        [before] = target.find_library(path.name)
        assert not before.deleted
        assert before.open_path == f"/proc/{target.pid}/root{path}"
        # an upgrade: the new file is written aside and renamed over the old one
        new = tmp_path / "ctarget-replaced.new"
        new.write_bytes(b"#!/bin/sh\necho a new build\n")
        os.replace(new, path)
        [after] = target.find_library(path.name)
        assert after.deleted
        assert after.path == str(path)
        assert after.inode == before.inode != path.stat().st_ino
        assert after.open_path.startswith(f"/proc/{target.pid}/map_files/")
        with open(after.open_path, "rb") as f:
            assert f.read() == original
        assert target.exe == str(path)
        # the probe goes on the inode the target runs, not on the new file at the path
        [site] = place_symbol(target, path.name, "pl_work", ret=False)
        assert site.open_path == after.open_path
        with UprobeSession([target], [site]) as session:
            target_proc.cmd("work 7")
            time.sleep(0.05)
            assert len(session.read()) == 7
    finally:
        target_proc.close()


# ------------------------------------------------------------------ liveness


def test_zombie_and_gone_process_are_not_alive(python_child: StartChild) -> None:
    proc = start_waiting(python_child, unique_marker("zombie"))
    target = Target(proc.pid)
    assert target.alive()
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    wait_until(lambda: proc_state(proc.pid) == "Z")  # exited, not yet waited for
    assert not target.alive()
    proc.wait()
    assert not target.alive()
    with pytest.raises(TargetNotFoundError):
        Target(proc.pid)


def test_zombie_leader_with_live_threads_is_alive(python_child: StartChild) -> None:
    # the main thread calls pthread_exit while another thread keeps running
    code = ("import ctypes, sys, threading\n"
            "threading.Thread(target=sys.stdin.readline).start()\n"
            "print('ready', flush=True)\n"
            "ctypes.CDLL(None).pthread_exit(None)\n")
    proc = python_child(code)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    target = Target(proc.pid)
    wait_until(lambda: proc_state(proc.pid) == "Z")
    assert len(os.listdir(f"/proc/{proc.pid}/task")) == 2
    assert target.alive()
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    wait_until(lambda: proc.poll() is not None)
    assert not target.alive()


# ------------------------------------------------------------------ another mount namespace


@contextlib.contextmanager
def namespaced_ctarget(exe: Path, mountpoint: Path) -> Iterator[tuple[int, CTargetLike]]:
    """The C target run from a tmpfs mounted at ``mountpoint`` in a new mount namespace."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.fail("unshare (util-linux) is not installed: it is needed to put a target in "
                    "another mount namespace")
    script = 'mount -t tmpfs none "$1" && cp "$2" "$1/x" && exec "$1/x"'
    proc = subprocess.Popen([unshare, "--mount", "--propagation", "private", "--fork",
                             "sh", "-c", script, "sh", str(mountpoint), str(exe)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)
    assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
    inner = 0
    try:
        ready = proc.stdout.readline().split()
        if not ready or ready[0] != "ready":
            proc.kill()
            pytest.fail(f"unshare could not start the target in a new mount namespace: "
                        f"{proc.stderr.read().strip() or ready}")
        inner = int(ready[1])
        yield inner, CTargetLike(proc)
    finally:
        if inner:
            with contextlib.suppress(ProcessLookupError):
                os.kill(inner, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()


class CTargetLike:
    """Commands to a C target whose pipes belong to a wrapper process (unshare)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def cmd(self, line: str) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().split()
        assert answer and answer[0] == "ok", answer
        return int(answer[1])


def test_target_in_another_mount_namespace(ctarget_exe: Path, tmp_path: Path) -> None:
    mountpoint = tmp_path / "ns-only"
    mountpoint.mkdir()
    with namespaced_ctarget(ctarget_exe, mountpoint) as (pid, remote):
        exe_path = str(mountpoint / "x")
        assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        assert not os.path.exists(exe_path)  # only inside the target's namespace
        target = Target(pid)
        assert target.exe == exe_path
        [mapped] = target.find_library("x")
        assert mapped.path == exe_path
        assert not mapped.deleted
        assert mapped.open_path == f"/proc/{pid}/root{exe_path}"
        with open(mapped.open_path, "rb") as f:
            assert f.read() == ctarget_exe.read_bytes()
        [site] = place_symbol(target, "x", "pl_work", ret=False)
        assert site.open_path == mapped.open_path
        assert site.symbol == "pl_work" and site.offset == site.function_offset + 4
        # the kernel takes the same path: a real uprobe counts the target's calls
        with UprobeSession([target], [site]) as session:
            assert remote.cmd("work 5") == 15
            time.sleep(0.05)
            spans = session.read()
        assert [s.pid for s in spans] == [pid] * 5


def _overmount_and_check(ctarget_exe: Path, tmp_path: Path, filler: bool) -> None:
    """Mount a new tmpfs over the target's directory inside its namespace and put another
    file at the executable's path: maps still names the path (no "(deleted)"), but the
    path now reaches another file. ``filler`` makes its inode number differ from the
    mapped one; without it both are inode 2 (the first file of a fresh tmpfs), on
    different devices."""
    nsenter = shutil.which("nsenter")
    if nsenter is None:
        pytest.fail("nsenter (util-linux) is not installed")
    mountpoint = tmp_path / "ns-over"
    mountpoint.mkdir()
    decoy = tmp_path / "decoy"
    decoy.write_bytes(b"not the program\n")
    script = ('mount -t tmpfs none "$1" && { [ -z "$3" ] || : > "$1/filler"; } '
              '&& cp "$2" "$1/x"')
    with namespaced_ctarget(ctarget_exe, mountpoint) as (pid, _remote):
        subprocess.run([nsenter, "-t", str(pid), "-m", "sh", "-c", script, "sh",
                        str(mountpoint), str(decoy), "filler" if filler else ""], check=True)
        exe_path = str(mountpoint / "x")
        rows = _maps_rows(pid, exe_path)
        assert rows, "maps should still name the path, without (deleted)"
        now = os.stat(f"/proc/{pid}/root{exe_path}")
        mapped_dev = rows[0][3]
        assert f"{os.major(now.st_dev):02x}:{os.minor(now.st_dev):02x}" != mapped_dev
        assert (now.st_ino == int(rows[0][4])) == (not filler)
        target = Target(pid)
        [mapped] = target.find_library("x")
        assert mapped.deleted  # replaced: the path now names another file
        assert mapped.open_path.startswith(f"/proc/{pid}/map_files/")
        with open(mapped.open_path, "rb") as f:
            assert f.read() == ctarget_exe.read_bytes()
        [site] = place_symbol(target, "x", "pl_work", ret=False)
        assert site.open_path == mapped.open_path


def test_file_overmounted_in_the_target_namespace_is_read_through_map_files(
        ctarget_exe: Path, tmp_path: Path) -> None:
    _overmount_and_check(ctarget_exe, tmp_path, filler=True)


def test_overmounted_file_with_the_same_inode_number_on_another_device(
        ctarget_exe: Path, tmp_path: Path) -> None:
    _overmount_and_check(ctarget_exe, tmp_path, filler=False)


def test_python_child_sees_its_own_interpreter(python_child: StartChild) -> None:
    proc = start_waiting(python_child, unique_marker("exe"))
    target = Target(proc.pid)
    assert target.exe == os.path.realpath(sys.executable)
    assert target.cmdline[0] == sys.executable
