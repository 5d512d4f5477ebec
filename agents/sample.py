"""Sample stage: sessions.idle -> traces.sampled (+ sampler.shipped).

Every replica follows all of sampler.shipped, so every replica holds the same novelty window;
a forwarded session's signature is applied locally at once and published for the others.
A session enters the window when it is forwarded, not when the panel accepts it (README).
Repeated snapshot ids (a second idle for the same state) are decided once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import faust

from agents.runtime import bind, follow, make_app, staged_table
from agents.stage import Meta, Out, StagedTable
from pipeline import metrics
from pipeline.clock import Clock, SystemClock
from pipeline.config import Config
from pipeline.errors import RecordError
from pipeline.kafka.follower import TopicFollower
from pipeline.model.records import decode
from pipeline.sampling.configured import ConfiguredSampler

STAGE = "sample"
SHIPPED = "sampler.shipped"
DECIDED_PER_SESSION = 32
log = logging.getLogger(__name__)


class SampleStage:
    """Decides each snapshot once (error, novelty, random) and turns a forwarded one into a
    trace plus the signature every replica adds to its novelty window.

    `decided` holds, per session, the snapshot ids already decided, written once the decision's
    outputs are on the broker; `ready` is set once sampler.shipped has been replayed (`apply_shipped`),
    so the first decision sees every replica's window."""

    def __init__(self, config: Config, clock: Clock, decided: StagedTable, ready: asyncio.Event | None = None) -> None:
        self.config, self.clock, self.decided = config, clock, decided
        self.policy = ConfiguredSampler(config)
        self.windows = self.policy.windows
        self.ready = ready if ready is not None else asyncio.Event()

    async def apply_shipped(self, raw: bytes) -> None:
        """One sampler.shipped record (any replica's) into the novelty window."""
        try:
            self.policy.learn(decode(raw, SHIPPED))
        except (RecordError, ValueError) as exc:
            log.warning("skipping unusable %s record: %s", SHIPPED, exc)

    async def handle(self, snapshot: dict[str, Any], meta: Meta) -> list[Out]:
        await self.ready.wait()
        key = meta.key or f"{snapshot['host']}:{snapshot['session_id']}".encode()
        seen = list(await self.decided.get(key) or [])
        if snapshot["snapshot_id"] in seen:
            metrics.DECISIONS.labels("repeat", "false").inc()
            return []
        self.decided.stage(key, [*seen, snapshot["snapshot_id"]][-DECIDED_PER_SESSION:])
        decision, forwarded = self.policy.decide(snapshot, self.clock.now_ms())
        metrics.DECISIONS.labels(decision.reason, str(decision.forward).lower()).inc()
        if self.policy.budget.limited:
            site = snapshot["site_key"]
            metrics.SAMPLER_BUDGET_USED.labels(site).set(self.policy.budget.used(site, self.clock.now_ms()))
        if forwarded is None:
            return []
        return [Out("traces.sampled", key, forwarded.trace),
                Out(SHIPPED, f"{snapshot['site_key']}:{snapshot['snapshot_id']}", forwarded.shipped)]


def build(config: Config, **app_overrides: Any) -> faust.App:
    app = make_app(STAGE, config, **app_overrides)
    decided = staged_table(app, config, STAGE)
    core = SampleStage(config, SystemClock(), decided)
    follow(app, TopicFollower(config, SHIPPED, core.apply_shipped, ready=core.ready))
    bind(app, STAGE, config, core.handle, state=decided)
    return app
