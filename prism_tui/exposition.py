"""The ``/metrics`` endpoint: ``prometheus_client``'s formats, each label set escaped once.

``prometheus_client`` writes a sample at about 7 µs, half of it checking and escaping
the same label names and values again on every scrape (docs/metrics.md: 100 series, 800
samples, ~7 ms a scrape). The label sets of a monitor's series are few and fixed, so
this writer escapes each one once (with ``prometheus_client``'s own escaping rules) and
keeps the string; everything else is the same text, byte for byte, which the tests check
against ``prometheus_client.generate_latest`` and its OpenMetrics twin on real and
generated families. Families it does not handle plainly (exemplars, timestamps, units,
native histograms, names outside the legacy character set, the ``_created``/``_gsum``
samples) go to ``prometheus_client``'s writers unchanged. Content negotiation
(``choose_encoder``) and the ``name[]`` filter are ``prometheus_client``'s; gzip is at level 1.
"""

from __future__ import annotations

import functools
import gzip
import re
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import (
    ThreadingWSGIServer,
    choose_encoder,
    gzip_accepted,
)
from prometheus_client.exposition import generate_latest as text_reference
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import (
    ALLOWUTF8,
    UNDERSCORES,
    escape_label_name,
)
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_reference
from prometheus_client.utils import floatToGoString

_LEGACY_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_PLAIN_TYPES = frozenset({"counter", "gauge", "summary"})
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")
IDENTITY_ESCAPINGS = frozenset({UNDERSCORES, ALLOWUTF8})
"""Name escapings that leave a legacy name as it is (``dots`` doubles underscores,
``values`` prefixes sample names)."""
GZIP_LEVEL = 1
"""Compression for scrapers that accept gzip (Prometheus does): level 1 takes 0.9 ms for
a 100-series exposition on the dev VM where ``prometheus_client``'s level 9 takes 3.3 ms,
for 13 KB instead of 9.6 KB."""
LABEL_CACHE_LIMIT = 50_000
"""Label sets kept; the cache starts over past this (targets come and go)."""

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class _Families:
    """A collector that yields families already collected (what the writers take)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


class LabelStrings:
    """Each label set's ``{name="value",...}`` (sorted by name, escaped as
    ``prometheus_client`` escapes them), computed once; None for a set with a name
    outside the legacy character set (``prometheus_client`` writes those)."""

    def __init__(self, limit: int = LABEL_CACHE_LIMIT) -> None:
        self.limit = limit
        self._strings: dict[tuple[tuple[str, str], ...], str | None] = {}

    def __call__(self, labels: dict[str, str]) -> str | None:
        """``{...}`` for ``labels`` (the empty string when there are none)."""
        key = tuple(labels.items())
        try:
            return self._strings[key]
        except KeyError:
            pass
        if len(self._strings) >= self.limit:
            self._strings.clear()
        text: str | None = None
        if all(_plain_name(k) for k in labels):
            inner = ",".join(f'{escape_label_name(k)}="{_escape_value(v)}"'
                             for k, v in sorted(labels.items()))
            text = "{" + inner + "}" if inner else ""
        self._strings[key] = text
        return text


def _escape_value(value: str) -> str:
    """A label value as both formats write it (UTF-8 allowed; backslash, newline and
    double quote escaped)."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


@functools.lru_cache(maxsize=4096)
def _plain_name(name: str) -> bool:
    """A legacy name (every escaping leaves it as it is) that is not one of the
    OpenMetrics-only samples the text format moves."""
    return _LEGACY_NAME.match(name) is not None and not name.endswith(_OM_SUFFIXES)


def _sample_lines(metric: Metric, labels: LabelStrings) -> list[str] | None:
    """One line a sample, or None when ``metric`` is not plain (see :func:`render_text`)."""
    if metric.type not in _PLAIN_TYPES or metric.unit or not _plain_name(metric.name):
        return None
    out = []
    for s in metric.samples:
        if (s.timestamp is not None or s.exemplar is not None or s.native_histogram
                or s.value is None or not _plain_name(s.name)):
            return None
        text = labels(s.labels)
        if text is None:
            return None
        out.append(f"{s.name}{text} {floatToGoString(s.value)}\n")  # type: ignore[no-untyped-call]
    return out


