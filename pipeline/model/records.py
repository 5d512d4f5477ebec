"""Record encoding, schema validation and dead letters: the one helper stages and tests use.

Two compiled libraries make the common case fast without changing any answer:
- jsonschema-rs says "valid"; a record it refuses or cannot read is decided by jsonschema,
  so what is valid stays jsonschema's (the error text is
  worded from jsonschema's first error without the record's values: see _validate).
- orjson parses and writes JSON; it is used only where it gives exactly what the
  json module gives (no integer beyond 64 bits in the text it parses; only plain JSON values,
  floats outside the exponent range excepted, in what it writes: see is_plain_json), and json
  does everything else, errors included.
Both are dependencies; without them (an install that left them out) every record takes the json/jsonschema path.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

try:
    import jsonschema_rs
except ImportError:  # pragma: no cover - optional accelerator
    jsonschema_rs = None
try:
    import orjson
except ImportError:  # pragma: no cover - optional accelerator
    orjson = None

from pipeline.errors import RecordError, SchemaError
from pipeline.topics import TOPICS

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"  # in the package (a link to schemas/ in a checkout)
MAX_RECORD_BYTES = 8 * 1024 * 1024
# orjson reads an integer beyond 64 bits as a float (json: exactly); 19 digits in a row anywhere
# in the text (in a string too: a false alarm only costs speed) leave it to json. (translate +
# find: ~20 us for 20 KB, where a regex takes ~500 us)
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_DIGIT_RUN = b"0" * 19
# the ints orjson writes (json writes any): is_plain_json's bounds
PLAIN_INT_MIN, PLAIN_INT_MAX = -(2**63), 2**64 - 1


@functools.cache
def validator(schema: str) -> Draft202012Validator:
    path = SCHEMA_DIR / f"{schema}.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(doc)
    return Draft202012Validator(doc)


@functools.cache
def _fast_validator(schema: str) -> tuple[Callable[[Any], bool], Callable[[Any], bool]] | None:
    """(is_valid of the compiled validator, its tuple guard), or None without jsonschema-rs."""
    if jsonschema_rs is None:
        return None
    doc = json.loads((SCHEMA_DIR / f"{schema}.json").read_text(encoding="utf-8"))
    # the draft from "$schema" (2020-12, as jsonschema's Draft202012Validator)
    return jsonschema_rs.validator_for(doc).is_valid, _tuple_guard(doc) or _always


def _always(value: Any) -> bool:
    return True


# Keywords the tuple guard understands; a schema using any other gets the whole-value walk.
_GUARD_KEYWORDS = frozenset({
    "$schema", "$id", "title", "description", "type", "properties", "items", "additionalProperties", "required",
    "const", "enum", "pattern", "minLength", "maxLength", "minimum", "maximum", "contentEncoding",
})


def _tuple_guard(node: Any) -> Callable[[Any], bool] | None:
    """jsonschema counts only a list as an array, the compiled validator a tuple as well: so a
    tuple where a schema asks for an array is the one value the compiled validator accepts and
    jsonschema refuses. This returns a check, walking only where `node` looks at arrays, that
    no tuple is there (None: nowhere to look). Records from json.loads never hold tuples."""
    if not isinstance(node, dict):
        return None
    if set(node) - _GUARD_KEYWORDS or any(isinstance(c, dict | list) for c in [node.get("const"),
                                                                              *node.get("enum", [])]):
        return _only_lists
    checks: list[Callable[[Any], bool]] = []
    kind = node.get("type")
    if kind == "array" or (isinstance(kind, list) and "array" in kind):
        checks.append(lambda v: not isinstance(v, tuple))
    items = _tuple_guard(node.get("items"))
    if items is not None:
        checks.append(lambda v: not isinstance(v, list) or all(items(x) for x in v))
    props = node.get("properties") or {}
    guarded = {k: g for k, sub in props.items() if (g := _tuple_guard(sub)) is not None}
    if guarded:
        checks.append(lambda v: not isinstance(v, dict) or all(k not in v or g(v[k]) for k, g in guarded.items()))
    extra = _tuple_guard(node.get("additionalProperties"))
    if extra is not None:
        checks.append(lambda v: not isinstance(v, dict) or all(extra(x) for k, x in v.items() if k not in props))
    if not checks:
        return None
    return checks[0] if len(checks) == 1 else lambda v: all(check(v) for check in checks)


def _only_lists(value: Any) -> bool:
    """No tuple anywhere inside `value` (the fallback guard for schemas it cannot follow)."""
    if isinstance(value, tuple):
        return False
    if isinstance(value, dict | list):
        return all(_only_lists(v) for v in (value.values() if isinstance(value, dict) else value))
    return True


def _surely_valid(schema: str, record: Any, *, from_json: bool) -> bool:
    """True when the compiled validator accepts the record (and, for a record neither from
    json.loads nor known to be plain JSON, no tuple stands where an array is asked for).
    Anything it rejects or cannot read goes to jsonschema, which decides and words the error,
    so what is valid and every error message stay exactly jsonschema's."""
    fast = _fast_validator(schema)
    if fast is None:
        return False
    is_valid, no_tuples = fast
    try:
        return bool(is_valid(record)) and (from_json or no_tuples(record))
    except Exception:  # a value it cannot convert (a lone surrogate, a non-str key, ...), or too deep
        return False


