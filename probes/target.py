"""A target process: its PID, threads, executable and the files it has mapped.

Files are opened through ``/proc/PID/root`` so a process in another mount namespace (a
container) is read from its own filesystem; a mapped file that was deleted or replaced
on disk after it was loaded is reached through ``/proc/PID/map_files`` instead, which
always names the inode the process really runs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from probes.errors import (
    AmbiguousTargetError,
    TargetAccessError,
    TargetExitedError,
    TargetNotFoundError,
    target_access_hint,
)

PROC = Path("/proc")


@dataclass(frozen=True)
class MappedFile:
    """One file mapped into a process.

    Attributes:
        path: path as the process sees it (inside its mount namespace).
        open_path: path the monitor opens to read the very inode the process mapped,
            and the path handed to the kernel for a uprobe.
        dev: device number of the mapped inode as ``major:minor`` hex text from maps.
        inode: inode number of the mapped file.
        deleted: the file was unlinked or replaced after it was mapped.
        base: lowest virtual address at which the file is mapped.
    """

    path: str
    open_path: str
    dev: str
    inode: int
    deleted: bool
    base: int

    @property
    def name(self) -> str:
        """Basename of the mapped path, for example ``libc.so.6``."""
        return os.path.basename(self.path)


@dataclass(frozen=True)
class _MapsLine:
    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str


def _parse_maps(text: str) -> Iterator[_MapsLine]:
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        yield _MapsLine(start, end, parts[1], int(parts[2], 16), parts[3], int(parts[4]),
                        parts[5])


def _split_stat(stat: str) -> tuple[str, list[str]]:
    """``/proc/PID/stat`` as (comm, the fields after it, from ``state`` on)."""
    # comm may hold spaces and parentheses: fields start after the last ')'
    end = stat.rindex(")")
    return stat[stat.index("(") + 1:end], stat[end + 2:].split()


class Target:
    """A live process the monitor attaches to. Cheap to create; reads /proc on demand."""

    def __init__(self, pid: int) -> None:
        """Bind to ``pid``; raises :class:`TargetNotFoundError` if it does not exist."""
        self.pid = pid
        self._proc = PROC / str(pid)
        try:
            stat = (self._proc / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise TargetNotFoundError(f"no process with pid {pid}") from exc
        # the name at bind time, kept for a process that exits before anyone asks
        self._last_name, fields = _split_stat(stat)
        self.start_time = int(fields[19])

    def __repr__(self) -> str:
        return f"Target(pid={self.pid}, name={self.name!r})"

    def _stat_fields(self) -> list[str]:
        return _split_stat((self._proc / "stat").read_text())[1]

    def alive(self) -> bool:
        """True while the same process runs (not a zombie, not a reused PID)."""
        try:
            fields = self._stat_fields()
        except (OSError, ValueError):
            return False
        if int(fields[19]) != self.start_time:
            return False
        if fields[0] in ("Z", "X"):
            # a zombie whose other threads still run is alive (main thread called
            # pthread_exit); one with a single task left has exited
            try:
                return len(os.listdir(self._proc / "task")) > 1
            except OSError:
                return False
        return True

    @property
    def name(self) -> str:
        """The process's ``comm`` (short name); once it has gone, the last one read (a
        process killed right after attaching is still named in summaries and history)."""
        with contextlib.suppress(OSError):
            self._last_name = (self._proc / "comm").read_text().strip()
        return self._last_name

    @property
    def cmdline(self) -> list[str]:
        """Arguments of the process (empty for kernel threads or a gone process)."""
        try:
            raw = (self._proc / "cmdline").read_bytes()
        except OSError:
            return []
        return [a.decode(errors="replace") for a in raw.split(b"\0") if a]

    def _refused(self, what: str) -> TargetAccessError:
        """The typed error for a ``/proc/PID/<what>`` the kernel would not let us read."""
        return TargetAccessError(f"cannot read /proc/{self.pid}/{what} ({self.name}): "
                                 f"permission denied; {target_access_hint()}")

    @property
    def exe(self) -> str:
        """Path of the executable as the process sees it."""
        try:
            return os.readlink(self._proc / "exe").removesuffix(" (deleted)")
        except PermissionError as exc:
            raise self._refused("exe") from exc
        except OSError as exc:
            if exc.errno == errno.ENOENT and self.alive() and not self.cmdline:
                raise TargetNotFoundError(f"pid {self.pid} ({self.name}) is a kernel thread: "
                                          "it has no executable or libraries to probe") from exc
            raise TargetExitedError(f"cannot read the executable of pid {self.pid}: "
                                    f"{exc.strerror}") from exc

    @property
    def root(self) -> str:
        """The process's root directory as reachable from the monitor."""
        return str(self._proc / "root")

    def threads(self) -> list[int]:
        """Thread ids of the process now (threads come and go; call again to refresh)."""
        try:
            return sorted(int(t) for t in os.listdir(self._proc / "task"))
        except PermissionError as exc:
            raise self._refused("task") from exc
        except FileNotFoundError as exc:
            raise TargetExitedError(f"process {self.pid} has exited") from exc

    def maps_text(self) -> str:
        """Raw ``/proc/PID/maps``; :class:`TargetAccessError` (exit 3) when it is refused."""
        try:
            return (self._proc / "maps").read_text()
        except PermissionError as exc:
            raise self._refused("maps") from exc
        except FileNotFoundError as exc:
            raise TargetExitedError(f"process {self.pid} has exited") from exc

    def check_access(self) -> None:
        """Fail with exit-code-3 advice when this user cannot read the target's memory
        map or its executable (another user's process, a private directory).

        Without this, an unreadable executable only shows as probes that do not resolve.
        """
        exe = self.exe
        for mapped in self.mapped_files():
            if mapped.path != exe:
                continue
            try:
                os.close(os.open(mapped.open_path, os.O_RDONLY | os.O_CLOEXEC))
            except PermissionError as exc:
                raise TargetAccessError(f"cannot read {exe}, the executable of pid "
                                        f"{self.pid} ({exc.strerror}): "
                                        f"{target_access_hint()}") from exc
            except FileNotFoundError:
                continue  # exited meanwhile: the caller finds out

    def mapped_files(self) -> list[MappedFile]:
        """Every distinct file mapped by the process, executable mappings included."""
        lines = list(_parse_maps(self.maps_text()))
        by_inode: dict[tuple[str, int], list[_MapsLine]] = {}
        for ml in lines:
            by_inode.setdefault((ml.dev, ml.inode), []).append(ml)
        result = []
        for (dev, inode), group in by_inode.items():
            if inode == 0:
                continue
            first = min(group, key=lambda m: m.start)
            path = first.path
            deleted = path.endswith(" (deleted)")
            path = path.removesuffix(" (deleted)")
            open_path = self.root + path
            if not deleted and not _same_file(open_path, dev, inode):
                deleted = True  # replaced on disk since it was mapped (an upgrade, say)
            if deleted:
                open_path = str(self._proc / "map_files" / f"{first.start:x}-{first.end:x}")
            result.append(MappedFile(path, open_path, dev, inode, deleted,
                                     first.start - first.offset))
        return result

    def find_library(self, name: str) -> list[MappedFile]:
        """Mapped files matching ``name``: a path, a basename, or a soname prefix.

        ``libc`` matches ``libc.so.6`` and ``libc-2.31.so`` but not ``libcuda.so``;
        glob characters are honoured (``libcudart*``).
        """
        files = self.mapped_files()
        return match_library(files, name)


