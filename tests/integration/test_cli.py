"""The `pipeline` command against a real broker, as an operator or a health check runs it:
`lag`'s exit codes (0 healthy, 3 no running member, 4 over --max-lag / --max-drain-s), its
progress on a terminal and silence on a pipe, and the common options after the subcommand."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.kafka import admin
from tests.integration.test_lag import create_topic, produce_to

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def program(name: str, topic: str) -> str:
    """`pipeline` with one more stage in the topic table, on a topic of this test's own: the
    shared broker's stage groups are other tests' business."""
    return ("import sys; from pipeline.topics import STAGES, Stage; "
            f"STAGES[{name!r}] = Stage({name!r}, {topic!r}, (), 'x', 'test'); "
            "from pipeline.cli.main import main; sys.exit(main())")


def env_for(bootstrap: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_") and k not in ("FORCE_COLOR",
                                                                                            "TTY_COMPATIBLE")}
    return {**env, "PIPELINE_KAFKA__BOOTSTRAP": bootstrap, **extra}


async def run(argv: list[str], env: dict[str, str], code: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", code, *argv] if code else [sys.executable, "-m", "pipeline.cli", *argv]
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, cwd=REPO, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(cmd, proc.returncode, out.decode(), err.decode())


async def member(bootstrap: str, group: str, topic: str) -> AIOKafkaConsumer:
    """A running member of `group`, assigned `topic`, committed at offset 0 on every partition."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                auto_offset_reset="earliest", session_timeout_ms=10000,
                                heartbeat_interval_ms=500)
    await consumer.start()
    deadline = time.monotonic() + 60
    while not consumer.assignment():
        assert time.monotonic() < deadline, "no assignment"
        await consumer.getmany(timeout_ms=200)
    await consumer.commit({tp: 0 for tp in consumer.assignment()})
    return consumer


def test_lag_exit_codes_for_a_health_check(kafka) -> None:
    uid = uuid.uuid4().hex[:8]
    name, topic = f"cli{uid}", f"clitest.{uid}.in"
    code = program(name, topic)
    env = env_for(kafka.bootstrap)
    group = f"panel-pipeline-{name}"
    base = ["lag", "--stage", name, "--json"]

    async def scenario() -> None:
        await create_topic(kafka.bootstrap, topic, 2)
        # no member ever: 3, the stage named on stderr, the same verdict in the JSON
        absent = await run([*base, "--interval", "0"], env, code)
        assert absent.returncode == 3, absent.stderr
        assert absent.stderr == f"pipeline lag: no running member in stage(s): {name} (nothing consumes their input)\n"
        assert json.loads(absent.stdout)["health"]["no_members"] == [name]

        consumer = await member(kafka.bootstrap, group, topic)
        try:
            # a member, nothing to read: healthy, 0, nothing on stderr
            healthy = await run([*base, "--interval", "0.5", "--max-lag", "0", "--max-drain-s", "1"], env, code)
            assert healthy.returncode == 0, healthy.stderr
            assert healthy.stderr == ""
            doc = json.loads(healthy.stdout)
            assert doc["health"] == {**doc["health"], "exit_code": 0, "checked": [name], "no_members": []}
            assert doc["stages"][0]["members"] == 1

            # 5 records it does not read: over --max-lag 4 (but not 5), and stalled, over any --max-drain-s
            await produce_to(kafka.bootstrap, topic, {0: 3, 1: 2})
            over = await run([*base, "--interval", "0", "--max-lag", "4"], env, code)
            assert over.returncode == 4, over.stderr
            assert over.stderr == f"pipeline lag: lag over --max-lag 4: {name} (5)\n"
            within = await run([*base, "--interval", "0", "--max-lag", "5"], env, code)
            assert within.returncode == 0, within.stderr
            slow = await run([*base, "--interval", "0.5", "--max-drain-s", "3600"], env, code)
            assert slow.returncode == 4, slow.stderr
            assert slow.stderr == f"pipeline lag: time to drain over --max-drain-s 3600: {name} (stalled)\n"
            assert json.loads(slow.stdout)["health"]["over_max_drain"] == [name]
            # it reads them: within limits again
            await consumer.commit({TopicPartition(topic, 0): 3, TopicPartition(topic, 1): 2})
            caught_up = await run([*base, "--interval", "0.5", "--max-lag", "0", "--max-drain-s", "1"], env, code)
            assert caught_up.returncode == 0, caught_up.stderr
        finally:
            await consumer.stop()  # leaves the group at once

        gone = await run(["lag", "--stage", name, "--interval", "0"], env, code)
        assert gone.returncode == 3, gone.stderr
        assert name in gone.stdout  # the table, for people

    asyncio.run(scenario())


def test_lag_shows_its_waits_on_a_terminal_only(kafka, kafka_config) -> None:
    """Two samples --interval apart: on a terminal a status line says what it waits for (and
    how long); on a pipe stderr holds nothing but the verdict."""
    asyncio.run(admin.create_topics(kafka.bootstrap, kafka_config.kafka.partitions, 1))

    async def scenario() -> None:
        argv = ["lag", "--stage", "sign", "--interval", "1.5"]
        shown = await run(argv, env_for(kafka.bootstrap, TTY_COMPATIBLE="1", COLUMNS="200"))
        assert shown.returncode == 3, shown.stderr
        assert "measuring read rates: second sample" in shown.stderr and "s left" in shown.stderr
        assert "reading consumer-group offsets" in shown.stderr
        piped = await run(argv, env_for(kafka.bootstrap))
        assert piped.returncode == 3
        assert piped.stderr.splitlines() == ["pipeline lag: no running member in stage(s): sign (nothing consumes "
                                             "their input)"]

    asyncio.run(scenario())


def test_common_options_after_the_subcommand_against_the_broker(kafka, kafka_config, tmp_path: Path) -> None:
    asyncio.run(admin.create_topics(kafka.bootstrap, kafka_config.kafka.partitions, 1))
    config = tmp_path / "pipeline.toml"
    config.write_text(f'[kafka]\nbootstrap = "{kafka.bootstrap}"\n')
    env = env_for("")
    del env["PIPELINE_KAFKA__BOOTSTRAP"]  # only the file points at the broker

    async def scenario() -> None:
        for argv in (["topics", "list", "--json", "--config", str(config)],
                     ["--config", str(config), "topics", "list", "--json"]):
            listed = await run(argv, env)
            assert listed.returncode == 0, listed.stderr
            assert all(t["exists"] for t in json.loads(listed.stdout))
            assert listed.stderr == ""
        dead = await run(["dead", "list", "--topic", "traces.dead", "--config", str(config), "--json"], env)
        assert dead.returncode == 0, dead.stderr
        assert isinstance(json.loads(dead.stdout), list) and dead.stderr == ""
        # -v lets the libraries' lines through
        loud = await run(["topics", "list", "--config", str(config), "-v"], env)
        assert loud.returncode == 0 and "aiokafka" in loud.stderr
        missing = await run(["dead", "redrive", "--topic", "traces.dead", "--id", "nope", "--config", str(config)],
                            env)
        assert missing.returncode == 1
        assert missing.stderr.splitlines() == ["pipeline: no dead letter with id 'nope' in traces.dead (see "
                                               "`pipeline dead list --topic traces.dead`)"]

    asyncio.run(scenario())
