from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.delivery.breaker import (
    Admission,
    Breaker,
    BreakerRegistry,
    BreakerSettings,
    OutcomeError,
    State,
    Verdict,
    classify_outcome,
)
from pipeline.errors import RecordError

EP = "http://panel:3015"
S = 1000  # ms per second: outcome times are epoch ms
OPEN_MS = 300 * S
CL, OP, HO = State.CLOSED, State.OPEN, State.HALF_OPEN
Record = dict[str, Any]
Step = tuple[State, State, int]


def out(status: str, at: int, http: int | None = None, error: str | None = None,
        probe: bool = False, oid: str | None = None, endpoint: str = EP) -> dict[str, Any]:
    record: dict[str, Any] = {"endpoint": endpoint, "status": status, "http_status": http,
                              "error": error, "at": at, "probe": probe}
    if oid is not None:
        record["outcome_id"] = oid
    return record


def fail(at: int, **kw: Any) -> dict[str, Any]:
    return out("failed", at, http=503, **kw)


def ok(at: int, **kw: Any) -> dict[str, Any]:
    return out("delivered", at, http=200, **kw)


def run(outcomes: list[Record], **cfg: Any) -> tuple[Breaker, list[Step]]:
    breaker = Breaker(EP, BreakerSettings(**cfg))
    seen = [(t.from_state, t.to_state, t.at) for o in outcomes for t in breaker.apply(o)]
    return breaker, seen


T0 = 1_700_000_000_000
TRIP = T0 + 2 * S  # third failure of the standard trip below
TRIPPED = [fail(T0), fail(T0 + S), fail(TRIP)]


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        pytest.param(TRIPPED, [(CL, OP, TRIP)], id="three-failures-open"),
        pytest.param(TRIPPED[:2], [], id="two-failures-stay-closed"),
        pytest.param([fail(T0), fail(T0 + 30 * S), fail(T0 + 60 * S)], [(CL, OP, T0 + 60 * S)],
                     id="window-is-inclusive"),
        pytest.param([fail(T0), fail(T0 + 30 * S), fail(T0 + 60 * S + 1)], [], id="window-expired"),
        pytest.param([fail(T0), fail(T0 + 40 * S), fail(T0 + 80 * S), fail(T0 + 90 * S)],
                     [(CL, OP, T0 + 90 * S)], id="window-slides"),
        pytest.param([fail(T0), ok(T0 + 1), fail(T0 + 2), fail(T0 + 3)], [(CL, OP, T0 + 3)],
                     id="success-does-not-reset-count"),
        pytest.param([out("refused", T0, http=401), out("refused", T0 + 1, http=422),
                      out("failed", T0 + 2, error="ConnectTimeout")], [(CL, OP, T0 + 2)],
                     id="refusals-and-transport-errors-count"),
        pytest.param([out("delivered", T0, http=500), out("delivered", T0 + 1, error="boom"),
                      out("failed", T0 + 2, http=200)], [(CL, OP, T0 + 2)],
                     id="inconsistent-records-count-as-failures"),
        pytest.param([fail(T0), out("circuit_open", T0 + 1), out("held", T0 + 2),
                      out("dead_lettered", T0 + 3), fail(T0 + 4)], [], id="non-attempts-ignored"),
        pytest.param([fail(T0 + 50 * S), fail(T0), fail(T0 + 30 * S)], [(CL, OP, T0 + 50 * S)],
                     id="out-of-order-opens-at-latest-of-window"),
        pytest.param([*TRIPPED, ok(TRIP + 100 * S), fail(TRIP + 200 * S)], [(CL, OP, TRIP)],
                     id="outcomes-while-open-are-stragglers"),
        pytest.param([*TRIPPED, ok(TRIP + OPEN_MS + 5, probe=True)],
                     [(CL, OP, TRIP), (OP, HO, TRIP + OPEN_MS), (HO, CL, TRIP + OPEN_MS + 5)],
                     id="probe-success-closes"),
        pytest.param([*TRIPPED, fail(TRIP + OPEN_MS, probe=True)],
                     [(CL, OP, TRIP), (OP, HO, TRIP + OPEN_MS), (HO, OP, TRIP + OPEN_MS)],
                     id="probe-failure-reopens"),
        pytest.param([*TRIPPED, fail(TRIP + OPEN_MS, probe=True), ok(TRIP + 2 * OPEN_MS - 1),
                      ok(TRIP + 2 * OPEN_MS, probe=True)],
                     [(CL, OP, TRIP), (OP, HO, TRIP + OPEN_MS), (HO, OP, TRIP + OPEN_MS),
                      (OP, HO, TRIP + 2 * OPEN_MS), (HO, CL, TRIP + 2 * OPEN_MS)],
                     id="reopened-period-restarts-from-probe-failure"),
        pytest.param([*TRIPPED, ok(TRIP + OPEN_MS + 9)],
                     [(CL, OP, TRIP), (OP, HO, TRIP + OPEN_MS), (HO, CL, TRIP + OPEN_MS + 9)],
                     id="lagging-replica-delivery-settles-half-open"),
        pytest.param([*TRIPPED, ok(TRIP + OPEN_MS, probe=True),
                      fail(TRIP + OPEN_MS + 1, probe=True), fail(TRIP + OPEN_MS + 2),
                      fail(TRIP + OPEN_MS + 3)],
                     [(CL, OP, TRIP), (OP, HO, TRIP + OPEN_MS), (HO, CL, TRIP + OPEN_MS),
                      (CL, OP, TRIP + OPEN_MS + 3)],
                     id="second-probe-after-close-counts-as-ordinary-failure"),
        pytest.param([*TRIPPED, ok(TRIP + OPEN_MS, probe=True), fail(TRIP + OPEN_MS - 2),
                      fail(TRIP + OPEN_MS - 1), fail(TRIP + OPEN_MS + 1)],
                     [(CL, OP, TRIP), (OP, HO, TRIP + OPEN_MS), (HO, CL, TRIP + OPEN_MS)],
                     id="failures-from-before-close-ignored"),
    ],
)
def test_transitions(outcomes: list[Record], expected: list[Step]) -> None:
    assert run(outcomes)[1] == expected


