from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

import pipeline.model.records as records_module  # where the fast writer lives (plain_json_bytes)
from pipeline.errors import SchemaError
from pipeline.model.envelope import MalformedEvent, normalise, turn_ended
from pipeline.model.snapshot import (
    Emit,
    SessionState,
    Skip,
    apply_event,
    build_snapshot,
    describe_error,
    error_markers,
    snapshot_id,
)
from tests.fixtures import OPENCODE, REPO
from tests.unit.model.test_fuzz_inputs import message_listings

REFERENCE = OPENCODE
SNAPSHOT_SCHEMA = Draft202012Validator(
    json.loads((REPO / "schemas" / "snapshot.v2.json").read_text()))

TOOL_SESSION = "ses_e038a9defffeKV8LTT3N7zqfNy"
ERROR_SESSION = "ses_e038a9c4dffeJ03R2r5LNfh5K7"
HOST, SITE = "devbox", "pk_test_thirdparty"
NOW = 1_795_236_999_000


def listing(name: str) -> list[dict[str, Any]]:
    return json.loads((REFERENCE / f"opencode-1.18.33-messages-{name}.json").read_text())


def capture_envelopes() -> list[dict[str, Any]]:
    path = REFERENCE / "opencode-1.18.33-events.ndjson"
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        envelope = normalise(json.loads(line), host=HOST, site_key=SITE, received_at_ms=NOW + i)
        if envelope is not None:
            out.append(envelope)
    return out


def session_info(session_id: str) -> dict[str, Any]:
    """The last session.updated info of the capture, standing in for GET /session/{id}."""
    infos = [e["properties"]["info"] for e in capture_envelopes()
             if e["type"] == "session.updated" and e["session_id"] == session_id]
    return infos[-1]


def ended(messages: list[dict[str, Any]], session_id: str, trigger: str = "session.idle",
          **kwargs: Any) -> dict[str, Any]:
    return turn_ended(host=HOST, site_key=SITE, session=session_info(session_id),
                      messages=messages, trigger=trigger, received_at_ms=NOW, **kwargs)  # type: ignore[arg-type]


def fold(envelopes: list[dict[str, Any]], state: SessionState | None = None,
         max_messages: int = 25) -> tuple[SessionState, list[Any]]:
    actions: list[Any] = []
    current = state or SessionState()
    for envelope in envelopes:
        current, step = apply_event(current, envelope, max_messages=max_messages, now_ms=NOW)
        actions.extend(step)
    return current, actions


def assert_valid(snapshot: dict[str, Any]) -> None:
    errors = list(SNAPSHOT_SCHEMA.iter_errors(snapshot))
    assert not errors, errors[0].message


# ---------------------------------------------------------------- snapshots from the listings


def test_tool_session_snapshot_roles_and_no_markers() -> None:
    events = [e for e in capture_envelopes() if e["session_id"] == TOOL_SESSION]
    state, actions = fold([*events, ended(listing("tool-session"), TOOL_SESSION)])
    assert len(actions) == 1 and isinstance(actions[0], Emit)
    snapshot = actions[0].snapshot
    assert_valid(snapshot)
    assert [m["info"]["role"] for m in snapshot["messages"]] == ["user", "assistant", "assistant"]
    tools = [p for m in snapshot["messages"] for p in m["parts"] if p["type"] == "tool"]
    assert [(t["tool"], t["state"]["status"]) for t in tools] == [("bash", "completed")]
    # A shell command exiting 1 is a completed tool call, not an error.
    assert tools[0]["state"]["metadata"]["exit"] == 1
    assert snapshot["error_markers"] == []
    assert (snapshot["title"], snapshot["project_id"], snapshot["directory"]) == (
        "capture", "global", "/home/dev/project")
    assert snapshot["turn_ended_at"] == 1795236914047  # the last assistant message's completion
    assert snapshot["emitted_at"] == NOW
    assert snapshot["backfill"] is False
    assert (snapshot["host"], snapshot["site_key"], snapshot["session_id"]) == (
        HOST, SITE, TOOL_SESSION)
    assert state.last_snapshot_id == snapshot["snapshot_id"]


