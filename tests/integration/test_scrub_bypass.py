"""Scrubbing bypassed (`scrubberUrl = ""` with `allowUnscrubbed = true`): nothing is attested,
so a panel that requires scrubbing refuses every trace. Before, the sign and deliver stages
minted attestations over any body, and such a panel accepted all of them, seeded secrets
included. (Its own module: the stack runs with another configuration in the same stage groups.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from devkit.kafka_local import LocalBroker
from devkit.local_stack import Stack, StackSettings, wait_for
from tests.integration.test_breaker import (
    DELIVERY_STAGES,
    WAIT_S,
    accepted_ids,
    fast_toml,
    forward,
    read_values,
    running,
    snapshots,
    unique_host,
)

pytestmark = pytest.mark.integration


def test_bypassed_scrubbing_is_never_attested_so_a_panel_requiring_it_refuses(kafka: LocalBroker,
                                                                             tmp_path: Path) -> None:
    settings = StackSettings(bootstrap=kafka.bootstrap, workdir=tmp_path, stages=DELIVERY_STAGES,
                             bypass_scrubber=True, require_scrub=True, extra_toml=fast_toml(threshold=1000))
    host = unique_host("bypass")
    with running(Stack(settings)) as stack:
        ids = forward(stack, snapshots(host, range(5)))
        try:
            wait_for(lambda: {d["key"] for d in read_values(kafka.bootstrap, "traces.dead")} >= ids, WAIT_S,
                     interval_s=0.5, what="5 refusals in traces.dead")
        except TimeoutError as exc:
            pytest.fail(f"{exc}\n{stack.logs_tail(3000)}")
        letters = [d for d in read_values(kafka.bootstrap, "traces.dead") if d["key"] in ids]
        assert not ids & accepted_ids(stack), "the panel accepted traces that were never scrubbed"
        assert {d["reason"] for d in letters} == {"panel_422"}
        assert all("scrubber_attestation_required" in d["error"] for d in letters)
