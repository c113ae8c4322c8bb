"""The eBPF probe backend on the real C target: the same spans as the perf backend,
every uprobe gone when it closes, the governor's lever, and the fallback to perf."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from prism_sim.scenario import parse_scenario
from prism_sim.server import SimServer
from prism_tui.engine.config import MonitorConfig, ProbingConfig, Subscribers
from prism_tui.engine.core import DetectionConfig
from prism_tui.engine.monitor import Monitor
from probes.backend import open_session
from probes.bpf.loader import OBJECT_PATH, BpfUnavailableError
from probes.bpf.session import BpfSession
from probes.catalog import Profile, load_profile, parse_profile
from probes.governor import HitCosts
from probes.placement import ProbeSite, place_profile
from probes.target import Target
from probes.uprobes import Span, UprobeSession
from tests.conftest import CTARGET_PROFILE, CTarget, breakpoints, open_fds

ROOT = Path(__file__).resolve().parent.parent
# the target's commands, each a different shape: entry-only, six registers and the
# return value, stack arguments, recursion, nesting, calls on threads created while
# attached, and a longjmp out of a recursion (returns that never come)
COMMANDS = ["work 5", "args6 1 2 3 4 5 6", "struct 7 8 9", "recurse 4", "nested 3",
            "threads 4 10 0", "escape 5 2", "work 3"]


@pytest.fixture(scope="module", autouse=True)
def bpf_object() -> Path:
    """The compiled program (``make bpf``); the tests fail, not skip, without it."""
    if not OBJECT_PATH.exists():
        pytest.fail(f"{OBJECT_PATH} is missing: run `make bpf` (clang, libbpf-dev)")
    return OBJECT_PATH


@pytest.fixture(scope="module")
def profile() -> Profile:
    escape = """
