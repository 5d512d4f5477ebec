"""agents/sample.py's core through the harness: errors forwarded, a snapshot decided once (also
after a restart), and the shipped signature that keeps every replica's novelty window alike."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agents.sample import SHIPPED, SampleStage
from devkit.clock import FakeClock
from devkit.harness import MemoryTable, StageHarness
from pipeline.model.records import encode
from tests.factory import snapshot, text_snapshot
from tests.unit.agents.conftest import make_config

TEXT = "refactor the kafka sampler module and fix the failing schema tests in the parser " * 3


def sampler(tmp_path: Path, clock: FakeClock, table: MemoryTable | None = None) -> tuple[StageHarness, SampleStage]:
    h = StageHarness("sample", clock, table=table)
    core = SampleStage(make_config(tmp_path, PIPELINE_SAMPLING_RATE="0"), clock, h.state)
    core.ready.set()
    return h.bind(core), core


def key_of(snap: dict[str, object]) -> str:
    return f"{snap['host']}:{snap['session_id']}"


@pytest.mark.asyncio
async def test_an_error_turn_is_forwarded_with_its_reason_and_shipped(tmp_path: Path, clock: FakeClock) -> None:
    h, _ = sampler(tmp_path, clock)
    snap = snapshot(1, tool_error=True)
    batch = await h.feed(snap, key=key_of(snap))
    (trace,) = batch.values("traces.sampled")
    assert trace["decision"]["reason"] == "error_flag"
    assert trace["snapshot_id"] == snap["snapshot_id"]
    (shipped,) = batch.values(SHIPPED)
    assert shipped["trace_id"] == trace["trace_id"]


@pytest.mark.asyncio
async def test_a_repeated_snapshot_is_decided_once_even_after_a_restart(tmp_path: Path, clock: FakeClock) -> None:
    h, _ = sampler(tmp_path, clock)
    snap = snapshot(2, tool_error=True)
    assert len((await h.feed(snap, key=key_of(snap))).values("traces.sampled")) == 1
    assert (await h.feed(snap, key=key_of(snap))).written == []
    restarted, _ = sampler(tmp_path, clock, table=h.table)
    assert (await restarted.feed(snap, key=key_of(snap))).written == []


@pytest.mark.asyncio
async def test_another_replicas_shipped_record_makes_the_same_text_not_novel(tmp_path: Path,
                                                                            clock: FakeClock) -> None:
    first, _ = sampler(tmp_path, clock)
    snap = text_snapshot(1, TEXT, TEXT)
    batch = await first.feed(snap, key=key_of(snap))
    assert [t["decision"]["reason"] for t in batch.values("traces.sampled")] == ["novelty"]
    (shipped,) = batch.values(SHIPPED)

    again = text_snapshot(2, TEXT, TEXT)  # another session, the same words
    alone, _ = sampler(tmp_path, clock)
    assert len((await alone.feed(again, key=key_of(again))).values("traces.sampled")) == 1
    informed, core = sampler(tmp_path, clock)
    await core.apply_shipped(encode(shipped))  # what the follower hands over from sampler.shipped
    assert (await informed.feed(again, key=key_of(again))).written == []


@pytest.mark.asyncio
async def test_no_decision_before_the_shipped_topic_is_replayed(tmp_path: Path, clock: FakeClock) -> None:
    h, core = sampler(tmp_path, clock)
    core.ready.clear()
    snap = snapshot(3, tool_error=True)

    task = asyncio.create_task(h.feed(snap, key=key_of(snap)))
    await clock.advance(60)
    assert not task.done()
    core.ready.set()
    assert len((await task).values("traces.sampled")) == 1


@pytest.mark.asyncio
async def test_the_budget_is_shared_by_replicas_and_survives_a_restart(tmp_path: Path, clock: FakeClock) -> None:
    def replica() -> tuple[StageHarness, SampleStage]:
        h = StageHarness("sample", clock)
        core = SampleStage(make_config(tmp_path, PIPELINE_SAMPLING_RATE="1.0", PIPELINE_SAMPLING_RATE_OVERRIDE="true",
                                       PIPELINE_BUDGET_PER_HOUR="10"), clock, h.state)
        core.ready.set()
        return h.bind(core), core

    (a, core_a), (b, core_b) = replica(), replica()
    topic: list[bytes] = []  # sampler.shipped, as both replicas follow it
    forwarded: list[str] = []
    for n in range(30):
        h, others = (a, [core_b]) if n % 2 else (b, [core_a])
        snap = snapshot(n, tool_error=n >= 24)
        batch = await h.feed(snap, key=key_of(snap))
        forwarded += [t["decision"]["reason"] for t in batch.values("traces.sampled")]
        for record in batch.values(SHIPPED):
            topic.append(encode(record))
            for other in others:
                await other.apply_shipped(encode(record))
    # random samples stop at half the budget, novel turns at three quarters; the errors at the
    # end still find the rest of it
    assert len(forwarded) == 10 and forwarded.count("error_flag") >= 2
    assert forwarded.count("sample") <= 5
    restarted, core = replica()
    for raw in topic:  # a restarted replica reads sampler.shipped again
        await core.apply_shipped(raw)
    snap = snapshot(99, tool_error=True)
    assert (await restarted.feed(snap, key=key_of(snap))).written == []  # the hour is spent
    clock_hour = 3601
    await clock.advance(clock_hour)
    assert len((await restarted.feed(snapshot(98, tool_error=True), key="h1:x")).values("traces.sampled")) == 1
