"""The sampling contract: a policy looks at one snapshot and may return a Decision.

A policy returns None when it has nothing to say, a Decision with `forward=True` when it
forwards the turn, or a Decision with `forward=False` when it declines but measured something
worth keeping (the novelty score, the random draw): the Sampler carries that evidence into
the final decision, so a `baseline` record still says how novel the turn was.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, get_args

log = logging.getLogger(__name__)

# Bump when a change would make the same snapshot decide differently (policy order, token
# rules, MinHash seed or scheme, LSH banding), so decisions can be told apart downstream.
# sampling/2: `pair` between error_flag and novelty.
POLICY_VERSION = "sampling/2"

# budget_exhausted: a forward the rater budget refused (pipeline/sampling/budget.py); like
# baseline, never on traces.sampled
Reason = Literal["error_flag", "pair", "novelty", "sample", "force", "baseline", "budget_exhausted"]
REASONS: tuple[str, ...] = get_args(Reason)
# The reasons that forward, in the order the Sampler asks (force is set from outside).
FORWARDING: tuple[str, ...] = ("force", "error_flag", "pair", "novelty", "sample")
DETAIL_MAX_CHARS = 500


@dataclass(frozen=True, slots=True)
class Decision:
    forward: bool
    reason: Reason
    novelty: float | None = None
    # Filled in by the Sampler: policies other than the random one do not know the rate.
    rate: float = 0.0
    policy_version: str = POLICY_VERSION
    detail: str = ""
    # Every forwarding reason that applies, the deciding one included (a paired error: error_flag
    # and pair); and the turn it was paired with (pipeline/sampling/pairing.py), if any.
    facts: tuple[str, ...] = ()
    pair: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown decision reason {self.reason!r}, "
                             f"supported: {', '.join(REASONS)}")
        if self.novelty is not None and not 0.0 <= self.novelty <= 1.0:
            raise ValueError(f"novelty must be within [0, 1], got {self.novelty!r}")
        if not (isinstance(self.rate, int | float) and 0.0 <= self.rate <= 1.0):
            raise ValueError(f"rate must be within [0, 1], got {self.rate!r}")

    def to_dict(self) -> dict[str, Any]:
        """The `decision` object of trace-sampled.v2.json."""
        facts = self.facts or ((self.reason,) if self.forward else ())
        return {
            "forward": self.forward,
            "reason": self.reason,
            "novelty": self.novelty,
            "rate": float(self.rate),
            "policy_version": self.policy_version,
            "detail": self.detail[:DETAIL_MAX_CHARS],
            "facts": [r for r in FORWARDING if r in facts],
            "pair": dict(self.pair) if self.pair is not None else None,
        }


class Policy(Protocol):
    name: str

    def evaluate(self, snapshot: Mapping[str, Any]) -> Decision | None: ...


class Sampler:
    """Runs policies in order; the first that forwards decides, else the turn is `baseline`.

    A policy that raises is logged, counted in `policy_errors` and skipped: one broken policy
    must not stop the others from deciding (nor lose the record, which the stage would
    otherwise have to dead-letter).
    """

    def __init__(self, policies: Sequence[Policy], *, rate: float) -> None:
        names = [p.name for p in policies]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate sampling policy names: {', '.join(duplicates)}")
        if not (isinstance(rate, int | float) and math.isfinite(rate) and 0.0 <= rate <= 1.0):
            raise ValueError(f"rate must be a number within [0, 1], got {rate!r}")
        self.policies: tuple[Policy, ...] = tuple(policies)
        self.rate = float(rate)
        self.policy_errors: Counter[str] = Counter()

    def decide(self, snapshot: Mapping[str, Any]) -> Decision:
        novelty: float | None = None
        notes: list[str] = []
        for policy in self.policies:
            try:
                decision = policy.evaluate(snapshot)
            except Exception as exc:
                self.policy_errors[policy.name] += 1
                log.exception("sampling policy %s failed on snapshot %s; skipped",
                              policy.name, snapshot.get("snapshot_id"))
                notes.append(f"{policy.name} failed: {type(exc).__name__}")
                continue
            if decision is None:
                continue
            if novelty is None:
                novelty = decision.novelty
            if decision.forward:
                measured = decision.novelty if decision.novelty is not None else novelty
                return replace(decision, rate=self.rate, novelty=measured)
            if decision.detail:
                notes.append(decision.detail)
        return Decision(forward=False, reason="baseline", novelty=novelty, rate=self.rate,
                        detail="; ".join(notes) or "no policy forwarded")
