"""Ingest stage: opencode.events -> sessions.idle. Per-session state (title, project, errors
seen this turn, event ids seen, snapshot ids emitted) lives in a changelog-backed table keyed
like the events, so a restarted or rebalanced replica picks up where the last one was."""

from __future__ import annotations

import time
from typing import Any

import faust

from agents.base import Meta, Out, bind, make_app, state_table
from pipeline.config import Config
from pipeline.model.snapshot import Emit, SessionState, apply_event

STAGE = "ingest"


def build(config: Config, **app_overrides: object) -> faust.App:
    app = make_app(STAGE, config, **app_overrides)
    table, table_writable = state_table(app, config, STAGE)
    # State of records handled but whose snapshots are not yet on the broker: written to the
    # table only after the batch's outputs are acknowledged (see bind's after_drain).
    pending: dict[bytes, dict[str, Any]] = {}

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