def test_error_session_snapshot_has_message_and_session_markers() -> None:
    events = [e for e in capture_envelopes() if e["session_id"] == ERROR_SESSION]
    assert any(e["type"] == "session.error" for e in events)
    state, actions = fold([*events, ended(listing("error-session"), ERROR_SESSION)])
    [emit] = actions
    snapshot = emit.snapshot
    assert_valid(snapshot)
    assert [m["info"]["role"] for m in snapshot["messages"]] == ["user", "assistant"]
    assistant_id = snapshot["messages"][1]["info"]["id"]
    assert snapshot["error_markers"] == [
        {"source": "message", "message_id": assistant_id, "part_id": None, "name": "APIError",
         "detail": "bad request: context too long (status 400)"},
        {"source": "session", "message_id": None, "part_id": None, "name": "APIError",
         "detail": "bad request: context too long (status 400)"},
    ]
    # Session errors belong to the turn they were seen in.
    assert state.session_errors == []


def test_tool_error_marker() -> None:
    messages = listing("tool-session")
    tool = messages[1]["parts"][2]
    tool["state"] = {"status": "error", "input": {"filePath": "nope.txt"},
                     "error": "File not found: nope.txt", "time": {"start": 1, "end": 2}}
    tool["tool"] = "read"
    markers = error_markers(messages)
    assert markers == [{"source": "tool", "message_id": messages[1]["info"]["id"],
                        "part_id": tool["id"], "name": "ToolError",
                        "detail": "read: File not found: nope.txt"}]
    # state.error alone also counts, whatever the status says
    tool["state"] = {"status": "completed", "error": {"name": "Boom", "data": {"message": "x"}}}
    assert [m["source"] for m in error_markers(messages)] == ["tool"]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ({"name": "MessageAbortedError", "data": {"message": "aborted"}},
         ("MessageAbortedError", "aborted")),
        ({"name": "ProviderAuthError", "data": {"providerID": "x"}},
         ("ProviderAuthError", '{"providerID": "x"}')),
        ({"data": {"message": "m"}}, ("UnknownError", "m")),
        ("plain text", ("Error", "plain text")),
        (42, ("UnknownError", "")),
    ],
)
def test_describe_error(error: Any, expected: tuple[str, str]) -> None:
    assert describe_error(error) == expected


def test_max_messages_keeps_the_tail() -> None:
    messages = listing("tool-session")
    snapshot = build_snapshot(ended(messages, TOOL_SESSION), SessionState(), max_messages=2,
                              now_ms=NOW)
    assert_valid(snapshot)
    assert snapshot["messages"] == messages[1:]
    assert snapshot["snapshot_id"] == snapshot_id(HOST, TOOL_SESSION, messages[1:])
    full = build_snapshot(ended(messages, TOOL_SESSION), SessionState(), max_messages=25,
                          now_ms=NOW)
    assert full["snapshot_id"] != snapshot["snapshot_id"]


def test_session_info_fills_from_state_when_fetch_lacks_it() -> None:
    envelope = turn_ended(host=HOST, site_key=SITE, session={"id": TOOL_SESSION},
                          messages=listing("tool-session"), trigger="reconcile",
                          received_at_ms=NOW, source="reconcile", backfill=True)
    state = SessionState(title="from events", project_id="p", directory="/d")
    snapshot = build_snapshot(envelope, state, max_messages=25, now_ms=NOW)
    assert (snapshot["title"], snapshot["project_id"], snapshot["directory"]) == (
        "from events", "p", "/d")
    assert snapshot["backfill"] is True
    assert_valid(snapshot)


@pytest.mark.parametrize(
    "messages",
    [
        "nope",
        [{"parts": []}],
        [{"info": {"id": "msg_1"}, "parts": []}],
        [{"info": {"id": "msg_1", "role": "user"}, "parts": [{"text": "no type"}]}],
        [{"info": {"id": "msg_1", "role": "user"}, "parts": "x"}],
    ],
)
def test_bad_listing_is_malformed(messages: Any) -> None:
    envelope = turn_ended(host=HOST, site_key=SITE, session={"id": "ses_1"}, messages=[],
                          trigger="session.idle", received_at_ms=NOW)
    envelope["properties"]["messages"] = messages
    with pytest.raises(MalformedEvent) as caught:
        apply_event(None, envelope, max_messages=25, now_ms=NOW)
    assert caught.value.reason == "bad_messages"


# ---------------------------------------------------------------- snapshot ids and dedupe