[[probe]]
id = "escape"
library = "exe"
symbol = "pl_escape"
stage = "host"
ret = true
[probe.args]
depth = "arg1"
"""
    return parse_profile(CTARGET_PROFILE + escape, "ctarget.toml")


def sites_of(target: CTarget, profile: Profile) -> list[ProbeSite]:
    return place_profile(Target(target.pid), profile, "deepdive").sites


def shape(spans: list[Span]) -> Counter[tuple[str, tuple[tuple[str, float], ...]]]:
    """The spans as a multiset of (probe, arguments): what both backends must agree on."""
    return Counter((s.probe, tuple(sorted(s.args.items()))) for s in spans)


Call = tuple[str, int, tuple[tuple[str, float], ...], int, int]
"""A span as (probe, thread, arguments, start place, end place): see :func:`calls`."""


def calls(spans: list[Span]) -> tuple[Counter[Call], dict[tuple[int, int], int]]:
    """The spans with each end point named by its place among its thread's events.

    Both backends stamp the same hits, and every stamp of one hit comes before any stamp
    of the thread's next hit, so the k-th event of a thread is the same hit in both: two
    backends that pair the same entry with the same return give equal multisets,
    whatever delays one hit's stamps (an interrupt, or the hypervisor taking the vCPU,
    between the two backends' handlers: seen up to 1.2 ms apart on this VM). Also
    returns each (thread, place)'s stamp, to compare the two backends' clocks.
    """
    stamps: dict[int, set[int]] = {}
    for s in spans:
        stamps.setdefault(s.tid, set()).update((s.start_ns, s.end_ns))
    place = {(tid, t): i for tid, ts in stamps.items() for i, t in enumerate(sorted(ts))}
    named = Counter((s.probe, s.tid, tuple(sorted(s.args.items())),
                     place[s.tid, s.start_ns], place[s.tid, s.end_ns]) for s in spans)
    return named, {(tid, i): t for (tid, t), i in place.items()}


def test_bpf_gives_the_perf_backends_spans(ctarget: CTarget, profile: Profile) -> None:
    """Both backends attached to the same process at once see every call of every
    command and pair each entry with the same return: the same spans (probe, arguments,
    thread, and which of the thread's events start and end each). Each hit's stamps from
    the two backends are close (median gap ≤ 50 µs per command; a single hit can be far
    apart when the thread is held up between the two handlers). Perf in ``cpu`` mode: in
    ``thread`` mode it misses threads that start and end between two reads, which the
    bpf backend's pid-filtered links cover from their first call."""
    sites = sites_of(ctarget, profile)
    with UprobeSession([Target(ctarget.pid)], sites, mode="cpu") as perf, \
            BpfSession([Target(ctarget.pid)], sites, urgent={"work"}) as bpf:
        for command in COMMANDS:
            ctarget.cmd(command)
            time.sleep(0.05)
            by_perf, by_bpf = perf.read(), bpf.read()
            assert by_bpf, command
            assert shape(by_bpf) == shape(by_perf), command
            perf_calls, perf_stamps = calls(by_perf)
            bpf_calls, bpf_stamps = calls(by_bpf)
            assert perf_calls == bpf_calls, command
            gaps = sorted(abs(perf_stamps[k] - bpf_stamps[k]) for k in perf_stamps)
            assert gaps[len(gaps) // 2] <= 50_000, (command, gaps)
        hits = bpf.kernel_hits()
        assert bpf.dropped() == 0
    assert hits["args6"] == 2 and hits["struct"] == 1
    assert hits["work"] == 5 + 4 * 10 + 3


SIM_SCENARIO = """
[scenario]
name = "bpf-vs-perf"
seed = 1
duration_s = 60

[topology]
ranks = 2
layers = 8
hidden = 4096

[[phase]]
start_s = 0
arrival_rate = 20.0
max_batch = 8
prompt = { dist = "uniform", min = 16, max = 64 }
output = { dist = "uniform", min = 50, max = 150 }
"""


def test_bpf_sees_every_span_perf_sees_on_the_simulator(tmp_path: Path) -> None:
    """The ``cuda`` and ``nccl`` sentinel probes on a simulator rank, both backends at
    once for 3 s: every span perf reads (probe, thread, captured arguments), bpf reads
    too; bpf may read more (perf's rings drop records when the reader is late)."""
    path = tmp_path / "s.toml"
    path.write_text(SIM_SCENARIO)
    by_perf: list[Span] = []
    by_bpf: list[Span] = []
    with SimServer(parse_scenario(SIM_SCENARIO, str(path)), metrics_port=None) as server:
        stop = threading.Event()
        runner = threading.Thread(target=server.run, args=(60, stop), daemon=True)
        runner.start()
        try:
            target = Target(server.rank_pids[0])
            sites = [s for name in ("cuda", "nccl")
                     for s in place_profile(target, load_profile(name), "sentinel").sites]
            with UprobeSession([target], sites, mode="cpu") as perf, \
                    BpfSession([target], sites, urgent={"stream_sync"}) as bpf:
                time.sleep(1)
                until = time.monotonic() + 3
                while time.monotonic() < until:
                    by_perf += perf.read()
                    by_bpf += bpf.read()
                    time.sleep(0.02)
        finally:
            stop.set()
            runner.join(10)
    # spans wholly inside the time both read (away from either's attach and detach)
    lo = max(min(s.start_ns for s in spans) for spans in (by_perf, by_bpf)) + 50_000_000
    hi = min(max(s.end_ns for s in spans) for spans in (by_perf, by_bpf)) - 50_000_000

    def inside(spans: list[Span]) -> Counter[tuple[object, ...]]:
        return Counter((s.probe, s.tid, tuple(sorted(s.args.items()))) for s in spans
                       if lo <= s.start_ns and s.end_ns <= hi)

    perf_seen, bpf_seen = inside(by_perf), inside(by_bpf)
    assert {k[0] for k in perf_seen} == {"all_reduce", "memcpy_async", "stream_sync"}
    assert perf_seen - bpf_seen == Counter()
    assert sum(bpf_seen.values()) >= sum(perf_seen.values()) > 500


def test_returns_that_never_come_do_not_pair(ctarget: CTarget, profile: Profile) -> None:
    """A longjmp out of five nested calls: only the catching frame and those above it
    return; their spans pair with their own entries (by frame), the others make none."""
    sites = [s for s in sites_of(ctarget, profile) if s.probe == "escape"]
    with BpfSession([Target(ctarget.pid)], sites) as bpf:
        ctarget.cmd("escape 5 2")
        time.sleep(0.05)
        spans = bpf.read()
    assert sorted(s.args["depth"] for s in spans) == [2, 3, 4, 5]
    by_depth = {s.args["depth"]: s for s in spans}
    for depth in (2, 3, 4):  # each inner call lies within the one that called it
        inner, outer = by_depth[depth], by_depth[depth + 1]
        assert outer.start_ns < inner.start_ns <= inner.end_ns < outer.end_ns


def test_close_leaves_no_uprobe_and_no_fd(ctarget: CTarget, profile: Profile) -> None:
    """While attached every site is a breakpoint in the target; once ``close`` returns
    none is, the monitor holds no fd more than before, and the target runs on."""
    sites = sites_of(ctarget, profile)
    before = open_fds()
    assert not any(breakpoints(ctarget.pid, sites).values())
    session = BpfSession([Target(ctarget.pid)], sites).open()
    installed = breakpoints(ctarget.pid, sites)
    assert set(installed) == {s.probe for s in sites} and all(installed.values())
    session.close()
    session.close()  # idempotent
    assert not any(breakpoints(ctarget.pid, sites).values())
    assert open_fds() == before
    assert ctarget.cmd("work 2") == 1 + 2


def test_a_full_ring_drops_and_counts(ctarget: CTarget, profile: Profile) -> None:
    """A one-page ring (32 records) and 1,000 calls before the first read: the spans
    that did not fit are counted as dropped, the kernel's hit count has every call, and
    the ring works again once read."""
    sites = [s for s in sites_of(ctarget, profile) if s.probe == "work"]
    with BpfSession([Target(ctarget.pid)], sites, ring_pages=1) as bpf:
        ctarget.cmd("work 1000")
        time.sleep(0.05)
        spans = bpf.read()
        assert 0 < len(spans) <= 4096 // 128
        assert bpf.dropped() == 1000 - len(spans)
        assert bpf.kernel_hits()["work"] == 1000
        ctarget.cmd("work 3")
        time.sleep(0.05)
        assert len(bpf.read()) == 3


def test_the_session_ends_when_its_target_exits(ctarget: CTarget, profile: Profile) -> None:
    """``deliver`` returns once the target has exited (noticed within a rescan), with
    every span it made before; closing afterwards is clean."""
    sites = sites_of(ctarget, profile)
    got: list[Span] = []

    async def watch(bpf: BpfSession) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, ctarget.cmd, "work 5")
        loop.call_later(0.4, ctarget.proc.stdin.write, "exit\n")  # type: ignore[union-attr]
        loop.call_later(0.4, ctarget.proc.stdin.flush)  # type: ignore[union-attr]
        await asyncio.wait_for(bpf.deliver(got.extend), 10)

    with BpfSession([Target(ctarget.pid)], sites) as bpf:
        asyncio.run(watch(bpf))
        assert bpf.all_exited
    assert Counter(s.probe for s in got) == {"work": 5}


def test_batches_yield_every_span_and_end_when_the_target_exits(
        ctarget: CTarget, profile: Profile) -> None:
    """``batches`` (the escalation's path, the perf session's delivery code) yields the
    spans as the ring is drained, and ends by itself once the target has exited."""
    sites = sites_of(ctarget, profile)
    got: list[Span] = []

    async def watch(bpf: BpfSession) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, ctarget.cmd, "work 5")
        loop.call_later(0.3, ctarget.cmd, "work 3")
        loop.call_later(0.5, ctarget.proc.stdin.write, "exit\n")  # type: ignore[union-attr]
        loop.call_later(0.5, ctarget.proc.stdin.flush)  # type: ignore[union-attr]

        async def drain() -> None:
            async for batch in bpf.batches():
                assert batch  # an empty drain yields nothing
                got.extend(batch)

        await asyncio.wait_for(drain(), 10)

    with BpfSession([Target(ctarget.pid)], sites) as bpf:
        asyncio.run(watch(bpf))
        assert bpf.all_exited
    assert Counter(s.probe for s in got) == {"work": 8}


