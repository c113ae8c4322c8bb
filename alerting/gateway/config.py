"""The gateway's TOML configuration: broker, routing tree, receivers and sinks, inhibition.

Loading is strict: an unknown key, a wrong type or a bad value raises
:class:`GatewayConfigError` with ``FILE:LINE: where: reason``, so the user gets one line to
act on. ``docs/gateway.md`` has a complete example.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from alerting.gateway.errors import GatewayConfigError
from alerting.gateway.matchers import Matcher, check_name, parse_matcher
from prism_common.toml_lines import TomlLocator, toml_error_position

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

DEFAULT_TOPIC = "latencyprism/v1/+/+/alert"
DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
DEFAULT_STATE = "~/.local/state/latencyprism/gateway.sqlite"
PAGERDUTY_URL = "https://events.pagerduty.com/v2/enqueue"
_SCHEMES = {"mqtt": (1883, False, "tcp"), "tcp": (1883, False, "tcp"),
            "mqtts": (8883, True, "tcp"), "ssl": (8883, True, "tcp"),
            "tls": (8883, True, "tcp"), "ws": (80, False, "websockets"),
            "wss": (443, True, "websockets")}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str | float) -> float:
    """``"1h30m"``, ``"45s"``, ``"500ms"``, ``"2d"`` (or a number of seconds) → seconds.

    Raises:
        ValueError: not a duration, or negative.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"a duration must not be negative, got {text}")
        return float(text)
    if not isinstance(text, str):
        raise ValueError(f"a duration is a string like '30s' or '2h', not {text!r}")
    compact = text.strip().replace(" ", "")
    if not compact or _DURATION_RE.sub("", compact):
        raise ValueError(f"bad duration {text!r} (use forms like 500ms, 30s, 5m, 2h, 1d)")
    return sum(float(n) * _UNIT_S[u] for n, u in _DURATION_RE.findall(compact))


# ------------------------------------------------------------------------------ model
@dataclass(frozen=True)
class BrokerSettings:
    """Where and how the gateway subscribes."""

    url: str = DEFAULT_BROKER
    topic: str = DEFAULT_TOPIC
    client_id: str = field(default_factory=lambda: f"prism-gateway-{socket.gethostname()}")
    """Stable id: with a persistent session the broker keeps alerts while we restart."""
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    keepalive_s: int = 30
    shared_group: str | None = None
    """MQTT v5 shared subscription group: gateways of one group split the alert stream."""
    protocol: str = "3.1.1"
    """``3.1.1`` or ``5``; a shared group needs ``5``."""
    session_expiry_s: int = 7 * 86400
    """MQTT v5: how long the broker keeps the session and its queued alerts while we are away."""

    @property
    def subscription(self) -> str:
        """The topic filter subscribed to: ``$share/<group>/<topic>`` in a shared group."""
        if self.shared_group:
            return f"$share/{self.shared_group}/{self.topic}"
        return self.topic

    @property
    def endpoint(self) -> tuple[str, int, bool, str, str | None]:
        """(host, port, tls, transport, websocket path) parsed from :attr:`url`."""
        return parse_broker_url(self.url)

    @property
    def credentials(self) -> tuple[str | None, str | None]:
        """(username, password): the explicit settings, else ``user:pass@`` in the URL."""
        parts = urlsplit(self.url if "://" in self.url else f"mqtt://{self.url}")
        user = self.username or (unquote(parts.username) if parts.username else None)
        password = self.password or (unquote(parts.password) if parts.password else None)
        return user, password


def parse_broker_url(url: str) -> tuple[str, int, bool, str, str | None]:
    """``mqtt://host:1883`` → (host, port, tls, transport, websocket path).

    Raises:
        GatewayConfigError: unknown scheme, no host, or a bad port.
    """
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise GatewayConfigError(f"broker URL {url!r}: unknown scheme {scheme!r} "
                                 f"(use {', '.join(sorted(_SCHEMES))})")
    default_port, tls, transport = _SCHEMES[scheme]
    try:
        port = parts.port or default_port
    except ValueError:
        raise GatewayConfigError(f"broker URL {url!r}: bad port") from None
    if not parts.hostname:
        raise GatewayConfigError(f"broker URL {url!r}: no host")
    path = (parts.path or "/mqtt") if transport == "websockets" else None
    return parts.hostname, port, tls, transport, path


