"""Shared pieces of the stage-core tests: a configuration without a file, and records of each
topic as the stage before would write them (made by that stage's own core, so the shapes stay
true to the pipeline)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agents.sample import SampleStage
from agents.scrub import ScrubStage, scrubber_client
from agents.sign import SignStage
from devkit.clock import FakeClock
from devkit.harness import StageHarness
from devkit.stubs.scrubber import ScrubberStubConfig, StubScrubber
from pipeline import config as config_mod
from tests.factory import snapshot

SITE = "pk_test_thirdparty"
SITE_SECRET = "site-ingest-secret"
JWT = "scrubber-jwt-secret-at-least-32-bytes!"


def make_config(tmp: Path, **env: str) -> config_mod.Config:
    """The default configuration, with `env` as PIPELINE_* overrides and secrets."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "PANEL_", "SCRUBBER_"))}
    base["PIPELINE_KAFKA__CACHE_DIR"] = str(tmp)
    return config_mod.load(None, {**base, **env})


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    yield FakeClock()


@pytest.fixture
def scrubber(clock: FakeClock) -> Iterator[StubScrubber]:
    """The stub scrubber on its own thread, attesting with JWT at the test's clock."""
    with StubScrubber(ScrubberStubConfig(jwt_secret=JWT), clock=clock.time).in_thread() as running:
        yield running


async def sampled(config: config_mod.Config, clock: FakeClock, snapshot: dict[str, Any]) -> dict[str, Any]:
    """The traces.sampled record the sample stage makes of `snapshot` (which it must forward)."""
    h = StageHarness("sample", clock)
    core = SampleStage(config, clock, h.state, h.read)
    core.ready.set()  # no other replica: nothing to replay
    h.bind(core)
    batch = await h.feed(snapshot, key=f"{snapshot['host']}:{snapshot['session_id']}")
    (trace,) = batch.values("traces.sampled")
    return trace


async def signed_trace(config: config_mod.Config, clock: FakeClock, i: int) -> dict[str, Any]:
    """The traces.signed record of factory snapshot `i` (an error turn), through the sample,
    scrub (config's scrubber) and sign cores."""
    trace = await sampled(config, clock, snapshot(i, tool_error=True))
    scrub = StageHarness("scrub", clock).bind(ScrubStage(config, clock, scrubber_client(config, clock)))
    (scrubbed,) = (await scrub.feed(trace)).values("traces.scrubbed")
    (signed,) = (await StageHarness("sign", clock).bind(SignStage(config, clock)).feed(scrubbed)).values(
        "traces.signed")
    return signed