def test_transitions_carry_endpoint_and_reason() -> None:
    breaker = Breaker(EP)
    records = [*TRIPPED, fail(TRIP + OPEN_MS, probe=True)]
    transitions = [t for o in records for t in breaker.apply(o)]
    assert [(t.endpoint, t.reason) for t in transitions] == [
        (EP, "3 failures within 60s"), (EP, "open_s elapsed"), (EP, "probe failed"),
    ]
    last = breaker.apply(ok(TRIP + 2 * OPEN_MS))[-1]
    assert last.reason == "first delivery after open period succeeded"


@pytest.mark.parametrize(
    ("now", "expected"),
    [(TRIP, OP), (TRIP + OPEN_MS - 1, OP), (TRIP + OPEN_MS, HO), (TRIP + 10 * OPEN_MS, HO)],
)
def test_open_period_is_judged_by_the_clock(now: int, expected: State) -> None:
    assert run(TRIPPED)[0].state(now) is expected


@pytest.mark.parametrize(
    ("mode", "outcomes", "now", "expected"),
    [
        ("hold", [], T0, Admission(Verdict.PASS, "closed", CL)),
        ("hold", TRIPPED, TRIP + 1, Admission(Verdict.HOLD, "open", OP, TRIP + OPEN_MS)),
        ("drop", TRIPPED, TRIP + 1, Admission(Verdict.DROP, "open", OP, TRIP + OPEN_MS)),
        ("drop", TRIPPED[:2], T0 + 2 * S, Admission(Verdict.PASS, "closed", CL)),
        ("hold", [*TRIPPED, ok(TRIP + OPEN_MS)], TRIP + OPEN_MS + 1,
         Admission(Verdict.PASS, "closed", CL)),
    ],
)
def test_admission(mode: str, outcomes: list[Record], now: int, expected: Admission) -> None:
    assert run(outcomes, mode=mode)[0].admit(now) == expected


