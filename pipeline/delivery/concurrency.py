"""Adaptive concurrency per endpoint: how many requests one stage process keeps in flight to one
service (the panel's ingest, the scrubber), and the pause a 429 asks for.

The limit is AIMD (additive increase, multiplicative decrease, as TCP's congestion window):
- every answer that says "too much" shrinks it once by `backoff` (x0.5): 429, any 5xx, a
  timeout, a connection the server dropped, and an answer whose latency has risen past
  `latency_tolerance` times its baseline. Once per round: the requests that were already in
  flight when it shrank come back with the same news, and counting each of them would collapse
  the limit to 1 on one burst (a round is over when a request started after the cut answers);
- every good answer grows it while it is in use (at least half of it in flight): by 1 a request
  until the first cut (slow start), then by 1/limit, about one a round.

Why AIMD rather than a gradient limiter (Netflix's Gradient2, Envoy's adaptive concurrency):
the services here say "too much" explicitly (the panel's 429 comes first in its checks; the
scrubber answers 5xx when its workers race), and a gradient limiter listens only to latency,
which a token bucket answering 429 in a millisecond never raises. AIMD acts on every signal
the services give, latency included, and its state is two numbers a test can reason about.

A 429 also pauses the endpoint for its Retry-After (`hold_off`): the pause is the server's word
on when to come back, the smaller limit keeps the burst that follows the pause near what it
can take. The pure part (`AIMDLimit`) takes no clock; `ConcurrencyLimiter` is the async gate.
"""

from __future__ import annotations

import asyncio
import enum
import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from pipeline import metrics
from pipeline.clock import Clock

# Latency: the baseline follows good answers slowly, the recent view quickly; a recent latency
# under LATENCY_FLOOR_S never counts as risen (a 1 ms answer turning 3 ms is noise, not load).
BASELINE_ALPHA = 0.02
RECENT_ALPHA = 0.2
LATENCY_FLOOR_S = 0.010
INITIAL_LIMIT = 8
DEFAULT_PAUSE_S = 1.0  # a 429 that says nothing of when to come back


class Signal(enum.StrEnum):
    OK = "ok"  # answered well
    OVERLOAD = "overload"  # 429, 5xx, timeout, dropped connection
    NEUTRAL = "neutral"  # an answer that says nothing about load (a 4xx refusal of the request)


def signal_of(status: int | None) -> Signal:
    """What an answer says about load: `status` None is no answer at all (timeout, dropped)."""
    if status is None or status >= 500 or status in (408, 429):
        return Signal.OVERLOAD
    return Signal.OK if 200 <= status < 300 else Signal.NEUTRAL


@dataclass(frozen=True)
class LimitSettings:
    max_limit: int
    min_limit: int = 1
    initial: int = INITIAL_LIMIT
    backoff: float = 0.5
    latency_tolerance: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_limit <= self.max_limit:
            raise ValueError(f"need 1 <= min_limit <= max_limit, got {self.min_limit}, {self.max_limit}")
        if not 0 < self.backoff < 1:
            raise ValueError(f"backoff must be between 0 and 1, got {self.backoff}")
        if not self.latency_tolerance > 1:
            raise ValueError(f"latency_tolerance must be above 1, got {self.latency_tolerance}")


class AIMDLimit:
    """The limit's arithmetic; `start` numbers each request, `done` feeds its answer back."""

    def __init__(self, settings: LimitSettings) -> None:
        self.settings = settings
        self._limit = float(min(max(settings.initial, settings.min_limit), settings.max_limit))
        self._started = 0  # requests numbered so far
        self._cut_after = -1  # answers to requests numbered up to this belong to the last cut's round
        self._slow_start = True
        self._baseline_s: float | None = None
        self._recent_s: float | None = None
        self.cuts = 0

    @property
    def limit(self) -> int:
        return max(self.settings.min_limit, math.floor(self._limit))

    def start(self) -> int:
        self._started += 1
        return self._started

    def done(self, number: int, signal: Signal, latency_s: float | None, in_flight: int) -> None:
        """Fold in the answer to request `number`; `in_flight` counts it (it was in flight)."""
        if signal is Signal.NEUTRAL:
            return
        overloaded = signal is Signal.OVERLOAD
        if signal is Signal.OK and latency_s is not None:
            overloaded = self._latency_risen(latency_s)
        if overloaded:
            if number > self._cut_after:
                self._cut()
            return
        if in_flight * 2 >= self._limit:  # grow only a limit that is used
            self._limit = min(float(self.settings.max_limit),
                              self._limit + (1.0 if self._slow_start else 1.0 / self._limit))

    def _cut(self) -> None:
        self._limit = max(float(self.settings.min_limit), self._limit * self.settings.backoff)
        self._cut_after, self._slow_start = self._started, False
        self.cuts += 1

    def _latency_risen(self, latency_s: float) -> bool:
        recent = latency_s if self._recent_s is None else self._recent_s + RECENT_ALPHA * (latency_s - self._recent_s)
        self._recent_s = recent
        if self._baseline_s is None:
            self._baseline_s = latency_s
            return False
        risen = recent > LATENCY_FLOOR_S and recent > self.settings.latency_tolerance * self._baseline_s
        if not risen:  # the baseline learns from answers under no pressure only
            self._baseline_s += BASELINE_ALPHA * (latency_s - self._baseline_s)
        return risen


