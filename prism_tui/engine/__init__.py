"""The monitor's engine: iterations, stages, sketches, detection and root-cause hints.

Nothing in this package imports Textual; the UI receives immutable snapshots from it.
Blocking work (model fitting, ELF parsing, SQLite) is run by the runtime in executors;
the modules here are plain synchronous computation with time injected by the caller.
"""
