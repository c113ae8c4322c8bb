"""The catalog's data: a profile's libraries, probes, argument captures and derived features.

Immutable values built by :mod:`probes.catalog.parser`; placement and the engine read them.
"""

from __future__ import annotations

import fnmatch
import keyword
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

from probes.catalog.expressions import closure_of, compile_expression, feature_names

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

_REG_RE = re.compile(r"arg([1-6])")
_STACK_RE = re.compile(r"stack\+(0[xX][0-9a-fA-F]+|[0-9]+):([a-z0-9]+)")
CAPTURE_FORMS = "arg1..arg6, ret, or stack+OFFSET:TYPE"
"""The forms a capture may take, for error messages."""


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
            raise ValueError(f"bad capture {spec!r}: expected {CAPTURE_FORMS}")
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
        compile_expression(self.expr)

    @cached_property
    def names(self) -> frozenset[str]:
        """Feature names the expression reads (worked out once: read per iteration)."""
        return feature_names(self.expr)

    def evaluate(self, values: Mapping[str, float]) -> float | None:
        """The value for ``values``; None if a name is missing or the math fails.

        Failing math is a division by zero, an overflow, or a result that is not finite.
        """
        try:
            result = float(closure_of(self.expr)(values))
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
    anchors: tuple[str, ...]
    """The probes whose span end closes an iteration. One: the anchor. Several: versions
    or builds of the engine step through different functions (llama.cpp's
    ``llama_decode`` and ``llama_process``), and the first of them to fire in a target
    is its anchor. Empty: one is chosen from the spans
    (:mod:`prism_tui.engine.anchors`)."""
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
