"""Ingest's pure logic: per-session state from envelopes, one snapshot per ended turn.

`apply_event(state, envelope, ...)` is the reducer the ingest agent folds each envelope of a
session through (state in a faust table, keyed `host:session_id`). It returns the new state
and what to do: `Emit(snapshot)` for a `pipeline.turn_ended` whose content was not emitted
before, `Skip(reason)` for a duplicate, nothing for events that only update state.

Two kinds of repetition are expected and absorbed here:
- the same envelope twice (a collector resend, a redelivery after a rebalance): by event id;
- the same turn ending twice (`session.idle` and `session.status: idle` both fire, sometimes
  twice each; a reconcile after a reconnect re-reads a turn already reported): by snapshot
  id, which is a hash of the turn's final content.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.model.envelope import TURN_ENDED, MalformedEvent
from pipeline.model.prompt import turn_agent_id, turn_prompt_ref
from pipeline.model.records import PLAIN_INT_MAX, PLAIN_INT_MIN, is_plain_json, plain_json_bytes

try:
    import orjson
except ImportError:  # pragma: no cover - optional accelerator (a dependency; see records)
    orjson = None

__all__ = [
    "DEFAULT_MAX_SEEN_EVENTS",
    "SNAPSHOT_SCHEMA",
    "Action",
    "Emit",
    "SessionState",
    "Skip",
    "apply_event",
    "build_snapshot",
    "describe_error",
    "error_markers",
    "snapshot_id",
]

SNAPSHOT_SCHEMA = "session.snapshot/2"
# Duplicates arrive close together (a resend, a replay from the last committed offset), so a
# window of recent ids is enough; it also bounds the state written to the changelog per event.
DEFAULT_MAX_SEEN_EVENTS = 256
MAX_SESSION_ERRORS = 20
MAX_RECENT_SNAPSHOTS = 16
DETAIL_MAX_CHARS = 2000
# How deep a snapshot's messages may nest. records.decode reads ~1000 levels, but every later
# step that walks a record recursively (json.dumps when the snapshot is written, the trace
# builder, jsonschema) needs a frame or more per level on a stack that is not empty: half that
# leaves them room. Real listings nest about ten levels.
MAX_NESTING = 500


@dataclass
class SessionState:
    """What ingest remembers about one session between envelopes. JSON via to_dict/from_dict."""

    title: str | None = None
    project_id: str | None = None
    directory: str | None = None
    # session.error events seen since the last emitted snapshot: {event_id, name, detail}
    session_errors: list[dict[str, Any]] = field(default_factory=list)
    seen_event_ids: list[str] = field(default_factory=list)  # oldest first, bounded
    # Several, not only the last: a reconcile can re-send an older turn after a newer one.
    snapshot_ids: list[str] = field(default_factory=list)  # oldest first, bounded

    @property
    def last_snapshot_id(self) -> str | None:
        return self.snapshot_ids[-1] if self.snapshot_ids else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "project_id": self.project_id,
            "directory": self.directory,
            "session_errors": [dict(e) for e in self.session_errors],
            "seen_event_ids": list(self.seen_event_ids),
            "snapshot_ids": list(self.snapshot_ids),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SessionState:
        """Tolerant of missing keys, so state written by an older version still loads."""
        data = data or {}
        return cls(
            title=data.get("title"),
            project_id=data.get("project_id"),
            directory=data.get("directory"),
            session_errors=[dict(e) for e in data.get("session_errors") or []],
            seen_event_ids=list(data.get("seen_event_ids") or []),
            snapshot_ids=list(data.get("snapshot_ids") or []),
        )

    def copy(self) -> SessionState:
        return SessionState.from_dict(self.to_dict())


@dataclass(frozen=True)
class Emit:
    snapshot: dict[str, Any]


@dataclass(frozen=True)
class Skip:
    reason: str  # duplicate_event | repeated_snapshot


Action = Emit | Skip


# ---------------------------------------------------------------- errors


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def describe_error(error: Any) -> tuple[str, str]:
    """(name, detail) of an opencode error object `{name, data}` (or anything else)."""
    if isinstance(error, str):
        return "Error", error[:DETAIL_MAX_CHARS]
    if not _is_mapping(error):
        return "UnknownError", ""
    name = _text(error.get("name")) or "UnknownError"
    data = error.get("data")
    detail = ""
    if _is_mapping(data):
        message = data.get("message")
        if isinstance(message, str):
            detail = message
            status = data.get("statusCode")
            if isinstance(status, int) and not isinstance(status, bool):
                detail = f"{message} (status {status})"
        else:
            try:
                detail = json.dumps(data, sort_keys=True, default=str)
            except RecursionError:
                raise _too_deep("the error's data") from None
    elif data is not None:
        detail = str(data)
    return name, detail[:DETAIL_MAX_CHARS]


def error_markers(messages: Sequence[Mapping[str, Any]],
                  session_errors: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """Every error in a turn, in listing order, then the session's own errors.

    An assistant message's `info.error` is a message marker; a tool part in state `error`
    (or carrying `state.error`) is a tool marker; `session.error` events are session markers.
    A session error usually repeats the assistant message's; both are kept because they come
    from different places and the sampler only asks whether any exist.
    """
    markers: list[dict[str, Any]] = []
    for message in messages:
        info = message.get("info") or {}
        message_id = info.get("id")
        if info.get("role") == "assistant" and info.get("error"):
            name, detail = describe_error(info["error"])
            markers.append({"source": "message", "message_id": message_id, "part_id": None,
                            "name": name, "detail": detail})
        for part in message.get("parts") or []:
            if not (type(part) is dict or _is_mapping(part)) or part.get("type") != "tool":
                continue
            state = part.get("state")
            if not _is_mapping(state):
                continue
            if state.get("status") == "error" or state.get("error"):
                error = state.get("error")
                text = error if isinstance(error, str) else describe_error(error)[1]
                tool = _text(part.get("tool")) or "tool"
                markers.append({"source": "tool", "message_id": message_id,
                                "part_id": _text(part.get("id")), "name": "ToolError",
                                "detail": f"{tool}: {text}"[:DETAIL_MAX_CHARS]})
    seen: set[tuple[str, str]] = set()
    for error in session_errors:
        key = (str(error.get("name")), str(error.get("detail")))
        if key in seen:
            continue
        seen.add(key)
        markers.append({"source": "session", "message_id": None, "part_id": None,
                        "name": key[0], "detail": key[1]})
    return markers


# ---------------------------------------------------------------- snapshot


def _is_mapping(value: Any) -> bool:
    # decoded JSON is all dicts, and absent fields None: both answered without the ABC's
    # ~1 us isinstance check (the hottest loops also inline `type(value) is dict` before the call)
    return type(value) is dict or (value is not None and isinstance(value, Mapping))


def _too_deep(what: str) -> MalformedEvent:
    return MalformedEvent("too_deeply_nested", f"{what} nests more than {MAX_NESTING} levels deep")


def _nests_deeper_than(value: Any, limit: int) -> bool:
    """True when dicts and lists nest more than `limit` levels inside `value`. Iterative: a
    recursive walk would fail on the very input it looks for."""
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Mapping):
            children: Any = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        if depth >= limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, Mapping | list | tuple))
    return False


def _check_nesting(kept: list[dict[str, Any]]) -> None:
    """MalformedEvent (too_deeply_nested) for messages nesting past MAX_NESTING."""
    if orjson is not None:
        try:
            orjson.dumps(kept)
            return  # orjson writes at most 254 levels: well inside the bound, no walk needed
        except TypeError:  # JSONEncodeError: too deep, or a value orjson refuses; walk to know
            pass
    if _nests_deeper_than(kept, MAX_NESTING):
        raise _too_deep("a message")


def _check_listing(messages: Any) -> list[Mapping[str, Any]]:
    """The listing in the daemon's `[{info, parts}]` shape, or MalformedEvent saying where not."""
    if not isinstance(messages, list):
        raise MalformedEvent("bad_messages", f"messages is {type(messages).__name__}")
    for i, message in enumerate(messages):
        info = message.get("info") if type(message) is dict or _is_mapping(message) else None
        if type(info) is not dict and not _is_mapping(info):
            raise MalformedEvent("bad_messages", f"messages[{i}] has no info object")
        ident, role = info.get("id"), info.get("role")
        if not isinstance(ident, str) or not ident or len(ident) > 512:
            raise MalformedEvent("bad_messages", f"messages[{i}].info.id is {ident!r:.80}")
        if not isinstance(role, str) or not role:
            raise MalformedEvent("bad_messages", f"messages[{i}].info.role is {role!r:.80}")
        parts = message.get("parts")
        if not isinstance(parts, list) or not _typed_parts(parts):
            raise MalformedEvent("bad_messages",
                                 f"messages[{i}].parts is not a list of typed parts")
    return messages


