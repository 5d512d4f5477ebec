"""Scrub stage: traces.sampled -> traces.scrubbed, one scrubber request per trace, fail closed.

A scrubber that is down, slow, rate-limiting or answering errors holds the trace (and its
partition) back with backoff; nothing goes on unscrubbed. That includes refusals that say the
deployment is wrong, not the trace (401/403: the key; 404: the URL or the tenant): every trace
would get the same answer, so they wait for the fix instead of filling scrub.dead. A trace the
scrubber refuses for what it is (400, 413, ...: it can never be scrubbed as it is) is
dead-lettered, not passed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import faust
import httpx

from agents.base import Meta, Out, bind, make_app
from pipeline import metrics
from pipeline.config import Config
from pipeline.errors import RecordError
from pipeline.retry import RetryPolicy
from pipeline.scrubber import ScrubberClient, ScrubberError, ScrubberRejected, bypass_record

STAGE = "scrub"
# fail closed: a trace waits for the scrubber as long as it takes (a year bounds the arithmetic)
HOLD_FOREVER_S = 365 * 24 * 3600.0
# refusals about our credentials or address rather than the record: hold, do not dead-letter
CONFIG_REFUSALS = frozenset({401, 403, 404})
log = logging.getLogger(__name__)


def build(config: Config, **app_overrides: object) -> faust.App:
    app = make_app(STAGE, config, **app_overrides)
    policy = RetryPolicy(base_s=config.scrub.retry_base_s, max_s=config.scrub.retry_max_s,
                         max_age_s=HOLD_FOREVER_S, rng=random.Random())
    client: ScrubberClient | None = None
    if not config.scrubber_url:
        log.warning("!!! scrubberUrl is empty: scrubbing is BYPASSED; session content goes to the panel "
                    "unscrubbed. Development only. !!!")
    else:
        jwt = config.scrubber_jwt_secret
        key = config.scrubber_api_key
        t = config.scrub.timeout_s
        client = ScrubberClient(config.scrubber_url, key.reveal() if key else None, jwt.reveal() if jwt else None,
                                httpx.Timeout(connect=min(t, 5.0), read=t, write=t, pool=t))

    async def handle(record: dict, meta: Meta) -> list[Out]:
        if client is None:
            return [Out("traces.scrubbed", meta.key, bypass_record(record, int(time.time() * 1000)))]
        attempt = 0
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
                delay = policy.delay(attempt, exc.retry_after)
                if misconfigured:
                    log.error("scrubber refuses us (%s): check SCRUBBER_API_KEY and scrubberUrl; holding trace "
                              "%s, retry %d in %.1fs", exc, record.get("trace_id"), attempt, delay)
                else:
                    log.warning("scrubber unavailable (%s); holding trace %s, retry %d in %.1fs",
                                exc, record.get("trace_id"), attempt, delay)
                await asyncio.sleep(delay)
                continue
            metrics.SCRUBBER_LATENCY.labels("ok").observe(time.perf_counter() - started)
            return [Out("traces.scrubbed", meta.key, scrubbed)]

    bind(app, STAGE, config, handle, parallel=True, batch=50)
    return app
