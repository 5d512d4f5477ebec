"""Scrub a sampled trace with ONE scrubber request (trace mode), failing closed.

Every text field that can reach the panel goes into one `{"trace": [...]}` request, one entry
per field, each tagged with its position (`i`) and where it came from (`ref`), so the answer
maps back exactly. A field absent from the answer is never filled from the original: any
answer that is not exactly what was asked for raises, and so does every failure, translated
in one place (`ScrubberClient._post` plus `_check_status`) into::

    ScrubberError                   .retriable, .retry_after, .reason, .status_code
    ├── ScrubberUnavailable         retriable: connect errors, timeouts, 5xx, 408/425/429
    │   └── ScrubberBadAnswer       retriable: a 2xx whose body is not the answer asked for
    ├── ScrubberRejected            permanent: 400, 401, 404 and other 4xx/3xx
    ├── ScrubberAttestationError    permanent: an attestation that does not verify (.why)
    └── ScrubberInputError          permanent: the record itself cannot be scrubbed

What is sent: each message's `content`; each tool call's `input` (JSON-encoded, so keys and
values alike are scrubbed), `output` and `error`; the session `title` and `directory` (a path
such as /home/<name>/... names a person). Identifiers (role, message and session ids, idx,
tool name, status, call_id, project_id) pass through. Message keys outside the schema are
dropped rather than passed on unscrubbed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import httpx

from pipeline.clients.http import (
    ClosingClient,
    HttpAnswer,
    PooledClient,
    Transport,
    TransportError,
    checked_base_url,
    display_url,
    no_answer_reason,
    parse_json,
    pooled_client,
)
from pipeline.delivery.retry import classify_http, parse_retry_after
from pipeline.delivery.signing import AttestationError, sha256_hex, verify_attestation
from pipeline.model.prompt import AGENT_ID_PATTERN, PROMPT_REF_PATTERN
from pipeline.model.records import compact_json, plain_json_bytes

__all__ = [
    "SCRUB_PATH",
    "ScrubberAttestationError",
    "ScrubberBadAnswer",
    "ScrubberClient",
    "ScrubberError",
    "ScrubberInputError",
    "ScrubberRejected",
    "ScrubberUnavailable",
    "bypass_record",
]

log = logging.getLogger(__name__)

SCRUB_PATH = "/v1/scrub"
# what `ScrubberClient.probe` sends: as a trace's entries are, with no session content
PROBE_ENTRIES = ({"i": 0, "ref": "probe", "role": "user", "content": "pipeline scrubber probe"},)
_COPIED = ("trace_id", "snapshot_id", "host", "site_key", "session_id", "project_id")


class ScrubberError(Exception):
    retriable = False

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.status_code = status_code
        self.retry_after = retry_after


class ScrubberUnavailable(ScrubberError):
    retriable = True


class ScrubberBadAnswer(ScrubberUnavailable):
    """Retriable: a proxy's error page or a scrubber mid-deploy answers fine a moment later;
    the stage's retry budget dead-letters a trace that keeps getting one."""


class ScrubberRejected(ScrubberError):
    pass


class ScrubberAttestationError(ScrubberError):
    def __init__(self, why: str) -> None:
        super().__init__(f"scrubber attestation {why}", reason=f"attestation_{why}")
        self.why = why


class ScrubberInputError(ScrubberError):
    def __init__(self, detail: str) -> None:
        super().__init__(f"trace record cannot be scrubbed: {detail}", reason="bad_record")


# ---------------------------------------------------------------- record <-> entries


# _Field.value of a field that keeps no value: its text is to be parsed when it is read back.
_UNPARSED: Any = object()


class _Field(NamedTuple):
    """One text field of the trace. A NamedTuple, not a frozen dataclass: a trace has ~70 of
    them, and a frozen dataclass's __init__ (object.__setattr__ per field) cost more than the
    rest of building one."""

    ref: str  # "title", "directory", "m3.content", "m3.t0.input", ...
    role: str
    text: str
    # A tool input whose text is orjson's writing of a plain-JSON value (records.plain_json_bytes):
    # that value, which json.loads(text) would give back equal and of the same types. An answer
    # that returns the text unchanged then needs no parse (_decoded_input).
    value: Any = _UNPARSED