def _typed_parts(parts: list[Any]) -> bool:
    """Every part a mapping with a str `type`. A loop rather than all(<generator>): it runs for
    every part of every listing, and decoded parts are dicts whose type is a str, answered by
    two identity checks before the general ones."""
    for part in parts:
        if type(part) is dict:
            kind = part.get("type")
            if type(kind) is str or isinstance(kind, str):
                continue
            return False
        if not (_is_mapping(part) and isinstance(part.get("type"), str)):
            return False
    return True


def snapshot_id(host: str, session_id: str, messages: Sequence[Mapping[str, Any]]) -> str:
    """`snp_<32 hex>`, equal for equal final states of a turn.

    Hashes what identifies the turn's content (message ids and roles, completion and error,
    and each part's id, type, tool status and text) and nothing that changes on a re-read,
    so the same turn read twice gets the same id, and any later turn a different one.
    """
    shape: list[Any] = []
    # is_plain_json(the shape), found out while building it: its leaves are nearly always str,
    # None or a timestamp (checked inline), anything else is asked of is_plain_json itself; so
    # the answer is the walk's without walking the shape a second time
    plain = _plain_leaves(host, session_id)
    for message in messages:
        if type(message) is dict or _is_mapping(message):
            info, raw_parts = message.get("info"), message.get("parts")
        else:
            info = raw_parts = None
        if type(info) is not dict and not _is_mapping(info):
            info = {}
        time = info.get("time")
        if type(time) is not dict and not _is_mapping(time):
            time = {}
        error = info.get("error")
        parts = []
        for part in raw_parts if isinstance(raw_parts, list) else []:
            if type(part) is not dict and not _is_mapping(part):
                continue
            state = part.get("state")
            status = state.get("status") if type(state) is dict or _is_mapping(state) else None
            part_id, kind, text = part.get("id"), part.get("type"), part.get("text")
            if plain and not (type(part_id) is str and type(kind) is str and (status is None or type(status) is str)
                              and (text is None or type(text) is str)):
                plain = _plain_leaves(part_id, kind, status, text)
            parts.append([part_id, kind, status, text])
        message_id, role, completed = info.get("id"), info.get("role"), time.get("completed")
        name = describe_error(error)[0] if error else None
        if plain and not (type(message_id) is str and type(role) is str and (completed is None or (
                type(completed) is int and PLAIN_INT_MIN <= completed <= PLAIN_INT_MAX))
                          and (name is None or type(name) is str)):
            plain = _plain_leaves(message_id, role, completed, name)
        shape.append([message_id, role, completed, name, parts])
    material = _shape_bytes([host, session_id, shape], plain=plain)
    return "snp_" + hashlib.sha256(material).hexdigest()[:32]


