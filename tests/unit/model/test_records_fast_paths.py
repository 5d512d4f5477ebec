"""pipeline.model.records' accelerators (orjson, jsonschema-rs) against the stdlib paths they stand in
for: the same bytes written, the same values read, the same records refused, whichever runs."""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import pipeline.model.records as records
from pipeline.errors import RecordError, SchemaError
from tests.factory import snapshot

pytestmark = pytest.mark.skipif(records.orjson is None or records.jsonschema_rs is None,
                                reason="the accelerators are dependencies; this checks them against the stdlib")


class Sub(str):
    pass


SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**66), max_value=2**66)
           | st.floats() | st.text(alphabet=st.characters(exclude_categories=()), max_size=6)
           | st.just(Sub("sub")) | st.just((1, "tuple")))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=10)


def stdlib_encode(value: Any) -> bytes | type[Exception]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(records, "orjson", None)
        try:
            return records.encode(value)
        except (RecordError, ValueError, TypeError) as exc:
            return type(exc)


@settings(max_examples=400, deadline=None)
@given(VALUES)
@example({"f": 1e-05, "g": 1e16, "h": -0.0, "i": 2**64, "j": -(2**63) - 1})
@example({"nan": math.nan})
@example({"cut": "\ud83d"})
def test_encode_writes_what_json_writes(value: Any) -> None:
    try:
        fast: bytes | type[Exception] = records.encode(value)
    except (RecordError, ValueError, TypeError) as exc:
        fast = type(exc)
    assert fast == stdlib_encode(value)
    plain = records.is_plain_json(value)
    if plain:  # what the agent loop passes on when it has already asked
        assert records.encode(value, plain=True) == fast


@settings(max_examples=400, deadline=None)
@given(VALUES)
@example(["12345678901234567890123", 12345678901234567890123, 1e-05])
def test_decode_reads_what_json_reads(value: Any) -> None:
    text = stdlib_encode(value)
    if not isinstance(text, bytes):
        return
    raw = b'{"wrapped":' + text + b"}"
    fast = records._loads(raw, raw.decode("utf-8"))
    slow = json.loads(raw.decode("utf-8"))
    assert json.dumps(fast, sort_keys=True) == json.dumps(slow, sort_keys=True)


MUTATIONS: list[tuple[str, Any]] = [
    ("schema", "session.snapshot/2"), ("messages", "not a list"), ("messages", ()),
    ("host", 7), ("errors", [{"source": "nowhere"}]), ("emitted_at", -1), ("emitted_at", 1.5),
    ("emitted_at", True), ("session_id", ""), ("messages", [("tuple",)]),
]


@pytest.mark.parametrize(("field", "bad"), MUTATIONS)
def test_the_compiled_validator_refuses_what_jsonschema_refuses(field: str, bad: Any) -> None:
    record = snapshot(1)
    records.validate("snapshot.v2", record)  # the factory's record is valid on both paths
    record[field] = bad
    try:
        records.validator("snapshot.v2").validate(record)
        jsonschema_says = None
    except Exception as exc:  # jsonschema.ValidationError
        jsonschema_says = type(exc).__name__
    for plain in (False, records.is_plain_json(record)):
        with pytest.raises(SchemaError) if jsonschema_says else contextlib.nullcontext():
            records.validate("snapshot.v2", record, plain=plain)


def reference_plain(value: Any) -> bool:
    """is_plain_json's walk as it was before leaves were checked inline (issue 17)."""
    kind = type(value)
    if kind is dict:
        return all(type(k) is str and reference_plain(v) for k, v in value.items())
    if kind is list:
        return all(reference_plain(v) for v in value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return -(2**63) <= value <= 2**64 - 1
    if kind is float:
        return value == 0.0 or 1e-4 <= abs(value) < 1e16
    return False


class IntSub(int):
    pass


@settings(max_examples=600, deadline=None)
@given(VALUES | st.lists(SCALARS | st.just(IntSub(3)) | st.just(1.5e-5), max_size=40))
@example([1, 2**64, 3])
@example({"a": [0.0, -1e-4, 1e16], "b": {1: "non-str key"}})
@example({"a": [IntSub(1)]})
def test_the_plain_json_walk_answers_as_before(value: Any) -> None:
    assert records.is_plain_json(value) == reference_plain(value)


def stdlib_decode(raw: bytes, topic: str) -> Any:
    """records.decode's answer without orjson: the record, or the RecordError's kind, reason and text."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(records, "orjson", None)
        return answer_of(raw, topic)


def answer_of(raw: bytes, topic: str) -> Any:
    try:
        return json.dumps(records.decode(raw, topic), sort_keys=True)
    except RecordError as exc:
        return type(exc).__name__, exc.reason, exc.detail


BAD_UTF8 = [b"\xff", b"\x80", b"\xc3", b"\xc0\x80", b"\xc1\xbf", b"\xe2\x82", b"\xe0\x80\xaf", b"\xed\xa0\x80",
            b"\xed\xbf\xbf", b"\xf0\x9f\x98", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80"]


@st.composite
def record_bytes(draw: st.DrawFn) -> bytes:
    """A record's bytes as a stage reads them: JSON text (a valid event sometimes), maybe damaged
    by invalid UTF-8 (inside a string or outside any), cut short, or a BOM before it."""
    text = stdlib_encode(draw(VALUES))
    body = text if isinstance(text, bytes) else b"null"
    raw = draw(st.sampled_from([b'{"wrapped":' + body + b"}", body, encode_event(body)]))
    damage = draw(st.integers(0, 4))
    if damage == 0:
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from(BAD_UTF8)) + raw[at:]
    elif damage == 1:
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif damage == 2:
        raw = b"\xef\xbb\xbf" + raw
    return raw


def encode_event(value: bytes) -> bytes:
    """An opencode.events envelope carrying `value` in its properties (valid when that is an object)."""
    return (b'{"schema":"opencode.event/1","host":"h1","site_key":"pk_test_thirdparty","session_id":"ses_1",'
            b'"event_id":"evt_1","type":"session.status","received_at":1,"directory":null,"project":null,'
            b'"backfill":false,"source":"sse","properties":{"status":' + value + b"}}")


@settings(max_examples=500, deadline=None)
@given(record_bytes() | st.binary(max_size=64))
@example(b'{"a":1}\xff')
@example(b'{"a":"\xed\xa0\x80"}')
@example(b'{"a":"\\ud800"}')
@example(b'\xef\xbb\xbf{"a":1}')
@example(b'{"a":12345678901234567890123}')
@example(b'{"a":NaN}')
@example(b'{"a":1e400}')
@example(b'{"a":' * 1100 + b"1" + b"}" * 1100)
def test_decode_answers_what_the_stdlib_answers(raw: bytes) -> None:
    # orjson reads the bytes without the text being decoded first: a record json refuses must
    # still be refused, with json's reason and text (invalid_utf8 before invalid_json)
    for topic in ("opencode.events", "sessions.idle"):
        assert answer_of(raw, topic) == stdlib_decode(raw, topic)