def test_detach_and_reattach_one_site(ctarget: CTarget, profile: Profile) -> None:
    """The governor's lever: a detached site records nothing and is no longer a
    breakpoint once its links close; reattached, it records again. Other sites go on."""
    sites = sites_of(ctarget, profile)
    index = next(i for i, s in enumerate(sites) if s.probe == "work")
    with BpfSession([Target(ctarget.pid)], sites) as bpf:
        bpf.detach_site(index)
        deadline = time.monotonic() + 5
        while bpf.stats.closes_done < bpf.stats.closes_queued and time.monotonic() < deadline:
            time.sleep(0.01)
        assert breakpoints(ctarget.pid, [sites[index]]) == {"work": False}
        ctarget.cmd("work 4")
        ctarget.cmd("args6 1 1 1 1 1 1")
        time.sleep(0.05)
        assert Counter(s.probe for s in bpf.read()) == {"args6": 1}
        bpf.reattach_site(index)
        ctarget.cmd("work 4")
        time.sleep(0.05)
        assert Counter(s.probe for s in bpf.read()) == {"work": 4}


def test_the_monitor_cuts_iterations_from_bpf_spans(ctarget: CTarget) -> None:
    """``Monitor`` with the ``bpf`` backend on a target iterating every 2 ms: iterations reach the
    engine (the anchor's spans wake the reader) and nothing is said about a fallback."""
    profile = parse_profile(CTARGET_PROFILE, "ctarget")
    ctarget.cmd("spin_start 2000")
    ends: list[int] = []
    with Monitor([Target(ctarget.pid)], profile,
                 detection=DetectionConfig(warmup=100_000),
                 probing=ProbingConfig(backend="bpf"),
                 config=MonitorConfig(escalation_s=0, telemetry=False),
                 subscribers=Subscribers(observation=lambda obs: ends.append(obs.iteration.end_ns))
                 ) as monitor:
        sessions = [type(att.session) for att in monitor._attached.values()]
        asyncio.run(monitor.run(1.0))
        notices = list(monitor.engine._notices)
    assert sessions == [BpfSession]
    assert len(ends) > 50 and ends == sorted(ends)
    assert not any("probe backend" in n for n in notices)


