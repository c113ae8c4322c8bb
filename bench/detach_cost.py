"""What detaching costs: closing the perf events of the `cuda` + `nccl` profiles.

Attaches both profiles to the two ranks of the simulator (thread mode, as `prism demo`
does), then closes them three ways, side by side in one run: one fd after the other,
every fd from its own thread at once, and after the target processes were killed. The
kernel unregisters a uprobe with an RCU grace period per event, so the figure that
matters is milliseconds per event and whether anything makes it parallel.

The fourth row is the alternative: the same sites (entries and returns, every thread of
both ranks) as BPF ``uprobe_multi`` links, one per (rank, library, entry or return),
running a program that does nothing; closing a link unregisters all its uprobes and
waits for one grace period. It measures the kernel mechanism, not a probe backend: the
monitor does not use it yet (it would need a BPF program writing samples into a ring).

    .venv/bin/python bench/detach_cost.py
"""

from __future__ import annotations

import ctypes
import os
import signal
import struct
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
from probes.catalog import load_profile  # noqa: E402
from probes.placement import place_profile  # noqa: E402
from probes.target import Target  # noqa: E402
from probes.uprobes import UprobeSession  # noqa: E402

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

            def kill() -> None:
                stop.set()
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                time.sleep(0.5)

            _run("after the targets were killed", pids, _close_serial, kill)
            runner.join(10)


if __name__ == "__main__":
    main()
