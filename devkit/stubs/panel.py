"""A stub panel that refuses what the real panel refuses (contracts/panel.md), in its order.

`POST /api/v1/traces` checks, in order: rate limit (429 rate_limited), site key and signature
present (401 missing_auth), a secret for the site (401 ingest_not_configured), the HMAC
(401 bad_signature, timing-safe), JSON (400 bad_json), the attestation when the site requires
scrubbing (422 scrubber_attestation_<why>, verified by pipeline.delivery.signing), the body's shape
(400 bad_body: a stub addition, so a malformed body fails here, not silently at the panel's
splitter); then it upserts by trace_id and answers 200 with units, or 202 pending for a blob
over 100 KiB. `GET /api/v1/traces/{trace_id}` is the poll URL a 202 names.

Everything accepted and refused is recorded: `GET /_stub/accepted` (`?trace_id=` for one),
`GET /_stub/refused` (contract refusals and fault answers, told apart by `fault`),
`GET /_stub/stats` (`refused` counts contract refusals only, `faulted` the fault answers);
fault knobs as in devkit.stubs.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import math
import os
import re
import sys
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from devkit.stubs import StubServer, json_response, run_stub_process, stub_arg_parser
from pipeline.clients.http import parse_json
from pipeline.delivery.signing import (
    AttestationError,
    secret_env_name,
    sha256_hex,
    verify_attestation,
)
from pipeline.model.records import compact_json

__all__ = ["PanelStubConfig", "StubPanel", "main"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 3015
BLOB_KEYS = ("session_id", "project_id", "directory", "messages", "reason", "plugin_version")
_MAX_REFUSALS_KEPT = 10_000
_DIFF = re.compile(r"^@@ -\d+(?:,\d+)? \+\d+(?:,\d+)? @@", re.MULTILINE)
_LINK = re.compile(r"https?://\S+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class PanelStubConfig:
    site_secrets: Mapping[str, str] = field(default_factory=dict, repr=False)  # site key -> secret
    fallback_secret: str | None = field(default=None, repr=False)  # PANEL_INGEST_SECRET
    jwt_secret: str | None = field(default=None, repr=False)  # SCRUBBER_JWT_SECRET
    require_scrub: bool | frozenset[str] = False  # every site, or these site keys
    # a token bucket over all sites: `rate_limit` requests per `rate_window_s`, as a burst of
    # up to `rate_limit` and a steady rate of rate_limit / rate_window_s; None: no limit
    rate_limit: int | None = None
    rate_window_s: float = 60.0
    large_blob_bytes: int = 100 * 1024

    def secret_for(self, site_key: str) -> str | None:
        # The panel reads the variable named after the site key, so site keys that normalise to
        # the same name (pk-a, pk_a) share a secret here as they would there.
        wanted = secret_env_name(site_key)
        for key, secret in self.site_secrets.items():
            if secret and secret_env_name(key) == wanted:
                return secret
        return self.fallback_secret or None

    def scrub_required(self, site_key: str) -> bool:
        if isinstance(self.require_scrub, bool):
            return self.require_scrub
        return site_key in self.require_scrub


class _Refusal(Exception):
    def __init__(
        self,
        status: int,
        error: str,
        detail: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(error)
        self.status, self.error, self.detail, self.headers, self.extra = (
            status,
            error,
            detail,
            headers,
            extra,
        )


def _body_problem(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "body is not a JSON object"
    for key in ("trace_id", "source_agent"):
        if not isinstance(body.get(key), str) or not body[key]:
            return f"{key} must be a non-empty string"
    blob = body.get("blob")
    if not isinstance(blob, dict):
        return "blob must be an object"
    missing = [key for key in BLOB_KEYS if key not in blob]
    if missing:
        return f"blob lacks {', '.join(missing)}"
    messages = blob["messages"]
    if not isinstance(messages, list):
        return "blob.messages must be a list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"blob.messages[{i}] is not an object"
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            return f"blob.messages[{i}] needs a string role and a string content"
        calls = message.get("tool_calls", [])
        if not isinstance(calls, list) or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls
        ):
            return f"blob.messages[{i}].tool_calls must be a list of objects with a name"
    return None


def split_units(trace_id: str, blob: Mapping[str, Any]) -> tuple[list[str], int, int, int]:
    """(unit_ids, structural, llm, skipped), roughly as the panel's splitter cuts a trace.

    Ids derive from the trace id and position, so an upsert gives the same units again.
    """
    units: list[tuple[str, int, int, bool]] = []  # (kind, message, n, needs an llm)
    skipped = 0
    pairs: dict[str, set[str]] = {}
    for i, message in enumerate(blob["messages"]):
        before = len(units)
        units += [("step", i, j, False) for j, _ in enumerate(message.get("tool_calls") or [])]
        if _DIFF.search(message["content"]):
            units.append(("diff", i, 0, False))
        if message["role"] == "assistant":
            claims = [s for s in _SENTENCE_END.split(message["content"]) if _LINK.search(s)]
            units += [("claim", i, j, True) for j, _ in enumerate(claims)]
            if isinstance(message.get("prompt_ref"), str) and isinstance(
                message.get("agent_id"), str
            ):
                pairs.setdefault(message["prompt_ref"], set()).add(message["agent_id"])
        skipped += len(units) == before
    units += [("pair", n, 0, True) for n, agents in enumerate(pairs.values()) if len(agents) > 1]
    ids = [
        "unit_" + hashlib.sha256(f"{trace_id}:{k}:{i}:{n}".encode()).hexdigest()[:16]
        for k, i, n, _ in units
    ]
    llm = sum(1 for *_, needs_llm in units if needs_llm)
    return ids, len(units) - llm, llm, skipped


class StubPanel(StubServer[PanelStubConfig]):
    name = "stub-panel"
    config_type = PanelStubConfig

    # ------------------------------------------------------------ records

    def reset_records(self) -> None:
        self._accepted: dict[str, dict[str, Any]] = {}
        self._refused: deque[dict[str, Any]] = deque(maxlen=_MAX_REFUSALS_KEPT)
        self._counts: Counter[str] = Counter()
        self._bucket: tuple[float, float] | None = None  # (tokens, when) of the rate limit

    def accepted(self) -> dict[str, dict[str, Any]]:
        """trace_id -> {trace_id, site_key, status, upserts, body, attestation_jti, ...}."""
        with self.lock:
            return {tid: dict(rec) for tid, rec in self._accepted.items()}

    def pairwise(self) -> dict[str, dict[str, list[str]]]:
        """The pairwise units the panel's splitter would form across its traces: per prompt_ref
        answered by more than one agent_id, each agent's trace ids (assistant messages only)."""
        seen: dict[str, dict[str, set[str]]] = {}
        with self.lock:
            for tid, rec in self._accepted.items():
                for message in rec["body"]["blob"]["messages"]:
                    ref, agent = message.get("prompt_ref"), message.get("agent_id")
                    if message.get("role") == "assistant" and isinstance(ref, str) and isinstance(agent, str):
                        seen.setdefault(ref, {}).setdefault(agent, set()).add(tid)
        return {ref: {a: sorted(t) for a, t in agents.items()} for ref, agents in seen.items() if len(agents) > 1}

    def refused(self) -> list[dict[str, Any]]:
        """Every refusal, oldest first: {at, status, error, site_key, trace_id, fault, detail?}."""
        with self.lock:
            return [dict(r) for r in self._refused]

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self._counts["requests"],
                "accepted_traces": len(self._accepted),
                "upserts": sum(r["upserts"] for r in self._accepted.values()),
                "refused": sum(n for k, n in self._counts.items() if k.startswith("refused:")),
                "refused_by_error": {
                    k[8:]: n for k, n in self._counts.items() if k.startswith("refused:")
                },
                "faulted": self.faulted,
                "dropped": self.dropped,
                "overloaded": self.overloaded,
            }

    def on_fault(self, request: web.Request, status: int) -> None:
        self._counts["requests"] += 1
        self._refused.append(
            {
                "at": self.clock(),
                "status": status,
                "error": "stub_fault",
                "site_key": request.headers.get("x-panel-site-key"),
                "trace_id": None,
                "fault": True,
            }
        )

    # ------------------------------------------------------------ routes

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/api/v1/traces", self._post_trace)
        app.router.add_get("/api/v1/traces/{trace_id}", self._get_trace)
        app.router.add_get("/_stub/accepted", self._get_accepted)
        app.router.add_get("/_stub/refused", self._get_refused)

    async def _get_accepted(self, request: web.Request) -> web.Response:
        accepted = self.accepted()
        wanted = request.query.get("trace_id")
        traces = (
            [accepted[wanted]] if wanted in accepted else [] if wanted else list(accepted.values())
        )
        return json_response(200, {"count": len(traces), "traces": traces})

    async def _get_refused(self, request: web.Request) -> web.Response:
        refused = self.refused()
        return json_response(200, {"count": len(refused), "refused": refused})

    async def _get_trace(self, request: web.Request) -> web.Response:
        record = self.accepted().get(request.match_info["trace_id"])
        if record is None:
            return json_response(404, {"error": "not_found"})
        return json_response(
            200, {"trace_id": record["trace_id"], "status": "done", **record["result"]}
        )

    async def _post_trace(self, request: web.Request) -> web.Response:
        raw = await request.read()
        now = self.clock()
        site_key = request.headers.get("x-panel-site-key", "")
        with self.lock:
            self._counts["requests"] += 1
        try:
            body, claims = self._check(request, raw, site_key, now)
        except _Refusal as refusal:
            return self._refuse(refusal, site_key, raw, now)
        return self._upsert(body, site_key, claims, now)

    def _check(
        self, request: web.Request, raw: bytes, site_key: str, now: float
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The contract's checks, in the contract's order; raises _Refusal at the first failure."""
        self._rate_limit(now)
        signature = request.headers.get("x-panel-ingest-sig", "")
        if not site_key or not signature:
            raise _Refusal(401, "missing_auth")
        secret = self.config.secret_for(site_key)
        if secret is None:
            raise _Refusal(401, "ingest_not_configured")
        expected = hmac.new(secret.encode("utf-8"), raw, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(signature.encode("utf-8", "replace"), expected.encode("ascii")):
            raise _Refusal(401, "bad_signature")
        try:
            body = parse_json(raw.decode("utf-8"))
        except (ValueError, RecursionError):
            raise _Refusal(400, "bad_json") from None
        claims = None
        if self.config.scrub_required(site_key):
            token = request.headers.get("x-scrubber-attestation", "")
            if not token:
                raise _Refusal(422, "scrubber_attestation_required")
            try:
                claims = verify_attestation(token, self.config.jwt_secret, sha256_hex(raw), now)
            except AttestationError as exc:
                raise _Refusal(422, f"scrubber_attestation_{exc.why}") from None
        problem = _body_problem(body)
        if problem:
            raise _Refusal(400, "bad_body", problem)
        return body, claims

    def _rate_limit(self, now: float) -> None:
        limit, window = self.config.rate_limit, self.config.rate_window_s
        if limit is None:
            return
        rate = limit / window
        with self.lock:
            tokens, then = self._bucket or (float(limit), now)
            tokens = min(float(limit), tokens + max(0.0, now - then) * rate)
            taken = tokens >= 1.0
            self._bucket = (tokens - taken, now)
        if taken:
            return
        wait = (1.0 - tokens) / rate  # until the next token
        raise _Refusal(
            429,
            "rate_limited",
            retry_after_s=round(wait, 3),
            headers={
                "Retry-After": str(max(1, math.ceil(wait))),  # delta-seconds: whole seconds
                "X-RateLimit-Limit": str(limit),
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": str(math.ceil(now + wait)),
            },
        )

    def _refuse(self, refusal: _Refusal, site_key: str, raw: bytes, now: float) -> web.Response:
        try:
            trace_id = json.loads(raw).get("trace_id")
        except (ValueError, AttributeError, RecursionError):
            trace_id = None
        entry = {
            "at": now,
            "status": refusal.status,
            "error": refusal.error,
            "site_key": site_key or None,
            "trace_id": trace_id if isinstance(trace_id, str) else None,
            "fault": False,
        }
        if refusal.detail:
            entry["detail"] = refusal.detail
        with self.lock:
            self._refused.append(entry)
            self._counts[f"refused:{refusal.error}"] += 1
        log.info("stub panel refused %s: %s %s", entry["trace_id"], refusal.status, refusal.error)
        answer: dict[str, Any] = {"error": refusal.error, **refusal.extra}
        if refusal.detail:
            answer["detail"] = refusal.detail
        return json_response(refusal.status, answer, refusal.headers)

    def _upsert(
        self, body: dict[str, Any], site_key: str, claims: dict[str, Any] | None, now: float
    ) -> web.Response:
        trace_id, blob = body["trace_id"], body["blob"]
        unit_ids, structural, llm, skipped = split_units(trace_id, blob)
        result = {
            "unit_ids": unit_ids,
            "structural_count": structural,
            "llm_count": llm,
            "skipped_count": skipped,
        }
        large = len(compact_json(blob).encode("utf-8")) > self.config.large_blob_bytes
        status = 202 if large else 200
        with self.lock:
            previous = self._accepted.get(trace_id)
            self._accepted[trace_id] = {
                "trace_id": trace_id,
                "site_key": site_key,
                "status": status,
                "upserts": (previous["upserts"] if previous else 0) + 1,
                "first_at": previous["first_at"] if previous else now,
                "last_at": now,
                "attestation_jti": claims.get("jti") if claims else None,
                "attestation_iat": claims.get("iat") if claims else None,
                "body": body,
                "result": result,
            }
        if large:
            return json_response(
                202,
                {"trace_id": trace_id, "status": "pending", "poll": f"/api/v1/traces/{trace_id}"},
            )
        return json_response(200, {"trace_id": trace_id, **result})


# ---------------------------------------------------------------- its own process


def _parser() -> argparse.ArgumentParser:
    p = stub_arg_parser(
        "python -m devkit.stubs.panel",
        "Stub panel ingest. Secrets come from the environment, as the panel reads them: "
        "PANEL_INGEST_SECRET_<SITE> for each --site-key, PANEL_INGEST_SECRET as the fallback, "
        "SCRUBBER_JWT_SECRET to verify attestations.",
        DEFAULT_PORT,
    )
    p.add_argument(
        "--site-key",
        action="append",
        dest="site_keys",
        metavar="KEY",
        help="a site key to read a secret for (repeatable; default pk_test_thirdparty)",
    )
    p.add_argument(
        "--require-scrub",
        action="store_true",
        help="require a scrubber attestation from every site",
    )
    p.add_argument(
        "--rate-limit",
        type=int,
        default=None,
        metavar="N",
        help="a token bucket: N requests per window as a burst of N and a steady N per window; "
        "429 beyond it (default: no limit)",
    )
    p.add_argument("--rate-window-s", type=float, default=60.0)
    p.add_argument(
        "--large-blob-bytes",
        type=int,
        default=100 * 1024,
        help="answer 202 pending above this blob size (default 102400)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_stub_process(_parser(), argv, _from_environment)


def _from_environment(args: argparse.Namespace) -> StubPanel:
    """The stub the options and the environment describe; warns when it would refuse all."""
    site_keys = args.site_keys or ["pk_test_thirdparty"]
    # The one place the stub reads the environment.
    site_secrets = {
        key: os.environ[secret_env_name(key)]
        for key in site_keys
        if os.environ.get(secret_env_name(key))
    }
    config = PanelStubConfig(
        site_secrets=site_secrets,
        fallback_secret=os.environ.get("PANEL_INGEST_SECRET") or None,
        jwt_secret=os.environ.get("SCRUBBER_JWT_SECRET") or None,
        require_scrub=args.require_scrub,
        rate_limit=args.rate_limit,
        rate_window_s=args.rate_window_s,
        large_blob_bytes=args.large_blob_bytes,
    )
    if not site_secrets and not config.fallback_secret:
        log.warning(
            "no ingest secret set (%s or PANEL_INGEST_SECRET): every trace will be refused "
            "ingest_not_configured",
            ", ".join(secret_env_name(k) for k in site_keys),
        )
    if args.require_scrub and not config.jwt_secret:
        log.warning(
            "--require-scrub without SCRUBBER_JWT_SECRET: attestations will be refused no_secret"
        )
    return StubPanel(config, args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