@pytest.mark.parametrize("backend", ["bpf", "perf"])
def test_the_governor_costs_a_session_with_its_backends_hits(ctarget: CTarget,
                                                             backend: str) -> None:
    """The governor and the view's probe cost use the hit costs of the session's own
    backend: a bpf session gets the bpf calibration (one wake-up per urgent span), a
    perf session the perf one; neither is costed as the other."""
    bpf_costs = HitCosts(700.0, 9000.0, 600.0, 5000.0, backend="bpf")
    costs = HitCosts(1000.0, 20000.0, 1000.0, 12000.0, bpf=bpf_costs)
    own = bpf_costs if backend == "bpf" else costs
    # the anchor with its return: perf's two records a call against bpf's one span
    profile = parse_profile(CTARGET_PROFILE.replace('symbol = "pl_work"\n',
                                                    'symbol = "pl_work"\nret = true\n'),
                            "ctarget")
    ctarget.cmd("spin_start 2000")
    with Monitor([Target(ctarget.pid)], profile,
                 detection=DetectionConfig(warmup=100_000),
                 probing=ProbingConfig(backend=backend, overhead_budget=0.5, costs=costs),
                 config=MonitorConfig(escalation_s=0, telemetry=False)) as monitor:
        asyncio.run(monitor.run(1.0))
        (att,) = monitor._attached.values()
        assert att.session.backend == backend
        assert att.governor is not None and att.governor.costs is own
        anchor = next(i for i, s in enumerate(att.session.sites) if s.probe == "work")
        assert att.governor.site_cost_ns(anchor) == own.site_cost_ns(
            att.session.sites[anchor].site, True, urgent=True)
        hits = {"work": 2000}  # 1,000 calls of the anchor in one second
        pct = monitor.governing.overhead_pct(att, hits, 1.0)
        assert pct == pytest.approx(100 * 1000 * own.site_cost_ns(
            att.session.sites[anchor].site, True, urgent=True) / 1e9)


FALLBACK = """
import json, sys
from probes.backend import open_session
from probes.bpf.loader import BpfUnavailableError
from probes.catalog import parse_profile
from probes.placement import place_profile
from probes.target import Target
from tests.conftest import CTARGET_PROFILE
pid = int(sys.argv[1])
sites = place_profile(Target(pid), parse_profile(CTARGET_PROFILE, "c.toml"), "sentinel").sites
session, why = open_session([Target(pid)], sites, backend="auto")
out = {"session": type(session).__name__, "why": why}
session.close()
try:
    open_session([Target(pid)], sites, backend="bpf")
except BpfUnavailableError as exc:
    out["bpf"] = str(exc)
print(json.dumps(out))
"""


