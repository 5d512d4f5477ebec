"""The wiring proof: a real stage process on the real broker moves records, dead-letters bad
ones, and its consumer group's committed offsets advance."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from devkit.local_stack import PipelineProcess, wait_for
from pipeline.kafka import admin
from pipeline.model.records import encode, original_bytes, validate
from pipeline.topics import STAGES
from tests.kafka_util import committed, end_offsets, produce, read_all, values

pytestmark = pytest.mark.integration
HOST = "passthru"


def event(i: int) -> dict:
    return {"schema": "opencode.event/1", "host": HOST, "site_key": "pk_test_thirdparty",
            "session_id": f"ses_{i % 3}", "event_id": f"evt_{i}", "type": "session.idle",
            "received_at": 1795236913680 + i, "directory": "/w", "project": "global", "backfill": False,
            "source": "sse", "properties": {"sessionID": f"ses_{i % 3}"}}


def test_passthrough_stage_moves_records_and_commits(kafka, kafka_env, kafka_config, tmp_path: Path) -> None:
    bootstrap = kafka.bootstrap
    asyncio.run(admin.create_topics(bootstrap, 4, 1))
    good = [(f"{HOST}:ses_{i % 3}".encode(), encode(event(i))) for i in range(30)]
    bad = [(b"passthru:ses_x", b"{not json"), (b"passthru:ses_y", encode({"schema": "opencode.event/1"}))]
    asyncio.run(produce(bootstrap, "opencode.events", good[:15] + bad + good[15:]))

    with PipelineProcess(["worker", "passthrough"], kafka_env, tmp_path, "passthrough") as worker:
        # the broker is shared: other tests' passthrough records are on the same topics
        out = asyncio.run(read_all(bootstrap, "passthrough.out", expect=30, timeout_s=90,
                                   keep=lambda m: json.loads(m.value)["host"] == HOST))
        dead = asyncio.run(read_all(bootstrap, "passthrough.dead", expect=2, timeout_s=30,
                                    keep=lambda m: m.key in {k for k, _ in bad}))
        group = STAGES["passthrough"].app_id

        # the broker is shared with other tests: the group must reach the end of every partition
        ends = asyncio.run(end_offsets(bootstrap, "opencode.events"))

        def all_committed() -> bool:
            offsets = asyncio.run(committed(bootstrap, group))
            return all(offsets.get(("opencode.events", p), 0) >= end for p, end in ends.items())

        wait_for(all_committed, 60, what="committed offsets to reach the end of opencode.events")
        assert worker.alive(), worker.log()[-3000:]

    got = [r for r in values(out) if r["host"] == HOST]
    assert sorted(r["event_id"] for r in got) == sorted(f"evt_{i}" for i in range(30))
    for record in got:
        validate("event.v1", record)
    # per-session order is kept: one key stays on one partition
    for sid in ("ses_0", "ses_1", "ses_2"):
        ids = [int(r["event_id"][4:]) for r in got if r["session_id"] == sid]
        assert ids == sorted(ids)
    letters = values(dead)
    assert sorted(d["reason"] for d in letters) == ["invalid_json", "schema_invalid"]
    for d in letters:
        validate("dead-letter.v1", d)
        assert d["stage"] == "passthrough" and d["redrive_topic"] == "opencode.events"
    assert sorted(original_bytes(d) for d in letters) == sorted(v for _, v in bad)
    assert json.loads(out[0].value)  # values on the wire are JSON
