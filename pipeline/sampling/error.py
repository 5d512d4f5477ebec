"""error_flag: forward every turn that went wrong.

Errors are read where the daemon puts them: `info.error` on an assistant message (the
reference forwarder read `m.error` and so missed every one), a tool part whose
`state.status` is `error` or that carries `state.error`, and `session.error` events the
collector recorded as `error_markers` with source `session`. Message and tool markers are
not consulted: they are derived from the same messages, which stay the authority.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.sampling.base import Decision

DEFAULT_MAX_MESSAGES = 25


def _present(value: Any) -> bool:
    # The reference tests these fields for JavaScript truthiness: null, false, 0 and "" are
    # no error, while any object or array (even an empty one) is.
    if isinstance(value, str | bool | int | float):
        return bool(value)
    return value is not None


def _describe(error: Any) -> str:
    if isinstance(error, str):
        return error
    if isinstance(error, Mapping):
        name = error.get("name") if isinstance(error.get("name"), str) else "Error"
        data = error.get("data")
        message = data.get("message") if isinstance(data, Mapping) else None
        return f"{name}: {message}" if isinstance(message, str) and message else name
    return json.dumps(error, sort_keys=True, default=str)


def find_errors(snapshot: Mapping[str, Any], max_messages: int = DEFAULT_MAX_MESSAGES) -> list[str]:
    """One line per error in the turn, in listing order, then the session's own errors.

    Only the last `max_messages` messages count: those are the ones the trace shows a rater,
    and an error the rater cannot see is no reason to send them the trace.
    """
    found: list[str] = []
    messages: Sequence[Mapping[str, Any]] = snapshot.get("messages") or []
    kept = messages[max(0, len(messages) - max_messages):]
    # `type(x) is dict or isinstance(x, Mapping)`: a decoded record's dicts skip the ABC check,
    # and `_present` is not called for the usual absent (None) error; the same tests otherwise
    for message in kept:
        info = message.get("info") or {}
        if info.get("role") == "assistant":
            error = info.get("error")
            if error is not None and _present(error):
                found.append(f"message {info.get('id')}: {_describe(info['error'])}")
        for part in message.get("parts") or []:
            if (type(part) is not dict and not isinstance(part, Mapping)) or part.get("type") != "tool":
                continue
            state = part.get("state")
            if type(state) is not dict and not isinstance(state, Mapping):
                continue
            error = state.get("error")
            present = error is not None and _present(error)
            if present or state.get("status") == "error":
                text = _describe(error) if present else "status error"
                found.append(f"tool {part.get('tool')} ({part.get('id')}): {text}")
    for marker in snapshot.get("error_markers") or []:
        if isinstance(marker, Mapping) and marker.get("source") == "session":
            found.append(f"session: {marker.get('name')}: {marker.get('detail')}")
    return found


class ErrorFlag:
    name = "error_flag"

    def __init__(self, max_messages: int = DEFAULT_MAX_MESSAGES) -> None:
        if not isinstance(max_messages, int) or max_messages < 1:
            raise ValueError(f"max_messages must be a positive integer, got {max_messages!r}")
        self.max_messages = max_messages

    def evaluate(self, snapshot: Mapping[str, Any]) -> Decision | None:
        found = find_errors(snapshot, self.max_messages)
        if not found:
            return None
        more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
        return Decision(forward=True, reason="error_flag", detail=found[0] + more)
