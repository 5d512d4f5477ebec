"""Two collector replicas in front of the whole pipeline: one killed with kill -9, every ended turn
delivered to the panel exactly once.

A `Stack` (stub panel, stub scrubber, every stage, samplingRate 1.0) and two
`python -m pipeline.collector.service` processes (`Stack.start_collector`) over four simulated
opencode daemons served over HTTP (bench/collector.py's: every host ends a turn about every
0.8 s of each session cycle while a collector streams from it, and none while nobody does). The
replicas run a group, host table and state topic of their own (the hidden `--group`,
`--hosts-topic`, `--state-topic` options), so no other test's collector or hosts are in what they
read; their events go to the real `opencode.events`, which the stack's ingest reads. The hosts'
state starts as if turn FIRST_TURNS of every session had been reported (state files, read once
for a host with no state in the topic), so every turn the test counts is one that ended while it
ran. Host names are the test's own, so its trace ids are too.

Turns end on every host; once both replicas follow some hosts (each host followed by exactly
one), one replica is killed with kill -9 while turns are ending; the survivor takes its hosts
over after the group's session timeout and turns keep ending; then the daemons stop ending turns
and the stub panel must hold exactly the trace ids of the ended turns (none missing, none extra),
each accepted once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.collector import FIRST_TURNS, SESSIONS_PER_HOST, listing, sid_of, write_states
from devkit.kafka_local import LocalBroker
from devkit.local_stack import PipelineProcess, Stack, StackSettings, wait_for
from pipeline.model.trace import trace_id
from pipeline.topics import COLLECTOR_PARTITIONS, STAGES
from tests.fixtures import REPO
from tests.integration.test_breaker import running, unique_host

pytestmark = pytest.mark.integration

HOSTS = 4
FRAMES_PER_HOST_S = 35  # 28 frames a turn: a turn about every 0.8 s per host while it is followed
RUN_S = 4.0  # turns ending before the kill and again after the takeover
WAIT_S = 90

EVENT = re.compile(r"(collecting from|stopped following) \d+ hosts: (.*)$", re.M)


def followed(proc: PipelineProcess) -> set[str]:
    """The hosts a live replica's log says it follows now (a killed one follows none)."""
    hosts: set[str] = set()
    if not proc.alive():
        return hosts
    for m in EVENT.finditer(proc.log()):
        names = set(m.group(2).split(", "))
        hosts = names if m.group(1) == "collecting from" else hosts - names
    return hosts


def each_host_once(replicas: list[PipelineProcess], hosts: set[str]) -> bool:
    owners = Counter(h for r in replicas for h in followed(r))
    return set(owners) == hosts and all(n == 1 for n in owners.values())


async def create_fleet_topics(bootstrap: str, hosts_topic: str, state_topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        compact = {"cleanup.policy": "compact", "retention.ms": "-1"}
        await admin.create_topics([NewTopic(t, COLLECTOR_PARTITIONS, 1, topic_configs=compact)
                                   for t in (hosts_topic, state_topic)])
    finally:
        await admin.close()


@contextlib.contextmanager
def simulated_daemons(tmp: Path) -> Iterator[list[int]]:
    """bench/collector.py's fake daemons in their own process; yields their ports, by host index."""
    port_file = tmp / "ports.json"
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "collector.py"), "--serve-daemons", str(HOSTS),
                             "--rate", str(HOSTS * FRAMES_PER_HOST_S), "--port-file", str(port_file)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(port_file.exists, 60, what="the simulated daemons serving")
        yield json.loads(port_file.read_text())
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def turns_of(urls: dict[str, str]) -> dict[str, dict[str, int]]:
    """Turns ended so far, per host and session (FIRST_TURNS before the test)."""
    return {name: httpx.get(f"{url}/bench/turns", timeout=10).json() for name, url in urls.items()}


def settled(urls: dict[str, str]) -> bool:
    """No turn ended within 1.5 s (a paused daemon first finishes the turn it is sending)."""
    first = turns_of(urls)
    time.sleep(1.5)
    return turns_of(urls) == first


