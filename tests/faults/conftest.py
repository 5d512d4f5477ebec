"""Fixtures for the fault suites: brokers of their own, one shared delivery stack, results.

The fault tests stop, restart and starve things, so none of them runs on the session broker
(tests/conftest.py) that the rest of the suite shares: a half-processed workload left behind
there would be picked up by the next stack with the same consumer groups. The kill -9, panel
and scrubber cases share one broker and one stack (module scope: a stack start and its warm-up
cost more than a case), each case with hosts of its own so its trace ids are its own; the
broker-restart and collector cases build their own broker and stack.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from devkit.kafka_local import LocalBroker, free_port
from devkit.local_stack import Stack, StackSettings, wait_for
from pipeline import config as config_mod
from pipeline.model.records import encode
from tests.factory import snapshot
from tests.kafka_util import produce

# The delivery half: snapshots are produced to sessions.idle, so ingest has nothing to do.
DELIVERY_STAGES = ("sample", "scrub", "sign", "breaker", "deliver")

# Durations shortened so each case takes seconds, not production minutes. The breaker opens
# after 3 failures within 10 s and stays open 3 s; delivery and scrub retries back off to at
# most 1 s, so recovery is measured after the fault, not after a 30 s backoff step.
FAST_TOML = """
[breaker]
failure_window_s = 10
open_s = 3
mode = "hold"

[delivery]
retry_base_s = 0.2
retry_max_s = 1

[scrub]
retry_base_s = 0.2
retry_max_s = 1
"""

# faust's defaults are a 60 s group session timeout and a 3 s heartbeat: a stage killed with
# -9 keeps its partitions (nobody consumes them) until its session expires, so every kill costs
# a minute of stall (measured: 60.4 s for deliver, 60.8 s for scrub). The stages take no
# setting for it (agents/base.make_app), but faust reads these variables for settings not
# passed in code. 10 s keeps the suite within its time budget and still well above what a
# loaded 2-core machine needs between heartbeats (1 s here).
FAST_GROUP_ENV = {"BROKER_SESSION_TIMEOUT": "10", "BROKER_HEARTBEAT_INTERVAL": "1"}

WARMUP_S = 180.0  # first start on a loaded machine: imports, group joins, topic metadata


@contextmanager
def own_broker(data_dir: Path) -> Iterator[LocalBroker]:
    """A broker of this test's own, on free ports, stopped at the end whatever happened."""
    broker = LocalBroker(host="127.0.0.1", port=free_port(), controller_port=free_port(), data_dir=data_dir,
                         cache_dir=config_mod.DEFAULT_CACHE_DIR)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def fault_stack(bootstrap: str, workdir: Path, *, stages: tuple[str, ...] = DELIVERY_STAGES,
                extra_toml: str = FAST_TOML, hosts_toml: str = "") -> Stack:
    return Stack(StackSettings(bootstrap=bootstrap, workdir=workdir, stages=stages, sampling_rate=1.0,
                               extra_toml=extra_toml, hosts_toml=hosts_toml, extra_env=dict(FAST_GROUP_ENV),
                               worker_loglevel="info"))


def warm_up(stack: Stack, bootstrap: str) -> None:
    """One trace through every stage, so a case's timings measure the fault, not the start."""
    host = f"warmup-{uuid.uuid4().hex[:8]}"
    snap = snapshot(0, host=host)
    asyncio.run(produce(bootstrap, "sessions.idle", [(f"{host}:{snap['session_id']}".encode(), encode(snap))]))
    try:
        wait_for(lambda: len(stack.panel_accepted()) >= 1, WARMUP_S, interval_s=0.5, what="the warm-up trace")
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n{stack.logs_tail(3000)}")


@pytest.fixture(scope="module")
def faults_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    with own_broker(tmp_path_factory.mktemp("faults-kafka")) as broker:
        yield broker


@pytest.fixture(scope="module")
def faults_stack(faults_broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # ingest too, for its kill -9 case (fed collector envelopes); the other cases feed sessions.idle
    stack = fault_stack(faults_broker.bootstrap, tmp_path_factory.mktemp("faults-stack"),
                        stages=("ingest", *DELIVERY_STAGES))
    with stack.start():
        started = time.monotonic()
        warm_up(stack, faults_broker.bootstrap)
        print(f"\nfaults stack warm in {time.monotonic() - started:.1f}s")
        yield stack


@pytest.fixture
def stack(faults_stack: Stack) -> Iterator[Stack]:
    """The shared stack, put back as a case found it whatever the case did: fault knobs
    cleared, and a stage a failed case left dead started again, so one failure does not
    cascade into the next case's numbers."""
    yield faults_stack
    faults_stack.panel_faults(reset=True)
    faults_stack.scrubber_faults(reset=True)
    for stage in faults_stack.s.stages:
        if not faults_stack.procs[stage].alive():
            faults_stack.start_stage(stage)
