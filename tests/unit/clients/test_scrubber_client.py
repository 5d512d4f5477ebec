"""pipeline.clients.scrubber.ScrubberClient against the real stub scrubber over loopback HTTP, plus
answers no real scrubber should give, from a transport standing in for the network: every one of
them fails closed."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import httpx
import pytest
import pytest_asyncio

from devkit.stubs.scrubber import ScrubberStubConfig, StubScrubber
from pipeline.clients.http import HttpAnswer, HttpRequest, Transport
from pipeline.clients.scrubber import (
    ScrubberAttestationError,
    ScrubberBadAnswer,
    ScrubberClient,
    ScrubberError,
    ScrubberInputError,
    ScrubberRejected,
    ScrubberUnavailable,
    bypass_record,
)
from pipeline.delivery.signing import canonical_body, mint_attestation
from pipeline.model.records import compact_json, validate

KEY = "scrubber-api-key"
JWT = "scrubber-jwt-secret-at-least-32-bytes!"
TIMEOUT = httpx.Timeout(connect=2.0, read=5.0, write=5.0, pool=2.0)

SECRETS = [
    "alice@example.com",
    "sk-abcdefghijklmnopqrstuvwxyz012345",
    "AKIAIOSFODNN7EXAMPLE",
    "ghp_" + "A1b2C3d4E5" * 4,
    "hunter2pass",
    "bob@corp.example",
    "carol@example.org",
    "dave@example.net",
    "sk-ant-api03-ZYXWVUTSRQPONMLKJIHGFEDCBA",
]


def sampled() -> dict[str, Any]:
    """A trace.sampled/1 record with a seeded secret in every text field that reaches the panel."""
    return {
        "schema": "trace.sampled/1",
        "trace_id": "tr_oc_0123456789abcdef",
        "snapshot_id": "snp_" + "1" * 32,
        "host": "laptop",
        "site_key": "pk_test_thirdparty",
        "session_id": "ses_abc",
        "project_id": "prj_1",
        "directory": "/home/alice/work/app",
        "title": "help alice@example.com with deploy",
        "messages": [
            {
                "role": "user",
                "content": "my key is sk-abcdefghijklmnopqrstuvwxyz012345, mail bob@corp.example",
                "id": "msg_1",
                "session_id": "ses_abc",
                "idx": 0,
            },
            {
                "role": "assistant",
                "content": "Running it.",
                "id": "msg_2",
                "session_id": "ses_abc",
                "idx": 1,
                "tool_calls": [
                    {
                        "name": "bash",
                        "status": "completed",
                        "error": None,
                        "input": {
                            "command": "AWS_KEY=AKIAIOSFODNN7EXAMPLE DB_PASSWORD=hunter2pass ./go",
                            "description": "deploy",
                            "carol@example.org": ["ghp_" + "A1b2C3d4E5" * 4],
                        },
                        "output": "notified dave@example.net",
                        "call_id": "call_1",
                    },
                    {
                        "name": "read",
                        "status": "error",
                        "error": "token sk-ant-api03-ZYXWVUTSRQPONMLKJIHGFEDCBA rejected",
                        "input": None,
                        "output": None,
                    },
                ],
            },
        ],
        "decision": {
            "forward": True,
            "reason": "error_flag",
            "novelty": None,
            "rate": 0.05,
            "policy_version": "p1",
            "detail": "tool error",
        },
        "sampled_at": 1_750_000_000_000,
    }


@pytest_asyncio.fixture
async def stub() -> AsyncIterator[StubScrubber]:
    async with StubScrubber(ScrubberStubConfig(api_key=KEY, jwt_secret=JWT)) as server:
        yield server


def client_for(url: str, **kwargs: Any) -> ScrubberClient:
    kwargs.setdefault("api_key", KEY)
    kwargs.setdefault("jwt_secret", JWT)
    kwargs.setdefault("timeout", TIMEOUT)
    return ScrubberClient(url, **kwargs)


E = TypeVar("E", bound=ScrubberError)


async def scrub_fails(client: ScrubberClient, kind: type[E]) -> E:
    """Scrubbing sampled() with `client` (closed afterwards) must raise `kind`: the error it raised."""
    async with client:
        with pytest.raises(kind) as info:
            await client.scrub_trace(sampled())
    return info.value


# ---------------------------------------------------------------- against the real stub


@pytest.mark.asyncio
async def test_every_text_field_is_scrubbed_in_one_request(stub: StubScrubber) -> None:
    async with client_for(stub.url) as client:
        out = await client.scrub_trace(sampled())
    validate("trace-scrubbed.v2", out)
    dumped = json.dumps(out, ensure_ascii=False)
    for secret in [*SECRETS, "alice"]:
        assert secret not in dumped
    assert stub.stats()["scrubs"] == 1 and stub.stats()["requests"] == 1
    # ... and so no byte of them can reach the panel.
    body = canonical_body(out, "opencode", "0.1.0").decode()
    assert not any(secret in body for secret in SECRETS)

    assert out["title"] == "help <EMAIL_1> with deploy"
    assert out["directory"] == "/home/<USER_1>/work/app"
    call, failed = out["messages"][1]["tool_calls"]
    assert call["input"] == {
        "command": "AWS_KEY=<AWS_KEY_1> DB_PASSWORD=<SECRET_1> ./go",
        "description": "deploy",
        "<EMAIL_3>": ["<GITHUB_TOKEN_1>"],
    }
    assert failed["error"] == "token <ANTHROPIC_KEY_1> rejected"
    assert failed["input"] is None and failed["output"] is None and "call_id" not in failed
    assert out["scrub"]["mode"] == "trace"
    assert re.fullmatch(r"[0-9a-f]{32}", out["scrub"]["jti"])
    assert out["scrub"]["engine_version"] == "scrubber-stub/0.6.0"
    assert out["scrub"]["detections"] >= len(SECRETS)


@pytest.mark.asyncio
async def test_identifiers_and_decision_pass_through(stub: StubScrubber) -> None:
    record = sampled()
    async with client_for(stub.url) as client:
        out = await client.scrub_trace(record)
    for key in (
        "trace_id",
        "snapshot_id",
        "host",
        "site_key",
        "session_id",
        "project_id",
        "sampled_at",
    ):
        assert out[key] == record[key]
    # a v1 decision comes out in the v2 shape: its reason its one fact, no pair
    assert out["decision"] == {**record["decision"], "facts": [record["decision"]["reason"]], "pair": None}
    for got, sent in zip(out["messages"], record["messages"], strict=True):
        assert [got[k] for k in ("role", "id", "session_id", "idx")] == [
            sent[k] for k in ("role", "id", "session_id", "idx")
        ]
        assert got["agent_id"] is None and got["prompt_ref"] is None
    assert out["messages"][1]["tool_calls"][0]["call_id"] == "call_1"
    validate("trace-scrubbed.v2", out)


def paired_v2() -> dict[str, Any]:
    """sampled() as a trace.sampled/2 record of a turn forwarded in a pair."""
    record = sampled()
    ref = "pr_" + "ab" * 16
    record.update(schema="trace.sampled/2", prompt_ref=ref, agent_id="anthropic/claude-sonnet-4:build")
    record["decision"] = {**record["decision"], "reason": "pair", "facts": ["pair"], "pair": {
        "pair_id": "pair_" + "cd" * 12, "prompt_ref": ref, "partner_trace_id": "tr_oc_" + "ef" * 16,
        "partner_agent_id": "openai/gpt-5:build", "partner_host": "other"}}
    for message in record["messages"]:
        message.update(agent_id="anthropic/claude-sonnet-4:build", prompt_ref=ref)
    validate("trace-sampled.v2", record)
    return record


@pytest.mark.asyncio
async def test_the_pair_identifiers_pass_through_unscrubbed(stub: StubScrubber) -> None:
    record = paired_v2()
    async with client_for(stub.url) as client:
        out = await client.scrub_trace(record)
    assert (out["prompt_ref"], out["agent_id"], out["decision"]) == (
        record["prompt_ref"], record["agent_id"], record["decision"])
    assert [(m["agent_id"], m["prompt_ref"]) for m in out["messages"]] == [
        (m["agent_id"], m["prompt_ref"]) for m in record["messages"]]
    validate("trace-scrubbed.v2", out)


@pytest.mark.asyncio
async def test_free_text_posing_as_an_identifier_is_refused_before_anything_is_sent(stub: StubScrubber) -> None:
    record = paired_v2()
    record["messages"][0]["agent_id"] = "alice@example.com said hi"
    async with client_for(stub.url) as client:
        with pytest.raises(ScrubberInputError, match=r"messages\[0\]\.agent_id"):
            await client.scrub_trace(record)
    assert stub.stats()["requests"] == 0


@pytest.mark.asyncio
async def test_unknown_message_keys_are_dropped_not_passed_on_raw(stub: StubScrubber) -> None:
    record = sampled()
    record["messages"][0]["raw_note"] = "alice@example.com"
    async with client_for(stub.url) as client:
        out = await client.scrub_trace(record)
    assert "raw_note" not in out["messages"][0]


@pytest.mark.asyncio
async def test_wrong_or_missing_api_key_is_rejected(stub: StubScrubber) -> None:
    for key in ("wrong", None):
        error = await scrub_fails(client_for(stub.url, api_key=key), ScrubberRejected)
        assert error.status_code == 401 and not error.retriable
        assert KEY not in str(error)


@pytest.mark.asyncio
async def test_the_probe_is_checked_as_a_trace_is(stub: StubScrubber) -> None:
    # a scrubber that scrubs the canary passes; failing it, refusing our key or attesting with
    # another secret raise as a trace's scrub would
    async with client_for(stub.url) as client:
        await client.probe()
        stub.set_faults(fail_next=1, status=503)
        with pytest.raises(ScrubberUnavailable):
            await client.probe()
    for client, kind in [(client_for(stub.url, api_key="wrong"), ScrubberRejected),
                         (client_for(stub.url, jwt_secret="another-secret-of-32-bytes-or-more!!"),
                          ScrubberAttestationError)]:
        async with client:
            with pytest.raises(kind):
                await client.probe()
    assert stub.stats()["by_status"] == {"200": 2, "503": 1, "401": 1}


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [500, 502, 503, 408])
async def test_server_errors_are_retriable(stub: StubScrubber, status: int) -> None:
    stub.set_faults(fail_next=1, status=status)
    async with client_for(stub.url) as client:
        with pytest.raises(ScrubberUnavailable) as info:
            await client.scrub_trace(sampled())
        assert info.value.retriable and info.value.status_code == status
        assert (await client.scrub_trace(sampled()))["scrub"]["mode"] == "trace"  # and it recovers


@pytest.mark.asyncio
async def test_429_carries_retry_after(stub: StubScrubber) -> None:
    stub.set_faults(fail_next=1, status=429, retry_after_s=5)
    error = await scrub_fails(client_for(stub.url), ScrubberUnavailable)
    assert error.reason == "rate_limited" and error.retry_after == 5


@pytest.mark.asyncio
async def test_slow_scrubber_times_out_closed(stub: StubScrubber) -> None:
    stub.set_faults(latency_ms=500)
    short = httpx.Timeout(connect=1.0, read=0.1, write=1.0, pool=1.0)
    error = await scrub_fails(client_for(stub.url, timeout=short), ScrubberUnavailable)
    assert error.reason == "timeout"


@pytest.mark.asyncio
async def test_scrubber_down_is_unavailable() -> None:
    async with StubScrubber() as server:
        url = server.url
    error = await scrub_fails(client_for(url), ScrubberUnavailable)
    assert error.reason == "transport"


@pytest.mark.asyncio
async def test_unknown_tenant_is_rejected() -> None:
    config = ScrubberStubConfig(tenants=frozenset({"acme"}))
    async with StubScrubber(config) as server:
        error = await scrub_fails(client_for(server.url, tenant="other"), ScrubberRejected)
    assert error.status_code == 404


@pytest.mark.asyncio
async def test_attestation_signed_with_another_secret_fails(stub: StubScrubber) -> None:
    client = client_for(stub.url, jwt_secret="another-secret-of-32-bytes-or-more!!")
    error = await scrub_fails(client, ScrubberAttestationError)
    assert error.why == "bad_signature" and not error.retriable


@pytest.mark.asyncio
async def test_expired_attestation_fails() -> None:
    config = ScrubberStubConfig(jwt_secret=JWT)
    server = StubScrubber(config, clock=lambda: time.time() - 400)
    async with server:
        error = await scrub_fails(client_for(server.url), ScrubberAttestationError)
    assert error.why == "expired"


@pytest.mark.asyncio
async def test_missing_attestation_only_fails_when_required() -> None:
    async with StubScrubber() as server:
        async with client_for(server.url) as client:
            assert (await client.scrub_trace(sampled()))["scrub"]["jti"] is None
        error = await scrub_fails(client_for(server.url, require_attestation=True), ScrubberAttestationError)
    assert error.why == "missing"


@pytest.mark.asyncio
async def test_unverifiable_attestation_is_not_vouched_for(stub: StubScrubber) -> None:
    async with client_for(stub.url, jwt_secret=None) as client:
        out = await client.scrub_trace(sampled())
    assert out["scrub"]["jti"] is None and "alice@example.com" not in json.dumps(out)


@pytest.mark.asyncio
async def test_bad_record_fails_before_anything_is_sent(stub: StubScrubber) -> None:
    broken = [
        {**sampled(), "schema": "trace.scrubbed/1"},
        {k: v for k, v in sampled().items() if k != "decision"},
        {
            **sampled(),
            "messages": [{"role": "user", "content": 3, "id": "m", "session_id": "s", "idx": 0}],
        },
        {**sampled(), "messages": [{"role": "user", "content": "x"}]},
        {**sampled(), "title": 5},
    ]
    async with client_for(stub.url) as client:
        for record in broken:
            with pytest.raises(ScrubberInputError):
                await client.scrub_trace(record)
    assert stub.stats()["requests"] == 0


def test_bypass_keeps_the_shape_and_says_so_loudly(caplog: pytest.LogCaptureFixture) -> None:
    record = sampled()
    with caplog.at_level(logging.WARNING, logger="pipeline.clients.scrubber"):
        out = bypass_record(record, now_ms=5)
    validate("trace-scrubbed.v2", out)
    assert out["scrub"] == {
        "mode": "bypass",
        "jti": None,
        "engine_version": None,
        "detections": 0,
        "scrubbed_at": 5,
    }
    assert (
        out["messages"][1]["tool_calls"][0]["input"]
        == record["messages"][1]["tool_calls"][0]["input"]
    )
    assert "SCRUBBING DISABLED" in caplog.text


def test_client_construction_checks_and_repr_hides_secrets() -> None:
    with pytest.raises(ValueError, match="pool"):
        ScrubberClient("http://127.0.0.1:1", KEY, JWT, httpx.Timeout(1.0, pool=None))
    with pytest.raises(ValueError):
        ScrubberClient("not a url", KEY, JWT, TIMEOUT)
    with pytest.raises(ValueError):
        ScrubberClient("http://127.0.0.1:1", KEY, None, TIMEOUT, require_attestation=True)
    text = repr(ScrubberClient("http://user:pw@127.0.0.1:1", KEY, JWT, TIMEOUT))
    assert KEY not in text and JWT not in text and "pw" not in text


# ---------------------------------------------------------------- answers no scrubber should give


def json_answer(status: int, body: Any) -> HttpAnswer:
    return HttpAnswer.of(status, json.dumps(body).encode(), {"content-type": "application/json"})


def scrubbing_handler(
    mutate: Callable[[dict[str, Any]], Any] = lambda a: a,
    attest: Callable[[list[Any], list[Any]], str | None] | None = None,
    seen: list[HttpRequest] | None = None,
) -> Callable[[HttpRequest], HttpAnswer]:
    """A well-behaved scrubber (redacts '@' addresses), then `mutate` spoils its answer."""

    def handle(request: HttpRequest) -> HttpAnswer:
        if seen is not None:
            seen.append(request)
        sent = json.loads(request.content)["trace"]
        clean = [{**e, "content": re.sub(r"\S+@\S+", "<EMAIL>", e["content"])} for e in sent]
        answer: dict[str, Any] = {
            "trace": clean,
            "detections": [],
            "mode": "trace",
            "engine_version": "m",
        }
        if attest is not None:
            answer["attestation"] = attest(sent, clean)
        answer = mutate(answer)
        if isinstance(answer, HttpAnswer):
            return answer
        return json_answer(200, answer)

    return handle


def mock_transport(handler: Callable[[HttpRequest], HttpAnswer]) -> Transport:
    async def send(request: HttpRequest) -> HttpAnswer:
        return handler(request)

    return send


def mock_client(
    handler: Callable[[HttpRequest], HttpAnswer], **kwargs: Any
) -> ScrubberClient:
    kwargs.setdefault("jwt_secret", None)
    return client_for("http://scrubber.test", transport=mock_transport(handler), **kwargs)


@pytest.mark.asyncio
async def test_the_request_is_one_trace_call_with_a_stable_index() -> None:
    seen: list[HttpRequest] = []
    async with mock_client(scrubbing_handler(seen=seen), rules=("base", "eu")) as client:
        out = await client.scrub_trace(sampled())
    assert len(seen) == 1
    request = seen[0]
    assert request.method == "POST"
    assert urlsplit(request.url).path == "/v1/scrub" and request.params == {"rules": "base,eu"}
    assert request.headers["x-scrubber-key"] == KEY
    assert request.headers["x-request-id"] == "tr_oc_0123456789abcdef"
    entries = json.loads(request.content)["trace"]
    assert [e["i"] for e in entries] == list(range(len(entries)))
    assert [e["ref"] for e in entries] == [
        "title",
        "directory",
        "m0.content",
        "m1.content",
        "m1.t0.input",
        "m1.t0.output",
        "m1.t1.error",
    ]
    assert json.loads(entries[4]["content"]) == sampled()["messages"][1]["tool_calls"][0]["input"]
    assert all(isinstance(e["content"], str) for e in entries)
    assert out["messages"][1]["tool_calls"][0]["output"] == "notified <EMAIL>"


def _drop_last(a: dict[str, Any]) -> dict[str, Any]:
    return {**a, "trace": a["trace"][:-1]}


def _entry(k: int, **changes: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def mutate(a: dict[str, Any]) -> dict[str, Any]:
        a["trace"][k] = {**a["trace"][k], **changes}
        return a

    return mutate


def _without(k: int, key: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def mutate(a: dict[str, Any]) -> dict[str, Any]:
        del a["trace"][k][key]
        return a

    return mutate


MALFORMED = {
    "not json": lambda a: HttpAnswer.of(200, b"<html>maintenance</html>"),
    "json list": lambda a: a["trace"],
    "no trace": lambda a: {k: v for k, v in a.items() if k != "trace"},
    "trace not a list": lambda a: {**a, "trace": {"0": a["trace"][0]}},
    "one entry short": _drop_last,
    "one entry extra": lambda a: {**a, "trace": [*a["trace"], a["trace"][0]]},
    "entries reordered": lambda a: {**a, "trace": a["trace"][::-1]},
    "ref changed": _entry(2, ref="m9.content"),
    "index changed": _entry(2, i=7),
    "index type changed": _entry(0, i=False),
    "role changed": _entry(2, role="assistant"),
    "content null": _entry(2, content=None),
    "content missing": _without(2, "content"),
    "extra key": _entry(1, leaked="x"),
    "entry not an object": lambda a: {**a, "trace": ["x", *a["trace"][1:]]},
    "text mode answer": lambda a: {**a, "mode": "text"},
    "detections not a list": lambda a: {**a, "detections": 3},
    "attestation not a string": lambda a: {**a, "attestation": 42},
    "NaN in answer": lambda a: HttpAnswer.of(200, b'{"trace": NaN}'),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("mutate", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_answers_fail_closed(mutate: Callable[[dict[str, Any]], Any]) -> None:
    error = await scrub_fails(mock_client(scrubbing_handler(mutate)), ScrubberBadAnswer)
    assert error.retriable and "alice" not in str(error)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("status", "kind", "retriable"),
    [
        (400, ScrubberRejected, False),
        (401, ScrubberRejected, False),
        (404, ScrubberRejected, False),
        (413, ScrubberRejected, False),
        (302, ScrubberRejected, False),
        (429, ScrubberUnavailable, True),
        (503, ScrubberUnavailable, True),
    ],
)
async def test_status_codes_map_onto_the_tree(
    status: int, kind: type[ScrubberError], retriable: bool
) -> None:
    answer = json_answer(status, {"error": "body must include {text} or {trace:[]}"})
    error = await scrub_fails(mock_client(lambda request: answer), kind)
    assert error.retriable is retriable and error.status_code == status


def _client_errors(cls: type[BaseException] = aiohttp.ClientError) -> list[type[BaseException]]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_client_errors(sub)]
    return found


@pytest.mark.asyncio
@pytest.mark.parametrize("error", sorted({aiohttp.ClientError, *_client_errors(), asyncio.TimeoutError},
                                         key=lambda e: e.__name__), ids=lambda e: e.__name__)
async def test_every_client_error_is_translated(error: type[BaseException]) -> None:
    def handler(request: HttpRequest) -> HttpAnswer:
        # their constructors differ; an instance with a message is what the client is handed
        exc = error.__new__(error)
        Exception.__init__(exc, "boom")
        raise exc

    raised = await scrub_fails(mock_client(handler), ScrubberUnavailable)
    expected = "timeout" if issubclass(error, asyncio.TimeoutError) else "transport"
    assert raised.reason == expected


def _valid_token(sent: list[Any], clean: list[Any]) -> str:
    return mint_attestation(compact_json(clean).encode(), JWT, time.time())


ATTESTATIONS = {
    # Valid HS256 over what the scrubber was SENT, not what it answered: the answer was swapped.
    "hash_mismatch": lambda sent, clean: mint_attestation(
        compact_json(sent).encode(), JWT, time.time()
    ),
    "bad_signature": lambda sent, clean: mint_attestation(
        compact_json(clean).encode(), "x" * 32, time.time()
    ),
    "expired": lambda sent, clean: mint_attestation(
        compact_json(clean).encode(), JWT, time.time() - 300
    ),
    "malformed": lambda sent, clean: (
        "e30." + _valid_token(sent, clean).split(".", 1)[1]
    ),  # header {}
}


@pytest.mark.asyncio
@pytest.mark.parametrize(("why", "attest"), ATTESTATIONS.items(), ids=ATTESTATIONS.keys())
async def test_attestations_that_do_not_verify_fail_closed(
    why: str, attest: Callable[[list[Any], list[Any]], str]
) -> None:
    error = await scrub_fails(mock_client(scrubbing_handler(attest=attest), jwt_secret=JWT), ScrubberAttestationError)
    assert error.why == why


@pytest.mark.asyncio
async def test_attestation_hash_is_over_json_stringify_not_the_wire_bytes() -> None:
    """The answer's spacing and escapes are the server's; the hash covers compact JSON."""

    def handle(request: HttpRequest) -> HttpAnswer:
        sent = json.loads(request.content)["trace"]
        clean = [{**e, "content": e["content"] + " ✓"} for e in sent]
        token = mint_attestation(compact_json(clean).encode(), JWT, time.time())
        wire = json.dumps({"trace": clean, "attestation": token}, indent=2, ensure_ascii=True)
        return HttpAnswer.of(200, wire.encode())

    async with mock_client(handle, jwt_secret=JWT) as client:
        out = await client.scrub_trace(sampled())
    assert out["title"].endswith(" ✓") and out["scrub"]["jti"]


@pytest.mark.asyncio
async def test_the_request_and_the_attested_hash_are_compact_json_whatever_the_text() -> None:
    """The request body is compact_json's text of the entries, and the hash the attestation must
    cover is compact_json's of the answer, also where orjson cannot write them (a lone surrogate,
    which JSON.stringify escapes) and for a tool input that is not plain JSON (an int past 64
    bits, a float written with an exponent)."""
    record = sampled()
    record["title"] = "cut mid-emoji \ud83d"
    record["messages"][1]["tool_calls"][0]["input"] = {"big": 2**70, "tiny": 1e-7, "x": [0.5, None]}
    hashed: list[str] = []

    def attest(sent: list[Any], clean: list[Any]) -> str:
        hashed.append(compact_json(clean))
        return mint_attestation(compact_json(clean).encode(), JWT, time.time())

    seen: list[HttpRequest] = []
    async with mock_client(scrubbing_handler(attest=attest, seen=seen), jwt_secret=JWT) as client:
        out = await client.scrub_trace(record)
    sent = json.loads(seen[0].content)["trace"]
    assert seen[0].content == compact_json({"trace": sent}).encode()
    assert "\\ud83d" in seen[0].content.decode() and sent[0]["content"] == record["title"]
    assert sent[4]["content"] == compact_json(record["messages"][1]["tool_calls"][0]["input"])
    assert "\\ud83d" in hashed[0] and out["scrub"]["jti"]  # the attestation verified
    assert out["title"] == record["title"]


@pytest.mark.asyncio
async def test_a_tool_input_the_scrubber_leaves_alone_comes_back_as_json_reads_it() -> None:
    """Unchanged inputs are not parsed again, changed ones are: either way the value is what
    json.loads makes of the returned text (same types, same key order)."""
    record = sampled()
    calls = record["messages"][1]["tool_calls"]
    calls[1]["input"] = {"z": 1, "a": [True, None, 0.25, -0.0], "s": "plain", "n": {"k": 2**63}}
    async with mock_client(scrubbing_handler()) as client:
        out = await client.scrub_trace(record)
    kept = out["messages"][1]["tool_calls"][1]["input"]
    expected = json.loads(compact_json(calls[1]["input"]))
    assert kept == expected and list(kept) == ["z", "a", "s", "n"]
    assert [type(v) for v in kept["a"]] == [bool, type(None), float, float] and str(kept["a"][3]) == "-0.0"
    # the other input had addresses in it: redacted, quotes and all, it is no JSON and stays text
    assert out["messages"][1]["tool_calls"][0]["input"] == re.sub(r"\S+@\S+", "<EMAIL>",
                                                                   compact_json(calls[0]["input"]))
