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

import asyncio
import logging
import random
import time
from collections import deque
from typing import Any

import faust
import httpx

from agents.base import Meta, Out, bind, make_app
from pipeline import metrics
from pipeline.clients.scrubber import ScrubberClient, ScrubberError, ScrubberRejected, bypass_record
from pipeline.config import Config
from pipeline.delivery.retry import RetryPolicy
from pipeline.errors import ConfigError, RecordError

STAGE = "scrub"
# refusals about our credentials or address rather than the record: hold, do not dead-letter
CONFIG_REFUSALS = frozenset({401, 403, 404})
ANSWERS_KEPT = 5  # the scrubber's last answers a dead letter shows
log = logging.getLogger(__name__)


def build(config: Config, **app_overrides: object) -> faust.App:
    app = make_app(STAGE, config, **app_overrides)
    s = config.scrub
    budget = RetryPolicy(base_s=s.retry_base_s, max_s=s.retry_max_s, max_age_s=s.max_age_s,
                         max_attempts=s.max_attempts, rng=random.Random())
    client: ScrubberClient | None = None
    if config.scrubbing_bypassed:
        if not config.allow_unscrubbed:  # the loader refuses this already; a stage never relies on it alone
            raise ConfigError("scrubberUrl is empty but allowUnscrubbed is not true", "scrubberUrl")
        log.warning("!!! scrubberUrl is empty and allowUnscrubbed = true: scrubbing is BYPASSED; session content "
                    "goes on unscrubbed and no attestation is minted for it. Development only. !!!")
    else:
        jwt = config.scrubber_jwt_secret
        key = config.scrubber_api_key
        t = s.timeout_s
        # with the JWT secret the scrubber shares, its answer must be attested and the attestation
        # verify: the attestation the panel later gets claims exactly that verified result
        client = ScrubberClient(config.scrubber_url, key.reveal() if key else None, jwt.reveal() if jwt else None,
                                httpx.Timeout(connect=min(t, 5.0), read=t, write=t, pool=t),
                                require_attestation=jwt is not None)
    # when the scrubber last answered any trace well: a trace that keeps failing while others
    # pass is the trace's problem (dead-lettered after its budget); while nothing passes, the
    # scrubber is down and every trace waits (fail closed)
    last_success = [float("-inf")]

    async def handle(record: dict, meta: Meta) -> list[Out]:
        if client is None:
            return [Out("traces.scrubbed", meta.key, bypass_record(record, int(time.time() * 1000)))]
        attempt = 0
        first_at, first_mono = time.time(), time.monotonic()
        answers: deque[dict[str, Any]] = deque(maxlen=ANSWERS_KEPT)
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                scrubbed = await client.scrub_trace(record)
            except ScrubberError as exc:
                metrics.SCRUBBER_LATENCY.labels("error").observe(time.perf_counter() - started)
                misconfigured = isinstance(exc, ScrubberRejected) and exc.status_code in CONFIG_REFUSALS
                if not (exc.retriable or misconfigured):
                    raise RecordError(f"scrubber_{type(exc).__name__}", str(exc)) from None
                answers.append({"error": str(exc)[:300], "reason": exc.reason, "http_status": exc.status_code,
                                "at": int(time.time() * 1000)})
                if last_success[0] > first_mono and budget.give_up(attempt, first_at, time.time()):
                    raise RecordError(
                        "scrub_budget_exhausted",
                        f"the scrubber failed this trace {attempt} times over {time.time() - first_at:.0f}s "
                        f"while it scrubbed others; last: {exc}",
                        data={"attempts": attempt, "answers": list(answers)}) from None
                delay = budget.delay(attempt, exc.retry_after)
                if misconfigured:
                    log.error("scrubber refuses us (%s): check SCRUBBER_API_KEY and scrubberUrl; holding trace "
                              "%s, retry %d in %.1fs", exc, record.get("trace_id"), attempt, delay)
                else:
                    log.warning("scrubber unavailable (%s); holding trace %s, retry %d in %.1fs",
                                exc, record.get("trace_id"), attempt, delay)
                await asyncio.sleep(delay)
                continue
            last_success[0] = time.monotonic()
            metrics.SCRUBBER_LATENCY.labels("ok").observe(time.perf_counter() - started)
            return [Out("traces.scrubbed", meta.key, scrubbed)]

    bind(app, STAGE, config, handle, parallel=True, batch=50)
    return app
