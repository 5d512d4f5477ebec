"""The rater budget: at most `budgetPerHour` traces forwarded per site in any rolling hour, spent
in order of priority.

Raters are the scarce resource, so when traffic would forward more than they can judge, the
forwards worth least go first. Each reason may use the budget up to its share of it:

    error_flag 100 %   pair 90 %   novelty 75 %   sample 50 %

so as a site's hour fills, random samples stop first (at half the budget), then novel turns,
then pairs, and errors are forwarded until the budget is spent. A forward the budget refuses is
decided `budget_exhausted`, with the reason it would have had in its detail.

The budget is counted from `sampler.shipped`, the topic every sampler replica already follows
whole: one record per forward, with its site and time (`at`). Every replica therefore counts the
same forwards, and a restarted replica counts them again from the topic, so the budget is
shared by all replicas and survives restarts. It is shared the way the novelty window is:
a replica counts its own forwards at once and the others' when their records arrive (a batch
later, plus a broker round trip). Replicas deciding at the same moment can each spend what they
have not yet seen the others spend: in steady traffic that is a forward or so per replica at the
margin; a burst that reaches every replica at once can overshoot by up to what the others
forward in one batch. It never undershoots.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from typing import Any

HOUR_MS = 3_600_000
# The share of the budget each reason may fill (see the module docstring); reasons not listed
# (`force`) are never refused.
SHARES: Mapping[str, float] = {"error_flag": 1.0, "pair": 0.9, "novelty": 0.75, "sample": 0.5}


class RaterBudget:
    def __init__(self, per_hour: int, shares: Mapping[str, float] = SHARES) -> None:
        if per_hour < 0:
            raise ValueError(f"per_hour must be >= 0 (0: no budget), got {per_hour}")
        self.per_hour, self.shares = per_hour, dict(shares)
        self._spent: dict[str, list[int]] = {}  # site -> forward times (epoch ms), sorted
        self._seen: dict[str, dict[str, int]] = {}  # site -> snapshot id -> at: a forward counts once

    @property
    def limited(self) -> bool:
        return self.per_hour > 0

    def record(self, shipped: Mapping[str, Any]) -> None:
        """Count one sampler.shipped record (any replica's, or this one's own forward)."""
        site, at, snapshot = shipped.get("site_key"), shipped.get("at"), shipped.get("snapshot_id")
        if not isinstance(site, str) or not isinstance(at, int) or not self.limited:
            return
        seen = self._seen.setdefault(site, {})
        if snapshot in seen:  # this replica's own forward, read back from the topic
            return
        seen[str(snapshot)] = at
        times = self._spent.setdefault(site, [])
        bisect.insort(times, at)
        self._prune(site, times[-1])

    def used(self, site: str, now_ms: int) -> int:
        """Forwards of `site` within the hour before `now_ms`."""
        times = self._spent.get(site, [])
        return len(times) - bisect.bisect_right(times, now_ms - HOUR_MS)

    def allows(self, site: str, reason: str, now_ms: int) -> bool:
        if not self.limited or reason not in self.shares:
            return True
        return self.used(site, now_ms) < self.per_hour * self.shares[reason]

    def sites(self) -> list[str]:
        return sorted(self._spent)

    def _prune(self, site: str, newest: int) -> None:
        horizon = newest - 2 * HOUR_MS  # a margin for records that arrive late
        times, seen = self._spent[site], self._seen[site]
        drop = bisect.bisect_right(times, horizon)
        if drop:
            del times[:drop]
        if len(seen) > 2 * len(times) + 64:
            self._seen[site] = {k: at for k, at in seen.items() if at > horizon}
