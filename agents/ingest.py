"""Ingest stage: opencode.events -> sessions.idle. Per-session state (title, project, errors
seen this turn, event ids seen, snapshot ids emitted) lives in a changelog-backed table keyed
like the events, so a restarted or rebalanced replica picks up where the last one was."""

from __future__ import annotations

import logging
from typing import Any

import faust

from agents.runtime import bind, make_app, staged_table
from agents.stage import Meta, Out, StagedTable
from pipeline.clock import Clock, SystemClock
from pipeline.config import Config
from pipeline.model.prompt import PROMPT_REF_KEY_VARIABLE
from pipeline.model.snapshot import Emit, apply_event

STAGE = "ingest"
log = logging.getLogger(__name__)


class IngestStage:
    """Folds each event into its session's state (pipeline.model.snapshot) and emits the
    snapshots the event ends. The state is written through `state`, so it reaches the table
    only once the snapshots are on the broker."""

    def __init__(self, config: Config, clock: Clock, state: StagedTable) -> None:
        self.max_messages, self.clock, self.state = config.max_messages, clock, state
        secret = config.prompt_ref_key
        self.prompt_key = secret.reveal().encode("utf-8") if secret is not None else None

    async def handle(self, record: dict[str, Any], meta: Meta) -> list[Out]:
        key = meta.key or f"{record['host']}:{record['session_id']}".encode()
        state = await self.state.get(key)
        new_state, actions = apply_event(state, record, max_messages=self.max_messages, now_ms=self.clock.now_ms(),
                                         prompt_key=self.prompt_key)
        self.state.stage(key, new_state.to_dict())
        return [Out("sessions.idle", snapshot_key(a.snapshot), a.snapshot) for a in actions if isinstance(a, Emit)]


def snapshot_key(snapshot: dict[str, Any]) -> str:
    """sessions.idle is keyed by the turn's prompt_ref, so every turn of one prompt, whichever host
    it ran on, reaches the same sampler partition and its pair window; a turn without a prompt
    (nothing to pair) by its session."""
    return snapshot.get("prompt_ref") or f"{snapshot['host']}:{snapshot['session_id']}"


def build(config: Config, **app_overrides: Any) -> faust.App:
    app = make_app(STAGE, config, **app_overrides)
    if config.prompt_ref_key is None:
        log.warning("%s is not set: prompt_refs are plain SHA-256 hashes of the prompts, which anyone who sees a "
                    "scrubbed trace can test guesses of its scrubbed text against; set it (the same value on every "
                    "ingest replica) in production", PROMPT_REF_KEY_VARIABLE)
    state = staged_table(app, config, STAGE)
    bind(app, STAGE, config, IngestStage(config, SystemClock(), state).handle, state=state)
    return app
