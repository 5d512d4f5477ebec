"""Breaker stage: traces.signed -> traces.outbox, gated by one circuit breaker per panel endpoint.

Every replica follows all of delivery.outcomes (outside its consumer group) and feeds it to the
pure state machine in pipeline/delivery/breaker.py, so replicas agree (the gate, shared with the
deliver stage, is pipeline/delivery/gate.py). While a breaker is open, `hold` blocks the
partition on the held trace: nothing past it is acknowledged or committed, and the wait shows
as consumer lag on traces.signed. `drop` records a `circuit_open` outcome instead.
"""

from __future__ import annotations

from typing import Any

import faust

from agents.runtime import Sinks, bind, breaker_gate, make_app
from agents.stage import Meta, Out
from pipeline.config import Config
from pipeline.delivery.breaker import Verdict
from pipeline.delivery.gate import BreakerGate, Role
from pipeline.errors import RecordError
from pipeline.topics import STAGES

STAGE = "breaker"


class BreakerStage:
    """Passes a signed trace on to traces.outbox when its endpoint's breaker admits it (as
    itself or as the probe), waits while the breaker holds, and forwards nothing it drops."""

    def __init__(self, config: Config, gate: BreakerGate) -> None:
        self.panel_url, self.gate = config.panel_url, gate

    async def handle(self, record: dict[str, Any], meta: Meta) -> list[Out]:
        endpoint = record["endpoint"]
        if endpoint != self.panel_url:  # endpoints come from configuration, never from a record
            raise RecordError("unknown_endpoint", "the record names an endpoint that is not the configured panelUrl")
        if await self.gate.admit(endpoint, record["trace_id"]) is Verdict.DROP:
            return []
        return [Out("traces.outbox", record["trace_id"], record)]


def build(config: Config, **app_overrides: Any) -> faust.App:
    app = make_app(STAGE, config, **app_overrides)
    sinks = Sinks(app, config, STAGES[STAGE])
    gate = breaker_gate(app, config, sinks, STAGE, Role.ADMIT)
    bind(app, STAGE, config, BreakerStage(config, gate).handle, sinks=sinks)
    return app
