"""pipeline/sampling/budget.py: the rolling hour per site, the priority shares, each forward
counted once."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.sampling.budget import HOUR_MS, RaterBudget

T0 = 1_800_000_000_000


def shipped(n: int, at: int, site: str = "pk_a") -> dict[str, Any]:
    return {"site_key": site, "snapshot_id": f"snap_{n}", "at": at}


def test_no_budget_allows_everything() -> None:
    budget = RaterBudget(0)
    for n in range(1000):
        budget.record(shipped(n, T0))
    assert budget.allows("pk_a", "sample", T0) and not budget.limited


def test_reasons_stop_in_order_as_the_hour_fills() -> None:
    budget = RaterBudget(20)
    allowed = []
    for n in range(20):
        allowed.append({r for r in ("sample", "novelty", "pair", "error_flag") if budget.allows("pk_a", r, T0)})
        budget.record(shipped(n, T0))
    assert allowed[9] == {"sample", "novelty", "pair", "error_flag"}
    assert allowed[10] == {"novelty", "pair", "error_flag"}  # sample stops at half
    assert allowed[15] == {"pair", "error_flag"}  # novelty at three quarters
    assert allowed[18] == {"error_flag"}  # pair at 90 %
    assert allowed[19] == {"error_flag"}
    assert not budget.allows("pk_a", "error_flag", T0)  # 20 of 20
    assert budget.allows("pk_a", "force", T0)  # never refused


def test_the_hour_rolls_and_sites_are_apart() -> None:
    budget = RaterBudget(4)
    for n in range(4):
        budget.record(shipped(n, T0 + n * 1000))
    assert budget.used("pk_a", T0 + 3000) == 4 and not budget.allows("pk_a", "error_flag", T0 + 3000)
    assert budget.allows("pk_b", "sample", T0 + 3000)
    assert budget.used("pk_a", T0 + HOUR_MS + 1500) == 2  # the first two are over an hour old
    assert budget.allows("pk_a", "sample", T0 + HOUR_MS + 1500) is False  # 2 of 4 is half
    assert budget.allows("pk_a", "novelty", T0 + HOUR_MS + 1500)


def test_a_forward_is_counted_once_however_often_its_record_is_read() -> None:
    budget = RaterBudget(10)
    for _ in range(3):  # its own forward, then read back from sampler.shipped, then after a restart
        budget.record(shipped(1, T0))
    assert budget.used("pk_a", T0) == 1


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 3 * HOUR_MS)), max_size=200))
def test_used_is_the_distinct_forwards_of_the_last_hour(records: list[tuple[int, int]]) -> None:
    budget = RaterBudget(1000)
    first: dict[int, int] = {}
    for n, at in records:
        budget.record(shipped(n, T0 + at))
        first.setdefault(n, T0 + at)
    now = T0 + 3 * HOUR_MS
    assert budget.used("pk_a", now) == sum(1 for at in first.values() if at > now - HOUR_MS)


def test_a_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError):
        RaterBudget(-1)