@pytest.mark.parametrize(("mode", "refused"), [("hold", Verdict.HOLD), ("drop", Verdict.DROP)])
def test_half_open_admits_exactly_one_probe(mode: str, refused: Verdict) -> None:
    breaker, _ = run(TRIPPED, mode=mode, probe_timeout_s=30)
    now = TRIP + OPEN_MS
    first = breaker.admit(now)
    assert (first.verdict, first.state) == (Verdict.PROBE, HO)
    second = breaker.admit(now + 1)
    assert second == Admission(refused, "half-open, probe in flight", HO, now + 30 * S)
    assert not breaker.try_acquire_probe(now + 29 * S)
    assert breaker.snapshot(now + 1).probe_in_flight


def test_probe_lease_expires_so_a_lost_probe_cannot_wedge_the_breaker() -> None:
    breaker, _ = run(TRIPPED, probe_timeout_s=30)
    now = TRIP + OPEN_MS
    assert breaker.try_acquire_probe(now)
    assert not breaker.try_acquire_probe(now + 30 * S - 1)
    assert breaker.try_acquire_probe(now + 30 * S)


def test_probe_lease_is_cleared_by_the_probe_outcome() -> None:
    breaker, _ = run(TRIPPED)
    now = TRIP + OPEN_MS
    assert breaker.admit(now).verdict is Verdict.PROBE
    breaker.apply(fail(now + 10, probe=True))
    assert breaker.admit(now + 11).verdict is Verdict.HOLD
    assert breaker.admit(now + 10 + OPEN_MS).verdict is Verdict.PROBE


@pytest.mark.parametrize("now", [T0, TRIP + 1])
def test_no_probe_unless_half_open(now: int) -> None:
    assert not run(TRIPPED if now > TRIP else [])[0].try_acquire_probe(now)


def test_duplicate_outcome_ids_are_not_double_counted() -> None:
    breaker, seen = run([fail(T0, oid=oid) for oid in ("a", "a", "b", "b")])
    assert seen == [] and breaker.snapshot(T0).recent_failures == 2
    assert breaker.apply(fail(T0 + 2, oid="c"))[0].to_state is OP


def test_duplicate_probe_outcome_does_not_settle_twice() -> None:
    probe = fail(TRIP + OPEN_MS, probe=True, oid="p")
    breaker, seen = run([*TRIPPED, probe, ok(TRIP + 2 * OPEN_MS, probe=True, oid="q"), probe])
    assert [s[1] for s in seen] == [OP, HO, OP, HO, CL]
    assert breaker.state(TRIP + 3 * OPEN_MS) is CL


def test_dedupe_memory_is_bounded() -> None:
    records = [fail(T0, oid=oid) for oid in ("a", "b", "c", "a")]
    breaker, seen = run(records, failure_threshold=4, dedupe_capacity=2)
    assert seen == [(CL, OP, T0)]  # "a" was evicted, so its redelivery counts again
    assert len(breaker._seen) == 2


