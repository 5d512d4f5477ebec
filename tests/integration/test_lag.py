"""`pipeline lag` on the real broker: per-partition committed / end / lag numbers, rates,
the bottleneck, groups and topics that do not exist, the JSON command, the lag gauge and the
lag exporter (`--serve`) that reports every stage whether or not a replica runs.

The exact-number tests use stages and topics of their own (unique names), because the
session broker is shared: other tests run the real stages and commit for their groups.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client import REGISTRY

from devkit.kafka_local import free_port
from pipeline.cli import lag as lag_cli
from pipeline.kafka import admin
from pipeline.kafka.lag import LagCollector, collect_lag, export_lag_forever, render_table, to_json
from pipeline.topics import PIPELINE_STAGES, STAGES, TOPICS, Stage, partitions_of

pytestmark = pytest.mark.integration

TIMEOUT_S = 60.0


async def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    client = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await client.start()
    try:
        await client.create_topics([NewTopic(name, partitions, 1)])
        deadline = time.monotonic() + TIMEOUT_S
        while True:  # a new topic refuses produce requests until each partition has a leader
            (desc,) = await client.describe_topics([name])
            if not desc.get("error_code") and len(desc["partitions"]) == partitions \
                    and all(p["leader"] >= 0 for p in desc["partitions"]):
                return
            assert time.monotonic() < deadline, f"{name}: no leaders after {TIMEOUT_S}s"
            await asyncio.sleep(0.2)
    finally:
        await client.close()


async def produce_to(bootstrap: str, topic: str, counts: dict[int, int]) -> None:
    """`counts[p]` records on partition p, so the expected offsets are exact."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for partition, n in counts.items():
            for i in range(n):
                await producer.send(topic, value=f"r{i}".encode(), partition=partition)
        await producer.flush()
    finally:
        await producer.stop()


