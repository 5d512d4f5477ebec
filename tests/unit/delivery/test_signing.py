"""pipeline.delivery.signing: the panel body, its HMAC, and the attestation as the panel verifies it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from typing import Any

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.delivery.signing import (
    ATTESTATION_TTL_S,
    AttestationError,
    attest,
    attestable_scrub,
    attestation_age_s,
    canonical_body,
    mint_attestation,
    needs_refresh,
    secret_env_name,
    sha256_hex,
    sign,
    verify_attestation,
)
from pipeline.errors import RecordError
from pipeline.model.records import compact_json

SECRET = "jwt-secret-for-tests-at-least-32-bytes"
NOW = 1_750_000_000.0


def scrubbed(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "schema": "trace.scrubbed/1",
        "trace_id": "tr_oc_0123456789abcdef",
        "snapshot_id": "snp_" + "0" * 32,
        "host": "h1",
        "site_key": "pk_test_thirdparty",
        "session_id": "ses_abc",
        "project_id": "prj",
        "directory": "/srv/<USER_1>/proj",
        "title": "t",
        "messages": [
            {
                "role": "user",
                "content": "héllo ✓",
                "id": "msg_1",
                "session_id": "ses_abc",
                "idx": 0,
            },
            {
                "role": "assistant",
                "content": "done",
                "id": "msg_2",
                "session_id": "ses_abc",
                "idx": 1,
                "tool_calls": [
                    {
                        "name": "bash",
                        "status": "completed",
                        "error": None,
                        "input": {"z": 1, "a": "ls"},
                        "output": "x",
                    }
                ],
            },
        ],
        "decision": {
            "forward": True,
            "reason": "novelty",
            "novelty": 0.9,
            "rate": 0.05,
            "policy_version": "p1",
            "detail": "",
        },
        "sampled_at": 1,
        "scrub": {
            "mode": "trace",
            "jti": None,
            "engine_version": None,
            "detections": 0,
            "scrubbed_at": 2,
        },
    }
    record.update(overrides)
    return record


def b64(obj: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], secret: str = SECRET) -> str:
    signing_input = f"{b64(header)}.{b64(claims)}"
    sig = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + base64.urlsafe_b64encode(sig).rstrip(b"=").decode()


def claims_for(body: bytes, iat: float, **overrides: Any) -> dict[str, Any]:
    claims = {
        "jti": "0" * 32,
        "iat": iat,
        "exp": iat + ATTESTATION_TTL_S,
        "input_hash": "x",
        "output_hash": sha256_hex(body),
        "mode": "trace",
        "engine_version": "t",
    }
    claims.update(overrides)
    return claims


# ---------------------------------------------------------------- names and bytes


@pytest.mark.parametrize(
    ("site_key", "name"),
    [
        ("pk_test_thirdparty", "PANEL_INGEST_SECRET_PK_TEST_THIRDPARTY"),
        ("pk-live.site:2", "PANEL_INGEST_SECRET_PK_LIVE_SITE_2"),
        ("Mixed Case", "PANEL_INGEST_SECRET_MIXED_CASE"),
        ("ké", "PANEL_INGEST_SECRET_K_"),
    ],
)
def test_secret_env_name(site_key: str, name: str) -> None:
    assert secret_env_name(site_key) == name


def test_canonical_body_is_the_panel_shape_compact_and_utf8() -> None:
    body = canonical_body(scrubbed(), "opencode", "0.1.0")
    parsed = json.loads(body.decode("utf-8"))
    assert set(parsed) == {"trace_id", "source_agent", "blob"}
    assert parsed["trace_id"] == "tr_oc_0123456789abcdef"
    assert parsed["source_agent"] == "opencode"
    assert set(parsed["blob"]) == {
        "session_id",
        "project_id",
        "directory",
        "messages",
        "reason",
        "plugin_version",
        "prompt_ref",
        "agent_id",
        "pair_id",
        "reasons",
    }
    assert parsed["blob"]["reason"] == "novelty"
    # a trace.scrubbed/1 record (from before pairs) has neither pair nor prompt: null, its reason its one fact
    assert parsed["blob"]["pair_id"] is None and parsed["blob"]["prompt_ref"] is None
    assert parsed["blob"]["reasons"] == ["novelty"]
    assert parsed["blob"]["messages"] == scrubbed()["messages"]
    assert b": " not in body and b", " not in body
    assert "héllo ✓".encode() in body  # raw UTF-8, not \\u escapes


def test_canonical_body_is_deterministic_whatever_the_key_order() -> None:
    record = scrubbed()
    shuffled = json.loads(json.dumps(record, sort_keys=True))
    shuffled["messages"][1]["tool_calls"][0]["input"] = {"a": "ls", "z": 1}
    assert canonical_body(record, "opencode", "1") == canonical_body(shuffled, "opencode", "1")


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(alphabet=st.characters(), max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=12)


@given(_JSON_VALUES, st.booleans())
def test_compact_json_is_json_text_whichever_writer_wrote_it(value: Any, sort_keys: bool) -> None:
    # orjson writes plain JSON; json (with the lone-surrogate escape) the rest: the same bytes
    # either way, since the scrubber's Node side hashes what JSON.stringify writes
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys)
    expected = re.sub(r"[\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", text)
    assert compact_json(value, sort_keys=sort_keys) == expected


@given(_JSON_VALUES)
def test_canonical_body_says_what_the_record_holds_whichever_writer_wrote_it(content: Any) -> None:
    # orjson writes the body when it can and json when it cannot (a lone surrogate, a huge int):
    # the bytes may differ in spelling (1e-05 / 0.00001) but never in value, and they are
    # always UTF-8 the panel can parse
    record = scrubbed()
    record["messages"][0]["content"] = content
    body = canonical_body(record, "opencode", "1")
    expected = json.loads(canonical_body(scrubbed(), "opencode", "1"))
    expected["blob"]["messages"][0]["content"] = content
    assert json.loads(body.decode("utf-8")) == expected


def test_canonical_body_escapes_a_lone_surrogate_as_javascript_does() -> None:
    record = scrubbed()
    record["messages"][0]["content"] = "cut \ud83d"
    assert b'"cut \\ud83d"' in canonical_body(record, "opencode", "1")


def test_canonical_body_refuses_a_record_that_was_never_scrubbed() -> None:
    record = scrubbed(schema="trace.sampled/1")
    del record["scrub"]
    with pytest.raises(ValueError, match="never scrubbed"):
        canonical_body(record, "opencode", "1")


def test_canonical_body_escapes_lone_surrogates_as_javascript_does() -> None:
    record = scrubbed()
    record["messages"][0]["content"] = "bad \ud800 half"
    body = canonical_body(record, "opencode", "1")
    assert b"bad \\ud800 half" in body
    assert json.loads(body)["blob"]["messages"][0]["content"] == "bad \ud800 half"


def test_compact_json_matches_json_stringify() -> None:
    # What Node prints for JSON.stringify([{"b":"é\n\u0001","a":[1,null,true]}]).
    value = [{"b": "é\n\u0001", "a": [1, None, True]}]
    assert compact_json(value) == '[{"b":"é\\n\\u0001","a":[1,null,true]}]'


@given(st.text(), st.text())
def test_canonical_body_round_trips_any_text(content: str, directory: str) -> None:
    record = scrubbed(directory=directory)
    record["messages"][0]["content"] = content
    parsed = json.loads(canonical_body(record, "opencode", "1"))
    assert parsed["blob"]["messages"][0]["content"] == content
    assert parsed["blob"]["directory"] == directory


def test_sign_is_lower_hex_hmac_sha256() -> None:
    # RFC 4231 test case 2.
    assert (
        sign(b"what do ya want for nothing?", "Jefe")
        == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    )


def test_sign_refuses_an_empty_secret() -> None:
    with pytest.raises(ValueError):
        sign(b"{}", "")


# ---------------------------------------------------------------- attestation


def test_minted_attestation_has_the_contract_claims_and_pyjwt_agrees() -> None:
    body = canonical_body(scrubbed(), "opencode", "1")
    token = mint_attestation(body, SECRET, NOW + 0.7, input_hash="ab" * 32)
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "HS256", "typ": "JWT"}
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert re.fullmatch(r"[0-9a-f]{32}", claims["jti"])
    assert claims["iat"] == int(NOW) and claims["exp"] == int(NOW) + 300
    assert claims["output_hash"] == hashlib.sha256(body).hexdigest()
    assert claims["input_hash"] == "ab" * 32
    assert claims["mode"] == "trace" and isinstance(claims["engine_version"], str)
    assert verify_attestation(token, SECRET, hashlib.sha256(body).hexdigest(), NOW) == claims


def test_each_attestation_has_its_own_jti() -> None:
    jtis = {
        jwt.decode(mint_attestation(b"{}", SECRET, NOW), options={"verify_signature": False})["jti"]
        for _ in range(20)
    }
    assert len(jtis) == 20


def test_verify_accepts_a_pyjwt_token() -> None:
    body = b'{"a":1}'
    token = jwt.encode(claims_for(body, int(NOW)), SECRET, algorithm="HS256")
    assert verify_attestation(token, SECRET, sha256_hex(body), NOW)["jti"] == "0" * 32


BODY = b'{"trace_id":"tr_oc_00000000"}'
GOOD_HEADER = {"alg": "HS256", "typ": "JWT"}


@pytest.mark.parametrize(
    ("token", "why"),
    [
        ("only.two", "malformed"),
        ("a.b.c.d", "malformed"),
        ("", "malformed"),
        (forge({"alg": "none", "typ": "JWT"}, claims_for(BODY, NOW)), "malformed"),
        (forge({"alg": "HS512", "typ": "JWT"}, claims_for(BODY, NOW)), "malformed"),
        (forge({"typ": "JWT"}, claims_for(BODY, NOW)), "malformed"),
        ("!!!." + b64(claims_for(BODY, NOW)) + ".abc", "malformed"),
        (b64(GOOD_HEADER) + ".bm90IGpzb24." + "abc", "malformed"),
        (forge(GOOD_HEADER, claims_for(BODY, NOW), secret="other"), "bad_signature"),
        (forge(GOOD_HEADER, claims_for(BODY, NOW - 300)), "expired"),  # exp == now
        (forge(GOOD_HEADER, claims_for(BODY, NOW - 1000)), "expired"),
        (forge(GOOD_HEADER, claims_for(BODY, NOW - 301, exp=NOW + 60)), "stale"),
        (forge(GOOD_HEADER, claims_for(BODY, NOW, output_hash="0" * 64)), "hash_mismatch"),
        (forge(GOOD_HEADER, claims_for(BODY, NOW, output_hash=None)), "hash_mismatch"),
        (forge(GOOD_HEADER, claims_for(BODY, NOW, exp="soon")), "malformed"),
    ],
)
def test_verify_refuses_with_the_panels_code(token: str, why: str) -> None:
    with pytest.raises(AttestationError) as info:
        verify_attestation(token, SECRET, sha256_hex(BODY), NOW)
    assert info.value.why == why


def test_alg_none_with_an_empty_signature_is_refused() -> None:
    token = f"{b64({'alg': 'none'})}.{b64(claims_for(BODY, NOW))}."
    with pytest.raises(AttestationError) as info:
        verify_attestation(token, SECRET, sha256_hex(BODY), NOW)
    assert info.value.why == "malformed"


def test_tampered_claims_break_the_signature() -> None:
    token = mint_attestation(BODY, SECRET, NOW)
    header, _, sig = token.split(".")
    tampered = f"{header}.{b64(claims_for(BODY, NOW, mode='text'))}.{sig}"
    with pytest.raises(AttestationError) as info:
        verify_attestation(tampered, SECRET, sha256_hex(BODY), NOW)
    assert info.value.why == "bad_signature"


@pytest.mark.parametrize("secret", [None, ""])
def test_verify_without_a_secret_is_no_secret(secret: str | None) -> None:
    token = mint_attestation(BODY, SECRET, NOW)
    with pytest.raises(AttestationError) as info:
        verify_attestation(token, secret, sha256_hex(BODY), NOW)
    assert info.value.why == "no_secret"


def test_attestation_is_accepted_until_just_before_exp() -> None:
    token = mint_attestation(BODY, SECRET, NOW)
    verify_attestation(token, SECRET, sha256_hex(BODY), NOW + 299.9)
    with pytest.raises(AttestationError):
        verify_attestation(token, SECRET, sha256_hex(BODY), NOW + 300)


def test_error_text_never_holds_the_secret() -> None:
    with pytest.raises(AttestationError) as info:
        verify_attestation(forge(GOOD_HEADER, claims_for(BODY, NOW), "x"), SECRET, "h", NOW)
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)


def test_attestation_age_and_refresh() -> None:
    token = mint_attestation(BODY, SECRET, NOW)
    assert attestation_age_s(token, NOW + 42.5) == pytest.approx(42.5)
    with pytest.raises(AttestationError):
        attestation_age_s("garbage", NOW)
    assert needs_refresh(None, NOW, 120)
    assert not needs_refresh(NOW - 119, NOW, 120)
    assert needs_refresh(NOW - 120, NOW, 120)
    for bad in (0, 300, 400, -1):
        with pytest.raises(ValueError):
            needs_refresh(NOW, NOW, bad)


# ---------------------------------------------------------------- what an attestation may claim


ATTESTED_BODY = b'{"trace_id":"tr_1"}'


def _scrubbed(mode: str = "trace", jti: str | None = "a" * 32) -> dict[str, Any]:
    return {"schema": "trace.scrubbed/1",
            "scrub": {"mode": mode, "jti": jti, "engine_version": "scrubber-proxy/0.6.0", "input_hash": "b" * 64,
                      "detections": 2, "scrubbed_at": 1}}


def test_bypassed_scrubbing_is_never_attested() -> None:
    assert attestable_scrub(_scrubbed("bypass", None), scrubbing_bypassed=True, verifying=True) is None
    assert attestable_scrub(_scrubbed(), scrubbing_bypassed=True, verifying=True) is None


@pytest.mark.parametrize("record", [_scrubbed("bypass", None), {"schema": "trace.scrubbed/1"},
                                    {"schema": "trace.scrubbed/1", "scrub": "trace"}])
def test_with_scrubbing_configured_a_trace_without_a_trace_mode_result_is_refused(record: dict[str, Any]) -> None:
    with pytest.raises(RecordError) as refused:
        attestable_scrub(record, scrubbing_bypassed=False, verifying=True)
    assert refused.value.reason == "not_scrubbed"


@pytest.mark.parametrize("jti", [None, ""])
def test_a_verifying_stage_refuses_a_trace_without_the_verified_jti(jti: str | None) -> None:
    with pytest.raises(RecordError) as refused:
        attestable_scrub(_scrubbed(jti=jti), scrubbing_bypassed=False, verifying=True)
    assert refused.value.reason == "unverified_scrub"
    # without the secret nothing is verified and nothing is minted, but the trace still passed the scrubber
    assert attestable_scrub(_scrubbed(jti=jti), scrubbing_bypassed=False, verifying=False) is None


def test_the_attestation_claims_the_scrubbers_verified_result() -> None:
    scrub = attestable_scrub(_scrubbed(), scrubbing_bypassed=False, verifying=True)
    assert scrub is not None
    claims = verify_attestation(attest(ATTESTED_BODY, SECRET, NOW, scrub), SECRET, sha256_hex(ATTESTED_BODY), NOW)
    assert claims["jti"] == "a" * 32
    assert claims["mode"] == "trace"
    assert claims["engine_version"] == "scrubber-proxy/0.6.0"
    assert claims["input_hash"] == "b" * 64 != claims["output_hash"]
