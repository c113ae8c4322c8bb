"""Keep CPython's cyclic garbage collector from pausing the monitor's loop for long.

A full collection walks every object the collector tracks. In a monitoring process that
is the imported libraries (~120k functions, dicts and cells: ~35 ms a pass on the dev
VM) plus whatever the engine keeps; the loop stops for the whole pass, and an alert
waits with it (~50–200 ms stalls measured in ``prism eval``, growing as the heap grew).
The engine keeps its long-lived data in forms the collector does not track (flat tuples
of numbers and strings); :func:`freeze_heap` moves what exists at a quiet moment into
the permanent generation, which collections skip.
"""

from __future__ import annotations

import gc


def freeze_heap() -> int:
    """Move every object the collector tracks now into the permanent generation.

    Frozen objects are never scanned again; their memory is still freed by reference
    counting when they go (only cycles among them would stay). Cheap (no collection
    pass); call it when start-up is done and again once the first baseline model is in
    (unpickling it imports scikit-learn's estimators: thousands more objects). Returns
    the number frozen in all.
    """
    gc.freeze()
    return gc.get_freeze_count()


FLEET_THRESHOLDS = (10_000, 50, 100)
"""The collector's thresholds for ``prism fleet`` (CPython's defaults: 700, 10, 10)."""


def collect_rarely(thresholds: tuple[int, int, int] = FLEET_THRESHOLDS) -> None:
    """Collect the young generation every ``thresholds[0]`` net allocations and the
    older ones ``thresholds[1:]`` times less often than that.

    For a process whose objects are short-lived messages beside a large kept state
    (the fleet: 16,000 decoded windows a second at 1,000 hosts, each freed by reference
    counting within a second). With the default thresholds those windows survived into
    the old generation and a full collection, which walks every kept window's deque,
    ran every second or two for 0.1–0.3 s (62 in 70 s); with these none ran in 70 s
    and the young passes took at most 17 ms (``bench/fleet_scale.py``).
    """
    gc.set_threshold(*thresholds)
