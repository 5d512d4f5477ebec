"""Deliver stage: traces.outbox -> the panel. Every attempt is an outcome record; transient
failures are retried with backoff and jitter up to a maximum age; permanent refusals go to
traces.dead with the panel's answer.

The HMAC is recomputed with the current secret and a stale attestation re-minted over the same
body before each attempt: a trace held for minutes (breaker open, retries) would otherwise
reach the panel with an attestation past its 300 s window, and a dead letter redriven after a
secret rotation would carry the old signature.

Every attempt, the first included, also waits at the endpoint's breaker gate (pipeline/delivery/gate.py,
shared with the breaker stage), which this stage follows from delivery.outcomes like every
breaker replica: the breaker stage only gates what
enters traces.outbox, and without this gate the traces already past it (in flight, queued in
the outbox, retrying) kept hitting a failing panel for the whole open period, where the
contract ships nothing. While the breaker is open an attempt waits for the period to end; once
it is over one attempt per process goes as the probe (announced with a `probe` outcome, which
also holds off the breaker stage's probe) and the others wait for its verdict.

Past the gate, each attempt waits for a place under the endpoint's adaptive concurrency limit
(pipeline/delivery/concurrency.py). A 429 is the panel asking for less, not a failure: the
endpoint is paused for its Retry-After in every replica (a `throttled` outcome, which the
breaker does not count), the limit shrinks, and the trace goes again after the pause without
spending its retry budget: a throttled trace is never dead-lettered.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import faust
import httpx

from agents.runtime import Sinks, bind, breaker_gate, make_app
from agents.stage import Emitter, Meta, Out
from pipeline import metrics
from pipeline.clients.panel import PanelClient, PanelUnavailable
from pipeline.clock import Clock, SystemClock
from pipeline.config import Config
from pipeline.delivery.breaker import THROTTLED_HTTP, Verdict
from pipeline.delivery.concurrency import DEFAULT_PAUSE_S, EndpointLimiters, LimitSettings, Signal, signal_of
from pipeline.delivery.gate import OUTCOMES, BreakerGate, Role
from pipeline.delivery.outcomes import outcome
from pipeline.delivery.retry import RetryPolicy, classify_http
from pipeline.delivery.signing import attest, attestable_scrub, needs_refresh, sign
from pipeline.errors import RecordError
from pipeline.model.records import dead_letter
from pipeline.topics import STAGES

STAGE = "deliver"
OUTCOME_STATUS = {"success": "delivered", "transient": "failed", "permanent": "refused"}
log = logging.getLogger(__name__)


def panel_client(config: Config, clock: Clock) -> PanelClient:
    d = config.delivery
    timeout = httpx.Timeout(connect=d.connect_timeout_s, read=d.read_timeout_s, write=d.write_timeout_s,
                            pool=d.pool_timeout_s)
    return PanelClient(config.panel_url, timeout, clock=clock.time)


def delivery_limiters(config: Config, clock: Clock) -> EndpointLimiters:
    return EndpointLimiters(LimitSettings(max_limit=config.delivery.max_in_flight), clock, stage=STAGE)


class DeliverStage:
    """Posts each trace to the panel until it is accepted, refused for good (dead-lettered) or
    out of retry budget (dead-lettered), waiting at the breaker gate before every attempt.
    `outcomes` publishes each attempt's outcome at once: the breaker must see failures while
    this stage retries."""

    def __init__(self, config: Config, clock: Clock, gate: BreakerGate, outcomes: Emitter, client: PanelClient,
                 limiters: EndpointLimiters | None = None, rng: random.Random | None = None) -> None:
        config.panel_secret(config.site_key)  # fail at start, naming the variable
        d = config.delivery
        self.config, self.clock, self.gate, self.outcomes, self.client = config, clock, gate, outcomes, client
        self.limiters = limiters or delivery_limiters(config, clock)
        self.policy = RetryPolicy(base_s=d.retry_base_s, max_s=d.retry_max_s, max_age_s=d.max_age_s,
                                  max_attempts=d.max_attempts, rng=rng or random.Random())
        # where traces may go comes from configuration: a record naming any other endpoint is
        # dead-lettered, never sent (the site secret and a fresh attestation would go with it)
        self.endpoints = frozenset({config.panel_url})
        self.jwt = config.scrubber_jwt_secret
        self.refresh_s = d.attestation_refresh_s

    async def handle(self, record: dict[str, Any], meta: Meta) -> list[Out]:
        config, clock, jwt = self.config, self.clock, self.jwt
        endpoint, trace_id = record["endpoint"], record["trace_id"]
        if endpoint not in self.endpoints:
            raise RecordError("unknown_endpoint", "the record names an endpoint that is not the configured panelUrl")
        scrub = attestable_scrub(record, scrubbing_bypassed=config.scrubbing_bypassed, verifying=jwt is not None)
        body = record["body"].encode("utf-8")
        # what the sign stage minted goes as it is until it needs refreshing; only this stage's
        # own minting is bound to the verified result (a forged token would not verify anyway)
        attestation, iat = record["attestation"], record["attestation_iat"]
        first_at = record["first_signed_at"] / 1000
        limiter = self.limiters.get(endpoint)
        attempt = failures = 0  # every try; the tries that spend the retry budget (no 429)
        while True:
            attempt += 1
            probe = await self.gate.admit(endpoint, trace_id, attempt=attempt) is Verdict.PROBE
            async with limiter.slot() as slot:  # waits for a place in flight and any 429 pause
                now = clock.time()
                _, secret = config.panel_secret(record["site_key"])
                signature = sign(body, secret.reveal())
                if jwt and scrub and (attestation is None or needs_refresh(iat, now, self.refresh_s)):
                    attestation, iat = attest(body, jwt.reveal(), now, scrub), int(now)
                result: dict[str, Any]
                try:
                    response = await self.client.post_trace(body, record["site_key"], signature, attestation)
                except PanelUnavailable as exc:
                    slot.record(Signal.OVERLOAD)
                    kind, retry_after = "transient", exc.retry_after
                    result = {"http_status": None, "error": exc.reason, "latency_ms": None}
                else:
                    slot.record(signal_of(response.status), response.latency_ms / 1000)
                    kind, retry_after = classify_http(response.status), response.retry_after
                    result = {"http_status": response.status, "error": response.error,
                              "latency_ms": round(response.latency_ms, 3)}
            if result["http_status"] == THROTTLED_HTTP:
                await self._throttled(endpoint, trace_id, attempt, probe, retry_after, result)
                continue  # the next try waits at the limiter for the pause to end
            failures += kind != "success"
            status = OUTCOME_STATUS[kind]
            metrics.DELIVERY_OUTCOMES.labels(endpoint, status).inc()
            if result["latency_ms"] is not None:
                metrics.PANEL_LATENCY.labels(endpoint, status).observe(result["latency_ms"] / 1000)
            # sent at once, not with the batch: the breaker must see failures while we retry
            await self.outcomes.send(Out(OUTCOMES, endpoint, outcome(
                stage=STAGE, endpoint=endpoint, status=status, trace_id=trace_id, at=clock.now_ms(),
                attempt=attempt, probe=probe, **result)))
            if kind == "success":
                return []
            if kind == "permanent" or self.policy.give_up(failures, first_at, clock.time()):
                reason = f"panel_{result['http_status']}" if kind == "permanent" else "max_age_exceeded"
                detail = {"http_status": result["http_status"], "panel_error": result["error"],
                          "panel_body": response.text if kind == "permanent" else None, "attempts": attempt}
                return [Out("traces.dead", trace_id, dead_letter(
                    stage=STAGE, source_topic="traces.outbox", raw=meta.raw, reason=reason,
                    error=f"panel answered {result['http_status']}: {result['error']}", key=meta.key,
                    partition=meta.partition, offset=meta.offset, redrive_topic="traces.signed", detail=detail))]
            delay = self.policy.delay(failures, retry_after)
            log.warning("delivery of %s failed (%s); retry %d in %.1fs", trace_id, result["error"], attempt, delay)
            await clock.sleep(delay)

    async def _throttled(self, endpoint: str, trace_id: str, attempt: int, probe: bool, retry_after: float | None,
                         result: dict[str, Any]) -> None:
        """A 429: pause this endpoint for what the panel asked (every replica, through the
        outcome), never a failure: no breaker count, no retry budget spent, no dead letter."""
        wait_s = DEFAULT_PAUSE_S if retry_after is None else retry_after
        now_ms = self.clock.now_ms()
        until = now_ms + max(1, round(wait_s * 1000))
        paused = self.limiters.hold_off(endpoint, until)
        if probe:
            self.gate.probe_unsettled(endpoint)
        metrics.THROTTLED.labels(STAGE, endpoint).inc()
        metrics.DELIVERY_OUTCOMES.labels(endpoint, "throttled").inc()
        await self.outcomes.send(Out(OUTCOMES, endpoint, outcome(
            stage=STAGE, endpoint=endpoint, status="throttled", trace_id=trace_id, at=now_ms, attempt=attempt,
            probe=probe, detail={"retry_after_s": wait_s, "until": until}, **result)))
        if paused:
            log.warning("panel %s asks for less (429): pausing deliveries for %.2fs", endpoint, wait_s)


def build(config: Config, **app_overrides: Any) -> faust.App:
    config.panel_secret(config.site_key)  # fail at start, naming the variable
    app = make_app(STAGE, config, **app_overrides)
    clock = SystemClock()
    sinks = Sinks(app, config, STAGES[STAGE])
    limiters = delivery_limiters(config, clock)
    gate = breaker_gate(app, config, sinks, STAGE, Role.DELIVER, on_throttle=limiters.hold_off)
    core = DeliverStage(config, clock, gate, sinks, panel_client(config, clock), limiters)
    bind(app, STAGE, config, core.handle, sinks=sinks, parallel=True, batch=config.delivery.max_in_flight)
    return app