def test_auto_falls_back_to_perf_with_one_line(ctarget: CTarget, tmp_path: Path) -> None:
    """A checkout where ``make bpf`` was not run (the packages copied without the
    compiled program): ``auto`` opens the perf backend and says why in one line that
    names the fix; ``bpf`` refuses with the same reason."""
    for package in ("probes", "prism_common", "tests"):
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("*.o", "__pycache__"))
    assert not (tmp_path / "probes" / "bpf" / "spans.bpf.o").exists()
    proc = subprocess.run([sys.executable, "-c", FALLBACK, str(ctarget.pid)], cwd=tmp_path,
                          env={"PYTHONPATH": str(tmp_path)}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["session"] == "UprobeSession"
    assert out["why"].startswith("probe backend: perf, as eBPF is unavailable: ")
    assert "make bpf" in out["why"] and "\n" not in out["why"]
    assert "make bpf" in out["bpf"]


def test_watch_says_the_fallback_in_one_line(ctarget: CTarget, tmp_path: Path) -> None:
    """``prism watch`` from that checkout (``probe.backend`` at its default, ``auto``):
    it monitors with perf and says once, in one line on stderr, why not eBPF; with
    ``bpf`` asked for, it stops with that line."""
    for package in ("probes", "prism_common", "prism_tui", "alerting", "prism_sim"):
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("*.o", "__pycache__"))
    profile = tmp_path / "ctarget.toml"
    profile.write_text(CTARGET_PROFILE)
    ctarget.cmd("spin_start 2000")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PRISM_")},
           "PYTHONPATH": str(tmp_path), "HOME": str(tmp_path)}
    watch = [sys.executable, "-m", "prism_tui.cli", "watch", "--pid", str(ctarget.pid),
             "--profile", str(profile), "--headless", "--no-history", "--duration", "3"]
    proc = subprocess.run(watch, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr
    said = [line for line in proc.stderr.splitlines() if "backend" in line]
    assert len(said) == 1, proc.stderr
    assert said[0].startswith("prism watch: probe backend: perf, as eBPF is unavailable: "
                              "no compiled BPF program"), said
    assert "Traceback" not in proc.stderr
    snapshots = [json.loads(line)["snapshot"] for line in proc.stdout.splitlines()
                 if line.startswith('{"snapshot"')]
    assert snapshots, proc.stdout
    # and each snapshot names the backend the target is watched with
    assert {t["backend"] for snap in snapshots for t in snap["targets"]} == {"perf"}
    # asked for by name, bpf is not replaced: one line, and no monitoring
    forced = subprocess.run(watch, cwd=tmp_path, env={**env, "PRISM_PROBE_BACKEND": "bpf"},
                            capture_output=True, text=True, timeout=240)
    lines = [line for line in forced.stderr.splitlines() if "hit costs" not in line]
    assert forced.returncode != 0 and len(lines) == 1, forced.stderr
    assert lines[0].startswith("prism watch: no compiled BPF program"), lines


def test_an_unknown_backend_is_refused(ctarget: CTarget) -> None:
    with pytest.raises(ValueError, match="unknown probe backend 'ebpf'"):
        open_session([Target(ctarget.pid)], [], backend="ebpf")


def test_bpf_refuses_stack_reads_past_its_buffer(ctarget: CTarget, profile: Profile) -> None:
    """A capture deeper in the stack than the program copies is refused up front (the
    ``auto`` backend then takes perf) rather than read as zeros."""
    deep = parse_profile(CTARGET_PROFILE.replace('sc = "stack+24:i64"', 'sc = "stack+40:i64"'),
                         "deep.toml")
    sites = [s for s in sites_of(ctarget, deep) if s.probe == "struct"]
    with pytest.raises(BpfUnavailableError, match="stack bytes"):
        BpfSession([Target(ctarget.pid)], sites)


def test_a_wake_gap_holds_back_urgent_spans_until_the_follow_up_read(
        ctarget: CTarget, profile: Profile) -> None:
    """``wake_gap_s``: an urgent span wakes the reader only a gap after the last
    wake-up; one held back is read by the follow-up read 1.5 gaps after that wake-up,
    never by the drain timer (30 s here), and none is lost."""
    sites = sites_of(ctarget, profile)
    got: list[tuple[float, Span]] = []
    sent: dict[str, float] = {}

    def burst(name: str, command: str) -> None:
        sent[name] = time.monotonic()
        ctarget.cmd(command)

    async def watch(bpf: BpfSession) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, burst, "a", "work 3")      # wakes the reader
        loop.call_later(0.5, burst, "b", "work 4")      # within the gap: held back
        with contextlib.suppress(TimeoutError):  # the drain timer never ticks: stop it
            await asyncio.wait_for(bpf.deliver(
                lambda spans: got.extend((time.monotonic(), s) for s in spans)), 4.0)

    with BpfSession([Target(ctarget.pid)], sites, urgent={"work"}, drain_interval_s=30.0,
                    wake_gap_s=1.0) as bpf:
        asyncio.run(watch(bpf))
    works = [(t, s) for t, s in got if s.probe == "work"]
    assert len(works) == 7, got
    first_read = min(t for t, _ in works)
    late = [t for t, s in works if s.start_ns >= sent["b"] * 1e9 - 1e6]
    assert len(late) == 4, works
    # not before the follow-up (1.5 s after the wake-up that read burst a), and long
    # before the drain timer
    assert min(late) >= first_read + 1.4, (first_read, late)
    assert max(late) < sent["b"] + 3.5, (sent, late)
