"""Profile TOML text to a :class:`~probes.catalog.model.Profile`, or one error line.

Every malformed profile raises :class:`~probes.errors.CatalogError` whose message is
``FILE:LINE: context: reason``: unknown keys (with a suggestion), wrong types, bad values,
and tomllib's own syntax errors, each located in the text by
:class:`prism_common.toml_lines.TomlLocator`.
"""

from __future__ import annotations

import difflib
import keyword
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

from prism_common.toml_lines import TomlLocator, toml_error_position
from probes.catalog.expressions import compile_expression
from probes.catalog.model import (
    CAPTURE_FORMS,
    LEVELS,
    Capture,
    DerivedFeature,
    LibrarySpec,
    ProbeSpec,
    Profile,
)
from probes.errors import CatalogError

_ROOT_KEYS = ("profile", "library", "probe", "derived")
_PROFILE_KEYS = ("name", "description", "anchor", "phase_rule")
_LIBRARY_KEYS = ("id", "soname")
_PROBE_KEYS = ("id", "library", "symbol", "stage", "ret", "level", "optional", "args")
_DERIVED_KEYS = ("name", "expr")

_PROFILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_ID_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_STAGE_RE = re.compile(r"[a-z][a-z0-9_]*")


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


def suggest(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when a close choice exists, else an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Parser:
    """Turns TOML text into a :class:`Profile`, raising CatalogError with file:line."""

    def __init__(self, text: str, source: str, expect_name: str | None) -> None:
        self.text = text
        self.source = source
        self.expect_name = expect_name
        self.loc = TomlLocator(text)

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
                          f"unknown key {key!r}{suggest(key, allowed)}")

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
        name, description, anchors, phase_rule = self.parse_meta(meta, header)
        libraries = self.parse_libraries(doc)
        probes = self.parse_probes(doc, {lib.id for lib in libraries})
        derived = self.parse_derived(doc, probes)
        ids = [p.id for p in probes]
        for anchor in anchors:
            line = self.loc.key("profile", None, "anchor")
            if anchor not in ids:
                self.fail(line, "[profile]",
                          f"anchor {anchor!r} is not a probe id{suggest(anchor, ids)}")
            if next(p for p in probes if p.id == anchor).level != "sentinel":
                self.fail(line, "[profile]", f"anchor probe {anchor!r} must be a sentinel "
                          "probe: iterations are cut in sentinel mode too")
        return Profile(name, description, libraries, probes, anchors, phase_rule, derived,
                       self.source)

    def parse_meta(self, meta: Mapping[str, Any], header: int
                   ) -> tuple[str, str, tuple[str, ...], str | None]:
        """The ``[profile]`` table: name, description, anchor(s), phase_rule."""
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
        anchor = self.get(meta, "anchor", (list, str), ctx, line_of, header)
        anchors = (anchor,) if isinstance(anchor, str) else tuple(anchor or ())
        if isinstance(anchor, list) and not anchor:
            self.fail(line_of("anchor"), ctx, "'anchor' lists no probe (leave it out to have "
                      "one chosen from the spans)")
        for one in anchors:
            if not isinstance(one, str) or not one:
                self.fail(line_of("anchor"), ctx,
                          f"anchor probes must be probe ids (strings), not {one!r}")
        if len(set(anchors)) < len(anchors):
            self.fail(line_of("anchor"), ctx, f"anchor lists a probe twice: {list(anchors)}")
        phase_rule = self.get(meta, "phase_rule", str, ctx, line_of, header)
        if phase_rule is not None:
            try:
                compile_expression(phase_rule)
            except ValueError as exc:
                self.fail(line_of("phase_rule"), ctx, f"phase_rule: {exc}")
        return name, description, anchors, phase_rule

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
                          f"{suggest(library, lib_ids)} (defined: {known})")
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
                          f"(one of {', '.join(LEVELS)}){suggest(level, LEVELS)}")
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
                self.fail(line, ctx, f"capture {name!r} must be a string ({CAPTURE_FORMS}), "
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
                compile_expression(expr)
            except ValueError as exc:
                self.fail(line_of("expr"), ctx, str(exc))
            out.append(DerivedFeature(name, expr))
        return tuple(out)


def parse_profile(text: str, source: str = "<string>", *,
                  expected_name: str | None = None) -> Profile:
    """Parse profile TOML ``text``; ``source`` names it in CatalogError messages.

    ``expected_name``: the ``[profile]`` name the file must give (its stem, for a profile
    found by name), else any.
    """
    return _Parser(text, source, expected_name).parse()