@dataclass(frozen=True)
class WebhookSinkConfig:
    """POST the notification (JSON) to ``url``."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 10.0
    kind: str = "webhook"


@dataclass(frozen=True)
class PagerDutySinkConfig:
    """PagerDuty Events API v2: one event per alert, ``dedup_key`` = fingerprint."""

    routing_key: str
    url: str = PAGERDUTY_URL
    timeout_s: float = 10.0
    client_url: str | None = None
    kind: str = "pagerduty"


@dataclass(frozen=True)
class ExecSinkConfig:
    """Run ``argv`` (never through a shell) with the notification JSON on stdin."""

    argv: tuple[str, ...]
    timeout_s: float = 10.0
    kind: str = "exec"


@dataclass(frozen=True)
class FileSinkConfig:
    """Append one JSON line per notification to ``path``."""

    path: str
    kind: str = "file"


@dataclass(frozen=True)
class StdoutSinkConfig:
    """Print one JSON line per notification on standard output."""

    kind: str = "stdout"


SinkConfig = (WebhookSinkConfig | PagerDutySinkConfig | ExecSinkConfig | FileSinkConfig
              | StdoutSinkConfig)


@dataclass(frozen=True)
class ReceiverConfig:
    """A named set of sinks a route sends to."""

    name: str
    sinks: tuple[SinkConfig, ...]
    send_resolved: bool = True


@dataclass(frozen=True)
class Timing:
    """Alertmanager's group timings, in seconds."""

    group_wait: float = 1.0
    group_interval: float = 30.0
    repeat_interval: float = 4 * 3600.0


@dataclass(frozen=True)
class RouteConfig:
    """A node of the routing tree (children inherit receiver, grouping and timings)."""

    receiver: str
    matchers: tuple[Matcher, ...] = ()
    group_by: tuple[str, ...] = ("host", "target", "pid")
    timing: Timing = field(default_factory=Timing)
    continue_: bool = False
    routes: tuple[RouteConfig, ...] = ()
    id: str = "root"
    """Path in the tree (``root``, ``root.0``, ``root.0.1``): part of every group key."""


@dataclass(frozen=True)
class InhibitRule:
    """A firing alert matching ``source`` mutes alerts matching ``target`` with equal labels."""

    source: tuple[Matcher, ...]
    target: tuple[Matcher, ...]
    equal: tuple[str, ...] = ("host", "target", "pid")


DEFAULT_INHIBIT = (InhibitRule(source=(Matcher("severity", "=", "critical"),),
                               target=(Matcher("severity", "=", "warning"),)),)
"""A firing critical alert mutes warnings of the same target (host, name and pid)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How failed sends that can recover are retried (exponential backoff with jitter)."""

    attempts: int = 5
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def backoff(self, attempt: int) -> float:
        """Delay before retry number ``attempt`` (1-based), before jitter."""
        return float(min(self.max_backoff_s, self.initial_backoff_s * 2 ** (attempt - 1)))


@dataclass(frozen=True)
class GatewayConfig:
    """Everything ``prism gateway`` needs, loaded once and passed down."""

    broker: BrokerSettings = field(default_factory=BrokerSettings)
    route: RouteConfig = field(default_factory=lambda: RouteConfig(receiver="stdout"))
    receivers: Mapping[str, ReceiverConfig] = field(default_factory=lambda: {
        "stdout": ReceiverConfig("stdout", (StdoutSinkConfig(),))})
    inhibit: tuple[InhibitRule, ...] = DEFAULT_INHIBIT
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    state_path: str = DEFAULT_STATE
    retention_s: float = 5 * 86400.0
    """Notification-log entries and expired silences older than this are pruned."""
    source: str = "<defaults>"

    @property
    def state_file(self) -> Path:
        """The state database path with ``~`` expanded."""
        return Path(os.path.expanduser(self.state_path))

    def with_overrides(self, broker: str | None = None, state: str | None = None) -> GatewayConfig:
        """A copy with the command line's ``--broker`` / ``--state`` applied."""
        out = self
        if broker is not None:
            parse_broker_url(broker)
            out = replace(out, broker=replace(out.broker, url=broker))
        if state is not None:
            out = replace(out, state_path=state)
        return out


