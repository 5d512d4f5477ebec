"""Deliver stage: traces.outbox -> the panel. Every attempt is an outcome record; transient
failures are retried with backoff and jitter up to a maximum age; permanent refusals go to
traces.dead with the panel's answer.

The HMAC is recomputed with the current secret and a stale attestation re-minted over the same
body before each attempt: a trace held for minutes (breaker open, retries) would otherwise
reach the panel with an attestation past its 300 s window, and a dead letter redriven after a
secret rotation would carry the old signature.

Every attempt, the first included, also waits for the endpoint's breaker, which this stage
follows from delivery.outcomes like every breaker replica: the breaker stage only gates what
enters traces.outbox, and without this gate the traces already past it (in flight, queued in
the outbox, retrying) kept hitting a failing panel for the whole open period, where the
contract ships nothing. While the breaker is open an attempt waits for the period to end; once
it is over one attempt per process goes as the probe (announced with a `probe` outcome, which
also holds off the breaker stage's probe) and the others wait for its verdict.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import faust
import httpx

from agents.base import Meta, Out, Sinks, TopicFollower, bind, make_app
from agents.breaker import OUTCOMES, breaker_settings, replay_horizon_ms
from pipeline import metrics
from pipeline.clients.panel import PanelClient, PanelUnavailable
from pipeline.config import Config
from pipeline.delivery.breaker import BreakerRegistry, State
from pipeline.delivery.retry import RetryPolicy, classify_http
from pipeline.delivery.signing import attest, attestable_scrub, needs_refresh, sign
from pipeline.errors import RecordError
from pipeline.model.outcomes import outcome
from pipeline.model.records import dead_letter, decode
from pipeline.topics import STAGES

STAGE = "deliver"
OUTCOME_STATUS = {"success": "delivered", "transient": "failed", "permanent": "refused"}
log = logging.getLogger(__name__)


def build(config: Config, **app_overrides: object) -> faust.App:
    config.panel_secret(config.site_key)  # fail at start, naming the variable
    app = make_app(STAGE, config, **app_overrides)
    d = config.delivery
    timeout = httpx.Timeout(connect=d.connect_timeout_s, read=d.read_timeout_s, write=d.write_timeout_s,
                            pool=d.pool_timeout_s)
    policy = RetryPolicy(base_s=d.retry_base_s, max_s=d.retry_max_s, max_age_s=d.max_age_s,
                         max_attempts=d.max_attempts, rng=random.Random())
    # where traces may go comes from configuration: a record naming any other endpoint is
    # dead-lettered, never sent (the site secret and a fresh attestation would go with it)
    endpoints = frozenset({config.panel_url})
    jwt = config.scrubber_jwt_secret
    clients: dict[str, PanelClient] = {}
    sinks = Sinks(app, config, STAGES[STAGE])
    settings = breaker_settings(config)
    registry = BreakerRegistry(settings)
    # endpoint -> (the open period being probed, monotonic start) of this process' probe
    probing: dict[str, tuple[int | None, float]] = {}

    async def apply(raw: bytes) -> None:
        try:
            registry.apply(decode(raw, OUTCOMES))
        except RecordError as exc:
            log.warning("skipping unusable outcome record: %s", exc)

    follower = TopicFollower(config, OUTCOMES, apply, replay_horizon_ms(settings))

    @app.task
    async def follow() -> None:
        await follower.run()

    async def emit(endpoint: str, trace_id: str, status: str, **fields: Any) -> None:
        # sent and awaited at once: other replicas must see a probe before they decide
        await sinks.send(Out(OUTCOMES, endpoint, outcome(
            stage=STAGE, endpoint=endpoint, status=status, trace_id=trace_id, at=int(time.time() * 1000),
            **fields)))
        await sinks.drain()

    async def wait_for_breaker(endpoint: str, trace_id: str, attempt: int) -> bool:
        """Return when the breaker lets this attempt go; True when it goes as the probe."""
        announced = False
        while True:
            now_ms = int(time.time() * 1000)
            snap = registry.get(endpoint).snapshot(now_ms)
            if snap.state is State.CLOSED:
                probing.pop(endpoint, None)
                return False
            if snap.state is State.HALF_OPEN:
                period, started = probing.get(endpoint, (None, 0.0))
                expired = time.monotonic() - started > settings.probe_timeout_s
                if period != snap.open_until_ms or expired:
                    probing[endpoint] = (snap.open_until_ms, time.monotonic())
                    await emit(endpoint, trace_id, "probe", attempt=attempt, probe=True,
                               detail={"reason": "open period over: this delivery probes"})
                    return True
            if not announced:
                announced = True
                metrics.DELIVERY_OUTCOMES.labels(endpoint, "held").inc()
                await emit(endpoint, trace_id, "held", attempt=attempt,
                           detail={"reason": f"breaker {snap.state}", "until": snap.open_until_ms})
                log.warning("breaker %s %s: delivery of %s waits", endpoint, snap.state, trace_id)
            # open: nothing changes before the period ends; half-open: the probe's verdict comes
            # in through the follower
            wait_s = (snap.open_until_ms or now_ms) / 1000 - time.time() if snap.state is State.OPEN else 0.2
            await asyncio.sleep(min(max(wait_s, 0.05), 1.0))

    def client_for(endpoint: str) -> PanelClient:
        if endpoint not in clients:
            clients[endpoint] = PanelClient(endpoint, timeout)
        return clients[endpoint]

    async def handle(record: dict[str, Any], meta: Meta) -> list[Out]:
        endpoint, trace_id = record["endpoint"], record["trace_id"]
        if endpoint not in endpoints:
            raise RecordError("unknown_endpoint", "the record names an endpoint that is not the configured panelUrl")
        scrub = attestable_scrub(record, scrubbing_bypassed=config.scrubbing_bypassed, verifying=jwt is not None)
        await follower.ready.wait()
        body = record["body"].encode("utf-8")
        # what the sign stage minted goes as it is until it needs refreshing; only this stage's
        # own minting is bound to the verified result (a forged token would not verify anyway)
        attestation, iat = record["attestation"], record["attestation_iat"]
        first_at = record["first_signed_at"] / 1000
        attempt = 0
        while True:
            attempt += 1
            probe = await wait_for_breaker(endpoint, trace_id, attempt)
            now = time.time()
            _, secret = config.panel_secret(record["site_key"])
            signature = sign(body, secret.reveal())
            if jwt and scrub and (attestation is None or needs_refresh(iat, now, d.attestation_refresh_s)):
                attestation, iat = attest(body, jwt.reveal(), now, scrub), int(now)
            result: dict[str, Any]
            try:
                response = await client_for(endpoint).post_trace(body, record["site_key"], signature, attestation)
            except PanelUnavailable as exc:
                kind, retry_after = "transient", exc.retry_after
                result = {"http_status": None, "error": exc.reason, "latency_ms": None}
            else:
                kind, retry_after = classify_http(response.status), response.retry_after
                result = {"http_status": response.status, "error": response.error,
                          "latency_ms": round(response.latency_ms, 3)}
            status = OUTCOME_STATUS[kind]
            metrics.DELIVERY_OUTCOMES.labels(endpoint, status).inc()
            if result["latency_ms"] is not None:
                metrics.PANEL_LATENCY.labels(endpoint, status).observe(result["latency_ms"] / 1000)
            # sent at once, not with the batch: the breaker must see failures while we retry
            await sinks.send(Out(OUTCOMES, endpoint, outcome(
                stage=STAGE, endpoint=endpoint, status=status, trace_id=trace_id, at=int(time.time() * 1000),
                attempt=attempt, probe=probe, **result)))
            if kind == "success":
                return []
            if kind == "permanent" or policy.give_up(attempt, first_at, time.time()):
                reason = f"panel_{result['http_status']}" if kind == "permanent" else "max_age_exceeded"
                detail = {"http_status": result["http_status"], "panel_error": result["error"],
                          "panel_body": response.text if kind == "permanent" else None, "attempts": attempt}
                return [Out("traces.dead", trace_id, dead_letter(
                    stage=STAGE, source_topic="traces.outbox", raw=meta.raw, reason=reason,
                    error=f"panel answered {result['http_status']}: {result['error']}", key=meta.key,
                    partition=meta.partition, offset=meta.offset, redrive_topic="traces.signed", detail=detail))]
            delay = policy.delay(attempt, retry_after)
            log.warning("delivery of %s failed (%s); retry %d in %.1fs", trace_id, result["error"], attempt, delay)
            await asyncio.sleep(delay)

    bind(app, STAGE, config, handle, sinks=sinks, parallel=True, batch=50)
    return app