def test_two_replicas_one_killed_every_ended_turn_delivered_once(kafka: LocalBroker, tmp_path: Path) -> None:
    names = [unique_host(f"failover{h}") for h in range(HOSTS)]
    tag = uuid.uuid4().hex[:8]
    hosts_topic, state_topic = f"t{tag}.collector.hosts", f"t{tag}.collector.state"
    fleet = ["--group", f"test-collector-failover-{tag}", "--hosts-topic", hosts_topic, "--state-topic", state_topic]
    asyncio.run(create_fleet_topics(kafka.bootstrap, hosts_topic, state_topic))
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    write_states(state_dir, HOSTS, names)
    with simulated_daemons(tmp_path) as ports:
        urls = {names[h]: f"http://127.0.0.1:{port}" for h, port in enumerate(ports)}
        index = {name: h for h, name in enumerate(names)}
        stack = Stack(StackSettings(
            bootstrap=kafka.bootstrap, workdir=tmp_path / "stack", sampling_rate=1.0,
            extra_toml=f'checkpoint_interval_s = 1\npoll_interval_s = 0\nstate_dir = "{state_dir}"\n',
            hosts_toml="".join(f'[[hosts]]\nname = "{n}"\nbase_url = "{u}"\n\n' for n, u in urls.items())))
        ingest = STAGES["ingest"]
        with running(stack, extra_groups=[(ingest.app_id, ingest.input)]):
            replicas = [stack.start_collector(f"collector-{i}", service_args=fleet) for i in (1, 2)]
            hosts = set(urls)
            try:
                wait_for(lambda: each_host_once(replicas, hosts) and all(followed(r) for r in replicas), WAIT_S,
                         what="both replicas following hosts, each host by one")
            except TimeoutError as exc:
                pytest.fail(f"{exc}: {[sorted(followed(r)) for r in replicas]}\n{stack.logs_tail(2500)}")
            before = turns_of(urls)
            time.sleep(RUN_S)
            at_kill = turns_of(urls)
            victim = max(replicas, key=lambda r: len(followed(r)))
            survivor = next(r for r in replicas if r is not victim)
            moved = followed(victim)
            victim.kill9()  # every followed host is mid-turn at 35 frames/s
            assert all(sum(at_kill[n].values()) > sum(before[n].values()) for n in hosts), \
                f"turns were not ending on every host before the kill: {before} -> {at_kill}"
            try:
                wait_for(lambda: each_host_once([survivor], hosts), WAIT_S,
                         what=f"{sorted(moved)} taken over after the kill")
            except TimeoutError as exc:
                pytest.fail(f"{exc}\n{stack.logs_tail(2500)}")
            after_takeover = turns_of(urls)
            time.sleep(RUN_S)
            for url in urls.values():  # no more turns: what ended is what must be delivered
                httpx.post(f"{url}/bench/pause", timeout=10)
            wait_for(lambda: settled(urls), 30, what="the last turns ended")
            ended = turns_of(urls)
            assert all(sum(ended[n].values()) > sum(after_takeover[n].values()) for n in moved), \
                f"no turn ended on the moved hosts after the takeover: {after_takeover} -> {ended}"

            wanted = {trace_id(name, sid_of(index[name], s), listing(index[name], s, n)[-1]["info"]["id"])
                      for name in names for s in range(SESSIONS_PER_HOST)
                      for n in range(FIRST_TURNS + 1, ended[name][sid_of(index[name], s)] + 1)}
            assert len(wanted) > HOSTS * 5, f"too few turns ended to tell anything: {ended}"

            def delivered() -> dict[str, int]:
                return {t["trace_id"]: int(t["upserts"]) for t in stack.panel_accepted()}

            try:
                wait_for(lambda: wanted <= set(delivered()), 120, interval_s=1.0,
                         what=f"the traces of all {len(wanted)} ended turns delivered")
            except TimeoutError:
                missing = wanted - set(delivered())
                pytest.fail(f"{len(missing)} of {len(wanted)} ended turns never delivered: {sorted(missing)[:5]}\n"
                            f"{stack.logs_tail(2500)}")
            time.sleep(3)  # room for a duplicate or a stray trace to arrive
            got = delivered()
            extra = set(got) - wanted
            assert not extra, f"{len(extra)} traces for no ended turn: {sorted(extra)[:5]}"
            assert len(got) == len(wanted)
            repeated = {tid: n for tid, n in got.items() if n != 1}
            assert not repeated, f"traces delivered more than once: {repeated}"
            before_kill = sum(sum(t.values()) for t in at_kill.values()) - HOSTS * SESSIONS_PER_HOST * FIRST_TURNS
            print(f"{len(wanted)} turns ended ({before_kill} before the kill), {len(got)} traces delivered once "
                  f"each; {sorted(moved)} moved")
