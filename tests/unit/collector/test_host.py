"""One host's task (pipeline/collector/host.py): its event stream and silence limit, turn ends,
backfill on reconnect, the poll fallback, malformed frames and back-pressure.

Run against the in-process fakes of fakes.py on a FakeClock: the collector's own defaults
(heartbeat every 10 s, 30 s of silence is a dead stream) cost no real time.
"""

from __future__ import annotations

import base64
import json

import pytest

from devkit.clock import FakeClock
from tests.unit.collector.fakes import (
    QUIET_S,
    FakeDaemon,
    MemorySink,
    assert_valid,
    collector,
    frame,
    idle_frames,
    one_host,
    running,
    turn,
    until,
)

# ---------------------------------------------------------------- the event stream


@pytest.mark.asyncio
async def test_silent_stream_is_reconnected_and_a_heartbeating_one_is_not() -> None:
    clock = FakeClock()
    silent, alive = FakeDaemon(clock, heartbeat_s=None), FakeDaemon(clock)
    c = collector(clock, {"silent": silent, "alive": alive}, MemorySink())
    async with running(c):
        await until(clock, lambda: silent.connections >= 3)
        assert alive.connections == 1
        assert c.stats["alive"].connected and c.stats["alive"].reconnects == 0
    assert c.stats["silent"].reconnects >= 2
    assert "no frame" in (c.stats["silent"].last_error or "")


@pytest.mark.asyncio
async def test_silence_is_measured_from_the_last_frame() -> None:
    clock = FakeClock()
    fake = FakeDaemon(clock, heartbeat_s=None)
    c = collector(clock, {"h": fake}, MemorySink())
    silence_s = c.settings.silence_s
    async with running(c):
        await until(clock, lambda: c.stats["h"].connected)
        await clock.advance(silence_s - 1)
        fake.push(frame("session.updated", {"sessionID": "ses_s", "info": {"id": "ses_s"}}))
        await clock.advance(silence_s - 1)  # 2 x silence since connecting, not since that frame
        assert fake.connections == 1 and c.stats["h"].reconnects == 0
        await clock.advance(2)
        assert c.stats["h"].reconnects == 1


# ---------------------------------------------------------------- turn ends


@pytest.mark.asyncio
async def test_turn_ended_waits_for_the_last_message_to_settle() -> None:
    clock, sink = FakeClock(), MemorySink()
    async with one_host(clock, sink) as (fake, c):
        await until(clock, lambda: c.stats["h"].reconciles == 1)
        fake.put_session("ses_a", turn("ses_a", 1, completed=False))
        fake.push(*idle_frames("ses_a"))
        await until(clock, lambda: fake.message_requests >= 3)
        assert sink.turns() == []
        fake.listings["ses_a"] = turn("ses_a", 1)
        await until(clock, lambda: c.stats["h"].turns_unchanged == 1)
    [ended] = sink.turns()
    assert ended["properties"]["messages"][-1]["info"]["time"]["completed"]
    assert c.stats["h"].unsettled_turns == 0


@pytest.mark.asyncio
async def test_a_turn_that_never_settles_is_reported_as_it_is_when_waiting_runs_out() -> None:
    clock, sink = FakeClock(), MemorySink()
    async with one_host(clock, sink) as (fake, c):
        await until(clock, lambda: c.stats["h"].reconciles == 1)
        fake.put_session("ses_u", turn("ses_u", 1, completed=False))
        fake.push(frame("session.idle", {"sessionID": "ses_u"}))
        await clock.advance(c.settings.settle_timeout_s - 1)
        assert sink.turns() == []  # still waiting for it to settle
        await until(clock, lambda: len(sink.turns()) == 1)
    [ended] = sink.turns()
    assert "completed" not in ended["properties"]["messages"][-1]["info"]["time"]
    assert c.stats["h"].unsettled_turns == 1


