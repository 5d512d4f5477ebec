"""The sampler a configuration describes: its novelty windows, the decision order, the pair
window, the rater budget, and what a forwarded turn adds to the window and the budget. Built in
one place for the sample stage and for `pipeline replay`, so a replay decides exactly as the
stage would under the same configuration."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.errors import BrokerError, RecordError
from pipeline.model.records import decode
from pipeline.model.trace import sampled_trace, trace_id
from pipeline.sampling import NoveltyWindows, reference_sampler
from pipeline.sampling.base import Decision, Sampler
from pipeline.sampling.budget import RaterBudget
from pipeline.sampling.novelty import NoveltyPolicy
from pipeline.sampling.pairing import HOUR_MS, PARTNER, PairWindow, Turn, pair_facts, pair_id

log = logging.getLogger(__name__)
SNAPSHOTS = "sessions.idle"
# Reads one sessions.idle record back by (partition, offset): its bytes, None when it is gone.
FetchSnapshot = Callable[[int, int], Awaitable[bytes | None]]


@dataclass(frozen=True)
class Forwarded:
    """A forwarded turn: its trace (topic traces.sampled) and its sampler.shipped record (None
    for a turn forwarded before and sent again with its pair: it is in the window already)."""

    decision: Decision
    trace: dict[str, Any]
    shipped: dict[str, Any] | None


@dataclass(frozen=True)
class TurnDecision:
    """A turn's decision, every trace it sends (its own, and its partner's when a pair forms),
    and its prompt's pair window after it."""

    decision: Decision
    forwards: list[Forwarded] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)


