"""ELF symbol → file offset, the address a uprobe is placed at.

Lookups go ``.gnu.hash`` first (one hash and a short chain walk, one entry read), then
``.dynsym``, then ``.symtab`` (local symbols of unstripped libraries, ``take_gil`` in
libpython for example). Whole tables are unpacked with ``struct`` from one read of the
section, not through pyelftools' per-entry parser (seconds for OpenBLAS on a loaded
machine). Tables, glob matches and near names are kept on an object cached per file
identity (device, inode, size, mtime): a library mapped by many targets, or by a target
re-attached, is read once; a rebuilt file is read again.

The probe site is moved past a leading ``endbr64``: that instruction does nothing, and the
kernel has to single-step it (10.5 µs a hit measured here, bench/probe_cost.py) where it
emulates the ``push %rbp`` that usually follows (1.0 µs).
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import IO, Any, NamedTuple

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from probes.errors import ElfError, SymbolNotFoundError, TargetAccessError, target_access_hint

ENDBR64 = b"\xf3\x0f\x1e\xfa"
STT_FUNC_TYPES = ("STT_FUNC",)
# STT_GNU_IFUNC (10) is STT_LOOS to pyelftools: the symbol is a resolver run once at load
# time to pick an implementation, so a probe on it would never see the calls
STT_IFUNC_TYPES = ("STT_GNU_IFUNC", "STT_LOOS")
VERSYM_HIDDEN = 0x8000


def _refused(path: str) -> TargetAccessError:
    """A target's file the kernel would not let us open: a permission problem (exit 3)."""
    if "/map_files/" in path:  # its path was unreachable or replaced: the kernel's own link
        return TargetAccessError(
            f"cannot open {path}: permission denied; the mapped file's path is not "
            "reachable by this user (or was replaced) and /proc/PID/map_files opens only "
            "with CAP_SYS_ADMIN: run prism as root (sudo)")
    return TargetAccessError(f"cannot open {path}: permission denied; {target_access_hint()}")


def classify_site(code: bytes) -> str:
    """How the kernel executes the probed instruction: ``emulated`` or ``single-step``.

    x86-64 uprobes emulate pushes of a register, relative jumps and calls, conditional
    jumps and NOPs; every other instruction is copied out and single-stepped, which costs
    an extra trap per hit.
    """
    if not code:
        return "unknown"
    i = 0
    while i < len(code) and code[i] in (0x66, 0xF2, 0xF3) and i < 3:
        i += 1  # legacy prefixes (nop forms use 0x66)
    rex = 0x40 <= code[i] <= 0x4F if i < len(code) else False
    j = i + 1 if rex else i
    if j >= len(code):
        return "unknown"
    op = code[j]
    if 0x50 <= op <= 0x57 or op in (0xE8, 0xE9, 0xEB, 0x90) or 0x70 <= op <= 0x7F:
        return "emulated"
    if op == 0x0F and j + 1 < len(code) and (0x80 <= code[j + 1] <= 0x8F or code[j + 1] == 0x1F):
        return "emulated"
    return "single-step"


@dataclass(frozen=True)
class ResolvedSymbol:
    """A function found in an ELF file, with where a uprobe goes.

    Attributes:
        name: symbol name as stored (no version suffix).
        version: symbol version (``libcudart.so.12``), empty when unversioned.
        address: st_value, the link-time virtual address.
        size: st_size in bytes (0 when unknown).
        file_offset: offset of the function's first byte in the file.
        probe_offset: file offset the probe is placed at (past a leading ``endbr64``).
        site: ``emulated`` or ``single-step``: how the probed instruction is executed.
        table: where it was found: ``.gnu.hash``, ``.dynsym`` or ``.symtab``.
    """

    name: str
    version: str
    address: int
    size: int
    file_offset: int
    probe_offset: int
    site: str
    table: str

    @property
    def skipped_endbr64(self) -> bool:
        """True when the probe sits after a leading ``endbr64``."""
        return self.probe_offset != self.file_offset