outcome_st = st.builds(
    out,
    status=st.sampled_from(["delivered", "failed", "refused", "circuit_open", "held", "probe",
                            "transition", "dead"]),
    at=st.integers(0, 2000 * S),
    http=st.sampled_from([None, 200, 202, 401, 429, 503]),
    error=st.sampled_from([None, "ReadTimeout"]),
    probe=st.booleans(),
    oid=st.one_of(st.none(), st.sampled_from("abcdefgh")),
    endpoint=st.sampled_from([EP, "http://other:3015"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(outcome_st, max_size=60), st.integers(0, 3000 * S))
def test_replay_determinism(outcomes: list[Record], now: int) -> None:
    live, replay = BreakerRegistry(), BreakerRegistry()
    # Topic order, not `at` order: replicas interleave, and the replay must still agree.
    live_transitions = [t for o in outcomes for t in live.apply(o)]
    replay_transitions = [t for o in outcomes for t in replay.apply(o)]
    assert live_transitions == replay_transitions
    assert live.snapshot(now) == replay.snapshot(now)
    for endpoint in (EP, "http://other:3015"):
        assert live.admit(endpoint, now) == replay.admit(endpoint, now)


@settings(max_examples=300, deadline=None)
@given(st.lists(outcome_st, max_size=60), st.data())
def test_redelivered_records_change_nothing(outcomes: list[Record], data: st.DataObject) -> None:
    # A consumer restarting from an older committed offset re-reads a run of records.
    outcomes = [{**o, "outcome_id": f"id{i}"} for i, o in enumerate(outcomes)]
    start = data.draw(st.integers(0, len(outcomes)))
    stop = data.draw(st.integers(start, len(outcomes)))
    once, twice = BreakerRegistry(), BreakerRegistry()
    once_transitions = [t for o in outcomes for t in once.apply(o)]
    redelivered = outcomes[:stop] + outcomes[start:stop] + outcomes[stop:]
    assert [t for o in redelivered for t in twice.apply(o)] == once_transitions
    assert once.snapshot(3000 * S) == twice.snapshot(3000 * S)


def test_registry_keeps_one_breaker_per_endpoint() -> None:
    other = "http://other:3015"
    registry = BreakerRegistry(BreakerSettings(mode="drop"))
    for o in [*TRIPPED, *[fail(at, endpoint=other) for at in (T0, T0 + 1)]]:
        registry.apply(o)
    assert registry.admit(EP, TRIP + 1).verdict is Verdict.DROP
    assert registry.admit(other, TRIP + 1).verdict is Verdict.PASS
    assert registry.get(EP) is registry.get(EP)
    snap = registry.snapshot(TRIP + 1)
    assert list(snap) == [other, EP]  # sorted, so metric output is stable
    mine = snap[EP]
    assert (mine.state, mine.open_until_ms, mine.opened_total) == (OP, TRIP + OPEN_MS, 1)
    assert (snap[other].state, snap[other].recent_failures) == (CL, 2)


def test_probe_admission_record_holds_off_other_replicas() -> None:
    mine, theirs = run(TRIPPED)[0], run(TRIPPED)[0]
    now = TRIP + OPEN_MS + 5
    assert theirs.admit(now).verdict is Verdict.PROBE
    probe_record = out("probe", now, probe=True, oid="admit-1")
    for breaker in (mine, theirs):
        assert breaker.apply(probe_record) == []
    assert mine.admit(now + 1) == Admission(Verdict.HOLD, "half-open, probe in flight", HO,
                                            now + 60 * S)
    assert mine.admit(now + 60 * S).verdict is Verdict.PROBE  # their probe never reported back


def test_probe_admission_record_before_period_end_is_ignored() -> None:
    breaker, _ = run([*TRIPPED, out("probe", TRIP + 1)])
    assert breaker.admit(TRIP + OPEN_MS).verdict is Verdict.PROBE


def test_outcome_error_is_a_permanent_record_error() -> None:
    with pytest.raises(RecordError) as caught:
        Breaker(EP).apply({**fail(0), "at": "yesterday"})
    assert caught.value.reason == "outcome_invalid"


@pytest.mark.parametrize(
    ("outcome", "match"),
    [
        ({"status": "failed", "at": 1}, "endpoint"),
        (out("failed", 1, endpoint=""), "endpoint"),
        ({**fail(0), "at": None}, "'at'"),
        ({**fail(0), "at": 1.5}, "'at'"),
        ({**fail(0), "at": True}, "'at'"),
    ],
)
def test_unreadable_outcomes_raise(outcome: Record, match: str) -> None:
    with pytest.raises(OutcomeError, match=match):
        BreakerRegistry().apply(outcome)


def test_breaker_refuses_another_endpoints_outcome() -> None:
    with pytest.raises(OutcomeError, match="other"):
        Breaker(EP).apply(fail(0, endpoint="http://other:3015"))


def test_non_attempts_need_no_timestamp() -> None:
    assert Breaker(EP).apply({"endpoint": EP, "status": "circuit_open"}) == []


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (ok(0), "success"),
        (out("delivered", 0, http=202), "success"),
        (out("delivered", 0), "success"),
        (out("delivered", 0, http=302), "failure"),
        (out("failed", 0, http=429), None),
        (out("throttled", 0, http=429), None),
        (out("refused", 0, http=400), "failure"),
        (out("circuit_open", 0), None),
        (out("held", 0), None),
        (out("probe", 0, probe=True), None),
        (out("transition", 0), None),
        (out("dead", 0, http=422), None),
        (out("something_new", 0, http=500), None),
    ],
)
def test_classify_outcome(outcome: Record, expected: str | None) -> None:
    assert classify_outcome(outcome) == expected


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"failure_threshold": 2.0}, "failure_threshold"),
        ({"failure_threshold": True}, "failure_threshold"),
        ({"failure_window_s": 0}, "failure_window_s"),
        ({"failure_window_s": float("inf")}, "failure_window_s"),
        ({"open_s": -1}, "open_s"),
        ({"open_s": "300"}, "open_s"),
        ({"probe_timeout_s": float("nan")}, "probe_timeout_s"),
        ({"mode": "block"}, "mode"),
        ({"dedupe_capacity": -1}, "dedupe_capacity"),
    ],
)
def test_settings_validation_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        BreakerSettings(**kwargs)