@pytest.mark.asyncio
async def test_backfill_after_a_turn_that_ended_while_disconnected() -> None:
    clock, sink = FakeClock(), MemorySink()
    async with one_host(clock, sink) as (fake, c):
        await until(clock, lambda: c.stats["h"].reconciles == 1)
        fake.put_session("ses_b", turn("ses_b", 1))
        fake.push(*idle_frames("ses_b"))
        await until(clock, lambda: len(sink.turns()) == 1 and c.stats["h"].turns_unchanged == 1)

        fake.accepting = False
        fake.drop()
        await until(clock, lambda: not c.stats["h"].connected)
        fake.put_session("ses_b", turn("ses_b", 1) + turn("ses_b", 2), updated=clock.now_ms() + 5)
        fake.accepting = True
        await until(clock, lambda: len(sink.turns()) == 2)
        await until(clock, lambda: c.stats["h"].reconciles >= 2)
    live, backfilled = sink.turns()
    assert (live["backfill"], live["source"]) == (False, "sse")
    assert (backfilled["backfill"], backfilled["source"]) == (True, "reconcile")
    assert backfilled["properties"]["trigger"] == "reconcile"
    assert [m["info"]["id"] for m in backfilled["properties"]["messages"]][-1] == "msg_0002b"
    assert c.stats["h"].backfills == 1 and c.stats["h"].connections >= 2


@pytest.mark.asyncio
async def test_poll_fallback_when_the_stream_only_sends_heartbeats() -> None:
    clock, sink = FakeClock(), MemorySink()
    fake = FakeDaemon(clock)
    fake.put_session("ses_p", turn("ses_p", 1, completed=False))
    fake.status = {"ses_p": {"type": "busy"}}
    c = collector(clock, {"h": fake}, sink, poll_interval_s=10.0)
    async with running(c):
        await until(clock, lambda: c.stats["h"].polls >= 2)
        assert sink.turns() == []  # busy: nothing ended yet
        fake.listings["ses_p"] = turn("ses_p", 1)
        fake.status = {}
        await until(clock, lambda: len(sink.turns()) == 1)
    [ended] = sink.turns()
    assert (ended["source"], ended["backfill"]) == ("poll", False)
    assert ended["properties"]["messages"][-1]["info"]["time"]["completed"]


# ---------------------------------------------------------------- garbage and back-pressure


@pytest.mark.asyncio
async def test_malformed_frames_are_dead_lettered_and_the_stream_goes_on() -> None:
    clock, sink = FakeClock(), MemorySink()
    async with one_host(clock, sink) as (fake, c):
        await until(clock, lambda: c.stats["h"].connected)
        good = frame("session.updated", {"sessionID": "ses_g", "info": {"id": "ses_g"}})
        wrong = {"payload": {"id": "evt_x", "type": "session.idle",
                             "properties": {"sessionID": 7}}}
        fake.push(b"data: {not json\n\n", wrong, b"data: [1, 2]\n\n", good)
        await until(clock, lambda: len(sink.events("session.updated")) == 1)
    dead = sink.dead()
    assert [d["reason"] for d in dead] == ["not_json", "bad_session_id", "not_an_object"]
    for record in dead:
        assert_valid("dead-letter.v1", record)
        assert (record["stage"], record["key"]) == ("collector", "h")
    assert base64.b64decode(dead[0]["original_b64"]) == b"{not json"
    assert json.loads(base64.b64decode(dead[1]["original_b64"])) == wrong
    assert c.stats["h"].events_malformed == 3 and c.stats["h"].connections == 1


@pytest.mark.asyncio
async def test_a_blocked_sink_pauses_reading_without_loss_or_reconnect() -> None:
    clock, sink = FakeClock(), MemorySink()
    sink.gate.clear()
    async with one_host(clock, sink) as (fake, c):
        await until(clock, lambda: c.stats["h"].connected)
        frames = [frame("session.updated", {"sessionID": "ses_q", "info": {"id": "ses_q"}})
                  for _ in range(50)]
        fake.push(*frames)
        await until(clock, lambda: sink.waiting == 1)
        await clock.advance(2 * c.settings.silence_s)
        assert sink.records == [] and sink.waiting == 1
        assert c.stats["h"].events_out == 0 and fake.connections == 1
        sink.gate.set()
        await until(clock, lambda: len(sink.records) == 50)
        await clock.advance(QUIET_S)  # heartbeats keep the reading going: still one connection
    assert [r["event_id"] for r in sink.events()] == [f["payload"]["id"] for f in frames]
    assert fake.connections == 1
