"""agents/intake.py: the stage's input from the consumer's fetch to its agent loop, with faust's
stream rules for what is taken and what is acknowledged."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from faust.types import TP

from agents.intake import Intake

TOPIC = "opencode.events"


@dataclass
class Message:
    offset: int
    generation_id: int = 1
    partition: int = 0
    topic: str = TOPIC

    @property
    def tp(self) -> TP:
        return TP(self.topic, self.partition)


@dataclass
class Consumer:
    acked: list[int] = field(default_factory=list)

    def ack(self, message: Message) -> bool:
        self.acked.append(message.offset)
        return True


class FlowControl:
    def __init__(self) -> None:
        self.active = True

    def is_active(self) -> bool:
        return self.active


def app(generation: int = 1) -> Any:
    return SimpleNamespace(consumer_generation_id=generation, flow_control=FlowControl(), consumer=Consumer(),
                           monitor=SimpleNamespace(stream_inbound_time={}))


async def filled(intake: Intake, messages: list[Message]) -> Intake:
    for m in messages:
        await intake.put(m)
    return intake


@pytest.mark.asyncio
async def test_records_are_taken_in_fetch_order_at_most_a_batch_at_a_time() -> None:
    intake = await filled(Intake(app(), TOPIC), [Message(i) for i in range(5)])
    assert [m.offset for m in await intake.take(3)] == [0, 1, 2]
    assert [m.offset for m in await intake.take(3)] == [3, 4]
    assert len(intake) == 0


@pytest.mark.asyncio
async def test_take_waits_for_the_first_record() -> None:
    intake = Intake(app(), TOPIC)
    taking = asyncio.create_task(intake.take(10))
    await asyncio.sleep(0.01)
    assert not taking.done()
    await intake.put(Message(7))
    assert [m.offset for m in await asyncio.wait_for(taking, 1)] == [7]


@pytest.mark.asyncio
async def test_records_fetched_before_the_last_rebalance_are_dropped_unacknowledged() -> None:
    # faust's stream skips them too: the rebalance sought every partition back to its committed
    # offset, so they are fetched again, in order, with the new generation
    the_app = app(generation=2)
    intake = await filled(Intake(the_app, TOPIC), [Message(0, generation_id=1), Message(1, generation_id=1),
                                                   Message(0, generation_id=2)])
    taken = await intake.take(10)
    assert [(m.offset, m.generation_id) for m in taken] == [(0, 2)]
    assert the_app.consumer.acked == []


@pytest.mark.asyncio
async def test_records_taken_while_the_flow_is_stopped_are_dropped_and_the_take_waits_for_more() -> None:
    the_app = app()
    intake = await filled(Intake(the_app, TOPIC), [Message(0), Message(1)])
    the_app.flow_control.active = False
    taking = asyncio.create_task(intake.take(10))
    await asyncio.sleep(0.01)
    assert not taking.done() and len(intake) == 0
    the_app.flow_control.active = True
    await intake.put(Message(0))
    assert [m.offset for m in await asyncio.wait_for(taking, 1)] == [0]


@pytest.mark.asyncio
async def test_a_full_intake_holds_the_fetch_until_the_agent_takes() -> None:
    intake = await filled(Intake(app(), TOPIC, capacity=2), [Message(0), Message(1)])
    putting = asyncio.create_task(intake.put(Message(2)))
    await asyncio.sleep(0.01)
    assert not putting.done()  # the drain loop waits (inside faust's race against a rebalance)
    assert [m.offset for m in await intake.take(1)] == [0]
    await asyncio.wait_for(putting, 1)
    assert [m.offset for m in await intake.take(10)] == [1, 2]


@pytest.mark.asyncio
async def test_only_ack_lets_a_commit_pass_records_and_taking_marks_the_partition_as_processing() -> None:
    the_app = app()
    intake = await filled(Intake(the_app, TOPIC), [Message(0), Message(1, partition=3)])
    taken = await intake.take(10)
    assert the_app.consumer.acked == []  # taking is not acknowledging
    assert set(the_app.monitor.stream_inbound_time) == {TP(TOPIC, 0), TP(TOPIC, 3)}
    intake.ack(taken)
    assert the_app.consumer.acked == [0, 1]


@pytest.mark.asyncio
async def test_a_batch_waits_up_to_within_s_for_the_rest() -> None:
    intake = await filled(Intake(app(), TOPIC), [Message(0)])
    taking = asyncio.create_task(intake.take(3, within_s=5.0))
    await asyncio.sleep(0.01)
    assert not taking.done()
    await intake.put(Message(1))
    await asyncio.sleep(0.01)
    assert not taking.done()
    await intake.put(Message(2))  # the batch is full: taken at once, not after 5 s
    assert [m.offset for m in await asyncio.wait_for(taking, 1)] == [0, 1, 2]


@pytest.mark.asyncio
async def test_a_batch_that_does_not_fill_is_taken_after_within_s() -> None:
    intake = await filled(Intake(app(), TOPIC), [Message(0)])
    taken = await asyncio.wait_for(intake.take(3, within_s=0.02), 1)
    assert [m.offset for m in taken] == [0]


@pytest.mark.asyncio
async def test_a_record_arriving_after_within_s_is_taken_at_once() -> None:
    # the window runs from the call, as take_events' did: a record that arrives after it has
    # waited for nothing else, so it does not wait a whole window more
    intake = Intake(app(), TOPIC)
    taking = asyncio.create_task(intake.take(3, within_s=0.2))
    await asyncio.sleep(0.3)
    loop = asyncio.get_running_loop()
    put_at = loop.time()
    await intake.put(Message(0))
    assert [m.offset for m in await asyncio.wait_for(taking, 1)] == [0]
    assert loop.time() - put_at < 0.2
