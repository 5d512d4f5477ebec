"""The scrubber fails closed, on the real broker with every stage its own process (issue 5):
while the scrubber is down, rate-limiting or refusing our key, nothing reaches the panel, and
the traces arrive, scrubbed, once it is back."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from devkit.kafka_local import LocalBroker
from devkit.local_stack import Stack, wait_for
from tests.factory import SEEDED_ASSIGNMENT, SEEDED_SECRETS
from tests.integration.test_breaker import (
    WAIT_S,
    delivery_stack,
    fast_toml,
    forward,
    read_values,
    running,
    snapshots,
    unique_host,
    wait_accepted,
)

pytestmark = pytest.mark.integration

SCRUB_TOML = """
[scrub]
retry_base_s = 0.2
retry_max_s = 1
"""
RETRY_AFTER_S = 2


def faulted(stack: Stack, status: int) -> int:
    stats = httpx.get(stack.scrubber_url + "/_stub/stats", timeout=10).json()
    return int(stats["by_status"].get(str(status), 0))


def test_scrubber_outage_holds_traces_back_and_they_arrive_scrubbed(kafka: LocalBroker, tmp_path: Path) -> None:
    stack = delivery_stack(kafka, tmp_path, fast_toml(extra=SCRUB_TOML))
    host = unique_host("scrub")
    traces = snapshots(host, range(0, 4))
    with running(stack):
        stack.scrubber_faults(fail_for_s=600, status=503)
        ids = forward(stack, traces)
        # Each failure mode in turn, each seen by the scrub stage at least a few times: down,
        # then rate limiting with Retry-After, then refusing our key.
        wait_for(lambda: faulted(stack, 503) >= 4, WAIT_S, interval_s=0.5, what="503s from the scrubber")
        stack.scrubber_faults(status=429, retry_after_s=RETRY_AFTER_S)
        wait_for(lambda: faulted(stack, 429) >= 4, WAIT_S, interval_s=0.5, what="429s from the scrubber")
        stack.scrubber_faults(status=401)
        wait_for(lambda: faulted(stack, 401) >= 4, WAIT_S, interval_s=0.5, what="401s from the scrubber")

        # Fail closed: the sampler forwarded them all (forward() waited for that), yet not one
        # request reached the panel and nothing went on past the scrub stage.
        assert stack.panel_stats()["requests"] == 0
        scrubbed = {r["trace_id"] for r in read_values(kafka.bootstrap, "traces.scrubbed")}
        assert not ids & scrubbed
        # Held, not dead-lettered: a 401 is about our key, not the trace.
        dead = [r for r in read_values(kafka.bootstrap, "scrub.dead") if r["key"] and r["key"].startswith(host)]
        assert not dead, [(d["dead_id"], d["reason"]) for d in dead]

        stack.scrubber_faults(fail_for_s=0)  # the scrubber is back
        wait_accepted(stack, ids)
        accepted = stack.panel_accepted()
        stats = stack.panel_stats()
        scrub_log = stack.procs["scrub"].log()

    assert {t["trace_id"] for t in accepted} == ids
    # every request that reached the panel was one of these, accepted with clean content
    assert stats["requests"] == stats["upserts"] and stats["refused"] == 0 and stats["faulted"] == 0, stats
    for trace in accepted:
        text = json.dumps(trace["body"])
        for secret in [*SEEDED_SECRETS, SEEDED_ASSIGNMENT]:
            assert secret not in text, f"unscrubbed {secret!r} reached the panel"
        assert "<EMAIL_1>" in text  # it went through the scrubber, not around it
    # The scrub stage honoured Retry-After: each 429 paused its requests for at least that long.
    waits = [float(w) for w in re.findall(r"scrubber asks for less \(429\): pausing scrub requests for ([\d.]+)s",
                                          scrub_log)]
    assert waits, scrub_log[-3000:]
    assert min(waits) >= RETRY_AFTER_S, waits
