"""The ``/metrics`` writer: byte for byte what ``prometheus_client`` writes, over HTTP.

The writer escapes each label set once; everything it writes is compared with
``prometheus_client``'s own ``generate_latest`` (text 0.0.4) and OpenMetrics writer, on
generated families (any label value, help text and float) and on the families it must
leave to ``prometheus_client`` (units, timestamps, other types, other escapings).
"""

from __future__ import annotations

import gzip
import math
import urllib.request
from collections.abc import Iterable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.exposition import generate_latest as text_reference
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_reference
from prometheus_client.samples import Sample

from prism_tui.exposition import (
    LabelStrings,
    MetricsApp,
    render_openmetrics,
    render_text,
    start_server,
    writer_for,
)

NAMES = st.from_regex(r"\A[a-z_][a-z0-9_]{0,12}\Z")
VALUES = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10**12, 10**12)
ACCEPTS = [
    "",
    "text/plain; version=0.0.4",
    "application/openmetrics-text; version=1.0.0",
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",  # Prometheus 2.42
    "application/openmetrics-text; version=1.0.0; escaping=allow-utf-8",
    "text/plain; version=1.0.0; escaping=underscores",
]


class Families:
    """A collector of given families."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


@st.composite
def families(draw: st.DrawFn) -> list[Metric]:
    """Counters, gauges and summaries with any label values and help text."""
    out: list[Metric] = []
    names = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
    for name in names:
        kind = draw(st.sampled_from(["counter", "gauge", "summary"]))
        labels = draw(st.lists(NAMES.filter(lambda n: n != "quantile"), max_size=3,
                               unique=True))
        doc = draw(st.text(max_size=30))
        family: Metric
        if kind == "counter":
            family = CounterMetricFamily(name, doc, labels=labels)
        elif kind == "gauge":
            family = GaugeMetricFamily(name, doc, labels=labels)
        else:
            family = SummaryMetricFamily(name, doc, labels=labels)
        for _ in range(draw(st.integers(0, 3))):
            values = draw(st.lists(st.text(max_size=12), min_size=len(labels),
                                   max_size=len(labels)))
            if kind == "summary":
                count, total = draw(st.integers(0, 10**9)), draw(VALUES)
                family.add_metric(values, count, total)  # type: ignore[arg-type]
                family.samples.append(Sample(
                    name, {**dict(zip(labels, values, strict=True)), "quantile": "0.99"},
                    draw(VALUES)))
            else:
                family.add_metric(values, draw(VALUES))  # type: ignore[call-arg,arg-type]
        out.append(family)
    return out


@given(families())
@settings(max_examples=300, deadline=None)
def test_each_format_is_prometheus_clients_byte_for_byte(generated: list[Metric]) -> None:
    labels = LabelStrings()
    for _ in range(2):  # the second pass reads the label strings from the cache
        assert render_text(generated, labels) == text_reference(Families(generated))  # type: ignore[arg-type]
        assert render_openmetrics(generated, labels) == \
            openmetrics_reference(Families(generated))  # type: ignore[no-untyped-call]


@given(families(), st.sampled_from(ACCEPTS))
@settings(max_examples=100, deadline=None)
def test_every_negotiated_format_this_writer_takes_is_the_references(
        generated: list[Metric], accept: str) -> None:
    """The escapings it takes leave legacy names as they are, so the bytes agree."""
    encoder, _ = choose_encoder(accept)
    writer = writer_for(encoder)
    assert writer is not None, accept
    assert writer(generated, LabelStrings()) == encoder(Families(generated))


def test_what_it_does_not_write_plainly_goes_to_prometheus_client() -> None:
    timed = GaugeMetricFamily("timed", "with a timestamp", labels=["a"])
    timed.add_metric(["x"], 1.0, timestamp=1_700_000_000.5)
    unit = GaugeMetricFamily("size_bytes", "with a unit", unit="bytes")
    unit.add_metric([], 3.0)
    info = InfoMetricFamily("build", "an info metric", value={"version": "1"})
    odd = GaugeMetricFamily("odd", "a sample name with a colon")
    odd.samples.append(Sample("odd:rate", {}, 2.0))
    created = CounterMetricFamily("reqs", "with _created", labels=["a"], created=5.0)
    created.add_metric(["x"], 2.0, created=7.0)
    for family in (timed, unit, info, odd, created):
        both: list[Metric] = [family]
        assert render_text(both, LabelStrings()) == text_reference(Families(both))  # type: ignore[arg-type]
        assert render_openmetrics(both, LabelStrings()) == \
            openmetrics_reference(Families(both))  # type: ignore[no-untyped-call]
    for accept in ("application/openmetrics-text; version=1.0.0; escaping=dots",
                   "application/openmetrics-text; version=1.0.0; escaping=values",
                   "application/openmetrics-text; version=2.0.0"):
        assert writer_for(choose_encoder(accept)[0]) is None, accept


def test_the_label_cache_starts_over_past_its_limit() -> None:
    labels = LabelStrings(limit=2)
    assert [labels({"a": str(i)}) for i in range(3)] == ['{a="0"}', '{a="1"}', '{a="2"}']
    assert labels({"b": 'q"\\\n'}) == '{b="q\\"\\\\\\n"}'
    assert labels({}) == ""
    assert len(labels._strings) <= 2


class Counting:
    """A collector whose counter grows by one a scrape."""

    def __init__(self) -> None:
        self.scrapes = 0

    def collect(self) -> Iterator[Metric]:
        self.scrapes += 1
        family = CounterMetricFamily("scrapes", "scrapes so far", labels=["who"])
        family.add_metric(['a "b"'], self.scrapes)
        yield family
        gauge = GaugeMetricFamily("nan_gauge", "not a number")
        gauge.add_metric([], math.nan)
        yield gauge


@pytest.fixture()
def served() -> Iterator[tuple[str, Counting]]:
    registry = CollectorRegistry(auto_describe=True)  # names known: name[] filters
    collector = Counting()
    registry.register(collector)  # type: ignore[arg-type]
    server, thread = start_server(registry, 0, "127.0.0.1")
    try:
        yield f"http://127.0.0.1:{server.server_port}", collector
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def get(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_the_endpoint_negotiates_filters_and_compresses(served: tuple[str, Counting]) -> None:
    url, _ = served
    status, headers, body = get(f"{url}/metrics")
    assert status == 200 and headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert b'scrapes_total{who="a \\"b\\""} 2.0\n' in body and b"nan_gauge NaN\n" in body
    _, headers, body = get(f"{url}/metrics", Accept=ACCEPTS[3])
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n") and b'scrapes_total{who="a \\"b\\""} 3.0\n' in body
    _, headers, body = get(f"{url}/metrics", **{"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip"
    assert b"scrapes_total" in gzip.decompress(body)
    _, _, body = get(f"{url}/metrics?name[]=nan_gauge")
    assert b"nan_gauge NaN" in body and b"scrapes" not in body
    status, _, body = get(f"{url}/favicon.ico")
    assert (status, body) == (200, b"")
    request = urllib.request.Request(f"{url}/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 405


def test_an_empty_registry_is_an_empty_exposition() -> None:
    registry = CollectorRegistry(auto_describe=False)
    app = MetricsApp(registry)
    body, content_type = app.render(None)
    assert (body, content_type) == (b"", "text/plain; version=0.0.4; charset=utf-8")
