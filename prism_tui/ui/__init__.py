"""The Textual dashboard: consumes the engine's immutable :class:`EngineView` snapshots.

Import :class:`prism_tui.ui.app.PrismApp` from its module; this package imports nothing
heavy on its own so ``prism_tui.ui.control`` stays cheap for the engine side to implement.
"""
