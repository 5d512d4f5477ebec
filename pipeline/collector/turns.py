"""Turn detection on message listings: which frame says a turn ended, whether a fetched
listing has settled, where its turns end, and which of them were already reported.

Pure functions of the listings and of the per-session state (`HostState.sessions`), kept apart
from the host task's I/O so each rule is tested on plain data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.model.envelope import Source, Trigger
from pipeline.model.snapshot import snapshot_id


@dataclass(frozen=True)
class TurnRequest:
    """Why a session's messages are fetched: what said the turn ended (`trigger`), which path
    noticed it (`source`: the live stream, a reconnect's reconcile, or a poll), and whether the
    resulting turn_ended is a backfill of something that ended while disconnected."""

    trigger: Trigger
    source: Source
    backfill: bool


def idle_trigger(envelope: Mapping[str, Any]) -> Trigger | None:
    """The trigger if this normalised event says its session went idle (its turn ended)."""
    if envelope["type"] == "session.idle":
        return "session.idle"
    if envelope["type"] == "session.status":
        status = envelope["properties"].get("status")
        if isinstance(status, Mapping) and status.get("type") == "idle":
            return "session.status"
    return None


def settled(listing: Sequence[Mapping[str, Any]]) -> bool:
    """True when the last assistant message has finished (completed or failed), or there is none:
    its last update can land after the idle, so the host task fetches until this holds."""
    for message in reversed(listing):
        info = message.get("info") or {}
        if info.get("role") == "assistant":
            time_ = info.get("time") if isinstance(info.get("time"), Mapping) else {}
            return bool(time_.get("completed") or info.get("error"))
    return True


def _finished(info: Mapping[str, Any]) -> bool:
    """An assistant message that ends its turn: failed, or completed with a final finish reason
    (a completed message that stopped for tool calls is followed by another in the same turn)."""
    time_ = info.get("time") if isinstance(info.get("time"), Mapping) else {}
    return bool(info.get("error")) or (bool(time_.get("completed")) and info.get("finish") != "tool-calls")


def completed_turns(listing: Sequence[Mapping[str, Any]]) -> list[int]:
    """End indexes (exclusive) of every completed turn in a listing, oldest first.

    A turn is a user message and the assistant messages after it. It is complete when the next
    user message exists, or when its last assistant message finished. The idle of one turn can
    be fetched after the next prompt was already sent: the listing then ends in a turn still in
    progress, which must not be reported as (or hide) the turn that ended.
    """
    ends: list[int] = []
    roles = [(m.get("info") or {}).get("role") for m in listing]
    for i, message in enumerate(listing):
        if roles[i] != "assistant":
            continue
        next_role = roles[i + 1] if i + 1 < len(listing) else None
        if next_role == "user" or (next_role is None and _finished(message.get("info") or {})):
            ends.append(i + 1)
    return ends


def turn_ends(listing: Sequence[Mapping[str, Any]]) -> list[int]:
    """End indexes (exclusive) of the turns to report from a fetched listing: the completed
    ones; or, when none completed but the listing ends with an assistant message (waiting for it
    to settle ran out), the whole listing, reported as it is."""
    ends = completed_turns(listing)
    if not ends and listing and (listing[-1].get("info") or {}).get("role") == "assistant":
        ends = [len(listing)]
    return ends


def unreported_ends(listing: Sequence[Mapping[str, Any]], ends: Sequence[int],
                    previous: Mapping[str, Any] | None) -> list[int]:
    """Of `ends`, those after the last turn this collector reported (all of them if it never
    reported this session, or if that message fell out of the listing window), and the
    reported one itself, which `already_reported` tells apart from a late update."""
    last_id = previous.get("last_message_id") if previous else None
    ids = [message_id(m) for m in listing]
    if last_id is not None and last_id in ids:
        reported_end = ids.index(last_id) + 1
        return [e for e in ends if e >= reported_end]
    return list(ends)


def has_assistant(listing: Sequence[Mapping[str, Any]]) -> bool:
    return any((m.get("info") or {}).get("role") == "assistant" for m in listing)


def message_id(message: Mapping[str, Any]) -> Any:
    """A listing entry's message id (`info.id`)."""
    return (message.get("info") or {}).get("id")


def message_digest(host: str, session_id: str, message: Mapping[str, Any]) -> str:
    """What a turn's final message holds (completion, error, parts), hashed as snapshots are."""
    return snapshot_id(host, session_id, [message])


def already_reported(previous: Mapping[str, Any] | None, last_message: Mapping[str, Any],
                      digest: str) -> bool:
    """Whether the turn ending in `last_message` was reported as it is now.

    Decided by that message alone: the window of messages sent with a turn is cut from the
    listing, which starts later as the session grows, so its snapshot id changes although the
    turn did not. A late update (an unsettled turn that settled) changes the final message.
    """
    last_id = message_id(last_message)
    if previous is None or last_id is None or previous.get("last_message_id") != last_id:
        return False
    recorded = previous.get("last_message_digest")
    # A state file from before digests: the same final message is taken as that turn. A late
    # update to it goes unreported, once, rather than every long session's turn being re-sent.
    return recorded is None or recorded == digest


def updated_ms(session: Mapping[str, Any]) -> int | None:
    """A session's `time.updated` (epoch ms), if it has a valid one."""
    time_ = session.get("time")
    value = time_.get("updated") if isinstance(time_, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None
