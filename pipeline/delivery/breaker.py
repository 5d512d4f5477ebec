"""Circuit breaker per panel endpoint, driven only by records from delivery.outcomes.

Replicas read that one-partition topic in one order, and each record is judged by its own `at`
(epoch ms), so every replica and every replay reaches the same state. The caller's `now_ms`
only answers "is the open period over": HALF_OPEN is an OPEN breaker past its period.

The contract counts "non-2xx or a thrown error", so "failed" (5xx, transport) and "refused"
(400/401/422: a rotated secret refuses everything) are failures, as is any record contradicting
itself (delivered + 500). "delivered" with a 2xx or no status is a success. A 429 (status
"throttled", or "failed" with http_status 429 as written before) is the panel asking for less,
not failing: it pauses and slows delivery (pipeline/delivery/concurrency.py) and is no attempt
here. Other statuses are not attempts; "probe" (a replica admitted one) only holds off probes.

Two regimes. At each failure the breaker looks at the last `min_calls` attempts (in topic
order, so every replica sees the same ones):
- when fewer than `min_calls` attempts fall within `failure_window_s` (the traffic of the
  reference plugin): the contract's rule, `failure_threshold` failures within the window open it;
- when the last `min_calls` attempts all fall within the window (a deployment's worth of hosts):
  it opens only when at least `failure_rate` of them failed (and at least `failure_threshold`).
  A handful of errors among hundreds of good answers is noise the retries absorb; a panel that
  is down fails every attempt, and half of the last 20 fail within a second or two of traffic.
"""

from __future__ import annotations

import bisect
import enum
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from pipeline.config.keys import SECONDS, between, tuning
from pipeline.config.sections import BreakerConfig
from pipeline.errors import RecordError

ATTEMPT_STATUSES = frozenset({"delivered", "failed", "refused"})
THROTTLED_HTTP = 429


