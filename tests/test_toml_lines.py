"""The shared TOML line finder and tomllib error positions, on their own."""

from __future__ import annotations

import sys

import pytest

from prism_common.toml_lines import TomlLocator, toml_error_position

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

TEXT = """\
top = 1
[profile]
name = "x"

[[probe]]
id = "a"
[probe.args]
bytes = "arg3"

[[probe]]
"id" = "b"
args = { kind = "arg4",
         bytes = "arg3" }
[[derived]]
name = "t"
"""


def test_tables_and_array_entries_by_index() -> None:
    loc = TomlLocator(TEXT)
    assert loc.table("profile") == 2
    assert (loc.table("probe", 0), loc.table("probe", 1)) == (5, 10)
    assert loc.table("derived", 0) == 14
    assert loc.table("nowhere") == 1  # not there: the first line
    assert loc.last_line == 16


def test_keys_bare_quoted_in_subtables_and_inline_tables() -> None:
    loc = TomlLocator(TEXT)
    assert loc.key("profile", None, "name") == 3
    assert loc.key("probe", 0, "id") == 6
    assert loc.key("probe", 1, "id") == 11  # a quoted key
    assert loc.key("probe", 0, "bytes", sub="args") == 8  # in [probe.args]
    assert loc.key("probe", 1, "bytes", sub="args") == 13  # in an inline table
    assert loc.key("probe", 0, "args") == 7  # the subtable's header
    assert loc.key("probe", 1, "missing") == 10  # not there: the entry's header
    assert loc.root_key("top") == 1
    assert loc.root_key("derived") == 14


@pytest.mark.parametrize(("text", "line", "message"), [
    ("a = 1\nb = [1", None, "Unclosed array"),
    ("a = 1\nb = = 2\n", 2, "Invalid value"),
])
def test_error_positions_from_tomllib(text: str, line: int | None, message: str) -> None:
    with pytest.raises(tomllib.TOMLDecodeError) as caught:
        tomllib.loads(text)
    found_line, found_message = toml_error_position(caught.value)
    assert found_line == line
    assert found_message.startswith(message) and "(at " not in found_message


def test_find_key_and_find_root_say_none_when_absent() -> None:
    loc = TomlLocator(TEXT)
    assert loc.find_key("profile", None, "name") == 3
    assert loc.find_key("probe", 0, "args") == 7  # the subtable's header
    assert loc.find_key("profile", None, "missing") is None
    assert loc.find_key("nowhere", None, "name") is None
    assert loc.find_root("top") == 1
    assert loc.find_root("probe") == 5
    assert loc.find_root("nowhere") is None
    dotted = TomlLocator('title = "t"\nengine.warmup_s = 5\n[history]\npath = "x"\n')
    assert dotted.find_root("engine") == 2  # a dotted top-level key
    assert dotted.find_key("engine", None, "warmup_s") == 2
    assert dotted.key("engine", None, "warmup_s") == 2


NESTED = """\
[broker]
host = "h"

[[receiver]]
name = "a"
[[receiver.sink]]
url = "u1"

[[receiver]]
name = "b"
[[receiver.sink]]
kind = "log"
[[receiver.sink]]
url = "u2"
match = { severity = "page" }
"""


def test_key_paths_count_nested_arrays_per_parent() -> None:
    loc = TomlLocator(NESTED)
    assert loc.key_path(("broker", "host")) == 2
    assert loc.key_path(("receiver", 1, "name")) == 10
    assert loc.key_path(("receiver", 1, "sink", 1, "url")) == 14  # not line 7
    assert loc.key_path(("receiver", 0, "sink", 0, "url")) == 7
    assert loc.key_path(("receiver", 1, "sink", 1, "match", "severity")) == 15
    assert loc.key_path(("receiver", 1, "sink", 0, "missing")) == 11  # the entry's header
    assert loc.key_path(("nowhere", "x")) == 1