def test_repeated_idle_gives_the_same_snapshot_id_and_is_skipped() -> None:
    messages = listing("error-session")
    by_status = ended(messages, ERROR_SESSION, trigger="session.status")
    by_idle = ended(copy.deepcopy(messages), ERROR_SESSION, trigger="session.idle")
    assert by_status["event_id"] != by_idle["event_id"]  # so event-id dedupe lets both through
    state, actions = fold([by_status, by_idle, ended(messages, ERROR_SESSION, trigger="reconcile",
                                                     source="reconcile", backfill=True)])
    assert isinstance(actions[0], Emit)
    assert actions[1:] == [Skip("repeated_snapshot"), Skip("repeated_snapshot")]
    assert state.snapshot_ids == [actions[0].snapshot["snapshot_id"]]


def test_snapshot_id_ignores_what_a_reread_may_change() -> None:
    messages = listing("tool-session")
    reread = copy.deepcopy(messages)
    reread[1]["parts"][1]["time"] = {"start": 0, "end": 0}
    reread[1]["info"]["tokens"]["input"] = 999
    reread[0]["info"]["summary"] = {"diffs": [{"file": "a"}]}
    assert snapshot_id(HOST, TOOL_SESSION, reread) == snapshot_id(HOST, TOOL_SESSION, messages)
    assert snapshot_id(HOST, TOOL_SESSION, messages).startswith("snp_")
    assert len(snapshot_id(HOST, TOOL_SESSION, messages)) == 36


def test_snapshot_id_changes_with_content_and_completion() -> None:
    messages = listing("tool-session")
    base = snapshot_id(HOST, TOOL_SESSION, messages)
    assert snapshot_id("other", TOOL_SESSION, messages) != base
    unsettled = copy.deepcopy(messages)
    del unsettled[-1]["info"]["time"]["completed"]
    assert snapshot_id(HOST, TOOL_SESSION, unsettled) != base
    edited = copy.deepcopy(messages)
    edited[-1]["parts"][1]["text"] += "!"
    assert snapshot_id(HOST, TOOL_SESSION, edited) != base
    running = copy.deepcopy(messages)
    running[1]["parts"][2]["state"]["status"] = "running"
    assert snapshot_id(HOST, TOOL_SESSION, running) != base


def test_later_turn_gets_a_new_snapshot() -> None:
    first = listing("tool-session")
    later = [*copy.deepcopy(first),
             {"info": {"id": "msg_zz1", "sessionID": TOOL_SESSION, "role": "user",
                       "time": {"created": 1795236920000}},
              "parts": [{"id": "prt_zz1", "type": "text", "text": "and now the tests"}]},
             {"info": {"id": "msg_zz2", "sessionID": TOOL_SESSION, "role": "assistant",
                       "time": {"created": 1795236920001, "completed": 1795236920500}},
              "parts": [{"id": "prt_zz2", "type": "text", "text": "All green."}]}]
    state, actions = fold([ended(first, TOOL_SESSION), ended(later, TOOL_SESSION)])
    assert [type(a) for a in actions] == [Emit, Emit]
    assert actions[0].snapshot["snapshot_id"] != actions[1].snapshot["snapshot_id"]
    assert actions[1].snapshot["turn_ended_at"] == 1795236920500
    # A late re-send of the first turn is still recognised.
    _, again = fold([ended(first, TOOL_SESSION, trigger="reconcile", source="reconcile")], state)
    assert again == [Skip("repeated_snapshot")]


def test_duplicate_event_ids_are_skipped_without_state_change() -> None:
    envelopes = [e for e in capture_envelopes() if e["session_id"] == ERROR_SESSION]
    error_event = next(e for e in envelopes if e["type"] == "session.error")
    state, actions = fold([error_event, error_event])
    assert actions == [Skip("duplicate_event")]
    assert len(state.session_errors) == 1
    end = ended(listing("error-session"), ERROR_SESSION)
    state, actions = fold([end, end], state)
    assert [type(a) for a in actions] == [Emit, Skip]
    assert actions[1] == Skip("duplicate_event")


def test_seen_event_ids_are_bounded() -> None:
    state = SessionState()
    for i in range(50):
        state, _ = apply_event(state, {"event_id": f"evt_{i}", "type": "message.updated",
                                       "properties": {}}, max_messages=25, now_ms=NOW, max_seen=10)
    assert state.seen_event_ids == [f"evt_{i}" for i in range(40, 50)]


