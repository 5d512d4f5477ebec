"""At least once when the broker refuses a write, for every stage, on a real broker.

An input offset is committed only after every output of its record is acknowledged, or the
record is in the stage's dead-letter topic with its reason:
- a record too large for its stage's output topic (the topic's `max.message.bytes` lowered)
  goes to the dead-letter topic with reason `output_too_large`, and the offset moves past it;
  a dead letter itself too large for its topic is written with less of the original;
- an output topic whose writes fail (deleted, on a broker that does not create topics) holds
  the batch: nothing is committed past it, and once the topic is back every record comes out
  exactly once.

The whole pipeline runs (every stage its own process, stubs for panel and scrubber) on a
broker of this module's own, so topics can be shrunk and deleted without touching other
suites' topics.

And a record that reaches a stage while it recovers its table after a restart is not skipped
(on a broker of its own: it needs a partition the stage's group never committed).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from devkit.kafka_local import LocalBroker
from devkit.local_stack import Stack, StackSettings, wait_for
from pipeline.kafka.admin import create_topics
from pipeline.model.records import encode
from pipeline.topics import PIPELINE_STAGES, STAGES, TOPICS
from tests.conftest import local_broker
from tests.factory import turn_ended_envelope
from tests.integration.test_breaker import WAIT_S, fast_toml, lag, read_values, unique_host, wait_committed
from tests.kafka_util import committed, produce

pytestmark = pytest.mark.integration

LIMIT = 4000  # bytes: below every big turn's record, above every outcome record
BIG_WORDS = 400  # words per message: a turn of ~10 KB in every stage's output
HOLD_S = 8  # how long a held batch is watched for a commit that must not happen

# stage -> the output topic its case shrinks or deletes (deliver: its dead letters; its other
# output, delivery.outcomes, is what every breaker follows)
OUTPUT = {"ingest": "sessions.idle", "sample": "traces.sampled", "scrub": "traces.scrubbed",
          "sign": "traces.signed", "breaker": "traces.outbox", "deliver": "traces.dead"}


@pytest.fixture(scope="module")
def strict_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    with local_broker(tmp_path_factory.mktemp("kafka-strict"), "auto.create.topics.enable=false") as broker:
        yield broker


@pytest.fixture(scope="module")
def stack(strict_broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = StackSettings(bootstrap=strict_broker.bootstrap, workdir=tmp_path_factory.mktemp("alo"),
                             stages=PIPELINE_STAGES, sampling_rate=1.0, novelty_threshold=0.0,
                             worker_loglevel="info", extra_toml=fast_toml(open_s=6, threshold=1000))
    with Stack(settings).start() as running:
        yield running


async def _set_limit(bootstrap: str, name: str, limit: int | None) -> None:
    """The topic's table configs, with `max.message.bytes` lowered to `limit` (None: as the table says)."""
    configs = TOPICS[name].configs()
    if limit is not None:
        configs["max.message.bytes"] = str(limit)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, name, configs=configs)])
    finally:
        await admin.close()