def _plain_leaves(*values: Any) -> bool:
    """is_plain_json of each value (the leaves of a snapshot id's shape)."""
    for value in values:
        if value is None or type(value) is str:
            continue
        if not is_plain_json(value):
            return False
    return True


def _shape_bytes(shape: list[Any], *, plain: bool | None = None) -> bytes:
    """The hashed text. For plain JSON (records.is_plain_json; `plain`: known to the caller)
    orjson writes exactly what json.dumps does (tests/unit/model/test_snapshot.py checks every
    code point outside the surrogates) in a fraction of the time; anything else, and a lone
    surrogate orjson refuses, goes through json: ids must not change with the path taken."""
    fast = plain_json_bytes(shape, sort_keys=True, plain=plain)
    if fast is not None:
        return fast
    text = json.dumps(shape, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return text.encode("utf-8", "surrogatepass")


def _turn_ended_at(messages: Sequence[Mapping[str, Any]], fallback: int) -> int:
    """When the last assistant message finished; the envelope's arrival when unknown."""
    for message in reversed(messages):
        info = message.get("info") or {}
        time = info.get("time") if _is_mapping(info.get("time")) else {}
        if info.get("role") == "assistant":
            completed = time.get("completed")
            if isinstance(completed, int) and not isinstance(completed, bool) and completed >= 0:
                return completed
            break
    return fallback


def build_snapshot(envelope: Mapping[str, Any], state: SessionState, *, max_messages: int,
                   now_ms: int, prompt_key: bytes | None = None) -> dict[str, Any]:
    """A `session.snapshot/2` record from a `pipeline.turn_ended` envelope and session state.

    The session info fetched at idle wins over what the state learned from earlier events;
    those only fill what it lacks. `prompt_ref` is taken from the whole listing (a long turn's
    prompt may be older than the last `max_messages`), keyed by `prompt_key` (model/prompt.py).
    """
    if max_messages < 1:
        raise ValueError(f"max_messages must be >= 1, got {max_messages}")
    properties = envelope.get("properties")
    if not _is_mapping(properties):
        raise MalformedEvent("bad_properties", "turn_ended has no properties object")
    session = properties.get("session") if _is_mapping(properties.get("session")) else {}
    listing = _check_listing(properties.get("messages"))
    kept = [{"info": m["info"], "parts": m["parts"]} for m in listing[-max_messages:]]
    _check_nesting(kept)
    host, session_id = envelope["host"], envelope["session_id"]
    project_id = (_text(session.get("projectID")) or state.project_id or _text(envelope.get("project")))
    return {
        "schema": SNAPSHOT_SCHEMA,
        "snapshot_id": snapshot_id(host, session_id, kept),
        "host": host,
        "site_key": envelope["site_key"],
        "session_id": session_id,
        "project_id": project_id,
        "directory": (_text(session.get("directory")) or state.directory
                      or _text(envelope.get("directory"))),
        "title": _text(session.get("title")) or state.title,
        "turn_ended_at": _turn_ended_at(kept, envelope["received_at"]),
        "emitted_at": now_ms,
        "backfill": bool(envelope.get("backfill")),
        "messages": kept,
        "error_markers": error_markers(kept, state.session_errors),
        "prompt_ref": turn_prompt_ref(listing, project_id, prompt_key),
        "agent_id": turn_agent_id(kept),
    }


# ---------------------------------------------------------------- reducer


def _bounded_append(items: list[Any], item: Any, bound: int) -> list[Any]:
    items = [*items, item]
    return items[-bound:] if len(items) > bound else items


def apply_event(state: SessionState | Mapping[str, Any] | None, envelope: Mapping[str, Any], *,
                max_messages: int, now_ms: int, max_seen: int = DEFAULT_MAX_SEEN_EVENTS,
                prompt_key: bytes | None = None) -> tuple[SessionState, list[Action]]:
    """Fold one envelope into a session's state. Never mutates `state`.

    Returns the new state and the actions: `[Emit(snapshot)]` for a new turn's end,
    `[Skip(reason)]` for a repeat, `[]` for events that only update the state.
    Raises MalformedEvent for a turn_ended whose listing is not in the daemon's shape, and
    (reason too_deeply_nested) for content nesting deeper than MAX_NESTING.
    """
    current = state.copy() if isinstance(state, SessionState) else SessionState.from_dict(state)
    event_id, event_type = envelope.get("event_id"), envelope.get("type")
    if not isinstance(event_id, str) or not isinstance(event_type, str):
        raise MalformedEvent("bad_envelope", "envelope lacks event_id or type")
    if event_id in current.seen_event_ids:
        return current, [Skip("duplicate_event")]
    current.seen_event_ids = _bounded_append(current.seen_event_ids, event_id, max_seen)
    properties = envelope.get("properties")
    properties = properties if _is_mapping(properties) else {}

    # Envelope-level location is a fallback for sessions whose session.* events were missed.
    current.directory = current.directory or _text(envelope.get("directory"))
    current.project_id = current.project_id or _text(envelope.get("project"))

    if event_type in ("session.created", "session.updated"):
        info = properties.get("info") if _is_mapping(properties.get("info")) else {}
        current.title = _text(info.get("title")) or current.title
        current.project_id = _text(info.get("projectID")) or current.project_id
        current.directory = _text(info.get("directory")) or current.directory
    elif event_type == "session.error":
        name, detail = describe_error(properties.get("error"))
        current.session_errors = _bounded_append(
            current.session_errors, {"event_id": event_id, "name": name, "detail": detail},
            MAX_SESSION_ERRORS)
    elif event_type == TURN_ENDED:
        snapshot = build_snapshot(envelope, current, max_messages=max_messages, now_ms=now_ms,
                                  prompt_key=prompt_key)
        if snapshot["snapshot_id"] in current.snapshot_ids:
            return current, [Skip("repeated_snapshot")]
        current.snapshot_ids = _bounded_append(
            current.snapshot_ids, snapshot["snapshot_id"], MAX_RECENT_SNAPSHOTS)
        current.session_errors = []
        current.title = snapshot["title"]
        current.project_id = snapshot["project_id"]
        current.directory = snapshot["directory"]
        return current, [Emit(snapshot)]
    return current, []
