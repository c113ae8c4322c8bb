"""The LatencyPrism monitor: engine, history, dashboard and the `prism` command."""

__version__ = "0.1.0"
