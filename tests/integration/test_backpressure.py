"""Delivery at volume on the real broker, every stage its own process: a panel that rate-limits
(a token bucket of 20 requests a second, 429 with Retry-After beyond it) and fails 1% of its
requests at random, behind a scrubber that fails 2% with a 500 and refuses work beyond 4
requests at once (each taking 50 ms), gets every trace of a burst of 300, at close to its limit, with the breaker
never opening; then the same panel hard down still opens the breaker, as the contract's rule
does, and everything held is delivered once it is back.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from devkit.kafka_local import LocalBroker
from devkit.local_stack import Stack, StackSettings
from tests.integration.test_breaker import (
    DELIVERY_STAGES,
    fast_toml,
    forward,
    outcomes,
    read_values,
    running,
    snapshots,
    transitions,
    unique_host,
    wait_accepted,
    wait_transition,
)

pytestmark = pytest.mark.integration

PANEL_RATE = 20  # requests a second
BURST = 300
WAIT_S = 180  # 300 traces at 20 a second is 15 s; the rest is a loaded machine's margin


def scrubber_stats(stack: Stack) -> dict[str, object]:
    return dict(httpx.get(stack.scrubber_url + "/_stub/stats", timeout=10).json())


def test_a_rate_limited_flaky_panel_gets_every_trace_at_its_pace_and_a_down_one_opens_the_breaker(
        kafka: LocalBroker, tmp_path: Path) -> None:
    stack = Stack(StackSettings(bootstrap=kafka.bootstrap, workdir=tmp_path, stages=DELIVERY_STAGES,
                                extra_toml=fast_toml(open_s=6),
                                panel_args=("--rate-limit", str(PANEL_RATE), "--rate-window-s", "1")))
    host = unique_host("volume")
    with running(stack):
        stack.panel_faults(fail_rate=0.01, status=503)
        # 50 ms a scrub, so that more than 4 at once is what the scrub stage would send unchecked
        stack.scrubber_faults(fail_rate=0.02, status=500, max_concurrent=4, latency_ms=50)
        ids = forward(stack, snapshots(host, range(BURST)))
        wait_accepted(stack, ids, timeout_s=WAIT_S)

        accepted = [t for t in stack.panel_accepted() if t["trace_id"] in ids]
        firsts = sorted(t["first_at"] for t in accepted)
        rate = (len(firsts) - 1) / (firsts[-1] - firsts[0])
        panel = stack.panel_stats()
        scrubber = scrubber_stats(stack)
        seen = outcomes(stack)
        dead = [d for d in read_values(kafka.bootstrap, "traces.dead") + read_values(kafka.bootstrap, "scrub.dead")
                if d.get("key") in ids or str(d.get("key")).startswith(host)]

        # every one delivered, once, at close to the panel's limit, without one dead letter
        assert len(accepted) == BURST and all(t["upserts"] == 1 for t in accepted)
        print(f"delivered {len(firsts)} at {rate:.1f} traces/s against a limit of {PANEL_RATE}/s; panel {panel}")
        assert rate >= 0.7 * PANEL_RATE, f"{rate:.1f} traces/s against a limit of {PANEL_RATE}/s"
        assert not dead, [(d["reason"], d["error"]) for d in dead]
        # the limit and the faults were really met on the way: 429s, 503s, 500s and the cap
        assert panel["refused_by_error"].get("rate_limited", 0) > 0, panel
        assert panel["faulted"] > 0, panel
        assert scrubber["by_status"].get("500", 0) > 0 and scrubber["overloaded"] > 0, scrubber
        statuses = {o["status"] for o in seen if o["trace_id"] in ids}
        assert "throttled" in statuses and "failed" in statuses, statuses
        # ... and the breaker never opened: a 429 is no failure, 1% of failures no reason
        assert transitions(stack) == []

        # the same panel hard down: the breaker opens within its window, as the contract's rule does
        stack.panel_faults(fail_rate=0.0, fail_for_s=600, status=503)
        down_ids = forward(stack, snapshots(host, range(BURST, BURST + 40)))
        wait_transition(stack, ("closed", "open"))
        stack.panel_faults(fail_for_s=0)
        wait_accepted(stack, down_ids, timeout_s=WAIT_S)
