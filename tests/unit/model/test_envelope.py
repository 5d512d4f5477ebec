from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from pipeline.model.envelope import (
    DEFAULT_DROP_TYPES,
    REQUIRED_TYPES,
    TURN_ENDED,
    EventFilter,
    MalformedEvent,
    normalise,
    session_id_of,
    synthetic_event_id,
    turn_ended,
)
from tests.fixtures import OPENCODE, REPO

REFERENCE = OPENCODE
EVENT_SCHEMA = Draft202012Validator(json.loads((REPO / "schemas" / "event.v1.json").read_text()))

TOOL_SESSION = "ses_e038a9defffeKV8LTT3N7zqfNy"
ERROR_SESSION = "ses_e038a9c4dffeJ03R2r5LNfh5K7"
GLOBAL_SESSION = "ses_e037aa82effej6NcN63unzTIAN"
HOST = dict(host="devbox", site_key="pk_test_thirdparty", received_at_ms=1_795_236_920_000)


def frames(name: str) -> list[dict[str, Any]]:
    path = REFERENCE / f"opencode-1.18.33-{name}.ndjson"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def listing(name: str) -> list[dict[str, Any]]:
    return json.loads((REFERENCE / f"opencode-1.18.33-messages-{name}.json").read_text())


def assert_valid(envelope: dict[str, Any]) -> None:
    errors = list(EVENT_SCHEMA.iter_errors(envelope))
    assert not errors, errors[0].message


# ---------------------------------------------------------------- the captures


def test_event_capture_normalises_every_session_frame() -> None:
    raw = frames("events")
    envelopes = [normalise(f, **HOST) for f in raw]
    # Only server.connected has no session.
    skipped = [f["type"] for f, e in zip(raw, envelopes, strict=True) if e is None]
    assert skipped == ["server.connected"]
    kept = [e for e in envelopes if e is not None]
    for envelope in kept:
        assert_valid(envelope)
        assert envelope["host"] == "devbox" and envelope["source"] == "sse"
        assert envelope["backfill"] is False
        assert envelope["event_id"].startswith("evt_")
    assert {e["session_id"] for e in kept} == {TOOL_SESSION, ERROR_SESSION}
    # Ids are the daemon's, one per frame.
    assert len({e["event_id"] for e in kept}) == len(kept)


def test_event_capture_directory_comes_from_session_info_or_argument() -> None:
    raw = frames("events")
    created = next(normalise(f, **HOST) for f in raw if f["type"] == "session.created")
    assert created is not None
    assert (created["directory"], created["project"]) == ("/home/dev/project", "global")
    idle = next(f for f in raw if f["type"] == "session.idle")
    assert normalise(idle, **HOST)["directory"] is None  # type: ignore[index]
    scoped = normalise(idle, **HOST, directory="/srv/x", project="p1")
    assert scoped is not None and (scoped["directory"], scoped["project"]) == ("/srv/x", "p1")


def test_global_capture_unwraps_payload_and_skips_sync_frames() -> None:
    raw = frames("global-events")
    envelopes = [normalise(f, **HOST) for f in raw]
    payload_types = Counter(f["payload"]["type"] for f, e in zip(raw, envelopes, strict=True)
                            if e is None)
    assert payload_types == Counter({"sync": 31, "server.connected": 1})
    kept = [e for e in envelopes if e is not None]
    assert len(kept) == len(raw) - 32
    for envelope in kept:
        assert_valid(envelope)
        assert envelope["session_id"] == GLOBAL_SESSION
        assert envelope["directory"] == "/home/dev/project"
        assert envelope["project"] == "global"
    # Every sync frame repeats a bus event already produced: nothing is lost by skipping them.
    produced = {e["event_id"] for e in kept}
    sync_ids = {f["payload"]["syncEvent"]["id"] for f in raw if f["payload"]["type"] == "sync"}
    assert sync_ids <= produced


def test_global_wrapper_directory_wins_over_argument() -> None:
    frame = {"directory": "/a", "project": "p", "payload": {
        "id": "evt_1", "type": "session.idle", "properties": {"sessionID": "ses_1"}}}
    envelope = normalise(frame, **HOST, directory="/b", project="q")
    assert envelope is not None and (envelope["directory"], envelope["project"]) == ("/a", "p")


