"""The monitor's engine: iterations, stages, sketches, detection and root-cause hints.

Nothing in this package imports Textual or the alerting package; the UI receives
immutable snapshots from it. ``core`` (the :class:`Engine`) and the modules it uses are
plain synchronous computation with time injected by the caller; ``monitor`` (with
``escalation`` and ``telemetry_poll``) is the I/O side: uprobe sessions, ``/proc``,
NVML, threads and executors for the blocking work.
"""