def render_text(families: list[Metric], labels: LabelStrings) -> bytes:
    """Prometheus text format 0.0.4 (what ``generate_latest`` writes). Families with
    exemplars, timestamps, units, other types or names outside the legacy character
    set make it hand everything to ``generate_latest``."""
    out: list[str] = []
    for metric in families:
        lines = _sample_lines(metric, labels)
        if lines is None:
            return text_reference(_Families(families))  # type: ignore[arg-type]
        name = metric.name + "_total" if metric.type == "counter" else metric.name
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {metric.type}\n")
        out.extend(lines)
    return "".join(out).encode("utf-8")


def render_openmetrics(families: list[Metric], labels: LabelStrings) -> bytes:
    """OpenMetrics 1.0.0 (what ``prometheus_client.openmetrics``'s writer writes; the
    same families go to it as in :func:`render_text`)."""
    out: list[str] = []
    for metric in families:
        lines = _sample_lines(metric, labels)
        if lines is None:
            return openmetrics_reference(_Families(families))  # type: ignore[no-untyped-call,no-any-return]
        out.append(f"# HELP {metric.name} {_escape_value(metric.documentation)}\n"
                   f"# TYPE {metric.name} {metric.type}\n")
        out.extend(lines)
    out.append("# EOF\n")
    return "".join(out).encode("utf-8")


def writer_for(encoder: Callable[..., bytes]
               ) -> Callable[[list[Metric], LabelStrings], bytes] | None:
    """This module's writer for the encoder ``choose_encoder`` picked, or None where
    only ``prometheus_client``'s writes it (an escaping that rewrites legacy names, an
    OpenMetrics version other than 1.0.0)."""
    if encoder is text_reference:
        return render_text
    if not isinstance(encoder, functools.partial) or \
            encoder.keywords.get("escaping", UNDERSCORES) not in IDENTITY_ESCAPINGS:
        return None
    if encoder.func is text_reference and not encoder.args:
        return render_text
    if encoder.func is openmetrics_reference and not encoder.args and \
            encoder.keywords.get("version", "1.0.0") == "1.0.0":
        return render_openmetrics
    return None


class MetricsApp:
    """The WSGI app: ``prometheus_client``'s ``make_wsgi_app`` with these writers for
    the two formats a scraper asks for by default."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.labels = LabelStrings()
        self._lock = threading.Lock()  # one label cache, scrapes on server threads

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition for an ``Accept`` header, and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        writer = writer_for(encoder)
        if writer is None:
            return encoder(self.registry), content_type
        families = list(self.registry.collect())
        with self._lock:
            return writer(families, self.labels), content_type

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        method = environ["REQUEST_METHOD"]
        headers: list[tuple[str, str]] = []
        if method == "OPTIONS":
            status, headers, output = "200 OK", [("Allow", "OPTIONS,GET")], b""
        elif method != "GET":
            status = "405 Method Not Allowed"
            headers = [("Allow", "OPTIONS,GET")]
            output = f"# HTTP {status}: {method}; use OPTIONS or GET\n".encode()
        elif environ["PATH_INFO"] == "/favicon.ico":
            status, output = "200 OK", b""
        else:
            params = parse_qs(environ.get("QUERY_STRING", ""))
            if "name[]" in params:
                encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT") or "")
                output = encoder(self.registry.restricted_registry(params["name[]"]))
            else:
                output, content_type = self.render(environ.get("HTTP_ACCEPT"))
            status, headers = "200 OK", [("Content-Type", content_type)]
            if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING") or ""):
                output = gzip.compress(output, compresslevel=GZIP_LEVEL)
                headers.append(("Content-Encoding", "gzip"))
        start_response(status, headers)
        return [output]


class _QuietHandler(WSGIRequestHandler):
    """No line on stderr per request."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def start_server(registry: CollectorRegistry, port: int, addr: str
                 ) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``registry`` on ``addr:port`` from a daemon thread (``OSError`` when the
    address cannot be bound); IPv6 addresses work as IPv4 ones do."""
    family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][0]

    class Server(ThreadingWSGIServer):
        address_family = family

    server = make_server(addr, port, MetricsApp(registry), Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    return server, thread
