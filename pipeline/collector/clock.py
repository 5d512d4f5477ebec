"""The collector's clock: wall time for record timestamps, monotonic time and sleeps for
durations. Tests pass a fake one (`tests/unit/collector/fakes.py`)."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int: ...  # wall clock, epoch ms: record timestamps

    def monotonic(self) -> float: ...  # seconds: durations

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
