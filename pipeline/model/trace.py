"""The panel's message shape, the trace id and the `traces.sampled` record.

One panel message per opencode message, with the role the daemon gave it (`info.role`: the
reference forwarder read `m.role`, found nothing and called everything `assistant`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from pipeline.errors import RecordError
from pipeline.model.prompt import agent_id, turn_agent_id, turn_start

TRACE_SCHEMA = "trace.sampled/2"
TRACE_ID_PREFIX = "tr_oc_"


class _Decision(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


# json.dumps(..., ensure_ascii=False) builds this encoder on every call; built once here (the
# same settings, so the same text)
_ID_ENCODER = json.JSONEncoder(ensure_ascii=False)
# what that encoder writes each str with (json.encoder's choice: the C one where there is one)
_ENCODE_STR = json.encoder.encode_basestring


def trace_id(host: str, session_id: str, last_message_id: str) -> str:
    """`tr_oc_<32 hex>` from the turn's identity, so a retry, a replay or a second
    `session.idle` for the same turn upserts the same panel trace instead of adding one."""
    try:
        return _remembered_trace_id(host, session_id, last_message_id)
    except TypeError:  # an unhashable argument: not from a record
        return _trace_id(host, session_id, last_message_id)


def _trace_id(host: str, session_id: str, last_message_id: str) -> str:
    if type(host) is str and type(session_id) is str and type(last_message_id) is str:
        # the encoder's text for a list of three str, written directly: each str as it writes
        # one, separated by its default ", " (tests/unit/model/test_trace_shape.py)
        material = f"[{_ENCODE_STR(host)}, {_ENCODE_STR(session_id)}, {_ENCODE_STR(last_message_id)}]"
    else:
        material = _ID_ENCODER.encode([host, session_id, last_message_id])
    return TRACE_ID_PREFIX + hashlib.sha256(material.encode("utf-8", "surrogatepass")).hexdigest()[:32]


# the sample stage asks for a turn's id twice (its pair window entry, then its trace)
_remembered_trace_id = functools.lru_cache(maxsize=1024, typed=True)(_trace_id)


def visible_text(part: Mapping[str, Any]) -> str | None:
    """The text of a part a rater should read as what the user or the model said, else None.

    Skipped: `reasoning` parts (the model's hidden thinking, not its answer, and often larger
    than it), `synthetic` text parts (written by opencode itself, such as the contents of an
    attached file or a "continue" after compaction; its own UI hides them) and `ignored` ones
    (left out of the conversation the model saw)."""
    if part.get("type") != "text" or part.get("synthetic") or part.get("ignored"):
        return None
    text = part.get("text")
    return text if isinstance(text, str) else None


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def tool_call(part: Mapping[str, Any]) -> dict[str, Any]:
    """A tool part as the panel's step-validity unit reads it."""
    state = part.get("state")
    if type(state) is not dict and not isinstance(state, Mapping):
        state = {}
    status = state.get("status")
    error = state.get("error")
    return {
        "name": str(part.get("tool") or "unknown"),
        "status": status if isinstance(status, str) else "unknown",
        "error": _as_text(error) if error not in (None, "") else None,
        "input": state.get("input", {}),
        "output": _as_text(state.get("output")),
        "call_id": part.get("callID") if isinstance(part.get("callID"), str) else None,
    }


def panel_messages(snapshot_messages: Sequence[Mapping[str, Any]], max_messages: int,
                   *, session_id: str | None = None, prompt_ref: str | None = None) -> list[dict[str, Any]]:
    """The last `max_messages` opencode messages (`[{info, parts}]`) in the panel's shape.

    `idx` counts from 0 within the trace. `session_id` is only a fallback for messages whose
    `info.sessionID` is missing. A missing role is never guessed: RecordError (dead letter).
    Every message carries its `agent_id`; the messages of the last turn (from its prompt on)
    carry the turn's `prompt_ref`, earlier turns' messages none (their own traces carry theirs)."""
    start = len(snapshot_messages) - max_messages
    kept = snapshot_messages[max(0, start):] if max_messages > 0 else []
    turn_from = turn_start(kept) or 0
    out: list[dict[str, Any]] = []
    for idx, message in enumerate(kept):
        info = message.get("info") or {}
        role, message_id = info.get("role"), info.get("id")
        if not isinstance(role, str) or not role:
            raise RecordError("bad_messages", f"message {message_id!r} has no info.role")
        if not isinstance(message_id, str) or not message_id:
            raise RecordError("bad_messages", f"message at {idx} has no info.id")
        own = info.get("sessionID")
        sid = own if isinstance(own, str) and 0 < len(own) <= 512 else session_id
        if not sid:
            raise RecordError("bad_messages", f"message {message_id} has no info.sessionID")
        # the visible texts (visible_text) and the tool calls, each in part order, in one pass
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for part in message.get("parts") or []:
            if type(part) is not dict and not isinstance(part, Mapping):
                continue
            kind = part.get("type")
            if kind == "text":
                if not part.get("synthetic") and not part.get("ignored"):
                    text = part.get("text")
                    if isinstance(text, str):
                        texts.append(text)
            elif kind == "tool":
                calls.append(tool_call(part))
        out.append({
            "role": role,
            "content": "\n".join(texts),
            "id": message_id,
            "session_id": sid,
            "idx": idx,
            "tool_calls": calls,
            "agent_id": agent_id(info),
            "prompt_ref": prompt_ref if idx >= turn_from else None,
        })
    return out


def sampled_trace(snapshot: Mapping[str, Any], decision: _Decision | Mapping[str, Any],
                  max_messages: int, now_ms: int) -> dict[str, Any]:
    """A `trace.sampled/2` record (schemas/trace-sampled.v2.json) for a forwarded snapshot (a
    `session.snapshot/1` from before prompt_refs has none: it never pairs)."""
    messages = snapshot["messages"]
    ref = snapshot.get("prompt_ref")
    last_id = messages[-1]["info"]["id"] if messages else ""
    return {
        "schema": TRACE_SCHEMA,
        "trace_id": trace_id(snapshot["host"], snapshot["session_id"], last_id),
        "snapshot_id": snapshot["snapshot_id"],
        "host": snapshot["host"],
        "site_key": snapshot["site_key"],
        "session_id": snapshot["session_id"],
        "project_id": snapshot.get("project_id"),
        "directory": snapshot.get("directory"),
        "title": snapshot.get("title"),
        "messages": panel_messages(messages, max_messages, session_id=snapshot["session_id"], prompt_ref=ref),
        "prompt_ref": ref,
        "agent_id": snapshot["agent_id"] if "agent_id" in snapshot else turn_agent_id(messages),
        "decision": dict(decision) if isinstance(decision, Mapping) else decision.to_dict(),
        "sampled_at": now_ms,
    }
