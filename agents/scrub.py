"""Scrub stage: traces.sampled -> traces.scrubbed, one scrubber request per trace, fail closed.

A scrubber that is down, slow, rate-limiting or answering errors holds the trace (and its
partition) back with backoff; nothing goes on unscrubbed. That includes refusals that say the
deployment is wrong, not the trace (401/403: the key; 404: the URL or the tenant): every trace
would get the same answer, so they wait for the fix instead of filling scrub.dead. A trace the
scrubber refuses for what it is (400, 413, ...: it can never be scrubbed as it is) is
dead-lettered, not passed. One trace the scrubber keeps failing while it scrubs others goes to
scrub.dead with the scrubber's answers once it has spent the retry budget (`scrub.max_attempts`
and `scrub.max_age_s`: the rule deliver uses too); "while it scrubs others" is another trace
scrubbed, or else a probe (a canary trace made here) passing, between two of its failures.

Requests wait for a place under the scrubber's adaptive concurrency limit
(pipeline/delivery/concurrency.py): a scrubber answering 5xx or slowing down gets fewer at once.
A 429 pauses every request of this process for its Retry-After and spends no retry budget.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from typing import Any

import faust
import httpx

from agents.runtime import bind, make_app
from agents.stage import Meta, Out
from pipeline import metrics
from pipeline.clients.http import display_url
from pipeline.clients.scrubber import ScrubberClient, ScrubberError, ScrubberRejected, bypass_record
from pipeline.clock import Clock, SystemClock
from pipeline.config import Config
from pipeline.delivery.breaker import THROTTLED_HTTP
from pipeline.delivery.concurrency import DEFAULT_PAUSE_S, ConcurrencyLimiter, LimitSettings, Signal, signal_of
from pipeline.delivery.retry import RetryPolicy
from pipeline.errors import ConfigError, RecordError

STAGE = "scrub"
# refusals about our credentials or address rather than the record: hold, do not dead-letter
CONFIG_REFUSALS = frozenset({401, 403, 404})
ANSWERS_KEPT = 5  # the scrubber's last answers a dead letter shows
log = logging.getLogger(__name__)


def scrubber_client(config: Config, clock: Clock) -> ScrubberClient | None:
    """The configured scrubber's client, or None when scrubbing is bypassed (development only)."""
    if config.scrubbing_bypassed:
        if not config.allow_unscrubbed:  # the loader refuses this already; a stage never relies on it alone
            raise ConfigError("scrubberUrl is empty but allowUnscrubbed is not true", "scrubberUrl")
        log.warning("!!! scrubberUrl is empty and allowUnscrubbed = true: scrubbing is BYPASSED; session content "
                    "goes on unscrubbed and no attestation is minted for it. Development only. !!!")
        return None
    jwt, key, t = config.scrubber_jwt_secret, config.scrubber_api_key, config.scrub.timeout_s
    # with the JWT secret the scrubber shares, its answer must be attested and the attestation
    # verify: the attestation the panel later gets claims exactly that verified result
    return ScrubberClient(config.scrubber_url, key.reveal() if key else None, jwt.reveal() if jwt else None,
                          httpx.Timeout(connect=min(t, 5.0), read=t, write=t, pool=t),
                          require_attestation=jwt is not None, clock=clock.time)


def load_signal(exc: ScrubberError) -> Signal:
    """What a failed scrub request says about the scrubber's load: only a retriable failure
    (429, 5xx, timeout, dropped connection) can say "too much"; a refusal of the request, or a
    2xx whose body was wrong, says nothing about it."""
    signal = signal_of(exc.status_code) if exc.retriable else Signal.NEUTRAL
    return signal if signal is Signal.OVERLOAD else Signal.NEUTRAL