def match_library(files: Iterable[MappedFile], name: str) -> list[MappedFile]:
    """Files among ``files`` whose path or basename matches ``name`` (see find_library)."""
    import fnmatch

    out = []
    for f in files:
        if "/" in name:
            if f.path == name or fnmatch.fnmatch(f.path, name):
                out.append(f)
        elif any(c in name for c in "*?["):
            if fnmatch.fnmatch(f.name, name):
                out.append(f)
        elif f.name == name or re.match(re.escape(name) + r"([.\-_]|$)", f.name):
            out.append(f)
    return out


def _same_file(path: str, dev: str, inode: int) -> bool:
    """True when ``path`` is the inode maps names (``dev`` as maps writes it, hex maj:min)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    major, _, minor = dev.partition(":")
    try:
        same_dev = (os.major(st.st_dev), os.minor(st.st_dev)) == (int(major, 16), int(minor, 16))
    except ValueError:
        same_dev = True  # an unreadable dev field: fall back to the inode alone
    return same_dev and st.st_ino == inode


def find_targets(pattern: str, *, exclude_self: bool = True) -> list[Target]:
    """Processes whose command line matches the regular expression ``pattern``.

    The monitor itself and its parent shell are excluded, so ``--match python`` does not
    pick the monitor. Raises :class:`TargetNotFoundError` when nothing matches.
    """
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise TargetNotFoundError(f"bad pattern {pattern!r}: {exc}") from exc
    skip = {os.getpid(), os.getppid()} if exclude_self else set()
    found = []
    for entry in os.listdir(PROC):
        if not entry.isdigit() or int(entry) in skip:
            continue
        try:
            raw = (PROC / entry / "cmdline").read_bytes()
        except OSError:
            continue
        if not raw:
            continue  # kernel thread
        cmd = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        if rx.search(cmd):
            try:
                found.append(Target(int(entry)))
            except TargetNotFoundError:
                continue
    if not found:
        raise TargetNotFoundError(f"no process command line matches {pattern!r}")
    return sorted(found, key=lambda t: t.pid)


def _one_line(cmdline: list[str], width: int = 40) -> str:
    """A command line shortened to ``width`` characters on one line (``-c`` code has newlines)."""
    return " ".join(" ".join(cmdline).split())[:width]


def resolve_target(pid: int | None = None, match: str | None = None,
                   *, allow_many: bool = False) -> list[Target]:
    """Targets named by ``--pid`` or ``--match`` as the CLI gives them.

    With ``allow_many`` false a pattern that matches several processes raises
    :class:`AmbiguousTargetError` listing them, so the user can pick one.
    """
    if pid is not None:
        if pid <= 0:
            raise TargetNotFoundError(f"no process with pid {pid}")
        return [Target(pid)]
    if match is None:
        raise TargetNotFoundError("name a target with --pid PID or --match REGEX")
    targets = find_targets(match)
    if len(targets) > 1 and not allow_many:
        listing = ", ".join(f"{t.pid} ({_one_line(t.cmdline)})" for t in targets[:8])
        raise AmbiguousTargetError(
            f"{len(targets)} processes match {match!r}: {listing}; pick one with --pid")
    return targets
