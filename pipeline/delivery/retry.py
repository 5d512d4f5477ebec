"""Retry policy for panel deliveries and scrubber calls: classification, backoff with full
jitter, Retry-After, and the one budget after which a record is dead-lettered.

Times here are seconds (float, epoch seconds for instants), since that is what Retry-After and
sleeps speak; the breaker, fed by outcome records, works in epoch milliseconds.

classify_http decisions beyond the contract's list:
- any 2xx is success (the panel answers 200, or 202 for a blob over 100 KB).
- 408, 425, 429 and every 5xx are transient: the request may succeed unchanged later. 501/505
  are kept transient too: from a panel mid-deploy they pass, and max_age_s bounds the cost.
- every other 4xx is permanent: resending the same bytes gets the same answer (401 until a
  secret is fixed, 422 for a bad attestation, which a fresh delivery re-mints anyway).
- 1xx and 3xx are permanent: the client follows no redirects to the ingest route, so one means
  a misconfigured panel URL, which retrying will not fix.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Literal

Classification = Literal["success", "transient", "permanent"]

TRANSIENT_4XX = frozenset({408, 425, 429})
# 2**62 * base_s is already past any max_s; the cap keeps the float from overflowing.
_MAX_EXPONENT = 62


def classify_http(status: int) -> Classification:
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise ValueError(f"status must be an HTTP status code 100-599, got {status!r}")
    if 200 <= status < 300:
        return "success"
    if status >= 500 or status in TRANSIENT_4XX:
        return "transient"
    return "permanent"


def _non_negative(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def parse_retry_after(
    header_value: str | None, now: float, body: object = None
) -> float | None:
    """Seconds to wait from `now` (epoch s), or None when neither source says.

    The header may be delta-seconds or an HTTP-date (a date in the past means 0); the panel's
    429 body also carries `retry_after_s`. When both are present the later one wins, so the
    delivery is never earlier than either asks.
    """
    waits: list[float] = []
    if header_value is not None and (text := header_value.strip()):
        if text.isascii() and text.isdigit():  # "²".isdigit() is true too
            waits.append(float(text))
        else:
            try:
                when = parsedate_to_datetime(text)
            except (TypeError, ValueError, IndexError):
                when = None
            if when is not None:
                # HTTP-dates are GMT by definition; the asctime form parses without a zone.
                if when.tzinfo is None:
                    when = when.replace(tzinfo=UTC)
                waits.append(max(0.0, when.timestamp() - now))
    seconds = _non_negative(body.get("retry_after_s")) if isinstance(body, Mapping) else None
    if seconds is not None:
        waits.append(seconds)
    return max(waits) if waits else None


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float = 0.5
    max_s: float = 30.0
    max_age_s: float = 3600.0
    max_attempts: int = 1
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("base_s", "max_s", "max_age_s"):
            value = getattr(self, name)
            if _non_negative(value) is None or value == 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an int >= 1, got {self.max_attempts!r}")
        if self.max_s < self.base_s:
            raise ValueError(f"max_s ({self.max_s}) must be >= base_s ({self.base_s})")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before the next try, `attempt` being how many tries have failed.

        Full jitter (uniform over [0, min(max_s, base_s * 2**(attempt-1))]) spreads replicas
        that failed together. With a Retry-After the wait is that plus up to base_s of jitter:
        never earlier than the server asked, and not every replica at the same instant.
        """
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise ValueError(f"attempt must be an int >= 1, got {attempt!r}")
        if retry_after is not None:
            wait = _non_negative(retry_after)
            if wait is None:
                raise ValueError(f"retry_after must be seconds >= 0, got {retry_after!r}")
            return wait + self.rng.uniform(0.0, self.base_s)
        cap = min(self.max_s, self.base_s * 2 ** min(attempt - 1, _MAX_EXPONENT))
        return self.rng.uniform(0.0, cap)

    def give_up(self, attempts: int, first_attempt_at: float, now: float) -> bool:
        """The one retry budget (deliver and scrub): True once a record has been tried at least
        `max_attempts` times AND for at least `max_age_s` (epoch seconds). Both, so that neither
        a burst of quick failures nor one slow attempt spends a record's budget alone."""
        return attempts >= self.max_attempts and now - first_attempt_at >= self.max_age_s
