"""Breaker stage: traces.signed -> traces.outbox, gated by one circuit breaker per panel endpoint.

Every replica follows all of delivery.outcomes (outside its consumer group) and feeds it to the
pure state machine in pipeline/delivery/breaker.py, so replicas agree. While a breaker is open, `hold`
blocks the partition on the held trace: nothing past it is acknowledged or committed, and the
wait shows as consumer lag on traces.signed. `drop` records a `circuit_open` outcome instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import faust

from agents.base import Meta, Out, Sinks, TopicFollower, bind, make_app
from pipeline import metrics
from pipeline.config import Config
from pipeline.delivery.breaker import BreakerRegistry, BreakerSettings, State, Verdict
from pipeline.errors import RecordError
from pipeline.model.outcomes import outcome, transition_outcome
from pipeline.model.records import decode
from pipeline.topics import STAGES

STAGE = "breaker"
OUTCOMES = "delivery.outcomes"
STATE_VALUE = {State.CLOSED: 0, State.HALF_OPEN: 1, State.OPEN: 2}
log = logging.getLogger(__name__)


def now_ms() -> int:
    return int(time.time() * 1000)


def breaker_settings(config: Config) -> BreakerSettings:
    b = config.breaker
    return BreakerSettings(failure_threshold=b.failure_threshold, failure_window_s=b.failure_window_s,
                           open_s=b.open_s, mode=b.mode)


def replay_horizon_ms(settings: BreakerSettings) -> int:
    """Only outcomes newer than the longest any of them can matter are replayed at start."""
    return int((settings.open_s + settings.failure_window_s + settings.probe_timeout_s) * 1000) * 2


def build(config: Config, **app_overrides: object) -> faust.App:
    app = make_app(STAGE, config, **app_overrides)
    settings = breaker_settings(config)
    registry = BreakerRegistry(settings)
    sinks = Sinks(app, config, STAGES[STAGE])

    async def apply(raw: bytes) -> None:
        try:
            transitions = registry.apply(decode(raw, OUTCOMES))
        except RecordError as exc:
            log.warning("skipping unusable outcome record: %s", exc)
            return
        for t in transitions:
            metrics.BREAKER_TRANSITIONS.labels(t.endpoint, str(t.to_state)).inc()
            log.warning("breaker %s: %s -> %s (%s)", t.endpoint, t.from_state, t.to_state, t.reason)
            if follower.ready.is_set():  # replayed history was reported when it happened
                await sinks.send(Out(OUTCOMES, t.endpoint, transition_outcome(t)))

    follower = TopicFollower(config, OUTCOMES, apply, replay_horizon_ms(settings))

    @app.task
    async def follow() -> None:
        await follower.run()

    def record_for(record: dict[str, Any], status: str, detail: dict[str, Any], probe: bool = False) -> Out:
        return Out(OUTCOMES, record["endpoint"], outcome(
            stage=STAGE, endpoint=record["endpoint"], status=status, trace_id=record["trace_id"], at=now_ms(),
            probe=probe, detail=detail))

    async def handle(record: dict[str, Any], meta: Meta) -> list[Out]:
        endpoint = record["endpoint"]
        if endpoint != config.panel_url:  # endpoints come from configuration, never from a record
            raise RecordError("unknown_endpoint", "the record names an endpoint that is not the configured panelUrl")
        await follower.ready.wait()
        held = False
        while True:
            admission = registry.admit(endpoint, now_ms())
            metrics.BREAKER_STATE.labels(endpoint).set(STATE_VALUE[admission.state])
            if admission.verdict is Verdict.PASS:
                return [Out("traces.outbox", record["trace_id"], record)]
            if admission.verdict is Verdict.PROBE:
                return [record_for(record, "probe", {"reason": admission.reason}, probe=True),
                        Out("traces.outbox", record["trace_id"], record)]
            if admission.verdict is Verdict.DROP:
                metrics.DELIVERY_OUTCOMES.labels(endpoint, "circuit_open").inc()
                return [record_for(record, "circuit_open", {"reason": admission.reason})]
            if not held:
                held = True
                metrics.DELIVERY_OUTCOMES.labels(endpoint, "held").inc()
                await sinks.send(record_for(record, "held", {"reason": admission.reason,
                                                             "until": admission.until_ms}))
                await sinks.drain()
                log.warning("breaker %s open: holding trace %s (partition %d)", endpoint, record["trace_id"],
                            meta.partition)
            wait_ms = (admission.until_ms or now_ms() + 1000) - now_ms()
            await asyncio.sleep(min(max(wait_ms / 1000, 0.05), 1.0))

    bind(app, STAGE, config, handle, sinks=sinks)
    return app
