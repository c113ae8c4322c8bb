"""What detaching costs: closing the perf events of the `cuda` + `nccl` profiles.

Attaches both profiles to the two ranks of the simulator (thread mode, as `prism demo`
does), then closes them three ways, side by side in one run: one fd after the other,
every fd from its own thread at once, and after the target processes were killed. The
kernel unregisters a uprobe with an RCU grace period per event, so the figure that
matters is milliseconds per event and whether anything makes it parallel.

The fourth row is the alternative: the same sites (entries and returns, every thread of
both ranks) as BPF ``uprobe_multi`` links, one per (rank, library, entry or return),
running a program that does nothing; closing a link unregisters all its uprobes and
waits for one grace period. The fifth is the monitor's eBPF backend itself
(``BpfSession``: its span program, one link per site entry and per site return, closed
from one thread per link), checked afterwards for a breakpoint left at any site.

The second table is what a user waits for: ``prism watch --pid RANK --headless`` of each
probe backend (``PRISM_PROBE_BACKEND``), interrupted once it shows data, timed from the
signal to the process's exit (it exits only once every probe is detached).

    .venv/bin/python bench/detach_cost.py   # needs `make bpf` for the bpf rows
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prism_sim.scenario import parse_scenario  # noqa: E402
from prism_sim.server import SimServer  # noqa: E402
from probes.bpf.session import BpfSession  # noqa: E402
from probes.catalog import load_profile  # noqa: E402
from probes.placement import ProbeSite, place_profile  # noqa: E402
from probes.target import Target  # noqa: E402
from probes.uprobes import UprobeSession  # noqa: E402

PRISM = [sys.executable, "-m", "prism_tui.cli"]

BPF_PROG_LOAD, BPF_LINK_CREATE = 5, 28
BPF_PROG_TYPE_KPROBE, BPF_TRACE_UPROBE_MULTI = 2, 48
BPF_F_UPROBE_MULTI_RETURN = 1
SYS_BPF = 321  # x86_64
_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    fd = _libc.syscall(SYS_BPF, cmd, attr, len(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return int(fd)


def _noop_program() -> int:
    """A kprobe-type program for uprobe_multi links: ``r0 = 0; exit``."""
    insns = bytes.fromhex("b700000000000000" "9500000000000000")
    code = ctypes.create_string_buffer(insns)
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIQQ", attr, 0, BPF_PROG_TYPE_KPROBE, len(insns) // 8,
                     ctypes.addressof(code), ctypes.addressof(license_))
    struct.pack_into("<16s", attr, 48, b"detach")
    struct.pack_into("<I", attr, 68, BPF_TRACE_UPROBE_MULTI)
    return _bpf(BPF_PROG_LOAD, attr)


def _uprobe_multi(prog: int, path: str, offsets: list[int], pid: int, ret: bool) -> int:
    """One link placing ``prog`` at every offset of ``path`` in process ``pid``."""
    c_path = ctypes.create_string_buffer(path.encode())
    c_offsets = (ctypes.c_uint64 * len(offsets))(*offsets)
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIII", attr, 0, prog, 0, BPF_TRACE_UPROBE_MULTI, 0)
    struct.pack_into("<QQQQIII", attr, 16, ctypes.addressof(c_path),
                     ctypes.addressof(c_offsets), 0, 0, len(offsets),
                     BPF_F_UPROBE_MULTI_RETURN if ret else 0, pid)
    return _bpf(BPF_LINK_CREATE, attr)

SCENARIO = """
[scenario]
name = "detach"
seed = 1
duration_s = 120

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


def _attach(pids: list[int]) -> list[UprobeSession]:
    sessions = []
    for pid in pids:
        target = Target(pid)
        sites = (place_profile(target, load_profile("cuda"), "sentinel").sites
                 + place_profile(target, load_profile("nccl"), "sentinel").sites)
        sessions.append(UprobeSession([target], sites, mode="thread").open())
    return sessions


def _fds(sessions: list[UprobeSession]) -> list[int]:
    return [fd for s in sessions for ring in [*s._rings.values(), *s._watchers.values()]
            for fd in ring.fds]


def _close_serial(sessions: list[UprobeSession]) -> None:
    for s in sessions:
        s.close()


def _close_parallel(sessions: list[UprobeSession]) -> None:
    fds = _fds(sessions)
    with ThreadPoolExecutor(len(fds)) as pool:
        list(pool.map(os.close, fds))
    for s in sessions:
        for ring in [*s._rings.values(), *s._watchers.values()]:
            ring.fds.clear()
        s.close()


