"""Sample stage: sessions.idle -> traces.sampled (+ sampler.shipped).

Every replica follows all of sampler.shipped, so every replica holds the same novelty window;
a forwarded session's signature is applied locally at once and published for the others.
A session enters the window when it is forwarded, not when the panel accepts it (README).

sessions.idle is keyed by prompt_ref, so the state table is too: per prompt, the snapshot ids
already decided (a second idle for the same state is decided once) and the prompt's pair window
(pipeline/sampling/pairing.py). A prompt quiet for longer than the pair window is swept from it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import faust

from agents.runtime import app_access, bind, follow, make_app, staged_table
from agents.stage import Meta, Out, StagedTable
from pipeline import metrics
from pipeline.clock import Clock, SystemClock
from pipeline.config import Config
from pipeline.errors import RecordError
from pipeline.kafka.follower import TopicFollower
from pipeline.kafka.history import RecordReader
from pipeline.model.records import decode
from pipeline.sampling.configured import SNAPSHOTS, ConfiguredSampler, FetchSnapshot
from pipeline.sampling.pairing import HOUR_MS, Turn

STAGE = "sample"
SHIPPED = "sampler.shipped"
DECIDED_PER_KEY = 32
SWEEP_EVERY_MS = 600_000
log = logging.getLogger(__name__)


class SampleStage:
    """Decides each snapshot once (error, pair, novelty, random) and turns a forwarded one into a
    trace plus the signature every replica adds to its novelty window; a pair forwards the
    partner too.

    `state` holds, per key, `{"decided": [snapshot ids], "turns": [pair window], "at": ms}`,
    written once the decision's outputs are on the broker; `ready` is set once sampler.shipped
    has been replayed (`apply_shipped`), so the first decision sees every replica's window.
    `fetch` reads a partner's snapshot back from sessions.idle."""

    def __init__(self, config: Config, clock: Clock, state: StagedTable, fetch: FetchSnapshot,
                 ready: asyncio.Event | None = None) -> None:
        self.config, self.clock, self.state, self.fetch = config, clock, state, fetch
        self.policy = ConfiguredSampler(config)
        self.windows = self.policy.windows
        self.ready = ready if ready is not None else asyncio.Event()
        self._swept_at = clock.now_ms()

    async def apply_shipped(self, raw: bytes) -> None:
        """One sampler.shipped record (any replica's) into the novelty window."""
        try:
            self.policy.learn(decode(raw, SHIPPED))
        except (RecordError, ValueError) as exc:
            log.warning("skipping unusable %s record: %s", SHIPPED, exc)

    async def handle(self, snapshot: dict[str, Any], meta: Meta) -> list[Out]:
        await self.ready.wait()
        now = self.clock.now_ms()
        self._sweep(now)
        key = meta.key or f"{snapshot['host']}:{snapshot['session_id']}".encode()
        decided, turns = _read_state(await self.state.get(key))
        if snapshot["snapshot_id"] in decided:
            metrics.DECISIONS.labels("repeat", "false").inc()
            return []
        result = await self.policy.decide_turn(snapshot, meta.partition, meta.offset, turns, self.fetch, now)
        decision = result.decision
        self.state.stage(key, {"decided": [*decided, snapshot["snapshot_id"]][-DECIDED_PER_KEY:],
                               "turns": [t.to_dict() for t in result.turns], "at": now})
        metrics.DECISIONS.labels(decision.reason, str(decision.forward).lower()).inc()
        if self.policy.budget.limited:
            site = snapshot["site_key"]
            metrics.SAMPLER_BUDGET_USED.labels(site).set(self.policy.budget.used(site, now))
        outs: list[Out] = []
        for forwarded in result.forwards:
            trace = forwarded.trace
            outs.append(Out("traces.sampled", f"{trace['host']}:{trace['session_id']}", trace))
            if forwarded.shipped is not None:
                outs.append(Out(SHIPPED, f"{trace['site_key']}:{trace['snapshot_id']}", forwarded.shipped))
        if len(result.forwards) > 1:
            metrics.DECISIONS.labels("pair_partner", "true").inc()
        return outs

    def _sweep(self, now: int) -> None:
        """Forget prompts no turn of which can pair any more, and their decided ids (a repeated
        idle comes within minutes, not a pair window later): the table stays as large as the
        prompts of one window."""
        if now - self._swept_at < SWEEP_EVERY_MS:
            return
        self._swept_at = now
        horizon = self.policy.pairs.window_ms if self.policy.pairs is not None else 24 * HOUR_MS
        stale = [key for key, value in self.state.items()
                 if isinstance(value, Mapping) and isinstance(value.get("at"), int) and value["at"] < now - horizon]
        for key in stale:
            self.state.delete(key)
        if stale:
            log.info("swept %d prompt(s) quiet for longer than the pair window", len(stale))


def _read_state(value: Any) -> tuple[list[str], list[Turn]]:
    """(decided snapshot ids, pair window) of a table value (a bare list: written before pairs)."""
    if isinstance(value, list):
        return list(value), []
    if not isinstance(value, Mapping):
        return [], []
    return list(value.get("decided") or []), [Turn.from_dict(t) for t in value.get("turns") or []]


def build(config: Config, **app_overrides: Any) -> faust.App:
    app = make_app(STAGE, config, **app_overrides)
    state = staged_table(app, config, STAGE)
    reader = RecordReader(app_access(app), SNAPSHOTS)
    core = SampleStage(config, SystemClock(), state, reader.read)
    follow(app, TopicFollower(config, SHIPPED, core.apply_shipped, ready=core.ready))
    bind(app, STAGE, config, core.handle, state=state)

    @app.on_before_shutdown.connect  # type: ignore[misc]
    async def close_reader(app: faust.App, **_: Any) -> None:
        await reader.close()

    return app
