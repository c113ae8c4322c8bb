"""The gateway's pure stages, driven by a manual clock: exact timing, no sleeping."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from alerting.gateway.config import (
    GatewayConfig,
    RetryPolicy,
    parse_duration,
    parse_gateway_config,
)
from alerting.gateway.errors import GatewayConfigError
from alerting.gateway.matchers import Matcher, parse_matcher
from alerting.gateway.pipeline import (
    ManualClock,
    Notification,
    Pipeline,
    Silence,
    match_routes,
)
from alerting.gateway.sinks import SinkError, send_with_retry
from alerting.schema import Alert, Suspect, rfc3339

_ids = itertools.count()
T0 = 1_700_000_000.0


def make_alert(fp: str = "fp-1", status: str = "firing", severity: str = "warning",
               host: str = "gpu-node-1", pid: int = 4242, name: str = "vllm",
               stage: str = "device_sync", device: str = "cuda:0", at: float = T0,
               labels: dict[str, str] | None = None) -> Alert:
    """A valid schema-1 alert with the fields routing looks at."""
    return Alert(id=f"id-{next(_ids)}", fingerprint=fp, status=status, severity=severity,
                 host=host, target_pid=pid, target_name=name, device=device, stage=stage,
                 phase="decode", observed_ms=42.5, predicted_ms=30.0, error=0.29, ucl=0.2,
                 window=10, started_at=rfc3339(at - 1), detected_at=rfc3339(at),
                 iteration_end_ns=123_456_789, summary=f"{stage} slow on {host}",
                 suspects=(Suspect("device_sync", device, "sm_clock", 3.5, 0.2),),
                 labels=labels or {})


CONFIG = """
[route]
receiver = "default"
group_by = ["host", "target", "pid"]
group_wait = "10s"
group_interval = "1m"
repeat_interval = "10m"

[[route.routes]]
matchers = ["severity=critical"]
receiver = "pager"
continue = true

[[route.routes]]
match = { labels = { team = "serving" } }
receiver = "chat"

[[route.routes]]
match = { host = ["gpu-node-7", "gpu-node-8"] }
receiver = "chat"
group_wait = "0s"

[[receiver]]
name = "default"
[[receiver.sink]]
type = "stdout"

[[receiver]]
name = "pager"
[[receiver.sink]]
type = "pagerduty"
routing_key = "R0UT1NG"
url = "http://127.0.0.1:9/enqueue"

