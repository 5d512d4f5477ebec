"""The rater budget on the real broker: two sampler replicas on four partitions share one budget
per site (counted from sampler.shipped), a restarted replica counts what was spent before it,
and `pipeline budget` shows the same count."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from devkit.kafka_local import LocalBroker
from devkit.local_stack import Stack, StackSettings, wait_for
from pipeline.topics import STAGES
from tests.factory import snapshot
from tests.integration.test_breaker import extra_worker, lag, read_values, running, send_snapshots

pytestmark = pytest.mark.integration

BUDGET = 10
PROPAGATION_S = 1.5  # past a forward's way to the other replica's count (a batch and a round trip)
WAIT_S = 90


def test_two_replicas_share_the_budget_and_a_restart_keeps_it(kafka: LocalBroker, tmp_path: Path) -> None:
    stack = Stack(StackSettings(bootstrap=kafka.bootstrap, workdir=tmp_path, stages=("sample",), sampling_rate=1.0,
                                extra_env={"PIPELINE_BUDGET_PER_HOUR": str(BUDGET)}))
    site = f"pk_budget_{uuid.uuid4().hex[:8]}"
    host = f"budget-{site}"

    def turns(indices: range, errors: bool) -> list[dict[str, Any]]:
        return [snapshot(i, host=host, site_key=site, tool_error=errors) for i in indices]

    def forwarded() -> list[str]:
        """The reason of each turn forwarded (a turn forwarded twice around a rebalance, at least
        once, counts once, as the budget counts it)."""
        traces = {t["trace_id"]: t["decision"]["reason"] for t in read_values(kafka.bootstrap, "traces.sampled")
                  if t["site_key"] == site}
        return sorted(traces.values())

    def decided() -> None:
        group = STAGES["sample"].app_id
        wait_for(lambda: not any(lag(kafka.bootstrap, group, "sessions.idle").values()), WAIT_S,
                 what="the sample stage to decide every turn")

    with running(stack):
        extra_worker(stack, "sample", "sample-2", {"PIPELINE_BUDGET_PER_HOUR": str(BUDGET)})
        time.sleep(8)  # both members of the group before the first turn (a rebalance re-reads a batch)
        # plain turns first: random samples stop at half the budget, novel ones at three quarters.
        # In waves spaced past the propagation of sampler.shipped between the replicas, as steady
        # traffic is (a burst reaching both at once may overshoot by a batch: see budget.py)
        for wave in range(0, 20, 2):
            send_snapshots(kafka.bootstrap, turns(range(wave, wave + 2), errors=False))
            time.sleep(PROPAGATION_S)
        decided()
        plain = forwarded()
        assert 0 < len(plain) <= 0.75 * BUDGET + 1 and plain.count("sample") <= 0.5 * BUDGET + 1, plain
        # then errors: they take the rest of the hour's budget, and no more (one replica each may
        # take the last place at the same instant)
        for wave in range(20, 35, 3):
            send_snapshots(kafka.bootstrap, turns(range(wave, wave + 3), errors=True))
            time.sleep(PROPAGATION_S)
        decided()
        spent = forwarded()
        assert BUDGET <= len(spent) <= BUDGET + 1, spent

        stack.restart("sample")  # kill -9 and start again: it counts the hour from sampler.shipped
        time.sleep(2)
        send_snapshots(kafka.bootstrap, turns(range(35, 45), errors=True))
        decided()
        assert forwarded() == spent

        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "budget", "--json"], env=stack.env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        view = json.loads(proc.stdout)
        assert view["per_hour"] == BUDGET
        assert view["sites"][site] == {"used": len(spent), "allows": []}
