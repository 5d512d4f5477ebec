"""Replaying recorded turns under a policy: what it would forward, by site and reason, against
what was forwarded when they happened (`pipeline replay`; reading Kafka is the command's part).

The replay decides as the sample stage does (pipeline/sampling/configured.py), in topic order,
each snapshot once. Its novelty window starts as production's stood when the replayed window
began (the `sampler.shipped` records before it, `seed`) and then learns only what the replay
itself forwards: the question answered is "what would this policy have sent", not "what would
it send on top of what was sent".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Config
from pipeline.sampling.configured import ConfiguredSampler, FetchSnapshot, Forwarded, trace_id_of
from pipeline.sampling.pairing import Turn


@dataclass
class SiteTally:
    turns: int = 0
    now: Counter[str] = field(default_factory=Counter)  # forwarded under the replayed policy, by reason
    before: Counter[str] = field(default_factory=Counter)  # forwarded when they happened, by reason
    both: int = 0  # turns forwarded then and now (whatever the reason)
    only_now: int = 0
    only_before: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"turns": self.turns, "now": dict(sorted(self.now.items())),
                "before": dict(sorted(self.before.items())), "forwarded_now": sum(self.now.values()),
                "forwarded_before": sum(self.before.values()), "both": self.both, "only_now": self.only_now,
                "only_before": self.only_before}


class Replay:
    def __init__(self, config: Config) -> None:
        self.policy = ConfiguredSampler(config)
        # (host, session, snapshot id): a repeated idle is decided once, as the stage does
        self._decided: set[tuple[str, str, str]] = set()
        self._turns: dict[str, tuple[str, str | None]] = {}  # trace id -> (site, reason forwarded now or None)
        self._pairs: dict[str, list[Turn]] = {}  # prompt_ref -> its pair window

    def seed(self, shipped: Mapping[str, Any]) -> None:
        """One sampler.shipped record from before the replayed window, into the novelty window."""
        self.policy.learn(shipped)

    async def decide(self, snapshot: Mapping[str, Any], partition: int, offset: int, fetch: FetchSnapshot,
                     now_ms: int) -> list[Forwarded]:
        """Decide one recorded snapshot (where it is in sessions.idle: a pair partner is read back
        from there); the traces to send (its own, its partner's when a pair forms)."""
        seen = (snapshot["host"], snapshot["session_id"], snapshot["snapshot_id"])
        if seen in self._decided:
            return []
        self._decided.add(seen)
        ref = snapshot.get("prompt_ref")
        result = await self.policy.decide_turn(snapshot, partition, offset, self._pairs.get(ref or "", []), fetch,
                                               now_ms)
        if ref:
            self._pairs[ref] = result.turns
        own = trace_id_of(snapshot)
        self._turns[own] = (snapshot["site_key"], result.decision.reason if result.forwards else None)
        for forwarded in result.forwards:
            tid = forwarded.trace["trace_id"]
            if tid != own and self._turns.get(tid, ("", None))[1] is None:  # a partner forwarded for the pair
                self._turns[tid] = (forwarded.trace["site_key"], forwarded.decision.reason)
        return result.forwards

    @property
    def turns(self) -> int:
        return len(self._turns)

    def report(self, recorded: Iterable[Mapping[str, Any]]) -> dict[str, SiteTally]:
        """Per site: the turns replayed, forwarded now and before (`recorded`: the traces.sampled
        records of the window; those of turns outside the replayed ones are ignored)."""
        before: dict[str, str] = {}
        for trace in recorded:
            tid = trace.get("trace_id")
            if isinstance(tid, str) and tid in self._turns and tid not in before:
                before[tid] = str(trace.get("decision", {}).get("reason", "unknown"))
        sites: dict[str, SiteTally] = {}
        for tid, (site, now) in self._turns.items():
            tally = sites.setdefault(site, SiteTally())
            tally.turns += 1
            then = before.get(tid)
            if now:
                tally.now[now] += 1
            if then:
                tally.before[then] += 1
            tally.both += bool(now and then)
            tally.only_now += bool(now and not then)
            tally.only_before += bool(then and not now)
        return dict(sorted(sites.items()))

