"""One typed settings object for the monitor (docs/architecture.md §Rules 6).

Settings are loaded once, in this order, each layer overriding the one before:

1. defaults (the dataclass field defaults below);
2. a TOML file: the ``path`` given, else ``$PRISM_CONFIG``, else
   ``~/.config/latencyprism/config.toml`` when it exists (an explicit path that does not
   exist is an error);
3. environment variables ``PRISM_<SECTION>_<KEY>`` (``PRISM_ENGINE_WARMUP_ITERATIONS=500``),
   converted to the field's type: integers, floats, booleans (``1/0``, ``true/false``,
   ``yes/no``, ``on/off``), optional values (an empty string means None) and tuples of
   strings (comma separated). ``PRISM_DB`` is accepted as an alias of
   ``PRISM_HISTORY_DB``;
4. overrides, typically the command-line flags: dotted keys (``"engine.warmup_iterations"``)
   to values; None values are ignored (a flag that was not given).

The result is an immutable :class:`Settings` that callers pass down; nothing here is a
global. Every mistake raises :class:`SettingsError` (exit code 2) with one line naming
where it came from (file and line, environment variable, or option), the key and the
reason, with a suggestion for misspelt keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin, get_type_hints

from prism_common.toml_lines import TomlLocator, toml_error_position

if TYPE_CHECKING:
    from prism_tui.engine.episodes import EpisodeHolds

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

DEFAULT_CONFIG = "~/.config/latencyprism/config.toml"
DEFAULT_DB = "~/.local/state/latencyprism/history.sqlite"
DEFAULT_FLEET_DB = "~/.local/state/latencyprism/fleet.sqlite"
"""``prism fleet``'s history of merged windows (read by ``prism history --fleet``)."""
ENV_PREFIX = "PRISM_"
ENV_ALIASES = {"PRISM_DB": "history.db"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_MQTT_SCHEMES = {"mqtt", "mqtts", "tcp", "ssl", "tls", "ws", "wss"}


class SettingsError(ValueError):
    """A bad configuration value or file; the message is one line for the user."""

    exit_code = 2


@dataclass(frozen=True)
class ProbeSettings:
    """How probes are attached and drained.

    Attributes:
        backend: ``bpf`` (spans paired in the kernel by an eBPF program, one ring buffer,
            ``uprobe_multi`` links), ``perf`` (perf uprobe events read into rings, paired
            here) or ``auto`` (bpf when it loads, else perf with a notice saying why).
        mode: the perf backend's rings: ``auto``, ``thread`` (one ring per target
            thread) or ``cpu`` (per CPU).
        ring_pages: data pages per perf ring buffer, or of the bpf backend's one ring
            (a power of two).
        drain_interval_s: how often rings are drained without a wake-up, in seconds
            (the anchor's records wake the reader; DeepDive probes drain every 50 ms at
            least).
        wake_gap_ms: the bpf backend's least time between two wake-ups by the anchor's
            records, in ms (0: every one wakes the reader). At step rates above
            1 / gap an iteration's end waits up to 1.5 gaps (with the steps after it),
            and the monitor's per-wake-up work is shared by those steps.
        overhead_budget: the fraction of target CPU time probes may cost, in (0, 1);
            ``prism watch`` enforces it on the sentinel probes (docs/performance.md,
            "Overhead governor").
        governor_action: what the governor does over budget: ``detach`` the costliest
            probes, or ``duty-cycle`` them; either way it restores them once they fit.
    """

    backend: Literal["auto", "perf", "bpf"] = "auto"
    mode: Literal["auto", "thread", "cpu"] = "auto"
    ring_pages: int = 64
    drain_interval_s: float = 0.02
    wake_gap_ms: float = 5.0
    overhead_budget: float = 0.005
    governor_action: Literal["detach", "duty-cycle"] = "detach"


@dataclass(frozen=True)
class EngineSettings:
    """Iteration analysis and detection.

    Attributes:
        warmup_iterations: decode iterations collected before the baseline is fitted.
        warmup_s: ... or seconds spanned by at least 200 of them, whichever comes first
            (0: iterations only), so a short run or a slow server is judged too.
        detector_rule: ``prism`` (ours, the default) or ``paper`` (the reference rule).
        alert_open_iterations: an alert episode opens (one ``firing`` alert) once the
            detector has fired on this many iterations in a row ...
        alert_open_ms: ... spanning at least this many milliseconds (a blip on a
            sub-millisecond loop does not page).
        alert_close_iterations: an open episode closes (one ``resolved`` alert) once the
            detector has been clear for this many iterations in a row ...
        alert_close_ms: ... spanning at least this many milliseconds (a fault that lets
            a normal iteration through now and then pages once); a firing run too short
            to open an episode pauses the count without restarting it.
        window_s: the span of the latency table the dashboard shows first and of the
            snapshots ``prism watch --headless`` prints, in seconds: 10, 60 or 300
            (``w`` cycles through them).
        snapshot_hz: snapshots per second handed to the UI.
        slo: latency objectives like ``"decode p99 <= 60ms over 10s"`` (the whole
            iteration) or ``"device_sync: decode p99 <= 5ms over 10s"`` (one stage's time
            per iteration).
        escalation_s: how long the deeper (deepdive-level) probes stay attached after an
            alert fires (0: never escalate).
        realtime_priority: 0 runs the monitor's loop at normal priority; 1–99 runs it
            and its helper threads under ``SCHED_FIFO`` at that priority, so a busy host
            does not delay alerts (needs root or CAP_SYS_NICE; ``--realtime`` sets 1).
    """

    warmup_iterations: int = 1000
    warmup_s: float = 10.0
    detector_rule: Literal["paper", "prism"] = "prism"
    alert_open_iterations: int = 3
    alert_open_ms: float = 500.0
    alert_close_iterations: int = 10
    alert_close_ms: float = 5000.0
    window_s: float = 10.0
    snapshot_hz: float = 4.0
    slo: tuple[str, ...] = ()
    escalation_s: float = 30.0
    realtime_priority: int = 0


    def episode_holds(self) -> EpisodeHolds:
        """The alert episodes' holds as the engine takes them."""
        from prism_tui.engine.episodes import EpisodeHolds

        return EpisodeHolds(self.alert_open_iterations, self.alert_open_ms,
                            self.alert_close_iterations, self.alert_close_ms)


@dataclass(frozen=True)
class HistorySettings:
    """The local SQLite history.

    Attributes:
        db: path of the database file (``~`` is expanded by :attr:`path`).
        retention_days: windows and alerts older than this are deleted.
        max_iterations: the most iteration rows kept.
    """

    db: str = DEFAULT_DB
    retention_days: float = 7.0
    max_iterations: int = 1_000_000

    @property
    def path(self) -> Path:
        """The database path with ``~`` expanded."""
        return Path(os.path.expanduser(self.db))


@dataclass(frozen=True)
class MqttSettings:
    """Alert publishing.

    Attributes:
        broker: broker URL (``mqtt://host:1883``, ``mqtts://...``) or None for no MQTT.
        topic_root: topic prefix; the host name and target follow it.
        username: broker user name, if any.
        password: broker password, if any (redacted by :meth:`Settings.to_dict`).
        tls_ca: CA bundle file for TLS.
        tls_cert: client certificate file.
        tls_key: client key file.
        client_id: MQTT client id (None: generated).
    """

    broker: str | None = None
    topic_root: str = "latencyprism/v1"
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    client_id: str | None = None


@dataclass(frozen=True)
class MetricsSettings:
    """The Prometheus/OpenMetrics endpoint of ``prism watch``.

    Attributes:
        port: TCP port of ``/metrics`` (None: no endpoint; 0: any free port, printed).
        addr: address it binds (loopback by default; ``0.0.0.0`` for every interface).
    """

    port: int | None = None
    addr: str = "127.0.0.1"


@dataclass(frozen=True)
class WatchSettings:
    """Defaults of ``prism watch``.

    Attributes:
        profile: probe profile name (None: every profile whose libraries are mapped).
        duration_s: stop after this many seconds (None: run until interrupted).
        headless: no dashboard.
    """

    profile: str | None = None
    duration_s: float | None = None
    headless: bool = False


@dataclass(frozen=True)
class Settings:
    """Every setting of the monitor, by section."""

    probe: ProbeSettings = field(default_factory=ProbeSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    history: HistorySettings = field(default_factory=HistorySettings)
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    watch: WatchSettings = field(default_factory=WatchSettings)

    def to_dict(self, *, redact: bool = True) -> dict[str, dict[str, Any]]:
        """Plain JSON-ready dict (tuples as lists); the MQTT password is ``"***"``."""
        out: dict[str, dict[str, Any]] = {}
        for name in SECTIONS:
            section = getattr(self, name)
            values: dict[str, Any] = {}
            for f in dataclasses.fields(section):
                v = getattr(section, f.name)
                values[f.name] = list(v) if isinstance(v, tuple) else v
            out[name] = values
        if redact and out["mqtt"]["password"] is not None:
            out["mqtt"]["password"] = "***"
        return out


SECTIONS: dict[str, type[Any]] = {
    "probe": ProbeSettings,
    "engine": EngineSettings,
    "history": HistorySettings,
    "mqtt": MqttSettings,
    "metrics": MetricsSettings,
    "watch": WatchSettings,
}


def load_settings(path: str | None = None, env: Mapping[str, str] = os.environ,
                  overrides: Mapping[str, object] = types.MappingProxyType({})) -> Settings:
    """Load the settings: defaults, then the TOML file, then ``PRISM_*``, then overrides.

    Args:
        path: TOML file; None means ``$PRISM_CONFIG`` or the default file if it exists.
        env: environment variables (``os.environ`` by default; tests pass a dict).
        overrides: dotted keys to values, e.g. ``{"engine.warmup_iterations": 500}``;
            None values are skipped. Strings given for non-string fields are parsed
            as environment values are.

    Returns:
        The frozen settings.

    Raises:
        SettingsError: a missing explicit file, invalid TOML, an unknown key, a wrong
            type or a value out of range; the message names the source and the key.
    """
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    explicit = path is not None or bool(env.get("PRISM_CONFIG"))
    file = path if path is not None else env.get("PRISM_CONFIG") or DEFAULT_CONFIG
    file = os.path.expanduser(file)
    if explicit or os.path.exists(file):
        _load_file(file, values)
    _load_env(env, values)
    _load_overrides(overrides, values)
    sections = {name: cls(**values[name]) for name, cls in SECTIONS.items()}
    return Settings(**sections)


# ------------------------------------------------------------------------------ sources


def _load_file(file: str, values: dict[str, dict[str, Any]]) -> None:
    try:
        text = Path(file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError(f"{file}: configuration file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SettingsError(f"{file}: cannot read configuration file: {reason}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line, reason = _toml_position(exc)
        raise SettingsError(f"{file}:{line}: invalid TOML: {reason}") from None
    locator = TomlLocator(text)
    for section, table in doc.items():
        if section not in SECTIONS:
            where = _where(file, locator.find_root(section))
            kind = "section" if isinstance(table, dict) else "top-level key"
            raise SettingsError(
                f"{where}unknown {kind} {section!r}{_suggest(section, SECTIONS)}")
        if not isinstance(table, dict):
            where = _where(file, locator.find_root(section))
            raise SettingsError(f"{where}{section!r} must be a table like [{section}]")
        for key, raw in table.items():
            where = _where(file, locator.find_key(section, None, key))
            _set(values, section, key, raw, f"{where}[{section}] {key}", parse=False)


def _load_env(env: Mapping[str, str], values: dict[str, dict[str, Any]]) -> None:
    for name in sorted(env):
        if name in ENV_ALIASES:
            section, key = ENV_ALIASES[name].split(".")
        elif name.startswith(ENV_PREFIX):
            rest = name[len(ENV_PREFIX):].lower()
            section, _, key = rest.partition("_")
            if section not in SECTIONS or name == "PRISM_CONFIG":
                continue  # PRISM_PROFILE_PATH, PRISM_CACHE_DIR...: not settings
        else:
            continue
        _set(values, section, key, env[name], f"environment {name}", parse=True,
             env_name=True)


def _load_overrides(overrides: Mapping[str, object],
                    values: dict[str, dict[str, Any]]) -> None:
    for dotted, raw in overrides.items():
        if raw is None:
            continue
        section, _, key = dotted.partition(".")
        if section not in SECTIONS or not key:
            raise SettingsError(
                f"option {dotted}: unknown setting{_suggest(dotted, _all_dotted())}")
        _set(values, section, key, raw, f"option {dotted}",
             parse=isinstance(raw, str))


# ------------------------------------------------------------------------------ typing


def _set(values: dict[str, dict[str, Any]], section: str, key: str, raw: object,
         label: str, *, parse: bool, env_name: bool = False) -> None:
    """Convert ``raw`` to the type of ``section.key``, check its range, store it."""
    hints = _hints(section)
    if key not in hints:
        names = list(hints)
        if env_name:
            names = [f"PRISM_{section.upper()}_{k.upper()}" for k in hints]
            suggestion = _suggest(f"PRISM_{section.upper()}_{key.upper()}", names)
            raise SettingsError(f"{label}: unknown setting{suggestion}")
        raise SettingsError(f"{label}: unknown key{_suggest(key, names)}")
    try:
        value = _convert(raw, hints[key], parse)
        reason = _check(section, key, value)
    except _BadValueError as exc:
        reason = str(exc)
    else:
        if reason is None:
            values[section][key] = value
            return
    raise SettingsError(f"{label}: {reason}")


class _BadValueError(Exception):
    """A conversion failure (internal: becomes a SettingsError with the source)."""


def _hints(section: str) -> dict[str, Any]:
    cls = SECTIONS[section]
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in get_type_hints(cls).items() if k in names}


def _convert(raw: object, tp: Any, parse: bool) -> object:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        if parse and isinstance(raw, str) and raw.strip().lower() in ("", "none", "null"):
            return None
        if not parse and raw == "":
            return None
        return _convert(raw, inner[0], parse)
    if origin is Literal:
        choices = get_args(tp)
        if raw not in choices:
            wanted = ", ".join(repr(c) for c in choices)
            raise _BadValueError(f"must be one of {wanted}, not {_show(raw)}"
                       f"{_suggest(str(raw), [str(c) for c in choices])}")
        return raw
    if origin is tuple:
        if isinstance(raw, str):
            items: list[object] = [s.strip() for s in raw.split(",") if s.strip()] \
                if parse else [raw]
        elif isinstance(raw, (list, tuple)):
            items = list(raw)
        else:
            raise _BadValueError(f"must be a list of strings, not {_show(raw)}")
        if not all(isinstance(i, str) for i in items):
            raise _BadValueError("must be a list of strings")
        return tuple(items)
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if parse and isinstance(raw, str):
            low = raw.strip().lower()
            if low in _TRUE | _FALSE:
                return low in _TRUE
        raise _BadValueError(f"must be a boolean (true/false), not {_show(raw)}")
    if tp is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if parse and isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:
                pass
        raise _BadValueError(f"must be an integer, not {_show(raw)}")
    if tp is float:
        number: float | None = None
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            number = float(raw)
        elif parse and isinstance(raw, str):
            try:
                number = float(raw.strip())
            except ValueError:
                number = None
        if number is None:
            raise _BadValueError(f"must be a number, not {_show(raw)}")
        if not math.isfinite(number):
            raise _BadValueError(f"must be a finite number, not {_show(raw)}")
        return number
    if tp is str:
        if isinstance(raw, str):
            return raw
        raise _BadValueError(f"must be a string, not {_show(raw)}")
    raise _BadValueError(f"unsupported setting type {tp!r}")  # pragma: no cover - a coding error


def _show(raw: object) -> str:
    if isinstance(raw, str):
        return f"{raw!r}"
    kind = {bool: "a boolean", int: "an integer", float: "a number", list: "a list",
            dict: "a table"}.get(type(raw), type(raw).__name__)
    return f"{kind} ({raw!r})" if not isinstance(raw, dict) else kind


def _check(section: str, key: str, value: Any) -> str | None:
    """The range rule of ``section.key``: None when ``value`` is acceptable."""
    name = f"{section}.{key}"
    if value is None:
        return None
    if name == "probe.ring_pages" and (value < 1 or value & (value - 1)):
        return f"must be a power of two >= 1, not {value}"
    if name == "probe.overhead_budget" and not 0 < value < 1:
        return f"must be in (0, 1) (a fraction: 0.005 is 0.5 %), not {value:g}"
    if name == "probe.wake_gap_ms" and not 0 <= value <= 1000:
        return f"must be in [0, 1000] ms, not {value:g}"
    positive = {"probe.drain_interval_s", "engine.window_s", "engine.snapshot_hz",
                "history.retention_days", "watch.duration_s"}
    if name in positive and value <= 0:
        return f"must be > 0, not {value:g}"
    if name == "engine.window_s":
        from prism_tui.engine.view import WINDOWS_S  # the spans the engine snapshots

        if value not in WINDOWS_S:
            return (f"must be one of {', '.join(f'{w:g}' for w in WINDOWS_S)} (the "
                    f"dashboard's spans), not {value:g}")
    at_least_one = {"engine.warmup_iterations", "history.max_iterations",
                    "engine.alert_open_iterations", "engine.alert_close_iterations"}
    if name in at_least_one and value < 1:
        return f"must be >= 1, not {value}"
    if name == "engine.realtime_priority" and not 0 <= value <= 99:
        return f"must be 0 (off) or a SCHED_FIFO priority 1-99, not {value}"
    non_negative = {"engine.escalation_s", "engine.warmup_s", "engine.alert_open_ms",
                    "engine.alert_close_ms"}
    if name in non_negative and value < 0:
        return f"must be >= 0, not {value:g}"
    if name == "engine.slo":
        from prism_tui.engine.core import SloSpec  # numpy: only when SLOs are set

        for spec in value:
            try:
                SloSpec.parse(spec)
            except ValueError as exc:
                return str(exc)
    if name == "metrics.port" and not 0 <= value <= 65535:
        return f"must be a TCP port 0-65535 (0: any free port), not {value}"
    if name == "metrics.addr" and not value.strip():
        return "must not be empty (127.0.0.1 serves loopback only)"
    if name == "mqtt.broker":
        return _check_broker(value)
    if name in ("mqtt.topic_root", "history.db") and not value.strip():
        return "must not be empty"
    if name == "mqtt.topic_root" and ("+" in value or "#" in value):
        return f"must not contain MQTT wildcards (+ or #), not {value!r}"
    return None


def _check_broker(url: str) -> str | None:
    if not url.strip():
        return "must not be empty (leave it unset for no MQTT)"
    if "://" in url:
        scheme = url.split("://", 1)[0].lower()
        if scheme not in _MQTT_SCHEMES:
            return (f"unknown scheme {scheme!r} in {url!r} "
                    f"(use {', '.join(sorted(_MQTT_SCHEMES))})")
        host = url.split("://", 1)[1]
    else:
        host = url
    if not host.split("/")[0].split("@")[-1].split(":")[0]:
        return f"no host in {url!r}"
    return None


# ------------------------------------------------------------------------------ helpers


def _all_dotted() -> list[str]:
    return [f"{s}.{k}" for s in SECTIONS for k in _hints(s)]


def _suggest(word: str, candidates: Mapping[str, object] | list[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _where(file: str, line: int | None) -> str:
    return f"{file}:{line}: " if line is not None else f"{file}: "


def _toml_position(exc: Exception) -> tuple[int, str]:
    """(line, message without position) from a TOMLDecodeError."""
    lineno, message = toml_error_position(exc)
    return lineno or 1, message
