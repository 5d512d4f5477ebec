"""Is this process worth keeping? The answer behind `GET /healthz` (200 or 503 with the reason).

A process is healthy while its event loop turns and every probe it registered says nothing is
wrong. The loop is watched from outside it: a task on the loop calls `beat()` every second and
the HTTP thread that answers /healthz reads the time of the last beat, so a loop blocked by a
stuck call shows as unhealthy even though that thread still answers. Probes are small
functions the process registers (a stage: its agent still runs, its Kafka consumer has not
crashed, it is not stuck out of its consumer group); each returns the reason it is unhealthy,
or None.

A stage holding a batch on purpose (the breaker's `hold`, a scrubber outage) is healthy: its
loop still turns, and lag, not a restart, is the signal for those.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

Probe = Callable[[], str | None]
BEAT_INTERVAL_S = 1.0
# A loop that has not turned for this long is blocked, not busy: a batch yields between records.
LOOP_STALL_S = 30.0


class Liveness:
    def __init__(self, monotonic: Callable[[], float] = time.monotonic, stall_s: float = LOOP_STALL_S) -> None:
        self._monotonic = monotonic
        self._stall_s = stall_s
        self._last_beat: float | None = None
        self._probes: dict[str, Probe] = {}
        self._lock = threading.Lock()

    def beat(self) -> None:
        self._last_beat = self._monotonic()

    def probe(self, name: str, check: Probe) -> None:
        """Register `check`; a failing one makes the process unhealthy with `name: reason`."""
        with self._lock:
            self._probes[name] = check

    def check(self) -> tuple[bool, str]:
        """(healthy, why): the first thing wrong, or "ok"."""
        if self._last_beat is None:
            return False, "starting: the event loop has not turned yet"
        silent = self._monotonic() - self._last_beat
        if silent > self._stall_s:
            return False, f"event loop blocked: no turn for {silent:.0f} s"
        with self._lock:
            probes = list(self._probes.items())
        for name, probe in probes:
            try:
                reason = probe()
            except Exception as exc:  # a probe that fails says so; it must not take /healthz down
                reason = f"probe failed: {type(exc).__name__}: {exc}"
            if reason:
                return False, f"{name}: {reason}"
        return True, "ok"

    async def run_beats(self, interval_s: float = BEAT_INTERVAL_S) -> None:
        """Beat from the event loop until cancelled."""
        while True:
            self.beat()
            await asyncio.sleep(interval_s)


def lasting(condition: Callable[[], bool], for_s: float, reason: str,
            monotonic: Callable[[], float] = time.monotonic) -> Probe:
    """A probe that fails once `condition` has held for `for_s` seconds in a row: a rebalance is
    normal for seconds, a worker that stays out of its group for minutes is not."""
    since: list[float | None] = [None]

    def check() -> str | None:
        if not condition():
            since[0] = None
            return None
        now = monotonic()
        if since[0] is None:
            since[0] = now
        held = now - since[0]
        return f"{reason} for {held:.0f} s" if held >= for_s else None

    return check