class ConfiguredSampler:
    def __init__(self, config: Config) -> None:
        self.max_messages = config.max_messages
        self.windows = NoveltyWindows(size=config.lru_size, num_perm=config.sampler.num_perm,
                                      threshold=config.novelty_threshold)
        self.sampler: Sampler = reference_sampler(self.windows, rate=config.sampling_rate,
                                                  rate_override=config.sampling_rate_override,
                                                  max_messages=config.max_messages,
                                                  token_messages=config.sampler.novelty_window_tokens_messages)
        self.novelty = next(p for p in self.sampler.policies if isinstance(p, NoveltyPolicy))
        self.budget = RaterBudget(config.budget_per_hour)
        # a partner is read back from sessions.idle, which keeps turns no longer than this
        hours = min(config.sampler.pair_window_hours, config.kafka.unscrubbed_retention_hours)
        self.pairs = PairWindow(int(hours * HOUR_MS), config.sampler.pair_max_turns) if hours > 0 else None

    def learn(self, shipped: Mapping[str, Any], signature: np.ndarray | None = None) -> None:
        """One sampler.shipped record (a forward, any replica's) into the window and the budget
        (`signature`: the array a forward of this replica wrote the record's values from)."""
        self.windows.apply_shipped(shipped, signature)
        self.budget.record(shipped)

    def _ship(self, snapshot: Mapping[str, Any], trace_id: str, now_ms: int) -> dict[str, Any]:
        """The sampler.shipped record of a forward, learnt at once (its next decision sees it)."""
        shipped, signature = self.novelty.shipped(snapshot, trace_id, now_ms)
        self.learn(shipped, signature)
        return shipped

    def decide(self, snapshot: Mapping[str, Any], now_ms: int,
               partner: Turn | None = None) -> tuple[Decision, Forwarded | None]:
        """The decision on `snapshot` (`partner`: the turn the pair window pairs it with); when
        it forwards, the trace and the shipped record, the latter already in this sampler's
        window (its next decision sees it at once). A forward that pairs has the pair in its
        decision (`pair`, and `pair` among its `facts`); one the budget refuses does not pair."""
        decision = self.sampler.decide(snapshot if partner is None else {**snapshot, PARTNER: partner})
        if not decision.forward:
            return decision, None
        site = snapshot["site_key"]
        if not self.budget.allows(site, decision.reason, now_ms):
            used = self.budget.used(site, now_ms)
            return replace(decision, forward=False, reason="budget_exhausted", detail=(
                f"would be {decision.reason}: {used} of {self.budget.per_hour} forwarded in the last hour; "
                f"{decision.detail}")), None
        if partner is not None:
            tid = trace_id_of(snapshot)
            decision = replace(decision, facts=(decision.reason, "pair"),
                               pair=pair_facts(_turn(snapshot, tid), partner, snapshot["prompt_ref"],
                                               pair_id(tid, partner.trace_id)))
        trace = sampled_trace(snapshot, decision, self.max_messages, now_ms)
        shipped = self._ship(snapshot, trace["trace_id"], now_ms)
        return decision, Forwarded(decision, trace, shipped)

    async def decide_turn(self, snapshot: Mapping[str, Any], partition: int, offset: int, turns: Sequence[Turn],
                          fetch: FetchSnapshot, now_ms: int) -> TurnDecision:
        """Decide one turn against its prompt's pair window (`turns`), where the turn sits in
        sessions.idle (`partition`, `offset`). When it pairs, its partner's snapshot is read back
        (`fetch`) and the partner is forwarded too: for the pair if it was not forwarded, or sent
        again with the pair among its facts (the panel upserts it by trace id) if it was. A
        partner that cannot be read back (past retention) is forgotten and the turn decided alone."""
        turn = self.turn_of(snapshot, partition, offset)
        if turn is None or self.pairs is None:
            decision, forwarded = self.decide(snapshot, now_ms)
            return TurnDecision(decision, [forwarded] if forwarded else [], list(turns))
        live = self.pairs.live(turns, turn.ended_at)
        partner = self.pairs.partner(live, turn)
        partner_snapshot = await self._read_partner(partner, fetch) if partner is not None else None
        if partner is not None and partner_snapshot is None:
            live = [t for t in live if t.trace_id != partner.trace_id]
            partner = None
        decision, forwarded = self.decide(snapshot, now_ms, partner)
        paired = partner if forwarded is not None and decision.pair is not None else None
        turn = replace(turn, forwarded=decision.reason if forwarded else None,
                       decision=decision.to_dict() if forwarded else None)
        forwards = [forwarded] if forwarded else []
        if paired is not None and partner_snapshot is not None:
            forwards.append(self._forward_partner(partner_snapshot, paired, turn, now_ms))
        return TurnDecision(decision, forwards, self.pairs.admit(live, turn, paired))

    def turn_of(self, snapshot: Mapping[str, Any], partition: int, offset: int) -> Turn | None:
        """The pair window's view of a snapshot; None for one that cannot pair (no prompt_ref, no
        agent, a snapshot from before prompt_refs)."""
        if not snapshot.get("prompt_ref") or not snapshot.get("agent_id"):
            return None
        return _turn(snapshot, trace_id_of(snapshot), partition, offset)

    async def _read_partner(self, partner: Turn, fetch: FetchSnapshot) -> dict[str, Any] | None:
        try:
            raw = await fetch(partner.partition, partner.offset)
            found = decode(raw, SNAPSHOTS) if raw is not None else None
        except (RecordError, BrokerError, OSError, TimeoutError) as exc:
            log.warning("cannot read back the snapshot of %s (%s[%d]@%d): %s; it pairs no more",
                        partner.trace_id, SNAPSHOTS, partner.partition, partner.offset, exc)
            return None
        if found is None or found.get("snapshot_id") != partner.snapshot_id:
            log.warning("the snapshot of %s is no longer at %s[%d]@%d (past retention?); it pairs no more",
                        partner.trace_id, SNAPSHOTS, partner.partition, partner.offset)
            return None
        return found

    def _forward_partner(self, snapshot: Mapping[str, Any], partner: Turn, turn: Turn, now_ms: int) -> Forwarded:
        """The partner's trace with the pair in its decision: forwarded for the pair now (it was
        not before; spending its budget, past the share if need be: the pair is one judgement),
        or sent again with the facts it was forwarded for plus the pair."""
        facts = pair_facts(partner, turn, snapshot["prompt_ref"], pair_id(turn.trace_id, partner.trace_id))
        before = partner.decision
        if partner.forwarded is None or before is None:
            decision = Decision(forward=True, reason="pair", rate=self.sampler.rate, facts=("pair",), pair=facts,
                                detail=f"same prompt as {turn.trace_id} answered by {turn.agent_id} on {turn.host}")
            trace = sampled_trace(snapshot, decision, self.max_messages, now_ms)
            shipped = self._ship(snapshot, trace["trace_id"], now_ms)
            return Forwarded(decision, trace, shipped)
        decision = Decision(forward=True, reason=before["reason"], novelty=before.get("novelty"),
                            rate=before.get("rate", 0.0), detail=str(before.get("detail", "")),
                            facts=(*before.get("facts", (before["reason"],)), "pair"), pair=facts)
        return Forwarded(decision, sampled_trace(snapshot, decision, self.max_messages, now_ms), None)


def trace_id_of(snapshot: Mapping[str, Any]) -> str:
    """The trace id a snapshot's trace has (pipeline/model/trace.py: stable per turn)."""
    messages = snapshot["messages"]
    return trace_id(snapshot["host"], snapshot["session_id"], messages[-1]["info"]["id"] if messages else "")


def _turn(snapshot: Mapping[str, Any], tid: str, partition: int = 0, offset: int = 0) -> Turn:
    return Turn(trace_id=tid, agent_id=snapshot.get("agent_id") or "", host=snapshot["host"],
                session_id=snapshot["session_id"], snapshot_id=snapshot["snapshot_id"], partition=partition,
                offset=offset, ended_at=snapshot["turn_ended_at"])