async def _delete(bootstrap: str, name: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([name])
    finally:
        await admin.close()


def _recreate(bootstrap: str, name: str) -> None:
    """The topic table's topics created again (a deletion completes in the background)."""
    def created() -> bool:
        try:
            result = asyncio.run(create_topics(bootstrap, 4, 1))
        except KafkaError:
            return False
        return name in result["created"] or name in result["existing"]

    wait_for(created, 60, interval_s=1, what=f"{name} created again")


def _feed(bootstrap: str, host: str, first: int, count: int) -> None:
    envelopes = [turn_ended_envelope(i, host=host, words=BIG_WORDS) for i in range(first, first + count)]
    asyncio.run(produce(bootstrap, "opencode.events",
                        [(f"{host}:{e['session_id']}".encode(), encode(e)) for e in envelopes]))


def _ours(bootstrap: str, topic: str, host: str) -> list[dict[str, Any]]:
    """This case's records on a stage's input or output topic (every such record names its host)."""
    return [v for v in read_values(bootstrap, topic) if v.get("host") == host]


def _letters(bootstrap: str, stage: str, host: str) -> list[dict[str, Any]]:
    """This case's dead letters from `stage`: by the host in the original, or (deliver's letters
    may hold none of it) by the trace ids of the host's records on the stage's input."""
    ids = {v["trace_id"] for v in _ours(bootstrap, STAGES[stage].input, host)} if stage == "deliver" else set()
    return [letter for letter in read_values(bootstrap, STAGES[stage].dead)
            if letter.get("stage") == stage
            and (letter.get("key") in ids or host.encode() in base64.b64decode(letter["original_b64"]))]


def _fail(stack: Stack, what: str) -> None:
    pytest.fail(f"{what}\n{stack.logs_tail(2500)}")


@pytest.mark.parametrize("stage", PIPELINE_STAGES)
def test_refused_writes_are_dead_lettered_or_held_never_committed_past(stage: str, stack: Stack) -> None:
    bootstrap, output, group = stack.s.bootstrap, OUTPUT[stage], STAGES[stage].app_id
    source = STAGES[stage].input
    if stage == "deliver":
        stack.panel_faults(fail_for_s=600, status=400)  # every trace refused for good: a dead letter each

    # 1. too large for the output topic: dead-lettered (with less of the original when the
    #    letter is what is too large), and the input offset committed past it
    host = unique_host(f"big-{stage}")
    asyncio.run(_set_limit(bootstrap, output, LIMIT))
    try:
        _feed(bootstrap, host, 0, 2)
        try:
            wait_for(lambda: len(_letters(bootstrap, stage, host)) >= 2, WAIT_S, interval_s=0.5,
                     what=f"2 dead letters from {stage}")
            wait_committed(bootstrap, group, source, what=f"{stage} to commit past its dead letters")
        except TimeoutError as exc:
            _fail(stack, str(exc))
    finally:
        asyncio.run(_set_limit(bootstrap, output, None))
    letters = _letters(bootstrap, stage, host)
    assert len(letters) == 2, letters
    if stage != "deliver":
        assert not _ours(bootstrap, output, host), f"a refused record reached {output}"
    for letter in letters:
        if stage == "deliver":  # the panel's refusal stays the reason; the original is what was cut
            assert letter["reason"] == "panel_400"
            assert letter["detail"]["original_truncated"] is True and letter["original_b64"] == ""
        else:
            assert letter["reason"] == "output_too_large"
            assert letter["detail"]["refused_topic"] == output
            assert json.loads(base64.b64decode(letter["original_b64"]))["host"] == host

    # 2. the output topic gone (auto-create off): the batch is held, nothing committed past it;
    #    once the topic is back, every record comes out exactly once
    host = unique_host(f"gone-{stage}")
    asyncio.run(_delete(bootstrap, output))
    try:
        _feed(bootstrap, host, 10, 3)
        try:
            wait_for(lambda: len(_ours(bootstrap, source, host)) >= 3, WAIT_S, interval_s=0.5,
                     what=f"3 records on {source}")
            wait_for(lambda: any(lag(bootstrap, group, source).values()), WAIT_S, what=f"{stage} to have lag")
        except TimeoutError as exc:
            _fail(stack, str(exc))
        lagging = sum(lag(bootstrap, group, source).values())
        asyncio.run(asyncio.sleep(HOLD_S))
        assert sum(lag(bootstrap, group, source).values()) >= min(lagging, 1), \
            f"{stage} committed past records whose outputs were never written"
    finally:
        _recreate(bootstrap, output)
    def produced() -> list[dict[str, Any]]:
        return _letters(bootstrap, stage, host) if stage == "deliver" else _ours(bootstrap, output, host)

    try:
        wait_for(lambda: len(produced()) >= 3, WAIT_S, interval_s=0.5, what=f"3 records on {output}")
        wait_committed(bootstrap, group, source, what=f"{stage} to commit once its outputs are written")
    except TimeoutError as exc:
        _fail(stack, str(exc))
    assert len(produced()) == 3, f"{stage}: {len(produced())} records on {output} after the repair, 3 expected"
    if stage == "deliver":
        stack.panel_faults(fail_for_s=0)
    # the deleted topic was another stage's input: every stage restarts clean for the next case
    for name in PIPELINE_STAGES:
        stack.restart(name)


# Loaded by every process of the stack below (PYTHONPATH): once the file `arm` is in the hook's
# folder, the restarted stage's table recovery, right after it has read the changelog (changelog
# partitions paused, stream partitions not yet resumed), writes `record.json` to its partition
# with the stage's own producer and waits 3 s before going on. A fetch waiting at that moment
# took the record and faust dropped it (fixed in agents/consumer_drain.py).
RECOVERY_HOOK = """
import os

_dir = os.environ.get("TEST_RECOVERY_HOOK_DIR")
if _dir:
    import asyncio, base64, json, logging
    from pathlib import Path
    from faust.tables import recovery

    _completed = recovery.Recovery.on_recovery_completed

    async def on_recovery_completed(self, generation_id=0):
        arm = Path(_dir) / "arm"
        if arm.exists():
            arm.unlink()
            spec = json.loads((Path(_dir) / "record.json").read_text())
            sent = await self.app.producer._ensure_producer().send_and_wait(
                spec["topic"], value=base64.b64decode(spec["value"]), key=spec["key"].encode(),
                partition=spec["partition"])
            logging.getLogger("recovery-hook").warning("recovery hook: wrote %s[%d]@%d", spec["topic"],
                                                       sent.partition, sent.offset)
            await asyncio.sleep(3)
        return await _completed(self, generation_id)

    recovery.Recovery.on_recovery_completed = on_recovery_completed
"""


def test_a_record_written_while_a_restarted_stage_recovers_its_table_is_not_skipped(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    # A restarted ingest reads its table's changelog, then pauses those partitions while its
    # stream partitions are still paused; faust's fetch, already waiting, read that as "every
    # partition", took a record that arrived then and dropped it. The seek to the committed
    # offsets that follows brought back a partition with a commit, not one without: the turn
    # never reached sessions.idle, and the next record there was committed past it.
    hook = tmp_path_factory.mktemp("recovery-hook")
    (hook / "sitecustomize.py").write_text(RECOVERY_HOOK)
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    group, source = STAGES["ingest"].app_id, STAGES["ingest"].input
    with local_broker(tmp_path_factory.mktemp("kafka-recovery")) as broker:
        bootstrap = broker.bootstrap
        settings = StackSettings(bootstrap=bootstrap, workdir=tmp_path_factory.mktemp("recovery"), stages=("ingest",),
                                 worker_loglevel="info",
                                 extra_env={"PYTHONPATH": path, "TEST_RECOVERY_HOOK_DIR": str(hook)})
        with Stack(settings).start() as stack:
            first = unique_host("recovered")
            _feed(bootstrap, first, 0, 1)  # a table entry to recover, a commit on one partition
            try:
                wait_for(lambda: _ours(bootstrap, "sessions.idle", first), WAIT_S, interval_s=0.5,
                         what="the first turn on sessions.idle")
                wait_committed(bootstrap, group, source, what="ingest to commit the first turn")
            except TimeoutError as exc:
                _fail(stack, str(exc))
            done = {p for (t, p) in asyncio.run(committed(bootstrap, group)) if t == source}
            fresh = min(set(range(stack.s.partitions)) - done)  # a partition the group never committed

            late = unique_host("in-recovery")
            envelope = turn_ended_envelope(1, host=late)
            (hook / "record.json").write_text(json.dumps({
                "topic": source, "partition": fresh, "key": f"{late}:{envelope['session_id']}",
                "value": base64.b64encode(encode(envelope)).decode("ascii")}))
            (hook / "arm").write_text("")
            stack.restart("ingest")  # kill -9, as every case above ends
            try:
                stack.procs["ingest"].wait_for_log(r"recovery hook: wrote", WAIT_S)
                wait_for(lambda: _ours(bootstrap, "sessions.idle", late), WAIT_S, interval_s=0.5,
                         what=f"the turn written to {source}[{fresh}] during the recovery on sessions.idle")
                wait_committed(bootstrap, group, source, what="ingest to commit it")
            except TimeoutError as exc:
                _fail(stack, str(exc))
            assert len(_ours(bootstrap, "sessions.idle", late)) == 1
