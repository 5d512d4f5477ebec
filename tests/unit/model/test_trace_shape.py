"""The panel's message shape, on the messages opencode 1.18.33 really returned."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from pipeline.errors import RecordError
from pipeline.model.trace import panel_messages, sampled_trace, trace_id
from pipeline.sampling import Decision, session_tokens
from tests.fixtures import OPENCODE, REPO

REFERENCE = OPENCODE
SCHEMA = json.loads((REPO / "schemas" / "trace-sampled.v2.json").read_text())
VALIDATOR = Draft202012Validator(SCHEMA)


def listing(name: str) -> list[dict[str, Any]]:
    return json.loads((REFERENCE / f"opencode-1.18.33-messages-{name}-session.json").read_text())


def snapshot_of(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"schema": "session.snapshot/1", "snapshot_id": "snp_" + "ab" * 16, "host": "host-a",
            "site_key": "pk_test_thirdparty", "session_id": messages[0]["info"]["sessionID"],
            "project_id": "prj", "directory": "/home/dev/project", "title": "t",
            "turn_ended_at": 1, "emitted_at": 2, "backfill": False, "messages": messages,
            "error_markers": []}


def test_roles_are_the_daemons_own() -> None:
    roles = [m["role"] for m in panel_messages(listing("tool"), 25)]
    assert roles == ["user", "assistant", "assistant"]
    assert [m["role"] for m in panel_messages(listing("error"), 25)] == ["user", "assistant"]


def test_tool_session_shape() -> None:
    messages = panel_messages(listing("tool"), 25)
    assert [m["idx"] for m in messages] == [0, 1, 2]
    assert messages[0]["content"] == "list the files and fix the bug"
    assert messages[0]["tool_calls"] == []
    assert messages[1]["content"] == "Let me look around."
    assert messages[1]["session_id"] == "ses_e038a9defffeKV8LTT3N7zqfNy"
    assert messages[1]["id"] == "msg_1fc7562c0001RRzfNxGGROVf4z"
    (call,) = messages[1]["tool_calls"]
    assert call["name"] == "bash" and call["status"] == "completed" and call["error"] is None
    assert call["call_id"] == "call_1"
    assert call["input"] == {"command": "ls -la && cat nonexistent.txt",
                             "description": "List files"}
    assert call["output"].startswith("total 16") and "No such file" in call["output"]
    assert messages[2]["content"].startswith("Done.")


def test_error_session_shape() -> None:
    user, assistant = panel_messages(listing("error"), 25)
    assert user["content"] == "please FAIL now"
    assert assistant["role"] == "assistant" and assistant["content"] == ""
    assert assistant["tool_calls"] == []


def test_failed_tool_call_carries_status_and_error() -> None:
    part = {"id": "prt_1", "type": "tool", "tool": "read", "callID": "c9",
            "state": {"status": "error", "input": {"filePath": "x"}, "error": "File not found: x",
                      "time": {"start": 1, "end": 2}}}
    message = {"info": {"id": "msg_1", "sessionID": "ses_1", "role": "assistant"}, "parts": [part]}
    (call,) = panel_messages([message], 25)[0]["tool_calls"]
    assert call == {"name": "read", "status": "error", "error": "File not found: x",
                    "input": {"filePath": "x"}, "output": None, "call_id": "c9"}


def test_content_joins_visible_text_parts_only() -> None:
    parts = [{"type": "text", "text": "first"}, {"type": "reasoning", "text": "hidden thoughts"},
             {"type": "text", "text": "from a file", "synthetic": True},
             {"type": "text", "text": "dropped", "ignored": True}, {"type": "step-start"},
             {"type": "text", "text": "second"}]
    message = {"info": {"id": "msg_1", "sessionID": "ses_1", "role": "assistant"}, "parts": parts}
    assert panel_messages([message], 25)[0]["content"] == "first\nsecond"
    # The novelty tokens are computable from the trace too, and agree.
    assert session_tokens([message]) == {"first", "second"}


def test_cap_keeps_the_last_messages_and_counts_from_zero() -> None:
    messages = listing("tool")
    capped = panel_messages(messages, 2)
    assert [m["id"] for m in capped] == [m["info"]["id"] for m in messages[-2:]]
    assert [m["idx"] for m in capped] == [0, 1]
    assert panel_messages(messages, 0) == []


def test_role_is_never_guessed() -> None:
    roleless = {"info": {"id": "msg_1", "sessionID": "ses_1"}, "role": "user", "parts": []}
    with pytest.raises(RecordError, match=r"info\.role"):
        panel_messages([roleless], 25)


@pytest.mark.parametrize("name", ["tool", "error"])
@pytest.mark.parametrize("reason", ["error_flag", "novelty", "sample", "baseline"])
def test_sampled_trace_is_schema_valid(name: str, reason: str) -> None:
    decision = Decision(forward=reason != "baseline", reason=reason,  # type: ignore[arg-type]
                        novelty=0.9 if reason != "error_flag" else None, rate=0.05, detail="x")
    record = sampled_trace(snapshot_of(listing(name)), decision, 25, now_ms=1_795_236_914_500)
    VALIDATOR.validate(record)
    assert record["decision"]["reason"] == reason


def test_trace_id_is_stable_and_content_derived() -> None:
    tid = trace_id("host-a", "ses_1", "msg_9")
    assert re.fullmatch(r"tr_oc_[0-9a-f]{32}", tid)
    assert tid == trace_id("host-a", "ses_1", "msg_9")
    assert len({tid, trace_id("host-b", "ses_1", "msg_9"), trace_id("host-a", "ses_2", "msg_9"),
                trace_id("host-a", "ses_1", "msg_10")}) == 4
    snapshot = snapshot_of(listing("tool"))
    decision = Decision(forward=True, reason="sample", rate=0.05)
    first = sampled_trace(snapshot, decision, 25, now_ms=1)
    retry = sampled_trace(snapshot, decision, 25, now_ms=999_999)
    assert first["trace_id"] == retry["trace_id"] == trace_id(
        "host-a", snapshot["session_id"], "msg_1fc756325001Ki0RvDfn3O2B1c")


class _Str(str):
    pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(codec=None, exclude_categories=())), min_size=3, max_size=3),
       st.booleans())
@example(["a\"\\\n\x00\u2028\ud800\U0001f600", "\x7f\u00e9", ""], False)
def test_a_trace_id_is_the_sha256_of_the_json_it_always_hashed(parts: list[str], subclass: bool) -> None:
    # the JSON of the three str is written directly (str only); json.dumps is what it replaces
    host, session_id, last_id = (_Str(p) for p in parts) if subclass else parts
    material = json.dumps([host, session_id, last_id], ensure_ascii=False).encode("utf-8", "surrogatepass")
    assert trace_id(host, session_id, last_id) == "tr_oc_" + hashlib.sha256(material).hexdigest()[:32]
