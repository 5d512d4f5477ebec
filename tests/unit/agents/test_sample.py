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
    core = SampleStage(make_config(tmp_path, PIPELINE_SAMPLING_RATE="0"), clock, h.state, h.read)
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
                                       PIPELINE_BUDGET_PER_HOUR="10"), clock, h.state, h.read)
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


# ---------------------------------------------------------------- pairs across hosts

PROMPT = "port the retry loop in the deliver stage to the new breaker interface and add tests"
REPLY = "done: the retry loop now asks the breaker before each attempt and the tests cover it " * 2


def prompt_key(snap: dict[str, object]) -> str:
    """How ingest keys sessions.idle."""
    return str(snap["prompt_ref"])


async def filled_window(h: StageHarness) -> None:
    """The same text forwarded once already (by a turn that cannot pair), so what follows is not
    novel: only a pair can forward it."""
    seen = text_snapshot(900, PROMPT, REPLY)
    batch = await h.feed(seen, key=key_of(seen))
    assert [t["decision"]["reason"] for t in batch.values("traces.sampled")] == ["novelty"]


@pytest.mark.asyncio
async def test_the_same_prompt_on_two_models_and_hosts_is_forwarded_as_one_pair(tmp_path: Path,
                                                                                   clock: FakeClock) -> None:
    h, _ = sampler(tmp_path, clock)
    await filled_window(h)
    a = text_snapshot(1, PROMPT, REPLY, host="h1", model="prov/model-a")
    b = text_snapshot(2, PROMPT, REPLY, host="h2", model="prov/model-b", ended_at=5)
    assert a["prompt_ref"] == b["prompt_ref"] and a["agent_id"] != b["agent_id"]
    first = await h.feed(a, key=prompt_key(a))
    assert first.written == []  # alone it is nothing: not novel, not sampled, no partner yet
    second = await h.feed(b, key=prompt_key(b))
    traces = second.values("traces.sampled")
    assert [t["host"] for t in traces] == ["h2", "h1"]  # the turn, then its partner read back
    assert [t["decision"]["reason"] for t in traces] == ["pair", "pair"]
    pair_ids = {t["decision"]["pair"]["pair_id"] for t in traces}
    assert len(pair_ids) == 1
    assert traces[0]["decision"]["pair"]["partner_trace_id"] == traces[1]["trace_id"]
    assert traces[1]["decision"]["pair"]["partner_agent_id"] == "prov/model-b:build"
    for trace in traces:  # what the panel's splitter pairs by, on the answering messages
        answer = [m for m in trace["messages"] if m["role"] == "assistant"]
        assert {m["prompt_ref"] for m in answer} == {a["prompt_ref"]}
    assert {m["agent_id"] for t in traces for m in t["messages"] if m["role"] == "assistant"} == {
        "prov/model-a:build", "prov/model-b:build"}
    assert len(second.values(SHIPPED)) == 2  # both forwards count in the window and the budget
    again = text_snapshot(3, PROMPT, REPLY, host="h3", model="prov/model-a", ended_at=7)
    assert (await h.feed(again, key=prompt_key(again))).written == []  # a turn is in one pair at most


@pytest.mark.asyncio
async def test_the_same_prompt_on_the_same_model_never_pairs(tmp_path: Path, clock: FakeClock) -> None:
    h, _ = sampler(tmp_path, clock)
    await filled_window(h)
    for i, host in enumerate(["h1", "h2", "h3"]):
        snap = text_snapshot(10 + i, PROMPT, REPLY, host=host, model="prov/model-a")
        assert (await h.feed(snap, key=prompt_key(snap))).written == []


