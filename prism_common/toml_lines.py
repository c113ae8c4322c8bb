"""Where a TOML file goes wrong: the line of a table or key, and tomllib's own error position.

Shared by every parser of a TOML file we own (the probe catalog, the settings, the
gateway's configuration), so each names ``FILE:LINE`` the same way. Standard library only:
any layer may import it (an import-linter contract keeps it so).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass


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


class TomlLocator:
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

    def find_key(self, name: str, index: int | None, key: str) -> int | None:
        """Line where ``key`` of table ``name`` is written, or None when it is nowhere.

        Looks in the table's own body, then for a subtable header ``[name.key]``; with no
        ``[name]`` header, for a dotted top-level ``name.key =``. Callers that print no
        line rather than a wrong one (the settings) use this; :meth:`key` falls back.
        """
        owned = self._owned(name, index)
        if not owned:
            return None if index is not None else self._key_in(
                self.root, key, prefix=f"{name}.")
        line = self._key_in(owned[0], key)
        if line is not None:
            return line
        for section in owned[1:]:  # a subtable header such as [probe.argz]
            if section.name == f"{name}.{key}" or section.name.startswith(f"{name}.{key}."):
                return section.start
        return None

    def key(self, name: str, index: int | None, key: str, sub: str | None = None) -> int:
        """Line of ``key`` in table ``name`` (optionally in its subtable ``sub``)."""
        owned = self._owned(name, index)
        if sub is None:
            found = self.find_key(name, index, key)
            if found is not None:
                return found
            return owned[0].start if owned else self.table(name, index)
        if not owned:
            return self.table(name, index)
        main = owned[0]
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

    def find_root(self, key: str) -> int | None:
        """Line of a top-level key ``key`` (bare, quoted or dotted ``key.x =``) or of the
        first header of table ``key`` or one of its subtables; None when it is nowhere."""
        pattern = re.compile(r"\s*[\"']?" + re.escape(key) + r"[\"']?\s*[=.]")
        for number in range(self.root.start, self.root.end + 1):
            if pattern.match(self.lines[number - 1]):
                return number
        for section in self.sections:
            if section.name == key or section.name.startswith(key + "."):
                return section.start
        return None

    def root_key(self, key: str) -> int:
        """Line of a top-level key or table header named ``key`` (line 1 when absent)."""
        return self.find_root(key) or 1

    def key_path(self, path: Sequence[str | int]) -> int:
        """Line of a key path such as ``("receiver", 1, "sink", 0, "url")``, best effort.

        That path is the key ``url`` of the first ``[[receiver.sink]]`` of the second
        ``[[receiver]]``: each table is looked for inside the one before it, so nested
        arrays of tables are counted per parent. Returns the nearest line found (the
        deepest table's header when the key itself is not found; line 1 when nothing is).
        """
        lo, hi, best = 1, len(self.lines), 1
        name = ""
        i = 0
        while i < len(path):
            seg = path[i]
            if isinstance(seg, int):
                i += 1
                continue
            full = f"{name}.{seg}" if name else seg
            index = path[i + 1] if i + 1 < len(path) and isinstance(path[i + 1], int) else 0
            heads = [s.start for s in self.sections if s.name == full and lo <= s.start <= hi]
            if heads:
                start = heads[min(int(index), len(heads) - 1)]
                lo, hi, best, name = start, self._block_end(start, full), start, full
                i += 1
                continue
            key = re.compile(rf'^\s*"?{re.escape(seg)}"?\s*=')
            inline = re.compile(rf'[{{,]\s*"?{re.escape(seg)}"?\s*=')
            for number in range(lo, hi + 1):
                text = self.lines[number - 1]
                if key.match(text) or (number >= best and inline.search(text)):
                    best = number
                    lo = number
                    break
            else:
                return best
            name = full
            i += 1
        return best

    def _block_end(self, start: int, name: str) -> int:
        """Last line of the table whose header is at ``start`` (its subtables included)."""
        for section in self.sections:
            if section.start > start and not section.name.startswith(name + "."):
                return section.start - 1
        return len(self.lines)
