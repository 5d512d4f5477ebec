"""opencode SSE frames -> the `opencode.event/1` envelope (schemas/event.v1.json).

Pure: no I/O, no clock. Both stream shapes are accepted:

- `/event`:        `{id, type, properties}`
- `/global/event`: `{directory, project, payload: {id, type, properties}}`; the first frame
  (`server.connected`) has only `payload`, and every bus event is followed by a
  `payload.type == "sync"` copy of itself, which is skipped here so nothing is produced twice.

`normalise` returns None for what has no place on a session-keyed topic (no session id:
`server.connected`, heartbeats, catalog and installation events, sync copies). Which of the
remaining types are worth producing is `EventFilter`'s decision, kept apart so an operator can
widen or narrow it without touching the parser.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.errors import RecordError

__all__ = [
    "DEFAULT_DROP_TYPES",
    "ENVELOPE_SCHEMA",
    "REQUIRED_TYPES",
    "TURN_ENDED",
    "EventFilter",
    "MalformedEvent",
    "Source",
    "Trigger",
    "normalise",
    "session_id_of",
    "synthetic_event_id",
    "turn_ended",
]

ENVELOPE_SCHEMA = "opencode.event/1"
TURN_ENDED = "pipeline.turn_ended"

Source = Literal["sse", "reconcile", "poll", "plugin"]
Trigger = Literal["session.idle", "session.status", "reconcile"]
SOURCES: frozenset[str] = frozenset({"sse", "reconcile", "poll", "plugin"})
TRIGGERS: frozenset[str] = frozenset({"session.idle", "session.status", "reconcile"})

# Bounds from event.v1.json, checked here so a bad frame fails as a MalformedEvent with a
# reason instead of as a schema error further down.
_MAX_ID = 512
_MAX_TYPE = 200

# What ingest builds its per-session state and snapshots from; a filter may not drop these.
REQUIRED_TYPES: frozenset[str] = frozenset({
    "session.created", "session.updated", "session.status", "session.idle", "session.error",
    "message.updated", TURN_ENDED,
})

# Types nothing downstream reads. The streaming part events are most of a turn's frames
# (every token is a message.part.delta) and the snapshot comes from the authoritative message
# listing at idle, so producing them would only cost broker bandwidth. `x.*` drops a family.
DEFAULT_DROP_TYPES: frozenset[str] = frozenset({
    "message.part.*",        # .delta, .updated, .removed
    "session.next.*",        # the newer streaming event family: deltas of the same parts
    "session.diff",
    "server.*",              # server.connected, server.heartbeat, server.instance.disposed
    "todo.updated",
    "file.*",                # file.edited, file.watcher.updated
    "lsp.*",
    "pty.*",
    "tui.*",
    "mcp.*",
    "installation.*",
    "integration.*",
    "project.*",
    "vcs.*",
    "workspace.*",
    "worktree.*",
    "catalog.updated",
    "models-dev.refreshed",
    "plugin.added",
    "reference.updated",
    "global.disposed",
    "command.executed",
})


class MalformedEvent(RecordError):
    """A frame that is JSON but not an opencode event. `reason` is a machine code:

    not_an_object, bad_payload, missing_type, bad_type, bad_properties, missing_id, bad_id,
    bad_session_id, bad_directory, bad_argument; from ingest's reducer also bad_envelope and
    bad_messages (a turn_ended listing not in the daemon's `[{info, parts}]` shape).
    """


@dataclass(frozen=True)
class EventFilter:
    """Which event types are produced. Entries are exact types or `family.*` prefixes."""

    drop_types: frozenset[str] = DEFAULT_DROP_TYPES

    def __post_init__(self) -> None:
        blocked = sorted(t for t in REQUIRED_TYPES if self._matches(t))
        if blocked:
            raise ValueError(
                f"drop_event_types would drop {', '.join(blocked)}, which ingest needs "
                "to build snapshots; remove the entries that match them"
            )

    @classmethod
    def from_config(cls, drop_types: Iterable[str] | None) -> EventFilter:
        """None keeps the default list; a list (even empty) replaces it."""
        return cls() if drop_types is None else cls(frozenset(drop_types))

    def _matches(self, event_type: str) -> bool:
        if event_type in self.drop_types:
            return True
        # Walk the dotted prefixes: "message.part.delta" checks "message.*", "message.part.*".
        head = event_type
        while "." in head:
            head = head.rsplit(".", 1)[0]
            if f"{head}.*" in self.drop_types:
                return True
        return False

    def keeps(self, event_type: str) -> bool:
        return not self._matches(event_type)


def _unwrap(frame: Any) -> tuple[Mapping[str, Any], str | None, str | None]:
    """(payload, directory, project) of either stream shape."""
    if not isinstance(frame, Mapping):
        raise MalformedEvent("not_an_object", f"frame is {type(frame).__name__}")
    if "payload" in frame and "type" not in frame:
        payload = frame["payload"]
        if not isinstance(payload, Mapping):
            raise MalformedEvent("bad_payload", f"payload is {type(payload).__name__}")
        directory, project = frame.get("directory"), frame.get("project")
        for name, value in (("directory", directory), ("project", project)):
            if value is not None and not isinstance(value, str):
                raise MalformedEvent("bad_directory", f"{name} is {type(value).__name__}")
        return payload, directory, project
    return frame, None, None


def _get(mapping: Any, key: str) -> Any:
    return mapping.get(key) if isinstance(mapping, Mapping) else None


def session_id_of(event_type: str, properties: Mapping[str, Any]) -> str | None:
    """The session an event belongs to, or None.

    Looked up where opencode puts it: `sessionID` on most events, `info.sessionID` on
    message.updated, `part.sessionID` on part events, and `info.id` on session.* events whose
    info is the session itself.
    """
    candidates = [
        properties.get("sessionID"),
        _get(properties.get("info"), "sessionID"),
        _get(properties.get("part"), "sessionID"),
    ]
    if event_type.startswith("session."):
        candidates.append(_get(properties.get("info"), "id"))
    for value in candidates:
        if value is None:
            continue
        if not isinstance(value, str) or not value or len(value) > _MAX_ID:
            raise MalformedEvent("bad_session_id",
                                 f"session id {str(value)[:80]!r} on {event_type}")
        return value
    return None


def normalise(
    frame: Any,
    *,
    host: str,
    site_key: str,
    received_at_ms: int,
    source: Source = "sse",
    backfill: bool = False,
    directory: str | None = None,
    project: str | None = None,
) -> dict[str, Any] | None:
    """One parsed SSE frame -> an envelope, None when it has no session, or MalformedEvent.

    `directory`/`project` are what the caller knows (the `?directory=` it subscribed with);
    a /global/event wrapper's own values win, and session events fall back to their info.
    `properties` is copied one level deep only: the nested values are the frame's, which the
    caller serialises straight away.
    """
    if source not in SOURCES:
        raise MalformedEvent("bad_argument", f"source {source!r}")
    payload, frame_dir, frame_project = _unwrap(frame)
    event_type = payload.get("type")
    if event_type is None:
        raise MalformedEvent("missing_type", "frame has no type")
    if not isinstance(event_type, str) or not event_type or len(event_type) > _MAX_TYPE:
        raise MalformedEvent("bad_type", f"type {str(event_type)[:80]!r}")
    if event_type == "sync":
        return None
    properties = payload.get("properties", {})
    if not isinstance(properties, Mapping):
        raise MalformedEvent("bad_properties", f"properties is {type(properties).__name__}")
    session_id = session_id_of(event_type, properties)
    if session_id is None:
        return None
    # Checked only for events that will be produced, so an id-less heartbeat from some
    # daemon version is passed over instead of filling the dead-letter topic.
    event_id = payload.get("id")
    if event_id is None:
        raise MalformedEvent("missing_id", f"{event_type} frame has no id")
    if not isinstance(event_id, str) or not event_id or len(event_id) > _MAX_ID:
        raise MalformedEvent("bad_id", f"id {str(event_id)[:80]!r}")

    info = properties.get("info") if event_type.startswith("session.") else None
    directory = frame_dir or directory or _opt_str(_get(info, "directory"))
    project = frame_project or project or _opt_str(_get(info, "projectID"))
    return _envelope(
        host=host, site_key=site_key, session_id=session_id, event_id=event_id,
        event_type=event_type, received_at_ms=received_at_ms, directory=directory,
        project=project, backfill=backfill, source=source, properties=dict(properties),
    )


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _envelope(*, host: str, site_key: str, session_id: str, event_id: str, event_type: str,
              received_at_ms: int, directory: str | None, project: str | None, backfill: bool,
              source: str, properties: dict[str, Any]) -> dict[str, Any]:
    for name, value in (("host", host), ("site_key", site_key)):
        if not isinstance(value, str) or not value or len(value) > _MAX_ID:
            raise MalformedEvent("bad_argument", f"{name} must be a non-empty string")
    if not isinstance(received_at_ms, int) or isinstance(received_at_ms, bool) \
            or received_at_ms < 0:
        raise MalformedEvent("bad_argument", f"received_at_ms {received_at_ms!r}")
    return {
        "schema": ENVELOPE_SCHEMA,
        "host": host,
        "site_key": site_key,
        "session_id": session_id,
        "event_id": event_id,
        "type": event_type,
        "received_at": received_at_ms,
        "directory": directory,
        "project": project,
        "backfill": bool(backfill),
        "source": source,
        "properties": properties,
    }


def _last_message_marker(messages: Sequence[Any]) -> str:
    """Id of the last message plus whether it has finished, for synthetic event ids."""
    if not messages:
        return ""
    info = _get(messages[-1], "info")
    if not isinstance(info, Mapping):
        return ""
    error = _get(info.get("error"), "name")
    completed = _get(info.get("time"), "completed")
    return f"{info.get('id')}|{completed}|{error}"


def synthetic_event_id(host: str, session_id: str, trigger: str, messages: Sequence[Any]) -> str:
    """Deterministic id for a turn_ended, so re-emitting the same turn dedupes on event id.

    It covers the last message's completion and error as well as its id: a turn re-fetched
    after it settled (the last `message.updated` can land after `session.idle`) must not be
    dropped as a duplicate of the earlier, unsettled fetch.
    """
    material = "\x00".join([host, session_id, trigger, _last_message_marker(messages)])
    return "evt_syn_" + hashlib.sha256(material.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def turn_ended(
    *,
    host: str,
    site_key: str,
    session: Mapping[str, Any],
    messages: Sequence[Mapping[str, Any]],
    trigger: Trigger,
    received_at_ms: int,
    source: Source = "sse",
    backfill: bool = False,
) -> dict[str, Any]:
    """The synthetic `pipeline.turn_ended` envelope for a fetched session and its listing."""
    if trigger not in TRIGGERS:
        raise MalformedEvent("bad_argument", f"trigger {trigger!r}")
    if source not in SOURCES:
        raise MalformedEvent("bad_argument", f"source {source!r}")
    session_id = session.get("id")
    if not isinstance(session_id, str) or not session_id or len(session_id) > _MAX_ID:
        raise MalformedEvent("bad_session_id", f"session info id {str(session_id)[:80]!r}")
    return _envelope(
        host=host, site_key=site_key, session_id=session_id,
        event_id=synthetic_event_id(host, session_id, trigger, messages),
        event_type=TURN_ENDED, received_at_ms=received_at_ms,
        directory=_opt_str(session.get("directory")), project=_opt_str(session.get("projectID")),
        backfill=backfill, source=source,
        properties={"session": dict(session), "messages": list(messages), "trigger": trigger},
    )