@pytest.mark.asyncio
async def test_a_paired_error_is_forwarded_once_with_both_facts(tmp_path: Path, clock: FakeClock) -> None:
    h, _ = sampler(tmp_path, clock)
    await filled_window(h)
    a = text_snapshot(1, PROMPT, REPLY, host="h1", model="prov/model-a")
    b = text_snapshot(2, PROMPT, REPLY, host="h2", model="prov/model-b", tool_error=True)
    await h.feed(a, key=prompt_key(a))
    traces = (await h.feed(b, key=prompt_key(b))).values("traces.sampled")
    own = [t for t in traces if t["snapshot_id"] == b["snapshot_id"]]
    assert len(own) == 1
    assert own[0]["decision"]["reason"] == "error_flag"
    assert own[0]["decision"]["facts"] == ["error_flag", "pair"]
    assert [t["decision"]["reason"] for t in traces if t["snapshot_id"] == a["snapshot_id"]] == ["pair"]


@pytest.mark.asyncio
async def test_a_partner_forwarded_before_is_sent_again_with_the_pair_and_not_counted_twice(
        tmp_path: Path, clock: FakeClock) -> None:
    h, _ = sampler(tmp_path, clock)
    a = text_snapshot(1, PROMPT, REPLY, host="h1", model="prov/model-a")
    first = await h.feed(a, key=prompt_key(a))
    (forwarded,) = first.values("traces.sampled")
    assert forwarded["decision"]["reason"] == "novelty" and forwarded["decision"]["pair"] is None
    b = text_snapshot(2, PROMPT, REPLY, host="h2", model="prov/model-b")
    second = await h.feed(b, key=prompt_key(b))
    resent = [t for t in second.values("traces.sampled") if t["snapshot_id"] == a["snapshot_id"]]
    assert len(resent) == 1 and resent[0]["trace_id"] == forwarded["trace_id"]  # the panel upserts it
    assert resent[0]["decision"]["reason"] == "novelty"
    assert resent[0]["decision"]["facts"] == ["pair", "novelty"]
    assert [s["snapshot_id"] for s in second.values(SHIPPED)] == [b["snapshot_id"]]


@pytest.mark.asyncio
async def test_a_partner_past_retention_is_forgotten_and_the_turn_decided_alone(tmp_path: Path,
                                                                                clock: FakeClock) -> None:
    h, _ = sampler(tmp_path, clock)
    await filled_window(h)
    a = text_snapshot(1, PROMPT, REPLY, host="h1", model="prov/model-a")
    await h.feed(a, key=prompt_key(a))
    h.forget()
    b = text_snapshot(2, PROMPT, REPLY, host="h2", model="prov/model-b")
    assert (await h.feed(b, key=prompt_key(b))).written == []
    c = text_snapshot(3, PROMPT, REPLY, host="h3", model="prov/model-c")
    traces = (await h.feed(c, key=prompt_key(c))).values("traces.sampled")  # b is still there to pair
    assert {t["snapshot_id"] for t in traces} == {b["snapshot_id"], c["snapshot_id"]}


@pytest.mark.asyncio
async def test_the_pair_window_survives_a_restart_and_is_swept_after_it(tmp_path: Path, clock: FakeClock) -> None:
    h, _ = sampler(tmp_path, clock)
    await filled_window(h)
    a = text_snapshot(1, PROMPT, REPLY, host="h1", model="prov/model-a")
    await h.feed(a, key=prompt_key(a))
    restarted, core = sampler(tmp_path, clock, table=h.table)
    restarted.inputs = h.inputs  # the topic is the same
    restarted._offset = h._offset
    for shipped in h.sinks.values(SHIPPED):  # its novelty window: sampler.shipped replayed
        await core.apply_shipped(encode(shipped))
    b = text_snapshot(2, PROMPT, REPLY, host="h2", model="prov/model-b")
    assert len((await restarted.feed(b, key=prompt_key(b))).values("traces.sampled")) == 2
    assert prompt_key(a).encode() in restarted.table
    await clock.advance(25 * 3600)  # past the 24 h window (and the 10-minute sweep period)
    other = text_snapshot(5, "something else entirely", "fine")
    await restarted.feed(other, key=key_of(other))
    assert prompt_key(a).encode() not in restarted.table