def _run_multi(pids: list[int]) -> None:
    """Attach the same sites as uprobe_multi links, then close every link at once."""
    prog = _noop_program()
    links, sites_n = [], 0
    for pid in pids:
        target = Target(pid)
        sites = (place_profile(target, load_profile("cuda"), "sentinel").sites
                 + place_profile(target, load_profile("nccl"), "sentinel").sites)
        groups: dict[tuple[str, bool], list[int]] = {}
        for site in sites:
            groups.setdefault((site.open_path, False), []).append(site.offset)
            if site.ret:
                groups.setdefault((site.open_path, True), []).append(site.offset)
        for (path, ret), offsets in groups.items():
            links.append(_uprobe_multi(prog, path, offsets, pid, ret))
            sites_n += len(offsets)
    time.sleep(1.0)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(links)) as pool:
        list(pool.map(os.close, links))
    dt = time.perf_counter() - t0
    os.close(prog)
    print(f"| uprobe_multi links ({len(links)} links, {sites_n} uprobes) | {sites_n} "
          f"| {dt:.2f} | {dt / sites_n * 1e3:.1f} |", flush=True)


def _sites(pid: int) -> list[ProbeSite]:
    target = Target(pid)
    return (place_profile(target, load_profile("cuda"), "sentinel").sites
            + place_profile(target, load_profile("nccl"), "sentinel").sites)


def _breakpoints_left(pid: int, sites: list[ProbeSite]) -> int:
    """Sites whose first byte in ``pid``'s memory is still an int3 (a uprobe)."""
    left = 0
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for site in sites:
            for line in maps:
                f = line.split()
                if len(f) >= 6 and int(f[4]) == site.inode:
                    lo, hi = (int(x, 16) for x in f[0].split("-"))
                    off = int(f[2], 16)
                    if off <= site.offset < off + hi - lo:
                        mem.seek(lo + site.offset - off)
                        left += mem.read(1) == b"\xcc"
                        break
    return left


def _run_bpf(pids: list[int]) -> None:
    """The eBPF backend's sessions on every rank, closed one after the other."""
    sites = {pid: _sites(pid) for pid in pids}
    sessions = [BpfSession([Target(pid)], sites[pid]).open() for pid in pids]
    time.sleep(1.0)
    uprobes = sum(s.stats.events_open for s in sessions)
    spans = sum(len(s.read()) for s in sessions)
    t0 = time.perf_counter()
    for s in sessions:
        s.close()
    dt = time.perf_counter() - t0
    left = sum(_breakpoints_left(pid, sites[pid]) for pid in pids)
    print(f"| BpfSession.close ({uprobes} links, {spans} spans read, {left} breakpoints "
          f"left) | {uprobes} | {dt:.2f} | {dt / uprobes * 1e3:.1f} |", flush=True)


def _quit_watch(pid: int, backend: str) -> tuple[float, str]:
    """Seconds from SIGINT to the exit of a ``prism watch`` that shows data."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PRISM_PROBE_BACKEND": backend}
    watch = subprocess.Popen([*PRISM, "watch", "--pid", str(pid), "--headless",
                              "--no-history"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert watch.stdout is not None and watch.stderr is not None
    said: list[str] = []  # its notices: one says when auto fell back to perf
    threading.Thread(target=lambda: said.extend(watch.stderr or []), daemon=True).start()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = watch.stdout.readline()
        if not line:
            raise RuntimeError(f"the {backend} watch ended before it showed data")
        if line.startswith('{"snapshot"') and json.loads(line)["snapshot"]["series"]:
            break
    threading.Thread(target=watch.stdout.read, daemon=True).start()
    time.sleep(2)
    t0 = time.perf_counter()
    watch.send_signal(signal.SIGINT)
    watch.wait(300)
    secs = time.perf_counter() - t0
    return secs, "; ".join(x.strip() for x in said if "probe backend" in x)


def _run(label: str, pids: list[int], close: Callable[[list[UprobeSession]], None],
         before: Callable[[], None] = lambda: None) -> None:
    sessions = _attach(pids)
    time.sleep(1.0)
    n = len(_fds(sessions))
    before()
    t0 = time.perf_counter()
    close(sessions)
    dt = time.perf_counter() - t0
    print(f"| {label} | {n} | {dt:.2f} | {dt / n * 1e3:.1f} |", flush=True)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "detach.toml"
        path.write_text(SCENARIO)
        print("| close | events | seconds | ms per event |\n|---|---:|---:|---:|")
        with SimServer(parse_scenario(SCENARIO, str(path)), metrics_port=None) as server:
            stop = threading.Event()
            runner = threading.Thread(target=server.run, args=(120, stop), daemon=True)
            runner.start()
            pids = list(server.rank_pids.values())
            _run("one after the other", pids, _close_serial)
            _run("all at once, one thread per fd", pids, _close_parallel)
            _run_multi(pids)
            _run_bpf(pids)
            print("\n| prism watch, one rank, backend | SIGINT → exit, s | notice |"
                  "\n|---|---:|---|", flush=True)
            for backend in ("perf", "bpf", "perf", "bpf"):
                secs, notice = _quit_watch(pids[0], backend)
                print(f"| {backend} | {secs:.2f} | {notice or '-'} |", flush=True)
            print(flush=True)

            def kill() -> None:
                stop.set()
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                time.sleep(0.5)

            _run("after the targets were killed", pids, _close_serial, kill)
            runner.join(10)


if __name__ == "__main__":
    main()
