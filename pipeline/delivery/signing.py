"""The panel's request body, its HMAC signature and the scrubber attestation (HS256 JWT).

Everything here is pure: time comes in as `now` (epoch seconds), secrets as arguments.
The verifier mirrors the panel's, and its `why` codes are the panel's 422 suffixes
(`scrubber_attestation_<why>`), so the stub panel and the scrubber client share it and a
token this module accepts is one the panel accepts.

Hand-rolled rather than PyJWT so that each refusal maps onto exactly one panel code, in the
panel's order, and no other algorithm can ever be negotiated (tests cross-check with PyJWT).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import secrets
from collections.abc import Mapping
from typing import Any, Literal

from pipeline import __version__
from pipeline.errors import RecordError
from pipeline.model.records import compact_json

try:
    import orjson
except ImportError:  # a dependency; without it bodies are written by json (same values)
    orjson = None  # type: ignore[assignment]

__all__ = [
    "ATTESTATION_TTL_S",
    "ENGINE_VERSION",
    "AttestationError",
    "AttestationWhy",
    "attest",
    "attestable_scrub",
    "attestation_age_s",
    "canonical_body",
    "mint_attestation",
    "needs_refresh",
    "secret_env_name",
    "sha256_hex",
    "sign",
    "verify_attestation",
]

ATTESTATION_TTL_S = 300
SCRUBBED_SCHEMAS = ("trace.scrubbed/1", "trace.scrubbed/2")
ENGINE_VERSION = f"opencode-panel-pipeline/{__version__}"
AttestationWhy = Literal[
    "malformed", "bad_signature", "expired", "stale", "hash_mismatch", "no_secret"
]

_HEADER = {"alg": "HS256", "typ": "JWT"}
_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")


class AttestationError(ValueError):
    """An attestation the panel would refuse; `why` is the panel's code suffix."""

    def __init__(self, why: AttestationWhy, detail: str = "") -> None:
        super().__init__(f"scrubber attestation {why}" + (f": {detail}" if detail else ""))
        self.why: AttestationWhy = why


# ---------------------------------------------------------------- bytes


def sha256_hex(data: bytes | str) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def secret_env_name(site_key: str) -> str:
    """`pk_test_thirdparty` -> `PANEL_INGEST_SECRET_PK_TEST_THIRDPARTY`, as the panel derives it."""
    return "PANEL_INGEST_SECRET_" + re.sub(r"[^A-Z0-9]", "_", site_key.upper())


def canonical_body(
    trace_record: Mapping[str, Any], source_agent: str, plugin_version: str
) -> bytes:
    """The exact panel request body for a scrubbed trace record (`trace.scrubbed/1` or `/2`).

    Sorted keys make the bytes a function of the record alone, so signing the same record
    twice gives the same body. The record must have been through the scrub stage (its
    `scrub` block is there, whether the scrubber ran or was bypassed on purpose): anything
    else has not been scrubbed and must not become a panel body.
    """
    if trace_record.get("schema") not in SCRUBBED_SCHEMAS or not isinstance(
        trace_record.get("scrub"), Mapping
    ):
        raise ValueError(
            "canonical_body needs a trace.scrubbed record: this one was never scrubbed"
        )
    decision = trace_record["decision"]
    body = {
        "trace_id": trace_record["trace_id"],
        "source_agent": source_agent,
        "blob": {
            "session_id": trace_record["session_id"],
            "project_id": trace_record["project_id"],
            "directory": trace_record["directory"],
            "messages": trace_record["messages"],
            "reason": decision["reason"],
            "plugin_version": plugin_version,
            # what the panel pairs by (also on each message) and the pair the sampler formed
            "prompt_ref": trace_record.get("prompt_ref"),
            "agent_id": trace_record.get("agent_id"),
            "pair_id": (decision.get("pair") or {}).get("pair_id"),
            "reasons": decision.get("facts") or [decision["reason"]],
        },
    }
    if orjson is not None:
        # The panel hashes and verifies the bytes it receives, whatever their spelling, so the
        # body need only be a faithful JSON text of the record: orjson writes one in a sixth of
        # json's time. Its one unfaithful case, NaN/Infinity written as null, cannot occur in a
        # record that came through records.decode, which refuses both; a lone surrogate or an
        # integer beyond 64 bits, which orjson refuses, takes compact_json's path.
        try:
            return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            pass
    return compact_json(body, sort_keys=True).encode("utf-8")


def sign(body: bytes, secret: str) -> str:
    """Lower-case hex HMAC-SHA256 of the raw body bytes (`X-Panel-Ingest-Sig`)."""
    if not secret:
        raise ValueError("refusing to sign with an empty secret")
    return hmac.digest(secret.encode("utf-8"), body, "sha256").hex()


# ---------------------------------------------------------------- attestation JWT


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(part: str) -> bytes:
    # urlsafe_b64decode silently skips characters outside the alphabet; a token with them is
    # not one the panel's decoder would read the same way, so refuse it outright.
    if not _B64URL.match(part) or len(part) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


_HEADER_B64 = _b64url(compact_json(_HEADER).encode("utf-8"))


def _hs256(signing_input: str, secret: str) -> bytes:
    return hmac.digest(secret.encode("utf-8"), signing_input.encode("ascii"), "sha256")


