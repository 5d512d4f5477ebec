"""The breaker's gate: how a stage waits for an endpoint's circuit breaker, shared by the
breaker stage (what enters traces.outbox) and the deliver stage (every attempt at the panel).

Both follow delivery.outcomes into a BreakerRegistry (`apply`) and ask `admit` before a trace
goes on. `admit` returns PASS, PROBE (this trace is the one that tests a panel whose open period
is over) or DROP (breaker mode `drop`), and waits while the verdict is HOLD: the wait blocks the
caller's record, so the stage's partition and its consumer lag show it. Every hold is announced
once per trace with a `held` outcome, every probe with a `probe` outcome, every drop with a
`circuit_open` outcome, each published at once: other replicas must see a probe before they
decide. A `throttled` outcome (a 429 some deliver replica got) goes to `on_throttle`: the
deliver stage pauses its sends to that endpoint until the time the panel asked for.

The two roles differ in who may probe, because deliver sits downstream of the breaker stage:
- ADMIT (the breaker stage) takes the shared probe lease in the registry: one probe among all
  replicas, and a replica that sees another's `probe` outcome holds (or drops) until its verdict.
  It alone reports transitions (metrics, log, a `transition` outcome) and honours mode `drop`.
- DELIVER lets one attempt per process probe in each open period, whatever lease the registry
  holds: the trace the breaker stage admitted as its probe may sit in traces.outbox behind the
  very batch this process is holding, so honouring that lease would stall delivery until the
  lease timed out. A trace already past the breaker stage is never dropped, only held.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from pipeline import metrics
from pipeline.clock import Clock
from pipeline.delivery.breaker import Admission, BreakerRegistry, BreakerSettings, State, Verdict
from pipeline.delivery.outcomes import outcome, transition_outcome
from pipeline.errors import RecordError
from pipeline.model.records import decode

OUTCOMES = "delivery.outcomes"
STATE_VALUE = {State.CLOSED: 0, State.HALF_OPEN: 1, State.OPEN: 2}
HALF_OPEN_POLL_S = 0.2  # waiting for a probe's verdict, which comes in through the follower
MIN_WAIT_S, MAX_WAIT_S = 0.05, 1.0
log = logging.getLogger(__name__)

# Publishes one outcome record (keyed by its endpoint) and returns once the broker has it.
Publish = Callable[[dict[str, Any]], Awaitable[None]]
# (endpoint, until epoch ms): a 429 asked every sender to wait until then
OnThrottle = Callable[[str, int], object]


class Role(enum.StrEnum):
    ADMIT = "admit"
    DELIVER = "deliver"


def replay_horizon_ms(settings: BreakerSettings) -> int:
    """Only outcomes newer than the longest any of them can matter are replayed at start."""
    return int((settings.open_s + settings.failure_window_s + settings.probe_timeout_s) * 1000) * 2


class BreakerGate:
    """One stage's view of the breakers of every endpoint, and its admission rule."""

    def __init__(self, settings: BreakerSettings, clock: Clock, publish: Publish, *, stage: str, role: Role,
                 ready: asyncio.Event | None = None, on_throttle: OnThrottle | None = None) -> None:
        # a trace past the breaker stage is held, never dropped
        self.settings = settings if role is Role.ADMIT else replace(settings, mode="hold")
        self.registry = BreakerRegistry(self.settings)
        self.clock, self.publish, self.stage, self.role = clock, publish, stage, role
        # a `throttled` outcome (any replica's 429) pauses this process' sends to its endpoint
        self.on_throttle = on_throttle
        # set once the follower has replayed delivery.outcomes: no decision before that
        self.ready = ready if ready is not None else asyncio.Event()
        # DELIVER: endpoint -> (the open period being probed, monotonic start) of this process' probe
        self._probing: dict[str, tuple[int | None, float]] = {}

    async def apply_raw(self, raw: bytes) -> None:
        """Fold one delivery.outcomes record in (the follower's callback); a record that cannot
        be read is skipped with a warning: the topic is shared, and one bad record must not stop
        every replica's breaker."""
        try:
            record = decode(raw, OUTCOMES)
            transitions = self.registry.apply(record)
        except RecordError as exc:
            log.warning("skipping unusable outcome record: %s", exc)
            return
        if record["status"] == "throttled" and self.on_throttle is not None:
            until = record["detail"].get("until")
            if isinstance(until, int) and not isinstance(until, bool):
                self.on_throttle(record["endpoint"], until)
        if self.role is not Role.ADMIT:
            return
        for t in transitions:
            metrics.BREAKER_TRANSITIONS.labels(t.endpoint, str(t.to_state)).inc()
            log.warning("breaker %s: %s -> %s (%s)", t.endpoint, t.from_state, t.to_state, t.reason)
            if self.ready.is_set():  # replayed history was reported when it happened
                await self.publish(transition_outcome(t))

    async def admit(self, endpoint: str, trace_id: str, *, attempt: int = 0) -> Verdict:
        """PASS, PROBE or DROP for this trace now; while the verdict is HOLD, wait."""
        await self.ready.wait()
        announced = False
        while True:
            admission = self._admission(endpoint)
            if self.role is Role.ADMIT:
                metrics.BREAKER_STATE.labels(endpoint).set(STATE_VALUE[admission.state])
            if admission.verdict is Verdict.PASS:
                return Verdict.PASS
            if admission.verdict is Verdict.PROBE:
                await self._publish(endpoint, trace_id, "probe", attempt, {"reason": admission.reason}, probe=True)
                return Verdict.PROBE
            if admission.verdict is Verdict.DROP:
                metrics.DELIVERY_OUTCOMES.labels(endpoint, "circuit_open").inc()
                await self._publish(endpoint, trace_id, "circuit_open", attempt, {"reason": admission.reason})
                return Verdict.DROP
            if not announced:
                announced = True
                metrics.DELIVERY_OUTCOMES.labels(endpoint, "held").inc()
                await self._publish(endpoint, trace_id, "held", attempt,
                                    {"reason": admission.reason, "until": admission.until_ms})
                # operators (and tests) look for "<state>: holding trace"
                log.warning("breaker %s %s: holding trace %s (stage %s, attempt %d)", endpoint, admission.state,
                            trace_id, self.stage, attempt)
            await self.clock.sleep(self._wait_s(admission))

    def probe_unsettled(self, endpoint: str) -> None:
        """DELIVER: this process' probe got no verdict (a 429 is none): its next attempt probes again."""
        self._probing.pop(endpoint, None)

    def _admission(self, endpoint: str) -> Admission:
        now_ms = self.clock.now_ms()
        if self.role is Role.ADMIT:
            return self.registry.admit(endpoint, now_ms)
        snap = self.registry.get(endpoint).snapshot(now_ms)
        if snap.state is State.CLOSED:
            self._probing.pop(endpoint, None)
            return Admission(Verdict.PASS, "closed", snap.state)
        if snap.state is State.HALF_OPEN:
            period, started = self._probing.get(endpoint, (None, 0.0))
            expired = self.clock.monotonic() - started > self.settings.probe_timeout_s
            if period != snap.open_until_ms or expired:
                self._probing[endpoint] = (snap.open_until_ms, self.clock.monotonic())
                return Admission(Verdict.PROBE, "open period over: this delivery probes", snap.state)
            return Admission(Verdict.HOLD, "half-open, probe in flight", snap.state)
        return Admission(Verdict.HOLD, "open", snap.state, snap.open_until_ms)

    def _wait_s(self, admission: Admission) -> float:
        """Until a held trace is worth offering again: the end of the open period (nothing
        changes before it), or a short poll while a probe's verdict is awaited."""
        if admission.state is State.OPEN and admission.until_ms is not None:
            wait_s = (admission.until_ms - self.clock.now_ms()) / 1000
        else:
            wait_s = HALF_OPEN_POLL_S
        return min(max(wait_s, MIN_WAIT_S), MAX_WAIT_S)

    async def _publish(self, endpoint: str, trace_id: str, status: str, attempt: int, detail: dict[str, Any],
                       probe: bool = False) -> None:
        await self.publish(outcome(stage=self.stage, endpoint=endpoint, status=status, trace_id=trace_id,
                                   at=self.clock.now_ms(), attempt=attempt, probe=probe, detail=detail))
