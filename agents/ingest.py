"""Ingest stage: opencode.events -> sessions.idle. Per-session state (title, project, errors
seen this turn, event ids seen, snapshot ids emitted) lives in a changelog-backed table keyed
like the events, so a restarted or rebalanced replica picks up where the last one was."""

from __future__ import annotations

from typing import Any

import faust

from agents.runtime import bind, make_app, staged_table
from agents.stage import Meta, Out, StagedTable
from pipeline.clock import Clock, SystemClock
from pipeline.config import Config
from pipeline.model.snapshot import Emit, apply_event

STAGE = "ingest"


class IngestStage:
    """Folds each event into its session's state (pipeline.model.snapshot) and emits the
    snapshots the event ends. The state is written through `state`, so it reaches the table
    only once the snapshots are on the broker."""

    def __init__(self, config: Config, clock: Clock, state: StagedTable) -> None:
        self.max_messages, self.clock, self.state = config.max_messages, clock, state

    async def handle(self, record: dict[str, Any], meta: Meta) -> list[Out]:
        key = meta.key or f"{record['host']}:{record['session_id']}".encode()
        state = await self.state.get(key)
        new_state, actions = apply_event(state, record, max_messages=self.max_messages, now_ms=self.clock.now_ms())
        self.state.stage(key, new_state.to_dict())
        return [Out("sessions.idle", key, a.snapshot) for a in actions if isinstance(a, Emit)]


def build(config: Config, **app_overrides: Any) -> faust.App:
    app = make_app(STAGE, config, **app_overrides)
    state = staged_table(app, config, STAGE)
    bind(app, STAGE, config, IngestStage(config, SystemClock(), state).handle, state=state)
    return app