def _optional_text(value: Any, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ScrubberInputError(f"{where} is {type(value).__name__}, expected a string or null")
    return value


_RECORD_KEYS = ("schema", *_COPIED, "directory", "title", "messages", "decision", "sampled_at")
_SAMPLED = frozenset({"trace.sampled/1", "trace.sampled/2"})  # read; trace.scrubbed/2 written
# Identifiers that pass unscrubbed, each held to its alphabet (no free text can ride along):
# who answered, and the prompt's fingerprint (pipeline/model/prompt.py).
_IDENTIFIERS = {"agent_id": AGENT_ID_PATTERN, "prompt_ref": PROMPT_REF_PATTERN}
_MESSAGE_KEYS = ("role", "content", "id", "session_id", "idx")
_TOOL_KEYS = ("name", "status", "error", "input", "output")
# the same as sets: a record that has them all (every one the pipeline writes) passes with one
# set comparison; the names of the absent ones are worked out only when some are
_RECORD_KEY_SET, _MESSAGE_KEY_SET, _TOOL_KEY_SET = map(frozenset, (_RECORD_KEYS, _MESSAGE_KEYS, _TOOL_KEYS))


def _check_identifiers(obj: Mapping[str, Any], where: Callable[[], str]) -> None:
    """The record's or a message's identifiers are absent, null or of their form. `where` names
    the object for the error only (formatting it for every message cost more than the check)."""
    for name, pattern in _IDENTIFIERS.items():
        value = obj.get(name)
        if value is not None and not (isinstance(value, str) and pattern.fullmatch(value)):
            raise ScrubberInputError(f"{where()}.{name} is not an identifier of its form")


def _identifier_values(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The record's or a message's identifiers (None where absent: a v1 record), as
    _check_identifiers has already let them through."""
    return {name: obj.get(name) for name in _IDENTIFIERS}


def _missing(obj: Mapping[str, Any], keys: Sequence[str], key_set: frozenset[str], where: Callable[[], str]) -> None:
    if obj.keys() >= key_set:
        return
    absent = [key for key in keys if key not in obj]
    raise ScrubberInputError(f"{where()} lacks {', '.join(absent)}")


def _is_mapping(value: Any) -> bool:
    # a record's objects are dicts; the ABC check (Mapping's __instancecheck__) is for the rest
    return type(value) is dict or isinstance(value, Mapping)


def _messages(record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not all(map(_is_mapping, messages)):
        raise ScrubberInputError("messages is not a list of objects")
    return messages


def _tool_calls(message: Mapping[str, Any], i: int) -> list[Mapping[str, Any]] | None:
    calls = message.get("tool_calls")
    if calls is not None and (not isinstance(calls, list) or not all(map(_is_mapping, calls))):
        raise ScrubberInputError(f"messages[{i}].tool_calls is not a list of objects")
    return calls


def _text_fields(record: Mapping[str, Any]) -> list[_Field]:
    """The fields to scrub, after checking the record has every key the rebuild will read,
    so a bad record fails before anything is sent."""
    if not isinstance(record.get("schema"), str) or record["schema"] not in _SAMPLED:
        raise ScrubberInputError(
            f"expected a trace.sampled/1 or /2 record, got schema {str(record.get('schema'))[:40]!r}"
        )
    _missing(record, _RECORD_KEYS, _RECORD_KEY_SET, lambda: "record")
    messages = _messages(record)
    _check_identifiers(record, lambda: "record")
    for i, message in enumerate(messages):
        _check_identifiers(message, lambda: f"messages[{i}]")  # noqa: B023 (called at once)
    if not isinstance(record["decision"], Mapping):
        raise ScrubberInputError("decision is not an object")
    fields: list[_Field] = []
    add = fields.append
    title = _optional_text(record.get("title"), "title")
    if title is not None:
        add(_Field("title", "system", title))
    directory = _optional_text(record.get("directory"), "directory")
    if directory is not None:
        add(_Field("directory", "system", directory))
    for i, message in enumerate(messages):
        _missing(message, _MESSAGE_KEYS, _MESSAGE_KEY_SET, lambda: f"messages[{i}]")  # noqa: B023
        content = message["content"]
        if not isinstance(content, str):
            raise ScrubberInputError(f"messages[{i}].content is not a string")
        add(_Field(f"m{i}.content", str(message.get("role")), content))
        for j, call in enumerate(_tool_calls(message, i) or ()):
            ref = f"m{i}.t{j}"
            _missing(call, _TOOL_KEYS, _TOOL_KEY_SET, lambda: f"messages[{i}].tool_calls[{j}]")  # noqa: B023
            value = call["input"]
            if value is not None:
                # compact_json's own fast path, kept here so the plain value can go with its text
                fast = plain_json_bytes(value, sort_keys=False)
                if fast is not None:
                    add(_Field(f"{ref}.input", "tool", fast.decode("utf-8"), value))
                else:
                    try:
                        add(_Field(f"{ref}.input", "tool", compact_json(value)))
                    except (TypeError, ValueError):
                        raise ScrubberInputError(f"{ref}.input is not JSON-encodable") from None
            output = _optional_text(call["output"], f"{ref}.output")
            if output is not None:
                add(_Field(f"{ref}.output", "tool", output))
            error = _optional_text(call["error"], f"{ref}.error")
            if error is not None:
                add(_Field(f"{ref}.error", "tool", error))
    return fields


def _decoded_input(scrubbed: str, sent: _Field) -> Any:
    if scrubbed == sent.text and sent.value is not _UNPARSED:
        # Unchanged by the scrubber, and plain JSON: json.loads would rebuild the value we wrote
        # it from (same types, same key order), so it goes on as it is. The output record then
        # shares it with the input record; neither is changed after the scrub.
        return sent.value
    # A redaction can cut through JSON syntax (a value pattern eating a closing quote); the
    # scrubbed text is then kept as a string: still scrubber output, still readable by a rater.
    try:
        return json.loads(scrubbed)
    except (ValueError, RecursionError):
        return scrubbed


def _rebuild_messages(
    record: Mapping[str, Any], clean: Mapping[str, str], inputs: Mapping[str, _Field]
) -> list[dict[str, Any]]:
    # Only after _text_fields checked the record (its messages, their keys, identifiers and tool
    # calls): nothing is checked twice. `inputs`: the tool input fields that were sent, by ref.
    out: list[dict[str, Any]] = []
    for i, message in enumerate(record["messages"]):
        msg: dict[str, Any] = {
            "role": message["role"],
            "content": clean[f"m{i}.content"],
            "id": message["id"],
            "session_id": message["session_id"],
            "idx": message["idx"],
            **_identifier_values(message),
        }
        calls = message.get("tool_calls")
        if calls is not None:
            msg["tool_calls"] = []
            for j, call in enumerate(calls):
                ref = f"m{i}.t{j}"
                sent = inputs.get(f"{ref}.input")
                tool: dict[str, Any] = {
                    "name": call["name"],
                    "status": call["status"],
                    "error": clean.get(f"{ref}.error"),
                    "input": None if sent is None else _decoded_input(clean[sent.ref], sent),
                    "output": clean.get(f"{ref}.output"),
                }
                if "call_id" in call:
                    tool["call_id"] = call["call_id"]
                msg["tool_calls"].append(tool)
        out.append(msg)
    return out


def _scrubbed_record(
    record: Mapping[str, Any], clean: Mapping[str, str], fields: Sequence[_Field], scrub: dict[str, Any]
) -> dict[str, Any]:
    # Only after _text_fields checked the record: every key read here is there.
    inputs = {f.ref: f for f in fields if f.role == "tool" and f.ref.endswith(".input")}
    return {
        "schema": "trace.scrubbed/2",
        **{key: record[key] for key in _COPIED},
        **_identifier_values(record),
        "directory": clean.get("directory"),
        "title": clean.get("title"),
        "messages": _rebuild_messages(record, clean, inputs),
        # a v1 decision has neither: its one fact is its reason, it has no pair
        "decision": {"facts": [record["decision"].get("reason")], "pair": None, **record["decision"]},
        "sampled_at": record["sampled_at"],
        "scrub": scrub,
    }


def bypass_record(trace_record: Mapping[str, Any], now_ms: int) -> dict[str, Any]:
    """The scrubbed-record shape WITHOUT scrubbing, for `scrubberUrl = ""` (development only)."""
    log.warning(
        "SCRUBBING DISABLED (scrubberUrl is empty): trace %s goes to the panel unscrubbed",
        trace_record.get("trace_id"),
    )
    fields = _text_fields(trace_record)
    clean = {f.ref: f.text for f in fields}
    scrub = {
        "mode": "bypass",
        "jti": None,
        "engine_version": None,
        "detections": 0,
        "scrubbed_at": now_ms,
    }
    return _scrubbed_record(trace_record, clean, fields, scrub)


# ---------------------------------------------------------------- the answer


def _bad(detail: str) -> ScrubberBadAnswer:
    return ScrubberBadAnswer(f"scrubber answer rejected: {detail}", reason="bad_answer")


def _parse_answer(response: HttpAnswer, sent: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    try:
        answer = parse_json(response.content)
    except (ValueError, RecursionError):
        raise _bad("not JSON") from None
    if not isinstance(answer, dict):
        raise _bad("not a JSON object")
    if answer.get("mode", "trace") != "trace":
        raise _bad(f"mode is {answer.get('mode')!r}, expected 'trace'")
    trace = answer.get("trace")
    if not isinstance(trace, list) or len(trace) != len(sent):
        got = len(trace) if isinstance(trace, list) else type(trace).__name__
        raise _bad(f"trace has {got} entries, {len(sent)} were sent")
    for k, (asked, got) in enumerate(zip(sent, trace, strict=True)):
        # What was sent is {"i": int, "ref": str, "role": str, "content": str}. The usual answer,
        # those four keys with the first three unchanged and a string content, passes in one
        # expression (four keys, all present: the keys that were sent); anything else goes
        # through the checks one by one, which name what is wrong.
        # type() too: True == 1 and 1.0 == 1 in Python, but not the same answer.
        if (type(got) is dict and len(got) == 4 and type(got.get("i")) is int and got["i"] == asked["i"]
                and type(got.get("ref")) is str and got["ref"] == asked["ref"]
                and type(got.get("role")) is str and got["role"] == asked["role"]
                and type(got.get("content")) is str):
            continue
        if not isinstance(got, dict) or got.keys() != asked.keys():
            raise _bad(f"entry {k} does not have the keys that were sent")
        for key, value in asked.items():
            if key != "content" and (type(got[key]) is not type(value) or got[key] != value):
                raise _bad(f"entry {k} key {key!r} changed")
        if not isinstance(got["content"], str):
            raise _bad(f"entry {k} content is not a string")
    detections = answer.get("detections", [])
    if not isinstance(detections, list):
        raise _bad("detections is not a list")
    if "attestation" in answer and not isinstance(answer["attestation"], str | None):
        raise _bad("attestation is not a string")
    return answer


def _check_status(response: HttpAnswer, now: float, where: str) -> None:
    status = response.status_code
    kind = classify_http(status)
    if kind == "success":
        return
    try:
        body = json.loads(response.content)
    except (ValueError, RecursionError):
        body = None
    code = body.get("error") if isinstance(body, dict) else None
    message = f"scrubber {where} answered {status}" + (f" ({str(code)[:120]})" if code else "")
    if kind == "transient":
        raise ScrubberUnavailable(
            message,
            reason="rate_limited" if status == 429 else f"http_{status}",
            status_code=status,
            retry_after=parse_retry_after(response.headers.get("retry-after"), now, body),
        )
    raise ScrubberRejected(message, reason=f"http_{status}", status_code=status)


# ---------------------------------------------------------------- the client


class ScrubberClient(ClosingClient):
    """One pooled connection set to one scrubber; use as an async context manager."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        jwt_secret: str | None,
        timeout: httpx.Timeout,
        transport: Transport | None = None,
        *,
        require_attestation: bool = False,
        rules: Sequence[str] = (),
        tenant: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = checked_base_url(base_url)
        self._api_key = api_key or None
        self._jwt_secret = jwt_secret or None
        if require_attestation and not self._jwt_secret:
            raise ValueError(
                "require_attestation needs the jwt secret to verify the attestation with"
            )
        self._require_attestation = require_attestation
        self._params = {"rules": ",".join(rules)} if rules else None
        self._tenant = tenant
        self._clock = clock
        self._url = self.base_url + SCRUB_PATH
        self._where = repr(display_url(self.base_url))
        self._client: PooledClient = pooled_client(timeout, transport)

    def __repr__(self) -> str:
        key = "set" if self._api_key else "unset"
        jwt = "set" if self._jwt_secret else "unset"
        return f"ScrubberClient({display_url(self.base_url)!r}, api_key={key}, jwt_secret={jwt})"

    async def scrub_trace(self, trace_record: Mapping[str, Any]) -> dict[str, Any]:
        """A trace.scrubbed/2 record whose every text field came back from the scrubber."""
        fields = _text_fields(trace_record)
        entries = [
            {"i": k, "ref": f.ref, "role": f.role, "content": f.text} for k, f in enumerate(fields)
        ]
        trace_id = trace_record.get("trace_id")
        answer, claims = await self._scrub_entries(entries, all(type(f.text) is str for f in fields),
                                                   trace_id if isinstance(trace_id, str) else None)
        clean = {f.ref: entry["content"] for f, entry in zip(fields, answer["trace"], strict=True)}
        scrub = {
            "mode": "trace",
            "jti": _str_claim(claims, "jti"),
            "input_hash": _str_claim(claims, "input_hash"),
            "engine_version": answer["engine_version"]
            if isinstance(answer.get("engine_version"), str)
            else None,
            "detections": len(answer.get("detections", [])),
            "scrubbed_at": int(self._clock() * 1000),
        }
        return _scrubbed_record(trace_record, clean, fields, scrub)

    async def probe(self) -> None:
        """Scrub a canary trace made here (no session content) the way a trace is scrubbed:
        status, answer and attestation checked alike. Raises ScrubberError when the scrubber
        cannot scrub it; returning says the scrubber scrubs, so a trace it keeps failing is that
        trace's problem (the scrub stage's evidence when no other trace passed meanwhile)."""
        await self._scrub_entries(list(PROBE_ENTRIES), True, None)

    async def _scrub_entries(self, entries: list[dict[str, Any]], plain: bool,
                             request_id: str | None) -> tuple[dict[str, Any], Mapping[str, Any]]:
        """One scrub request for `entries`: the checked answer and its verified claims."""
        headers = {"content-type": "application/json"}
        if request_id is not None:
            headers["x-request-id"] = request_id
        if self._api_key:
            headers["x-scrubber-key"] = self._api_key
        if self._tenant:
            headers["x-tenant-id"] = self._tenant
        response = await self._post(_json_bytes({"trace": entries}, plain), headers)
        _check_status(response, self._clock(), self._where)
        answer = _parse_answer(response, entries)
        return answer, self._verified_claims(answer)

    def _verified_claims(self, answer: Mapping[str, Any]) -> Mapping[str, Any]:
        """The claims of the answer's attestation once verified; empty when there is none to
        verify or nothing to verify it with (then nothing is vouched for)."""
        token = answer.get("attestation")
        if token is None:
            if self._require_attestation:
                raise ScrubberAttestationError("missing")
            return {}
        if self._jwt_secret is None:
            return {}
        # output_hash covers JSON.stringify(sanitized trace): re-serialise what was parsed, in
        # its own key order, not the wire bytes (whose spacing and escapes are the server's).
        # Plain JSON by construction: json.loads wrote it, and _parse_answer let through only
        # entries of the sent keys with an int and strings.
        expected = sha256_hex(_json_bytes(answer["trace"], True))
        try:
            claims = verify_attestation(token, self._jwt_secret, expected, self._clock())
        except AttestationError as exc:
            raise ScrubberAttestationError(exc.why) from None
        return claims


    async def _post(self, content: bytes, headers: Mapping[str, str]) -> HttpAnswer:
        """The one place the HTTP client's errors become ScrubberErrors."""
        try:
            return await self._client.post(self._url, content=content, headers=headers, params=self._params)
        except TransportError as exc:
            raise ScrubberUnavailable(
                f"scrubber {self._where}: {type(exc).__name__}",
                reason=no_answer_reason(exc),
            ) from exc


def _json_bytes(value: Any, plain: bool) -> bytes:
    """compact_json(value) as UTF-8. `plain`: the caller knows is_plain_json(value) (a request
    or answer built of dicts, lists, ints and exact strs), which spares records' fast path its
    walk of every entry; a lone surrogate still takes compact_json's escaping."""
    fast = plain_json_bytes(value, sort_keys=False, plain=plain)
    return fast if fast is not None else compact_json(value).encode("utf-8")


def _str_claim(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    return value if isinstance(value, str) else None