async def commit(bootstrap: str, group: str, offsets: dict[TopicPartition, int]) -> None:
    """Commit for `group` the way a stage does, without joining it (manual assignment)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit(offsets)
    finally:
        await consumer.stop()


def test_report_counts_committed_end_and_lag_per_partition(kafka) -> None:
    bootstrap = kafka.bootstrap
    uid = uuid.uuid4().hex[:8]
    events, snapshots = f"lagtest.{uid}.events", f"lagtest.{uid}.snapshots"
    stages = {
        # behind on both partitions it has; partition 2 never written
        "slow": Stage(f"lt{uid}-slow", events, (), "x", "test"),
        # a second group on the same topic, all caught up (committed 0 on the empty partition)
        "done": Stage(f"lt{uid}-done", events, (), "x", "test"),
        # more lag than "slow", but it keeps consuming
        "busy": Stage(f"lt{uid}-busy", snapshots, (), "x", "test"),
        # never ran: the whole topic is its lag, and it is not the bottleneck
        "idle": Stage(f"lt{uid}-idle", snapshots, (), "x", "test"),
        # input topic was never created
        "gone": Stage(f"lt{uid}-gone", f"lagtest.{uid}.missing", (), "x", "test"),
    }
    ev = [TopicPartition(events, p) for p in range(3)]
    sn = [TopicPartition(snapshots, p) for p in range(2)]

    async def scenario() -> None:
        await create_topic(bootstrap, events, 3)
        await create_topic(bootstrap, snapshots, 2)
        await produce_to(bootstrap, events, {0: 10, 1: 6})
        await produce_to(bootstrap, snapshots, {0: 20, 1: 20})
        await commit(bootstrap, stages["slow"].app_id, {ev[0]: 4})
        await commit(bootstrap, stages["done"].app_id, {ev[0]: 10, ev[1]: 6, ev[2]: 0})
        await commit(bootstrap, stages["busy"].app_id, {sn[0]: 2, sn[1]: 3})

        # One sample, no rates: the bottleneck is the largest lag among groups that ran.
        first = await collect_lag(bootstrap, stages)
        slow, done, busy, idle, gone = (first.stage(s.name) for s in stages.values())
        assert [(p.partition, p.committed, p.end, p.lag) for p in slow.partitions] == \
            [(0, 4, 10, 6), (1, None, 6, 6), (2, None, 0, 0)]
        assert slow.lag == 12 and slow.topic_exists and slow.group_exists and slow.group == stages["slow"].app_id
        assert [(p.committed, p.end, p.lag) for p in done.partitions] == [(10, 10, 0), (6, 6, 0), (0, 0, 0)]
        assert done.lag == 0 and done.drain_s == 0.0
        assert [(p.committed, p.end, p.lag) for p in busy.partitions] == [(2, 20, 18), (3, 20, 17)]
        assert [(p.committed, p.end, p.lag) for p in idle.partitions] == [(None, 20, 20), (None, 20, 20)]
        assert idle.lag == 40 and not idle.group_exists and first.absent == [stages["idle"].name]
        assert not gone.topic_exists and gone.partitions == () and gone.error is None
        assert slow.rate is None and first.interval_s is None
        assert first.bottleneck == stages["busy"].name  # lag 35 > 12; idle (40) never ran

        # "busy" consumes 10 more; "slow" consumes nothing: by time to drain, slow is the
        # bottleneck (stalled) although busy still has the larger lag.
        await commit(bootstrap, stages["busy"].app_id, {sn[0]: 7, sn[1]: 8})
        await produce_to(bootstrap, snapshots, {0: 1})
        second = await collect_lag(bootstrap, stages, previous=first)
        assert second.interval_s is not None and second.interval_s > 0
        busy2, slow2, done2 = second.stage(stages["busy"].name), second.stage(stages["slow"].name), \
            second.stage(stages["done"].name)
        assert busy2.lag == 26
        assert busy2.rate == pytest.approx(10 / second.interval_s)
        assert busy2.in_rate == pytest.approx(1 / second.interval_s)
        assert busy2.drain_s == pytest.approx(26 / busy2.rate)
        assert slow2.rate == 0 and slow2.stalled and slow2.drain_s == math.inf
        assert done2.rate == 0 and done2.drain_s == 0.0 and not done2.stalled
        assert second.bottleneck == stages["slow"].name

        # The JSON form says the same, with a stalled drain as null (not Infinity, not JSON).
        doc = json.loads(json.dumps(to_json(second), allow_nan=False))
        by_stage = {s["stage"]: s for s in doc["stages"]}
        assert doc["bottleneck"] == stages["slow"].name and doc["absent_groups"] == [stages["idle"].name]
        assert by_stage[stages["slow"].name]["partitions"] == [
            {"partition": 0, "committed": 4, "start": 0, "end": 10, "lag": 6, "expired": 0},
            {"partition": 1, "committed": None, "start": 0, "end": 6, "lag": 6, "expired": 0},
            {"partition": 2, "committed": None, "start": 0, "end": 0, "lag": 0, "expired": 0}]
        assert by_stage[stages["slow"].name]["stalled"] and by_stage[stages["slow"].name]["drain_s"] is None
        assert by_stage[stages["gone"].name]["topic_exists"] is False and by_stage[stages["gone"].name]["lag"] is None
        assert render_table(second).row_count == len(stages)

        # Sampling twice `interval_s` apart inside one call gives rates as well.
        sampled = await collect_lag(bootstrap, stages, interval_s=0.3)
        assert sampled.interval_s is not None and sampled.interval_s >= 0.3
        assert all(s.rate == 0 for s in sampled.stages if s.topic_exists)

        # Reading the report created nothing on the broker and joined no group.
        client = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await client.start()
        try:
            assert f"lagtest.{uid}.missing" not in await client.list_topics()
        finally:
            await client.close()
        async with LagCollector(bootstrap) as collector:
            again = await collector.sample(stages)
        assert again.stage(stages["done"].name).members == 0

    asyncio.run(scenario())


def test_export_lag_forever_sets_the_gauge(kafka, monkeypatch: pytest.MonkeyPatch) -> None:
    bootstrap = kafka.bootstrap
    uid = uuid.uuid4().hex[:8]
    topic = f"lagtest.{uid}.export"
    stage = Stage(f"lt{uid}-export", topic, (), "x", "test")
    # export_lag_forever takes a stage name from the topic table; add this one for the test.
    monkeypatch.setitem(STAGES, stage.name, stage)

    def gauge(partition: int) -> float | None:
        return REGISTRY.get_sample_value("pipeline_consumer_lag",
                                         {"stage": stage.name, "topic": topic, "partition": str(partition)})

    async def scenario() -> None:
        await create_topic(bootstrap, topic, 2)
        await produce_to(bootstrap, topic, {0: 5, 1: 3})
        await commit(bootstrap, stage.app_id, {TopicPartition(topic, 0): 1})
        task = asyncio.create_task(export_lag_forever(bootstrap, stage.name, interval_s=0.2))
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while (gauge(0), gauge(1)) != (4.0, 3.0):
                assert not task.done(), task.exception()
                assert time.monotonic() < deadline, f"gauge is {(gauge(0), gauge(1))}, want (4, 3)"
                await asyncio.sleep(0.1)
            # beside it: the reading worked, and the group has no member (nothing joined it)
            assert REGISTRY.get_sample_value("pipeline_lag_export_ok", {"stage": stage.name}) == 1.0
            assert REGISTRY.get_sample_value("pipeline_consumer_group_members", {"stage": stage.name}) == 0.0
            # and it follows the group as it commits
            await commit(bootstrap, stage.app_id, {TopicPartition(topic, 0): 5, TopicPartition(topic, 1): 3})
            while (gauge(0), gauge(1)) != (0.0, 0.0):
                assert time.monotonic() < deadline, f"gauge is {(gauge(0), gauge(1))}, want (0, 0)"
                await asyncio.sleep(0.1)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(scenario())


def test_lag_command_json_lists_every_stage(kafka, kafka_env, kafka_config, capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(admin.create_topics(kafka.bootstrap, kafka_config.kafka.partitions, 1))
    parser = argparse.ArgumentParser()
    lag_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["lag", "--json", "--interval", "0.5"])
    # no stage runs here: exit 3, every deployed stage named as having no running member
    assert lag_cli.run(args, kafka_config) == 3
    doc = json.loads(capsys.readouterr().out)
    assert doc["health"]["exit_code"] == 3 and doc["health"]["no_members"] == list(PIPELINE_STAGES)
    assert doc["bootstrap"] == kafka.bootstrap and doc["interval_s"] >= 0.5
    assert [s["stage"] for s in doc["stages"]] == list(STAGES)
    for s in doc["stages"]:
        stage = STAGES[s["stage"]]
        assert s["group"] == stage.app_id and s["topic"] == stage.input and s["topic_exists"]
        assert len(s["partitions"]) == partitions_of(TOPICS[stage.input], kafka_config.kafka.partitions)
        assert s["lag"] == sum(p["lag"] for p in s["partitions"])
        assert s["rate"] is not None and s["error"] is None
        for p in s["partitions"]:
            assert p["end"] >= p["start"] >= 0 and p["lag"] >= 0

    # The same through a separate process, as an operator runs it; --stage narrows it.
    env = {**os.environ, **kafka_env}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli.lag", "--json", "--interval", "0",
                           "--stage", "sign", "--stage", "deliver"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    doc = json.loads(proc.stdout)
    assert [s["stage"] for s in doc["stages"]] == ["sign", "deliver"] and doc["interval_s"] is None
    assert proc.stderr == "pipeline lag: no running member in stage(s): sign, deliver (nothing consumes their input)\n"

    # A table, for people.
    args = parser.parse_args(["lag", "--interval", "0"])
    assert lag_cli.run(args, kafka_config) == 3
    out = capsys.readouterr().out
    assert all(name in out for name in STAGES)

    # An unknown stage is a usage error naming the option, before any broker call.
    bad = subprocess.run([sys.executable, "-m", "pipeline.cli.lag", "--stage", "nope"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--stage" in bad.stderr and "nope" in bad.stderr


@pytest.mark.parametrize("mode", ["json", "file", "terminal"])
def test_lag_watch_refreshes_until_interrupted(kafka, kafka_env, kafka_config, tmp_path, mode: str) -> None:
    """--watch: NDJSON lines; a table per refresh on a file; a rich Live display on a terminal
    (TTY_COMPATIBLE=1 makes rich treat the pipe as one). Each later frame carries rates.
    Ctrl-C ends it with status 0."""
    asyncio.run(admin.create_topics(kafka.bootstrap, kafka_config.kafka.partitions, 1))
    out = tmp_path / "watch.out"
    cmd = [sys.executable, "-m", "pipeline.cli.lag", "--watch", "--interval", "0.3", "--stage", "sign"]
    env = {**os.environ, **kafka_env}
    if mode == "json":
        cmd.append("--json")
    if mode == "terminal":
        env.update(TTY_COMPATIBLE="1", COLUMNS="200")

    def frames() -> list[str]:
        text = out.read_text(errors="replace")
        marker = '"stages"' if mode == "json" else "consumer lag at"
        return [line for line in text.splitlines() if marker in line]

    with open(out, "wb") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + TIMEOUT_S * 2
        while len(frames()) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert len(frames()) >= 3, out.read_text(errors="replace")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, proc.stderr.read().decode() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()
    got = frames()
    if mode == "json":
        docs = [json.loads(line) for line in got]
        assert all([s["stage"] for s in d["stages"]] == ["sign"] for d in docs)
        assert docs[0]["interval_s"] is None  # the first frame has one sample only
        assert all(d["interval_s"] > 0 and d["stages"][0]["rate"] is not None for d in docs[1:])
    else:
        assert "one sample" in got[0] and all("rates over" in f for f in got[1:])
        assert ("\x1b[" in out.read_text()) == (mode == "terminal")  # Live redraws with cursor controls


def test_rates_and_lag_edge_cases_without_a_broker() -> None:
    """Retention, resets and recreated topics, on hand-made reports."""
    from pipeline.kafka.lag import LagReport, PartitionLag, StageLag, with_rates

    def report(at: float, *parts: PartitionLag, error: str | None = None) -> LagReport:
        return LagReport("b", at, (StageLag("s", "g", "t", True, parts, "Stable", 1, error=error),), monotonic=at)

    # Retention deleted records the group had not read: they are counted as expired, not as lag.
    p = PartitionLag(0, committed=3, start=10, end=15)
    assert (p.position, p.lag, p.expired) == (10, 5, 7)
    # A topic recreated under old commits: no negative lag.
    assert PartitionLag(0, committed=50, start=0, end=5).lag == 0

    before = report(100.0, PartitionLag(0, None, 0, 10), PartitionLag(1, 8, 0, 10), PartitionLag(2, 9, 0, 9))
    after = report(102.0, PartitionLag(0, 4, 6, 12),  # first commit: 4 read from the start (0)
                   PartitionLag(1, 2, 0, 10),  # reset backwards: not negative throughput
                   PartitionLag(2, 9, 9, 9))  # retention moved the start: not consumption
    s = with_rates(after, before).stages[0]
    assert with_rates(after, before).interval_s == 2.0
    assert s.rate == 4 / 2.0 and s.in_rate == 2 / 2.0
    # An error on either side leaves the rate unknown rather than 0.
    assert with_rates(report(102.0, error="boom"), before).stages[0].rate is None


# ---------------------------------------------------------------- the lag exporter (`--serve`)


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """/metrics of a process as {(name, labels): value}; {} while it does not answer yet."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return {}
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@contextlib.contextmanager
def exporter(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A lag exporter process, ended with SIGINT (how an operator or compose stops it)."""
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        yield proc
        assert proc.poll() is None, f"the exporter exited: {log.read_text(errors='replace')}"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def wait_for(port: int, proc: subprocess.Popen[bytes], log: Path, ready: Callable[[dict[Any, float]], bool],
             what: str) -> dict[Any, float]:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        samples = scrape(port)
        if samples and ready(samples):
            return samples
        assert proc.poll() is None, f"the exporter exited: {log.read_text(errors='replace')}"
        assert time.monotonic() < deadline, f"{what}; /metrics has {sorted(k for k in samples if 'lag' in k[0])}"
        time.sleep(0.2)


def test_lag_exporter_serves_every_stage_with_no_replica_running(kafka, kafka_env, kafka_config,
                                                                tmp_path: Path) -> None:
    """`python -m pipeline.cli.lag --serve`, as compose runs it: no stage runs here, yet every
    deployed stage's lag is on /metrics, equal to what `pipeline lag` reads, with 0 members."""
    asyncio.run(admin.create_topics(kafka.bootstrap, kafka_config.kafka.partitions, 1))
    port, log = free_port(), tmp_path / "exporter.log"
    cmd = [sys.executable, "-m", "pipeline.cli.lag", "--serve", "--metrics-port", str(port), "--interval", "0.5"]
    with exporter(cmd, {**os.environ, **kafka_env}, log) as proc:
        samples = wait_for(port, proc, log, lambda m: all(
            value(m, "pipeline_lag_export_ok", stage=s) == 1.0 for s in PIPELINE_STAGES), "no reading for every stage")
        expected = asyncio.run(collect_lag(kafka.bootstrap, [STAGES[s] for s in PIPELINE_STAGES]))
        for s in expected.stages:
            assert s.members == 0 and value(samples, "pipeline_consumer_group_members", stage=s.stage) == 0.0
            assert len(s.partitions) == partitions_of(TOPICS[s.topic], kafka_config.kafka.partitions)
            for p in s.partitions:
                assert value(samples, "pipeline_consumer_lag", stage=s.stage, topic=s.topic,
                             partition=str(p.partition)) == p.lag, (s.stage, p)
            assert abs(value(samples, "pipeline_lag_export_timestamp_seconds", stage=s.stage) - time.time()) < 60
        # passthrough, the wiring check, is never deployed: not exported unless asked for
        assert not [k for k in samples if ("stage", "passthrough") in k[1]]


def test_lag_exporter_numbers_for_a_group_that_is_down(kafka, tmp_path: Path) -> None:
    """Exact numbers, on a stage and topic of this test's own (the shared broker's stage topics
    are read by other tests): the group committed once and has no member; the exporter shows its
    lag, follows a commit, and time to drain appears once two readings give a rate. The stage
    is added to the topic table in the exporter's own process, which then runs the same main()
    as `python -m pipeline.cli.lag`."""
    uid = uuid.uuid4().hex[:8]
    topic, name = f"lagtest.{uid}.serve", f"lt{uid}-serve"
    stage = Stage(name, topic, (), "x", "test")
    tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)

    async def setup() -> None:
        await create_topic(kafka.bootstrap, topic, 2)
        await produce_to(kafka.bootstrap, topic, {0: 5, 1: 3})
        await commit(kafka.bootstrap, stage.app_id, {tp0: 1})

    asyncio.run(setup())
    port, log = free_port(), tmp_path / "exporter.log"
    program = ("import sys; from pipeline.topics import STAGES, Stage; "
               f"STAGES[{name!r}] = Stage({name!r}, {topic!r}, (), 'x', 'test'); "
               "from pipeline.cli.lag import main; sys.exit(main())")
    cmd = [sys.executable, "-c", program, "--serve", "--metrics-port", str(port), "--interval", "0.3",
           "--stage", name]
    env = {**os.environ, "PIPELINE_KAFKA__BOOTSTRAP": kafka.bootstrap}

    def lag(m: dict[Any, float], partition: int) -> float | None:
        return value(m, "pipeline_consumer_lag", stage=name, topic=topic, partition=str(partition))

    with exporter(cmd, env, log) as proc:
        samples = wait_for(port, proc, log, lambda m: (lag(m, 0), lag(m, 1)) == (4.0, 3.0), "lag (4, 3)")
        assert value(samples, "pipeline_consumer_group_members", stage=name) == 0.0
        assert value(samples, "pipeline_lag_export_ok", stage=name) == 1.0
        # Nothing consumes: once two readings give a rate, the drain time is +Inf (stalled).
        samples = wait_for(port, proc, log, lambda m: value(m, "pipeline_consumer_lag_drain_seconds", stage=name)
                           is not None, "no drain time")
        assert value(samples, "pipeline_consumer_lag_drain_seconds", stage=name) == math.inf
        asyncio.run(commit(kafka.bootstrap, stage.app_id, {tp0: 5, tp1: 3}))
        samples = wait_for(port, proc, log, lambda m: (lag(m, 0), lag(m, 1)) == (0.0, 0.0), "lag (0, 0)")
        wait_for(port, proc, log, lambda m: value(m, "pipeline_consumer_lag_drain_seconds", stage=name) == 0.0,
                 "drain time 0 once caught up")


