"""Turn detection on message listings (pipeline/collector/turns.py), on plain data."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.collector.turns import (
    already_reported,
    completed_turns,
    idle_trigger,
    message_digest,
    settled,
    turn_ends,
    unreported_ends,
)


def _msg(mid: str, role: str, *, completed: bool = True, finish: str | None = "stop",
         error: bool = False) -> dict[str, Any]:
    info: dict[str, Any] = {"id": mid, "role": role, "time": {"created": 1}}
    if role == "assistant":
        if completed:
            info["time"]["completed"] = 2
        if finish:
            info["finish"] = finish
        if error:
            info["error"] = {"name": "APIError", "data": {}}
    return {"info": info, "parts": []}


U1, A1, U2 = _msg("u1", "user"), _msg("a1", "assistant"), _msg("u2", "user")
A2_TOOLS = _msg("a2", "assistant", finish="tool-calls")
A2_RUNNING = _msg("a2", "assistant", completed=False, finish=None)
A2_FAILED = _msg("a2", "assistant", completed=False, finish=None, error=True)
A2 = _msg("a2", "assistant")


def test_completed_turns_ignore_a_turn_still_in_progress() -> None:
    assert completed_turns([U1, A1]) == [2]
    assert completed_turns([U1, A1, U2]) == [2]  # the next prompt was sent before the fetch
    assert completed_turns([U1, A1, U2, A2_RUNNING]) == [2]
    assert completed_turns([U1, A1, U2, A2_TOOLS]) == [2]  # more assistant messages will follow
    assert completed_turns([U1, A1, U2, A2_FAILED]) == [2, 4]
    assert completed_turns([U1, A2_TOOLS, _msg("a3", "assistant")]) == [3]
    assert completed_turns([U1]) == []


@pytest.mark.parametrize(("listing", "ends"), [
    ([U1, A1, U2, A2], [2, 4]),
    ([U1, A2_RUNNING], [2]),  # waiting for it to settle ran out: reported as it is
    ([U1, A1, U2, A2_RUNNING], [2]),  # an earlier turn completed: only that one
    ([U1], []),  # nothing has answered
    ([], []),
])
def test_turn_ends(listing: list[dict[str, Any]], ends: list[int]) -> None:
    assert turn_ends(listing) == ends


@pytest.mark.parametrize(("listing", "expected"), [
    ([U1, A1], True),
    ([U1, A1, U2], True),  # the last assistant message finished
    ([U1, A2_RUNNING], False),
    ([U1, A2_FAILED], True),
    ([U1], True),
])
def test_settled(listing: list[dict[str, Any]], expected: bool) -> None:
    assert settled(listing) is expected


def test_idle_trigger() -> None:
    def event(event_type: str, **properties: Any) -> dict[str, Any]:
        return {"type": event_type, "properties": properties}

    assert idle_trigger(event("session.idle")) == "session.idle"
    assert idle_trigger(event("session.status", status={"type": "idle"})) == "session.status"
    assert idle_trigger(event("session.status", status={"type": "busy"})) is None
    assert idle_trigger(event("session.updated")) is None


def test_unreported_ends_start_at_the_reported_turn() -> None:
    listing = [U1, A1, U2, A2]
    assert unreported_ends(listing, [2, 4], None) == [2, 4]  # never reported: every turn
    assert unreported_ends(listing, [2, 4], {"last_message_id": "a1"}) == [2, 4]
    assert unreported_ends(listing, [2, 4], {"last_message_id": "a2"}) == [4]
    # the reported message fell out of the listing window: every turn in it is a candidate
    assert unreported_ends(listing[2:], [2], {"last_message_id": "a1"}) == [2]


def test_already_reported_compares_the_final_message() -> None:
    digest = message_digest("h", "s", A2)
    reported = {"last_message_id": "a2", "last_message_digest": digest}
    assert already_reported(reported, A2, digest)
    late_update = message_digest("h", "s", A2_FAILED)
    assert not already_reported(reported, A2_FAILED, late_update)
    assert not already_reported(None, A2, digest)
    assert not already_reported({"last_message_id": "a1"}, A2, digest)
    # a state entry without a digest: the same final message counts as that turn
    assert already_reported({"last_message_id": "a2"}, A2_FAILED, late_update)
