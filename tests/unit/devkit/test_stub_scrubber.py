"""The stub scrubber over real HTTP: seeded secrets never survive, and its attestation is
one pipeline.delivery.signing verifies."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devkit.stubs.scrubber import PACKS, Redactor, ScrubberStubConfig, StubScrubber
from pipeline.delivery.signing import sha256_hex, verify_attestation
from pipeline.model.records import compact_json
from tests.unit.devkit.stub_process import stub_process

KEY = "scrubber-api-key"
JWT = "scrubber-jwt-secret-at-least-32-bytes!"

SEEDED = [
    ("mail alice.smith+tag@example.co.uk now", "alice.smith+tag@example.co.uk", "EMAIL"),
    (
        "key sk-abcdefghijklmnopqrstuvwxyz0123456789AB",
        "sk-abcdefghijklmnopqrstuvwxyz0123456789AB",
        "OPENAI_KEY",
    ),
    ("sk-proj-Abc_def-0123456789abcdefghijKLMN", "Abc_def-0123456789abcdefghijKLMN", "OPENAI_KEY"),
    (
        "use sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWxYz0123",
        "AbCdEfGhIjKlMnOpQrStUvWxYz0123",
        "ANTHROPIC_KEY",
    ),
    ("aws AKIAIOSFODNN7EXAMPLE here", "AKIAIOSFODNN7EXAMPLE", "AWS_KEY"),
    (
        "gh ghp_0123456789abcdefghijABCDEFGHIJ012345",
        "ghp_0123456789abcdefghijABCDEFGHIJ012345",
        "GITHUB_TOKEN",
    ),
    ("export OPENAI_API_KEY=notshapedlikeakey42", "notshapedlikeakey42", "SECRET"),
    ("DB_PASSWORD=hunter2 ./run", "hunter2", "SECRET"),
    ("STRIPE_SECRET: 'correct horse battery'", "correct horse battery", "SECRET"),
    ('{"api_key": "0123456789abcdef0123"}', "0123456789abcdef0123", "SECRET"),
    ("password = swordfish", "swordfish", "SECRET"),
    ("Authorization: Bearer abcdefghijklmnop1234.xyz", "abcdefghijklmnop1234", "SECRET"),
    ("xoxb-1234567890-abcdefghij", "xoxb-1234567890-abcdefghij", "SLACK_TOKEN"),
    (
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----",
        "MIIEow",
        "PRIVATE_KEY",
    ),
]


@pytest.fixture(scope="module")
def stub() -> Iterator[StubScrubber]:
    with StubScrubber(ScrubberStubConfig(api_key=KEY, jwt_secret=JWT)).in_thread() as server:
        yield server


@pytest.fixture
def http(stub: StubScrubber) -> Iterator[httpx.Client]:
    stub.reset()
    with httpx.Client(base_url=stub.url, headers={"x-scrubber-key": KEY}, timeout=10) as client:
        yield client


def scrub(http: httpx.Client, body: Any, path: str = "/v1/scrub") -> dict[str, Any]:
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize(("text", "secret", "category"), SEEDED)
def test_seeded_secret_never_survives(
    http: httpx.Client, text: str, secret: str, category: str
) -> None:
    answer = scrub(http, {"text": text})
    assert secret not in answer["text"]
    assert f"<{category}_1>" in answer["text"]
    assert {"token": f"<{category}_1>", "category": category, "pack": "base"} in answer[
        "detections"
    ]
    assert answer["mode"] == "text"
    assert secret not in json.dumps(answer)  # not echoed in detections or anywhere else


def test_assignment_keeps_the_name_and_replaces_the_value(http: httpx.Client) -> None:
    answer = scrub(
        http, {"text": "OPENAI_API_KEY=sk-abcdefghijklmnopqrstuvwx and SECRET_TOKEN=abc"}
    )
    assert answer["text"] == "OPENAI_API_KEY=<OPENAI_KEY_1> and SECRET_TOKEN=<SECRET_1>"


def test_same_value_same_placeholder_across_a_request(http: httpx.Client) -> None:
    answer = scrub(
        http,
        {
            "trace": [
                {"role": "user", "content": "a@x.io b@x.io"},
                {"role": "assistant", "content": "write to a@x.io"},
            ]
        },
    )
    assert answer["trace"][0]["content"] == "<EMAIL_1> <EMAIL_2>"
    assert answer["trace"][1]["content"] == "write to <EMAIL_1>"


def test_trace_mode_scrubs_only_content_and_passes_other_keys(http: httpx.Client) -> None:
    sent = [
        {
            "i": 0,
            "ref": "m0.content",
            "role": "user",
            "content": "me@corp.com",
            "extra": {"k": "me@corp.com"},
        },
        {"role": "tool", "content": {"command": "export GH_TOKEN=ghp_" + "a" * 36}},
        {"role": "system"},
    ]
    answer = scrub(http, {"trace": sent})
    got = answer["trace"]
    assert answer["mode"] == "trace"
    assert [list(e) for e in got] == [list(e) for e in sent]
    assert got[0] == {**sent[0], "content": "<EMAIL_1>"}  # other keys untouched, even secrets
    # Non-string content is JSON-encoded first, and the redaction keeps it valid JSON.
    assert json.loads(got[1]["content"]) == {"command": "export GH_TOKEN=<GITHUB_TOKEN_1>"}
    assert got[2] == {"role": "system"}


def test_redaction_inside_json_encoded_text_keeps_it_parseable(http: httpx.Client) -> None:
    value = {"cmd": 'DB_PASSWORD="two words" API_KEY=xyz', "env": {"AWS_SECRET": "abc", "n": 3}}
    answer = scrub(http, {"text": compact_json(value)})
    parsed = json.loads(answer["text"])
    assert parsed["cmd"] == 'DB_PASSWORD="<SECRET_1>" API_KEY=<SECRET_2>'
    assert parsed["env"] == {"AWS_SECRET": "<SECRET_3>", "n": 3}


def test_trace_attestation_verifies_with_pipeline_signing(
    http: httpx.Client, stub: StubScrubber
) -> None:
    sent = [
        {"role": "user", "content": "héllo bob@example.com ✓"},
        {"role": "tool", "content": [1, "x"]},
    ]
    answer = scrub(http, {"trace": sent})
    output_hash = sha256_hex(compact_json(answer["trace"]))
    claims = verify_attestation(answer["attestation"], JWT, output_hash, stub.clock())
    assert claims["input_hash"] == sha256_hex(compact_json(sent))
    assert claims["mode"] == "trace" and claims["engine_version"] == answer["engine_version"]
    assert answer["attestation_meta"] == {
        k: claims[k] for k in ("jti", "iat", "exp", "input_hash", "output_hash")
    }
    assert re.fullmatch(r"[0-9a-f]{32}", claims["jti"])
    assert answer["mapping_id"] and answer["rules_applied"] == ["base"]


def test_text_attestation_hashes_the_text(http: httpx.Client, stub: StubScrubber) -> None:
    answer = scrub(http, {"text": "call me at x@y.org", "mode": "text"})
    claims = verify_attestation(
        answer["attestation"], JWT, sha256_hex(answer["text"]), stub.clock()
    )
    assert claims["input_hash"] == sha256_hex("call me at x@y.org")
    assert claims["mode"] == "text"


def test_no_attestation_without_a_jwt_secret() -> None:
    with StubScrubber().in_thread() as server:
        answer = httpx.post(server.url + "/v1/scrub", json={"text": "x"}, timeout=5).json()
    assert "attestation" not in answer and "attestation_meta" not in answer


@pytest.mark.parametrize(
    "body",
    [
        b"{}",
        b'{"text": 1}',
        b'{"trace": "x"}',
        b"not json",
        b'{"trace": [1]}',
        b"[]",
        b'{"text": NaN}',
    ],
)
def test_bad_body_is_400(http: httpx.Client, body: bytes) -> None:
    response = http.post("/v1/scrub", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json() == {"error": "body must include {text} or {trace:[]}"}


@pytest.mark.parametrize("headers", [{}, {"x-scrubber-key": "wrong"}])
def test_missing_or_wrong_key_is_401(stub: StubScrubber, headers: dict[str, str]) -> None:
    response = httpx.post(stub.url + "/v1/scrub", json={"text": "x"}, headers=headers, timeout=5)
    assert response.status_code == 401
    assert httpx.get(stub.url + "/health", timeout=5).status_code == 200  # no auth for liveness


def test_unknown_tenant_is_404() -> None:
    config = ScrubberStubConfig(tenants=frozenset({"acme"}))
    with StubScrubber(config).in_thread() as server:
        post = lambda tenant: httpx.post(  # noqa: E731
            server.url + "/v1/scrub", json={"text": "x"}, headers={"x-tenant-id": tenant}, timeout=5
        )
        assert post("acme").status_code == 200
        response = post("other")
    assert response.status_code == 404 and response.json() == {"error": "tenant_not_found"}


def test_rule_packs(http: httpx.Client) -> None:
    iban = "DE89 3704 0044 0532 0130 00"
    assert iban in scrub(http, {"text": iban})["text"]
    eu = http.post("/v1/scrub?rules=base,eu", json={"text": iban}).json()
    assert eu["text"] == "<IBAN_1>" and eu["rules_applied"] == ["base", "eu"]
    assert http.post("/v1/scrub?rules=nope", json={"text": "x"}).status_code == 400


def test_scrub_alias_and_metrics(http: httpx.Client) -> None:
    assert scrub(http, {"text": "a@b.cd"}, path="/scrub")["text"] == "<EMAIL_1>"
    metrics = http.get("/metrics").text
    assert 'scrubber_requests_total{mode="text",status="200"} 1' in metrics
    assert 'scrubber_detections_total{category="EMAIL"} 1' in metrics


def test_fault_knobs_over_http(http: httpx.Client) -> None:
    assert (
        http.post(
            "/_stub/faults", json={"fail_next": 2, "status": 429, "retry_after_s": 7}
        ).status_code
        == 200
    )
    for _ in range(2):
        response = http.post("/v1/scrub", json={"text": "x"})
        assert response.status_code == 429 and response.headers["retry-after"] == "7"
    assert http.post("/v1/scrub", json={"text": "x"}).status_code == 200
    http.post("/_stub/faults", json={"fail_for_s": 30, "status": 503})
    assert http.post("/v1/scrub", json={"text": "x"}).status_code == 503
    assert http.get("/health").status_code == 503  # a down scrubber is down everywhere
    http.post("/_stub/faults", json={"reset": True})
    assert http.post("/v1/scrub", json={"text": "x"}).status_code == 200
    stats = http.get("/_stub/stats").json()
    assert stats["faulted"] == 4 and stats["scrubs"] == 2
    bad = http.post("/_stub/faults", json={"fail_nxt": 1})
    assert bad.status_code == 400 and "fail_nxt" in bad.json()["detail"]


# ---------------------------------------------------------------- property: nothing survives

_SEP = st.sampled_from([" ", "\n", "\t", '"', "'", "=", ": ", ",", "(", "`"])
_FILLER = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
_EMAILS = st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,15}@[a-z0-9]{1,10}\.[a-z]{2,6}", fullmatch=True)
_SK = st.from_regex(r"sk-[A-Za-z0-9_-]{20,48}", fullmatch=True)
_AKIA = st.from_regex(r"AKIA[A-Z0-9]{16}", fullmatch=True)
_GHP = st.from_regex(r"ghp_[A-Za-z0-9]{36,40}", fullmatch=True)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    before=_FILLER,
    sep1=_SEP,
    secret=st.one_of(_EMAILS, _SK, _AKIA, _GHP),
    sep2=_SEP,
    after=_FILLER,
)
def test_generated_secrets_never_survive(
    http: httpx.Client, before: str, sep1: str, secret: str, sep2: str, after: str
) -> None:
    text = before + sep1 + secret + sep2 + after
    answer = scrub(http, {"trace": [{"role": "user", "content": text}]})
    assert secret not in answer["trace"][0]["content"]


# ---------------------------------------------------------------- its own process


def test_main_runs_as_its_own_process_with_secrets_from_the_environment() -> None:
    env = {**os.environ, "SCRUBBER_API_KEY": KEY, "SCRUBBER_JWT_SECRET": JWT}
    with stub_process("scrubber", [], env) as url:
        assert httpx.post(url + "/v1/scrub", json={"text": "x"}, timeout=5).status_code == 401
        answer = httpx.post(
            url + "/v1/scrub",
            json={"text": "a@b.cd"},
            headers={"x-scrubber-key": KEY},
            timeout=5,
        ).json()
        assert answer["text"] == "<EMAIL_1>" and answer["attestation"]


# Fragments around the keyword-prefiltered rules: their keywords in odd cases (the long s and the
# Kelvin sign match `s` and `k` under re.IGNORECASE; the dotted capital I does not lower to `i`),
# assignment marks, quotes and token-looking values.
_FRAGMENTS = st.sampled_from([
    "password", "PASSWORD", "pa\u017f\u017fword", "Passwd", "pwd", "secret", "SECRET_KEY", "credent\u0130al",
    "Credential", "api_key", "api-KEY", "access_key", "private-key", "token", "TOKEN", "auth", "AUTH",
    "Kelvin_\u212aey", "bearer", "Bearer ", "=", ":", " = ", '"', "'", "\\\"", " ", "\n", "x", "_", "-", "null",
    "abcdefghijklmnop0123", "s3cr3t-value", "<SECRET_1>",
])


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_FRAGMENTS, max_size=14).map("".join))
def test_the_keyword_prefilter_changes_no_redaction(text: str) -> None:
    # the prefilter only skips a rule whose keyword is nowhere in the text: same text, same detections
    filtered = Redactor(PACKS)
    unfiltered = Redactor(PACKS)
    unfiltered.rules = [dataclasses.replace(rule, keyword=None) for rule in unfiltered.rules]
    assert any(rule.keyword is not None for rule in filtered.rules)
    assert filtered.scrub(text) == unfiltered.scrub(text)
    assert filtered.detections == unfiltered.detections
