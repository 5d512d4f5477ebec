"""agents/sign.py's core through the harness: the HMAC over the canonical body, an attestation
only for a verified scrub, times from the clock, and a missing secret refused at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.scrub import ScrubStage
from agents.sign import SignStage
from devkit.clock import FakeClock
from devkit.harness import StageHarness
from devkit.stubs.scrubber import StubScrubber
from pipeline.config import Config
from pipeline.delivery.signing import sha256_hex, sign, verify_attestation
from pipeline.errors import ConfigError
from tests.factory import snapshot
from tests.unit.agents.conftest import JWT, SITE_SECRET, make_config, sampled, signed_trace


def sign_config(tmp_path: Path, **env: str) -> Config:
    return make_config(tmp_path, PANEL_INGEST_SECRET=SITE_SECRET, **env)


async def bypassed(config: Config, clock: FakeClock, i: int) -> dict[str, object]:
    """A traces.scrubbed record no scrubber has seen (scrubbing bypassed: development only)."""
    trace = await sampled(config, clock, snapshot(i, tool_error=True))
    batch = await StageHarness("scrub", clock).bind(ScrubStage(config, clock, None)).feed(trace)
    (scrubbed,) = batch.values("traces.scrubbed")
    return scrubbed


@pytest.mark.asyncio
async def test_the_signature_is_the_hmac_of_the_body_at_the_clocks_time(tmp_path: Path, clock: FakeClock) -> None:
    config = sign_config(tmp_path, PIPELINE_SCRUBBER_URL='""', PIPELINE_ALLOW_UNSCRUBBED="true")
    scrubbed = await bypassed(config, clock, 1)
    await clock.advance(42)
    batch = await StageHarness("sign", clock).bind(SignStage(config, clock)).feed(scrubbed)
    (signed,) = batch.values("traces.signed")
    assert signed["signature"] == sign(signed["body"].encode(), SITE_SECRET)
    assert signed["signed_at"] == signed["first_signed_at"] == clock.now_ms()
    assert signed["endpoint"] == config.panel_url and signed["trace_id"] == scrubbed["trace_id"]
    assert [w.key for w in batch.written] == [scrubbed["trace_id"].encode()]


@pytest.mark.asyncio
async def test_an_unverified_scrub_gets_no_attestation_even_with_the_jwt_secret(tmp_path: Path,
                                                                               clock: FakeClock) -> None:
    config = sign_config(tmp_path, PIPELINE_SCRUBBER_URL='""', PIPELINE_ALLOW_UNSCRUBBED="true",
                         SCRUBBER_JWT_SECRET=JWT)
    batch = await StageHarness("sign", clock).bind(SignStage(config, clock)).feed(await bypassed(config, clock, 2))
    (signed,) = batch.values("traces.signed")
    assert signed["attestation"] is None and signed["attestation_iat"] is None


@pytest.mark.asyncio
async def test_a_verified_scrub_is_attested_over_the_body_at_the_clocks_time(tmp_path: Path, clock: FakeClock,
                                                                             scrubber: StubScrubber) -> None:
    config = sign_config(tmp_path, PIPELINE_SCRUBBER_URL=scrubber.url, SCRUBBER_JWT_SECRET=JWT)
    signed = await signed_trace(config, clock, 3)
    assert signed["attestation_iat"] == int(clock.time())
    claims = verify_attestation(signed["attestation"], JWT, sha256_hex(signed["body"]), clock.time())
    assert claims["iat"] == signed["attestation_iat"]


def test_a_missing_panel_secret_fails_at_start_naming_the_variable(tmp_path: Path, clock: FakeClock) -> None:
    with pytest.raises(ConfigError, match="PANEL_INGEST_SECRET"):
        SignStage(make_config(tmp_path), clock)
