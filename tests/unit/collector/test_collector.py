"""The collector as a whole (pipeline/collector/collector.py): hosts that cannot hurt each other,
the checkpoints of their state, and what it refuses or skips.

Run against the in-process fakes of fakes.py on a FakeClock.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from devkit.clock import FakeClock
from pipeline.collector.collector import Collector
from pipeline.collector.sink import SinkClosed
from pipeline.collector.state import state_file
from pipeline.model.envelope import EventFilter, normalise
from tests.fixtures import OPENCODE
from tests.unit.collector.fakes import (
    FakeDaemon,
    MemorySink,
    assert_valid,
    collector,
    host,
    idle_frames,
    running,
    turn,
    until,
)

GLOBAL_SESSION = "ses_e037aa82effej6NcN63unzTIAN"


@pytest.mark.asyncio
async def test_streams_capture_while_another_host_refuses_connections() -> None:
    capture = [json.loads(line) for line in
               (OPENCODE / "opencode-1.18.33-global-events.ndjson").read_text().splitlines()]
    listing = json.loads((OPENCODE / "opencode-1.18.33-messages-tool-session.json").read_text())
    clock, sink = FakeClock(), MemorySink()
    up = FakeDaemon(clock)
    c = collector(clock, {"down": None, "up": up}, sink)
    async with running(c):
        await until(clock, lambda: c.stats["up"].reconciles == 1)
        up.put_session(GLOBAL_SESSION, listing)
        up.push(*capture)
        await until(clock, lambda: c.stats["up"].turns_unchanged == 1)  # the second idle
        await until(clock, lambda: c.stats["down"].reconnects >= 3)

    expected = [e for e in (normalise(f, host="up", site_key="k", received_at_ms=0)
                            for f in capture) if e and EventFilter().keeps(e["type"])]
    produced = sink.events(host="up")
    assert [e["event_id"] for e in produced if e["type"] != "pipeline.turn_ended"] == [
        e["event_id"] for e in expected]
    for record in produced:
        assert_valid("event.v1", record)
    assert {k for _, k, _ in sink.records} == {f"up:{GLOBAL_SESSION}".encode()}
    [ended] = sink.turns()
    assert ended["properties"]["trigger"] == "session.status"  # status idle comes first
    assert ended["properties"]["messages"] == listing
    assert ended["properties"]["session"]["id"] == GLOBAL_SESSION
    assert (ended["backfill"], ended["source"]) == (False, "sse")
    # the turn_ended comes after the idle that caused it
    assert produced.index(ended) > [e["type"] for e in produced].index("session.status")

    down, up_stats = c.stats["down"], c.stats["up"]
    assert not down.connected and down.connections == 0 and down.last_error
    # in: the capture, the fake's own server.connected, and however many heartbeats it sent
    assert up_stats.events_in >= len(capture) + 1
    assert up_stats.events_out == len(expected)
    assert up_stats.events_filtered == up_stats.events_in - len(expected)
    assert up_stats.events_malformed == 0 and up_stats.turns_emitted == 1
    assert c.totals()["events_out"] == len(expected)


class FailingFlushSink(MemorySink):
    """A sink whose `flush` fails until `healthy` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.healthy = False

    async def flush(self) -> None:
        await super().flush()
        if not self.healthy:
            raise SinkClosed("broker gone")


@pytest.mark.asyncio
async def test_state_is_saved_only_after_the_sink_flushed(tmp_path: Path) -> None:
    clock, sink = FakeClock(), FailingFlushSink()
    fake = FakeDaemon(clock)
    c = collector(clock, {"h": fake}, sink, state_dir=tmp_path)
    path = state_file(tmp_path, "h")
    async with running(c):
        await until(clock, lambda: c.stats["h"].reconciles == 1)
        fake.put_session("ses_k", turn("ses_k", 1))
        fake.push(*idle_frames("ses_k"))
        await until(clock, lambda: len(sink.turns()) == 1)
        await until(clock, lambda: sink.flushes >= 2)  # two checkpoints tried, neither saved
        assert not path.exists() and c.checkpoints == 0
        sink.healthy = True
        await until(clock, lambda: c.checkpoints == 1)
        assert set(json.loads(path.read_text())["sessions"]) == {"ses_k"}
        flushes = sink.flushes
        await clock.advance(3 * c.settings.checkpoint_interval_s)
        assert sink.flushes == flushes  # nothing new reported: nothing to save


@pytest.mark.asyncio
async def test_disabled_collector_connects_to_nothing() -> None:
    clock = FakeClock()
    fake = FakeDaemon(clock)
    c = collector(clock, {"h": fake}, MemorySink(), enabled=False)
    await asyncio.wait_for(c.run(), 1)
    assert fake.connections == 0


def test_duplicate_host_names_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate host names: h"):
        Collector([host("h", "http://127.0.0.1:1"), host("h", "http://127.0.0.1:2")],
                  MemorySink())