def validate(schema: str, record: Any, *, plain: bool = False) -> None:
    """Raise SchemaError with the first violation's path and message. `plain`: the caller found
    is_plain_json(record) true (so no tuple in it), which spares the compiled path a walk."""
    _validate(schema, record, from_json=plain)


def _validate(schema: str, record: Any, *, from_json: bool) -> None:
    """SchemaError naming where the first violation is, the keyword that failed, what the
    schema expected and the JSON type found: never the value, nor a property name the record
    made up (jsonschema's own message quotes both, and this text lands in dead letters)."""
    if _surely_valid(schema, record, from_json=from_json):
        return
    errors = sorted(validator(schema).iter_errors(record), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        # a path step is shown when it is an index or the schema names it (after "properties")
        named = {str(step) for keyword, step in pairwise(err.absolute_schema_path) if keyword == "properties"}
        where = "/".join(str(p) if isinstance(p, int) or p in named else "*" for p in err.absolute_path)
        what = _violation(err.validator, err.validator_value, err.instance, err.schema)
        raise SchemaError(schema, f"at {where or '(root)'}: {what}"[:400])


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                       (dict, "object"), (list, "array")):
        if isinstance(value, kind):
            return name
    return type(value).__name__  # not JSON at all (a tuple, a set): the Python type says why


def _violation(keyword: str, expected: Any, instance: Any, node: Any) -> str:
    """What failed, worded from the schema (`expected`: the keyword's value there) and the
    instance's JSON type only."""
    if keyword == "type":
        kinds = " or ".join(expected) if isinstance(expected, list) else str(expected)
        return f"expected type {kinds}, got {_json_type(instance)}"
    if keyword == "required":
        missing = [n for n in expected if isinstance(instance, dict) and n not in instance]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return f"missing required property {missing[0]!r}{more}" if missing else "missing a required property"
    if keyword == "additionalProperties":
        known = (node.get("properties") or {}) if isinstance(node, dict) else {}
        extra = sum(1 for k in instance if k not in known) if isinstance(instance, dict) else 0
        return f"unexpected additional properties ({extra})"
    if keyword == "enum":
        return "value not in the allowed enum"
    if keyword == "const":
        return f"value is not the constant {json.dumps(expected)[:100]}"
    bounds = {"minLength": "string shorter than", "maxLength": "string longer than",
              "minItems": "array shorter than", "maxItems": "array longer than",
              "minimum": "number below", "maximum": "number above",
              "exclusiveMinimum": "number not above", "exclusiveMaximum": "number not below"}
    if keyword in bounds:
        return f"{bounds[keyword]} {keyword} {expected}"
    if keyword == "pattern":
        return f"string does not match pattern {str(expected)[:100]}"
    return f"failed {keyword} (a {_json_type(instance)})"


@functools.cache
def _schema_named(topic: str) -> dict[str, str]:
    """The topic's schemas by the `schema` value their records carry (the `const` of their
    `schema` property)."""
    named: dict[str, str] = {}
    for schema in TOPICS[topic].schemas:
        doc = json.loads((SCHEMA_DIR / f"{schema}.json").read_text(encoding="utf-8"))
        const = (doc.get("properties", {}).get("schema") or {}).get("const")
        if isinstance(const, str):
            named[const] = schema
    return named


def schema_of(topic: str, record: Any) -> str:
    """The schema a record of `topic` is checked against: the one its `schema` value names among
    those the topic reads (an older version still on the broker), else the one written today."""
    spec = TOPICS[topic]
    if spec.reads and isinstance(record, dict) and isinstance(record.get("schema"), str):
        found = _schema_named(topic).get(record["schema"])
        if found is not None:
            return found
    return spec.schema


def validate_for_topic(topic: str, record: Any, *, plain: bool = False) -> None:
    validate(schema_of(topic, record), record, plain=plain)


def is_plain_json(value: Any) -> bool:
    """True when `value` holds nothing but dicts with str keys, lists, str, bool, None, ints
    within 64 bits and floats that repr writes without an exponent (0 or 1e-4 <= |x| < 1e16; so
    not NaN or infinite), all of exactly those types (no subclass, no tuple): what orjson
    writes byte for byte as `json.dumps(..., ensure_ascii=False, separators=(",", ":"),
    sort_keys=True)` does. Anything else (or nesting too deep to walk) is False."""
    try:
        return _plain(value)
    except RecursionError:
        return False


