"""sample: forward a uniform random share of the turns nothing else picked.

The draw is derived from sha256(site_key + snapshot_id) instead of a random generator, so a
replayed or redelivered snapshot decides the same way on every replica, and a test can
name a snapshot that falls below or above the rate.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.sampling.base import Decision

DEFAULT_RATE = 0.05
MAX_RATE = 0.25


@dataclass(frozen=True, slots=True)
class RateSetting:
    """The rate in force and why it differs from the one asked for, so the caller can warn."""

    rate: float
    requested: object
    capped: bool  # above MAX_RATE without override (or above 1 with it)
    defaulted: bool  # not a number, NaN or negative: the reference falls back to DEFAULT_RATE


def effective_rate(rate: object, override: bool = False) -> RateSetting:
    """The reference forwarder's rule: not a number or negative -> 0.05; above 0.25 -> 0.25
    unless overridden. Strings count as "not a number", as `typeof` does in the reference."""
    if isinstance(rate, bool) or not isinstance(rate, int | float) or math.isnan(rate) or rate < 0:
        return RateSetting(DEFAULT_RATE, rate, capped=False, defaulted=True)
    value = float(rate)
    if value > MAX_RATE and not override:
        return RateSetting(MAX_RATE, rate, capped=True, defaulted=False)
    if value > 1.0:
        # A probability above 1 forwards everything anyway; the schema's `rate` stops at 1.
        return RateSetting(1.0, rate, capped=True, defaulted=False)
    return RateSetting(value, rate, capped=False, defaulted=False)


def uniform(site_key: str, snapshot_id: str) -> float:
    """A number in [0, 1), uniform over snapshots and fixed for each one."""
    digest = hashlib.sha256((site_key + snapshot_id).encode("utf-8", "surrogatepass")).digest()
    # 53 bits: every value is exactly representable, so the result is < 1.0 for certain.
    return (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53)


class RandomBaseline:
    name = "sample"

    def __init__(self, rate: object = DEFAULT_RATE, override: bool = False) -> None:
        self.setting = effective_rate(rate, override)
        self.rate = self.setting.rate

    def evaluate(self, snapshot: Mapping[str, Any]) -> Decision:
        draw = uniform(snapshot["site_key"], snapshot["snapshot_id"])
        forward = draw < self.rate
        relation = "<" if forward else ">="
        return Decision(forward=forward, reason="sample",
                        detail=f"draw {draw:.4f} {relation} rate {self.rate:g}")
