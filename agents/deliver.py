"""Deliver stage: traces.outbox -> the panel. Every attempt is an outcome record; transient
failures are retried with backoff and jitter up to a maximum age; permanent refusals go to
traces.dead with the panel's answer.

The HMAC is recomputed with the current secret and a stale attestation re-minted over the same
body before each attempt: a trace held for minutes (breaker open, retries) would otherwise
reach the panel with an attestation past its 300 s window, and a dead letter redriven after a
secret rotation would carry the old signature.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import faust
import httpx

from agents.base import Meta, Out, Sinks, bind, make_app
from pipeline import metrics
from pipeline.config import Config
from pipeline.outcomes import outcome
from pipeline.panel import PanelClient, PanelUnavailable
from pipeline.records import dead_letter
from pipeline.retry import RetryPolicy, classify_http
from pipeline.signing import mint_attestation, needs_refresh, sign
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
    policy = RetryPolicy(base_s=d.retry_base_s, max_s=d.retry_max_s, max_age_s=d.max_age_s, rng=random.Random())
    jwt = config.scrubber_jwt_secret
    clients: dict[str, PanelClient] = {}
    sinks = Sinks(app, config, STAGES[STAGE])

    def client_for(endpoint: str) -> PanelClient:
        if endpoint not in clients:
            clients[endpoint] = PanelClient(endpoint, timeout)
        return clients[endpoint]

    async def handle(record: dict[str, Any], meta: Meta) -> list[Out]:
        endpoint, trace_id = record["endpoint"], record["trace_id"]
        body = record["body"].encode("utf-8")
        attestation, iat = record["attestation"], record["attestation_iat"]
        first_at = record["first_signed_at"] / 1000
        attempt = 0
        while True:
            attempt += 1
            now = time.time()
            _, secret = config.panel_secret(record["site_key"])
            signature = sign(body, secret.reveal())
            if jwt and (attestation is None or needs_refresh(iat, now, d.attestation_refresh_s)):
                attestation, iat = mint_attestation(body, jwt.reveal(), now), int(now)
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
            await sinks.send(Out("delivery.outcomes", endpoint, outcome(
                stage=STAGE, endpoint=endpoint, status=status, trace_id=trace_id, at=int(time.time() * 1000),
                attempt=attempt, **result)))
            if kind == "success":
                return []
            if kind == "permanent" or policy.give_up(first_at, time.time()):
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
