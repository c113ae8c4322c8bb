"""Probe catalog: TOML profiles naming libraries, probes, argument captures and features.

A profile says which libraries to look for (soname globs on a mapped file's basename),
which functions to probe in them (exact name or glob), the stage each call belongs to,
whether its return is probed, and which arguments to capture as workload features.
Users add profiles without touching code: :func:`load_profile` searches
``$PRISM_PROFILE_PATH``, then ``~/.config/latencyprism/profiles``, then the built-ins.

Every malformed profile raises :class:`~probes.errors.CatalogError` whose message is
``FILE:LINE: context: reason``, so the command line prints one line a user can act on.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import fnmatch
import keyword
import math
import os
import re
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, NoReturn

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

from probes.errors import CatalogError

__all__ = [
    "BUILTIN_DIR",
    "LEVELS",
    "STACK_TYPES",
    "Capture",
    "DerivedFeature",
    "LibrarySpec",
    "ProbeSpec",
    "Profile",
    "available_profiles",
    "load_profile",
    "parse_profile",
    "profile_dirs",
]

BUILTIN_DIR: Path = Path(__file__).resolve().parent
"""Directory of the profiles shipped with the package (searched last)."""

LEVELS = ("sentinel", "deepdive")
"""Probe levels: ``sentinel`` is always on, ``deepdive`` is added when an alert fires."""

STACK_TYPES: dict[str, tuple[str, int]] = {
    "u8": ("<B", 1), "u16": ("<H", 2), "u32": ("<I", 4), "u64": ("<Q", 8),
    "i8": ("<b", 1), "i16": ("<h", 2), "i32": ("<i", 4), "i64": ("<q", 8),
    "f32": ("<f", 4), "f64": ("<d", 8),
}
"""Stack capture types: name -> (struct format, size in bytes), little-endian."""

MAX_STACK_BYTES = 65528
"""Largest user-stack dump perf can attach to a sample (``sample_stack_user``)."""

MAX_EXPR_CHARS = 512
"""Longest derived-feature expression accepted (keeps evaluation trivially bounded)."""

USER_PROFILE_DIR = Path(".config") / "latencyprism" / "profiles"
"""Per-user profile directory, relative to the home directory."""

_ROOT_KEYS = ("profile", "library", "probe", "derived")
_PROFILE_KEYS = ("name", "description", "anchor", "phase_rule")
_LIBRARY_KEYS = ("id", "soname")
_PROBE_KEYS = ("id", "library", "symbol", "stage", "ret", "level", "optional", "args")
_DERIVED_KEYS = ("name", "expr")

_PROFILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_ID_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_STAGE_RE = re.compile(r"[a-z][a-z0-9_]*")
_REG_RE = re.compile(r"arg([1-6])")
_STACK_RE = re.compile(r"stack\+(0[xX][0-9a-fA-F]+|[0-9]+):([a-z0-9]+)")
_CAPTURE_FORMS = "arg1..arg6, ret, or stack+OFFSET:TYPE"


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Capture:
    """One argument captured at a probe: a register, the return value, or stack bytes.

    Attributes:
        name: feature name (a Python identifier, usable in derived expressions).
        source: ``reg`` (argument register), ``ret`` (return value) or ``stack``.
        register: 1..6 for ``argN`` (System V: rdi rsi rdx rcx r8 r9), else None.
        stack_offset: bytes above the stack pointer at entry (+0 is the return address).
        type: one of :data:`STACK_TYPES` for stack captures, else None.
        spec: the text as written in the profile, for example ``stack+8:u32``.
    """

    name: str
    source: str
    register: int | None
    stack_offset: int | None
    type: str | None
    spec: str

    @classmethod
    def parse(cls, name: str, spec: str) -> Capture:
        """Parse ``spec`` (``argN``, ``ret`` or ``stack+OFFSET:TYPE``); ValueError says why."""
        if not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(f"capture name {name!r} is not an identifier")
        if spec == "ret":
            return cls(name, "ret", None, None, None, spec)
        reg = _REG_RE.fullmatch(spec)
        if reg is not None:
            return cls(name, "reg", int(reg.group(1)), None, None, spec)
        if spec.startswith("arg"):
            raise ValueError(f"bad capture {spec!r}: registers are arg1..arg6 "
                             "(later arguments are on the stack: stack+OFFSET:TYPE)")
        stack = _STACK_RE.fullmatch(spec)
        if stack is None:
            raise ValueError(f"bad capture {spec!r}: expected {_CAPTURE_FORMS}")
        text = stack.group(1)
        offset = int(text, 16) if text[:2] in ("0x", "0X") else int(text, 10)
        type_ = stack.group(2)
        if type_ not in STACK_TYPES:
            raise ValueError(f"bad capture {spec!r}: unknown type {type_!r} "
                             f"(one of {', '.join(STACK_TYPES)})")
        if offset + STACK_TYPES[type_][1] > MAX_STACK_BYTES:
            raise ValueError(f"bad capture {spec!r}: stack captures must lie within the "
                             f"first {MAX_STACK_BYTES} bytes")
        return cls(name, "stack", None, offset, type_, spec)

    @property
    def size(self) -> int:
        """Bytes read from the stack for a stack capture, 0 otherwise."""
        if self.source != "stack" or self.type is None:
            return 0
        return STACK_TYPES[self.type][1]

    def decode(self, raw: bytes) -> int | float:
        """Decode the first ``size`` bytes of ``raw`` (little-endian) per ``type``.

        Register and return captures (no type) decode up to 8 bytes as an unsigned integer.
        Raises ValueError when ``raw`` is shorter than ``size``.
        """
        if self.type is None:
            return int.from_bytes(raw[:8], "little")
        fmt, size = STACK_TYPES[self.type]
        if len(raw) < size:
            raise ValueError(f"capture {self.name!r} ({self.spec}) needs {size} bytes, "
                             f"got {len(raw)}")
        value: int | float = struct.unpack_from(fmt, raw)[0]
        return value


@dataclass(frozen=True)
class LibrarySpec:
    """A library a profile probes, named by globs on a mapped file's basename.

    A process may map several files that match (a shared library and a statically linked
    executable, say); symbols are looked up in each.
    """

    id: str
    patterns: tuple[str, ...]

    def matches(self, basename: str) -> bool:
        """True when ``basename`` (a path is reduced to its basename) matches a pattern."""
        base = os.path.basename(basename)
        return any(fnmatch.fnmatchcase(base, p) for p in self.patterns)


@dataclass(frozen=True)
class ProbeSpec:
    """One probe: a symbol (or glob) in a library, its stage, level and captures.

    Attributes:
        id: unique in its profile.
        library: id of the :class:`LibrarySpec` the symbol is looked up in.
        symbol: exact function name, or a glob (``*``, ``?``, ``[``) matching several.
        stage: lower_snake_case stage the call's time is attributed to.
        ret: whether the return is probed too (entry + return make a span).
        level: ``sentinel`` (always on) or ``deepdive`` (added when an alert fires).
        optional: when true, a symbol missing from a mapped library is only reported.
        captures: arguments (and return value) read at the probe, as workload features.
    """

    id: str
    library: str
    symbol: str
    stage: str
    ret: bool
    level: str
    optional: bool
    captures: tuple[Capture, ...]

    @property
    def registers(self) -> tuple[int, ...]:
        """Argument registers (1..6) the captures need, sorted, without repeats."""
        return tuple(sorted({c.register for c in self.captures if c.register is not None}))

    @property
    def stack_bytes(self) -> int:
        """User-stack bytes to copy at entry: max(offset + size) over stack captures."""
        return max((c.stack_offset + c.size for c in self.captures
                    if c.source == "stack" and c.stack_offset is not None), default=0)

    @property
    def is_glob(self) -> bool:
        """True when ``symbol`` is a glob that may match several functions."""
        return any(ch in self.symbol for ch in "*?[")


@dataclass(frozen=True)
class DerivedFeature:
    """A feature computed from others by safe arithmetic (``tokens = d2h_bytes / 8``).

    The expression is parsed with :mod:`ast`, whitelisted and turned into closures; it is
    never passed to ``eval``.
    """

    name: str
    expr: str

    def __post_init__(self) -> None:
        """Validate the expression up front (ValueError with the reason)."""
        _compile_expr(self.expr)

    @cached_property
    def names(self) -> frozenset[str]:
        """Feature names the expression reads (worked out once: read per iteration)."""
        return feature_names(self.expr)

    def evaluate(self, values: Mapping[str, float]) -> float | None:
        """The value for ``values``; None if a name is missing or the math fails.

        Failing math is a division by zero, an overflow, or a result that is not finite.
        """
        try:
            result = float(_closure_of(self.expr)(values))
        except (KeyError, ZeroDivisionError, OverflowError, ValueError, TypeError,
                RecursionError):
            return None
        return result if math.isfinite(result) else None


@dataclass(frozen=True)
class Profile:
    """A parsed probe profile: libraries, probes, anchor, phase rule, derived features."""

    name: str
    description: str
    libraries: tuple[LibrarySpec, ...]
    probes: tuple[ProbeSpec, ...]
    anchor: str | None
    phase_rule: str | None
    """An expression of the iteration's features giving the share of the step's new
    tokens that are decode tokens (one per running sequence): 1 or more is ``decode``,
    0 or less ``prefill``, between ``mixed``. None, or a rule that does not resolve for an
    iteration: the engine's built-in rule (tokens in vs sequences out)."""
    derived: tuple[DerivedFeature, ...]
    source: str

    def library(self, lib_id: str) -> LibrarySpec:
        """The library with id ``lib_id``; KeyError if none."""
        for lib in self.libraries:
            if lib.id == lib_id:
                return lib
        raise KeyError(f"profile {self.name!r} has no library {lib_id!r}")

    def probe(self, probe_id: str) -> ProbeSpec:
        """The probe with id ``probe_id``; KeyError if none."""
        for probe in self.probes:
            if probe.id == probe_id:
                return probe
        raise KeyError(f"profile {self.name!r} has no probe {probe_id!r}")

    def probes_at(self, level: str) -> tuple[ProbeSpec, ...]:
        """Probes active at ``level``: sentinel ones only, or all of them for deepdive."""
        if level == "sentinel":
            return tuple(p for p in self.probes if p.level == "sentinel")
        if level == "deepdive":
            return self.probes
        raise ValueError(f"unknown level {level!r} (one of {', '.join(LEVELS)})")


# ----------------------------------------------------------- derived expressions

_FUNCS: dict[str, Callable[..., Any]] = {"min": min, "max": max, "abs": abs}
_BINOPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
    # always in floating point: an integer power could grow without bound
    ast.Pow: lambda a, b: math.pow(a, b),
}


