"""Dead letters without a broker: where a redrive goes (the topic table, never the letter), what
`dead list` shows, and the letter written again with less of its original."""

from __future__ import annotations

import base64
import json

import pytest

from agents.runtime import Encoded, _shrunk
from pipeline.kafka.deadletters import DeadLetter, _unfit, redrive_target, shown
from pipeline.model.records import dead_letter, encode, validate
from pipeline.topics import STAGES, TOPICS, dead_letter_topics
from tests.factory import turn_ended_envelope


def _letter(raw: bytes, redrive_topic: str = "traces.outbox") -> DeadLetter:
    record = dead_letter(stage="scrub", source_topic="traces.sampled", raw=raw, reason="x", error="x",
                         redrive_topic=redrive_topic)
    return DeadLetter("scrub.dead", 0, 0, record)


def test_every_stage_dead_letter_topic_redrives_to_the_stage_input_whatever_a_letter_says() -> None:
    for stage in STAGES.values():
        if stage.name != "deliver":
            assert redrive_target(stage.dead) == stage.input
    assert redrive_target("traces.dead") == "traces.signed"  # back through the breaker
    assert redrive_target("collector.dead") is None  # raw frames: nothing reads them again
    assert set(dead_letter_topics()) == {n for n, t in TOPICS.items() if t.schema == "dead-letter.v1"}


def test_nothing_before_the_scrub_stage_is_redriven_past_it() -> None:
    order = ["opencode.events", "sessions.idle", "traces.sampled", "traces.scrubbed"]
    for name in ("ingest.dead", "sample.dead", "scrub.dead", "passthrough.dead"):
        assert order.index(redrive_target(name) or "") <= order.index("traces.sampled")


def test_a_letter_whose_original_does_not_fit_its_target_is_refused() -> None:
    envelope = encode(turn_ended_envelope(1))
    assert _unfit(_letter(envelope), "opencode.events") is None
    assert _unfit(_letter(envelope), "traces.sampled") == "schema_invalid"
    assert _unfit(_letter(b"not json"), "traces.sampled") == "invalid_json"


def test_dead_list_shows_original_bytes_only_when_asked() -> None:
    letter = _letter(b"password=hunter2")
    plain = shown(letter, original=False)
    assert "original_b64" not in plain and "hunter2" not in json.dumps(plain)
    assert plain["original_bytes"] == len(b"password=hunter2")
    assert shown(letter, original=True)["original"] == "password=hunter2"


@pytest.mark.parametrize("keep", [64 * 1024, 10, 0])
def test_a_shrunk_letter_keeps_why_and_where_and_says_it_was_cut(keep: int) -> None:
    raw = b"x" * 100_000
    letter = dead_letter(stage="deliver", source_topic="traces.outbox", raw=raw, reason="panel_400", error="e",
                         key="tr_1", partition=2, offset=7, detail={"http_status": 400})
    smaller = _shrunk(Encoded("traces.dead", b"tr_1", encode(letter)), keep)
    record = json.loads(smaller.data)
    validate("dead-letter.v1", record)
    assert base64.b64decode(record["original_b64"]) == raw[:keep]
    assert record["detail"] == {"http_status": 400, "original_truncated": True, "original_bytes": len(raw)}
    assert {k: record[k] for k in ("dead_id", "reason", "source_offset")} == \
        {k: letter[k] for k in ("dead_id", "reason", "source_offset")}
    again = json.loads(_shrunk(smaller, 0).data)
    assert again["detail"]["original_bytes"] == len(raw)  # the first size, not the cut one's

