"""Record encoding, schema validation and dead letters: the one helper stages and tests use."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from pipeline.errors import RecordError, SchemaError
from pipeline.topics import TOPICS

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
MAX_RECORD_BYTES = 8 * 1024 * 1024


@functools.cache
def validator(schema: str) -> Draft202012Validator:
    path = SCHEMA_DIR / f"{schema}.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(doc)
    return Draft202012Validator(doc)


def validate(schema: str, record: Any) -> None:
    """Raise SchemaError with the first violation's path and message."""
    errors = sorted(validator(schema).iter_errors(record), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        raise SchemaError(schema, f"at {where}: {err.message[:300]}")


def validate_for_topic(topic: str, record: Any) -> None:
    validate(TOPICS[topic].schema, record)


def encode(record: Any) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")


def decode(raw: bytes | str | None, topic: str) -> dict[str, Any]:
    """Bytes from `topic` -> a schema-valid record, or RecordError saying why not."""
    if raw is None:
        raise RecordError("empty_value", "record has no value")
    if isinstance(raw, bytes) and len(raw) > MAX_RECORD_BYTES:
        raise RecordError("too_large", f"{len(raw)} bytes > {MAX_RECORD_BYTES}")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise RecordError("invalid_utf8", str(exc)) from None
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise RecordError("invalid_json", str(exc)[:200]) from None
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"top level is {type(record).__name__}")
    validate_for_topic(topic, record)
    return record


def now_ms() -> int:
    return int(time.time() * 1000)


def dead_letter(*, stage: str, source_topic: str, raw: bytes | None, reason: str, error: str,
                key: bytes | str | None = None, partition: int | None = None, offset: int | None = None,
                redrive_topic: str | None = None, detail: dict[str, Any] | None = None,
                at: int | None = None) -> dict[str, Any]:
    """A dead-letter record holding the original bytes, byte for byte, and why it failed.

    Its id is derived from where the record came from (or its bytes), so dead-lettering the
    same record twice after a crash is recognisable as one.
    """
    raw = raw or b""
    origin = f"{source_topic}:{partition}:{offset}" if offset is not None else hashlib.sha256(raw).hexdigest()
    if isinstance(key, bytes):
        key = key.decode("utf-8", errors="replace")
    record = {
        "schema": "dead.letter/1",
        "dead_id": "dl_" + hashlib.sha256(f"{stage}|{origin}".encode()).hexdigest()[:24],
        "stage": stage,
        "source_topic": source_topic,
        "source_partition": partition,
        "source_offset": offset,
        "key": key,
        "reason": reason,
        "error": error[:2000],
        "original_b64": base64.b64encode(raw).decode("ascii"),
        "redrive_topic": redrive_topic or source_topic,
        "detail": detail or {},
        "at": at if at is not None else now_ms(),
    }
    validate("dead-letter.v1", record)
    return record


def original_bytes(dead: dict[str, Any]) -> bytes:
    return base64.b64decode(dead["original_b64"])
