from __future__ import annotations

import json

import pytest

from pipeline.errors import RecordError, SchemaError
from pipeline.model import records
from pipeline.model.records import SCHEMA_DIR
from pipeline.topics import STAGES, TOPICS
from tests.fixtures import OPENCODE


def test_every_topic_has_a_valid_schema_and_every_schema_is_used() -> None:
    used = {s for t in TOPICS.values() for s in t.schemas}
    files = {p.stem for p in SCHEMA_DIR.glob("*.json")}
    assert used == files
    for name in files:
        records.validator(name)  # raises on an invalid schema document


def test_stages_read_and_write_declared_topics() -> None:
    for stage in STAGES.values():
        assert stage.input in TOPICS and stage.dead in TOPICS
        assert all(o in TOPICS for o in stage.outputs)
    assert len({s.app_id for s in STAGES.values()}) == len(STAGES)


def test_decode_routes_every_kind_of_garbage_to_a_reason() -> None:
    cases = {b"\xff\xfe": "invalid_utf8", b"{": "invalid_json", b"[1]": "not_an_object",
             b'{"schema": "opencode.event/1"}': "schema_invalid"}
    for raw, reason in cases.items():
        with pytest.raises(RecordError) as err:
            records.decode(raw, "opencode.events")
        assert err.value.reason == reason
    with pytest.raises(RecordError):
        records.decode(None, "opencode.events")


def test_dead_letter_keeps_the_original_bytes() -> None:
    raw = b"\xff not utf8 \x00"
    dl = records.dead_letter(stage="ingest", source_topic="opencode.events", raw=raw, reason="invalid_utf8",
                             error="bad", key=b"h:s", partition=1, offset=7)
    assert records.original_bytes(dl) == raw
    assert dl["redrive_topic"] == "opencode.events"
    again = records.dead_letter(stage="ingest", source_topic="opencode.events", raw=raw, reason="x",
                                error="y", partition=1, offset=7)
    assert again["dead_id"] == dl["dead_id"]


def test_validate_names_the_path() -> None:
    with pytest.raises(SchemaError) as err:
        records.validate("outcome.v1", {"schema": "delivery.outcome/1"})
    assert "outcome.v1" in str(err.value)


def test_reference_event_fields_fit_the_envelope() -> None:
    ref = OPENCODE / "opencode-1.18.33-events.ndjson"
    first = json.loads(ref.read_text().splitlines()[1])
    env = {"schema": "opencode.event/1", "host": "a", "site_key": "k", "session_id": first["properties"]["sessionID"],
           "event_id": first["id"], "type": first["type"], "received_at": 1, "directory": None, "project": None,
           "backfill": False, "source": "sse", "properties": first["properties"]}
    records.validate("event.v1", env)
