"""Tests of the probe catalog: schema validation with file:line errors, search path,
captures, derived features, and the built-in profiles against real libraries."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.catalog import (
    BUILTIN_DIR,
    STACK_TYPES,
    Capture,
    DerivedFeature,
    LibrarySpec,
    Profile,
    available_profiles,
    load_profile,
    parse_profile,
    profile_dirs,
)
from probes.errors import CatalogError, SymbolNotFoundError
from probes.symbols import elf_symbols, resolve

BUILTINS = ("cuda", "nccl", "hip", "ascend", "blas", "llama_cpp", "cpython")


@pytest.fixture(autouse=True)
def _isolated_search_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No user profile of the machine running the tests leaks in."""
    monkeypatch.delenv("PRISM_PROFILE_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


MINIMAL = """\
[profile]
name = "mini"
description = "minimal profile"

[[library]]
id = "lib"
soname = ["libx.so*"]

[[probe]]
id = "p"
library = "lib"
symbol = "f"
stage = "work"
"""


# ------------------------------------------------------------------ built-ins


def test_builtin_dir_holds_every_profile() -> None:
    found = available_profiles()
    for name in BUILTINS:
        assert found[name] == str(BUILTIN_DIR / f"{name}.toml")


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_profile_is_valid(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.description
    assert profile.source == str(BUILTIN_DIR / f"{name}.toml")
    ids = [p.id for p in profile.probes]
    assert len(ids) == len(set(ids))
    lib_ids = [lib.id for lib in profile.libraries]
    assert len(lib_ids) == len(set(lib_ids))
    for probe in profile.probes:
        assert probe.library in lib_ids
        assert probe.level in ("sentinel", "deepdive")
        for capture in probe.captures:
            assert capture.source != "ret" or probe.ret
    for anchor in profile.anchors:
        assert profile.probe(anchor).level == "sentinel"
    assert profile.probes_at("sentinel"), "a profile needs always-on probes"
    assert set(profile.probes_at("deepdive")) == set(profile.probes)
    derived = [d.name for d in profile.derived]
    assert len(derived) == len(set(derived))


def test_builtin_loaded_by_path_is_the_same() -> None:
    assert load_profile(str(BUILTIN_DIR / "nccl.toml")) == load_profile("nccl")


# (profile, probe, capture) -> spec, checked against each API's real signature
EXPECTED_CAPTURES = {
    ("cuda", "memcpy_async", "bytes"): "arg3",
    ("cuda", "memcpy_async", "kind"): "arg4",
    ("cuda", "memcpy", "bytes"): "arg3",
    ("cuda", "launch", "grid_xy"): "arg2",
    ("cuda", "launch", "block_xy"): "arg4",
    ("cuda", "launch", "shared_mem"): "stack+8:u64",
    ("cuda", "cu_launch", "block_z"): "stack+8:u32",
    ("cuda", "cu_launch", "shared_mem"): "stack+16:u32",
    ("cuda", "cu_memcpy_dtoh_async", "bytes"): "arg3",
    ("nccl", "all_reduce", "count"): "arg3",
    ("nccl", "all_reduce", "datatype"): "arg4",
    ("nccl", "all_reduce", "op"): "arg5",
    ("nccl", "broadcast", "root"): "arg5",
    ("nccl", "send", "count"): "arg2",
    ("nccl", "recv", "peer"): "arg4",
    ("hip", "memcpy_async", "bytes"): "arg3",
    ("hip", "launch", "shared_mem"): "stack+8:u64",
    ("ascend", "memcpy_async", "bytes"): "arg4",
    ("ascend", "memcpy_async", "kind"): "arg5",
    ("ascend", "broadcast", "count"): "arg2",
    ("blas", "sgemm64", "M"): "arg4",
    ("blas", "sgemm64", "K"): "arg6",
    ("llama_cpp", "decode", "n_tokens"): "stack+8:i32",
    ("llama_cpp", "sample", "token"): "ret",
    ("cpython", "gc", "generation"): "arg2",
}


@pytest.mark.parametrize(("key", "spec"), sorted(EXPECTED_CAPTURES.items()))
def test_builtin_captures_match_the_signatures(key: tuple[str, str, str], spec: str) -> None:
    profile_name, probe_id, capture_name = key
    probe = load_profile(profile_name).probe(probe_id)
    assert {c.name: c.spec for c in probe.captures}[capture_name] == spec


def test_builtin_sentinel_choices() -> None:
    cuda = load_profile("cuda")
    assert cuda.anchors == ("stream_sync",)
    assert {p.symbol for p in cuda.probes_at("sentinel")} == {
        "cudaGraphLaunch", "cudaStreamSynchronize", "cudaDeviceSynchronize",
        "cudaEventSynchronize", "cudaMemcpyAsync", "cudaMemcpy"}
    assert cuda.probe("stream_sync").stage == "device_sync"
    assert cuda.probe("launch").level == "deepdive"
    llama = load_profile("llama_cpp")
    assert llama.anchors == ("decode", "process")
    assert llama.probe("decode").ret
    cpython = load_profile("cpython")
    assert not cpython.probe("gil_wait").optional
    assert not cpython.probe("gc").optional
    assert "_PyEval_EvalFrameDefault" not in {p.symbol for p in cpython.probes}


@pytest.mark.parametrize(("profile_name", "lib_id", "basename", "expected"), [
    ("cuda", "cudart", "libcudart.so.12", True),
    ("cuda", "cudart", "libcudart-9335f6a2.so.12", True),
    ("cuda", "cudart", "libcudart_static.a", False),
    ("cuda", "libcuda", "libcuda.so.1", True),
    ("cuda", "libcuda", "libcudart.so.12", False),
    ("nccl", "nccl", "libnccl.so.2", True),
    ("hip", "hip", "libamdhip64.so.6", True),
    ("hip", "rccl", "librccl.so.1", True),
    ("hip", "rocblas", "librocblas.so.4", True),
    ("ascend", "acl", "libascendcl.so", True),
    ("ascend", "hccl", "libhccl.so", True),
    ("blas", "blas", "libscipy_openblas64_-32a4b2a6.so", True),
    ("blas", "blas", "libopenblas64_p-r0-0cf96a72.3.23.dev.so", True),
    ("blas", "blas", "libopenblas.so.0", True),
    ("blas", "blas", "libmkl_rt.so.2", True),
    ("blas", "blas", "libgfortran-040039e1.so.5.0.0", False),
    ("llama_cpp", "llama", "libllama.so", True),
    ("llama_cpp", "llama", "llama-server", True),
    ("llama_cpp", "ggml", "libggml-base.so", True),
    ("llama_cpp", "ggml", "llama-cli", True),
    ("cpython", "cpython", "libpython3.11.so.1.0", True),
    ("cpython", "cpython", "python3.11", True),
    ("cpython", "cpython", "python", True),
    ("cpython", "cpython", "libc.so.6", False),
])
def test_builtin_library_patterns(profile_name: str, lib_id: str, basename: str,
                                  expected: bool) -> None:
    assert load_profile(profile_name).library(lib_id).matches(basename) is expected


# ------------------------------------------------------ against real libraries


def _cudart_path() -> Path:
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    assert spec is not None and spec.submodule_search_locations, (
        "nvidia-cuda-runtime-cu12 is a dev dependency: pip install -e '.[dev]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "lib" / "libcudart.so.12"
    assert path.is_file(), f"{path} is missing"
    return path


def test_cuda_profile_resolves_in_real_libcudart() -> None:
    path = _cudart_path()
    cuda = load_profile("cuda")
    cudart = cuda.library("cudart")
    assert cudart.matches(path.name)
    probes = [p for p in cuda.probes if p.library == "cudart"]
    assert len(probes) >= 10
    for probe in probes:
        found = resolve(str(path), probe.symbol)
        assert [s.name for s in found] == [probe.symbol]
        assert found[0].version == "libcudart.so.12"
        assert found[0].probe_offset > 0


def _numpy_openblas() -> Path:
    spec = importlib.util.find_spec("numpy")
    assert spec is not None and spec.origin is not None
    libs = sorted((Path(spec.origin).parent.parent / "numpy.libs").glob("libscipy_openblas*.so*"))
    assert libs, "numpy's bundled OpenBLAS (numpy.libs/libscipy_openblas*.so) not found"
    return libs[0]


def test_blas_profile_resolves_in_numpy_openblas() -> None:
    path = _numpy_openblas()
    blas = load_profile("blas")
    assert blas.library("blas").matches(path.name)

    def matches(probe_ids: list[str]) -> set[str]:
        names: set[str] = set()
        for probe_id in probe_ids:
            try:
                names |= {s.name for s in resolve(str(path), blas.probe(probe_id).symbol)}
            except SymbolNotFoundError:
                assert blas.probe(probe_id).optional
        return names

    # exactly the GEMM entry points: no _batch, gemmt or per-architecture kernels
    assert matches(["sgemm", "sgemm64", "sgemm_64"]) == {"scipy_cblas_sgemm64_"}
    assert matches(["dgemm", "dgemm64", "dgemm_64"]) == {"scipy_cblas_dgemm64_"}
    assert matches(["sgemm_f77", "sgemm_f77_64"]) == {"scipy_sgemm_64_"}
    assert matches(["dgemm_f77", "dgemm_f77_64"]) == {"scipy_dgemm_64_"}


def _mapped_libpython() -> Path:
    with open("/proc/self/maps") as maps:
        paths = {line.split(maxsplit=5)[-1].strip() for line in maps if "/" in line}
    libs = sorted(p for p in paths if re.search(r"/libpython3[^/]*\.so", p))
    if not libs:
        pytest.fail(f"this interpreter ({sys.executable}) maps no libpython3*.so: the "
                    "cpython profile cannot be checked against it")
    return Path(libs[0])


def test_cpython_profile_resolves_in_this_interpreters_libpython() -> None:
    path = _mapped_libpython()
    if not elf_symbols(str(path)).has_symtab:
        pytest.fail(f"{path} has no .symtab (stripped): take_gil and gc_collect_main are "
                    "local symbols and cannot resolve")
    cpython = load_profile("cpython")
    assert cpython.library("cpython").matches(path.name)
    for probe_id, symbol in (("gil_wait", "take_gil"), ("gc", "gc_collect_main")):
        probe = cpython.probe(probe_id)
        assert probe.symbol == symbol
        found = resolve(str(path), probe.symbol)
        assert [s.name for s in found] == [symbol]
        assert found[0].table == ".symtab"


# ------------------------------------------------------------------ malformed


def _expect_error(tmp_path: Path, text: str, reason: str, name: str = "bad.toml") -> str:
    """Load ``text`` from a file and check the error names file, the marked line, reason.

    The expected line is the one carrying the marker ``#<`` (line 1 if none).
    """
    path = tmp_path / name
    path.write_text(text)
    marked = [i for i, line in enumerate(text.split("\n"), start=1) if "#<" in line]
    line = marked[0] if marked else 1
    with pytest.raises(CatalogError) as info:
        load_profile(str(path))
    message = str(info.value)
    assert f"{name}:{line}: " in message, message
    assert reason in message, message
    assert "\n" not in message
    return message


def _with_profile_key(line: str) -> str:
    """MINIMAL with ``line`` (marked ``#<``) added to its [profile] table."""
    return MINIMAL.replace('description = "minimal profile"',
                           f'description = "minimal profile"\n{line}  #<')


MALFORMED = {
    "toml syntax": (MINIMAL + 'bad = "unterminated  #<\n', "invalid TOML"),
    "toml duplicate key": (MINIMAL + 'stage = "again"  #<\n', "invalid TOML"),
    "unknown root key": ("extra = 1  #<\n" + MINIMAL, "bad.toml:1: unknown key 'extra'"),
    "key after probe belongs to it": (MINIMAL + "\nextra = 1  #<\n",
                                      "probe 'p': unknown key 'extra'"),
    "unknown root table": (MINIMAL + "\n[extras]  #<\nx = 1\n", "unknown key 'extras'"),
    "unknown profile key": (_with_profile_key('anchr = "p"'),
                            "unknown key 'anchr' (did you mean 'anchor'?)"),
    "unknown probe key": (MINIMAL.replace('stage = "work"', 'stgae = "work"  #<'),
                          "probe 'p': unknown key 'stgae' (did you mean 'stage'?)"),
    "unknown library key": (MINIMAL.replace('soname = ["libx.so*"]',
                                            'soname = ["libx.so*"]\npath = "/x"  #<'),
                            "library 'lib': unknown key 'path'"),
    "unknown probe subtable": (MINIMAL + "[probe.argz]  #<\nx = 'arg1'\n",
                               "unknown key 'argz' (did you mean 'args'?)"),
    "unknown derived key": (MINIMAL + '[[derived]]\nname = "x"\nexpr = "1"\nexp = "2"  #<\n',
                            "derived 'x': unknown key 'exp'"),
    "misspelt profile table": (MINIMAL.replace("[profile]", "[profil]  #<"),
                               "unknown key 'profil' (did you mean 'profile'?)"),
    "missing profile": (MINIMAL.split("[[library]]")[1].join(["[[library]]#<", ""]),
                        "missing the [profile] table"),
    "missing description": (MINIMAL.replace('description = "minimal profile"\n', "")
                            .replace("[profile]", "[profile]  #<"),
                            "[profile]: missing required key 'description'"),
    "missing symbol": (MINIMAL.replace('symbol = "f"\n', "").replace(
        "[[probe]]", "[[probe]]  #<"), "probe 'p': missing required key 'symbol'"),
    "missing soname": (MINIMAL.replace('soname = ["libx.so*"]\n', "").replace(
        "[[library]]", "[[library]]  #<"), "missing required key 'soname'"),
    "no probes": (MINIMAL.split("[[probe]]")[0].replace("[profile]", "[profile]  #<"),
                  "defines no [[probe]]"),
    "probe is a table": (MINIMAL.replace("[[probe]]", "[probe]  #<"),
                         "'probe' must be an array of tables ([[probe]])"),
    "ret not bool": (MINIMAL + 'ret = "yes"  #<\n', "'ret' must be a boolean, not string"),
    "optional not bool": (MINIMAL + "optional = 1  #<\n",
                          "'optional' must be a boolean, not integer"),
    "level not str": (MINIMAL + "level = 3  #<\n", "'level' must be a string, not integer"),
    "symbol not str": (MINIMAL.replace('symbol = "f"', "symbol = 1  #<"),
                       "'symbol' must be a string, not integer"),
    "soname not list": (MINIMAL.replace('soname = ["libx.so*"]', "soname = 5  #<"),
                        "'soname' must be an array or string, not integer"),
    "soname with slash": (MINIMAL.replace('soname = ["libx.so*"]',
                                          'soname = ["/usr/lib/libx.so"]  #<'),
                          "must match a basename"),
    "name not str": (MINIMAL.replace('name = "mini"', "name = true  #<"),
                     "'name' must be a string, not boolean"),
    "bad level": (MINIMAL + 'level = "deepdiv"  #<\n',
                  "bad level 'deepdiv' (one of sentinel, deepdive) (did you mean 'deepdive'?)"),
    "bad stage": (MINIMAL.replace('stage = "work"', 'stage = "Kernel Launch"  #<'),
                  "bad stage 'Kernel Launch' (lower_snake_case)"),
    "duplicate probe id": (MINIMAL + '\n[[probe]]\nid = "p"  #<\nlibrary = "lib"\n'
                           'symbol = "g"\nstage = "work"\n',
                           "duplicate probe id 'p' (first defined at line 10)"),
    "duplicate library id": (MINIMAL.replace(
        "[[probe]]", '[[library]]\nid = "lib"  #<\nsoname = ["liby.so"]\n\n[[probe]]'),
        "duplicate library id 'lib'"),
    "unknown library": (MINIMAL.replace('library = "lib"', 'library = "libb"  #<'),
                        "probe 'p': unknown library 'libb' (did you mean 'lib'?) "
                        "(defined: lib)"),
    "unknown anchor": (_with_profile_key('anchor = "q"'), "anchor 'q' is not a probe id"),
    "unknown alternative anchor": (_with_profile_key('anchor = ["p", "q"]'),
                                   "anchor 'q' is not a probe id"),
    "empty anchor list": (_with_profile_key("anchor = []"), "'anchor' lists no probe"),
    "anchor listed twice": (_with_profile_key('anchor = ["p", "p"]'),
                            "anchor lists a probe twice"),
    "anchor of numbers": (_with_profile_key("anchor = [1]"),
                          "anchor probes must be probe ids (strings), not 1"),
    "deepdive anchor": (_with_profile_key('anchor = "p"') + 'level = "deepdive"\n',
                        "must be a sentinel probe"),
    "capture register out of range": (MINIMAL + '[probe.args]\nx = "arg7"  #<\n',
                                      "bad capture 'arg7': registers are arg1..arg6"),
    "capture register name": (MINIMAL + '[probe.args]\nx = "rdi"  #<\n',
                               "bad capture 'rdi': expected arg1..arg6, ret"),
    "capture stack type": (MINIMAL + '[probe.args]\nx = "stack+8:u128"  #<\n',
                           "unknown type 'u128'"),
    "capture stack sign": (MINIMAL + '[probe.args]\nx = "stack-8:u32"  #<\n',
                           "bad capture 'stack-8:u32'"),
    "capture stack too far": (MINIMAL + '[probe.args]\nx = "stack+70000:u8"  #<\n',
                              "must lie within the first"),
    "capture not str": (MINIMAL + "[probe.args]\nx = 3  #<\n",
                        "capture 'x' must be a string"),
    "capture name not identifier": (MINIMAL + '[probe.args]\n"grid x" = "arg2"  #<\n',
                                    "capture name 'grid x' is not an identifier"),
    "ret capture without ret": (MINIMAL + '[probe.args]\nres = "ret"  #<\n',
                                "capture 'res' = 'ret' needs ret = true"),
    "inline args": (MINIMAL + 'args = { a = "arg1", b = "arg9" }  #<\n',
                    "bad capture 'arg9'"),
    "dotted args": (MINIMAL + 'args.a = "arg1"\nargs.b = "stack+1:x8"  #<\n',
                    "unknown type 'x8'"),
    "derived unsafe call": (MINIMAL + '[[derived]]\nname = "x"\nexpr = "__import__(\'os\')"'
                            "  #<\n", "call of __import__() is not allowed"),
    "derived attribute": (MINIMAL + '[[derived]]\nname = "x"\nexpr = "a.b.c * 2"  #<\n',
                          "attribute access is not allowed"),
    "derived method": (MINIMAL + '[[derived]]\nname = "x"\nexpr = "min.x"  #<\n',
                       "attribute access is not allowed"),
    "phase rule comparison": (_with_profile_key('phase_rule = "calls.p == 1"'),
                              "phase_rule: 'calls.p == 1' is not safe arithmetic"),
    "derived syntax": (MINIMAL + '[[derived]]\nname = "x"\nexpr = "a +"  #<\n',
                       "not an arithmetic expression"),
    "derived name": (MINIMAL + '[[derived]]\nname = "2x"  #<\nexpr = "1"\n',
                     "derived name '2x' is not an identifier"),
    "derived shadows capture": (MINIMAL + '[probe.args]\nbytes = "arg3"\n[[derived]]\n'
                                'name = "bytes"  #<\nexpr = "1"\n',
                                "'bytes' is already captured by probe 'p'"),
    "derived duplicate": (MINIMAL + '[[derived]]\nname = "x"\nexpr = "1"\n'
                          '[[derived]]\nname = "x"  #<\nexpr = "2"\n',
                          "duplicate derived feature 'x'"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_profile_names_file_line_and_reason(tmp_path: Path, case: str) -> None:
    text, reason = MALFORMED[case]
    _expect_error(tmp_path, text, reason)


def test_error_line_is_found_in_the_right_probe_block(tmp_path: Path) -> None:
    text = MINIMAL
    for i in range(2, 5):
        text += f'\n[[probe]]\nid = "p{i}"\nlibrary = "lib"\nsymbol = "f{i}"\nstage = "s"\n'
        text += 'level = "deepdive"\n' if i != 3 else 'level = "always"  #<\n'
        text += f'[probe.args]\nx = "arg{i}"\n'
    message = _expect_error(tmp_path, text, "probe 'p3': bad level 'always'")
    assert message.startswith(str(tmp_path / "bad.toml"))


def test_error_line_in_args_of_a_later_probe(tmp_path: Path) -> None:
    text = MINIMAL + '[probe.args]\na = "arg1"\n'
    text += '\n[[probe]]\nid = "q"\nlibrary = "lib"\nsymbol = "g"\nstage = "s"\n'
    text += '[probe.args]\na = "arg1"\nb = "ret"  #<\n'
    _expect_error(tmp_path, text, "probe 'q': capture 'b' = 'ret' needs ret = true")


@pytest.mark.parametrize("name", BUILTINS)
def test_error_lines_in_real_profiles(name: str) -> None:
    """Break each stage, level and capture line of a built-in in turn: the line is named."""
    lines = (BUILTIN_DIR / f"{name}.toml").read_text().split("\n")
    broken = {
        r'^stage = "': ('stage = "Bad Stage"', "bad stage"),
        r'^level = "': ('level = "sometimes"', "bad level"),
        r'^[A-Za-z_]+ = "(arg\d|stack\+|ret")': ("x = 'arg9'", "bad capture 'arg9'"),
    }
    checked = 0
    for number, line in enumerate(lines, start=1):
        for pattern, (replacement, reason) in broken.items():
            if not re.match(pattern, line):
                continue
            text = "\n".join([*lines[:number - 1], replacement, *lines[number:]])
            with pytest.raises(CatalogError) as info:
                parse_profile(text, source=f"{name}.toml")
            assert str(info.value).startswith(f"{name}.toml:{number}: probe '"), str(info.value)
            assert reason in str(info.value)
            checked += 1
    assert checked >= 3


def test_toml_error_at_end_of_document(tmp_path: Path) -> None:
    text = MINIMAL + "x = [1,\n2,\n  #<"
    _expect_error(tmp_path, text, "invalid TOML")


def test_error_lines_with_crlf_line_ends(tmp_path: Path) -> None:
    path = tmp_path / "crlf.toml"
    text = MINIMAL + 'level = "never"\n'
    path.write_bytes(text.replace("\n", "\r\n").encode())
    with pytest.raises(CatalogError, match=r"crlf\.toml:14: probe 'p': bad level"):
        load_profile(str(path))


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.toml"
    path.write_bytes(MINIMAL.encode() + b'level = "d\xe9ep"\n')
    with pytest.raises(CatalogError, match=r"latin\.toml:14: profile is not UTF-8"):
        load_profile(str(path))


def test_parse_profile_names_its_source() -> None:
    with pytest.raises(CatalogError, match=r"^<string>:1: missing the \[profile\]"):
        parse_profile("")
    with pytest.raises(CatalogError, match=r"^mine\.toml:14: probe 'p': unknown key 'x'"):
        parse_profile(MINIMAL + "x = 1\n", source="mine.toml")


def test_missing_file_and_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="no such profile file"):
        load_profile(str(tmp_path / "nope.toml"))
    with pytest.raises(CatalogError) as info:
        load_profile("cudaa")
    message = str(info.value)
    assert "unknown profile 'cudaa'" in message
    assert "did you mean 'cuda'?" in message
    for name in BUILTINS:
        assert name in message


# ------------------------------------------------------------------ search path


def test_user_dirs_shadow_builtins_and_add_profiles(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "cuda.toml").write_text(MINIMAL.replace('"mini"', '"cuda"')
                                     .replace("minimal profile", "site cuda"))
    (second / "cuda.toml").write_text(MINIMAL.replace('"mini"', '"cuda"')
                                      .replace("minimal profile", "shadowed"))
    (second / "mini.toml").write_text(MINIMAL)
    monkeypatch.setenv("PRISM_PROFILE_PATH", os.pathsep.join([str(first), "", str(second)]))

    assert load_profile("cuda").description == "site cuda"
    assert load_profile("mini").source == str(second / "mini.toml")
    found = available_profiles()
    assert found["cuda"] == str(first / "cuda.toml")
    assert found["mini"] == str(second / "mini.toml")
    assert found["nccl"] == str(BUILTIN_DIR / "nccl.toml")
    assert profile_dirs()[:2] == (first, second)
    assert profile_dirs()[-1] == BUILTIN_DIR


def test_home_config_dir_is_searched_after_env(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    home_dir = tmp_path / "home" / ".config" / "latencyprism" / "profiles"
    home_dir.mkdir(parents=True)
    (home_dir / "mini.toml").write_text(MINIMAL)
    (home_dir / "nccl.toml").write_text(MINIMAL.replace('"mini"', '"nccl"'))
    assert load_profile("mini").name == "mini"
    assert load_profile("nccl").description == "minimal profile"
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    (env_dir / "mini.toml").write_text(MINIMAL.replace("minimal profile", "from env"))
    monkeypatch.setenv("PRISM_PROFILE_PATH", str(env_dir))
    assert load_profile("mini").description == "from env"


def test_profile_found_by_name_must_carry_that_name(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "other.toml").write_text(MINIMAL)
    monkeypatch.setenv("PRISM_PROFILE_PATH", str(tmp_path))
    with pytest.raises(CatalogError,
                       match=r"other\.toml:2: \[profile\]: name 'mini' must match the file"):
        load_profile("other")
    assert load_profile(str(tmp_path / "other.toml")).name == "mini"  # by path: any name


def test_load_by_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.toml").write_text(MINIMAL)
    (tmp_path / "y.toml").write_text(MINIMAL)
    monkeypatch.chdir(tmp_path)
    assert load_profile("sub/x.toml").source == "sub/x.toml"
    assert load_profile("y.toml").name == "mini"


# ------------------------------------------------------------------ model


def test_profile_accessors() -> None:
    profile = parse_profile(MINIMAL + 'ret = true\n[probe.args]\nn = "arg2"\n'
                            'buf = "stack+16:u64"\nres = "ret"\nm = "arg2"\n'
                            'f = "stack+0x20:f32"\n')
    assert isinstance(profile, Profile)
    probe = profile.probe("p")
    assert probe.level == "sentinel" and not probe.optional and probe.ret
    assert probe.registers == (2,)
    assert probe.stack_bytes == 0x24
    assert not probe.is_glob
    assert [c.source for c in probe.captures] == ["reg", "stack", "ret", "reg", "stack"]
    assert profile.library("lib") == LibrarySpec("lib", ("libx.so*",))
    assert profile.probes_at("sentinel") == (probe,)
    assert profile.probes_at("deepdive") == (probe,)
    with pytest.raises(KeyError):
        profile.probe("nope")
    with pytest.raises(KeyError):
        profile.library("nope")
    with pytest.raises(ValueError, match="unknown level"):
        profile.probes_at("always")
    assert profile.anchors == () and profile.phase_rule is None and profile.derived == ()


def test_optional_keys_and_single_soname_string() -> None:
    profile = parse_profile(MINIMAL.replace('soname = ["libx.so*"]', 'soname = "libx.so*"')
                            .replace('description = "minimal profile"',
                                     'description = "d"\nanchor = "p"\n'
                                     'phase_rule = "min(calls.p, n) / n"')
                            + 'optional = true\n')
    assert profile.library("lib").patterns == ("libx.so*",)
    assert profile.anchors == ("p",)
    assert profile.phase_rule == "min(calls.p, n) / n"
    assert profile.probe("p").optional


def test_an_anchor_list_keeps_its_order() -> None:
    text = (MINIMAL.replace('description = "minimal profile"',
                            'description = "d"\nanchor = ["q", "p"]')
            + '\n[[probe]]\nid = "q"\nlibrary = "lib"\nsymbol = "g"\nstage = "s"\n')
    assert parse_profile(text).anchors == ("q", "p")


def test_library_spec_matches_basenames_only() -> None:
    lib = LibrarySpec("x", ("libcudart.so*", "libcudart-*.so*"))
    assert lib.matches("libcudart.so.12")
    assert lib.matches("/usr/local/cuda/lib64/libcudart.so.12")
    assert not lib.matches("libcudart_static.a")
    assert not lib.matches("LIBCUDART.so.12")


@pytest.mark.parametrize("type_", sorted(STACK_TYPES))
def test_capture_decode_every_type(type_: str) -> None:
    fmt, size = STACK_TYPES[type_]
    capture = Capture.parse("v", f"stack+8:{type_}")
    assert capture.source == "stack" and capture.stack_offset == 8 and capture.type == type_
    assert capture.size == size
    if type_.startswith("f"):
        values: list[float] = [0.0, -1.5, 3.25, math.inf]
    else:
        bits = size * 8
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if type_[0] == "i" else (
            0, (1 << bits) - 1)
        values = [lo, hi, 0, 1]
    for value in values:
        raw = struct.pack(fmt, value) + b"\xff" * 3  # trailing bytes are ignored
        assert capture.decode(raw) == value
    with pytest.raises(ValueError, match="needs"):
        capture.decode(b"\x00" * (size - 1))


def test_capture_decode_known_bytes() -> None:
    assert Capture.parse("a", "stack+8:u32").decode(b"\x01\x02\x03\x04") == 0x04030201
    assert Capture.parse("a", "stack+8:i16").decode(b"\xfe\xff") == -2
    assert Capture.parse("a", "stack+8:f32").decode(struct.pack("<f", 0.5)) == 0.5
    reg = Capture.parse("a", "arg6")
    assert (reg.source, reg.register, reg.size) == ("reg", 6, 0)
    assert reg.decode((1 << 40).to_bytes(8, "little")) == 1 << 40
    ret = Capture.parse("r", "ret")
    assert (ret.source, ret.register, ret.stack_offset) == ("ret", None, None)


@pytest.mark.parametrize("spec", ["arg0", "arg7", "args", "ret1", "stack+8", "stack+8:",
                                  "stack:u8", "stack+-1:u8", "stack+8:U8", " arg1",
                                  "stack+8:u8 ", "stack+65528:u8", "rax", ""])
def test_capture_parse_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="capture"):
        Capture.parse("x", spec)


def test_capture_parse_hex_offset_and_limits() -> None:
    assert Capture.parse("x", "stack+0x10:u64").stack_offset == 16
    assert Capture.parse("x", "stack+08:u64").stack_offset == 8
    assert Capture.parse("x", "stack+65527:u8").size == 1
    with pytest.raises(ValueError, match="not an identifier"):
        Capture.parse("class", "arg1")


# ------------------------------------------------------------------ derived


def test_derived_arithmetic() -> None:
    values = {"a": 7, "b": 2, "c": -3.5}
    cases = {
        "a + b": 9, "a - b": 5, "a * b": 14, "a / b": 3.5, "a // b": 3, "a % b": 1,
        "a ** b": 49, "-a": -7, "-(a - b) * 2": -10, "min(a, b, c)": -3.5,
        "max(a, b)": 7, "abs(c)": 3.5, "2 * a * b * 10": 280, "1e3 / a * 0": 0,
    }
    for expr, expected in cases.items():
        assert DerivedFeature("x", expr).evaluate(values) == expected, expr
    flops = load_profile("blas").derived[0]
    assert flops.evaluate({"M": 128, "N": 256, "K": 64}) == 2 * 128 * 256 * 64
    assert flops.names == {"M", "N", "K"}


def test_derived_integers_stay_exact() -> None:
    # grid_z's high half is struct padding: masking must work on the full 64-bit value
    blocks = {d.name: d for d in load_profile("cuda").derived}["grid_blocks"]
    garbage_z = (0xDEADBEEF << 32) | 3
    assert blocks.evaluate({"grid_xy": (5 << 32) | 7, "grid_z": garbage_z}) == 7 * 5 * 3
    tokens = {d.name: d for d in load_profile("cuda").derived}["tokens"]
    assert tokens.evaluate({"d2h_bytes": 64 * 8}) == 64


def test_dotted_names_are_features_of_a_probe() -> None:
    # probe.argument and calls.probe are how the engine names per-iteration features
    rule = DerivedFeature("x", "min(calls.sample, decode.n_tokens) / decode.n_tokens")
    assert rule.names == {"calls.sample", "decode.n_tokens"}
    assert rule.evaluate({"calls.sample": 3.0, "decode.n_tokens": 12.0}) == 0.25
    assert rule.evaluate({"calls": 3.0, "decode.n_tokens": 12.0}) is None  # not 'calls'
    assert DerivedFeature("y", "decode + decode.n").names == {"decode", "decode.n"}


def test_first_takes_the_first_argument_whose_names_are_present() -> None:
    """``first(a, b)``: an engine that passes the same quantity through one function or
    another (llama_decode's n_tokens, or llama-server's llama_batch_ext_add_token calls)."""
    tokens = DerivedFeature("t", "first(decode.n_tokens, calls.add_token)")
    assert tokens.names == {"decode.n_tokens", "calls.add_token"}
    assert tokens.evaluate({"decode.n_tokens": 12.0, "calls.add_token": 3.0}) == 12.0
    assert tokens.evaluate({"calls.add_token": 3.0}) == 3.0
    assert tokens.evaluate({}) is None  # none present: missing, as any name
    # only a missing name moves on: failing math in the first is the answer (None)
    ratio = DerivedFeature("r", "first(a / b, c)")
    assert ratio.evaluate({"a": 1.0, "b": 0.0, "c": 5.0}) is None
    assert ratio.evaluate({"c": 5.0}) == 5.0
    assert DerivedFeature("n", "first(x, y, 7)").evaluate({}) == 7.0
    with pytest.raises(ValueError, match="at least two"):
        DerivedFeature("x", "first(a)").evaluate({"a": 1.0})


def test_derived_missing_and_failing_math_give_none() -> None:
    assert DerivedFeature("x", "a / b").evaluate({"a": 1}) is None
    assert DerivedFeature("x", "a / b").evaluate({"a": 1, "b": 0}) is None
    assert DerivedFeature("x", "a // b").evaluate({"a": 1, "b": 0}) is None
    assert DerivedFeature("x", "a % b").evaluate({"a": 1, "b": 0.0}) is None
    assert DerivedFeature("x", "10 ** a").evaluate({"a": 400}) is None
    assert DerivedFeature("x", "a ** 0.5").evaluate({"a": -1}) is None
    assert DerivedFeature("x", "a * 2").evaluate({"a": math.inf}) is None
    assert DerivedFeature("x", "a * 2").evaluate({"a": None}) is None  # type: ignore[dict-item]
    assert DerivedFeature("x", "a * 2").evaluate({"a": "3"}) is None  # type: ignore[dict-item]


@pytest.mark.parametrize("expr", [
    "__import__('os')", "__import__('os').system('true')", "a.b.c", "a.__class__",
    "open('x')", "eval('1')", "f(a)", "(lambda: 1)()", "a if b else c", "a < b",
    "a and b", "not a", "[1, 2]", "(1, 2)", "{1: 2}", "a[0]", "'text'", "True", "None",
    "...", "1j", "~a", "+a", "a & b", "a << 2", "a @ b", "min", "abs(a, b)", "max(a)",
    "min(a, key=b)", "max(*a)", "(x := 1)", "[x for x in a]", "f'{a}'", "(yield)",
    "a; b", "import os", "", "   ", "a" * 600,
])
def test_derived_rejects_everything_but_arithmetic(expr: str) -> None:
    with pytest.raises(ValueError):
        DerivedFeature("x", expr)
    text = MINIMAL + f"[[derived]]\nname = 'x'\nexpr = '''{expr}'''\n"
    with pytest.raises(CatalogError, match=r"<string>:16: derived 'x': "):
        parse_profile(text)


# ------------------------------------------------------------------ fuzz

_SEED = (BUILTIN_DIR / "cuda.toml").read_text()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=400))
def test_random_text_raises_only_catalog_error(text: str) -> None:
    try:
        parse_profile(text, source="fuzz.toml")
    except CatalogError as exc:
        assert str(exc).startswith("fuzz.toml:")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(_SEED)), st.integers(0, 40),
                          st.text(max_size=8)), max_size=4))
def test_mutated_profile_raises_only_catalog_error(
        edits: list[tuple[int, int, str]]) -> None:
    text = _SEED
    for pos, cut, insert in edits:
        text = text[:pos] + insert + text[pos + cut:]
    try:
        profile = parse_profile(text, source="fuzz.toml")
    except CatalogError as exc:
        message = str(exc)
        assert re.match(r"fuzz\.toml:\d+: ", message), message
        line = int(message.split(":")[1])
        assert 1 <= line <= text.count("\n") + 1
    else:
        assert profile.probes


@settings(max_examples=200, deadline=None)
@given(st.recursive(
    st.one_of(st.integers(-10, 10).map(str), st.sampled_from(["a", "b", "1.5"])),
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "//", "%", "**"]), inner)
        .map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        inner.map(lambda s: f"-{s}"),
        st.tuples(st.sampled_from(["min", "max"]), inner, inner)
        .map(lambda t: f"{t[0]}({t[1]}, {t[2]})"),
        inner.map(lambda s: f"abs({s})"),
    ), max_leaves=12))
def test_generated_arithmetic_evaluates_or_gives_none(expr: str) -> None:
    result = DerivedFeature("x", expr).evaluate({"a": 3, "b": -2})
    assert result is None or math.isfinite(result)
