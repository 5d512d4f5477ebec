"""The aiokafka sink (pipeline/collector/sink.py) with its broker down: a bounded buffer, then
back-pressure, retries on the sink's clock, and drops counted on close."""

from __future__ import annotations

import asyncio
import logging
import random
import socket

import pytest

from devkit.clock import FakeClock, settle
from pipeline.collector.sink import KafkaEventSink, SinkClosed


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def parked(clock: FakeClock) -> None:
    """Until the sink waits on its clock: its producer failed to start (on a real socket) and
    it sleeps before the next attempt."""
    async with asyncio.timeout(5):
        while clock.sleeping == 0:
            await asyncio.sleep(0.001)


@pytest.mark.asyncio
async def test_kafka_sink_buffers_to_its_bound_then_blocks_and_counts_drops(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    sink = KafkaEventSink(f"127.0.0.1:{closed_port()}", max_buffered=3, clock=clock,
                          rng=random.Random(0))
    await sink.start()
    for i in range(3):
        await asyncio.wait_for(sink.send("opencode.events", b"h:s", b'{"n": %d}' % i), 0.5)
    assert sink.buffered == 3
    blocked = asyncio.create_task(sink.send("opencode.events", b"h:s", b"{}"))
    with caplog.at_level(logging.WARNING, logger="pipeline.collector"):
        for _ in range(3):  # retry after retry, the broker stays down
            await parked(clock)
            await clock.advance(30)  # retry_max_s
        await parked(clock)
        await settle()
    assert not blocked.done()  # back-pressure: the fourth waits for room
    assert caplog.text.count("kafka producer cannot start") >= 3
    blocked.cancel()
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="pipeline.collector"):
        lost = await sink.close(timeout_s=0.1)
    assert lost == 3 and sink.dropped == 3 and sink.sent == 0 and not sink.broker_up
    assert "3 undelivered records" in caplog.text
    with pytest.raises(SinkClosed):
        await sink.send("opencode.events", b"h:s", b"{}")


@pytest.mark.asyncio
async def test_flush_of_a_sink_that_is_not_running_says_so() -> None:
    sink = KafkaEventSink(f"127.0.0.1:{closed_port()}", clock=FakeClock())
    await sink.send("opencode.events", b"h:s", b"{}")
    with pytest.raises(SinkClosed, match="not running"):
        await sink.flush()
    assert await sink.close(timeout_s=0) == 1