@lru_cache(maxsize=1024)
def _compile_expr(expr: str) -> ast.Expression:
    """Parse and whitelist a derived expression; ValueError says what is not allowed."""
    if not isinstance(expr, str):
        raise ValueError("expression must be a string")
    if len(expr) > MAX_EXPR_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPR_CHARS} characters")
    if not expr.strip():
        raise ValueError("expression is empty")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {exc.msg}") from None
    except (ValueError, RecursionError, MemoryError):
        raise ValueError("not an arithmetic expression") from None
    try:
        _check_node(tree.body)
    except RecursionError:
        raise ValueError("expression nested too deeply") from None
    return tree


def _check_node(node: ast.expr) -> None:
    """Raise ValueError unless ``node`` is numbers, names, + - * / // % **, unary -, calls."""
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ValueError(f"{ast.unparse(node)!r} is not a number")
    elif isinstance(node, ast.Name):
        if node.id in _FUNCS:
            raise ValueError(f"{node.id} must be called: {node.id}(...)")
    elif isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, ast.USub):
            raise ValueError(f"{ast.unparse(node)!r}: only unary minus is allowed")
        _check_node(node.operand)
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BINOPS:
            raise ValueError(f"{ast.unparse(node)!r}: operator not allowed "
                             "(only + - * / // % **)")
        _check_node(node.left)
        _check_node(node.right)
    elif isinstance(node, ast.Call):
        func = node.func
        if not isinstance(func, ast.Name) or func.id not in _FUNCS:
            raise ValueError(f"call of {ast.unparse(func)}() is not allowed "
                             "(only min(), max(), abs())")
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise ValueError(f"{func.id}() takes plain positional arguments only")
        if func.id == "abs" and len(node.args) != 1:
            raise ValueError("abs() takes exactly one argument")
        if func.id != "abs" and len(node.args) < 2:
            raise ValueError(f"{func.id}() takes at least two arguments")
        for arg in node.args:
            _check_node(arg)
    elif isinstance(node, ast.Attribute):
        if not isinstance(node.value, ast.Name) or node.value.id in _FUNCS or \
                node.attr.startswith("__"):
            raise ValueError(f"{ast.unparse(node)!r}: attribute access is not allowed "
                             "(a dotted name is one feature: probe.argument, calls.probe)")
    else:
        raise ValueError(f"{ast.unparse(node)!r} is not safe arithmetic "
                         f"({type(node).__name__} not allowed)")


