"""Typed setup errors of the probe layer.

Every error a user can cause (a wrong PID, a missing symbol, no permission, a malformed
profile) is a subclass of :class:`ProbeError` carrying the process exit code the CLI uses,
so the command line prints one clear line instead of a traceback (docs/architecture.md §Rules 4).
"""

from __future__ import annotations

EXIT_USAGE = 2
EXIT_PERMISSION = 3
EXIT_OTHER = 1


class ProbeError(Exception):
    """Base of every setup error raised by :mod:`probes`; ``exit_code`` is for the CLI."""

    exit_code: int = EXIT_OTHER


class TargetNotFoundError(ProbeError):
    """No process matches the PID or the command-line pattern."""

    exit_code = EXIT_USAGE


class AmbiguousTargetError(ProbeError):
    """A pattern matched several processes where exactly one was required."""

    exit_code = EXIT_USAGE


class TargetExitedError(ProbeError):
    """The target went away while it was being inspected."""

    exit_code = EXIT_USAGE


class TargetAccessError(ProbeError):
    """The kernel refused to show the monitor a target's memory map, files or threads.

    Reading ``/proc/PID/maps`` needs ptrace read access: the target's own user, or
    CAP_SYS_PTRACE; it is a permission problem (exit 3), not a missing process.
    """

    exit_code = EXIT_PERMISSION


class LibraryNotMappedError(ProbeError):
    """The named library is not mapped by the target process."""

    exit_code = EXIT_USAGE


class SymbolNotFoundError(ProbeError):
    """The symbol does not resolve in the library; ``near`` lists close names."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, near: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.near = near


class ElfError(ProbeError):
    """A mapped file could not be read as an ELF object."""

    exit_code = EXIT_USAGE


class PerfPermissionError(ProbeError):
    """The kernel refused perf events for lack of privilege."""

    exit_code = EXIT_PERMISSION


class PerfUnavailableError(ProbeError):
    """This kernel offers no uprobe PMU (or perf events are disabled)."""

    exit_code = EXIT_OTHER


class PerfOpenError(ProbeError):
    """perf_event_open or mmap failed for another reason (errno in the message)."""

    exit_code = EXIT_OTHER


class CatalogError(ProbeError):
    """A probe profile is malformed; the message names the file, line and reason."""

    exit_code = EXIT_USAGE


PERMISSION_HINT = (
    "run it as root (sudo), or grant the interpreter CAP_SYS_ADMIN (uprobe perf events), "
    "CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH (another user's process and files): "
    "sudo setcap cap_sys_admin,cap_sys_ptrace,cap_dac_read_search+ep "
    "\"$(readlink -f .venv/bin/python)\""
)
"""What to grant, as measured on Linux 6.18 with ``perf_event_paranoid`` 2
(tests/test_drill_privileges.py): CAP_PERFMON alone is refused for uprobe events."""

TARGET_ACCESS_HINT = (
    "the kernel shows a process's memory map and files only to its own user or to a monitor with "
    "CAP_SYS_PTRACE: run prism as root (sudo) or as the target's user, or "
    "sudo setcap cap_sys_admin,cap_sys_ptrace,cap_dac_read_search+ep "
    "\"$(readlink -f .venv/bin/python)\""
)
ROOT_REFUSED_HINT = (
    "even root is refused here: a security module (Yama, SELinux, AppArmor, a sandbox) "
    "or the target's user namespace denies ptrace read access to it"
)


_CAP_SYS_PTRACE = 19


def target_access_hint() -> str:
    """How to get read access to a target: with CAP_SYS_PTRACE already held, what refuses
    it; else what to grant (uid 0 without capabilities is told what to grant)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            effective = next((int(line.split()[1], 16) for line in f
                              if line.startswith("CapEff:")), 0)
    except (OSError, ValueError):
        effective = 0
    return ROOT_REFUSED_HINT if effective >> _CAP_SYS_PTRACE & 1 else TARGET_ACCESS_HINT
