"""Broker settings and the MQTT topic layout of docs/alerts.md for the publisher side.

Kept separate from the publisher so the CLI, the embedded broker and the tests can share
one URL parser and one set of topic helpers without importing aiomqtt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from alerting.errors import AlertingError

DEFAULT_TOPIC_ROOT = "latencyprism/v1"
ALERT_SUBSCRIPTION = "latencyprism/v1/+/+/alert"
"""What a gateway subscribes to: every host's every target's alerts."""

_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
_ALIASES = {"tcp": "mqtt", "ssl": "mqtts", "tls": "mqtts"}
_SEGMENT_BAD = re.compile(r"[^A-Za-z0-9_.-]")


class BrokerConfigError(AlertingError):
    """A broker URL or setting the user wrote that cannot be used (one clear line)."""

    exit_code = 2


@dataclass(frozen=True)
class BrokerConfig:
    """Where and how the publisher connects (from settings or ``--broker``)."""

    url: str
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    """CA bundle that signed the broker's certificate (``mqtts://`` uses system CAs if unset)."""
    tls_cert: str | None = None
    """Client certificate for mutual TLS (goes with ``tls_key``)."""
    tls_key: str | None = None
    client_id: str | None = None
    """MQTT client identifier; the publisher derives a stable one from the host if unset."""
    topic_root: str = DEFAULT_TOPIC_ROOT
    keepalive_s: int = 10
    protocol: str = "auto"
    """``auto`` (MQTT 5, falling back to 3.1.1 when refused), ``5`` or ``3.1.1``."""

    def __post_init__(self) -> None:
        for name in ("username", "password", "tls_ca", "tls_cert", "tls_key", "client_id"):
            if getattr(self, name) == "":  # settings files write "" for unset
                object.__setattr__(self, name, None)
        parse_broker_url(self.url)  # fail at construction, with the URL named
        if (self.tls_cert is None) != (self.tls_key is None):
            raise BrokerConfigError("broker tls_cert and tls_key must be given together")
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise BrokerConfigError(f"broker protocol must be auto, 5 or 3.1.1, "
                                    f"got {self.protocol!r}")
        if self.keepalive_s < 1:
            raise BrokerConfigError(f"broker keepalive_s must be ≥ 1, got {self.keepalive_s}")
        if not self.topic_root or any(c in self.topic_root for c in "#+"):
            raise BrokerConfigError(f"topic root {self.topic_root!r} must be non-empty and "
                                    "contain no MQTT wildcards")

    @property
    def endpoint(self) -> tuple[str, str, int]:
        """(scheme, host, port) of :attr:`url`."""
        return parse_broker_url(self.url)

    @property
    def uses_tls(self) -> bool:
        """True for ``mqtts://`` or when a CA / client certificate is configured."""
        return self.endpoint[0] == "mqtts" or self.tls_ca is not None or self.tls_cert is not None


def parse_broker_url(url: str) -> tuple[str, str, int]:
    """``mqtt://host[:1883]``, ``mqtts://host[:8883]`` or ``host:port`` → (scheme, host, port).

    ``tcp://`` is read as ``mqtt://``, ``ssl://`` and ``tls://`` as ``mqtts://``.

    Raises:
        BrokerConfigError: the URL has another scheme, no host, or a bad port.
    """
    text = url.strip()
    if not text:
        raise BrokerConfigError("broker URL is empty (expected mqtt://host:1883)")
    scheme = "mqtt"
    rest = text
    if "://" in text:
        scheme, _, rest = text.partition("://")
        scheme = _ALIASES.get(scheme.lower(), scheme.lower())
        if scheme not in _DEFAULT_PORTS:
            raise BrokerConfigError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts:// "
                                    "(WebSocket brokers are not supported by the publisher)")
    rest = rest.rstrip("/")
    if "/" in rest or "@" in rest or "?" in rest:
        raise BrokerConfigError(f"broker URL {url!r}: expected only host[:port] after the "
                                "scheme (credentials go in username/password settings)")
    if rest.startswith("["):  # [ipv6]:port
        host, sep, tail = rest[1:].partition("]")
        if not sep:
            raise BrokerConfigError(f"broker URL {url!r}: unclosed '[' in IPv6 host")
        port_text = tail[1:] if tail.startswith(":") else ""
        if tail and not tail.startswith(":"):
            raise BrokerConfigError(f"broker URL {url!r}: junk after the IPv6 host")
    else:
        host, _, port_text = rest.partition(":")
    if not host:
        raise BrokerConfigError(f"broker URL {url!r} has no host")
    if "://" not in text and not port_text:
        raise BrokerConfigError(f"broker address {url!r}: write host:port or mqtt://host")
    port = _DEFAULT_PORTS[scheme]
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise BrokerConfigError(f"broker URL {url!r}: port must be 1-65535, "
                                    f"got {port_text!r}")
        port = int(port_text)
    return scheme, host, port


def topic_segment(text: str) -> str:
    """A safe single topic level: MQTT wildcards, '/' and odd characters become '_'."""
    return _SEGMENT_BAD.sub("_", text) or "_"


def status_topic(root: str, host: str) -> str:
    """``<root>/<host>/status``: retained online/offline state of one monitor."""
    return f"{root}/{topic_segment(host)}/status"


def alert_topic(root: str, host: str, target_key: str) -> str:
    """``<root>/<host>/<target_key>/alert``: QoS 1 alert messages."""
    return f"{root}/{topic_segment(host)}/{topic_segment(target_key)}/alert"


def summary_topic(root: str, host: str, target_key: str) -> str:
    """``<root>/<host>/<target_key>/summary``: QoS 0 periodic digests (latest only)."""
    return f"{root}/{topic_segment(host)}/{topic_segment(target_key)}/summary"


def digest_topic(root: str, host: str, target_key: str) -> str:
    """``<root>/<host>/<target_key>/digest``: closed windows' t-digests (alerting.digests)."""
    return f"{root}/{topic_segment(host)}/{topic_segment(target_key)}/digest"
