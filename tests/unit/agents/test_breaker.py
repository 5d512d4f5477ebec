"""agents/breaker.py's core and the shared gate (pipeline/delivery/gate.py) through the harness:
closed passes, failures open it, hold blocks the trace until the open period is over and lets it
through as the probe, drop records `circuit_open`, and no decision before the replay."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Literal

import pytest

from agents.breaker import BreakerStage
from agents.stage import publisher
from devkit.clock import FakeClock
from devkit.harness import StageHarness
from pipeline.config import Config
from pipeline.delivery.breaker import BreakerSettings
from pipeline.delivery.gate import OUTCOMES, BreakerGate, Role
from pipeline.delivery.outcomes import outcome
from pipeline.model.records import encode
from tests.unit.agents.conftest import make_config

OPEN_S = 30


def signed(config: Config, i: int = 1, endpoint: str | None = None) -> dict[str, Any]:
    """A traces.signed record as far as the breaker reads it."""
    return {"schema": "trace.signed/1", "trace_id": f"tr_oc_{i:08d}", "snapshot_id": f"snap_{i}", "host": "h1",
            "site_key": "pk_test_thirdparty", "session_id": f"ses_{i}", "endpoint": endpoint or config.panel_url,
            "body": "{}", "signature": "0" * 64, "attestation": None, "attestation_iat": None, "reason": "error_flag",
            "signed_at": 1, "first_signed_at": 1,
            "scrub": {"mode": "trace", "jti": None, "engine_version": None, "input_hash": None}}


def breaker(tmp_path: Path, clock: FakeClock,
            mode: Literal["hold", "drop"] = "hold") -> tuple[StageHarness, BreakerGate, Config]:
    config = make_config(tmp_path)
    h = StageHarness("breaker", clock)
    gate = BreakerGate(BreakerSettings(open_s=OPEN_S, mode=mode), clock, publisher(h.sinks, OUTCOMES), stage="breaker",
                       role=Role.ADMIT)
    gate.ready.set()
    return h.bind(BreakerStage(config, gate)), gate, config


async def fail(gate: BreakerGate, clock: FakeClock, config: Config, times: int, first: int = 0) -> None:
    """`times` failed deliveries arriving from delivery.outcomes (traces numbered from `first`)."""
    for n in range(first, first + times):
        await gate.apply_raw(encode(outcome(stage="deliver", endpoint=config.panel_url, status="failed",
                                            trace_id=f"tr_fail_{n}", at=clock.now_ms(), http_status=503,
                                            error="unavailable", attempt=1)))


def statuses(h: StageHarness) -> list[str]:
    return [o["status"] for o in h.sinks.values(OUTCOMES)]


@pytest.mark.asyncio
async def test_a_closed_breaker_passes_the_trace_to_the_outbox(tmp_path: Path, clock: FakeClock) -> None:
    h, _, config = breaker(tmp_path, clock)
    batch = await h.feed(signed(config))
    assert [t["trace_id"] for t in batch.values("traces.outbox")] == ["tr_oc_00000001"]
    assert statuses(h) == []


@pytest.mark.asyncio
async def test_failures_open_it_and_the_transition_is_published(tmp_path: Path, clock: FakeClock) -> None:
    h, gate, config = breaker(tmp_path, clock)
    await fail(gate, clock, config, 2)
    assert statuses(h) == []  # below the threshold
    await fail(gate, clock, config, 1, first=2)
    (transition,) = h.sinks.values(OUTCOMES)
    assert transition["status"] == "transition"
    assert (transition["detail"]["from"], transition["detail"]["to"]) == ("closed", "open")


@pytest.mark.asyncio
async def test_replayed_transitions_are_not_published_again(tmp_path: Path, clock: FakeClock) -> None:
    h, gate, config = breaker(tmp_path, clock)
    gate.ready.clear()  # still replaying delivery.outcomes
    await fail(gate, clock, config, 3)
    assert statuses(h) == []


@pytest.mark.asyncio
async def test_hold_blocks_the_trace_until_the_period_is_over_then_it_probes(tmp_path: Path,
                                                                           clock: FakeClock) -> None:
    h, gate, config = breaker(tmp_path, clock)
    await fail(gate, clock, config, 3)
    task = asyncio.create_task(h.feed(signed(config)))
    await clock.advance(OPEN_S - 1)
    assert not task.done()
    assert statuses(h) == ["transition", "held"]  # announced once, however often it looked again
    await clock.advance(2)
    batch = await task
    assert [t["trace_id"] for t in batch.values("traces.outbox")] == ["tr_oc_00000001"]
    probe = h.sinks.values(OUTCOMES)[-1]
    assert probe["status"] == "probe" and probe["probe"] is True and probe["trace_id"] == "tr_oc_00000001"


@pytest.mark.asyncio
async def test_while_a_probe_is_out_the_next_trace_is_held(tmp_path: Path, clock: FakeClock) -> None:
    h, gate, config = breaker(tmp_path, clock)
    await fail(gate, clock, config, 3)
    await clock.advance(OPEN_S + 1)
    assert len((await h.feed(signed(config, 1))).values("traces.outbox")) == 1  # the probe
    second = asyncio.create_task(h.feed(signed(config, 2)))
    await clock.advance(5)
    assert not second.done() and statuses(h)[-1] == "held"
    await gate.apply_raw(encode(outcome(stage="deliver", endpoint=config.panel_url, status="delivered",
                                        trace_id="tr_oc_00000001", at=clock.now_ms(), http_status=200,
                                        attempt=1, probe=True)))
    await clock.advance(1)
    assert len((await second).values("traces.outbox")) == 1
    assert ("half_open", "closed") in [(o["detail"]["from"], o["detail"]["to"]) for o in h.sinks.values(OUTCOMES)
                                       if o["status"] == "transition"]


@pytest.mark.asyncio
async def test_drop_records_circuit_open_and_forwards_nothing(tmp_path: Path, clock: FakeClock) -> None:
    h, gate, config = breaker(tmp_path, clock, mode="drop")
    await fail(gate, clock, config, 3)
    batch = await h.feed(signed(config))
    assert batch.values("traces.outbox") == []
    dropped = h.sinks.values(OUTCOMES)[-1]
    assert dropped["status"] == "circuit_open" and dropped["detail"]["reason"] == "open"


@pytest.mark.asyncio
async def test_a_record_naming_another_endpoint_is_dead_lettered(tmp_path: Path, clock: FakeClock) -> None:
    h, _, config = breaker(tmp_path, clock)
    batch = await h.feed(signed(config, endpoint="https://elsewhere.example/"))
    assert batch.values("traces.outbox") == []
    assert [d["reason"] for d in batch.dead] == ["unknown_endpoint"]