def test_default_filter_on_captures_keeps_what_ingest_reads() -> None:
    kept = Counter()
    dropped = Counter()
    for name in ("events", "global-events"):
        for frame in frames(name):
            envelope = normalise(frame, **HOST)
            if envelope is None:
                continue
            (kept if EventFilter().keeps(envelope["type"]) else dropped)[envelope["type"]] += 1
    assert set(kept) == {"session.created", "session.updated", "session.status", "session.idle",
                         "session.error", "message.updated"}
    assert set(dropped) == {"message.part.updated", "message.part.delta", "session.diff"}


# ---------------------------------------------------------------- session ids


@pytest.mark.parametrize(
    ("event_type", "properties", "expected"),
    [
        ("session.idle", {"sessionID": "ses_a"}, "ses_a"),
        ("message.updated", {"info": {"id": "msg_1", "sessionID": "ses_b"}}, "ses_b"),
        ("message.part.updated", {"part": {"id": "prt_1", "sessionID": "ses_c"}}, "ses_c"),
        ("session.created", {"info": {"id": "ses_d"}}, "ses_d"),
        ("session.deleted", {"info": {"id": "ses_e", "title": "t"}}, "ses_e"),
        # info.id names the session only on session.* events
        ("pty.created", {"info": {"id": "pty_1"}}, None),
        ("message.updated", {"info": {"id": "msg_1"}}, None),
        ("server.heartbeat", {}, None),
        ("catalog.updated", {}, None),
        # sessionID wins over nested ids
        ("message.updated", {"sessionID": "ses_f", "info": {"sessionID": "ses_g"}}, "ses_f"),
    ],
)
def test_session_id_of(event_type: str, properties: dict[str, Any], expected: str | None) -> None:
    assert session_id_of(event_type, properties) == expected


def test_events_without_session_are_none() -> None:
    for frame in [
        {"id": "evt_1", "type": "server.connected", "properties": {}},
        {"id": "evt_2", "type": "server.heartbeat", "properties": {}},
        {"payload": {"id": "evt_3", "type": "server.heartbeat", "properties": {}}},
        {"directory": "/x", "project": "global",
         "payload": {"id": "evt_4", "type": "plugin.added", "properties": {"id": "p"}}},
        # id-less noise is passed over, not dead-lettered
        {"type": "server.heartbeat"},
    ]:
        assert normalise(frame, **HOST) is None


# ---------------------------------------------------------------- malformed frames


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ([1, 2], "not_an_object"),
        ("data", "not_an_object"),
        (None, "not_an_object"),
        ({"payload": "x"}, "bad_payload"),
        ({"directory": 5, "payload": {"type": "session.idle"}}, "bad_directory"),
        ({}, "missing_type"),
        ({"payload": {}}, "missing_type"),
        ({"type": 7}, "bad_type"),
        ({"type": ""}, "bad_type"),
        ({"type": "x" * 201}, "bad_type"),
        ({"id": "evt_1", "type": "session.idle", "properties": [1]}, "bad_properties"),
        ({"type": "session.idle", "properties": {"sessionID": "ses_1"}}, "missing_id"),
        ({"id": 5, "type": "session.idle", "properties": {"sessionID": "ses_1"}}, "bad_id"),
        ({"id": "", "type": "session.idle", "properties": {"sessionID": "ses_1"}}, "bad_id"),
        ({"id": "evt_1", "type": "session.idle", "properties": {"sessionID": 5}},
         "bad_session_id"),
        ({"id": "evt_1", "type": "session.idle", "properties": {"sessionID": ""}},
         "bad_session_id"),
    ],
)
def test_malformed_frames_raise_with_reason(frame: Any, reason: str) -> None:
    with pytest.raises(MalformedEvent) as caught:
        normalise(frame, **HOST)
    assert caught.value.reason == reason
    assert caught.value.detail


def test_bad_arguments_are_malformed_not_schema_invalid() -> None:
    frame = {"id": "evt_1", "type": "session.idle", "properties": {"sessionID": "ses_1"}}
    for kwargs in ({**HOST, "received_at_ms": -1}, {**HOST, "host": ""},
                   {**HOST, "source": "carrier-pigeon"}):
        with pytest.raises(MalformedEvent) as caught:
            normalise(frame, **kwargs)
        assert caught.value.reason == "bad_argument"


