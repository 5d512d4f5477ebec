"""pipeline/delivery/concurrency.py: the AIMD limit's arithmetic, and the async limiter on the
fake clock (never more in flight than the limit, first come first served, the 429 pause, a
cancelled waiter gives its place back)."""

from __future__ import annotations

import asyncio

import pytest

from devkit.clock import FakeClock, settle
from pipeline.delivery.concurrency import (
    AIMDLimit,
    ConcurrencyLimiter,
    EndpointLimiters,
    LimitSettings,
    Signal,
    signal_of,
)

OK, OVER, NEUTRAL = Signal.OK, Signal.OVERLOAD, Signal.NEUTRAL


def answered(limit: AIMDLimit, signal: Signal, n: int = 1, latency_s: float | None = 0.005) -> None:
    """`n` requests started and answered one after the other, each with the limit full."""
    for _ in range(n):
        limit.done(limit.start(), signal, latency_s, in_flight=limit.limit)


@pytest.mark.parametrize(("status", "signal"), [
    (200, OK), (202, OK), (429, OVER), (500, OVER), (503, OVER), (408, OVER), (None, OVER),
    (400, NEUTRAL), (401, NEUTRAL), (422, NEUTRAL), (302, NEUTRAL),
])
def test_what_an_answer_says_about_load(status: int | None, signal: Signal) -> None:
    assert signal_of(status) is signal


def test_good_answers_grow_the_limit_quickly_until_the_first_cut_then_by_one_a_round() -> None:
    limit = AIMDLimit(LimitSettings(max_limit=100, initial=4))
    answered(limit, OK, 6)
    assert limit.limit == 10  # slow start: one per good answer
    answered(limit, OVER)
    assert limit.limit == 5
    answered(limit, OK, 5)  # a round at 5 in flight
    assert limit.limit == 5  # 5 + 5 / 5.x: not yet 6
    answered(limit, OK, 30)
    assert 6 <= limit.limit <= 12  # about one per round of `limit` answers, not one per answer


def test_the_limit_stays_between_its_bounds() -> None:
    limit = AIMDLimit(LimitSettings(max_limit=12, min_limit=2, initial=4))
    answered(limit, OK, 100)
    assert limit.limit == 12
    for _ in range(20):
        answered(limit, OVER)
    assert limit.limit == 2


def test_a_limit_that_is_not_used_does_not_grow() -> None:
    limit = AIMDLimit(LimitSettings(max_limit=100, initial=10))
    for _ in range(50):
        limit.done(limit.start(), OK, 0.005, in_flight=2)
    assert limit.limit == 10


def test_one_cut_per_round_however_many_in_flight_answer_overload() -> None:
    limit = AIMDLimit(LimitSettings(max_limit=100, initial=40))
    burst = [limit.start() for _ in range(40)]  # 40 in flight, all answered 429
    for number in burst:
        limit.done(number, OVER, None, in_flight=40)
    assert limit.limit == 20 and limit.cuts == 1
    later = limit.start()  # started after the cut: its overload is news of the new round
    limit.done(later, OVER, None, in_flight=20)
    assert limit.limit == 10 and limit.cuts == 2


def test_neutral_answers_change_nothing() -> None:
    limit = AIMDLimit(LimitSettings(max_limit=100, initial=10))
    answered(limit, NEUTRAL, 50)
    assert limit.limit == 10


def test_risen_latency_cuts_the_limit_even_when_answers_are_good() -> None:
    limit = AIMDLimit(LimitSettings(max_limit=100, initial=10))
    answered(limit, OK, 50, latency_s=0.020)
    grown = limit.limit
    answered(limit, OK, 20, latency_s=0.200)  # ten times the baseline
    assert limit.limit < grown and limit.cuts >= 1


def test_latency_noise_under_the_floor_is_no_signal() -> None:
    limit = AIMDLimit(LimitSettings(max_limit=100, initial=10))
    answered(limit, OK, 20, latency_s=0.001)
    answered(limit, OK, 20, latency_s=0.004)  # 4x, but 4 ms
    assert limit.cuts == 0