def test_apply_event_is_pure_and_state_is_json() -> None:
    events = [e for e in capture_envelopes() if e["session_id"] == ERROR_SESSION]
    state, _ = fold(events)
    before = json.dumps(state.to_dict(), sort_keys=True)
    _, actions = apply_event(state, ended(listing("error-session"), ERROR_SESSION),
                             max_messages=25, now_ms=NOW)
    assert isinstance(actions[0], Emit)
    assert json.dumps(state.to_dict(), sort_keys=True) == before
    restored = SessionState.from_dict(json.loads(before))
    assert restored == state
    assert restored.title == "capture"
    # a plain dict (as a table would hold it) works as well as the object
    _, from_dict = apply_event(json.loads(before), ended(listing("error-session"), ERROR_SESSION),
                               max_messages=25, now_ms=NOW)
    assert from_dict == actions
    assert SessionState.from_dict(None) == SessionState()


# ---------------------------------------------------------------- one id whichever writer hashes it

_LEAF = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                  st.floats(allow_nan=False), st.text(alphabet=st.characters(), max_size=12),
                  st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@example([("msg_1", "user", 1e-05, [("p", "text", None, float("inf"))])])  # json: 1e-05, Infinity
@example([("msg_1", "user", 2**64, [("p", "text", "\ud800", 1)])])  # beyond orjson's ints; a lone surrogate
@given(st.lists(st.tuples(_LEAF, _LEAF, _LEAF, st.lists(st.tuples(_LEAF, _LEAF, _LEAF, _LEAF), max_size=3)),
                max_size=4))
def test_snapshot_id_is_the_same_with_and_without_the_fast_writer(rows: list[Any]) -> None:
    messages = [{"info": {"id": mid, "role": role, "time": {"completed": done}},
                 "parts": [{"id": pid, "type": kind, "state": {"status": status}, "text": text}
                           for pid, kind, status, text in parts]}
                for mid, role, done, parts in rows]
    fast = snapshot_id(HOST, "ses_x", messages)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(records_module, "orjson", None)
        assert snapshot_id(HOST, "ses_x", messages) == fast


def test_snapshot_id_text_escapes_match_for_every_code_point() -> None:
    # orjson writes the hashed text only because its escapes are json's: all of them, checked
    text = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    messages = [{"info": {"id": "msg_1", "role": "user"},
                 "parts": [{"id": "prt_1", "type": "text", "text": text}]}]
    fast = snapshot_id(HOST, "ses_x", messages)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(records_module, "orjson", None)
        assert snapshot_id(HOST, "ses_x", messages) == fast


# ---------------------------------------------------------------- deep nesting

_NEST_MARK = "__nested_here__"


def _decoded_with_nesting(envelope: dict[str, Any], place: Any, depth: int) -> dict[str, Any]:
    """`envelope` through records.decode (as ingest reads it), with a value nested `depth`
    objects deep where `place(envelope)` put _NEST_MARK. Built as text: json.dumps itself
    stops short of what the decoder reads."""
    place(envelope)
    text = json.dumps(envelope).replace(json.dumps(_NEST_MARK), '{"a":' * depth + '"x"' + "}" * depth)
    return records_module.decode(text.encode(), "opencode.events")


def _tool_input(envelope: dict[str, Any]) -> None:
    tool = next(p for m in envelope["properties"]["messages"] for p in m["parts"] if p["type"] == "tool")
    tool["state"]["input"] = _NEST_MARK


def _part_text(envelope: dict[str, Any]) -> None:
    part = next(p for m in envelope["properties"]["messages"] for p in m["parts"] if p["type"] == "text")
    part["text"] = _NEST_MARK


def _message_error(envelope: dict[str, Any]) -> None:
    message = next(m for m in envelope["properties"]["messages"] if m["info"]["role"] == "assistant")
    message["info"]["error"] = {"name": "APIError", "data": _NEST_MARK}


@pytest.mark.parametrize("place", [_tool_input, _part_text, _message_error])
@pytest.mark.parametrize("depth", [600, 1000])  # past the bound; just under the decoder's limit
def test_deeply_nested_turn_is_a_record_error(place: Any, depth: int) -> None:
    envelope = _decoded_with_nesting(ended(listing("tool-session"), TOOL_SESSION), place, depth)
    with pytest.raises(MalformedEvent) as err:
        apply_event(None, envelope, max_messages=25, now_ms=NOW)
    assert err.value.reason == "too_deeply_nested"