_Closure = Callable[[Mapping[str, float]], Any]


@lru_cache(maxsize=1024)
def feature_names(expr: str) -> frozenset[str]:
    """Feature names ``expr`` reads: identifiers, and dotted names such as
    ``decode.n_tokens`` (the features of a probe's arguments and calls)."""
    tree = _compile_expr(expr)
    dotted = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names = {n.id for n in ast.walk(tree)
             if isinstance(n, ast.Name) and n.id not in _FUNCS and id(n) not in dotted}
    names |= {_dotted(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    return frozenset(names)


def _dotted(node: ast.Attribute) -> str:
    assert isinstance(node.value, ast.Name)  # _check_node allows nothing else
    return f"{node.value.id}.{node.attr}"


@lru_cache(maxsize=1024)
def _closure_of(expr: str) -> _Closure:
    """``expr`` as nested closures: evaluated without dispatching on node types.

    Why: the engine evaluates the profile's derived features once per iteration; the
    whitelisted tree is turned into Python closures once, and never into code for eval.
    """
    return _closure(_compile_expr(expr).body)


def _closure(node: ast.expr) -> _Closure:
    if isinstance(node, ast.Constant):
        constant = node.value
        return lambda values: constant
    if isinstance(node, (ast.Name, ast.Attribute)):
        name = node.id if isinstance(node, ast.Name) else _dotted(node)

        def lookup(values: Mapping[str, float]) -> Any:
            value = values[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} is not a number")
            return value
        return lookup
    if isinstance(node, ast.UnaryOp):
        operand = _closure(node.operand)
        return lambda values: -operand(values)
    if isinstance(node, ast.BinOp):
        op, left, right = _BINOPS[type(node.op)], _closure(node.left), _closure(node.right)
        return lambda values: op(left(values), right(values))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        func, args = _FUNCS[node.func.id], [_closure(a) for a in node.args]
        return lambda values: func(*(a(values) for a in args))
    raise ValueError(f"unexpected node {type(node).__name__}")  # pragma: no cover


# ------------------------------------------------------------------ line finder


@dataclass(frozen=True)
class _Section:
    """A table header in the TOML text and the lines it owns (1-based, inclusive)."""

    name: str
    array: bool
    start: int
    end: int


_ARRAY_HEADER_RE = re.compile(r"\s*\[\[\s*([^\[\]]+?)\s*\]\]\s*(?:#.*)?")
_TABLE_HEADER_RE = re.compile(r"\s*\[\s*([^\[\]]+?)\s*\]\s*(?:#.*)?")


def _norm_key(name: str) -> str:
    """``"probe" . args`` -> ``probe.args``: drop quotes and blanks around dots."""
    return ".".join(part.strip().strip("\"'") for part in name.split("."))


class _Locator:
    """Finds the line of a table or key in TOML text by scanning headers (a heuristic)."""

    def __init__(self, text: str) -> None:
        self.lines = [line.rstrip("\r") for line in text.split("\n")]
        self.sections: list[_Section] = []
        starts: list[tuple[str, bool, int]] = []
        for number, line in enumerate(self.lines, start=1):
            array = _ARRAY_HEADER_RE.fullmatch(line)
            table = None if array else _TABLE_HEADER_RE.fullmatch(line)
            match = array or table
            if match is not None:
                starts.append((_norm_key(match.group(1)), array is not None, number))
        first = starts[0][2] if starts else len(self.lines) + 1
        self.root = _Section("", False, 1, first - 1)
        for i, (name, array_, start) in enumerate(starts):
            end = starts[i + 1][2] - 1 if i + 1 < len(starts) else len(self.lines)
            self.sections.append(_Section(name, array_, start, end))

    @property
    def last_line(self) -> int:
        """Number of the last line (1 for empty text)."""
        return max(1, len(self.lines))

    def _owned(self, name: str, index: int | None) -> list[_Section]:
        """The header section of ``[name]`` or the ``index``-th ``[[name]]`` and its subtables."""
        seen = -1
        for i, sec in enumerate(self.sections):
            if sec.name != name or sec.array != (index is not None):
                continue
            seen += 1
            if index is not None and seen != index:
                continue
            owned = [sec]
            for sub in self.sections[i + 1:]:
                if not sub.name.startswith(name + "."):
                    break
                owned.append(sub)
            return owned
        return []

    def _key_in(self, section: _Section, key: str, prefix: str = "") -> int | None:
        """Line of ``prefix key =`` (bare or quoted key) inside ``section``'s body."""
        pattern = re.compile(r"\s*" + re.escape(prefix) + r"[\"']?" + re.escape(key)
                             + r"[\"']?\s*=")
        first = section.start + 1 if section.name else section.start
        for number in range(first, section.end + 1):
            if pattern.match(self.lines[number - 1]):
                return number
        return None

    def table(self, name: str, index: int | None = None) -> int:
        """Line of the ``[name]`` header (or the ``index``-th ``[[name]]``), else a fallback."""
        owned = self._owned(name, index)
        if owned:
            return owned[0].start
        return self._key_in(self.root, name) or 1

    def key(self, name: str, index: int | None, key: str, sub: str | None = None) -> int:
        """Line of ``key`` in table ``name`` (optionally in its subtable ``sub``)."""
        owned = self._owned(name, index)
        if not owned:
            return self.table(name, index)
        main = owned[0]
        if sub is None:
            line = self._key_in(main, key)
            if line is not None:
                return line
            for section in owned[1:]:  # a subtable header such as [probe.argz]
                if section.name == f"{name}.{key}" or section.name.startswith(
                        f"{name}.{key}."):
                    return section.start
            return main.start
        for section in owned[1:]:
            if section.name == f"{name}.{sub}":
                return self._key_in(section, key) or section.start
        dotted = self._key_in(main, key, prefix=f"{sub}.")
        if dotted is not None:
            return dotted
        inline = self._key_in(main, sub)
        if inline is not None:
            word = re.compile(r"[{,\s][\"']?" + re.escape(key) + r"[\"']?\s*=")
            for number in range(inline, main.end + 1):
                if word.search(self.lines[number - 1]):
                    return number
            return inline
        return main.start

    def root_key(self, key: str) -> int:
        """Line of a top-level key or table header named ``key``."""
        line = self._key_in(self.root, key)
        if line is not None:
            return line
        for section in self.sections:
            if section.name == key or section.name.startswith(key + "."):
                return section.start
        return 1


# ---------------------------------------------------------------------- parser


def _type_name(value: object) -> str:
    """TOML's name for the type of a parsed value."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return "date/time"


def _suggest(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when a close choice exists, else an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def toml_error_position(exc: Exception) -> tuple[int | None, str]:
    """(line or None, message without its position suffix) from a TOMLDecodeError.

    tomllib reports "... (at line N, column M)" or "... (at end of document)"; callers
    that know their file's last line use it for the second form.
    """
    message = str(getattr(exc, "msg", "") or exc)
    lineno = getattr(exc, "lineno", None)
    match = re.search(r"\s*\(at line (\d+), column \d+\)\s*$", message)
    if match is not None:
        lineno = lineno or int(match.group(1))
        message = message[:match.start()]
    end = re.search(r"\s*\(at end of document\)\s*$", message)
    if end is not None:
        message = message[:end.start()]
    return (int(lineno) if lineno else None), message


class _Parser:
    """Turns TOML text into a :class:`Profile`, raising CatalogError with file:line."""

    def __init__(self, text: str, source: str, expect_name: str | None) -> None:
        self.text = text
        self.source = source
        self.expect_name = expect_name
        self.loc = _Locator(text)

    def fail(self, line: int, context: str, reason: str) -> NoReturn:
        """Raise the CatalogError ``source:line: context: reason``."""
        where = f"{context}: " if context else ""
        raise CatalogError(f"{self.source}:{line}: {where}{reason}")

    @staticmethod
    def context(kind: str, index: int, ident: object) -> str:
        """``probe 'launch'`` when the entry has a usable id, else ``probe #3``."""
        if isinstance(ident, str) and _ID_RE.fullmatch(ident):
            return f"{kind} {ident!r}"
        return f"{kind} #{index + 1}"

    def load(self) -> dict[str, Any]:
        """Parse the TOML syntax; tomllib's own message and line become the error."""
        try:
            data: dict[str, Any] = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as exc:
            line, reason = self._toml_position(exc)
            self.fail(line, "", f"invalid TOML: {reason}")
        except RecursionError:
            self.fail(1, "", "invalid TOML: arrays or tables nested too deeply")
        return data

    def _toml_position(self, exc: Exception) -> tuple[int, str]:
        """(line, message without position) from a TOMLDecodeError."""
        lineno, message = toml_error_position(exc)
        return lineno or self.loc.last_line, message

    def check_keys(self, table: Mapping[str, Any], allowed: tuple[str, ...], context: str,
                   line_of: Callable[[str], int]) -> None:
        """Reject keys of ``table`` not in ``allowed``, with a suggestion."""
        for key in table:
            if key not in allowed:
                self.fail(line_of(key), context,
                          f"unknown key {key!r}{_suggest(key, allowed)}")

    def get(self, table: Mapping[str, Any], key: str, kind: type | tuple[type, ...],
            context: str, line_of: Callable[[str], int], header: int,
            required: bool = False) -> Any:
        """``table[key]`` checked against ``kind``; missing required keys fail at ``header``."""
        if key not in table:
            if required:
                self.fail(header, context, f"missing required key {key!r}")
            return None
        value = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            wanted = " or ".join(_type_name(k()) for k in kinds)
            article = "an" if wanted[0] in "aeiou" else "a"
            self.fail(line_of(key), context,
                      f"{key!r} must be {article} {wanted}, not {_type_name(value)}")
        return value

    def parse(self) -> Profile:
        """Validate the whole document and build the Profile."""
        doc = self.load()
        self.check_keys(doc, _ROOT_KEYS, "", self.loc.root_key)
        header = self.loc.table("profile")
        if "profile" not in doc:
            self.fail(1, "", "missing the [profile] table (name, description)")
        meta = self.get(doc, "profile", dict, "", self.loc.root_key, 1, required=True)
        name, description, anchor, phase_rule = self.parse_meta(meta, header)
        libraries = self.parse_libraries(doc)
        probes = self.parse_probes(doc, {lib.id for lib in libraries})
        derived = self.parse_derived(doc, probes)
        if anchor is not None:
            line = self.loc.key("profile", None, "anchor")
            ids = [p.id for p in probes]
            if anchor not in ids:
                self.fail(line, "[profile]",
                          f"anchor {anchor!r} is not a probe id{_suggest(anchor, ids)}")
            if next(p for p in probes if p.id == anchor).level != "sentinel":
                self.fail(line, "[profile]", f"anchor probe {anchor!r} must be a sentinel "
                          "probe: iterations are cut in sentinel mode too")
        return Profile(name, description, libraries, probes, anchor, phase_rule, derived,
                       self.source)

    def parse_meta(self, meta: Mapping[str, Any], header: int
                   ) -> tuple[str, str, str | None, str | None]:
        """The ``[profile]`` table: name, description, anchor, phase_rule."""
        ctx = "[profile]"

        def line_of(key: str) -> int:
            return self.loc.key("profile", None, key)

        self.check_keys(meta, _PROFILE_KEYS, ctx, line_of)
        name = self.get(meta, "name", str, ctx, line_of, header, required=True)
        if not _PROFILE_NAME_RE.fullmatch(name):
            self.fail(line_of("name"), ctx, f"bad profile name {name!r} (letters, digits, "
                      "'_', '-', '.')")
        if self.expect_name is not None and name != self.expect_name:
            self.fail(line_of("name"), ctx, f"name {name!r} must match the file name "
                      f"{self.expect_name + '.toml'!r}")
        description = self.get(meta, "description", str, ctx, line_of, header, required=True)
        anchor = self.get(meta, "anchor", str, ctx, line_of, header)
        phase_rule = self.get(meta, "phase_rule", str, ctx, line_of, header)
        if phase_rule is not None:
            try:
                _compile_expr(phase_rule)
            except ValueError as exc:
                self.fail(line_of("phase_rule"), ctx, f"phase_rule: {exc}")
        return name, description, anchor, phase_rule

    def tables(self, doc: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
        """The array of tables ``[[key]]`` (possibly empty), each item checked."""
        items = doc.get(key, [])
        if not isinstance(items, list):
            self.fail(self.loc.root_key(key), "",
                      f"{key!r} must be an array of tables ([[{key}]]), not {_type_name(items)}")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                self.fail(self.loc.table(key, i), "",
                          f"{key} #{i + 1} must be a table, not {_type_name(item)}")
        return items

    def parse_libraries(self, doc: Mapping[str, Any]) -> tuple[LibrarySpec, ...]:
        """Every ``[[library]]``: a unique id and soname globs on basenames."""
        out: list[LibrarySpec] = []
        first_line: dict[str, int] = {}
        for i, item in enumerate(self.tables(doc, "library")):
            header = self.loc.table("library", i)

            def line_of(key: str, i: int = i) -> int:
                return self.loc.key("library", i, key)

            ctx = self.context("library", i, item.get("id"))
            self.check_keys(item, _LIBRARY_KEYS, ctx, line_of)
            lib_id = self.get(item, "id", str, ctx, line_of, header, required=True)
            if not _ID_RE.fullmatch(lib_id):
                self.fail(line_of("id"), ctx, f"bad library id {lib_id!r} (an identifier)")
            ctx = f"library {lib_id!r}"
            if lib_id in first_line:
                self.fail(line_of("id"), ctx, f"duplicate library id {lib_id!r} "
                          f"(first defined at line {first_line[lib_id]})")
            first_line[lib_id] = line_of("id")
            soname = self.get(item, "soname", (list, str), ctx, line_of, header, required=True)
            patterns = [soname] if isinstance(soname, str) else soname
            if not patterns:
                self.fail(line_of("soname"), ctx, "'soname' needs at least one pattern")
            for pattern in patterns:
                if not isinstance(pattern, str) or not pattern.strip():
                    self.fail(line_of("soname"), ctx,
                              f"soname patterns must be non-empty strings, not {pattern!r}")
                if "/" in pattern:
                    self.fail(line_of("soname"), ctx, f"soname pattern {pattern!r} must match "
                              "a basename (no '/')")
            out.append(LibrarySpec(lib_id, tuple(patterns)))
        return tuple(out)

    def parse_probes(self, doc: Mapping[str, Any], lib_ids: set[str]
                     ) -> tuple[ProbeSpec, ...]:
        """Every ``[[probe]]``, with its captures; ids unique, libraries known."""
        out: list[ProbeSpec] = []
        first_line: dict[str, int] = {}
        items = self.tables(doc, "probe")
        if not items:
            self.fail(self.loc.table("profile"), "", "the profile defines no [[probe]]")
        for i, item in enumerate(items):
            header = self.loc.table("probe", i)

            def line_of(key: str, i: int = i) -> int:
                return self.loc.key("probe", i, key)

            ctx = self.context("probe", i, item.get("id"))
            self.check_keys(item, _PROBE_KEYS, ctx, line_of)
            probe_id = self.get(item, "id", str, ctx, line_of, header, required=True)
            if not _ID_RE.fullmatch(probe_id):
                self.fail(line_of("id"), ctx, f"bad probe id {probe_id!r} (an identifier)")
            ctx = f"probe {probe_id!r}"
            if probe_id in first_line:
                self.fail(line_of("id"), ctx, f"duplicate probe id {probe_id!r} "
                          f"(first defined at line {first_line[probe_id]})")
            first_line[probe_id] = line_of("id")
            library = self.get(item, "library", str, ctx, line_of, header, required=True)
            if library not in lib_ids:
                known = ", ".join(sorted(lib_ids)) or "none"
                self.fail(line_of("library"), ctx, f"unknown library {library!r}"
                          f"{_suggest(library, lib_ids)} (defined: {known})")
            symbol = self.get(item, "symbol", str, ctx, line_of, header, required=True)
            if not symbol or any(ch.isspace() for ch in symbol):
                self.fail(line_of("symbol"), ctx,
                          f"bad symbol {symbol!r} (a name or glob, no blanks)")
            stage = self.get(item, "stage", str, ctx, line_of, header, required=True)
            if not _STAGE_RE.fullmatch(stage):
                self.fail(line_of("stage"), ctx, f"bad stage {stage!r} (lower_snake_case)")
            ret = self.get(item, "ret", bool, ctx, line_of, header)
            level = self.get(item, "level", str, ctx, line_of, header)
            if level is not None and level not in LEVELS:
                self.fail(line_of("level"), ctx, f"bad level {level!r} "
                          f"(one of {', '.join(LEVELS)}){_suggest(level, LEVELS)}")
            optional = self.get(item, "optional", bool, ctx, line_of, header)
            args = self.get(item, "args", dict, ctx, line_of, header)
            captures = self.parse_captures(i, ctx, args or {}, bool(ret))
            out.append(ProbeSpec(probe_id, library, symbol, stage, bool(ret),
                                 level or "sentinel", bool(optional), captures))
        return tuple(out)

    def parse_captures(self, index: int, ctx: str, args: Mapping[str, Any], ret: bool
                       ) -> tuple[Capture, ...]:
        """The ``[probe.args]`` table of probe ``index``: name -> capture spec."""
        out: list[Capture] = []
        for name, spec in args.items():
            line = self.loc.key("probe", index, name, sub="args")
            if not isinstance(spec, str):
                self.fail(line, ctx, f"capture {name!r} must be a string ({_CAPTURE_FORMS}), "
                          f"not {_type_name(spec)}")
            try:
                capture = Capture.parse(name, spec)
            except ValueError as exc:
                self.fail(line, ctx, str(exc))
            if capture.source == "ret" and not ret:
                self.fail(line, ctx, f"capture {name!r} = 'ret' needs ret = true on the probe")
            out.append(capture)
        return tuple(out)

    def parse_derived(self, doc: Mapping[str, Any], probes: tuple[ProbeSpec, ...]
                      ) -> tuple[DerivedFeature, ...]:
        """Every ``[[derived]]``: a new feature name and a safe arithmetic expression."""
        captured = {c.name: p.id for p in probes for c in p.captures}
        out: list[DerivedFeature] = []
        seen: set[str] = set()
        for i, item in enumerate(self.tables(doc, "derived")):
            header = self.loc.table("derived", i)

            def line_of(key: str, i: int = i) -> int:
                return self.loc.key("derived", i, key)

            ctx = self.context("derived", i, item.get("name"))
            self.check_keys(item, _DERIVED_KEYS, ctx, line_of)
            name = self.get(item, "name", str, ctx, line_of, header, required=True)
            if not name.isidentifier() or keyword.iskeyword(name):
                self.fail(line_of("name"), ctx, f"derived name {name!r} is not an identifier")
            ctx = f"derived {name!r}"
            if name in seen:
                self.fail(line_of("name"), ctx, f"duplicate derived feature {name!r}")
            if name in captured:
                self.fail(line_of("name"), ctx, f"{name!r} is already captured by probe "
                          f"{captured[name]!r}")
            seen.add(name)
            expr = self.get(item, "expr", str, ctx, line_of, header, required=True)
            try:
                _compile_expr(expr)
            except ValueError as exc:
                self.fail(line_of("expr"), ctx, str(exc))
            out.append(DerivedFeature(name, expr))
        return tuple(out)


def parse_profile(text: str, source: str = "<string>") -> Profile:
    """Parse profile TOML ``text``; ``source`` names it in CatalogError messages."""
    return _Parser(text, source, None).parse()


# ---------------------------------------------------------------------- loading


def profile_dirs() -> tuple[Path, ...]:
    """Directories searched for profiles, first wins: $PRISM_PROFILE_PATH, user, built-in."""
    dirs: list[Path] = []
    for entry in os.environ.get("PRISM_PROFILE_PATH", "").split(os.pathsep):
        if entry.strip():
            try:
                dirs.append(Path(entry).expanduser())
            except RuntimeError:  # ~user that does not exist
                dirs.append(Path(entry))
    with contextlib.suppress(RuntimeError):  # no home directory to expand
        dirs.append(Path.home() / USER_PROFILE_DIR)
    dirs.append(BUILTIN_DIR)
    return tuple(dirs)


def available_profiles() -> dict[str, str]:
    """Profile name (file stem) -> path, over :func:`profile_dirs`; earlier dirs win."""
    found: dict[str, str] = {}
    for directory in profile_dirs():
        try:
            entries = sorted(directory.glob("*.toml"))
        except OSError:
            continue
        for entry in entries:
            if entry.is_file():
                found.setdefault(entry.stem, str(entry))
    return found


def _read(path: Path) -> str:
    """The UTF-8 text of a profile file, or CatalogError naming the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read profile: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise CatalogError(f"{path}:{line}: profile is not UTF-8 text") from None


def load_profile(name_or_path: str) -> Profile:
    """Load a profile by path (contains ``/`` or ends ``.toml``) or by name.

    Names are searched in :func:`profile_dirs`; the ``[profile]`` name of a profile found
    by name (or a built-in) must equal its file stem. Unknown names list those available.
    """
    if "/" in name_or_path or name_or_path.endswith(".toml"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise CatalogError(f"{path}: no such profile file")
        builtin = path.resolve().parent == BUILTIN_DIR
        return _Parser(_read(path), str(path), path.stem if builtin else None).parse()
    profiles = available_profiles()
    found = profiles.get(name_or_path)
    if found is None:
        names = ", ".join(sorted(profiles)) or "none"
        searched = os.pathsep.join(str(d) for d in profile_dirs())
        raise CatalogError(f"unknown profile {name_or_path!r}{_suggest(name_or_path, profiles)}"
                           f"; available: {names} (searched {searched})")
    path = Path(found)
    return _Parser(_read(path), str(path), path.stem).parse()