class Slot:
    """One request's place in flight; `record` what its answer said before leaving the block."""

    __slots__ = ("latency_s", "signal")

    def __init__(self) -> None:
        self.signal: Signal | None = None
        self.latency_s: float | None = None

    def record(self, signal: Signal, latency_s: float | None = None) -> None:
        self.signal, self.latency_s = signal, latency_s


class ConcurrencyLimiter:
    """Requests to one endpoint wait here for a place under the current limit (first come,
    first served) and for the end of any pause a 429 asked for."""

    def __init__(self, endpoint: str, settings: LimitSettings, clock: Clock, *, stage: str) -> None:
        self.endpoint, self.clock = endpoint, clock
        self.algorithm = AIMDLimit(settings)
        self.in_flight = 0
        self.paused_until_ms = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._resume: asyncio.Future[None] | None = None  # wakes the waiters when a pause ends
        self._limit_gauge = metrics.CONCURRENCY_LIMIT.labels(stage, endpoint)
        self._in_flight_gauge = metrics.IN_FLIGHT.labels(stage, endpoint)
        self._limit_gauge.set(self.algorithm.limit)
        self._in_flight_gauge.set(0)

    @property
    def limit(self) -> int:
        return self.algorithm.limit

    def hold_off(self, until_ms: int) -> bool:
        """Send nothing before `until_ms` (epoch ms): what a 429's Retry-After asked for. True
        when that starts a pause or makes one longer (the others are old news: log only those)."""
        if until_ms <= self.paused_until_ms:
            return False
        self.paused_until_ms = until_ms
        return True

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        await self._acquire()
        number = self.algorithm.start()
        slot = Slot()
        try:
            yield slot
        finally:
            in_flight = self.in_flight
            self.in_flight -= 1
            if slot.signal is not None:
                self.algorithm.done(number, slot.signal, slot.latency_s, in_flight)
            self._limit_gauge.set(self.algorithm.limit)
            self._in_flight_gauge.set(self.in_flight)
            self._wake()

    async def _acquire(self) -> None:
        if not self._waiters and self.in_flight < self.limit and not self._paused():
            self.in_flight += 1
            self._in_flight_gauge.set(self.in_flight)
            return
        # first come, first served, pause or no pause: a request that comes back after a 429
        # queues behind those already waiting, so no one trace can keep the places to itself
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake()
        try:
            await waiter  # handed a place: in_flight already counts it
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.in_flight -= 1
                self._wake()
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise
        self._in_flight_gauge.set(self.in_flight)

    def _paused(self) -> bool:
        return self.clock.now_ms() < self.paused_until_ms

    def _wake(self) -> None:
        """Hand free places to the waiters in order; while paused, make sure someone wakes them
        when the pause ends."""
        if self._paused():
            if self._waiters and (self._resume is None or self._resume.done()):
                self._resume = asyncio.ensure_future(self._resume_after_pause())
            return
        while self._waiters and self.in_flight < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    async def _resume_after_pause(self) -> None:
        while (wait_ms := self.paused_until_ms - self.clock.now_ms()) > 0:
            await self.clock.sleep(wait_ms / 1000)
        self._wake()


class EndpointLimiters:
    """One limiter per endpoint a stage sends to, built on first use with the same settings."""

    def __init__(self, settings: LimitSettings, clock: Clock, *, stage: str) -> None:
        self.settings, self.clock, self.stage = settings, clock, stage
        self._limiters: dict[str, ConcurrencyLimiter] = {}

    def get(self, endpoint: str) -> ConcurrencyLimiter:
        if endpoint not in self._limiters:
            self._limiters[endpoint] = ConcurrencyLimiter(endpoint, self.settings, self.clock, stage=self.stage)
        return self._limiters[endpoint]

    def hold_off(self, endpoint: str, until_ms: int) -> bool:
        return self.get(endpoint).hold_off(until_ms)
