"""Where probes go: a profile's probes (or one LIB:SYMBOL) resolved on a target.

Every probe gets a :class:`ProbeDecision` saying where it resolved (library, symbol,
file offset, how the probed instruction is executed) or why it did not (library not
mapped, symbol missing, stripped library, with near names), so ``prism symbols`` and the
dashboard can show every decision rather than a silent omission.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from probes.errors import (
    ElfError,
    LibraryNotMappedError,
    SymbolNotFoundError,
)
from probes.symbols import ResolvedSymbol, resolve
from probes.target import MappedFile, Target, match_library

if TYPE_CHECKING:
    from probes.catalog import Capture, ProbeSpec, Profile


@dataclass(frozen=True)
class ProbeSite:
    """One attachable probe site: a function in a file mapped by the target.

    Attributes:
        probe: probe id (the profile's, or ``LIB:SYMBOL`` for an ad-hoc trace).
        stage: stage the probe's time is counted in.
        library: the library's path as the target sees it.
        open_path: path handed to the kernel (reaches the very inode the target runs).
        inode: inode of the mapped file (to tell which processes share it).
        symbol: resolved function name.
        offset: file offset the uprobe is placed at (past a leading ``endbr64``).
        function_offset: file offset of the function's first byte.
        site: ``emulated`` or ``single-step`` (cost class of the probed instruction).
        ret: a uretprobe is placed too, making entry/return spans.
        captures: argument captures taken at entry (``ret`` captures at return).
    """

    probe: str
    stage: str
    library: str
    open_path: str
    inode: int
    symbol: str
    offset: int
    function_offset: int
    site: str
    ret: bool
    captures: tuple[Capture, ...] = ()

    @property
    def entry_registers(self) -> tuple[int, ...]:
        """SysV argument numbers (1..6) read at entry."""
        return tuple(sorted({c.register for c in self.captures
                             if c.source == "reg" and c.register is not None}))

    @property
    def stack_bytes(self) -> int:
        """Bytes of user stack read at entry (0 when no stack capture)."""
        return max((c.size + (c.stack_offset or 0) for c in self.captures
                    if c.source == "stack"), default=0)

    @property
    def wants_return_value(self) -> bool:
        """True when the return value (rax) is captured."""
        return any(c.source == "ret" for c in self.captures)


@dataclass(frozen=True)
class ProbeDecision:
    """What became of one probe of a profile on one target."""

    probe: str
    stage: str
    level: str
    status: str  # "resolved" | "missing" | "no-library"
    sites: tuple[ProbeSite, ...] = ()
    reason: str = ""
    near: tuple[str, ...] = ()
    optional: bool = False


@dataclass(frozen=True)
class Placement:
    """Every decision for a profile on a target, and the sites to attach."""

    target_pid: int
    profile: str
    decisions: tuple[ProbeDecision, ...] = field(default_factory=tuple)

    @property
    def sites(self) -> list[ProbeSite]:
        """Sites of every resolved probe, in profile order."""
        return [s for d in self.decisions for s in d.sites]


def _site(spec_id: str, stage: str, lib: MappedFile, sym: ResolvedSymbol, ret: bool,
          captures: tuple[Capture, ...]) -> ProbeSite:
    return ProbeSite(spec_id, stage, lib.path, lib.open_path, lib.inode, sym.name,
                     sym.probe_offset, sym.file_offset, sym.site, ret, captures)


def place_profile(target: Target, profile: Profile, level: str = "sentinel") -> Placement:
    """Resolve ``profile``'s probes at ``level`` on ``target``; never raises for a probe."""
    files = target.mapped_files()
    decisions = []
    for spec in profile.probes_at(level):
        decisions.append(_decide(files, profile, spec))
    return Placement(target.pid, profile.name, tuple(decisions))


def _decide(files: Sequence[MappedFile], profile: Profile, spec: ProbeSpec) -> ProbeDecision:
    lib_spec = profile.library(spec.library)
    libs = [f for f in files if lib_spec.matches(f.name)]

    def decision(status: str, sites: tuple[ProbeSite, ...] = (), reason: str = "",
                 near: tuple[str, ...] = ()) -> ProbeDecision:
        return ProbeDecision(spec.id, spec.stage, spec.level, status, sites, reason, near,
                             spec.optional)

    if not libs:
        return decision("no-library",
                        reason=f"no mapped file matches {', '.join(lib_spec.patterns)}")
    sites: list[ProbeSite] = []
    reasons: list[str] = []
    near: tuple[str, ...] = ()
    for lib in libs:
        try:
            for sym in resolve(lib.open_path, spec.symbol, display_name=lib.name):
                sites.append(_site(spec.id, spec.stage, lib, sym, spec.ret, spec.captures))
        except SymbolNotFoundError as exc:
            reasons.append(str(exc))
            near = near or exc.near
        except ElfError as exc:
            reasons.append(str(exc))
    if sites:
        return decision("resolved", tuple(sites))
    return decision("missing", reason="; ".join(reasons), near=near)


def place_symbol(target: Target, library: str, symbol: str, *, ret: bool,
                 stage: str = "traced") -> list[ProbeSite]:
    """Sites for an ad-hoc ``LIB:SYMBOL`` probe (``prism trace``).

    ``library`` is a path, a basename, a soname prefix (``libc``) or a glob; ``symbol`` an
    exact name or a glob. Raises :class:`LibraryNotMappedError` (with the mapped libraries
    closest to the name) or :class:`SymbolNotFoundError` (with near names).
    """
    files = target.mapped_files()
    libs = match_library(files, library)
    if not libs:
        import difflib

        names = sorted({f.name for f in files})
        near = difflib.get_close_matches(library, names, n=4, cutoff=0.4)
        near += [n for n in names if library.lower() in n.lower() and n not in near]
        hint = f"; mapped libraries like it: {', '.join(near[:5])}" if near else ""
        raise LibraryNotMappedError(
            f"{library!r} is not mapped by pid {target.pid} ({target.name}){hint}")
    sites: list[ProbeSite] = []
    errors: list[SymbolNotFoundError] = []
    for lib in libs:
        try:
            for sym in resolve(lib.open_path, symbol, display_name=lib.name):
                sites.append(_site(f"{lib.name}:{sym.name}", stage, lib, sym, ret, ()))
        except SymbolNotFoundError as exc:
            errors.append(exc)
    if not sites:
        if len(errors) == 1:
            raise errors[0]
        raise SymbolNotFoundError("; ".join(str(e) for e in errors),
                                  tuple(n for e in errors for n in e.near)[:5])
    return sites
