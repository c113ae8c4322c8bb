"""ELF symbol resolution on real files: libc, the wheel's libcudart, this interpreter's
libpython and the C target, checked against binutils' own view of the same files."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from probes.errors import ElfError, SymbolNotFoundError
from probes.symbols import ElfSymbols, classify_site, elf_symbols, resolve


def _mapped(fragment: str) -> str:
    """Path of the first file mapped by this process whose basename starts with ``fragment``."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and os.path.basename(parts[5].strip()).startswith(fragment):
                return parts[5].strip()
    pytest.fail(f"no {fragment}* mapped by this interpreter")


LIBC = _mapped("libc.so")


def _libpython() -> str:
    try:
        return _mapped("libpython")
    except pytest.fail.Exception:
        pytest.fail("this interpreter is statically linked (no libpython*.so mapped): "
                    "the .symtab tests need a shared libpython")


def _libcudart() -> str:
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the nvidia-cuda-runtime-cu12 wheel is not installed in the venv")
    path = Path(next(iter(spec.submodule_search_locations))) / "lib" / "libcudart.so.12"
    assert path.is_file(), path
    return str(path)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} (binutils) is not installed")
    return path


def nm_defined(path: str) -> list[tuple[int, str, str, str, bool]]:
    """``nm -D --defined-only``: (address, type, name, version, is_default_version)."""
    out = subprocess.run([_tool("nm"), "-D", "--defined-only", path], check=True,
                         capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        addr, kind, full = parts
        if "@@" in full:
            name, version, default = *full.split("@@", 1), True
        elif "@" in full:
            name, version, default = *full.split("@", 1), False
        else:
            name, version, default = full, "", True
        rows.append((int(addr, 16), kind, name, version, default))
    return rows


def load_segments(path: str) -> list[tuple[int, int, int, int]]:
    """``readelf -lW`` PT_LOAD rows: (p_offset, p_vaddr, p_filesz, p_memsz)."""
    out = subprocess.run([_tool("readelf"), "-lW", path], check=True, capture_output=True,
                         text=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == "LOAD":
            rows.append((int(parts[1], 16), int(parts[2], 16), int(parts[4], 16),
                         int(parts[5], 16)))
    assert rows, out
    return rows


def readelf_offset(segments: list[tuple[int, int, int, int]], vaddr: int) -> int | None:
    for p_offset, p_vaddr, p_filesz, _memsz in segments:
        if p_vaddr <= vaddr < p_vaddr + p_filesz:
            return vaddr - p_vaddr + p_offset
    return None


def strip_copy(src: str | Path, dest: Path) -> Path:
    shutil.copyfile(src, dest)
    subprocess.run([_tool("strip"), "--strip-all", str(dest)], check=True)
    return dest


# ------------------------------------------------------------------ exact lookups


def test_gnu_hash_lookup_agrees_with_nm_for_libc() -> None:
    rows = nm_defined(LIBC)
    by_name: dict[str, list[tuple[int, str, str, str, bool]]] = {}
    for row in rows:
        by_name.setdefault(row[2], []).append(row)
    # functions exported under one (default) version only: the hash path finds them itself
    single = sorted(n for n, rs in by_name.items()
                    if len(rs) == 1 and rs[0][1] in "TW" and rs[0][4])
    assert len(single) > 1000, len(single)
    syms = ElfSymbols(LIBC)
    try:
        for name in single[:: len(single) // 60]:
            [(addr, _kind, _name, version, _default)] = by_name[name]
            got = syms.lookup(name)
            assert got is not None, name
            assert (got.name, got.address, got.version) == (name, addr, version), got
            assert got.table == ".gnu.hash", got
            assert got.file_offset == syms.vaddr_to_offset(addr)
        assert syms.lookup("no_such_function_in_libc_xyz") is None
        # a compat-only symbol (name@OLD, no default version) still resolves, to that version
        compat = sorted(n for n, rs in by_name.items()
                        if len(rs) == 1 and rs[0][1] == "T" and not rs[0][4])
        assert compat, "libc exports no compat-only function"
        got = syms.lookup(compat[0])
        assert got is not None
        assert (got.address, got.version) == (by_name[compat[0]][0][0], by_name[compat[0]][0][3])
    finally:
        syms.close()


def test_gnu_hash_lookup_of_versioned_libcudart_symbols() -> None:
    path = _libcudart()
    rows = [r for r in nm_defined(path) if r[1] == "T"]
    assert len(rows) > 100, len(rows)
    assert all(r[3] == "libcudart.so.12" and r[4] for r in rows), rows[:3]
    syms = ElfSymbols(path)
    try:
        for addr, _kind, name, _version, _default in rows[::3]:
            got = syms.lookup(name)
            assert got is not None, name
            assert got.name == name
            assert got.address == addr
            assert got.version == "libcudart.so.12"
            assert got.table == ".gnu.hash"
        launch = syms.lookup("cudaLaunchKernel")
        assert launch is not None and launch.size > 0
        assert launch.site in ("emulated", "single-step")
    finally:
        syms.close()


@pytest.mark.parametrize("name", ["clock_nanosleep", "realpath", "pthread_cond_wait",
                                  "sched_setaffinity"])
def test_multi_version_symbol_resolves_to_the_default_version(name: str) -> None:
    versions = [r for r in nm_defined(LIBC) if r[2] == name]
    default = [r for r in versions if r[4]]
    older = [r for r in versions if not r[4]]
    assert len(default) == 1 and older, versions  # name@@NEW and name@OLD
    [(addr, _kind, _name, version, _)] = default
    [got] = resolve(LIBC, name)
    assert got.address == addr
    assert got.version == version
    if name != "clock_nanosleep":  # the others keep their old version at another address
        assert all(r[0] != addr for r in older)


def test_glob_matches_functions_only_one_per_name() -> None:
    found = resolve(LIBC, "pthread_mutex_*lock")
    names = [r.name for r in found]
    assert names == sorted(set(names))
    assert {"pthread_mutex_lock", "pthread_mutex_unlock", "pthread_mutex_trylock",
            "pthread_mutex_timedlock"} <= set(names)
    assert all(re.fullmatch(r"pthread_mutex_.*lock", n) for n in names)
    by_nm = {r[2]: r[0] for r in nm_defined(LIBC) if r[4]}
    assert all(r.address == by_nm[r.name] for r in found)
    assert [r.name for r in resolve(LIBC, "clock_nanoslee?")] == ["clock_nanosleep"]
    with pytest.raises(SymbolNotFoundError) as err:
        resolve(LIBC, "zz_no_such_*_function")
    assert "no function matching" in str(err.value)


def test_typo_suggests_near_names() -> None:
    with pytest.raises(SymbolNotFoundError) as err:
        resolve(LIBC, "pthread_mutx_lock", display_name="libc.so.6")
    assert "pthread_mutex_lock" in err.value.near
    assert "libc.so.6" in str(err.value)
    assert "pthread_mutex_lock" in str(err.value)
    with pytest.raises(SymbolNotFoundError) as err:
        resolve(LIBC, "clock_nanoslep")
    assert err.value.near[0] == "clock_nanosleep" or "clock_nanosleep" in err.value.near


def test_near_names_do_not_depend_on_the_hash_seed() -> None:
    """Near names of equal length came out in set order, which changes with
    PYTHONHASHSEED: `prism symbols` printed a different list on every run."""
    code = ("from probes.symbols import ElfSymbols; import sys; "
            "print(ElfSymbols(sys.argv[1]).near('pthread_mutex_'))")
    runs = {subprocess.run([sys.executable, "-c", code, LIBC], check=True, text=True,
                           capture_output=True, env={**os.environ, "PYTHONHASHSEED": seed},
                           ).stdout for seed in ("1", "2", "3", "4")}
    assert len(runs) == 1, runs
    assert "pthread_mutex_lock" in runs.pop()


# ------------------------------------------------------------------ local, stripped, imported


def test_local_symtab_symbol_in_libpython() -> None:
    libpython = _libpython()
    out = subprocess.run([_tool("readelf"), "-sW", libpython], check=True,
                         capture_output=True, text=True).stdout
    rows = [line.split() for line in out.splitlines() if line.split()[-1:] == ["take_gil"]]
    assert rows, "take_gil not in libpython's .symtab (a stripped build?)"
    value, bind = int(rows[0][1], 16), rows[0][4]
    assert bind == "LOCAL"
    assert not any(r[2] == "take_gil" for r in nm_defined(libpython))  # not exported
    [got] = resolve(libpython, "take_gil")
    assert got.table == ".symtab"
    assert got.address == value
    assert got.version == ""
    assert got.file_offset == readelf_offset(load_segments(libpython), value)


def test_stripped_executable_reports_stripped(ctarget_exe: Path, tmp_path: Path) -> None:
    [full] = resolve(str(ctarget_exe), "pl_work")
    assert full.table == ".symtab"  # the executable exports nothing: .symtab only
    stripped = strip_copy(ctarget_exe, tmp_path / "ctarget-stripped")
    assert not ElfSymbols(str(stripped)).has_symtab
    with pytest.raises(SymbolNotFoundError) as err:
        resolve(str(stripped), "pl_work")
    assert "stripped" in str(err.value)
    assert "pl_work" in str(err.value)


def test_stripped_libpython_loses_take_gil(tmp_path: Path) -> None:
    stripped = strip_copy(_libpython(), tmp_path / "libpython-stripped.so")
    with pytest.raises(SymbolNotFoundError) as err:
        resolve(str(stripped), "take_gil")
    assert "stripped" in str(err.value)
    # exported functions still resolve, through the hash table
    [got] = resolve(str(stripped), "PyEval_SaveThread")
    assert got.table == ".gnu.hash"


def test_imported_symbol_is_not_defined(ctarget_exe: Path) -> None:
    with pytest.raises(SymbolNotFoundError) as err:
        resolve(str(ctarget_exe), "printf")
    message = str(err.value)
    assert "imported" in message and "not defined" in message, message
    assert "ctarget" in message


def test_non_elf_file_raises_elf_error(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an ELF file at all\n" * 10)
    with pytest.raises(ElfError):
        ElfSymbols(str(text))
    with pytest.raises(ElfError):
        resolve(str(text), "main")
    with pytest.raises(ElfError):
        elf_symbols(str(tmp_path / "missing.so"))


# ------------------------------------------------------------------ probe sites


@pytest.mark.parametrize(("code", "expected"), [
    (b"\x55\x48\x89\xe5", "emulated"),               # push %rbp
    (b"\x41\x54", "emulated"),                       # push %r12
    (b"\x53", "emulated"),                           # push %rbx
    (b"\xe8\x00\x00\x00\x00", "emulated"),           # call rel32
    (b"\xe9\x10\x00\x00\x00", "emulated"),           # jmp rel32
    (b"\xeb\x05", "emulated"),                       # jmp rel8
    (b"\x74\x05", "emulated"),                       # je rel8
    (b"\x70\x05", "emulated"),                       # jo rel8
    (b"\x7f\x05", "emulated"),                       # jg rel8
    (b"\x0f\x8f\x10\x00\x00\x00", "emulated"),       # jg rel32
    (b"\x0f\x84\x10\x00\x00\x00", "emulated"),       # je rel32
    (b"\x90", "emulated"),                           # nop
    (b"\x66\x90", "emulated"),                       # xchg %ax,%ax
    (b"\x0f\x1f\x44\x00\x00", "emulated"),           # nopl 0x0(%rax,%rax,1)
    (b"\x66\x0f\x1f\x44\x00\x00", "emulated"),       # nopw 0x0(%rax,%rax,1)
    (b"\x48\x89\xe5", "single-step"),                # mov %rsp,%rbp
    (b"\x48\x89\xf8\xc3", "single-step"),            # mov %rdi,%rax
    (b"\xf3\x0f\x1e\xfa\x55", "single-step"),        # endbr64 itself
    (b"\x48\x83\xec\x08", "single-step"),            # sub $8,%rsp
    (b"\xc3", "single-step"),                        # ret
    (b"", "unknown"),
    (b"\x48", "unknown"),                            # a lone REX prefix
])
def test_classify_site(code: bytes, expected: str) -> None:
    assert classify_site(code) == expected


def test_probe_skips_endbr64_in_the_c_target(ctarget_exe: Path) -> None:
    objdump = subprocess.run([_tool("objdump"), "-d", str(ctarget_exe)], check=True,
                             capture_output=True, text=True).stdout
    syms = elf_symbols(str(ctarget_exe))
    [work] = resolve(str(ctarget_exe), "pl_work")
    [plain] = resolve(str(ctarget_exe), "pl_plain")
    assert re.search(r"<pl_work>:\n\s*[0-9a-f]+:\s+f3 0f 1e fa\s+endbr64", objdump)
    assert re.search(r"<pl_plain>:\n\s*[0-9a-f]+:\s+55\s+push\s+%rbp", objdump)
    assert syms.read_at(work.file_offset, 4) == b"\xf3\x0f\x1e\xfa"
    assert work.probe_offset == work.file_offset + 4
    assert work.skipped_endbr64
    assert syms.read_at(work.probe_offset, 1) == b"\x55"
    assert plain.probe_offset == plain.file_offset
    assert not plain.skipped_endbr64
    assert work.site == plain.site == "emulated"


# ------------------------------------------------------------------ cache and offsets


def test_cache_follows_file_identity(ctarget_exe: Path, tmp_path: Path) -> None:
    path = tmp_path / "ctarget-copy"
    shutil.copyfile(ctarget_exe, path)
    first = elf_symbols(str(path))
    assert elf_symbols(str(path)) is first
    assert first.lookup("pl_work") is not None
    inode = path.stat().st_ino
    # rewrite in place (same inode) with a stripped build: a new size and mtime
    stripped = strip_copy(ctarget_exe, tmp_path / "stripped")
    with open(path, "r+b") as f:
        f.write(stripped.read_bytes())
        f.truncate()
    assert path.stat().st_ino == inode
    second = elf_symbols(str(path))
    assert second is not first
    assert second.lookup("pl_work") is None  # read from the new contents
    # same size, only the mtime moves: still a new identity
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    third = elf_symbols(str(path))
    assert third is not second
    assert elf_symbols(str(path)) is third


def test_vaddr_to_offset_matches_readelf() -> None:
    cases = [(LIBC, "clock_nanosleep")]
    libpython = _libpython()
    # data of libpython and libcudart lies in a segment whose p_vaddr != p_offset
    for lib in (libpython, _libcudart()):
        segments = load_segments(lib)
        shifted = [s for s in segments if s[0] != s[1]]
        assert shifted, f"{lib}: every PT_LOAD has p_vaddr == p_offset"
        data = [r for r in nm_defined(lib) if r[1] == "D"
                and any(s[1] <= r[0] < s[1] + s[2] for s in shifted)]
        if data:
            cases.append((lib, data[0][2]))
    assert len(cases) >= 2, cases
    for lib, name in cases:
        segments = load_segments(lib)
        syms = elf_symbols(lib)
        addr = next(r[0] for r in nm_defined(lib) if r[2] == name and r[4])
        expected = readelf_offset(segments, addr)
        assert expected is not None
        assert syms.vaddr_to_offset(addr) == expected, (lib, name)
        # the bytes at that offset are the ones the ELF headers say are at that vaddr
        assert syms.read_at(expected, 8) == Path(lib).read_bytes()[expected:expected + 8]
    # every segment's first and last file-backed byte, and a .bss address (not in the file)
    for lib in (LIBC, libpython):
        syms = elf_symbols(lib)
        for p_offset, p_vaddr, p_filesz, p_memsz in load_segments(lib):
            assert syms.vaddr_to_offset(p_vaddr) == p_offset
            assert syms.vaddr_to_offset(p_vaddr + p_filesz - 1) == p_offset + p_filesz - 1
            if p_memsz > p_filesz:
                assert syms.vaddr_to_offset(p_vaddr + p_filesz) is None
    assert elf_symbols(LIBC).vaddr_to_offset(1 << 60) is None


# ------------------------------------------------------------------ regressions


def test_exact_lookup_refuses_a_data_object() -> None:
    """A variable is no probe site: a uprobe there would sit on a page never executed."""
    kind = {r[2]: r[1] for r in nm_defined(LIBC)}
    assert kind["_IO_2_1_stdout_"] == "D"  # a FILE object in .data
    assert elf_symbols(LIBC).match("_IO_2_1_stdout_") == []  # glob: functions only
    with pytest.raises(SymbolNotFoundError):
        resolve(LIBC, "_IO_2_1_stdout_")


def test_gnu_hash_hit_does_not_scan_dynsym() -> None:
    """One hash and a chain walk: a hit must not read the whole .dynsym (a table of 3,000
    entries in libc where the hit reads one)."""
    syms = ElfSymbols(LIBC)
    try:
        scans = []
        original = syms._entries

        def counting_entries(section):  # type: ignore[no-untyped-def]
            scans.append(section.name)
            return original(section)

        syms._entries = counting_entries  # type: ignore[method-assign]
        got = syms.lookup("malloc")
        assert got is not None and got.table == ".gnu.hash"
        assert scans == [], "a .gnu.hash hit read a whole symbol table"
        syms.names()  # the counter does count a full read
        assert scans == [".dynsym"]
    finally:
        syms.close()


def _pyelftools_rows(path: str, table: str) -> list[tuple[Any, ...]]:
    """Every named symbol of ``table`` as pyelftools' own parser decodes it."""
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        elf = ELFFile(f)
        # pyelftools' generic Section type lacks the symbol and version tables' methods
        section: Any = elf.get_section_by_name(table)
        assert section is not None, (path, table)
        versym: Any = elf.get_section_by_name(".gnu.version") if table == ".dynsym" else None
        verdef: Any = elf.get_section_by_name(".gnu.version_d")
        names = {v["vd_ndx"]: next(iter(aux)).name for v, aux in verdef.iter_versions()} \
            if versym is not None and verdef is not None else {}
        rows = []
        for i, sym in enumerate(section.iter_symbols()):
            if not sym.name:
                continue
            version, hidden = "", False
            if versym is not None:
                ndx = versym.get_symbol(i).entry["ndx"]
                if not isinstance(ndx, str):
                    version, hidden = names.get(ndx & ~0x8000, ""), bool(ndx & 0x8000)
            kind, bind = sym["st_info"]["type"], sym["st_info"]["bind"]
            rows.append((sym.name, sym["st_value"], sym["st_size"], kind == "STT_FUNC",
                         kind in ("STT_GNU_IFUNC", "STT_LOOS"),
                         sym["st_shndx"] != "SHN_UNDEF" and sym["st_value"] != 0,
                         bind in ("STB_GLOBAL", "STB_WEAK"), hidden, version))
        return rows


def test_symbol_tables_agree_with_pyelftools(ctarget_exe: Path) -> None:
    """The tables are unpacked with struct, not pyelftools' per-entry parser (the attach
    cost, docs/performance.md#attach-time): every entry must decode as pyelftools decodes
    it, versions of versioned libraries (libc, libcudart) and a .symtab included."""
    cases = [(LIBC, ".dynsym"), (_libcudart(), ".dynsym"), (str(ctarget_exe), ".symtab"),
             (str(ctarget_exe), ".dynsym")]
    for path, table in cases:
        syms = ElfSymbols(path)
        try:
            ours = [tuple(s) for s in syms._table(table)]
        finally:
            syms.close()
        theirs = _pyelftools_rows(path, table)
        assert len(ours) > 10, (path, table)
        assert ours == theirs, (path, table)
    assert any(row[8] for row in _pyelftools_rows(LIBC, ".dynsym"))  # versions were compared


def test_cache_is_invalidated_when_the_c_target_is_rebuilt(tmp_path: Path) -> None:
    """Lookups, glob matches and near names are kept per file identity: a target rebuilt in
    place must be read again, not answered from the old build's tables."""
    from tests.conftest import CFLAGS, CTARGET_SRC

    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc is not None, "no C compiler: `make test` installs build-essential"
    exe = tmp_path / "ctarget"
    subprocess.run([cc, *CFLAGS, str(CTARGET_SRC), "-o", str(exe)], check=True)
    first = elf_symbols(str(exe))
    assert elf_symbols(str(exe)) is first
    before = {r.name for r in first.match("pl_*")}
    assert "pl_work" in before and "pl_rebuilt" not in before
    assert first.lookup("pl_rebuilt") is None
    near_before = first.near("pl_rebuilt")
    assert "pl_rebuilt" not in near_before

    source = tmp_path / "ctarget2.c"
    source.write_text(CTARGET_SRC.read_text() + "\n__attribute__((noinline)) long "
                      "pl_rebuilt(long x) { return x + 7; }\n")
    subprocess.run([cc, *CFLAGS, str(source), "-o", str(exe)], check=True)
    second = elf_symbols(str(exe))
    assert second is not first
    assert "pl_rebuilt" in {r.name for r in second.match("pl_*")}
    rebuilt = second.lookup("pl_rebuilt")
    assert rebuilt is not None
    addr = next(int(line.split()[0], 16) for line in subprocess.run(
        [_tool("nm"), str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()
        if line.endswith(" pl_rebuilt"))
    assert rebuilt.address == addr
    assert "pl_rebuilt" in resolve(str(exe), "pl_re*")[0].name
    # the old object still answers for the old build (a target still running it)
    assert first.lookup("pl_rebuilt") is None and first.near("pl_rebuilt") == near_before


def test_an_ifunc_is_refused_with_the_reason() -> None:
    """strlen/memcpy in glibc are IFUNCs: their symbol is the load-time resolver."""
    from probes.errors import SymbolNotFoundError
    from probes.symbols import resolve

    libc = "/lib/x86_64-linux-gnu/libc.so.6"
    for name in ("strlen", "memcpy"):
        with pytest.raises(SymbolNotFoundError, match="indirect function") as err:
            resolve(libc, name)
        assert name not in err.value.near
    assert resolve(libc, "read")[0].name == "read"