def mint_attestation(
    body: bytes,
    secret: str,
    now: float,
    input_hash: str | None = None,
    mode: str = "trace",
    engine_version: str = ENGINE_VERSION,
    *,
    jti: str | None = None,
) -> str:
    """An HS256 JWT whose `output_hash` covers exactly `body`, valid for 300 s from `now`.

    The stages mint one only over a trace that carries the scrubber's verified result and
    pass its claims (`jti`, mode, engine version, input hash: see `attestable_scrub`); a fresh
    `jti` (None) is for the scrubber stub, which is the scrubber. `input_hash` defaults to the
    body's own hash when the scrubber's attestation did not carry one.
    """
    if not secret:
        raise ValueError("refusing to mint an attestation with an empty secret")
    iat = math.floor(now)
    output_hash = sha256_hex(body)
    claims = {
        "jti": jti if jti is not None else secrets.token_hex(16),
        "iat": iat,
        "exp": iat + ATTESTATION_TTL_S,
        "input_hash": input_hash if input_hash is not None else output_hash,
        "output_hash": output_hash,
        "mode": mode,
        "engine_version": engine_version,
    }
    signing_input = _HEADER_B64 + "." + _b64url(compact_json(claims).encode("utf-8"))
    return signing_input + "." + _b64url(_hs256(signing_input, secret))


def attestable_scrub(record: Mapping[str, Any], *, scrubbing_bypassed: bool,
                     verifying: bool) -> dict[str, Any] | None:
    """The scrubber's result a trace.scrubbed or trace.signed record carries (its `scrub`:
    mode, jti, engine version, input hash), checked against what configuration says must be
    there; None when no attestation may be minted for it.

    Whether scrubbing is on comes from configuration, never from the record, which can only
    make the answer stricter: with scrubbing on, a record must carry a trace-mode result
    (RecordError `not_scrubbed` otherwise) and, when the stage holds the JWT secret the
    scrubber's attestation was verified with (`verifying`), that attestation's `jti`
    (`unverified_scrub` otherwise). With scrubbing bypassed (allowUnscrubbed) nothing is ever
    attested, so a panel that requires scrubbing refuses what was never scrubbed."""
    if scrubbing_bypassed:
        return None
    scrub = record.get("scrub")
    if not isinstance(scrub, Mapping) or scrub.get("mode") != "trace":
        raise RecordError("not_scrubbed", "the trace does not carry a scrubber result in trace mode, "
                                          "and scrubbing is configured")
    if not verifying:
        return None
    if not isinstance(scrub.get("jti"), str) or not scrub["jti"]:
        raise RecordError("unverified_scrub", "the trace carries no verified scrubber attestation (jti); "
                                              "an attestation is minted only for one that does")
    return {k: scrub.get(k) for k in ("mode", "jti", "engine_version", "input_hash")}


def attest(body: bytes, secret: str, now: float, scrub: Mapping[str, Any]) -> str:
    """mint_attestation over `body` claiming the scrubber's verified result `scrub`."""
    return mint_attestation(body, secret, now, input_hash=scrub.get("input_hash"), mode=scrub["mode"],
                            engine_version=scrub.get("engine_version") or ENGINE_VERSION, jti=scrub["jti"])


def _decode_json_part(part: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64url_decode(part).decode("utf-8"))
    except (ValueError, binascii.Error, RecursionError):
        raise AttestationError("malformed", "a part is not base64url JSON") from None
    if not isinstance(value, dict):
        raise AttestationError("malformed", "a part is not a JSON object")
    return value


def _number(claims: Mapping[str, Any], name: str) -> float:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AttestationError("malformed", f"claim {name} is not a number")
    return float(value)


def _split(token: str) -> tuple[str, str, str]:
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        raise AttestationError("malformed", "not three parts")
    return parts[0], parts[1], parts[2]


def verify_attestation(
    token: str,
    secret: str | None,
    expected_output_hash: str,
    now: float,
    max_age_s: float = ATTESTATION_TTL_S,
) -> dict[str, Any]:
    """The claims of a token the panel would accept for a body hashing to `expected_output_hash`.

    Raises AttestationError, checking in the panel's order: no_secret, malformed (not three
    parts, header alg not HS256, undecodable parts), bad_signature, expired (exp <= now),
    stale (iat < now - max_age_s), hash_mismatch.
    """
    if not secret:
        raise AttestationError("no_secret")
    header_b64, claims_b64, sig_b64 = _split(token)
    header = _decode_json_part(header_b64)
    if header.get("alg") != "HS256":
        raise AttestationError("malformed", "header alg is not HS256")
    claims = _decode_json_part(claims_b64)
    try:
        signature = _b64url_decode(sig_b64)
    except (ValueError, binascii.Error):
        raise AttestationError("malformed", "signature is not base64url") from None
    if not hmac.compare_digest(signature, _hs256(f"{header_b64}.{claims_b64}", secret)):
        raise AttestationError("bad_signature")
    if _number(claims, "exp") <= now:
        raise AttestationError("expired")
    if _number(claims, "iat") < now - max_age_s:
        raise AttestationError("stale")
    if claims.get("output_hash") != expected_output_hash:
        raise AttestationError("hash_mismatch")
    return claims


def attestation_age_s(token: str, now: float) -> float:
    """Seconds since the token's `iat`, read without verifying it (for refresh decisions)."""
    return now - _number(_decode_json_part(_split(token)[1]), "iat")


def needs_refresh(iat: float | None, now: float, bound_s: float) -> bool:
    """True when an attestation minted at `iat` must be re-minted before it is sent.

    `bound_s` must leave the request time to arrive inside the panel's 300 s window.
    """
    if not 0 < bound_s < ATTESTATION_TTL_S:
        raise ValueError(
            f"bound_s must be between 0 and {ATTESTATION_TTL_S} seconds, got {bound_s!r}"
        )
    return iat is None or now - iat >= bound_s
