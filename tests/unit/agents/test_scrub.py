"""agents/scrub.py's core through the harness against the stub scrubber (real HTTP, its own
thread): secrets scrubbed and attested, a scrubber that fails holds the trace (fail closed), a
trace the scrubber refuses for what it is dead-lettered."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

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


def probes(result: str) -> float:
    """pipeline_scrubber_probes_total{result} so far (the registry is the process's)."""
    return REGISTRY.get_sample_value("pipeline_scrubber_probes_total", {"result": result}) or 0.0


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
    by_status = scrubber.stats()["by_status"]
    # the trace's answer, and a probe's if its budget was spent before the 503s ran out
    assert by_status["503"] == 3 and by_status["200"] in (1, 2) and set(by_status) == {"503", "200"}


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


@pytest.mark.asyncio
async def test_a_429_pauses_scrubbing_and_spends_no_budget(tmp_path: Path, clock: FakeClock,
                                                           scrubber: StubScrubber) -> None:
    # one trace the scrubber keeps answering 429 while it scrubs another: had the 429s counted,
    # the budget (2 tries over 30 s, spent while others pass) would dead-letter it
    config = scrub_config(tmp_path, scrubber)
    core = ScrubStage(config, clock, scrubber_client(config, clock))
    limited = await sampled(config, clock, snapshot(3, tool_error=True))
    other = await sampled(config, clock, snapshot(4, tool_error=True))
    marker = next(m["content"] for m in limited["messages"] if m["content"] not in str(other["messages"]))
    scrubber.set_faults(fail_matching=marker, status=429, retry_after_s=10)
    held = asyncio.create_task(StageHarness("scrub", clock).bind(core).feed(limited))
    await clock.wait_for_sleepers()
    assert scrubber.stats()["requests"] == 1
    passed = asyncio.create_task(StageHarness("scrub", clock).bind(core).feed(other))
    await clock.advance(9.9)  # the pause holds every request of the process, the other trace's too
    assert scrubber.stats()["requests"] == 1 and not passed.done()
    batch = await on_clock(clock, passed, step_s=1)
    assert len(batch.values("traces.scrubbed")) == 1
    for _ in range(6):  # a minute of 429s for the first one: never dead-lettered
        await clock.wait_for_sleepers()  # its 429 came back and paused the process again
        await clock.advance(10.1)
    assert not held.done() and scrubber.stats()["by_status"]["429"] >= 4
    scrubber.set_faults(fail_matching="")
    batch = await on_clock(clock, held, step_s=5)
    assert len(batch.values("traces.scrubbed")) == 1 and batch.dead == []


@pytest.mark.asyncio
async def test_a_trace_the_scrubber_fails_alone_is_dead_lettered_once_a_probe_passes(
        tmp_path: Path, clock: FakeClock, scrubber: StubScrubber) -> None:
    # no other trace in flight to show the scrubber works: the probe (a canary made by the
    # stage, none of the trace's content) does, so the rule does not depend on batching
    config = scrub_config(tmp_path, scrubber)
    trace = await sampled(config, clock, snapshot(5, tool_error=True))
    marker = trace["messages"][0]["content"]
    scrubber.set_faults(fail_matching=marker, status=500)
    probes_ok = probes("ok")
    batch = await on_clock(clock, asyncio.create_task(scrub_stage(config, clock).feed(trace)), step_s=60)
    assert probes("ok") > probes_ok
    assert batch.values("traces.scrubbed") == []
    (letter,) = batch.dead
    assert letter["reason"] == "scrub_budget_exhausted" and letter["detail"]["attempts"] >= 2
    by_status = scrubber.stats()["by_status"]
    assert by_status["500"] == letter["detail"]["attempts"] and by_status["200"] >= 1  # the probe


@pytest.mark.asyncio
async def test_a_scrubber_failing_the_probe_too_holds_a_lone_trace_past_its_budget(
        tmp_path: Path, clock: FakeClock, scrubber: StubScrubber) -> None:
    # everything fails, the probe included: an outage, so the trace waits (fail closed) however
    # long it takes, and goes on scrubbed once the scrubber answers
    config = scrub_config(tmp_path, scrubber)
    trace = await sampled(config, clock, snapshot(6, tool_error=True))
    scrubber.set_faults(fail_next=20, status=500)  # past the budget (2 tries over 30 s) by far
    probes_failed = probes("failed")
    batch = await on_clock(clock, asyncio.create_task(scrub_stage(config, clock).feed(trace)), step_s=60)
    assert probes("failed") > probes_failed
    assert len(batch.values("traces.scrubbed")) == 1 and batch.dead == []
    by_status = scrubber.stats()["by_status"]  # the trace's attempts and the probes took the 500s
    assert by_status["500"] == 20 and set(by_status) == {"500", "200"}
