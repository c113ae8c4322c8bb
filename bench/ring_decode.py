"""Decoding throughput of ``PerfRing.decode`` on one core, in events per second.

Real records are produced first: a uprobe on ``pl_work`` of the C target (captures: none,
three argument registers, 32 bytes of stack, or both), ``work N`` in batches, each batch
drained with ``ring.read_raw()`` into a list of byte chunks. Then ``ring.decode(chunk)`` is
timed over all chunks, several times, interleaved with the variants below (best run kept),
which isolates decoding from the kernel and the target. The goal is ≥ 500k events/s.

Two variants of the decoder, defined here only (``probes/perf.py`` is not changed), show
what a change in ``PerfRing.decode`` would gain; their output is checked equal to
``decode``'s:

* ``cached regs Struct``: the one-line change: a precompiled ``struct.Struct`` per
  register count instead of ``struct.unpack_from(f"<{n}Q", ...)`` per record, which
  formats a string and looks it up in struct's cache every time;
* ``one Struct per event``: a precompiled Struct per event id that unpacks the fixed
  part, the registers and the stack size of a record in one call.

Run: ``.venv/bin/python bench/ring_decode.py [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from probe_cost import CTarget, build_ctarget

from probes.perf import (
    PERF_RECORD_SAMPLE,
    EventSpec,
    PerfRing,
    Sample,
    open_uprobe,
    registers_for,
)
from probes.symbols import resolve

GOAL = 500_000
_HEADER = struct.Struct("<IHH")
_FIXED = struct.Struct("<QIIQ")
_U64 = struct.Struct("<Q")

Decoder = Callable[[PerfRing, bytes], list[Sample]]


@cache
def _regs_struct(nregs: int) -> struct.Struct:
    return struct.Struct(f"<{nregs}Q")


def decode_cached_regs(ring: PerfRing, data: bytes) -> list[Sample]:
    """``PerfRing.decode`` (samples only) with a precompiled Struct per register count."""
    out: list[Sample] = []
    append = out.append
    layouts = ring.layouts
    header = _HEADER.unpack_from
    fixed = _FIXED.unpack_from
    u64 = _U64.unpack_from
    pos, n = 0, len(data)
    while pos + 8 <= n:
        rtype, _misc, rsize = header(data, pos)
        if rsize < 8:
            break
        if rtype == PERF_RECORD_SAMPLE:
            eid, pid, tid, t = fixed(data, pos + 8)
            layout = layouts.get(eid)
            regs: tuple[int, ...] = ()
            stack: bytes | None = None
            if layout is not None:
                p = pos + 32
                if layout.nregs:
                    abi = u64(data, p)[0]
                    p += 8
                    if abi:
                        regs = _regs_struct(layout.nregs).unpack_from(data, p)
                        p += 8 * layout.nregs
                if layout.stack_bytes:
                    ssize = u64(data, p)[0]
                    p += 8
                    if ssize:
                        dyn = u64(data, p + ssize)[0]
                        stack = data[p: p + min(ssize, dyn)]
            append((eid, pid, tid, t, regs, stack))
        pos += rsize
    return out


def decode_one_struct(ring: PerfRing, data: bytes) -> list[Sample]:
    """Samples decoded with one precompiled Struct per event id (fixed part+regs+stack size).

    Falls back to :func:`decode_cached_regs` for a record that does not have the expected
    shape (registers not captured: abi 0; stack not captured: size 0).
    """
    plans: dict[int, tuple[struct.Struct, int, int]] = {}
    for eid, layout in ring.layouts.items():
        abi_regs = "Q" * (1 + layout.nregs) if layout.nregs else ""
        fmt = "<QIIQ" + abi_regs + ("Q" if layout.stack_bytes else "")
        plans[eid] = (struct.Struct(fmt), layout.nregs, layout.stack_bytes)
    out: list[Sample] = []
    append, extend = out.append, out.extend
    header = _HEADER.unpack_from
    u64 = _U64.unpack_from
    pos, n = 0, len(data)
    while pos + 8 <= n:
        rtype, _misc, rsize = header(data, pos)
        if rsize < 8:
            break
        if rtype == PERF_RECORD_SAMPLE:
            plan = plans.get(u64(data, pos + 8)[0])
            if plan is None:
                extend(decode_cached_regs(ring, data[pos:pos + rsize]))
            else:
                st, nregs, stack_bytes = plan
                v = st.unpack_from(data, pos + 8)
                stack: bytes | None = None
                regs: tuple[int, ...]
                if nregs:
                    if not v[4]:
                        extend(decode_cached_regs(ring, data[pos:pos + rsize]))
                        pos += rsize
                        continue
                    regs = v[5:5 + nregs]
                else:
                    regs = ()
                if stack_bytes:
                    ssize = v[-1]
                    p = pos + 8 + st.size
                    if ssize:
                        dyn = u64(data, p + ssize)[0]
                        stack = data[p: p + min(ssize, dyn)]
                append((v[0], v[1], v[2], v[3], regs, stack))
        pos += rsize
    return out


def builtin_decode(ring: PerfRing, data: bytes) -> list[Sample]:
    """The decoder under test: ``PerfRing.decode``."""
    return ring.decode(data)


DECODERS: list[tuple[str, Decoder]] = [
    ("PerfRing.decode", builtin_decode),
    ("cached regs Struct (bench only)", decode_cached_regs),
    ("one Struct per event (bench only)", decode_one_struct),
]

CAPTURES: list[tuple[str, tuple[int, ...], int]] = [
    ("no registers", (), 0),
    ("3 registers", registers_for((1, 2, 3)), 0),
    ("32 bytes of stack", (), 32),
    ("3 registers + 32 bytes of stack", registers_for((1, 2, 3)), 32),
]


def produce(target: CTarget, exe: str, offset: int, regs: tuple[int, ...], stack: int,
            calls: int, batch: int) -> tuple[PerfRing, list[bytes]]:
    """Real records: ``calls`` hits of the probe, drained raw after each batch."""
    ring = PerfRing(1024)
    spec = EventSpec(exe, offset, registers=regs, stack_bytes=stack)
    ring.add(open_uprobe(spec, target.pid, -1), spec)
    chunks: list[bytes] = []
    done = 0
    while done < calls:
        n = min(batch, calls - done)
        target.cmd(f"work {n}")
        chunks.append(ring.read_raw())
        done += n
    return ring, chunks


def time_decoder(decode: Decoder, ring: PerfRing, chunks: list[bytes], repeat: int) -> float:
    """Best wall time of decoding every chunk once, over ``repeat`` runs."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for chunk in chunks:
            decode(ring, chunk)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    """Produce records, time the decoders, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50k records, 3 runs")
    args = parser.parse_args()
    calls = 50_000 if args.quick else 200_000
    repeat = 3 if args.quick else 7
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="prism-bench-") as tmp:
        exe = build_ctarget(tmp)
        offset = resolve(exe, "pl_work")[0].probe_offset
        target = CTarget(exe)
        try:
            for label, regs, stack in CAPTURES:
                ring, chunks = produce(target, exe, offset, regs, stack, calls, 20_000)
                try:
                    reference = [s for c in chunks for s in ring.decode(c)]
                    assert len(reference) == calls, (len(reference), calls)
                    assert ring.stats.lost == 0
                    size = sum(len(c) for c in chunks) // calls
                    best = dict.fromkeys([name for name, _ in DECODERS], float("inf"))
                    for name, decode in DECODERS:
                        got = [s for c in chunks for s in decode(ring, c)]
                        assert got == reference, f"{name} decodes differently"
                    for _ in range(repeat):  # decoders interleaved, so drift hits all alike
                        for name, decode in DECODERS:
                            best[name] = min(best[name], time_decoder(decode, ring, chunks, 1))
                    reference_s = best[DECODERS[0][0]]
                    for name, _ in DECODERS:
                        rate = calls / best[name]
                        rows.append(f"| {label} | {size} | {name} | {rate:,.0f} "
                                    f"| {reference_s / best[name]:.2f} | {rate / GOAL:.2f} "
                                    f"| {'yes' if rate >= GOAL else 'NO'} |")
                finally:
                    ring.close()
        finally:
            target.close()
    print(f"Decoding throughput, one core, best of {repeat} runs over {calls:,} real records "
          f"({platform.node()}, {os.cpu_count()} CPUs, kernel {platform.release()}, "
          f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')})")
    print()
    print("| records | bytes/record | decoder | events/s | speed vs PerfRing.decode "
          "| ratio to goal (500k/s) | meets goal |")
    print("|---|---:|---|---:|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
