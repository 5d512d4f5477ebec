"""The reference forwarder's decision table, one branch per row.

`force` is out of scope here (it is not a sampling policy of this pipeline)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from pipeline.errors import RecordError
from pipeline.sampling import (
    POLICY_VERSION,
    Decision,
    ErrorFlag,
    NoveltyPolicy,
    NoveltyWindows,
    RandomBaseline,
    Sampler,
    effective_rate,
    reference_sampler,
    session_tokens,
    uniform,
)
from pipeline.sampling.error import _describe, _present, find_errors
from tests.fixtures import OPENCODE, REPO

REFERENCE = OPENCODE
SITE = "pk_test_thirdparty"


# ---------------------------------------------------------------- builders


def text(t: str, **flags: Any) -> dict[str, Any]:
    return {"id": "prt_t", "type": "text", "text": t, **flags}


def tool(status: str, **state: Any) -> dict[str, Any]:
    return {"id": "prt_tool", "type": "tool", "tool": "read", "callID": "call_1",
            "state": {"status": status, "input": {"filePath": "a.txt"}, **state}}


def msg(role: str, *parts: dict[str, Any], n: int = 0, **info: Any) -> dict[str, Any]:
    return {"info": {"id": f"msg_{role}_{n}", "sessionID": "ses_1", "role": role, **info},
            "parts": list(parts)}


def snap(*messages: dict[str, Any], markers: list[dict[str, Any]] | None = None,
         site: str = SITE, sid: int = 1) -> dict[str, Any]:
    return {"schema": "session.snapshot/1", "snapshot_id": f"snp_{sid:032x}", "host": "host-a",
            "site_key": site, "session_id": "ses_1", "project_id": None, "directory": None,
            "title": None, "turn_ended_at": 1, "emitted_at": 2, "backfill": False,
            "messages": list(messages), "error_markers": markers or []}


def marker(source: str) -> dict[str, Any]:
    return {"source": source, "message_id": None, "part_id": None, "name": "APIError",
            "detail": "bad request"}


API_ERROR = {"name": "APIError", "data": {"message": "bad request: context too long"}}
CLEAN = [msg("user", text("fix the bug")), msg("assistant", text("done"), n=1)]

# ---------------------------------------------------------------- error_flag

ERROR_CASES = [
    ("clean turn", snap(*CLEAN), None),
    ("assistant info.error", snap(msg("user", text("go")), msg("assistant", n=1, error=API_ERROR)),
     "APIError: bad request"),
    ("error at the message level is not where the daemon puts it",
     snap(msg("user", text("go")), {**msg("assistant", n=1), "error": API_ERROR}), None),
    ("role read from info: a user message's error is not an assistant error",
     snap({**msg("user", text("go"), error=API_ERROR), "role": "assistant"}), None),
    ("tool state.status error",
     snap(msg("assistant", tool("error", error="File not found: a.txt"))), "File not found"),
    ("tool state.error on a completed part",
     snap(msg("assistant", tool("completed", output="", error="partial failure"))),
     "partial failure"),
    ("tool status error without an error text", snap(msg("assistant", tool("error"))),
     "status error"),
    ("non-zero exit is still completed",
     snap(msg("assistant", tool("completed", output="", metadata={"exit": 1}))), None),
    ("empty state.error is no error",
     snap(msg("assistant", tool("completed", output="", error=""))), None),
    ("session-level marker", snap(*CLEAN, markers=[marker("session")]), "session: APIError"),
    ("message and tool markers defer to the messages",
     snap(*CLEAN, markers=[marker("message"), marker("tool")]), None),
]


@pytest.mark.parametrize(("name", "snapshot", "detail"), ERROR_CASES,
                         ids=[c[0] for c in ERROR_CASES])
def test_error_flag(name: str, snapshot: dict[str, Any], detail: str | None) -> None:
    decision = ErrorFlag().evaluate(snapshot)
    if detail is None:
        assert decision is None
    else:
        assert decision is not None and decision.forward and decision.reason == "error_flag"
        assert detail in decision.detail


def test_error_flag_only_sees_the_messages_the_trace_keeps() -> None:
    old_error = msg("assistant", n=0, error=API_ERROR)
    later = [msg("user", text(f"turn {i}"), n=i + 1) for i in range(3)]
    assert ErrorFlag(max_messages=3).evaluate(snap(old_error, *later)) is None
    assert ErrorFlag(max_messages=4).evaluate(snap(old_error, *later)) is not None


def test_error_flag_on_the_reference_error_session() -> None:
    listing = json.loads((REFERENCE / "opencode-1.18.33-messages-error-session.json").read_text())
    decision = ErrorFlag().evaluate(snap(*listing))
    assert decision is not None and "APIError: bad request: context too long" in decision.detail
    tools = json.loads((REFERENCE / "opencode-1.18.33-messages-tool-session.json").read_text())
    assert ErrorFlag().evaluate(snap(*tools)) is None  # `cat` failing is exit 1, not an error


# ---------------------------------------------------------------- novelty


def windows_with(*snapshots: dict[str, Any],
                 size: int = 200) -> tuple[NoveltyWindows, NoveltyPolicy]:
    windows = NoveltyWindows(size=size)
    policy = NoveltyPolicy(windows)
    for s in snapshots:
        windows.apply_shipped(policy.shipped_record(s, trace_id="tr_oc_" + "0" * 32, at=0))
    return windows, policy


SHIPPED = snap(msg("user", text("refactor the parser module to use a visitor pattern")),
               msg("assistant", text("I rewrote parser.py with a Visitor class and tests"), n=1),
               sid=100)
SIMILAR = snap(msg("user", text("refactor the parser module to use a visitor pattern please")),
               msg("assistant", text("I rewrote parser.py with a Visitor class and tests"), n=1),
               sid=101)
DISSIMILAR = snap(msg("user", text("why does the CI cache miss on every docker build")),
                  msg("assistant", text("The layer order invalidates it; copy lockfiles"), n=1),
                  sid=102)
NO_TEXT = snap(msg("user", text("hidden", synthetic=True)),
               msg("assistant", tool("completed", output="x"),
                   {"id": "prt_r", "type": "reasoning", "text": "thinking"}, n=1), sid=103)

NOVELTY_CASES = [
    ("empty token set is novel", [SHIPPED], NO_TEXT, True, 1.0),
    ("empty window is novel", [], SIMILAR, True, 1.0),
    ("similar to a shipped session", [SHIPPED], SIMILAR, False, None),
    ("dissimilar to every shipped session", [SHIPPED], DISSIMILAR, True, None),
    ("the same snapshot replayed is not its own neighbour", [SHIPPED], SHIPPED, True, 1.0),
]


@pytest.mark.parametrize(("name", "shipped", "snapshot", "forward", "novelty"), NOVELTY_CASES,
                         ids=[c[0] for c in NOVELTY_CASES])
def test_novelty(name: str, shipped: list[dict[str, Any]], snapshot: dict[str, Any],
                 forward: bool, novelty: float | None) -> None:
    _, policy = windows_with(*shipped)
    decision = policy.evaluate(snapshot)
    assert decision.reason == "novelty" and decision.forward is forward
    assert decision.novelty is not None and (decision.novelty >= 0.7) is forward
    if novelty is not None:
        assert decision.novelty == novelty


@pytest.mark.parametrize(("threshold", "num_perm"), [(0.0, 128), (1.0, 128), (0.0, 16), (1.0, 16), (0.99, 1024)])
def test_novelty_decides_at_every_configurable_threshold(threshold: float, num_perm: int) -> None:
    # noveltyThreshold 0 or 1 is valid config; datasketch finds no banding for Jaccard 1 or 0,
    # which raised on every decision (each forwarded trace an internal_error dead letter)
    windows = NoveltyWindows(size=200, num_perm=num_perm, threshold=threshold)
    policy = NoveltyPolicy(windows)
    windows.apply_shipped(policy.shipped_record(SHIPPED, trace_id="tr_oc_" + "0" * 32, at=0))
    similar, dissimilar = policy.evaluate(SIMILAR), policy.evaluate(DISSIMILAR)
    if threshold == 0.0:
        assert similar.forward and dissimilar.forward  # 1 - max Jaccard >= 0 always
    else:
        assert not similar.forward


def test_novelty_window_is_per_site() -> None:
    windows, policy = windows_with(SHIPPED)
    assert not policy.evaluate(SIMILAR).forward
    other_site = {**SIMILAR, "site_key": "pk_other"}
    decision = policy.evaluate(other_site)
    assert decision.forward and decision.novelty == 1.0
    assert windows.sites() == [SITE, "pk_other"]


def test_novelty_tokens_come_from_the_last_8_messages_text_parts() -> None:
    early = [msg("user", text(f"filler{i} words"), n=i) for i in range(2)]
    late = [msg("assistant", text(f"later{i}"), {"id": "r", "type": "reasoning", "text": "secret"},
                text("synthetic", synthetic=True), text("ignored", ignored=True), n=i + 2)
            for i in range(8)]
    tokens = session_tokens([*early, *late])
    assert tokens == {f"later{i}" for i in range(8)}
    assert session_tokens([msg("user", text("Fix  The\nBUG\tnow"))]) == {"fix", "the", "bug", "now"}


def test_shipped_record_refused_when_it_cannot_belong() -> None:
    windows, policy = windows_with()
    record = policy.shipped_record(SHIPPED, "tr_oc_" + "0" * 32, 0)
    with pytest.raises(RecordError, match="num_perm"):
        windows.apply_shipped({**record, "num_perm": 64})
    with pytest.raises(RecordError, match="shipped_site"):
        windows.get("pk_other").apply_shipped(record)
    with pytest.raises(RecordError, match="hashvalues"):
        windows.apply_shipped({**record, "hashvalues": record["hashvalues"][:-1]})


# ---------------------------------------------------------------- random


def ids_by_draw(rate: float) -> tuple[str, str]:
    """A snapshot id whose draw falls below `rate` and one at or above it (deterministic)."""
    below = above = None
    for i in range(10_000):
        sid = f"snp_{i:032x}"
        if uniform(SITE, sid) < rate:
            below = below or sid
        else:
            above = above or sid
        if below and above:
            return below, above
    raise AssertionError("no draw on both sides of the rate")


@pytest.mark.parametrize("rate", [0.05, 0.25])
def test_random_below_and_above_rate(rate: float) -> None:
    below, above = ids_by_draw(rate)
    policy = RandomBaseline(rate)
    hit = policy.evaluate({**snap(*CLEAN), "snapshot_id": below})
    miss = policy.evaluate({**snap(*CLEAN), "snapshot_id": above})
    assert hit.forward and hit.reason == "sample"
    assert not miss.forward and miss.reason == "sample"


def test_uniform_is_deterministic_and_spread() -> None:
    draws = [uniform(SITE, f"snp_{i:032x}") for i in range(2000)]
    assert draws == [uniform(SITE, f"snp_{i:032x}") for i in range(2000)]
    assert all(0.0 <= d < 1.0 for d in draws)
    assert abs(sum(d < 0.05 for d in draws) / 2000 - 0.05) < 0.02
    assert uniform("pk_other", "snp_" + "0" * 32) != uniform(SITE, "snp_" + "0" * 32)


RATE_CASES = [
    # (requested, override, effective, capped, defaulted)
    (0.05, False, 0.05, False, False),
    (0, False, 0.0, False, False),
    (0.25, False, 0.25, False, False),
    (0.3, False, 0.25, True, False),
    (float("inf"), False, 0.25, True, False),
    (0.3, True, 0.3, False, False),
    (1.5, True, 1.0, True, False),
    (-0.1, False, 0.05, False, True),
    (-0.1, True, 0.05, False, True),
    (float("nan"), False, 0.05, False, True),
    ("0.1", False, 0.05, False, True),
    (None, False, 0.05, False, True),
    (True, False, 0.05, False, True),
]


@pytest.mark.parametrize(("requested", "override", "rate", "capped", "defaulted"), RATE_CASES,
                         ids=[f"{c[0]!r}-override={c[1]}" for c in RATE_CASES])
def test_effective_rate(requested: object, override: bool, rate: float, capped: bool,
                        defaulted: bool) -> None:
    setting = effective_rate(requested, override)
    assert (setting.rate, setting.capped, setting.defaulted) == (rate, capped, defaulted)
    assert RandomBaseline(requested, override).rate == rate


# ---------------------------------------------------------------- order


class Boom:
    name = "boom"

    def evaluate(self, snapshot: dict[str, Any]) -> Decision | None:
        raise RuntimeError("policy bug")


def sampler_for(rate: float, shipped: list[dict[str, Any]]) -> Sampler:
    windows, _ = windows_with(*shipped)
    return reference_sampler(windows, rate=rate, rate_override=True)


ERRORED = {**SIMILAR, "error_markers": [marker("session")]}
ORDER_CASES = [
    # (name, rate, shipped, snapshot, reason, forward)
    ("error wins over novelty and sample", 1.0, [], ERRORED, "error_flag", True),
    ("novelty before sample", 1.0, [], DISSIMILAR, "novelty", True),
    ("sample when not novel", 1.0, [SHIPPED], SIMILAR, "sample", True),
    ("baseline when nothing forwards", 0.0, [SHIPPED], SIMILAR, "baseline", False),
]


@pytest.mark.parametrize(("name", "rate", "shipped", "snapshot", "reason", "forward"), ORDER_CASES,
                         ids=[c[0] for c in ORDER_CASES])
def test_order_of_evaluation(name: str, rate: float, shipped: list[dict[str, Any]],
                             snapshot: dict[str, Any], reason: str, forward: bool) -> None:
    decision = sampler_for(rate, shipped).decide(snapshot)
    assert (decision.reason, decision.forward, decision.rate) == (reason, forward, rate)
    assert decision.policy_version == POLICY_VERSION
    if reason == "error_flag":
        assert decision.novelty is None  # novelty was never computed
    else:
        assert decision.novelty is not None  # measured, and kept even when not forwarded
    if reason in ("sample", "baseline"):
        assert decision.novelty < 0.7


def test_reference_order_and_no_force() -> None:
    sampler = reference_sampler(NoveltyWindows())
    assert [p.name for p in sampler.policies] == ["error_flag", "pair", "novelty", "sample"]


def test_raising_policy_is_counted_and_skipped() -> None:
    windows, _ = windows_with()
    sampler = Sampler([Boom(), ErrorFlag(), NoveltyPolicy(windows), RandomBaseline(0.0)], rate=0.0)
    assert sampler.decide(DISSIMILAR).reason == "novelty"
    decision = sampler.decide(snap(*CLEAN, markers=[marker("session")]))
    assert decision.reason == "error_flag"
    assert sampler.policy_errors["boom"] == 2
    only_boom = Sampler([Boom()], rate=0.05).decide(DISSIMILAR)
    assert (only_boom.reason, only_boom.forward) == ("baseline", False)
    assert "boom failed: RuntimeError" in only_boom.detail


def test_sampler_config_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="duplicate sampling policy names: sample"):
        Sampler([RandomBaseline(), RandomBaseline()], rate=0.05)
    with pytest.raises(ValueError, match="rate"):
        Sampler([], rate=math.nan)
    with pytest.raises(ValueError, match="unknown decision reason 'maybe'"):
        Decision(forward=True, reason="maybe")  # type: ignore[arg-type]


def test_decision_serialises_to_the_schema_object() -> None:
    schema = json.loads((REPO / "schemas" / "trace-sampled.v2.json").read_text())
    validator = Draft202012Validator(schema["properties"]["decision"])
    sampler = sampler_for(0.05, [SHIPPED])
    for snapshot in (ERRORED, DISSIMILAR, SIMILAR):
        validator.validate(sampler.decide(snapshot).to_dict())


def reference_find_errors(snapshot: dict[str, Any], max_messages: int = 25) -> list[str]:
    """find_errors as it was, before the dict fast paths and one `_present` per error."""
    found: list[str] = []
    messages = snapshot.get("messages") or []
    for message in messages[max(0, len(messages) - max_messages):]:
        info = message.get("info") or {}
        message_id = info.get("id")
        if info.get("role") == "assistant" and _present(info.get("error")):
            found.append(f"message {message_id}: {_describe(info['error'])}")
        for part in message.get("parts") or []:
            if not isinstance(part, Mapping) or part.get("type") != "tool":
                continue
            state = part.get("state")
            if not isinstance(state, Mapping):
                continue
            if state.get("status") == "error" or _present(state.get("error")):
                error = state.get("error")
                text = _describe(error) if _present(error) else "status error"
                found.append(f"tool {part.get('tool')} ({part.get('id')}): {text}")
    for marker in snapshot.get("error_markers") or []:
        if isinstance(marker, Mapping) and marker.get("source") == "session":
            found.append(f"session: {marker.get('name')}: {marker.get('detail')}")
    return found


_ERROR = (st.none() | st.booleans() | st.integers(-1, 1) | st.floats(allow_nan=False) | st.sampled_from(["", "boom"])
          | st.just([]) | st.just({}) | st.fixed_dictionaries({"name": st.sampled_from(["APIError", 3]),
                                                             "data": st.just({"message": "bad"})}))
_STATE = st.fixed_dictionaries({}, optional={"status": st.sampled_from(["error", "completed", None]), "error": _ERROR})
_PART = st.fixed_dictionaries({"type": st.sampled_from(["tool", "text"])},
                              optional={"state": _STATE | st.none() | st.just("x"), "tool": st.just("bash"),
                                        "id": st.just("prt_1")}) | st.none() | st.just("part")
_INFO = st.fixed_dictionaries({"role": st.sampled_from(["assistant", "user"])},
                              optional={"id": st.just("msg_1"), "error": _ERROR})
_MESSAGES = st.lists(st.fixed_dictionaries({}, optional={"info": _INFO, "parts": st.lists(_PART, max_size=4)}),
                     max_size=6)


@given(_MESSAGES, st.integers(1, 8))
def test_find_errors_is_what_it_was(messages: list[dict[str, Any]], max_messages: int) -> None:
    snapshot = {"messages": messages, "error_markers": [{"source": "session", "name": "n", "detail": "d"}]}
    assert find_errors(snapshot, max_messages) == reference_find_errors(snapshot, max_messages)
