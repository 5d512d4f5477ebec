"""agents/ingest.py's core through the harness: a snapshot at each turn's end, repeats
deduplicated, and state that reaches the table only once the snapshot is out."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.ingest import IngestStage
from agents.stage import Meta
from devkit.clock import FakeClock
from devkit.harness import MemoryTable, StageHarness
from pipeline.model.records import encode
from tests.factory import turn_ended_envelope
from tests.unit.agents.conftest import make_config

KEY = "h1:ses_test000001"


def ingest(tmp_path: Path, clock: FakeClock, table: MemoryTable | None = None) -> StageHarness:
    h = StageHarness("ingest", clock, table=table)
    return h.bind(IngestStage(make_config(tmp_path), clock, h.state))


@pytest.mark.asyncio
async def test_a_turn_end_emits_its_snapshot_keyed_by_its_prompt(tmp_path: Path, clock: FakeClock) -> None:
    h = ingest(tmp_path, clock)
    batch = await h.feed(turn_ended_envelope(1), key=KEY)
    (snapshot,) = batch.values("sessions.idle")
    assert snapshot["session_id"] == "ses_test000001" and snapshot["host"] == "h1"
    assert snapshot["prompt_ref"].startswith("pr_") and snapshot["schema"] == "session.snapshot/2"
    # the pair window's partition: every turn of the prompt, from any host, lands there
    assert [w.key for w in batch.written] == [snapshot["prompt_ref"].encode()]
    assert batch.dead == []
    assert h.table.get(KEY.encode()) is not None  # the session's own state stays keyed by session


@pytest.mark.asyncio
async def test_a_turn_without_a_prompt_is_keyed_by_its_session(tmp_path: Path, clock: FakeClock) -> None:
    h = ingest(tmp_path, clock)
    envelope = turn_ended_envelope(1)
    for message in envelope["properties"]["messages"]:
        if message["info"]["role"] == "user":
            message["parts"] = [p for p in message["parts"] if p.get("type") != "text"]
    batch = await h.feed(envelope, key=KEY)
    (snapshot,) = batch.values("sessions.idle")
    assert snapshot["prompt_ref"] is None
    assert [w.key for w in batch.written] == [KEY.encode()]


@pytest.mark.asyncio
async def test_a_repeated_event_emits_nothing_even_after_a_restart(tmp_path: Path, clock: FakeClock) -> None:
    h = ingest(tmp_path, clock)
    envelope = turn_ended_envelope(2)
    assert len((await h.feed(envelope, key=KEY)).values("sessions.idle")) == 1
    assert (await h.feed(envelope, key=KEY)).written == []
    restarted = ingest(tmp_path, clock, table=h.table)  # a new replica on the same changelog
    assert (await restarted.feed(envelope, key=KEY)).written == []


@pytest.mark.asyncio
async def test_state_waits_for_the_outputs_so_a_crash_before_them_emits_again(tmp_path: Path,
                                                                             clock: FakeClock) -> None:
    h = ingest(tmp_path, clock)
    core = IngestStage(make_config(tmp_path), clock, h.state)
    envelope = turn_ended_envelope(3)
    outs = await core.handle(envelope, Meta(KEY.encode(), 0, 0, encode(envelope)))
    assert len(outs) == 1
    assert h.table == {} and KEY.encode() in h.state.pending  # not in the table before the drain
    # the process dies here: a new replica reads the same table and emits the snapshot again
    restarted = ingest(tmp_path, clock, table=h.table)
    assert len((await restarted.feed(envelope, key=KEY)).values("sessions.idle")) == 1


@pytest.mark.asyncio
async def test_an_invalid_event_is_dead_lettered_with_its_bytes(tmp_path: Path, clock: FakeClock) -> None:
    h = ingest(tmp_path, clock)
    batch = await h.feed(b'{"not": "an envelope"}', key=KEY)
    (letter,) = batch.dead
    assert letter["stage"] == "ingest" and letter["source_topic"] == "opencode.events"
    assert batch.values("sessions.idle") == []