def test_deeply_nested_session_error_is_a_record_error() -> None:
    envelope = {**ended(listing("tool-session"), TOOL_SESSION), "type": "session.error", "event_id": "evt_deep"}
    envelope["properties"] = {"sessionID": TOOL_SESSION, "error": {"name": "APIError", "data": _NEST_MARK}}
    decoded = _decoded_with_nesting(envelope, lambda e: None, 1000)
    with pytest.raises(MalformedEvent) as err:
        apply_event(None, decoded, max_messages=25, now_ms=NOW)
    assert err.value.reason == "too_deeply_nested"


@pytest.mark.parametrize("place", [_tool_input, _message_error])
def test_nesting_within_the_bound_gives_a_snapshot_later_stages_can_write(place: Any) -> None:
    from pipeline.model.snapshot import MAX_NESTING

    envelope = _decoded_with_nesting(ended(listing("tool-session"), TOOL_SESSION), place, MAX_NESTING - 10)
    _, [emit] = apply_event(None, envelope, max_messages=25, now_ms=NOW)
    assert isinstance(emit, Emit)
    records_module.validate("snapshot.v2", emit.snapshot)
    again = records_module.decode(records_module.encode(emit.snapshot), "sessions.idle")
    assert again["snapshot_id"] == emit.snapshot["snapshot_id"]


# ---------------------------------------------------------------- schema errors (dead-letter text)

LEAKY = "password=hunter2 AKIAIOSFODNN7EXAMPLE"  # what a record may hold and a dead letter must not


def _schema_error(record: dict[str, Any], schema: str = "snapshot.v2") -> str:
    with pytest.raises(SchemaError) as err:
        records_module.validate(schema, record)
    return str(err.value)


def _bad_snapshot(change: Any) -> dict[str, Any]:
    snapshot = build_snapshot(ended(listing("tool-session"), TOOL_SESSION), SessionState(), max_messages=25,
                              now_ms=NOW)
    change(snapshot)
    return snapshot


def test_schema_error_names_the_path_and_types_never_the_value() -> None:
    text = _schema_error(_bad_snapshot(lambda s: s["messages"][0]["info"].update(id=[LEAKY])))
    assert text.endswith("at messages/0/info/id: expected type string, got array"), text
    for leaky in ("hunter2", "AKIA"):
        assert leaky not in text


def test_secret_in_a_wrong_typed_field_stays_out_of_the_dead_letter_text() -> None:
    # through records.decode, as ingest meets it: the error text is what the dead letter keeps
    envelope = {**ended(listing("tool-session"), TOOL_SESSION), "received_at": LEAKY}
    with pytest.raises(SchemaError) as err:
        records_module.decode(json.dumps(envelope).encode(), "opencode.events")
    assert err.value.reason == "schema_invalid"
    assert "at received_at: expected type integer, got string" in err.value.detail
    assert "hunter2" not in str(err.value) and "AKIA" not in str(err.value)


@pytest.mark.parametrize(("change", "expected"), [
    (lambda s: s.pop("host"), "at (root): missing required property 'host'"),
    (lambda s: s.update({LEAKY: 1, "AKIAIOSFODNN7EXAMPLE": 2}), "at (root): unexpected additional properties (2)"),
    (lambda s: s.update(host="h" * 600), "at host: string longer than maxLength 512"),
    (lambda s: s.update(error_markers=[{"source": LEAKY, "name": "x", "detail": ""}]),
     "at error_markers/0/source: value not in the allowed enum"),
    (lambda s: s.update(schema=LEAKY), 'at schema: value is not the constant "session.snapshot/2"'),
    (lambda s: s.update(emitted_at=-1), "at emitted_at: number below minimum 0"),
])
def test_schema_error_wording(change: Any, expected: str) -> None:
    text = _schema_error(_bad_snapshot(change))
    assert text.endswith(expected), text
    assert "hunter2" not in text and "AKIA" not in text


