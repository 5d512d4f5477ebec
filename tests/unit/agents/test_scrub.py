"""agents/scrub.py's core through the harness against the stub scrubber (real HTTP, its own
thread): secrets scrubbed and attested, a scrubber that fails holds the trace (fail closed), a
trace the scrubber refuses for what it is dead-lettered."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agents.scrub import ScrubStage, scrubber_client
from devkit.clock import FakeClock
from devkit.harness import StageHarness, on_clock
from devkit.stubs.scrubber import StubScrubber
from pipeline.config import Config
from tests.factory import SEEDED_SECRETS, snapshot
from tests.unit.agents.conftest import JWT, make_config, sampled


def scrub_config(tmp_path: Path, scrubber: StubScrubber) -> Config:
    return make_config(tmp_path, PIPELINE_SCRUBBER_URL=scrubber.url, SCRUBBER_JWT_SECRET=JWT,
                       PIPELINE_SCRUB__MAX_ATTEMPTS="2", PIPELINE_SCRUB__MAX_AGE_S="30")


def scrub_stage(config: Config, clock: FakeClock) -> StageHarness:
    return StageHarness("scrub", clock).bind(ScrubStage(config, clock, scrubber_client(config, clock)))


@pytest.mark.asyncio
async def test_secrets_are_scrubbed_and_the_result_attested(tmp_path: Path, clock: FakeClock,
                                                            scrubber: StubScrubber) -> None:
    config = scrub_config(tmp_path, scrubber)
    trace = await sampled(config, clock, snapshot(1, tool_error=True, with_secrets=True))
    assert SEEDED_SECRETS[0] in str(trace["messages"])
    batch = await scrub_stage(config, clock).feed(trace, key="h1:ses_test000001")
    (scrubbed,) = batch.values("traces.scrubbed")
    assert not any(secret in str(scrubbed["messages"]) for secret in SEEDED_SECRETS[:2])
    assert scrubbed["trace_id"] == trace["trace_id"]
    assert scrubbed["scrub"]["jti"]  # the verified attestation's id travels with the trace


@pytest.mark.asyncio
async def test_a_failing_scrubber_holds_the_trace_until_it_answers(tmp_path: Path, clock: FakeClock,
                                                                   scrubber: StubScrubber) -> None:
    config = scrub_config(tmp_path, scrubber)
    trace = await sampled(config, clock, snapshot(2, tool_error=True))
    scrubber.set_faults(fail_next=3, status=503)
    task = asyncio.create_task(scrub_stage(config, clock).feed(trace))
    await clock.wait_for_sleepers()  # failed, and waits its backoff on the clock
    assert not task.done()
    batch = await on_clock(clock, task, step_s=60)
    assert len(batch.values("traces.scrubbed")) == 1 and batch.dead == []
    assert scrubber.stats()["by_status"] == {"503": 3, "200": 1}


@pytest.mark.asyncio
async def test_a_trace_the_scrubber_refuses_is_dead_lettered_not_passed(tmp_path: Path, clock: FakeClock,
                                                                        scrubber: StubScrubber) -> None:
    config = scrub_config(tmp_path, scrubber)
    trace = await sampled(config, clock, snapshot(3, tool_error=True))
    scrubber.set_faults(fail_next=1, status=413)
    batch = await scrub_stage(config, clock).feed(trace)
    assert batch.values("traces.scrubbed") == []
    (letter,) = batch.dead
    assert letter["reason"].startswith("scrubber_") and letter["source_topic"] == "traces.sampled"