def test_settings_defaults_match_the_reference_forwarder() -> None:
    assert BreakerSettings() == BreakerSettings(3, 60.0, 300.0, "hold")


def traffic(start: int, seconds: int, per_s: int, failing: set[int] | None = None) -> list[Record]:
    """`per_s` attempts a second for `seconds`, the n-th attempt failing when n is in `failing`."""
    step = S // per_s
    return [fail(start + n * step) if n in (failing or set()) else ok(start + n * step)
            for n in range(seconds * per_s)]


def test_at_volume_a_few_failures_do_not_open() -> None:
    # 20 attempts a second for two minutes, 1 in 50 failing: 48 failures a minute, far past the
    # contract's 3 a minute, but 2% of the traffic
    _, seen = run(traffic(T0, 120, 20, failing=set(range(7, 2400, 50))))
    assert seen == []


def test_at_volume_a_burst_of_failures_within_the_last_attempts_does_not_open_below_the_rate() -> None:
    _, seen = run(traffic(T0, 10, 20, failing={100, 101, 102, 103, 104, 105, 106, 107, 108}))
    assert seen == []  # 9 of the last 20 failed: under half


def test_at_volume_a_panel_that_goes_down_opens_within_the_next_attempts() -> None:
    before = traffic(T0, 30, 20)
    down = [fail(T0 + 30 * S + n * 10) for n in range(20)]
    _, seen = run(before + down)
    # the 10th failure makes half of the last 20 attempts
    assert seen == [(CL, OP, T0 + 30 * S + 9 * 10)]


def test_at_volume_the_rate_is_configurable() -> None:
    failing = set(range(25, 400, 5))  # one attempt in five, once the traffic is there
    assert run(traffic(T0, 20, 20, failing=failing))[1] == []
    assert run(traffic(T0, 20, 20, failing=failing), failure_rate=0.2)[1] != []


def test_below_min_calls_in_the_window_the_contract_rule_holds() -> None:
    # 16 good answers and then 3 failures within the minute: fewer than 20 attempts in the
    # window, so 3 failures open it as the reference plugin's breaker does
    spread = [ok(T0 + n * 3 * S) for n in range(16)]
    failures = [fail(T0 + 57 * S), fail(T0 + 58 * S), fail(T0 + 59 * S)]
    assert run(spread + failures)[1] == [(CL, OP, T0 + 59 * S)]


def test_volume_that_ended_falls_back_to_the_contract_rule() -> None:
    busy = traffic(T0, 10, 20)
    quiet = [fail(T0 + 200 * S), fail(T0 + 201 * S), fail(T0 + 202 * S)]
    assert run(busy + quiet)[1] == [(CL, OP, T0 + 202 * S)]


def test_throttled_answers_are_no_attempts_at_any_volume() -> None:
    throttled = [out("throttled", T0 + n, http=429) for n in range(100)]
    assert run(throttled)[1] == []
    assert run([out("failed", T0 + n, http=429) for n in range(100)])[1] == []
