from __future__ import annotations

import random
from email.utils import formatdate
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.delivery.retry import RetryPolicy, classify_http, parse_retry_after

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        *[(s, "success") for s in (200, 201, 202, 204, 299)],
        *[(s, "transient") for s in (408, 425, 429, 500, 501, 502, 503, 504, 599)],
        *[(s, "permanent") for s in (400, 401, 403, 404, 405, 409, 410, 413, 415, 422, 451)],
        *[(s, "permanent") for s in (100, 301, 302, 304, 307, 308)],
    ],
)
def test_classify_http(status: int, expected: str) -> None:
    assert classify_http(status) == expected


@pytest.mark.parametrize("status", [0, 99, 600, True, "200", None])
def test_classify_http_rejects_non_status(status: Any) -> None:
    with pytest.raises(ValueError, match="status"):
        classify_http(status)


@pytest.mark.parametrize(
    ("header", "body", "expected"),
    [
        ("120", None, 120.0),
        (" 5 ", None, 5.0),
        ("0", None, 0.0),
        (formatdate(NOW + 30, usegmt=True), None, 30.0),
        (formatdate(NOW - 30, usegmt=True), None, 0.0),
        ("Tuesday, 14-Nov-23 22:13:50 GMT", None, 30.0),  # RFC 850 form of NOW + 30
        ("Tue Nov 14 22:13:50 2023", None, 30.0),  # asctime form: no zone, GMT by definition
        (None, None, None),
        ("", None, None),
        ("soon", None, None),
        ("-5", None, None),
        ("1.5", None, None),
        ("\u00b2", None, None),
        ("Mon, 32 Nov 2023 08:49:37 GMT", None, None),
        (None, {"error": "rate_limited", "retry_after_s": 12}, 12.0),
        (None, {"retry_after_s": 0.25}, 0.25),
        ("5", {"retry_after_s": 12}, 12.0),
        ("20", {"retry_after_s": 12}, 20.0),
        ("soon", {"retry_after_s": 3}, 3.0),
        (None, {"retry_after_s": -1}, None),
        (None, {"retry_after_s": True}, None),
        (None, {"retry_after_s": "12"}, None),
        (None, {"retry_after_s": float("nan")}, None),
        (None, {"error": "bad_signature"}, None),
        (None, b'{"retry_after_s": 12}', None),  # the caller parses JSON; raw bytes are ignored
    ],
)
def test_parse_retry_after(header: str | None, body: object, expected: float | None) -> None:
    assert parse_retry_after(header, NOW, body) == expected


@given(st.text(max_size=40))
def test_parse_retry_after_never_raises_on_a_header(header: str) -> None:
    wait = parse_retry_after(header, NOW)
    assert wait is None or wait >= 0


def policy(seed: int = 7, **kw: Any) -> RetryPolicy:
    return RetryPolicy(rng=random.Random(seed), **kw)


@given(st.integers(1, 5000), st.integers(0, 2**32))
def test_full_jitter_stays_within_the_exponential_cap(attempt: int, seed: int) -> None:
    p = policy(seed)
    assert 0.0 <= p.delay(attempt) <= min(p.max_s, p.base_s * 2 ** min(attempt - 1, 62))


@given(st.integers(1, 50), st.floats(0, 10_000), st.integers(0, 2**32))
def test_retry_after_is_never_undercut(attempt: int, retry_after: float, seed: int) -> None:
    p = policy(seed)
    assert retry_after <= p.delay(attempt, retry_after) <= retry_after + p.base_s


def test_retry_after_beyond_max_s_is_still_honoured() -> None:
    assert policy().delay(1, 120.0) >= 120.0


def test_delay_is_reproducible_from_the_injected_rng() -> None:
    a, b = policy(3), policy(3)
    assert [a.delay(n) for n in range(1, 20)] == [b.delay(n) for n in range(1, 20)]


def test_delay_spreads_rather_than_synchronises() -> None:
    p = policy()
    assert len({round(p.delay(10), 6) for _ in range(50)}) > 40


@pytest.mark.parametrize(
    ("attempt", "retry_after", "match"),
    [(0, None, "attempt"), (1.0, None, "attempt"), (True, None, "attempt"),
     (1, -1.0, "retry_after"), (1, float("inf"), "retry_after")],
)
def test_delay_rejects_bad_arguments(attempt: Any, retry_after: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        policy().delay(attempt, retry_after)


@pytest.mark.parametrize(
    ("elapsed", "expected"),
    [(0.0, False), (3599.9, False), (3600.0, True), (86_400.0, True), (-5.0, False)],
)
def test_give_up_after_max_age(elapsed: float, expected: bool) -> None:
    assert policy().give_up(1, NOW, NOW + elapsed) is expected


@pytest.mark.parametrize(
    ("attempts", "elapsed", "expected"),
    [(1, 900.0, False), (4, 900.0, False), (5, 899.9, False), (5, 900.0, True), (50, 10_000.0, True)],
)
def test_give_up_needs_both_attempts_and_age(attempts: int, elapsed: float, expected: bool) -> None:
    budget = RetryPolicy(base_s=0.5, max_s=30.0, max_age_s=900.0, max_attempts=5)
    assert budget.give_up(attempts, NOW, NOW + elapsed) is expected


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"base_s": 0}, "base_s"),
        ({"base_s": -1}, "base_s"),
        ({"max_s": float("inf")}, "max_s"),
        ({"max_age_s": "3600"}, "max_age_s"),
        ({"base_s": 5.0, "max_s": 1.0}, "max_s"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
    ],
)
def test_policy_validation_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RetryPolicy(**kwargs)


def test_policy_defaults() -> None:
    assert RetryPolicy() == RetryPolicy(0.5, 30.0, 3600.0)
