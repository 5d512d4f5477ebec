"""Scrub stage: traces.sampled -> traces.scrubbed, one scrubber request per trace, fail closed.

A scrubber that is down, slow, rate-limiting or answering errors holds the trace (and its
partition) back with backoff; nothing goes on unscrubbed. That includes refusals that say the
deployment is wrong, not the trace (401/403: the key; 404: the URL or the tenant): every trace
would get the same answer, so they wait for the fix instead of filling scrub.dead. A trace the
scrubber refuses for what it is (400, 413, ...: it can never be scrubbed as it is) is
dead-lettered, not passed. One trace the scrubber keeps failing while it scrubs others goes to
scrub.dead with the scrubber's answers once it has spent the retry budget (`scrub.max_attempts`
and `scrub.max_age_s`: the rule deliver uses too).
"""

from __future__ import annotations

import logging
import random
from collections import deque
from typing import Any

import faust
import httpx

from agents.runtime import bind, make_app
from agents.stage import Meta, Out
from pipeline import metrics
from pipeline.clients.scrubber import ScrubberClient, ScrubberError, ScrubberRejected, bypass_record
from pipeline.clock import Clock, SystemClock
from pipeline.config import Config
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


class ScrubStage:
    """One scrubber call per trace, retried while the scrubber fails (fail closed); `client`
    None passes traces on unscrubbed (bypass, development only)."""

    def __init__(self, config: Config, clock: Clock, client: ScrubberClient | None,
                 rng: random.Random | None = None) -> None:
        s = config.scrub
        self.clock, self.client = clock, client
        self.budget = RetryPolicy(base_s=s.retry_base_s, max_s=s.retry_max_s, max_age_s=s.max_age_s,
                                  max_attempts=s.max_attempts, rng=rng or random.Random())
        # when the scrubber last answered any trace well: a trace that keeps failing while others
        # pass is the trace's problem (dead-lettered after its budget); while nothing passes, the
        # scrubber is down and every trace waits (fail closed)
        self.last_success = float("-inf")

    async def handle(self, record: dict[str, Any], meta: Meta) -> list[Out]:
        if self.client is None:
            return [Out("traces.scrubbed", meta.key, bypass_record(record, self.clock.now_ms()))]
        clock = self.clock
        attempt = 0
        first_at, first_mono = clock.time(), clock.monotonic()
        answers: deque[dict[str, Any]] = deque(maxlen=ANSWERS_KEPT)
        while True:
            attempt += 1
            started = clock.monotonic()
            try:
                scrubbed = await self.client.scrub_trace(record)
            except ScrubberError as exc:
                metrics.SCRUBBER_LATENCY.labels("error").observe(clock.monotonic() - started)
                misconfigured = isinstance(exc, ScrubberRejected) and exc.status_code in CONFIG_REFUSALS
                if not (exc.retriable or misconfigured):
                    raise RecordError(f"scrubber_{type(exc).__name__}", str(exc)) from None
                answers.append({"error": str(exc)[:300], "reason": exc.reason, "http_status": exc.status_code,
                                "at": clock.now_ms()})
                if self.last_success > first_mono and self.budget.give_up(attempt, first_at, clock.time()):
                    raise RecordError(
                        "scrub_budget_exhausted",
                        f"the scrubber failed this trace {attempt} times over {clock.time() - first_at:.0f}s "
                        f"while it scrubbed others; last: {exc}",
                        data={"attempts": attempt, "answers": list(answers)}) from None
                delay = self.budget.delay(attempt, exc.retry_after)
                if misconfigured:
                    log.error("scrubber refuses us (%s): check SCRUBBER_API_KEY and scrubberUrl; holding trace "
                              "%s, retry %d in %.1fs", exc, record.get("trace_id"), attempt, delay)
                else:
                    log.warning("scrubber unavailable (%s); holding trace %s, retry %d in %.1fs",
                                exc, record.get("trace_id"), attempt, delay)
                await clock.sleep(delay)
                continue
            self.last_success = clock.monotonic()
            metrics.SCRUBBER_LATENCY.labels("ok").observe(clock.monotonic() - started)
            return [Out("traces.scrubbed", meta.key, scrubbed)]


def build(config: Config, **app_overrides: Any) -> faust.App:
    app = make_app(STAGE, config, **app_overrides)
    clock = SystemClock()
    bind(app, STAGE, config, ScrubStage(config, clock, scrubber_client(config, clock)).handle,
         parallel=True, batch=50)
    return app
