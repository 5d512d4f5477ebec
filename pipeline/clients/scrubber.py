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
from dataclasses import dataclass
from typing import Any

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
from pipeline.model.records import compact_json

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


@dataclass(frozen=True)
class _Field:
    ref: str  # "title", "directory", "m3.content", "m3.t0.input", ...
    role: str
    text: str


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


def _identifiers(obj: Mapping[str, Any], where: str) -> dict[str, str | None]:
    """The record's or a message's identifiers (None where absent: a v1 record)."""
    found: dict[str, str | None] = {}
    for name, pattern in _IDENTIFIERS.items():
        value = obj.get(name)
        if value is not None and not (isinstance(value, str) and pattern.fullmatch(value)):
            raise ScrubberInputError(f"{where}.{name} is not an identifier of its form")
        found[name] = value
    return found


def _missing(obj: Mapping[str, Any], keys: Sequence[str], where: str) -> None:
    absent = [key for key in keys if key not in obj]
    if absent:
        raise ScrubberInputError(f"{where} lacks {', '.join(absent)}")


def _messages(record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        raise ScrubberInputError("messages is not a list of objects")
    return messages


def _tool_calls(message: Mapping[str, Any], where: str) -> list[Mapping[str, Any]] | None:
    calls = message.get("tool_calls")
    if calls is not None and (
        not isinstance(calls, list) or not all(isinstance(c, Mapping) for c in calls)
    ):
        raise ScrubberInputError(f"{where}.tool_calls is not a list of objects")
    return calls


def _text_fields(record: Mapping[str, Any]) -> list[_Field]:
    """The fields to scrub, after checking the record has every key the rebuild will read,
    so a bad record fails before anything is sent."""
    if not isinstance(record.get("schema"), str) or record["schema"] not in _SAMPLED:
        raise ScrubberInputError(
            f"expected a trace.sampled/1 or /2 record, got schema {str(record.get('schema'))[:40]!r}"
        )
    _missing(record, _RECORD_KEYS, "record")
    for where, obj in [("record", record), *((f"messages[{i}]", m) for i, m in enumerate(_messages(record)))]:
        _identifiers(obj, where)
    if not isinstance(record["decision"], Mapping):
        raise ScrubberInputError("decision is not an object")
    fields: list[_Field] = []

    def add(ref: str, role: str, text: str | None) -> None:
        if text is not None:
            fields.append(_Field(ref, role, text))

    add("title", "system", _optional_text(record.get("title"), "title"))
    add("directory", "system", _optional_text(record.get("directory"), "directory"))
    for i, message in enumerate(_messages(record)):
        _missing(message, _MESSAGE_KEYS, f"messages[{i}]")
        content = message["content"]
        if not isinstance(content, str):
            raise ScrubberInputError(f"messages[{i}].content is not a string")
        add(f"m{i}.content", str(message.get("role")), content)
        for j, call in enumerate(_tool_calls(message, f"messages[{i}]") or []):
            ref = f"m{i}.t{j}"
            _missing(call, _TOOL_KEYS, f"messages[{i}].tool_calls[{j}]")
            if call["input"] is not None:
                try:
                    add(f"{ref}.input", "tool", compact_json(call["input"]))
                except (TypeError, ValueError):
                    raise ScrubberInputError(f"{ref}.input is not JSON-encodable") from None
            add(f"{ref}.output", "tool", _optional_text(call["output"], f"{ref}.output"))
            add(f"{ref}.error", "tool", _optional_text(call["error"], f"{ref}.error"))
    return fields


def _decoded_input(scrubbed: str) -> Any:
    # A redaction can cut through JSON syntax (a value pattern eating a closing quote); the
    # scrubbed text is then kept as a string: still scrubber output, still readable by a rater.
    try:
        return json.loads(scrubbed)
    except (ValueError, RecursionError):
        return scrubbed


def _rebuild_messages(record: Mapping[str, Any], clean: Mapping[str, str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, message in enumerate(_messages(record)):
        msg: dict[str, Any] = {
            "role": message["role"],
            "content": clean[f"m{i}.content"],
            "id": message["id"],
            "session_id": message["session_id"],
            "idx": message["idx"],
            **_identifiers(message, f"messages[{i}]"),
        }
        calls = _tool_calls(message, f"messages[{i}]")
        if calls is not None:
            msg["tool_calls"] = []
            for j, call in enumerate(calls):
                ref = f"m{i}.t{j}"
                tool: dict[str, Any] = {
                    "name": call["name"],
                    "status": call["status"],
                    "error": clean.get(f"{ref}.error"),
                    "input": _decoded_input(clean[f"{ref}.input"])
                    if f"{ref}.input" in clean
                    else None,
                    "output": clean.get(f"{ref}.output"),
                }
                if "call_id" in call:
                    tool["call_id"] = call["call_id"]
                msg["tool_calls"].append(tool)
        out.append(msg)
    return out


def _scrubbed_record(
    record: Mapping[str, Any], clean: Mapping[str, str], scrub: dict[str, Any]
) -> dict[str, Any]:
    # Only after _text_fields checked the record: every key read here is there.
    return {
        "schema": "trace.scrubbed/2",
        **{key: record[key] for key in _COPIED},
        **_identifiers(record, "record"),
        "directory": clean.get("directory"),
        "title": clean.get("title"),
        "messages": _rebuild_messages(record, clean),
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
    clean = {f.ref: f.text for f in _text_fields(trace_record)}
    scrub = {
        "mode": "bypass",
        "jti": None,
        "engine_version": None,
        "detections": 0,
        "scrubbed_at": now_ms,
    }
    return _scrubbed_record(trace_record, clean, scrub)


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
        if not isinstance(got, dict) or got.keys() != asked.keys():
            raise _bad(f"entry {k} does not have the keys that were sent")
        for key, value in asked.items():
            # type() too: True == 1 and 1.0 == 1 in Python, but not the same answer.
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
        headers = {"content-type": "application/json"}
        if isinstance(trace_record.get("trace_id"), str):
            headers["x-request-id"] = trace_record["trace_id"]
        if self._api_key:
            headers["x-scrubber-key"] = self._api_key
        if self._tenant:
            headers["x-tenant-id"] = self._tenant
        response = await self._post(compact_json({"trace": entries}).encode("utf-8"), headers)
        _check_status(response, self._clock(), self._where)
        answer = _parse_answer(response, entries)
        claims = self._verified_claims(answer)
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
        return _scrubbed_record(trace_record, clean, scrub)

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
        expected = sha256_hex(compact_json(answer["trace"]))
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


def _str_claim(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    return value if isinstance(value, str) else None