def _plain(value: Any) -> bool:
    # leaves are checked inline, containers by recursion: one call per container rather than one
    # per leaf (a 128-value signature, a message's fields)
    kind = type(value)
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                return False
            t = type(item)
            if t is str or t is bool or item is None:
                continue
            if t is dict or t is list:
                if not _plain(item):
                    return False
            elif t is int:  # timestamps, token counts: as common in records as containers
                if not PLAIN_INT_MIN <= item <= PLAIN_INT_MAX:
                    return False
            elif not _plain_leaf(item):
                return False
        return True
    if kind is list:
        for item in value:
            t = type(item)
            if t is str or t is bool or item is None:
                continue
            if t is dict or t is list:
                if not _plain(item):
                    return False
            elif t is int:
                if not PLAIN_INT_MIN <= item <= PLAIN_INT_MAX:
                    return False
            elif not _plain_leaf(item):
                return False
        return True
    return kind is str or kind is bool or value is None or _plain_leaf(value)


def _plain_leaf(value: Any) -> bool:
    """An int within 64 bits or a float repr writes without an exponent (exactly those types)."""
    kind = type(value)
    if kind is int:
        return PLAIN_INT_MIN <= value <= PLAIN_INT_MAX
    if kind is float:
        return value == 0.0 or 1e-4 <= abs(value) < 1e16
    return False


def plain_json_bytes(value: Any, *, sort_keys: bool, plain: bool | None = None) -> bytes | None:
    """orjson's compact text of `value` when that is byte for byte what
    `json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys)` writes
    (plain JSON: is_plain_json, known to the caller as `plain` or found out here); None when the
    caller must ask json (not plain, a lone surrogate, nesting deeper than orjson goes)."""
    if orjson is None or not (is_plain_json(value) if plain is None else plain):
        return None
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else 0)
    except orjson.JSONEncodeError:
        return None


def encode(record: Any, *, plain: bool | None = None) -> bytes:
    """Compact, sorted-key, non-ASCII-preserving JSON. `plain`: is_plain_json(record), when the
    caller already knows it (None: found out here)."""
    fast = plain_json_bytes(record, sort_keys=True, plain=plain)
    if fast is not None:
        return fast
    try:
        text = json.dumps(record, ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except ValueError as exc:  # NaN / Infinity: not JSON, and the panel body could not be signed
        raise RecordError("non_finite_number", str(exc)[:200]) from None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (text cut mid-emoji): escaped, still valid JSON
        return json.dumps(record, ensure_ascii=True, separators=(",", ":"), sort_keys=True).encode("ascii")


_NOT_PARSED = object()  # _parsed_bytes: orjson did not read it (None is a JSON value)


def _loads(raw: bytes | str, text: str) -> Any:
    """json.loads(text); `raw`: the same as valid UTF-8 bytes (orjson reads those directly)."""
    if isinstance(raw, bytes):
        parsed = _parsed_bytes(raw)
        if parsed is not _NOT_PARSED:
            return parsed
    return _json_loads(text)


def _json_loads(text: str) -> Any:
    """json's reading of a record's text: NaN, Infinity and floats beyond range refused."""
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)


def _parsed_bytes(raw: bytes) -> Any:
    """orjson's reading of `raw` when it is exactly json.loads(raw.decode("utf-8"))'s, else
    _NOT_PARSED (the caller decodes the text and asks json, which decides, errors included).
    orjson refuses whatever is not valid UTF-8 (surrogates included), as the strict decode
    does, so bytes it reads would have decoded: the text is needed only when it refuses."""
    if orjson is None or _DIGIT_RUN in raw.translate(_DIGITS_AS_ZERO):
        return _NOT_PARSED
    try:
        return orjson.loads(raw)
    except ValueError:  # not UTF-8, NaN, 1e400, a lone surrogate escape, too deep, not JSON
        return _NOT_PARSED


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN / Infinity: valid Python, refused by signing


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} overflows a float")
    return value


def decode(raw: bytes | str | None, topic: str) -> dict[str, Any]:
    """Bytes from `topic` -> a schema-valid record, or RecordError saying why not."""
    if raw is None:
        raise RecordError("empty_value", "record has no value")
    if isinstance(raw, bytes) and len(raw) > MAX_RECORD_BYTES:
        raise RecordError("too_large", f"{len(raw)} bytes > {MAX_RECORD_BYTES}")
    record = _parsed_bytes(raw) if isinstance(raw, bytes) else _NOT_PARSED
    if record is _NOT_PARSED:
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as exc:
            raise RecordError("invalid_utf8", str(exc)) from None
        try:
            record = _json_loads(text)
        except (ValueError, RecursionError) as exc:  # ValueError: also > 4300-digit integers, NaN
            raise RecordError("invalid_json", str(exc)[:200]) from None
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"top level is {type(record).__name__}")
    _validate(schema_of(topic, record), record, from_json=True)
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


_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def compact_json(value: Any, *, sort_keys: bool = False) -> str:
    """JSON text as JavaScript's JSON.stringify writes it (for strings, ints, objects, arrays).

    Python and JS agree on compact separators, raw non-ASCII and control-character escapes;
    they differ on lone surrogates, which JS escapes as `\\udXXX` and Python would leave raw
    (unencodable as UTF-8). Hashes the scrubber computes in Node must match ours.
    """
    fast = plain_json_bytes(value, sort_keys=sort_keys)  # json's bytes, a fraction of its time
    if fast is not None:
        return fast.decode("utf-8")
    text = json.dumps(
        value, ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys, allow_nan=False
    )
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