class _Sym(NamedTuple):
    """One symbol table entry, decoded (a tuple: tables of 10^4-10^5 are built at once)."""

    name: str
    value: int
    size: int
    is_func: bool
    is_ifunc: bool
    defined: bool
    global_: bool
    hidden_version: bool
    version: str


STT_FUNC = 2
STT_GNU_IFUNC = 10
STB_GLOBAL, STB_WEAK = 1, 2
SHN_UNDEF = 0
VER_NDX_GLOBAL = 1
# Elf64_Sym and Elf32_Sym field order differs: (name, info, other, shndx, value, size)
# vs (name, value, size, info, other, shndx); both are read into the 64-bit order
_SYM_FORMATS = {64: ("IBBHQQ", (0, 1, 2, 3, 4, 5)), 32: ("IIIBBH", (0, 3, 4, 5, 1, 2))}


class ElfSymbols:
    """Symbol lookups in one ELF file. Use :func:`elf_symbols` to get a cached one."""

    def __init__(self, path: str) -> None:
        """Parse headers of ``path``; raises :class:`ElfError` if it is not an ELF file."""
        self.path = path
        self._lock = threading.RLock()
        try:
            self._stream: IO[bytes] = open(path, "rb")  # noqa: SIM115 - owned by the object
        except PermissionError as exc:
            raise _refused(path) from exc
        except OSError as exc:
            raise ElfError(f"cannot open {path}: {exc.strerror}") from exc
        try:
            self._elf = ELFFile(self._stream)
            self._segments = [
                (s["p_vaddr"], s["p_memsz"], s["p_offset"], s["p_filesz"])
                for s in self._elf.iter_segments() if s["p_type"] == "PT_LOAD"
            ]
            # pyelftools types these as plain Section; they are the specialised subclasses
            self._gnu_hash: Any = self._elf.get_section_by_name(".gnu.hash")
            self._dynsym: Any = self._elf.get_section_by_name(".dynsym")
            self._symtab: Any = self._elf.get_section_by_name(".symtab")
            self._versym: Any = self._elf.get_section_by_name(".gnu.version")
            self._verdef_names = self._read_verdefs()
        except (ELFError, ValueError, OSError) as exc:
            self._stream.close()
            raise ElfError(f"{path} is not a readable ELF file: {exc}") from exc
        self._tables: dict[str, list[_Sym]] = {}
        self._near: dict[tuple[str, int], tuple[str, ...]] = {}
        self._matches: dict[str, tuple[ResolvedSymbol, ...]] = {}

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._stream.close()

    @property
    def has_symtab(self) -> bool:
        """False for a stripped file (only exported symbols remain)."""
        return self._symtab is not None and self._symtab.num_symbols() > 0

    def _read_verdefs(self) -> dict[int, str]:
        sec: Any = self._elf.get_section_by_name(".gnu.version_d")
        names: dict[int, str] = {}
        if sec is None:
            return names
        for verdef, aux in sec.iter_versions():
            first = next(iter(aux), None)
            if first is not None:
                names[verdef["vd_ndx"]] = first.name
        return names

    def _section_bytes(self, section: Any) -> bytes:
        """The raw contents of ``section`` (one read, no per-entry parsing)."""
        with self._lock:
            self._stream.seek(section["sh_offset"])
            return self._stream.read(section["sh_size"])

    @cached_property
    def _versyms(self) -> tuple[int, ...]:
        """``.gnu.version``: the raw version index of every ``.dynsym`` entry."""
        if self._versym is None:
            return ()
        data = self._section_bytes(self._versym)
        fmt = ("<" if self._elf.little_endian else ">") + "H"
        return tuple(v for (v,) in struct.iter_unpack(fmt, data[:len(data) // 2 * 2]))

    def _version_of(self, index: int) -> tuple[str, bool]:
        versyms = self._versyms
        if index >= len(versyms):
            return "", False
        raw = versyms[index]
        if raw <= VER_NDX_GLOBAL:  # VER_NDX_LOCAL / VER_NDX_GLOBAL: unversioned
            return "", False
        hidden = bool(raw & VERSYM_HIDDEN)
        return self._verdef_names.get(raw & ~VERSYM_HIDDEN, ""), hidden

    def _unpacker(self) -> tuple[str, tuple[int, ...], int]:
        """struct format of one symbol entry, its field order, and the table's stride."""
        fmt, order = _SYM_FORMATS[self._elf.elfclass]
        fmt = ("<" if self._elf.little_endian else ">") + fmt
        return fmt, order, struct.calcsize(fmt)

    def _entries(self, section: Any) -> tuple[list[tuple[int, ...]], bytes]:
        """Every entry of a symbol table section as (name offset, info, other, shndx,
        value, size), and its string table: a struct unpack, not pyelftools' parser
        (which took seconds for OpenBLAS's .dynsym on a loaded machine)."""
        fmt, order, width = self._unpacker()
        stride = section["sh_entsize"] or width
        data = self._section_bytes(section)
        count = len(data) // stride
        if stride == width:
            raw = list(struct.iter_unpack(fmt, data[:count * width]))
        else:
            raw = [struct.unpack_from(fmt, data, i * stride) for i in range(count)]
        if order != (0, 1, 2, 3, 4, 5):
            raw = [tuple(r[j] for j in order) for r in raw]
        strtab = self._section_bytes(self._elf.get_section(section["sh_link"]))
        return raw, strtab

    @staticmethod
    def _name_at(strtab: bytes, offset: int) -> str:
        end = strtab.find(b"\0", offset)
        return strtab[offset:end if end >= 0 else len(strtab)].decode("latin-1")

    def _decode(self, entry: tuple[int, ...], name: str, index: int, dynamic: bool) -> _Sym:
        _, info, _, shndx, value, size = entry
        kind, bind = info & 0xF, info >> 4
        version, hidden = self._version_of(index) if dynamic else ("", False)
        return _Sym(name, value, size, kind == STT_FUNC, kind == STT_GNU_IFUNC,
                    shndx != SHN_UNDEF and value != 0, bind in (STB_GLOBAL, STB_WEAK),
                    hidden, version)

    @cached_property
    def _dynstr(self) -> bytes:
        """The string table of ``.dynsym``."""
        return self._section_bytes(self._elf.get_section(self._dynsym["sh_link"]))

    def _dynsym_entry(self, index: int) -> tuple[_Sym, str]:
        """One ``.dynsym`` entry read alone (a ``.gnu.hash`` hit), and its name."""
        fmt, order, width = self._unpacker()
        stride = self._dynsym["sh_entsize"] or width
        with self._lock:
            self._stream.seek(self._dynsym["sh_offset"] + index * stride)
            raw = struct.unpack(fmt, self._stream.read(width))
        entry = tuple(raw[j] for j in order)
        name = self._name_at(self._dynstr, entry[0])
        return self._decode(entry, name, index, True), name

    def _table(self, name: str) -> list[_Sym]:
        """Every named symbol of ``.dynsym`` or ``.symtab``, read once and kept."""
        with self._lock:
            cached = self._tables.get(name)
            if cached is not None:
                return cached
            section: Any = self._dynsym if name == ".dynsym" else self._symtab
            syms: list[_Sym] = []
            if section is not None:
                dynamic = name == ".dynsym"
                entries, strtab = self._entries(section)
                for i, entry in enumerate(entries):
                    sym_name = self._name_at(strtab, entry[0]) if entry[0] else ""
                    if sym_name:
                        syms.append(self._decode(entry, sym_name, i, dynamic))
            self._tables[name] = syms
            return syms

    def vaddr_to_offset(self, vaddr: int) -> int | None:
        """File offset of a link-time virtual address (through its PT_LOAD segment)."""
        for p_vaddr, p_memsz, p_offset, p_filesz in self._segments:
            if p_vaddr <= vaddr < p_vaddr + min(p_memsz, p_filesz):
                return vaddr - p_vaddr + p_offset
        return None

    def read_at(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the file at ``offset``."""
        with self._lock:
            self._stream.seek(offset)
            return self._stream.read(size)

    def _finish(self, sym: _Sym, table: str) -> ResolvedSymbol | None:
        offset = self.vaddr_to_offset(sym.value)
        if offset is None:
            return None
        head = self.read_at(offset, 16)
        probe = offset + len(ENDBR64) if head.startswith(ENDBR64) else offset
        site = classify_site(head[probe - offset:])
        return ResolvedSymbol(sym.name, sym.version, sym.value, sym.size, offset, probe, site,
                              table)

    def _gnu_hash_indices(self, name: str) -> list[int]:
        """``.dynsym`` indices of every entry named ``name``, found through ``.gnu.hash``.

        One hash, a bloom-filter test and a short chain walk: no table is built. All
        entries of that name are returned (versioned libraries define some names twice).
        """
        table = self._gnu_hash
        if table is None or self._dynsym is None:
            return []
        namehash = table.gnu_hash(name)
        if not table._matches_bloom(namehash):
            return []
        params = table.params
        symidx = params["buckets"][namehash % params["nbuckets"]]
        if symidx < params["symoffset"]:
            return []
        stream = self._elf.stream
        fmt = "<I" if self._elf.little_endian else ">I"
        found = []
        while True:
            stream.seek(table._chain_pos + (symidx - params["symoffset"]) * 4)
            chain_hash = struct.unpack(fmt, stream.read(4))[0]
            if (chain_hash | 1) == (namehash | 1) and self._dynsym_entry(symidx)[1] == name:
                found.append(symidx)
            if chain_hash & 1:
                return found
            symidx += 1

    def lookup(self, name: str) -> ResolvedSymbol | None:
        """Exact lookup of a defined function; ``.gnu.hash`` first, then the tables."""
        with self._lock:
            indices = self._gnu_hash_indices(name)
            if indices:
                syms = [self._dynsym_entry(i)[0] for i in indices]
                syms = [s for s in syms if s.defined and (s.is_func or s.is_ifunc)]
                syms.sort(key=lambda s: s.hidden_version)  # name@@VER before name@VER
                if syms and syms[0].is_ifunc:
                    return None  # the default version is an IFUNC (why_missing says so)
                if syms:
                    return self._finish(syms[0], ".gnu.hash")
                if self._symtab is None:
                    return None  # the hash table is authoritative for exported names
        for table in (".dynsym", ".symtab"):
            candidates = [s for s in self._table(table)
                          if s.name == name and s.defined and s.is_func]
            if not candidates:
                continue
            # prefer the default version (name@@VER) over hidden older ones (name@VER)
            candidates.sort(key=lambda s: (s.hidden_version, not s.is_func))
            return self._finish(candidates[0], table)
        return None

    def match(self, pattern: str) -> list[ResolvedSymbol]:
        """Every defined function whose name matches the glob ``pattern``, one per name.

        Kept per pattern: a profile's globs are asked again at every placement of it
        (companion detection, the attach, each re-attach of a ``--match`` target).
        """
        with self._lock:
            hit = self._matches.get(pattern)
            if hit is None:
                hit = self._matches[pattern] = self._compute_match(pattern)
            return list(hit)

    def _compute_match(self, pattern: str) -> tuple[ResolvedSymbol, ...]:
        matches = re.compile(fnmatch.translate(pattern)).match  # fnmatchcase, compiled once
        seen: dict[str, ResolvedSymbol] = {}
        for table in (".dynsym", ".symtab"):
            for sym in self._table(table):
                if (sym.name in seen or not sym.defined or not sym.is_func
                        or sym.hidden_version or not matches(sym.name)):
                    continue
                resolved = self._finish(sym, table)
                if resolved is not None:
                    seen[sym.name] = resolved
        return tuple(sorted(seen.values(), key=lambda r: r.name))

    def names(self) -> set[str]:
        """Names of all defined functions in the file (for suggestions)."""
        return set(self._names)

    @cached_property
    def _names(self) -> frozenset[str]:
        return frozenset(s.name for t in (".dynsym", ".symtab") for s in self._table(t)
                         if s.defined and s.is_func)

    def why_missing(self, name: str) -> str:
        """One sentence on why ``name`` does not resolve here."""
        if any(s.name == name and s.is_ifunc and s.defined for s in self._table(".dynsym")):
            return (f"{name} is a GNU indirect function (IFUNC) in "
                    f"{os.path.basename(self.path)}: its symbol is the resolver that picks "
                    "an implementation at load time, so a probe there never sees the calls; "
                    "probe the caller, or the implementation where the library keeps its "
                    "symbols")
        local = [s for s in self._table(".symtab") if s.name == name]
        undefined = [s for s in self._table(".dynsym") if s.name == name and not s.defined]
        if undefined:
            return f"{name} is imported by {os.path.basename(self.path)}, not defined in it"
        if local and not local[0].global_:
            return f"{name} is a local symbol not exported"
        if not self.has_symtab:
            return (f"{name} is not exported and {os.path.basename(self.path)} is stripped "
                    "(no .symtab): install its debug symbols or probe an exported function")
        return f"{name} is not in {os.path.basename(self.path)}"

    @cached_property
    def _sorted_names(self) -> list[str]:
        return sorted(self._names)

    def near(self, name: str, limit: int = 5) -> tuple[str, ...]:
        """Names close to ``name``: substring matches first, then difflib's close ones.

        Kept per name: difflib over a library's thousands of names costs a good fraction
        of a second, and every placement of a profile asks again for the probes it misses.
        """
        key = (name, limit)
        with self._lock:
            hit = self._near.get(key)
        if hit is None:
            hit = self._near[key] = self._compute_near(name, limit)
        return hit

    def _compute_near(self, name: str, limit: int) -> tuple[str, ...]:
        names = self._names
        bare = name.strip("*?")
        # shortest first, ties by name: a set's order changes with the hash seed per run
        sub = sorted((n for n in names if bare and bare.lower() in n.lower()),
                     key=lambda n: (len(n), n))
        close = difflib.get_close_matches(bare, self._sorted_names, n=limit, cutoff=0.6)
        out: list[str] = []
        for n in sub + close:
            if n not in out and n != name:
                out.append(n)
        return tuple(out[:limit])


_CACHE_SIZE = 64
_cache: OrderedDict[tuple[int, int, int, int], ElfSymbols] = OrderedDict()
_cache_lock = threading.Lock()


def elf_symbols(path: str) -> ElfSymbols:
    """The cached :class:`ElfSymbols` for the file at ``path`` (keyed by file identity)."""
    try:
        st = os.stat(path)
    except PermissionError as exc:
        raise _refused(path) from exc
    except OSError as exc:
        raise ElfError(f"cannot open {path}: {exc.strerror}") from exc
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    syms = ElfSymbols(path)
    with _cache_lock:
        _cache[key] = syms
        while len(_cache) > _CACHE_SIZE:
            _, old = _cache.popitem(last=False)
            old.close()
    return syms


def resolve(path: str, symbol: str, *, display_name: str | None = None) -> list[ResolvedSymbol]:
    """Resolve ``symbol`` (exact name or glob) in the ELF file at ``path``.

    Raises :class:`SymbolNotFoundError` with the reason and near names when nothing
    matches. ``display_name`` names the library in messages (defaults to the path).
    """
    syms = elf_symbols(path)
    label = display_name or path
    if any(c in symbol for c in "*?["):
        found = syms.match(symbol)
        if not found:
            raise SymbolNotFoundError(
                f"no function matching {symbol!r} in {label}", syms.near(symbol))
        return found
    one = syms.lookup(symbol)
    if one is None:
        near = syms.near(symbol)
        hint = f"; near names: {', '.join(near)}" if near else ""
        raise SymbolNotFoundError(f"{syms.why_missing(symbol)} ({label}){hint}", near)
    return [one]
