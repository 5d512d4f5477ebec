"""A clock for tests: time stands still until the test moves it.

`sleep` parks the caller until `advance` moves virtual time past its deadline; nothing waits
for real time, so a test of "nothing happens for 30 s" takes no 30 s and cannot flake on a
slow machine.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools


class FakeClock:
    def __init__(self, start_s: float = 1_700_000_000.0) -> None:
        self._wall = start_s
        self._mono = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._watchers: list[asyncio.Future[None]] = []  # wait_for_sleepers, told of every new sleeper

    def time(self) -> float:
        return self._wall

    def now_ms(self) -> int:
        return int(self._wall * 1000)

    def monotonic(self) -> float:
        return self._mono

    @property
    def sleeping(self) -> int:
        """How many callers are parked in `sleep` right now."""
        return sum(1 for *_, f in self._sleepers if not f.done())

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._mono + seconds, next(self._order), future))
        watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            if not watcher.done():
                watcher.set_result(None)
        await future

    async def wait_for_sleepers(self, count: int = 1, timeout_s: float = 10.0) -> None:
        """Return once at least `count` callers are parked in `sleep`: code that awaits real I/O
        (a stub server over HTTP) before it sleeps reaches the clock when the I/O is done, not
        after a number of loop turns. `timeout_s` (real time) only keeps a broken test from
        hanging."""

        async def parked() -> None:
            while self.sleeping < count:
                watcher: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._watchers.append(watcher)
                await watcher

        await asyncio.wait_for(parked(), timeout_s)

    async def advance(self, seconds: float) -> None:
        """Move time forward by `seconds`, waking each sleeper whose deadline passes, in order,
        and letting it run until it blocks again before moving on."""
        target = self._mono + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, future = heapq.heappop(self._sleepers)
            self._wall += deadline - self._mono
            self._mono = deadline
            if not future.done():
                future.set_result(None)
            await settle()
        self._wall += target - self._mono
        self._mono = target
        await settle()


async def settle(rounds: int = 20) -> None:
    """Let every ready task run until it blocks (on I/O, a queue, or the clock)."""
    for _ in range(rounds):
        await asyncio.sleep(0)