[[receiver]]
name = "chat"
send_resolved = false
[[receiver.sink]]
type = "webhook"
url = "http://127.0.0.1:9/hook"
"""


def pipeline(text: str = CONFIG, clock: ManualClock | None = None) -> tuple[Pipeline, ManualClock]:
    """A pipeline on the test config with its own manual clock."""
    clock = clock or ManualClock(T0)
    return Pipeline(parse_gateway_config(text, "gw.toml"), clock), clock


def fps(n: Notification) -> tuple[list[str], list[str]]:
    """(firing fingerprints, resolved fingerprints) of a notification, sorted."""
    return sorted(a.fingerprint for a in n.firing), sorted(a.fingerprint for a in n.resolved)


def settle(p: Pipeline, notes: list[Notification]) -> list[Notification]:
    """Mark notifications delivered, as the service does after a successful send."""
    for n in notes:
        p.sent(n)
    return notes


# ------------------------------------------------------------------ validate and dedup
def test_dedup_by_fingerprint_and_status_and_invalid_kinds_counted() -> None:
    p, _ = pipeline()
    first = make_alert("a")
    assert p.ingest(first.to_json()).outcome == "accepted"
    again = make_alert("a")  # another message id, same series and status
    assert p.ingest(again.to_json()).outcome == "duplicate"
    assert p.ingest(make_alert("a", status="resolved", at=T0 + 5).to_json()).outcome == "accepted"
    # an older message of the series arriving late is stale, not a new firing
    assert p.ingest(make_alert("a", at=T0 - 60).to_json()).outcome == "stale"
    assert p.ingest(b"{not json").outcome == "invalid.json"
    assert p.ingest(b'{"schema": 1}').outcome == "invalid.schema"
    assert p.ingest(b" " * (300 * 1024)).outcome == "invalid.size"
    assert p.stats["accepted"] == 2 and p.stats["duplicate"] == 1 and p.stats["stale"] == 1
    assert p.stats["invalid.json"] == 1 and p.stats["invalid.schema"] == 1
    assert p.stats["invalid.size"] == 1 and p.stats["received"] == 7


# ------------------------------------------------------------------ grouping and timing
def test_group_wait_then_group_interval_then_repeat_interval_exactly() -> None:
    p, clock = pipeline()
    p.ingest_alert(make_alert("a"))
    clock.advance(4)
    p.ingest_alert(make_alert("b", stage="host"))  # same target: same group
    assert p.next_flush_at() == T0 + 10
    clock.t = T0 + 9.999
    assert p.due() == []
    clock.t = T0 + 10
    notes = settle(p, p.due())
    assert [(n.receiver, fps(n)) for n in notes] == [("default", (["a", "b"], []))]
    assert notes[0].group_labels == {"host": "gpu-node-1", "target": "vllm", "pid": "4242"}
    # a new alert in a flushed group waits for the next group_interval tick
    clock.t = T0 + 20
    p.ingest_alert(make_alert("c", stage="memcpy"))
    assert p.next_flush_at() == T0 + 70
    clock.t = T0 + 69.9
    assert p.due() == []
    clock.t = T0 + 70
    notes = settle(p, p.due())
    assert [fps(n) for n in notes] == [(["a", "b", "c"], [])]
    # nothing new: silent at each interval until repeat_interval (10 min) since the last send
    for tick in range(1, 10):
        clock.t = T0 + 70 + 60 * tick
        assert p.due() == [], tick
    clock.t = T0 + 70 + 600
    notes = settle(p, p.due())
    assert [fps(n) for n in notes] == [(["a", "b", "c"], [])]


def test_other_targets_make_other_groups() -> None:
    p, clock = pipeline()
    p.ingest_alert(make_alert("a", pid=1))
    p.ingest_alert(make_alert("b", pid=2))
    clock.advance(10)
    notes = p.due()
    assert sorted(fps(n)[0][0] for n in notes) == ["a", "b"] and len(notes) == 2


def test_resolved_is_sent_once_and_only_for_what_was_paged() -> None:
    p, clock = pipeline()
    p.ingest_alert(make_alert("a"))
    clock.advance(10)
    settle(p, p.due())
    clock.advance(1)
    p.ingest_alert(make_alert("a", status="resolved", at=T0 + 11))
    p.ingest_alert(make_alert("never-paged", status="resolved", at=T0 + 11))
    clock.t = T0 + 70
    notes = settle(p, p.due())
    assert [(n.status, fps(n)) for n in notes] == [("resolved", ([], ["a"]))]
    clock.advance(3600)
    assert p.due() == [] and p.groups == {}


def test_failed_send_is_retried_at_next_interval_and_not_duplicated_while_in_flight() -> None:
    p, clock = pipeline()
    p.ingest_alert(make_alert("a"))
    clock.advance(10)
    [note] = p.due()
    clock.advance(60)
    assert p.due() == []  # still in flight: not issued twice
    p.failed(note)
    clock.advance(60)
    [again] = p.due()
    assert fps(again) == (["a"], [])
    assert p.stats["notifications.failed"] == 1


def test_restart_with_the_notification_log_does_not_repage() -> None:
    p, clock = pipeline()
    p.ingest_alert(make_alert("a"))
    clock.advance(10)
    settle(p, p.due())
    # a new process: same nflog, the firing alert restored, the publisher repeats it
    clock.advance(120)
    q = Pipeline(p.config, clock, nflog=p.nflog)
    q.restore([make_alert("a")])
    assert q.ingest_alert(make_alert("a")) == "duplicate"
    clock.advance(10)
    assert q.due() == []
    clock.t = T0 + 10 + 600  # repeat_interval since the first page
    assert [fps(n) for n in q.due()] == [(["a"], [])]


# ------------------------------------------------------------------ inhibit and silence
def test_firing_critical_inhibits_warnings_of_the_same_target_only() -> None:
    p, clock = pipeline()
    p.ingest_alert(make_alert("crit", severity="critical", stage="host"))
    p.ingest_alert(make_alert("warn-same", severity="warning"))
    p.ingest_alert(make_alert("err-same", severity="error", stage="memcpy"))
    p.ingest_alert(make_alert("warn-other", severity="warning", pid=777))
    clock.advance(10)
    notes = settle(p, p.due())
    by_receiver = {(n.receiver, n.group_labels["pid"]): fps(n)[0] for n in notes}
    assert by_receiver == {
        ("pager", "4242"): ["crit"],
        ("default", "4242"): ["err-same"],  # the warning is muted, the error is not
        ("default", "777"): ["warn-other"],
    }
    assert p.stats["inhibited"] == 1
    # the critical resolves: the warning is no longer muted and pages at the next tick
    p.ingest_alert(make_alert("crit", severity="critical", stage="host", status="resolved",
                              at=T0 + 30))
    clock.advance(60)
    notes = p.due()
    default = [n for n in notes if n.receiver == "default" and n.group_labels["pid"] == "4242"]
    assert [fps(n) for n in default] == [(["err-same", "warn-same"], [])]
    pager = [n for n in notes if n.receiver == "pager"]
    assert [(n.status, fps(n)) for n in pager] == [("resolved", ([], ["crit"]))]


def test_silences_mute_while_active_even_after_a_page() -> None:
    p, clock = pipeline()
    silence = Silence("s1", (parse_matcher("stage=device_sync"),), T0, T0 + 300, "me", "")
    p.set_silences([silence])
    p.ingest_alert(make_alert("muted"))
    p.ingest_alert(make_alert("loud", stage="host"))
    clock.advance(10)
    assert [fps(n) for n in settle(p, p.due())] == [(["loud"], [])]
    assert p.stats["silenced"] == 1
    clock.t = T0 + 310  # silence over: the muted alert is news, it pages at the next tick
    assert [fps(n) for n in settle(p, p.due())] == [(["loud", "muted"], [])]
    # a silence added later mutes the repeats too; all muted → nothing is sent at all
    p.set_silences([Silence("s2", (parse_matcher("host=~gpu-node-.*"),), clock.t,
                            clock.t + 3600, "me", "maintenance")])
    clock.advance(1200)
    assert p.due() == []


# ------------------------------------------------------------------ routing
def test_routing_tree_with_continue() -> None:
    p, _ = pipeline()

    def receivers(alert: Alert) -> list[str]:
        return [r.receiver for r in match_routes(p.config.route, alert)]

    assert receivers(make_alert(severity="warning")) == ["default"]
    assert receivers(make_alert(severity="critical")) == ["pager"]
    assert receivers(make_alert(severity="critical", labels={"team": "serving"})) == [
        "pager", "chat"]
    assert receivers(make_alert(labels={"team": "serving"})) == ["chat"]
    assert receivers(make_alert(host="gpu-node-8")) == ["chat"]
    route = match_routes(p.config.route, make_alert(host="gpu-node-8"))[0]
    assert route.timing.group_wait == 0 and route.timing.repeat_interval == 600
    assert route.group_by == ("host", "target", "pid")


def test_critical_without_other_match_goes_to_pager_only_when_continue_finds_nothing() -> None:
    # continue=true lets the next siblings try; none match, so only the pager route holds
    p, _ = pipeline()
    routes = match_routes(p.config.route, make_alert(severity="critical"))
    assert [r.id for r in routes] == ["root.0"]


def test_send_resolved_false_sends_nothing_for_resolutions() -> None:
    p, clock = pipeline()
    p.ingest_alert(make_alert("a", host="gpu-node-7"))
    assert [fps(n) for n in settle(p, p.due())] == [(["a"], [])]  # group_wait 0
    p.ingest_alert(make_alert("a", host="gpu-node-7", status="resolved", at=T0 + 1))
    clock.advance(60)
    assert p.due() == []
    assert p.groups == {}


# ------------------------------------------------------------------ retry
@pytest.mark.anyio
async def test_retry_only_recoverable_errors_with_backoff() -> None:
    class Flaky:
        name = "flaky"

        def __init__(self, errors: list[SinkError]) -> None:
            self.errors = errors
            self.calls = 0

        async def send(self, notification: Notification) -> None:
            self.calls += 1
            if self.errors:
                raise self.errors.pop(0)

    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    note = Notification("r", 0, "g", {}, (make_alert(),), (), T0)
    policy = RetryPolicy(attempts=4, initial_backoff_s=0.5, max_backoff_s=1.5)
    flaky = Flaky([SinkError("503", recoverable=True),
                   SinkError("429", recoverable=True, retry_after=1.2),
                   SinkError("timeout", recoverable=True)])
    assert await send_with_retry(flaky, note, policy, sleep, jitter=lambda: 1.0) == 4
    assert slept == [0.5, 1.2, 1.5]
    slept.clear()
    bad = Flaky([SinkError("400", recoverable=False)])
    with pytest.raises(SinkError, match="400"):
        await send_with_retry(bad, note, policy, sleep, jitter=lambda: 1.0)
    assert bad.calls == 1 and slept == []
    down = Flaky([SinkError("refused", recoverable=True) for _ in range(10)])
    with pytest.raises(SinkError, match="refused"):
        await send_with_retry(down, note, policy, sleep, jitter=lambda: 1.0)
    assert down.calls == 4 and slept == [0.5, 1.0, 1.5]


# ------------------------------------------------------------------ configuration
def test_defaults_and_durations() -> None:
    config = GatewayConfig()
    assert config.route.receiver == "stdout" and config.broker.topic == "latencyprism/v1/+/+/alert"
    assert [str(m) for m in config.inhibit[0].source] == ["severity=critical"]
    assert parse_duration("1h30m") == 5400 and parse_duration("500ms") == 0.5
    with pytest.raises(ValueError):
        parse_duration("soon")


@pytest.mark.parametrize(("text", "expected"), [
    ("[route]\nreceiver = \"x\"\ngroup_wait = [", "gw.toml:3: invalid TOML"),
    ("[route]\nreceiver = \"default\"\ngroup_wiat = \"1s\"\n",
     "gw.toml:3: route.group_wiat: unknown key (did you mean 'group_wait'?)"),
    ("[route]\nreceiver = \"nobody\"\n", "gw.toml:2: route.receiver: no [[receiver]] named"),
    ("[route]\nreceiver = \"default\"\n\n[[route.routes]]\nmatchers = [\"sevrity=critical\"]\n",
     "gw.toml:5: route.routes[0].matchers[0]: unknown alert field 'sevrity'"),
    ("[[receiver]]\nname = \"a\"\n[[receiver.sink]]\ntype = \"pagerduty\"\n\n"
     "[[receiver]]\nname = \"b\"\n[[receiver.sink]]\ntype = \"webhook\"\nurl = \"ftp://x\"\n",
     "gw.toml:3: receiver[0].sink[0]: missing key 'routing_key'"),
    ("[[receiver]]\nname = \"b\"\n[[receiver.sink]]\ntype = \"webhook\"\nurl = \"ftp://x\"\n",
     "gw.toml:5: receiver[0].sink[0].url: must be an http:// or https:// URL"),
    ("[broker]\nurl = \"gopher://x\"\n", "gw.toml:2: broker.url: broker URL"),
    ("[[inhibit]]\nsource = [\"severity=critical\"]\n", "gw.toml:1: inhibit[0]: missing key"),
])
def test_malformed_config_is_one_line_with_file_and_line(text: str, expected: str) -> None:
    with pytest.raises(GatewayConfigError) as info:
        parse_gateway_config(text, "gw.toml")
    message = str(info.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_docs_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRISM_GATEWAY_MQTT_PASSWORD", "s3cret")
    monkeypatch.setenv("PAGERDUTY_ROUTING_KEY", "R0UT1NG")
    docs = Path(__file__).resolve().parent.parent / "docs" / "gateway.md"
    text = docs.read_text()
    start = text.index("```toml\n") + len("```toml\n")
    example = text[start:text.index("```", start)]
    config = parse_gateway_config(example, "docs/gateway.md")
    assert config.route.routes and config.receivers and config.inhibit
    kinds = {s.kind for r in config.receivers.values() for s in r.sinks}
    assert kinds == {"pagerduty", "webhook", "exec", "file", "stdout"}
    assert config.broker.credentials == ("gateway", "s3cret")
    nested = config.route.routes[1].routes[0]
    assert nested.receiver == "nccl-script" and nested.timing.group_wait == 10
    monkeypatch.delenv("PAGERDUTY_ROUTING_KEY")
    with pytest.raises(GatewayConfigError, match="PAGERDUTY_ROUTING_KEY is not set"):
        parse_gateway_config(example, "docs/gateway.md")


def test_matchers() -> None:
    alert = make_alert(labels={"team": "serving"})
    assert parse_matcher("labels.team=serving").matches(alert)
    assert parse_matcher("host=~gpu-node-[0-9]+").matches(alert)
    assert not parse_matcher("host=~gpu").matches(alert)  # anchored, as in Alertmanager
    assert parse_matcher("severity!=critical").matches(alert)
    assert parse_matcher("pid!~9.*").matches(alert)
    assert Matcher.from_dict(parse_matcher('target="vllm"').to_dict()).matches(alert)
    for bad in ("severity", "colour=red", "host=~("):
        with pytest.raises(GatewayConfigError):
            parse_matcher(bad)