class ScrubStage:
    """One scrubber call per trace, retried while the scrubber fails (fail closed); `client`
    None passes traces on unscrubbed (bypass, development only)."""

    def __init__(self, config: Config, clock: Clock, client: ScrubberClient | None,
                 rng: random.Random | None = None) -> None:
        s = config.scrub
        self.clock, self.client = clock, client
        self.limiter = ConcurrencyLimiter(display_url(config.scrubber_url) if client else "bypassed",
                                          LimitSettings(max_limit=s.max_in_flight), clock, stage=STAGE)
        self.budget = RetryPolicy(base_s=s.retry_base_s, max_s=s.retry_max_s, max_age_s=s.max_age_s,
                                  max_attempts=s.max_attempts, rng=rng or random.Random())
        # how many times the scrubber answered a trace (or the probe) well: a trace that keeps
        # failing while others pass is the trace's problem (dead-lettered after its budget);
        # while nothing passes, the scrubber is down and every trace waits (fail closed). A count,
        # not a time: "since this trace's last failure" holds in event order, whatever the clock.
        self.successes = 0
        self._probing: asyncio.Future[None] | None = None

    async def handle(self, record: dict[str, Any], meta: Meta) -> list[Out]:
        if self.client is None:
            return [Out("traces.scrubbed", meta.key, bypass_record(record, self.clock.now_ms()))]
        clock = self.clock
        attempt = 0
        first_at = clock.time()
        successes_seen = self.successes  # as of this trace's last failure (or arrival)
        answers: deque[dict[str, Any]] = deque(maxlen=ANSWERS_KEPT)
        while True:
            try:
                async with self.limiter.slot() as slot:  # a place in flight, after any 429 pause
                    started = clock.monotonic()
                    try:
                        scrubbed = await self.client.scrub_trace(record)
                    except ScrubberError as exc:
                        slot.record(load_signal(exc))
                        raise
                    slot.record(Signal.OK, clock.monotonic() - started)
            except ScrubberError as exc:
                metrics.SCRUBBER_LATENCY.labels("error").observe(clock.monotonic() - started)
                if exc.status_code == THROTTLED_HTTP:  # the scrubber asks for less: wait, spend no budget
                    self._throttled(exc.retry_after)
                    continue
                attempt += 1
                misconfigured = isinstance(exc, ScrubberRejected) and exc.status_code in CONFIG_REFUSALS
                if not (exc.retriable or misconfigured):
                    raise RecordError(f"scrubber_{type(exc).__name__}", str(exc)) from None
                answers.append({"error": str(exc)[:300], "reason": exc.reason, "http_status": exc.status_code,
                                "at": clock.now_ms()})
                spent = self.budget.give_up(attempt, first_at, clock.time())
                if spent and self.successes > successes_seen:
                    raise RecordError(
                        "scrub_budget_exhausted",
                        f"the scrubber failed this trace {attempt} times over {clock.time() - first_at:.0f}s "
                        f"while it scrubbed other traces or its probe; last: {exc}",
                        data={"attempts": attempt, "answers": list(answers)}) from None
                successes_seen = self.successes
                if spent:
                    # no other trace passed since its last failure: ask the probe, whose success
                    # (after this failure) is the evidence should the trace fail once more
                    await self._probe_shared()
                delay = self.budget.delay(attempt, exc.retry_after)
                if misconfigured:
                    log.error("scrubber refuses us (%s): check SCRUBBER_API_KEY and scrubberUrl; holding trace "
                              "%s, retry %d in %.1fs", exc, record.get("trace_id"), attempt, delay)
                else:
                    log.warning("scrubber unavailable (%s); holding trace %s, retry %d in %.1fs",
                                exc, record.get("trace_id"), attempt, delay)
                await clock.sleep(delay)
                continue
            self.successes += 1
            metrics.SCRUBBER_LATENCY.labels("ok").observe(clock.monotonic() - started)
            return [Out("traces.scrubbed", meta.key, scrubbed)]

    async def _probe_shared(self) -> None:
        """One probe (`ScrubberClient.probe`: a canary trace made here, through the same limiter)
        for every trace that spent its budget meanwhile, so that "the scrubber scrubs others"
        does not depend on which traces happen to be handled together; a probe that passes
        counts as a success."""
        if self._probing is None:
            self._probing = asyncio.ensure_future(self._probe())
        await asyncio.shield(self._probing)

    async def _probe(self) -> None:
        assert self.client is not None
        started = self.clock.monotonic()
        try:
            async with self.limiter.slot() as slot:
                try:
                    await self.client.probe()
                except ScrubberError as exc:
                    slot.record(load_signal(exc))
                    metrics.SCRUBBER_PROBES.labels("failed").inc()
                    log.info("scrubber probe failed (%s): holding traces that fail, as for an outage", exc)
                    return
                slot.record(Signal.OK, self.clock.monotonic() - started)
            metrics.SCRUBBER_PROBES.labels("ok").inc()
            self.successes += 1
        finally:
            self._probing = None

    def _throttled(self, retry_after: float | None) -> None:
        wait_s = DEFAULT_PAUSE_S if retry_after is None else retry_after
        metrics.THROTTLED.labels(STAGE, self.limiter.endpoint).inc()
        if self.limiter.hold_off(self.clock.now_ms() + max(1, round(wait_s * 1000))):
            log.warning("scrubber asks for less (429): pausing scrub requests for %.2fs", wait_s)


def build(config: Config, **app_overrides: Any) -> faust.App:
    app = make_app(STAGE, config, **app_overrides)
    clock = SystemClock()
    bind(app, STAGE, config, ScrubStage(config, clock, scrubber_client(config, clock)).handle,
         parallel=True, batch=config.scrub.max_in_flight)
    return app