class State(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Verdict(enum.StrEnum):
    PASS = "pass"
    HOLD = "hold"
    DROP = "drop"
    PROBE = "probe"


class OutcomeError(RecordError):
    def __init__(self, detail: str) -> None:
        super().__init__("outcome_invalid", detail)


@dataclass(frozen=True)
class BreakerSettings(BreakerConfig):
    """What a breaker runs with: the `[breaker]` keys and two internal settings."""

    # A probe whose outcome never arrives (its replica died) must not wedge the breaker.
    probe_timeout_s: float = tuning(60.0, SECONDS, "how long a probe may go without an outcome")
    dedupe_capacity: int = tuning(4096, between(0, 10_000_000, int, "an integer between 0 and 10000000"),
                                  "outcome ids remembered to apply each once (0: none)")

    @classmethod
    def from_section(cls, section: BreakerConfig, **overrides: Any) -> BreakerSettings:
        """The loaded `[breaker]` section, then `overrides`."""
        return cls(**{f.name: getattr(section, f.name) for f in fields(section)}, **overrides)


@dataclass(frozen=True)
class Transition:
    endpoint: str
    from_state: State
    to_state: State
    at: int
    reason: str


@dataclass(frozen=True)
class Admission:
    verdict: Verdict
    reason: str
    state: State
    until_ms: int | None = None  # when a held record is worth offering again


@dataclass(frozen=True)
class BreakerSnapshot:
    endpoint: str
    state: State
    recent_failures: int
    open_until_ms: int | None
    probe_in_flight: bool
    opened_total: int


def classify_outcome(outcome: Mapping[str, Any]) -> Literal["success", "failure"] | None:
    http = outcome.get("http_status")
    if outcome.get("status") not in ATTEMPT_STATUSES or http == THROTTLED_HTTP:
        return None
    ok_http = http is None or (isinstance(http, int) and 200 <= http < 300)
    delivered = outcome.get("status") == "delivered" and outcome.get("error") is None
    return "success" if delivered and ok_http else "failure"


class Breaker:
    def __init__(self, endpoint: str, settings: BreakerSettings | None = None) -> None:
        self.endpoint, self.settings = endpoint, settings or BreakerSettings()
        cfg = self.settings
        self._window_ms, self._open_ms, self._probe_ms = (
            round(s * 1000) for s in (cfg.failure_window_s, cfg.open_s, cfg.probe_timeout_s))
        self._open_until: int | None = None
        self._since = 0  # records older than the last state change belong to the previous one
        self._failures: list[int] = []
        self._recent: deque[tuple[int, bool]] = deque(maxlen=self.settings.min_calls)  # (at, failed)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._probe_lease_until: int | None = None
        self._opened_total = 0

    def state(self, now_ms: int) -> State:
        if self._open_until is None:
            return State.CLOSED
        return State.OPEN if now_ms < self._open_until else State.HALF_OPEN

    def try_acquire_probe(self, now_ms: int) -> bool:
        if self.state(now_ms) is not State.HALF_OPEN or now_ms < (self._probe_lease_until or 0):
            return False
        self._lease(now_ms)
        return True

    def admit(self, now_ms: int) -> Admission:
        state = self.state(now_ms)
        if state is State.CLOSED:
            return Admission(Verdict.PASS, "closed", state)
        if self.try_acquire_probe(now_ms):
            return Admission(Verdict.PROBE, "open period over: this delivery probes", state)
        verdict = Verdict.HOLD if self.settings.mode == "hold" else Verdict.DROP
        if state is State.OPEN:
            return Admission(verdict, "open", state, self._open_until)
        return Admission(verdict, "half-open, probe in flight", state, self._probe_lease_until)

    def apply(self, outcome: Mapping[str, Any]) -> list[Transition]:
        if outcome.get("endpoint") != self.endpoint:
            raise OutcomeError(f"outcome for {outcome.get('endpoint')!r} sent to {self.endpoint!r}")
        kind = classify_outcome(outcome)
        if kind is None and outcome.get("status") != "probe":
            return []
        at = outcome.get("at")
        if isinstance(at, bool) or not isinstance(at, int):
            raise OutcomeError(f"outcome 'at' must be int epoch ms, got {at!r}")
        if self._is_duplicate(outcome.get("outcome_id")) or at < self._since:
            return []
        if self._open_until is None:
            if kind is not None:
                self._recent.append((at, kind == "failure"))
            return self._record_failure(at) if kind == "failure" else []
        if at < self._open_until:
            return []  # sent before the period ended: a straggler, not evidence of recovery
        if kind is None:
            self._lease(at)
            return []
        return self._settle(kind, at, self._open_until, bool(outcome.get("probe")))

    def snapshot(self, now_ms: int) -> BreakerSnapshot:
        in_flight = now_ms < (self._probe_lease_until or 0)
        return BreakerSnapshot(self.endpoint, self.state(now_ms), len(self._failures),
                               self._open_until, in_flight, self._opened_total)

    def _lease(self, at: int) -> None:
        self._probe_lease_until = max(at + self._probe_ms, self._probe_lease_until or 0)

    def _is_duplicate(self, outcome_id: object) -> bool:
        if outcome_id is None or self.settings.dedupe_capacity == 0:
            return False
        key = str(outcome_id)
        if key in self._seen:
            return True
        self._seen[key] = None
        if len(self._seen) > self.settings.dedupe_capacity:
            self._seen.popitem(last=False)
        return False

    def _settle(self, kind: str, at: int, open_until: int, probe: bool) -> list[Transition]:
        # Any attempt after the period settles it, probe-flagged or not: a lagging replica's
        # delivery is as much evidence as our probe, and the first in topic order wins.
        what = "probe" if probe else "first delivery after open period"
        over = Transition(self.endpoint, State.OPEN, State.HALF_OPEN, open_until, "open_s elapsed")
        closed = kind == "success"
        self._reset(at, None if closed else at + self._open_ms)
        to, verb = (State.CLOSED, "succeeded") if closed else (State.OPEN, "failed")
        return [over, Transition(self.endpoint, State.HALF_OPEN, to, at, f"{what} {verb}")]

    def _record_failure(self, at: int) -> list[Transition]:
        bisect.insort(self._failures, at)
        window, k, cfg = self._window_ms, self.settings.failure_threshold, self.settings
        self._failures = [t for t in self._failures if t >= self._failures[-1] - window]
        recent = self._recent
        if len(recent) == cfg.min_calls and min(t for t, _ in recent) >= at - window:
            failed = sum(1 for _, f in recent if f)
            if failed < k or failed < cfg.failure_rate * len(recent):
                return []
            return self._trip(at, f"{failed} of the last {len(recent)} attempts failed")
        # the contract's rule; pruning against the newest failure keeps the list within one window
        for i in range(len(self._failures) - k + 1):
            tripped_at = self._failures[i + k - 1]
            if tripped_at - self._failures[i] <= window:
                return self._trip(tripped_at, f"{k} failures within {cfg.failure_window_s:g}s")
        return []

    def _trip(self, at: int, reason: str) -> list[Transition]:
        self._reset(at, at + self._open_ms)
        return [Transition(self.endpoint, State.CLOSED, State.OPEN, at, reason)]

    def _reset(self, at: int, open_until: int | None) -> None:
        self._since, self._open_until = at, open_until
        self._failures, self._probe_lease_until = [], None
        self._recent.clear()
        self._opened_total += open_until is not None


class BreakerRegistry:
    def __init__(self, settings: BreakerSettings | None = None) -> None:
        self._settings = settings or BreakerSettings()
        self._breakers: dict[str, Breaker] = {}

    def get(self, endpoint: str) -> Breaker:
        if endpoint not in self._breakers:
            self._breakers[endpoint] = Breaker(endpoint, self._settings)
        return self._breakers[endpoint]

    def apply(self, outcome: Mapping[str, Any]) -> list[Transition]:
        endpoint = outcome.get("endpoint")
        if not isinstance(endpoint, str) or not endpoint:
            raise OutcomeError(f"outcome 'endpoint' must be a non-empty str, got {endpoint!r}")
        return self.get(endpoint).apply(outcome)

    def admit(self, endpoint: str, now_ms: int) -> Admission:
        return self.get(endpoint).admit(now_ms)

    def snapshot(self, now_ms: int) -> dict[str, BreakerSnapshot]:
        # Sorted so metric exposition and replay comparisons are stable.
        return {name: b.snapshot(now_ms) for name, b in sorted(self._breakers.items())}
