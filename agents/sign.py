"""Sign stage: traces.scrubbed -> traces.signed: the canonical body, serialised once, its HMAC,
and, when SCRUBBER_JWT_SECRET is set, an attestation minted over it that claims the scrubber's
verified result the trace carries (never for a trace without one: see attestable_scrub)."""

from __future__ import annotations

import time

import faust

import pipeline
from agents.base import Meta, Out, bind, make_app
from pipeline.config import Config
from pipeline.delivery.signing import attest, attestable_scrub, canonical_body, sign

STAGE = "sign"


def build(config: Config, **app_overrides: object) -> faust.App:
    # Fail at start, naming the variable, rather than dead-letter every trace later.
    config.panel_secret(config.site_key)
    jwt = config.scrubber_jwt_secret
    panel_secrets: dict[str, str] = {}  # per site key: the environment as loaded at start
    app = make_app(STAGE, config, **app_overrides)

    async def handle(record: dict, meta: Meta) -> list[Out]:
        site_key = record["site_key"]
        if site_key not in panel_secrets:
            panel_secrets[site_key] = config.panel_secret(site_key)[1].reveal()
        scrub = attestable_scrub(record, scrubbing_bypassed=config.scrubbing_bypassed, verifying=jwt is not None)
        body = canonical_body(record, config.source_agent, pipeline.__version__)
        now = time.time()
        attestation = attest(body, jwt.reveal(), now, scrub) if jwt and scrub else None
        signed = {
            "schema": "trace.signed/1",
            "trace_id": record["trace_id"],
            "snapshot_id": record["snapshot_id"],
            "host": record["host"],
            "site_key": record["site_key"],
            "session_id": record["session_id"],
            "endpoint": config.panel_url,
            "body": body.decode("utf-8"),
            "signature": sign(body, panel_secrets[site_key]),
            "attestation": attestation,
            "attestation_iat": int(now) if attestation else None,
            "reason": record["decision"]["reason"],
            "signed_at": int(now * 1000),
            "first_signed_at": int(now * 1000),
            "scrub": {k: record["scrub"].get(k) for k in ("mode", "jti", "engine_version", "input_hash")},
        }
        return [Out("traces.signed", record["trace_id"], signed)]

    bind(app, STAGE, config, handle)
    return app