def test_lag_exporter_keeps_serving_while_the_broker_is_down(tmp_path: Path) -> None:
    """No broker at all: /metrics answers, every stage's reading is reported failed, and the
    process stays up retrying (it needs no broker, so no fixture)."""
    port, log = free_port(), tmp_path / "exporter.log"
    dead = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "pipeline.cli.lag", "--serve", "--metrics-port", str(port), "--interval", "0.3"]
    env = {**os.environ, "PIPELINE_KAFKA__BOOTSTRAP": dead}
    with exporter(cmd, env, log) as proc:
        samples = wait_for(port, proc, log, lambda m: all(
            value(m, "pipeline_lag_export_ok", stage=s) == 0.0 for s in PIPELINE_STAGES), "no failure reported")
        assert not [k for k in samples if k[0] == "pipeline_lag_export_timestamp_seconds"]
        time.sleep(2)  # a few retries later, still up and still saying so
        assert value(scrape(port), "pipeline_lag_export_ok", stage="sign") == 0.0
    assert "lag exporter" in log.read_text(errors="replace")


def test_lag_exporter_options_are_checked() -> None:
    for argv, option in ([["--serve", "--metrics-port", "0"], "--metrics-port"],
                         [["--serve", "--watch", "--metrics-port", "1"], "--serve"],
                         [["--serve", "--interval", "0", "--metrics-port", "1"], "--interval"]):
        bad = subprocess.run([sys.executable, "-m", "pipeline.cli.lag", *argv], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "PIPELINE_KAFKA__BOOTSTRAP": "127.0.0.1:1"})
        assert bad.returncode == 2 and option in bad.stderr, (argv, bad.stderr)
