"""Label matchers shared by routes, inhibition rules and silences (Alertmanager syntax).

An alert is seen as a flat set of labels: its routing fields (``severity``, ``host``,
``stage``...) plus its free-form labels as ``labels.<name>``. A matcher is
``name=value``, ``name!=value``, ``name=~regex`` or ``name!~regex``; regular expressions
are anchored (full match), as in Alertmanager.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from alerting.gateway.errors import GatewayConfigError
from alerting.schema import Alert

FIELDS = ("severity", "status", "host", "target", "pid", "stage", "device", "phase",
          "source", "fingerprint")
"""Alert fields a matcher or ``group_by`` may name (besides ``labels.<name>``)."""
OPS = ("=~", "!~", "!=", "=")
_MATCHER_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*(=~|!~|!=|=)\s*(.*?)\s*$")


def alert_value(alert: Alert, name: str) -> str:
    """The value of label ``name`` of ``alert`` (``""`` when it has no such label)."""
    if name.startswith("labels."):
        return alert.labels.get(name[len("labels."):], "")
    if name == "target":
        return alert.target_name
    if name == "pid":
        return str(alert.target_pid)
    if name in FIELDS:
        return str(getattr(alert, name))
    return ""


def check_name(name: str) -> str | None:
    """Why ``name`` is not a label a matcher can use, or None when it is one."""
    if name in FIELDS or (name.startswith("labels.") and len(name) > len("labels.")):
        return None
    near = difflib.get_close_matches(name, FIELDS, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return (f"unknown alert field {name!r}{hint}; use one of {', '.join(FIELDS)} "
            "or labels.<name>")


@dataclass(frozen=True)
class Matcher:
    """One condition on one label of an alert."""

    name: str
    op: str
    value: str

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise GatewayConfigError(f"matcher operator must be one of {', '.join(OPS)}")
        problem = check_name(self.name)
        if problem:
            raise GatewayConfigError(problem)
        if self.op in ("=~", "!~"):
            try:
                re.compile(self.value)
            except re.error as exc:
                raise GatewayConfigError(
                    f"bad regular expression {self.value!r} for {self.name}: {exc}") from None

    def matches(self, alert: Alert) -> bool:
        """Whether ``alert`` satisfies this condition."""
        actual = alert_value(alert, self.name)
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        found = re.fullmatch(self.value, actual) is not None
        return found if self.op == "=~" else not found

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.value}"

    def to_dict(self) -> dict[str, str]:
        """JSON-ready form (stored with silences)."""
        return {"name": self.name, "op": self.op, "value": self.value}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Matcher:
        """Inverse of :meth:`to_dict`."""
        return cls(str(doc["name"]), str(doc["op"]), str(doc["value"]))


def parse_matcher(text: str) -> Matcher:
    """Parse ``name=value`` / ``name!=value`` / ``name=~re`` / ``name!~re``.

    Raises:
        GatewayConfigError: the text is not a matcher or names an unknown field.
    """
    found = _MATCHER_RE.match(text)
    if not found:
        raise GatewayConfigError(
            f"bad matcher {text!r}: expected name=value, name!=value, name=~regex or "
            "name!~regex")
    name, op, value = found.groups()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return Matcher(name, op, value)


def matches_all(matchers: Iterable[Matcher], alert: Alert) -> bool:
    """True when every matcher matches (an empty list matches every alert)."""
    return all(m.matches(alert) for m in matchers)
