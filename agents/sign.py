"""Sign stage: traces.scrubbed -> traces.signed: the canonical body, serialised once, its HMAC,
and, when SCRUBBER_JWT_SECRET is set, an attestation minted over it that claims the scrubber's
verified result the trace carries (never for a trace without one: see attestable_scrub)."""

from __future__ import annotations

from typing import Any

import faust

import pipeline
from agents.runtime import bind, make_app
from agents.stage import Meta, Out
from pipeline.clock import Clock, SystemClock
from pipeline.config import Config
from pipeline.delivery.signing import attest, attestable_scrub, canonical_body, sign

STAGE = "sign"


class SignStage:
    def __init__(self, config: Config, clock: Clock) -> None:
        # Fail at start, naming the variable, rather than dead-letter every trace later.
        config.panel_secret(config.site_key)
        self.config, self.clock = config, clock
        self.jwt = config.scrubber_jwt_secret
        self.panel_secrets: dict[str, str] = {}  # per site key: the environment as loaded at start

    async def handle(self, record: dict[str, Any], meta: Meta) -> list[Out]:
        config, jwt = self.config, self.jwt
        site_key = record["site_key"]
        if site_key not in self.panel_secrets:
            self.panel_secrets[site_key] = config.panel_secret(site_key)[1].reveal()
        scrub = attestable_scrub(record, scrubbing_bypassed=config.scrubbing_bypassed, verifying=jwt is not None)
        body = canonical_body(record, config.source_agent, pipeline.__version__)
        now = self.clock.time()
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
            "signature": sign(body, self.panel_secrets[site_key]),
            "attestation": attestation,
            "attestation_iat": int(now) if attestation else None,
            "reason": record["decision"]["reason"],
            "signed_at": int(now * 1000),
            "first_signed_at": int(now * 1000),
            "scrub": {k: record["scrub"].get(k) for k in ("mode", "jti", "engine_version", "input_hash")},
        }
        return [Out("traces.signed", record["trace_id"], signed)]


def build(config: Config, **app_overrides: Any) -> faust.App:
    core = SignStage(config, SystemClock())  # before the app: a missing secret fails at start
    app = make_app(STAGE, config, **app_overrides)
    bind(app, STAGE, config, core.handle)
    return app
