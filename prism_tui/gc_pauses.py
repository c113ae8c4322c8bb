"""Keep CPython's cyclic garbage collector from pausing the monitor's loop for long.

A full collection walks every object the collector tracks. In a monitoring process that
is the imported libraries (~120k functions, dicts and cells: ~35 ms a pass on the dev
VM) plus whatever the engine keeps; the loop stops for the whole pass, and an alert
waits with it (~50–200 ms stalls measured in ``prism eval``, growing as the heap grew).
The engine keeps its long-lived data in forms the collector does not track (flat tuples
of numbers and strings); :func:`settle_for_the_loop` moves what exists at start-up into
the permanent generation, which collections skip.
"""

from __future__ import annotations

import gc
import importlib

PRELOADED = ("sklearn.ensemble", "sklearn.tree")
"""Modules the loop's thread would import later, in the middle of the run: unpickling
the first fitted baseline imports scikit-learn's estimators (~1 s holding the import
lock, in the thread that receives the fit)."""


def settle_for_the_loop() -> int:
    """Import what the loop will need, collect once, then freeze every surviving object.

    Frozen objects are never scanned again; their memory is still freed by reference
    counting when they go (only cycles among them would stay). Call it once, when
    start-up is done and before the loop starts judging. Returns the number frozen.
    """
    for name in PRELOADED:
        try:
            importlib.import_module(name)
        except ImportError:  # the engine runs without scikit-learn's extras
            continue
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
