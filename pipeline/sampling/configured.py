"""The sampler a configuration describes: its novelty windows, the reference decision order, the
rater budget, and what a forwarded turn adds to the window and the budget. Built in one place
for the sample stage and for `pipeline replay`, so a replay decides exactly as the stage would
under the same configuration."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from pipeline.config import Config
from pipeline.model.trace import sampled_trace
from pipeline.sampling import NoveltyWindows, reference_sampler
from pipeline.sampling.base import Decision, Sampler
from pipeline.sampling.budget import RaterBudget
from pipeline.sampling.novelty import NoveltyPolicy


@dataclass(frozen=True)
class Forwarded:
    """A forwarded turn: its trace (topic traces.sampled) and its sampler.shipped record."""

    decision: Decision
    trace: dict[str, Any]
    shipped: dict[str, Any]


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

    def learn(self, shipped: Mapping[str, Any]) -> None:
        """One sampler.shipped record (a forward, any replica's) into the window and the budget."""
        self.windows.apply_shipped(shipped)
        self.budget.record(shipped)

    def decide(self, snapshot: Mapping[str, Any], now_ms: int) -> tuple[Decision, Forwarded | None]:
        """The decision on `snapshot`; when it forwards, the trace and the shipped record, the
        latter already in this sampler's window (its next decision sees it at once)."""
        decision = self.sampler.decide(snapshot)
        if not decision.forward:
            return decision, None
        site = snapshot["site_key"]
        if not self.budget.allows(site, decision.reason, now_ms):
            used = self.budget.used(site, now_ms)
            return replace(decision, forward=False, reason="budget_exhausted", detail=(
                f"would be {decision.reason}: {used} of {self.budget.per_hour} forwarded in the last hour; "
                f"{decision.detail}")), None
        trace = sampled_trace(snapshot, decision, self.max_messages, now_ms)
        shipped = self.novelty.shipped_record(snapshot, trace["trace_id"], now_ms)
        self.learn(shipped)
        return decision, Forwarded(decision, trace, shipped)
