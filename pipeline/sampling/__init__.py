"""Sampling policies: which ended turns go to the panel, and why.

`reference_sampler` builds the decision order: error_flag -> pair -> novelty -> sample (the
reference forwarder's, with pairs across hosts added), and `baseline` (not forwarded) when none
of them forwards. `force` is not implemented here.
"""

from __future__ import annotations

from pipeline.sampling.base import POLICY_VERSION, REASONS, Decision, Policy, Reason, Sampler
from pipeline.sampling.error import ErrorFlag, find_errors
from pipeline.sampling.novelty import (
    DEFAULT_NUM_PERM,
    DEFAULT_SEED,
    DEFAULT_THRESHOLD,
    DEFAULT_WINDOW,
    MinHasher,
    NoveltyPolicy,
    NoveltyWindow,
    NoveltyWindows,
    default_lsh_params,
    session_tokens,
    shipped_record,
)
from pipeline.sampling.pairing import PairPolicy
from pipeline.sampling.random_sample import (
    DEFAULT_RATE,
    MAX_RATE,
    RandomBaseline,
    RateSetting,
    effective_rate,
    uniform,
)


def reference_sampler(windows: NoveltyWindows, *, rate: object = DEFAULT_RATE,
                      rate_override: bool = False, max_messages: int = 25,
                      token_messages: int = 8) -> Sampler:
    """The reference decision order over `windows`. `rate` is validated as the reference does
    and the result is `sampler.rate`; `effective_rate(rate, rate_override)` (the same rule)
    tells the caller whether it was capped or defaulted, to warn at start."""
    sample = RandomBaseline(rate, rate_override)
    return Sampler([ErrorFlag(max_messages), PairPolicy(), NoveltyPolicy(windows, token_messages), sample],
                   rate=sample.rate)


__all__ = [
    "DEFAULT_NUM_PERM",
    "DEFAULT_RATE",
    "DEFAULT_SEED",
    "DEFAULT_THRESHOLD",
    "DEFAULT_WINDOW",
    "MAX_RATE",
    "POLICY_VERSION",
    "REASONS",
    "Decision",
    "ErrorFlag",
    "MinHasher",
    "NoveltyPolicy",
    "NoveltyWindow",
    "NoveltyWindows",
    "Policy",
    "RandomBaseline",
    "RateSetting",
    "Reason",
    "Sampler",
    "default_lsh_params",
    "effective_rate",
    "find_errors",
    "reference_sampler",
    "session_tokens",
    "shipped_record",
    "uniform",
]