@pytest.mark.parametrize("bad", [
    {"max_limit": 0}, {"max_limit": 5, "min_limit": 6}, {"max_limit": 5, "backoff": 1.0},
    {"max_limit": 5, "latency_tolerance": 1.0},
])
def test_settings_are_checked(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LimitSettings(**bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the async limiter


async def hold(limiter: ConcurrencyLimiter, release: asyncio.Event, started: list[int], n: int,
               signal: Signal | None = None) -> None:
    async with limiter.slot() as slot:
        started.append(n)
        await release.wait()
        if signal is not None:
            slot.record(signal)


@pytest.mark.asyncio
async def test_never_more_in_flight_than_the_limit_and_first_come_first_served() -> None:
    clock = FakeClock()
    limiter = ConcurrencyLimiter("http://panel", LimitSettings(max_limit=3, initial=3), clock, stage="t")
    release, started = asyncio.Event(), []
    tasks = [asyncio.create_task(hold(limiter, release, started, n)) for n in range(8)]
    await settle()
    assert started == [0, 1, 2] and limiter.in_flight == 3
    release.set()
    await asyncio.gather(*tasks)
    assert started == list(range(8)) and limiter.in_flight == 0


@pytest.mark.asyncio
async def test_a_cut_limit_lets_fewer_in_and_a_grown_one_more() -> None:
    clock = FakeClock()
    limiter = ConcurrencyLimiter("http://panel", LimitSettings(max_limit=8, initial=4), clock, stage="t")
    release, started = asyncio.Event(), []
    first = [asyncio.create_task(hold(limiter, release, started, n, OVER)) for n in range(4)]
    await settle()
    release.set()
    await asyncio.gather(*first)
    assert limiter.limit == 2
    release.clear()
    second = [asyncio.create_task(hold(limiter, release, started, n)) for n in range(10, 16)]
    await settle()
    assert limiter.in_flight == 2
    release.set()
    await asyncio.gather(*second)


@pytest.mark.asyncio
async def test_a_pause_holds_every_request_until_it_ends() -> None:
    clock = FakeClock()
    limiters = EndpointLimiters(LimitSettings(max_limit=5), clock, stage="t")
    limiter = limiters.get("http://panel")
    limiters.hold_off("http://panel", clock.now_ms() + 2500)
    release, started = asyncio.Event(), []
    release.set()
    tasks = [asyncio.create_task(hold(limiter, release, started, n)) for n in range(3)]
    await settle()
    assert started == []
    await clock.advance(2.4)
    assert started == []
    await clock.advance(0.2)
    await asyncio.gather(*tasks)
    assert sorted(started) == [0, 1, 2]


@pytest.mark.asyncio
async def test_a_pause_that_begins_while_waiting_for_a_place_is_honoured() -> None:
    clock = FakeClock()
    limiter = ConcurrencyLimiter("http://panel", LimitSettings(max_limit=1, initial=1), clock, stage="t")
    release, started = asyncio.Event(), []
    first = asyncio.create_task(hold(limiter, release, started, 0))
    second = asyncio.create_task(hold(limiter, release, started, 1))
    await settle()
    limiter.hold_off(clock.now_ms() + 1000)  # the first one's answer was a 429
    release.set()
    await first
    await settle()
    assert started == [0] and limiter.in_flight == 0
    await clock.advance(1.1)
    await second
    assert started == [0, 1]


@pytest.mark.asyncio
async def test_a_cancelled_waiter_gives_its_place_back() -> None:
    clock = FakeClock()
    limiter = ConcurrencyLimiter("http://panel", LimitSettings(max_limit=1, initial=1), clock, stage="t")
    release, started = asyncio.Event(), []
    first = asyncio.create_task(hold(limiter, release, started, 0))
    waiting = asyncio.create_task(hold(limiter, release, started, 1))
    third = asyncio.create_task(hold(limiter, release, started, 2))
    await settle()
    waiting.cancel()
    release.set()
    await first
    await third
    assert started == [0, 2] and limiter.in_flight == 0 and waiting.cancelled()


@pytest.mark.asyncio
async def test_after_a_pause_the_waiters_go_in_the_order_they_came() -> None:
    # A's request got a 429: it comes back for another place, behind B, who was already waiting
    clock = FakeClock()
    limiter = ConcurrencyLimiter("http://panel", LimitSettings(max_limit=1, initial=1), clock, stage="t")
    order: list[str] = []
    first_answer = asyncio.Event()

    async def a() -> None:
        async with limiter.slot():
            await first_answer.wait()
            limiter.hold_off(clock.now_ms() + 1000)
        async with limiter.slot():
            order.append("A again")

    async def b() -> None:
        async with limiter.slot():
            order.append("B")

    tasks = [asyncio.create_task(a())]
    await settle()
    tasks.append(asyncio.create_task(b()))
    await settle()
    first_answer.set()
    await settle()
    assert order == []
    await clock.advance(1.1)
    await asyncio.gather(*tasks)
    assert order == ["B", "A again"]
