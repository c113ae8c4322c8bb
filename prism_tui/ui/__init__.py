"""The Textual dashboard: draws immutable dashboard views
(:class:`~prism_tui.dashboard_view.DashboardView`: the engine's, composed by the live session).

Import :class:`prism_tui.ui.app.PrismApp` from its module; this package imports nothing
heavy on its own so ``prism_tui.ui.control`` stays cheap for the engine side to implement.
"""
