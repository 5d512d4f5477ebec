"""agents/deliver.py's core through the harness against the stub panel (real HTTP, its own
thread, on the test's clock): delivered, retried after a transient failure, a stale attestation
minted again before it goes, a permanent refusal dead-lettered, and the breaker gate's hold."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agents.deliver import DeliverStage, panel_client
from agents.stage import publisher
from devkit.clock import FakeClock
from devkit.harness import StageHarness
from devkit.stubs.panel import PanelStubConfig, StubPanel
from devkit.stubs.scrubber import StubScrubber
from pipeline.config import Config
from pipeline.delivery.breaker import BreakerSettings
from pipeline.delivery.gate import OUTCOMES, BreakerGate, Role
from pipeline.delivery.outcomes import outcome
from pipeline.model.records import encode
from tests.unit.agents.conftest import JWT, SITE, SITE_SECRET, make_config, signed_trace

REFRESH_S = 60
OPEN_S = 30


@pytest.fixture
def panel(clock: FakeClock) -> Iterator[StubPanel]:
    stub = StubPanel(PanelStubConfig(site_secrets={SITE: SITE_SECRET}, jwt_secret=JWT, require_scrub=True),
                     clock=clock.time)
    with stub.in_thread() as running:
        yield running


def deliver_config(tmp_path: Path, panel: StubPanel, scrubber: StubScrubber, secret: str = SITE_SECRET) -> Config:
    return make_config(tmp_path, PIPELINE_PANEL_URL=panel.url, PIPELINE_SCRUBBER_URL=scrubber.url,
                       SCRUBBER_JWT_SECRET=JWT, PANEL_INGEST_SECRET=secret,
                       PIPELINE_DELIVERY__ATTESTATION_REFRESH_S=str(REFRESH_S),
                       PIPELINE_DELIVERY__MAX_ATTEMPTS="3")


def deliverer(config: Config, clock: FakeClock) -> tuple[StageHarness, BreakerGate]:
    h = StageHarness("deliver", clock)
    gate = BreakerGate(BreakerSettings(open_s=OPEN_S), clock, publisher(h.sinks, OUTCOMES), stage="deliver",
                       role=Role.DELIVER)
    gate.ready.set()
    return h.bind(DeliverStage(config, clock, gate, h.sinks, panel_client(config, clock))), gate


def outcomes(h: StageHarness) -> list[dict[str, Any]]:
    return h.sinks.values(OUTCOMES)


@pytest.mark.asyncio
async def test_a_trace_is_delivered_and_its_outcome_published(tmp_path: Path, clock: FakeClock, panel: StubPanel,
                                                               scrubber: StubScrubber) -> None:
    config = deliver_config(tmp_path, panel, scrubber)
    signed = await signed_trace(config, clock, 1)
    h, _ = deliverer(config, clock)
    batch = await h.feed(signed, key=signed["trace_id"])
    assert batch.written == []
    assert [(o["status"], o["http_status"], o["attempt"]) for o in outcomes(h)] == [("delivered", 200, 1)]
    assert signed["trace_id"] in panel.accepted()


@pytest.mark.asyncio
async def test_a_stale_attestation_is_minted_again_before_it_goes(tmp_path: Path, clock: FakeClock,
                                                                   panel: StubPanel, scrubber: StubScrubber) -> None:
    config = deliver_config(tmp_path, panel, scrubber)
    signed = await signed_trace(config, clock, 2)
    await clock.advance(400)  # past the attestation's 300 s window: the panel refuses the old one
    h, _ = deliverer(config, clock)
    await h.feed(signed, key=signed["trace_id"])
    assert [o["status"] for o in outcomes(h)] == ["delivered"]
    accepted = panel.accepted()[signed["trace_id"]]
    assert accepted["attestation_iat"] == int(clock.time()) != signed["attestation_iat"]


@pytest.mark.asyncio
async def test_a_transient_failure_is_retried_after_its_backoff(tmp_path: Path, clock: FakeClock,
                                                                 panel: StubPanel, scrubber: StubScrubber) -> None:
    config = deliver_config(tmp_path, panel, scrubber)
    signed = await signed_trace(config, clock, 3)
    h, _ = deliverer(config, clock)
    panel.set_faults(fail_next=1, status=503)
    task = asyncio.create_task(h.feed(signed, key=signed["trace_id"]))
    await clock.wait_for_sleepers()
    assert [o["status"] for o in outcomes(h)] == ["failed"] and not task.done()
    await clock.advance(60)
    assert (await task).written == []
    assert [(o["status"], o["attempt"]) for o in outcomes(h)] == [("failed", 1), ("delivered", 2)]


@pytest.mark.asyncio
async def test_a_permanent_refusal_is_dead_lettered_with_the_panels_answer(tmp_path: Path, clock: FakeClock,
                                                                           panel: StubPanel,
                                                                           scrubber: StubScrubber) -> None:
    config = deliver_config(tmp_path, panel, scrubber, secret="a-rotated-secret")
    signed = await signed_trace(config, clock, 4)
    h, _ = deliverer(config, clock)
    batch = await h.feed(signed, key=signed["trace_id"])
    (letter,) = batch.values("traces.dead")
    assert letter["reason"] == "panel_401" and letter["redrive_topic"] == "traces.signed"
    assert letter["detail"]["attempts"] == 1 and "bad_signature" in str(letter["detail"]["panel_body"])
    assert [o["status"] for o in outcomes(h)] == ["refused"]
    assert panel.accepted() == {}


@pytest.mark.asyncio
async def test_an_open_breaker_holds_the_attempt_then_it_goes_as_the_probe(tmp_path: Path, clock: FakeClock,
                                                                           panel: StubPanel,
                                                                           scrubber: StubScrubber) -> None:
    config = deliver_config(tmp_path, panel, scrubber)
    signed = await signed_trace(config, clock, 5)
    h, gate = deliverer(config, clock)
    for n in range(3):
        await gate.apply_raw(encode(outcome(stage="deliver", endpoint=config.panel_url, status="failed",
                                            trace_id=f"tr_fail_{n}", at=clock.now_ms(), http_status=503, attempt=1)))
    # the breaker stage's probe lease does not hold deliver back: its probe may wait behind this batch
    await gate.apply_raw(encode(outcome(stage="breaker", endpoint=config.panel_url, status="probe",
                                        trace_id="tr_other", at=clock.now_ms() + 30_000, probe=True)))
    task = asyncio.create_task(h.feed(signed, key=signed["trace_id"]))
    await clock.wait_for_sleepers()
    assert [o["status"] for o in outcomes(h)] == ["held"] and panel.stats()["requests"] == 0
    await clock.advance(OPEN_S + 1)
    await task
    assert [(o["status"], o["probe"]) for o in outcomes(h)] == [("held", False), ("probe", True), ("delivered", True)]


@pytest.mark.asyncio
async def test_a_429_pauses_the_endpoint_and_is_never_a_failure_nor_a_dead_letter(
        tmp_path: Path, clock: FakeClock, panel: StubPanel, scrubber: StubScrubber) -> None:
    # a budget of one attempt and one second: any counted failure would dead-letter at once
    config = make_config(tmp_path, PIPELINE_PANEL_URL=panel.url, PIPELINE_SCRUBBER_URL=scrubber.url,
                         SCRUBBER_JWT_SECRET=JWT, PANEL_INGEST_SECRET=SITE_SECRET,
                         PIPELINE_DELIVERY__MAX_ATTEMPTS="1", PIPELINE_DELIVERY__MAX_AGE_S="1")
    signed = await signed_trace(config, clock, 6)
    h, _ = deliverer(config, clock)
    panel.set_faults(fail_next=4, status=429, retry_after_s=3)
    task = asyncio.create_task(h.feed(signed, key=signed["trace_id"]))
    for n in range(1, 5):
        await clock.wait_for_sleepers()
        assert [o["status"] for o in outcomes(h)] == ["throttled"] * n
        assert panel.stats()["requests"] == n
        pause_s = (outcomes(h)[-1]["detail"]["until"] - clock.now_ms()) / 1000
        assert 2.9 <= pause_s <= 3  # the Retry-After, from the 429 (time moved on a little since)
        await clock.advance(pause_s - 0.05)  # nothing goes before the pause ends
        assert panel.stats()["requests"] == n
        await clock.advance(0.1)
    assert (await task).written == []
    statuses = [(o["status"], o["http_status"]) for o in outcomes(h)]
    assert statuses == [("throttled", 429)] * 4 + [("delivered", 200)]
    throttled = outcomes(h)[0]
    assert throttled["detail"]["retry_after_s"] == 3 and throttled["detail"]["until"] == throttled["at"] + 3000


@pytest.mark.asyncio
async def test_a_429_another_replica_got_pauses_this_one_through_delivery_outcomes(
        tmp_path: Path, clock: FakeClock, panel: StubPanel, scrubber: StubScrubber) -> None:
    config = deliver_config(tmp_path, panel, scrubber)
    signed = await signed_trace(config, clock, 7)
    h = StageHarness("deliver", clock)
    core = DeliverStage(config, clock, BreakerGate(BreakerSettings(), clock, publisher(h.sinks, OUTCOMES),
                                                   stage="deliver", role=Role.DELIVER), h.sinks,
                        panel_client(config, clock))
    gate = BreakerGate(BreakerSettings(), clock, publisher(h.sinks, OUTCOMES), stage="deliver", role=Role.DELIVER,
                       on_throttle=core.limiters.hold_off)
    gate.ready.set()
    core.gate = gate
    h.bind(core)
    until = clock.now_ms() + 5000
    await gate.apply_raw(encode(outcome(stage="deliver", endpoint=config.panel_url, status="throttled",
                                        trace_id="tr_elsewhere", at=clock.now_ms(), http_status=429, attempt=1,
                                        detail={"retry_after_s": 5, "until": until})))
    task = asyncio.create_task(h.feed(signed, key=signed["trace_id"]))
    await clock.wait_for_sleepers()
    await clock.advance(4.9)
    assert panel.stats()["requests"] == 0 and not task.done()
    await clock.advance(0.2)
    await task
    assert [o["status"] for o in outcomes(h)] == ["delivered"]
