"""Digest messages: size on the wire, and merged fleet quantiles vs the raw samples'.

Run: ``.venv/bin/python bench/digest_merge.py [--seeds 10] [--seconds 60]``

Two monitors (real :class:`~prism_tui.engine.core.Engine` instances, hosts ``a`` and
``b``, median iteration 10 ms and 14 ms, lognormal σ 0.25) each close one 1-s window per
second of one series; :class:`~prism_tui.digest_feed.DigestFeed` turns every window into
a digest message (encoded as on the wire), which is decoded and all entries of both
hosts merged with :func:`alerting.digests.merge_entries`. Printed per values-per-window
rate: the median message size and the relative error of the merged p50/p90/p99/p99.9
against ``numpy.quantile`` of all raw values (max and mean over the seeds). No broker:
the payload bytes are what the publisher sends (tests/test_digests.py sends them
through Mosquitto).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from alerting.digests import DigestEntry, decode, encode, merge_entries  # noqa: E402
from prism_tui.digest_feed import DigestFeed  # noqa: E402
from prism_tui.engine.core import Engine  # noqa: E402
from prism_tui.engine.sketches import ITERATION, SeriesKey  # noqa: E402

HOSTS = {"a": 10.0, "b": 14.0}
QUANTILES = (0.5, 0.9, 0.99, 0.999)


class _Wire:
    """What one host's feed published, encoded as the publisher sends it."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def publish(self, _key: str, doc: dict[str, Any]) -> None:
        """The feed's publish callback: keep the message's bytes."""
        self.messages.append(encode(doc))


def run(seed: int, per_window: int, seconds: int) -> tuple[list[float], list[DigestEntry],
                                                           list[int]]:
    """Both hosts' raw values, the decoded entries and the message sizes of one seed."""
    raw: list[float] = []
    entries: list[DigestEntry] = []
    sizes: list[int] = []
    for host, scale in HOSTS.items():
        # the windows are closed by feed.poll's own times: the engine's clock is not read
        engine = Engine(host=host, clock=lambda: 0)
        engine.watch(1, "vllm", "anchor", {}, device="cuda:0")
        wire = _Wire()
        feed = DigestFeed(engine, wire.publish)
        targets = engine.view().targets
        rng = random.Random(seed * 7 + len(host) + int(scale))
        key = SeriesKey(ITERATION, "cuda:0", "decode")
        step = 10**9 // per_window // 2
        for second in range(seconds):
            for i in range(per_window):
                value = scale * rng.lognormvariate(0, 0.25)
                raw.append(value)
                engine.sketches.add(key, second * 10**9 + i * step, value)
            feed.poll(targets, (second + 2) * 10**9)
        sizes += [len(m) for m in wire.messages]
        entries += [e for m in wire.messages for e in decode(m).entries]
    return raw, entries, sizes


def main() -> None:
    """Print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--seconds", type=int, default=60)
    args = ap.parse_args()
    print(f"{len(HOSTS)} hosts × {args.seconds} windows, {args.seeds} seeds\n")
    print("| values per window | message bytes (median) | "
          + " | ".join(f"p{q * 100:g} error max / mean" for q in QUANTILES) + " |")
    print("|---|---|" + "---|" * len(QUANTILES))
    for per_window in (50, 400):
        errors: dict[float, list[float]] = {q: [] for q in QUANTILES}
        sizes: list[int] = []
        for seed in range(args.seeds):
            raw, entries, sz = run(seed, per_window, args.seconds)
            sizes += sz
            merged = merge_entries(entries)
            assert merged is not None and merged.n_values == len(raw)
            for q in QUANTILES:
                truth = float(np.quantile(raw, q))
                errors[q].append(abs(merged.quantile(q) - truth) / truth)
        cells = " | ".join(f"{max(errors[q]):.2%} / {statistics.fmean(errors[q]):.2%}"
                           for q in QUANTILES)
        print(f"| {per_window} | {int(statistics.median(sizes)):,} | {cells} |")


if __name__ == "__main__":
    main()
