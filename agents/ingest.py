"""Ingest stage: opencode.events -> sessions.idle. Per-session state (title, project, errors
seen this turn, event ids seen, snapshot ids emitted) lives in a changelog-backed table keyed
like the events, so a restarted or rebalanced replica picks up where the last one was."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import faust

from agents.base import Meta, Out, bind, changelog_known, make_app
from pipeline.config import Config
from pipeline.snapshot import Emit, SessionState, apply_event
from pipeline.topics import TOPICS, partitions_of

STAGE = "ingest"


def build(config: Config, **app_overrides: object) -> faust.App:
    app = make_app(STAGE, config, **app_overrides)
    table = app.Table("session-state", default=None, key_type=bytes,
                      schema=faust.Schema(key_serializer="raw", value_serializer="json"),
                      # written after the batch is on the broker, outside stream iteration: the
                      # key picks the changelog partition (same partitioner as the producers)
                      use_partitioner=True,
                      partitions=partitions_of(TOPICS["opencode.events"], config.kafka.partitions))
    # State of records handled but whose snapshots are not yet on the broker: written to the
    # table only after the batch's outputs are acknowledged (see bind's after_drain).
    pending: dict[bytes, dict[str, Any]] = {}
    table_writable = asyncio.Event()  # see changelog_known

    @app.task
    async def learn_changelog() -> None:
        await changelog_known(app, table)
        table_writable.set()

    async def handle(record: dict[str, Any], meta: Meta) -> list[Out]:
        await table_writable.wait()
        key = meta.key or f"{record['host']}:{record['session_id']}".encode()
        state = pending.get(key) if key in pending else table.get(key)
        new_state, actions = apply_event(state, record, max_messages=config.max_messages,
                                         now_ms=int(time.time() * 1000))
        pending[key] = new_state.to_dict()
        return [Out("sessions.idle", key, a.snapshot) for a in actions if isinstance(a, Emit)]

    def commit_state() -> None:
        for key, state in pending.items():
            table[key] = state
        pending.clear()

    bind(app, STAGE, config, handle, after_drain=commit_state)
    return app


__all__ = ["SessionState", "build"]
