"""The ``prism gateway`` paging router: MQTT alerts → dedup, group, silence → sinks.

Stages live in :mod:`.pipeline` (pure, clock injected), configuration in :mod:`.config`,
delivery in :mod:`.sinks`, persistence in :mod:`.state`, the MQTT loop in :mod:`.service`
and the command line in :mod:`.cli`. See ``docs/gateway.md``.
"""

from alerting.gateway.cli import add_gateway_arguments, run_gateway_command
from alerting.gateway.config import GatewayConfig, load_gateway_config, parse_gateway_config
from alerting.gateway.errors import (
    BrokerRefusedError,
    GatewayConfigError,
    GatewayError,
    GatewayStateError,
)
from alerting.gateway.pipeline import ManualClock, Notification, Pipeline, Silence, SystemClock
from alerting.gateway.state import GatewayState

__all__ = [
    "BrokerRefusedError",
    "GatewayConfig",
    "GatewayConfigError",
    "GatewayError",
    "GatewayState",
    "GatewayStateError",
    "ManualClock",
    "Notification",
    "Pipeline",
    "Silence",
    "SystemClock",
    "add_gateway_arguments",
    "load_gateway_config",
    "parse_gateway_config",
    "run_gateway_command",
]
