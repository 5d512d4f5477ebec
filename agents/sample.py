"""Sample stage: sessions.idle -> traces.sampled (+ sampler.shipped).

Every replica follows all of sampler.shipped, so every replica holds the same novelty window;
a forwarded session's signature is applied locally at once and published for the others.
A session enters the window when it is forwarded, not when the panel accepts it (README).
Repeated snapshot ids (a second idle for the same state) are decided once.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faust

from agents.base import Meta, Out, TopicFollower, bind, make_app, state_table
from pipeline import metrics
from pipeline.config import Config
from pipeline.errors import RecordError
from pipeline.model.records import decode
from pipeline.model.trace import sampled_trace
from pipeline.sampling import NoveltyWindows, reference_sampler
from pipeline.sampling.novelty import NoveltyPolicy

STAGE = "sample"
SHIPPED = "sampler.shipped"
DECIDED_PER_SESSION = 32
log = logging.getLogger(__name__)


def build(config: Config, **app_overrides: object) -> faust.App:
    app = make_app(STAGE, config, **app_overrides)
    windows = NoveltyWindows(size=config.lru_size, num_perm=config.sampler.num_perm,
                             threshold=config.novelty_threshold)
    sampler = reference_sampler(windows, rate=config.sampling_rate, rate_override=config.sampling_rate_override,
                                max_messages=config.max_messages,
                                token_messages=config.sampler.novelty_window_tokens_messages)
    novelty = next(p for p in sampler.policies if isinstance(p, NoveltyPolicy))
    decided, table_writable = state_table(app, config, STAGE)
    pending: dict[bytes, list[str]] = {}

    async def apply_shipped(raw: bytes) -> None:
        try:
            windows.apply_shipped(decode(raw, SHIPPED))
        except (RecordError, ValueError) as exc:
            log.warning("skipping unusable %s record: %s", SHIPPED, exc)

    follower = TopicFollower(config, SHIPPED, apply_shipped)

    @app.task
    async def follow() -> None:
        await follower.run()

    async def handle(snapshot: dict[str, Any], meta: Meta) -> list[Out]:
        await follower.ready.wait()
        await table_writable.wait()
        key = meta.key or f"{snapshot['host']}:{snapshot['session_id']}".encode()
        seen = pending[key] if key in pending else list(decided.get(key) or [])
        if snapshot["snapshot_id"] in seen:
            metrics.DECISIONS.labels("repeat", "false").inc()
            return []
        pending[key] = [*seen, snapshot["snapshot_id"]][-DECIDED_PER_SESSION:]
        decision = sampler.decide(snapshot)
        metrics.DECISIONS.labels(decision.reason, str(decision.forward).lower()).inc()
        if not decision.forward:
            return []
        now = int(time.time() * 1000)
        trace = sampled_trace(snapshot, decision, config.max_messages, now)
        shipped = novelty.shipped_record(snapshot, trace["trace_id"], now)
        windows.apply_shipped(shipped)  # this replica's next decision sees it at once
        return [Out("traces.sampled", key, trace),
                Out(SHIPPED, f"{snapshot['site_key']}:{snapshot['snapshot_id']}", shipped)]

    def commit_decided() -> None:
        for key, ids in pending.items():
            decided[key] = ids
        pending.clear()

    bind(app, STAGE, config, handle, after_drain=commit_decided)
    return app