@settings(max_examples=150, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["id", "type", "properties", "payload", "sessionID", "info", "part",
                         "directory", "project"]), inner, max_size=4),
    max_leaves=12,
))
def test_normalise_never_fails_other_than_malformed(frame: Any) -> None:
    try:
        envelope = normalise(frame, **HOST)
    except MalformedEvent:
        return
    if envelope is not None:
        assert_valid(envelope)


# ---------------------------------------------------------------- filter


@pytest.mark.parametrize("event_type", [
    "message.part.delta", "message.part.updated", "message.part.removed", "server.heartbeat",
    "server.connected", "file.edited", "file.watcher.updated", "lsp.updated",
    "lsp.client.diagnostics", "todo.updated", "session.diff", "session.next.text.delta",
    "installation.updated", "catalog.updated", "pty.created", "tui.toast.show",
])
def test_default_filter_drops_noise(event_type: str) -> None:
    assert not EventFilter().keeps(event_type)


@pytest.mark.parametrize("event_type", [
    *sorted(REQUIRED_TYPES), "permission.asked", "session.deleted", "session.compacted",
    "message.removed", "some.future.event",
])
def test_default_filter_keeps_session_lifecycle_and_unknown_types(event_type: str) -> None:
    assert EventFilter().keeps(event_type)


def test_filter_configuration() -> None:
    assert EventFilter.from_config(None) == EventFilter()
    assert EventFilter.from_config(None).drop_types == DEFAULT_DROP_TYPES
    everything = EventFilter.from_config([])
    assert everything.keeps("message.part.delta")
    only_pty = EventFilter.from_config(["pty.*", "permission.asked"])
    assert not only_pty.keeps("pty.exited") and not only_pty.keeps("permission.asked")
    assert only_pty.keeps("message.part.delta")


@pytest.mark.parametrize("drop", [["session.*"], ["message.updated"], ["pipeline.*"]])
def test_filter_refuses_to_drop_what_ingest_needs(drop: list[str]) -> None:
    with pytest.raises(ValueError, match="ingest needs"):
        EventFilter.from_config(drop)


# ---------------------------------------------------------------- synthetic turn_ended


def _session_info() -> dict[str, Any]:
    created = next(f for f in frames("events") if f["type"] == "session.created")
    return created["properties"]["info"]


def test_turn_ended_envelope_is_valid_and_deterministic() -> None:
    messages = listing("tool-session")
    a = turn_ended(host="devbox", site_key="pk", session=_session_info(), messages=messages,
                   trigger="session.idle", received_at_ms=1)
    b = turn_ended(host="devbox", site_key="pk", session=_session_info(), messages=messages,
                   trigger="session.idle", received_at_ms=2)
    assert_valid(a)
    assert a["type"] == TURN_ENDED
    assert a["event_id"] == b["event_id"]
    assert a["event_id"].startswith("evt_syn_")
    assert a["session_id"] == TOOL_SESSION
    assert (a["directory"], a["project"]) == ("/home/dev/project", "global")
    assert a["properties"]["trigger"] == "session.idle"
    assert a["properties"]["messages"] == messages


def test_synthetic_ids_differ_by_host_session_trigger_and_last_message_state() -> None:
    messages = listing("tool-session")
    base = synthetic_event_id("h", "s", "session.idle", messages)
    assert synthetic_event_id("h2", "s", "session.idle", messages) != base
    assert synthetic_event_id("h", "s2", "session.idle", messages) != base
    assert synthetic_event_id("h", "s", "session.status", messages) != base
    assert synthetic_event_id("h", "s", "session.idle", messages[:-1]) != base
    # The same last message before it settled is a different event: it must not dedupe the
    # settled one away.
    unsettled = json.loads(json.dumps(messages))
    del unsettled[-1]["info"]["time"]["completed"]
    assert synthetic_event_id("h", "s", "session.idle", unsettled) != base


def test_turn_ended_refuses_bad_trigger_and_session() -> None:
    with pytest.raises(MalformedEvent):
        turn_ended(host="h", site_key="k", session=_session_info(), messages=[],
                   trigger="whenever", received_at_ms=1)  # type: ignore[arg-type]
    with pytest.raises(MalformedEvent) as caught:
        turn_ended(host="h", site_key="k", session={"title": "x"}, messages=[],
                   trigger="reconcile", received_at_ms=1)
    assert caught.value.reason == "bad_session_id"