def test_schema_error_path_hides_property_names_the_record_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    # where a schema lets the record name its keys (additionalProperties with a schema), the
    # key is the record's: a secret can sit there, so the path shows "*" in its place
    schema = {"type": "object",
              "properties": {"known": {"type": "object", "additionalProperties": {"type": "integer"}}}}
    monkeypatch.setattr(records_module, "validator", lambda name: Draft202012Validator(schema))
    monkeypatch.setattr(records_module, "_fast_validator", lambda name: None)
    text = _schema_error({"known": {LEAKY: "x"}}, "custom")
    assert text.endswith("at known/*: expected type integer, got string"), text
    assert "hunter2" not in text


# ---------------------------------------------------------------- the listing checks and the id, as they were

def reference_check_listing(messages: Any) -> Any:
    """_check_listing as it was before its loops were inlined (issue 17): the answer to keep."""
    from collections.abc import Mapping

    def mapping(value: Any) -> bool:
        return isinstance(value, Mapping)

    if not isinstance(messages, list):
        raise MalformedEvent("bad_messages", f"messages is {type(messages).__name__}")
    for i, message in enumerate(messages):
        info = message.get("info") if mapping(message) else None
        if not mapping(info):
            raise MalformedEvent("bad_messages", f"messages[{i}] has no info object")
        for key in ("id", "role"):
            value = info.get(key)
            if not isinstance(value, str) or not value or (key == "id" and len(value) > 512):
                raise MalformedEvent("bad_messages", f"messages[{i}].info.{key} is {value!r:.80}")
        parts = message.get("parts")
        if not isinstance(parts, list) or not all(mapping(p) and isinstance(p.get("type"), str) for p in parts):
            raise MalformedEvent("bad_messages", f"messages[{i}].parts is not a list of typed parts")
    return messages


def reference_snapshot_id(host: str, session_id: str, messages: Any) -> str:
    """snapshot_id as it was (shape built with Mapping checks, hashed as json writes it)."""
    import hashlib
    from collections.abc import Mapping

    def mapping(value: Any) -> bool:
        return isinstance(value, Mapping)

    shape: list[Any] = []
    for message in messages:
        info = message.get("info") if mapping(message) else None
        info = info if mapping(info) else {}
        time = info.get("time")
        time = time if mapping(time) else {}
        error = info.get("error")
        parts = []
        raw_parts = message.get("parts") if mapping(message) else None
        for part in raw_parts if isinstance(raw_parts, list) else []:
            if not mapping(part):
                continue
            state = part.get("state")
            parts.append([part.get("id"), part.get("type"), state.get("status") if mapping(state) else None,
                          part.get("text")])
        shape.append([info.get("id"), info.get("role"), time.get("completed"),
                      describe_error(error)[0] if error else None, parts])
    text = json.dumps([host, session_id, shape], sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)
    return "snp_" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class OtherMapping(dict[str, Any]):
    """A mapping that is not exactly a dict: takes the general checks, not the inlined ones."""


class Kind(str):
    pass


def _outcome(check: Any, *args: Any) -> Any:
    try:
        return ("ok", check(*args))
    except MalformedEvent as exc:
        return ("malformed", exc.reason, exc.detail)


@settings(max_examples=300, deadline=None)
@example([{"info": {"id": "m", "role": "user"}, "parts": [OtherMapping(type="text"), {"type": Kind("tool")}]}])
@example([{"info": {"id": "m", "role": "user"}, "parts": [{"type": "text"}, None]}])
@example([{"info": {"id": "m" * 513, "role": ""}, "parts": []}])
@example([{"info": {"id": "m", "role": ""}, "parts": []}])
@example([OtherMapping(info=OtherMapping(id="m", role="user"), parts=[])])
@example([{"info": {"id": "m", "role": "user", "time": {"completed": 2**64}, "error": {"name": 1}},
           "parts": [{"id": 1.5e-5, "type": "text", "state": {"status": ["x"]}, "text": {"b": 1, "a": 2}}]}])
@example([{"info": {"id": "m", "role": "user"}, "parts": [{"id": "p", "type": "text", "text": "\ud800"}]}])
@given(message_listings())
def test_listing_checks_and_snapshot_id_answer_as_before(messages: Any) -> None:
    from pipeline.model.snapshot import _check_listing

    assert _outcome(_check_listing, messages) == _outcome(reference_check_listing, messages)
    if isinstance(messages, list):
        assert snapshot_id(HOST, "ses_x", messages) == reference_snapshot_id(HOST, "ses_x", messages)
