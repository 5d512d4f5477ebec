"""What /healthz answers: the loop's beat, the probes, and conditions that must last."""

from __future__ import annotations

import asyncio

from pipeline.health import LOOP_STALL_S, Liveness, lasting


class Ticks:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_unhealthy_until_the_loop_turns_then_when_it_stops_turning() -> None:
    ticks = Ticks()
    live = Liveness(ticks)
    assert live.check() == (False, "starting: the event loop has not turned yet")
    live.beat()
    assert live.check() == (True, "ok")
    ticks.now += LOOP_STALL_S - 1
    assert live.check()[0]
    ticks.now += 2
    ok, why = live.check()
    assert not ok and why.startswith("event loop blocked")


def test_a_failing_probe_names_itself_and_a_raising_probe_is_a_failure() -> None:
    ticks = Ticks()
    live = Liveness(ticks)
    live.beat()
    state: list[str | None] = [None]
    live.probe("agent", lambda: state[0])
    assert live.check() == (True, "ok")
    state[0] = "stopped: its stream ended"
    assert live.check() == (False, "agent: stopped: its stream ended")
    state[0] = None

    def broken() -> str | None:
        raise RuntimeError("boom")

    live.probe("consumer", broken)
    assert live.check() == (False, "consumer: probe failed: RuntimeError: boom")


def test_lasting_fails_only_after_the_condition_held_long_enough_and_resets() -> None:
    ticks = Ticks()
    out = [True]
    probe = lasting(lambda: out[0], 120, "not in the consumer group", ticks)
    assert probe() is None  # starts counting
    ticks.now += 119
    assert probe() is None
    ticks.now += 2
    assert probe() == "not in the consumer group for 121 s"
    out[0] = False
    assert probe() is None
    out[0] = True
    ticks.now += 5
    assert probe() is None  # counting again from zero


def test_run_beats_beats_from_the_loop() -> None:
    ticks = Ticks()
    live = Liveness(ticks)

    async def main() -> None:
        task = asyncio.create_task(live.run_beats(interval_s=0.01))
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(main())
    assert live.check() == (True, "ok")