# ------------------------------------------------------------------------------ loading
def load_gateway_config(path: str | os.PathLike[str] | None) -> GatewayConfig:
    """Read and validate a gateway TOML file (None: the built-in defaults).

    Raises:
        GatewayConfigError: unreadable file, invalid TOML, unknown key or bad value, as
            ``FILE:LINE: where: reason``.
    """
    if path is None:
        return GatewayConfig()
    file = os.fspath(path)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GatewayConfigError(f"{file}: gateway configuration file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise GatewayConfigError(f"{file}: cannot read: {reason}") from None
    return parse_gateway_config(text, file)


def parse_gateway_config(text: str, file: str = "<config>") -> GatewayConfig:
    """Validate gateway TOML text (``file`` names it in errors)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line, reason = toml_error_position(exc)
        line = line or max(1, len(text.splitlines()))  # "at end of document"
        raise GatewayConfigError(f"{file}:{line}: invalid TOML: {reason}") from None
    return _Loader(text, file).load(doc)


_TOP = ("broker", "state", "retry", "route", "receiver", "inhibit")
_Path = tuple[str | int, ...]


class _Loader:
    """Turns the decoded TOML into a :class:`GatewayConfig`, naming file:line on errors."""

    def __init__(self, text: str, file: str) -> None:
        self.file = file
        self.locator = TomlLocator(text)

    # ---------------------------------------------------------------- errors
    def fail(self, path: _Path, reason: str) -> GatewayConfigError:
        where = ".".join(f"[{p}]" if isinstance(p, int) else p for p in path).replace(".[", "[")
        line = self.locator.key_path(path)
        return GatewayConfigError(f"{self.file}:{line}: {where}: {reason}")

    def table(self, value: Any, path: _Path, keys: Sequence[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, "must be a table")
        for key in value:
            if key not in keys:
                near = difflib.get_close_matches(key, keys, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise self.fail((*path, key), f"unknown key{hint}; expected one of "
                                              f"{', '.join(keys)}")
        return value

    def string(self, value: Any, path: _Path, *, empty: bool = False) -> str:
        if not isinstance(value, str) or (not empty and not value.strip()):
            raise self.fail(path, "must be a non-empty string")
        return value

    def strings(self, value: Any, path: _Path) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(path, "must be a list of strings")
        return tuple(value)

    def duration(self, value: Any, path: _Path) -> float:
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise self.fail(path, str(exc)) from None

    def integer(self, value: Any, path: _Path, low: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise self.fail(path, f"must be an integer >= {low}")
        return value

    # ---------------------------------------------------------------- sections
    def load(self, doc: dict[str, Any]) -> GatewayConfig:
        self.table(doc, (), _TOP)
        config = GatewayConfig(source=self.file)
        broker = self.broker(doc.get("broker", {}))
        state = self.table(doc.get("state", {}), ("state",), ("path", "retention"))
        state_path = (self.string(state["path"], ("state", "path"))
                      if "path" in state else DEFAULT_STATE)
        retention = (self.duration(state["retention"], ("state", "retention"))
                     if "retention" in state else config.retention_s)
        retry = self.retry(doc.get("retry", {}))
        receivers = self.receivers(doc.get("receiver", []))
        if "route" in doc:
            route = self.route(doc["route"], ("route",), None, "root")
        elif not receivers:
            route = config.route
        else:
            if len(receivers) != 1:
                raise self.fail(("route",), "a [route] naming its receiver is required "
                                            "when there is not exactly one [[receiver]]")
            route = RouteConfig(receiver=next(iter(receivers)))
        if not receivers:
            receivers = dict(config.receivers)
        self.check_receivers(route, receivers, ("route",))
        inhibit = (self.inhibit(doc["inhibit"]) if "inhibit" in doc else DEFAULT_INHIBIT)
        return replace(config, broker=broker, state_path=state_path, retention_s=retention,
                       retry=retry, receivers=receivers, route=route, inhibit=inhibit)

    def broker(self, raw: Any) -> BrokerSettings:
        keys = ("url", "topic", "client_id", "username", "password", "password_env",
                "tls_ca", "tls_cert", "tls_key", "keepalive", "shared_group", "protocol",
                "session_expiry")
        t = self.table(raw, ("broker",), keys)
        out = BrokerSettings()
        values: dict[str, Any] = {}
        for key in ("url", "topic", "client_id", "username", "password", "tls_ca",
                    "tls_cert", "tls_key"):
            if key in t:
                values[key] = self.string(t[key], ("broker", key))
        if "url" in values:
            try:
                parse_broker_url(values["url"])
            except GatewayConfigError as exc:
                raise self.fail(("broker", "url"), str(exc)) from None
        if "password_env" in t:
            name = self.string(t["password_env"], ("broker", "password_env"))
            if name not in os.environ:
                raise self.fail(("broker", "password_env"),
                                f"environment variable {name} is not set")
            values["password"] = os.environ[name]
        if "keepalive" in t:
            values["keepalive_s"] = max(1, round(self.duration(t["keepalive"],
                                                               ("broker", "keepalive"))))
        if (values.get("tls_cert") is None) != (values.get("tls_key") is None):
            raise self.fail(("broker",), "tls_cert and tls_key go together")
        if "protocol" in t:
            protocol = self.string(t["protocol"], ("broker", "protocol"))
            if protocol not in ("3.1.1", "5"):
                raise self.fail(("broker", "protocol"),
                                f"unknown MQTT protocol {protocol!r} (use \"3.1.1\" or \"5\")")
            values["protocol"] = protocol
        if "shared_group" in t:
            group = self.string(t["shared_group"], ("broker", "shared_group"))
            if any(c in group for c in "/+#"):
                raise self.fail(("broker", "shared_group"),
                                f"{group!r}: a group name has no '/', '+' or '#'")
            values["shared_group"] = group
            if values.get("protocol", "5") != "5":
                raise self.fail(("broker", "protocol"), "a shared_group needs protocol \"5\"")
            values["protocol"] = "5"
        if "session_expiry" in t:
            values["session_expiry_s"] = max(0, round(self.duration(
                t["session_expiry"], ("broker", "session_expiry"))))
        return replace(out, **values)

    def retry(self, raw: Any) -> RetryPolicy:
        t = self.table(raw, ("retry",), ("attempts", "initial_backoff", "max_backoff"))
        policy = RetryPolicy()
        if "attempts" in t:
            policy = replace(policy, attempts=self.integer(t["attempts"], ("retry", "attempts"), 1))
        if "initial_backoff" in t:
            policy = replace(policy, initial_backoff_s=self.duration(
                t["initial_backoff"], ("retry", "initial_backoff")))
        if "max_backoff" in t:
            policy = replace(policy, max_backoff_s=self.duration(
                t["max_backoff"], ("retry", "max_backoff")))
        return policy

    def receivers(self, raw: Any) -> dict[str, ReceiverConfig]:
        if not isinstance(raw, list):
            raise self.fail(("receiver",), "must be an array of tables: [[receiver]]")
        out: dict[str, ReceiverConfig] = {}
        for i, item in enumerate(raw):
            path: _Path = ("receiver", i)
            t = self.table(item, path, ("name", "send_resolved", "sink"))
            if "name" not in t:
                raise self.fail(path, "missing key 'name'")
            name = self.string(t["name"], (*path, "name"))
            if name in out:
                raise self.fail((*path, "name"), f"receiver {name!r} defined twice")
            send_resolved = t.get("send_resolved", True)
            if not isinstance(send_resolved, bool):
                raise self.fail((*path, "send_resolved"), "must be true or false")
            sinks = t.get("sink", [])
            if not isinstance(sinks, list) or not sinks:
                raise self.fail(path, "needs at least one [[receiver.sink]]")
            out[name] = ReceiverConfig(name, tuple(self.sink(s, (*path, "sink", j))
                                                   for j, s in enumerate(sinks)),
                                       send_resolved)
        return out

    def sink(self, raw: Any, path: _Path) -> SinkConfig:
        if not isinstance(raw, dict) or "type" not in raw:
            raise self.fail(path, "a sink needs a type: webhook, pagerduty, exec, file "
                                  "or stdout")
        kind = raw["type"]
        if kind == "webhook":
            t = self.table(raw, path, ("type", "url", "headers", "timeout"))
            headers = t.get("headers", {})
            if not isinstance(headers, dict) or not all(
                    isinstance(v, str) for v in headers.values()):
                raise self.fail((*path, "headers"), "must be a table of strings")
            return WebhookSinkConfig(self.http_url(t, path), dict(headers),
                                     self.timeout(t, path))
        if kind == "pagerduty":
            t = self.table(raw, path, ("type", "url", "routing_key", "routing_key_env",
                                       "timeout", "client_url"))
            if "routing_key_env" in t:
                name = self.string(t["routing_key_env"], (*path, "routing_key_env"))
                if name not in os.environ:
                    raise self.fail((*path, "routing_key_env"),
                                    f"environment variable {name} is not set")
                key = os.environ[name]
            elif "routing_key" in t:
                key = self.string(t["routing_key"], (*path, "routing_key"))
            else:
                raise self.fail(path, "missing key 'routing_key' (or 'routing_key_env')")
            url = self.http_url(t, path) if "url" in t else PAGERDUTY_URL
            client_url = (self.string(t["client_url"], (*path, "client_url"))
                          if "client_url" in t else None)
            return PagerDutySinkConfig(key, url, self.timeout(t, path), client_url)
        if kind == "exec":
            t = self.table(raw, path, ("type", "argv", "timeout"))
            if "argv" not in t:
                raise self.fail(path, "missing key 'argv' (a list: program and arguments)")
            argv = self.strings(t["argv"], (*path, "argv"))
            if not argv or not argv[0]:
                raise self.fail((*path, "argv"), "must name a program")
            return ExecSinkConfig(argv, self.timeout(t, path))
        if kind == "file":
            t = self.table(raw, path, ("type", "path"))
            if "path" not in t:
                raise self.fail(path, "missing key 'path'")
            return FileSinkConfig(os.path.expanduser(self.string(t["path"], (*path, "path"))))
        if kind == "stdout":
            self.table(raw, path, ("type",))
            return StdoutSinkConfig()
        raise self.fail((*path, "type"), f"unknown sink type {kind!r} (use webhook, "
                                         "pagerduty, exec, file or stdout)")

    def http_url(self, t: Mapping[str, Any], path: _Path) -> str:
        if "url" not in t:
            raise self.fail(path, "missing key 'url'")
        url = self.string(t["url"], (*path, "url"))
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.fail((*path, "url"), f"must be an http:// or https:// URL, not {url!r}")
        return url

    def timeout(self, t: Mapping[str, Any], path: _Path) -> float:
        if "timeout" not in t:
            return 10.0
        value = self.duration(t["timeout"], (*path, "timeout"))
        if value <= 0:
            raise self.fail((*path, "timeout"), "must be positive")
        return value

    def matchers(self, t: Mapping[str, Any], path: _Path) -> tuple[Matcher, ...]:
        out: list[Matcher] = []
        for i, text in enumerate(self.strings(t.get("matchers", []), (*path, "matchers"))):
            try:
                out.append(parse_matcher(text))
            except GatewayConfigError as exc:
                raise self.fail((*path, "matchers", i), str(exc)) from None
        match = t.get("match", {})
        if not isinstance(match, dict):
            raise self.fail((*path, "match"), "must be a table like { severity = \"critical\" }")
        flat: dict[str, Any] = {}
        for key, value in match.items():
            if key == "labels" and isinstance(value, dict):
                flat.update({f"labels.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        for key, value in flat.items():
            where: _Path = (*path, "match", key)
            problem = check_name(key)
            if problem:
                raise self.fail(where, problem)
            if isinstance(value, str):
                out.append(Matcher(key, "=", value))
            elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
                out.append(Matcher(key, "=~", "|".join(re.escape(v) for v in value)))
            else:
                raise self.fail(where, "must be a string or a non-empty list of strings")
        return tuple(out)

    def route(self, raw: Any, path: _Path, parent: RouteConfig | None, rid: str) -> RouteConfig:
        keys = ("receiver", "match", "matchers", "group_by", "group_wait", "group_interval",
                "repeat_interval", "continue", "routes")
        t = self.table(raw, path, keys)
        if parent is None:
            if "receiver" not in t:
                raise self.fail(path, "the root route needs a receiver")
            if "continue" in t or "match" in t or "matchers" in t:
                raise self.fail(path, "the root route matches every alert: no match, "
                                      "matchers or continue")
            base = RouteConfig(receiver="")
        else:
            base = parent
        receiver = (self.string(t["receiver"], (*path, "receiver")) if "receiver" in t
                    else base.receiver)
        group_by = base.group_by
        if "group_by" in t:
            group_by = self.strings(t["group_by"], (*path, "group_by"))
            for name in group_by:
                problem = check_name(name)
                if problem and name != "...":
                    raise self.fail((*path, "group_by"), problem)
        timing = base.timing
        for key in ("group_wait", "group_interval", "repeat_interval"):
            if key in t:
                timing = replace(timing, **{key: self.duration(t[key], (*path, key))})
        if timing.group_interval <= 0 or timing.repeat_interval <= 0:
            raise self.fail(path, "group_interval and repeat_interval must be positive")
        cont = t.get("continue", False)
        if not isinstance(cont, bool):
            raise self.fail((*path, "continue"), "must be true or false")
        node = RouteConfig(receiver=receiver, matchers=self.matchers(t, path),
                           group_by=group_by, timing=timing, continue_=cont, id=rid)
        children = t.get("routes", [])
        if not isinstance(children, list):
            raise self.fail((*path, "routes"), "must be an array of tables: [[route.routes]]")
        kids = tuple(self.route(c, (*path, "routes", i), node, f"{rid}.{i}")
                     for i, c in enumerate(children))
        return replace(node, routes=kids)

    def check_receivers(self, route: RouteConfig, receivers: Mapping[str, ReceiverConfig],
                        path: _Path) -> None:
        if route.receiver not in receivers:
            near = difflib.get_close_matches(route.receiver, list(receivers), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise self.fail((*path, "receiver"),
                            f"no [[receiver]] named {route.receiver!r}{hint}")
        for i, child in enumerate(route.routes):
            self.check_receivers(child, receivers, (*path, "routes", i))

    def inhibit(self, raw: Any) -> tuple[InhibitRule, ...]:
        if not isinstance(raw, list):
            raise self.fail(("inhibit",), "must be an array of tables: [[inhibit]]")
        rules = []
        for i, item in enumerate(raw):
            path: _Path = ("inhibit", i)
            t = self.table(item, path, ("source", "target", "equal"))
            sides: list[tuple[Matcher, ...]] = []
            for side in ("source", "target"):
                if side not in t:
                    raise self.fail(path, f"missing key {side!r} (a list of matchers)")
                found = []
                for j, text in enumerate(self.strings(t[side], (*path, side))):
                    try:
                        found.append(parse_matcher(text))
                    except GatewayConfigError as exc:
                        raise self.fail((*path, side, j), str(exc)) from None
                sides.append(tuple(found))
            equal = self.strings(t.get("equal", ["host", "target", "pid"]), (*path, "equal"))
            for name in equal:
                problem = check_name(name)
                if problem:
                    raise self.fail((*path, "equal"), problem)
            rules.append(InhibitRule(sides[0], sides[1], equal))
        return tuple(rules)
