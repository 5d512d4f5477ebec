"""Time, passed in: wall time for record timestamps, monotonic time and sleeps for durations.

Every stage and the collector take a `Clock` instead of calling `time` themselves, so a test
runs them on `devkit.clock.FakeClock` and moves time forward instead of sleeping.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float: ...  # wall clock, epoch seconds

    def now_ms(self) -> int: ...  # wall clock, epoch ms: record timestamps

    def monotonic(self) -> float: ...  # seconds: durations

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
