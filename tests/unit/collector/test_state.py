"""What the collector remembers across restarts (pipeline/collector/state.py): the state file,
and through a collector restarted on it, that turns are neither doubled nor lost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from devkit.clock import FakeClock
from pipeline.collector.state import STATE_VERSION, HostState, state_file
from pipeline.model.snapshot import snapshot_id
from tests.unit.collector.fakes import (
    QUIET_S,
    FakeDaemon,
    MemorySink,
    collector,
    frame,
    idle_frames,
    last_message_ids,
    running,
    turns_of,
    until,
)

# ---------------------------------------------------------------- the file


def test_state_round_trips_through_its_file(tmp_path: Path) -> None:
    path = state_file(tmp_path / "state", "h")
    state = HostState(watermark_ms=5, sessions={"ses_a": {"last_message_id": "msg_1"}})
    HostState.save(path, state.to_dict("h"))
    assert HostState.load(path) == state
    assert json.loads(path.read_text())["version"] == STATE_VERSION
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


@pytest.mark.parametrize("content", [None, "{not json", '{"version": 99, "sessions": {}}', "[]"])
def test_a_missing_or_unreadable_state_file_starts_fresh(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "state.json"
    if content is not None:
        path.write_text(content)
    assert HostState.load(path) == HostState()


def test_state_files_of_hosts_whose_names_sanitise_alike_differ(tmp_path: Path) -> None:
    assert state_file(tmp_path, "a/b") != state_file(tmp_path, "a?b")
    assert state_file(tmp_path, "a/b").parent == tmp_path


# ---------------------------------------------------------------- across restarts


async def end_turn(clock: FakeClock, fake: FakeDaemon, sink: MemorySink, session_id: str,
                   count: int) -> None:
    """The session's `count`th turn ends: its listing grows and one idle frame says so."""
    reported = len(sink.turns())
    fake.put_session(session_id, turns_of(session_id, count))
    fake.push(frame("session.idle", {"sessionID": session_id}))
    await until(clock, lambda: len(sink.turns()) > reported)


@pytest.mark.asyncio
async def test_restart_with_state_dir_neither_doubles_nor_loses(tmp_path: Path) -> None:
    clock = FakeClock()
    fake = FakeDaemon(clock)
    fake.put_session("ses_c", turns_of("ses_c", 1))
    fake.put_session("ses_d", turns_of("ses_d", 1))

    first_sink = MemorySink()
    first = collector(clock, {"h": fake}, first_sink, state_dir=tmp_path)
    async with running(first):
        await until(clock, lambda: len(first_sink.turns()) == 2)
    assert {t["session_id"] for t in first_sink.turns()} == {"ses_c", "ses_d"}
    assert all(t["backfill"] for t in first_sink.turns())
    saved = json.loads(state_file(tmp_path, "h").read_text())
    assert set(saved["sessions"]) == {"ses_c", "ses_d"}

    # Restarted: nothing new to report, so not even a message fetch.
    fetched = fake.message_requests
    second_sink = MemorySink()
    second = collector(clock, {"h": fake}, second_sink, state_dir=tmp_path)
    async with running(second):
        await until(clock, lambda: second.stats["h"].reconciles >= 1 and bool(fake.streams))
        await clock.advance(QUIET_S)
        assert second_sink.turns() == [] and fake.message_requests == fetched
        # ...and what ended next is reported once, though both idle frames ask for it.
        fake.put_session("ses_c", turns_of("ses_c", 2), updated=clock.now_ms() + 5)
        fake.push(*idle_frames("ses_c"))
        await until(clock, lambda: len(second_sink.turns()) >= 1)
        await clock.advance(QUIET_S)
    assert [t["session_id"] for t in second_sink.turns()] == ["ses_c"]
    assert second.stats["h"].reconnects == 0

    # A fresh state dir has no memory: the control case, it re-emits every completed turn
    # in the listings (ses_c's two and ses_d's one); ingest dedupes them by snapshot id.
    third_sink = MemorySink()
    third = collector(clock, {"h": fake}, third_sink, state_dir=tmp_path / "fresh")
    async with running(third):
        await until(clock, lambda: len(third_sink.turns()) >= 3)
    assert sorted(t["session_id"] for t in third_sink.turns()) == ["ses_c", "ses_c", "ses_d"]


@pytest.mark.asyncio
async def test_turns_beyond_max_messages_are_each_reported_once_across_restarts(
        tmp_path: Path) -> None:
    # Two turns fill max_messages=4: from the third on, the listing (fetched with that limit)
    # starts after the first message, so every earlier turn's window is cut shorter than it
    # was when that turn was reported, and its windowed snapshot id is not the reported one.
    settings: dict[str, Any] = dict(max_messages=4, state_dir=tmp_path)
    clock = FakeClock()
    fake = FakeDaemon(clock)
    sink = MemorySink()
    first = collector(clock, {"h": fake}, sink, **settings)
    async with running(first):
        await until(clock, lambda: first.stats["h"].reconciles >= 1 and bool(fake.streams))
        for count in (1, 2, 3):
            await end_turn(clock, fake, sink, "ses_w", count)
        await clock.advance(QUIET_S)  # room for a duplicate to show up
    assert last_message_ids(sink.turns()) == ["msg_0001b", "msg_0002b", "msg_0003b"]
    assert [len(t["properties"]["messages"]) for t in sink.turns()] == [2, 4, 4]

    second_sink = MemorySink()
    second = collector(clock, {"h": fake}, second_sink, **settings)
    async with running(second):
        await until(clock, lambda: second.stats["h"].reconciles >= 1 and bool(fake.streams))
        # an idle with nothing new after the restart: the reported turn is recognised
        fake.push(frame("session.idle", {"sessionID": "ses_w"}))
        await until(clock, lambda: second.stats["h"].turns_unchanged >= 1)
        await end_turn(clock, fake, second_sink, "ses_w", 4)
        await clock.advance(QUIET_S)
    assert last_message_ids(second_sink.turns()) == ["msg_0004b"]
    [fourth] = second_sink.turns()
    assert [m["info"]["id"] for m in fourth["properties"]["messages"]] == [
        "msg_0003a", "msg_0003b", "msg_0004a", "msg_0004b"]


@pytest.mark.asyncio
async def test_a_state_file_from_before_turn_digests_does_not_resend_the_reported_turn(
        tmp_path: Path) -> None:
    # What an older collector saved after reporting turn 2 of a session: a snapshot id of the
    # window it sent and the last message id, no digest of that message.
    reported_window = turns_of("ses_v", 2)
    legacy = {"version": 1, "host": "h", "watermark_ms": None, "sessions": {"ses_v": {
        "snapshot_id": snapshot_id("h", "ses_v", reported_window), "last_message_id": "msg_0002b",
        "session_updated": 0, "reported_at": 0}}}
    state_file(tmp_path, "h").write_text(json.dumps(legacy))
    clock, sink = FakeClock(), MemorySink()
    fake = FakeDaemon(clock)
    fake.put_session("ses_v", turns_of("ses_v", 3))
    c = collector(clock, {"h": fake}, sink, max_messages=4, state_dir=tmp_path)
    async with running(c):
        await until(clock, lambda: len(sink.turns()) >= 1)  # the connect's reconcile finds turn 3
        await clock.advance(QUIET_S)
    [backfilled] = sink.turns()
    assert last_message_ids([backfilled]) == ["msg_0003b"] and backfilled["backfill"]
    saved = json.loads(state_file(tmp_path, "h").read_text())["sessions"]["ses_v"]
    assert saved["last_message_id"] == "msg_0003b"
