"""A stub scrubber speaking the scrubber contract (contracts/scrubber.md) with real redaction.

`POST /v1/scrub` (alias `/scrub`, optional `?rules=base,eu`) takes `{"text": ...}` or
`{"trace": [...]}`; in trace mode only each entry's `content` is scrubbed (non-string content
is JSON-encoded first) and every other key passes through. Secrets and PII become typed,
numbered placeholders (`<EMAIL_1>`, `<OPENAI_KEY_1>`, `<SECRET_1>`); the same value within one
request gets the same placeholder. With a JWT secret the answer carries an HS256 attestation
minted by pipeline.delivery.signing, `output_hash` being the SHA-256 of the sanitized text or of
JSON.stringify(sanitized trace). 400 on a bad body, 401 on a missing or wrong
`x-scrubber-key` when a key is configured, 404 tenant_not_found for an unknown `x-tenant-id`
when tenants are configured. `GET /health`, `GET /metrics` (Prometheus text); fault knobs,
`GET /_stub/stats` and the ways to run it as in devkit.stubs.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import re
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from devkit.stubs import StubServer, json_response, run_stub_process, stub_arg_parser
from pipeline.clients.http import parse_json
from pipeline.delivery.signing import mint_attestation, sha256_hex, verify_attestation
from pipeline.model.records import compact_json

__all__ = ["RULES", "Redactor", "Rule", "ScrubberStubConfig", "StubScrubber", "main"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 3017
ENGINE_VERSION = "scrubber-stub/0.6.0"
BODY_ERROR = "body must include {text} or {trace:[]}"


@dataclass(frozen=True)
class Rule:
    category: str  # the placeholder's stem: <CATEGORY_n>
    pattern: re.Pattern[str]
    pack: str = "base"
    # Named groups holding the secret; the first that matched is replaced and the rest of the
    # match (a variable name, quotes) is kept, so `API_KEY="x"` reads `API_KEY="<SECRET_1>"`.
    groups: tuple[str, ...] = ()
    # A pattern every match of `pattern` contains a match of (its keyword, under the same flags):
    # a text it is not found in is left alone without running `pattern`, whose `[A-Za-z0-9_-]*`
    # name prefix is tried at every word start (half the stub's CPU before).
    keyword: re.Pattern[str] | None = None

    def apply(self, text: str, replace: Callable[[re.Match[str]], str]) -> str:
        if self.keyword is not None and self.keyword.search(text) is None:
            return text
        return self.pattern.sub(replace, text)


_PLACEHOLDER_AHEAD = r"(?!\\?[\"']?<[A-Z_]+_\d+>)"
# A value: escaped-quoted (inside JSON-encoded text), quoted, or bare up to a delimiter.
# Stopping at quotes and backslashes keeps JSON-encoded tool input parseable after redaction.
_VALUE = (
    _PLACEHOLDER_AHEAD + r"""(?:\\"(?P<v1>[^"\\\n]+)\\"|"(?P<v2>[^"\n]+)"|'(?P<v3>[^'\n]+)'"""
    r"""|(?!(?:null|true|false)\b)(?P<v4>[^\s"'\\<>,;&|()\[\]{}]+))"""
)
_LONG_TOKEN = _PLACEHOLDER_AHEAD + r"""(?:\\?["'])?(?P<v1>[A-Za-z0-9+/_.~=-]{16,})"""
_ASSIGN = r"""(?:\\?["'])?\s*[=:]\s*"""
_VALUE_GROUPS = ("v1", "v2", "v3", "v4")


def _assignment_rule(name: str, keyword: str, value: str, flags: str = "") -> Rule:
    """`name = value` (or `name: value`, quoted or not): the value is the secret. `name` holds
    `keyword` as a group of its own, so a text without `keyword` cannot match."""
    return Rule("SECRET", re.compile(flags + name.format(keyword=keyword) + _ASSIGN + value), groups=_VALUE_GROUPS,
                keyword=re.compile(flags + keyword))


RULES: tuple[Rule, ...] = (
    Rule(
        "PRIVATE_KEY",
        re.compile(
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.DOTALL
        ),
    ),
    Rule(
        "JWT",
        re.compile(
            r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
        ),
    ),
    Rule("ANTHROPIC_KEY", re.compile(r"(?<![A-Za-z0-9])sk-ant-[A-Za-z0-9_-]{20,}")),
    Rule(
        "OPENAI_KEY", re.compile(r"(?<![A-Za-z0-9])sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}")
    ),
    Rule(
        "AWS_KEY",
        re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[A-Z0-9]{16}(?![A-Z0-9])"),
    ),
    Rule(
        "GITHUB_TOKEN",
        re.compile(r"(?<![A-Za-z0-9])(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})"),
    ),
    Rule("SLACK_TOKEN", re.compile(r"(?<![A-Za-z0-9])xox[abprs]-[A-Za-z0-9-]{10,}")),
    Rule("GOOGLE_KEY", re.compile(r"(?<![A-Za-z0-9])AIza[0-9A-Za-z_-]{35}")),
    Rule("SECRET", re.compile(r"(?i)\bbearer\s+" + _LONG_TOKEN), groups=_VALUE_GROUPS,
         keyword=re.compile(r"(?i)bearer")),
    # NAME_KEY=value, SOMETHING_SECRET: value, PASSWORD=value: an upper-case name says "secret".
    _assignment_rule(
        r"(?<![A-Za-z0-9_])[A-Z0-9_]*{keyword}",
        r"(?:KEY|SECRET|TOKEN|PASSWORD|PASSWD|PWD|PASS|CREDENTIALS?|AUTH)",
        _VALUE,
    ),
    # password / secret under any spelling: any value.
    _assignment_rule(
        r"(?<![A-Za-z0-9])[A-Za-z0-9_-]*{keyword}[A-Za-z0-9_-]*",
        r"(?:passw(?:or)?d|pwd|secret|credential)",
        _VALUE,
        flags="(?i)",
    ),
    # key / token under any spelling: only a long token-looking value, so `key: 3` survives.
    _assignment_rule(
        r"(?<![A-Za-z0-9])[A-Za-z0-9_-]*{keyword}[A-Za-z0-9_-]*",
        r"(?:api[_-]?key|access[_-]?key|private[_-]?key|token|auth)",
        _LONG_TOKEN,
        flags="(?i)",
    ),
    Rule(
        "EMAIL",
        re.compile(
            r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
        ),
    ),
    Rule("USER", re.compile(r"/(?:home|Users)/(?P<user>[A-Za-z0-9._-]+)"), groups=("user",)),
    Rule(
        "IBAN",
        re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){3,7}(?: ?[A-Z0-9]{1,3})?\b"),
        pack="eu",
    ),
)
PACKS = frozenset(rule.pack for rule in RULES)


class Redactor:
    """One request's redaction: numbering is shared by every text the request holds."""

    def __init__(self, packs: frozenset[str]) -> None:
        self.rules = [rule for rule in RULES if rule.pack in packs]
        self.detections: list[dict[str, str]] = []
        self._placeholders: dict[tuple[str, str], str] = {}
        self._counts: Counter[str] = Counter()

    def _placeholder(self, rule: Rule, secret: str) -> str:
        key = (rule.category, secret)
        if key not in self._placeholders:
            self._counts[rule.category] += 1
            self._placeholders[key] = f"<{rule.category}_{self._counts[rule.category]}>"
        token = self._placeholders[key]
        self.detections.append({"token": token, "category": rule.category, "pack": rule.pack})
        return token

    def scrub(self, text: str) -> str:
        for rule in self.rules:
            text = rule.apply(text, lambda m, rule=rule: self._replace(rule, m))
        return text

    def _replace(self, rule: Rule, match: re.Match[str]) -> str:
        group = next((g for g in rule.groups if match.group(g) is not None), 0)
        start, end = match.span(group)
        whole_start = match.start()
        whole = match.group(0)
        secret = match.group(group)
        return (
            whole[: start - whole_start]
            + self._placeholder(rule, secret)
            + whole[end - whole_start :]
        )


def _node_utf8(text: str) -> bytes:
    # Node's Buffer.from(string) writes a lone surrogate as U+FFFD; Python would refuse it.
    return re.sub(r"[\ud800-\udfff]", "\ufffd", text).encode("utf-8")


@dataclass(frozen=True)
class ScrubberStubConfig:
    api_key: str | None = field(default=None, repr=False)  # SCRUBBER_API_KEY: auth when set
    jwt_secret: str | None = field(default=None, repr=False)  # SCRUBBER_JWT_SECRET: attest when set
    engine_version: str = ENGINE_VERSION
    tenants: frozenset[str] | None = None  # None: any x-tenant-id is accepted


class StubScrubber(StubServer[ScrubberStubConfig]):
    name = "stub-scrubber"
    config_type = ScrubberStubConfig

    def reset_records(self) -> None:
        self._requests: Counter[tuple[str, int]] = Counter()  # (mode or route, status)
        self._detections: Counter[str] = Counter()

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": sum(self._requests.values()),
                "scrubs": sum(
                    n
                    for (mode, status), n in self._requests.items()
                    if status == 200 and mode in ("text", "trace")
                ),
                "by_mode": {
                    m: sum(n for (k, _), n in self._requests.items() if k == m)
                    for m in sorted({k for k, _ in self._requests})
                },
                "by_status": {
                    str(s): sum(n for (_, k), n in self._requests.items() if k == s)
                    for s in sorted({k for _, k in self._requests})
                },
                "detections": dict(self._detections),
                "faulted": self.faulted,
                "dropped": self.dropped,
                "overloaded": self.overloaded,
            }

    def on_fault(self, request: web.Request, status: int) -> None:
        self._requests[("fault", status)] += 1

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/scrub", self._scrub)
        app.router.add_post("/scrub", self._scrub)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)

    async def _health(self, request: web.Request) -> web.Response:
        return json_response(200, {"ok": True, "engine_version": self.config.engine_version})

    async def _metrics(self, request: web.Request) -> web.Response:
        with self.lock:
            requests, detections = dict(self._requests), dict(self._detections)
        lines = [
            "# HELP scrubber_requests_total Scrub requests by mode and status.",
            "# TYPE scrubber_requests_total counter",
        ]
        lines += [
            f'scrubber_requests_total{{mode="{m}",status="{s}"}} {n}'
            for (m, s), n in sorted(requests.items())
        ]
        lines += [
            "# HELP scrubber_detections_total Redactions by category.",
            "# TYPE scrubber_detections_total counter",
        ]
        lines += [
            f'scrubber_detections_total{{category="{c}"}} {n}'
            for c, n in sorted(detections.items())
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    def _answer(self, mode: str, status: int, body: dict[str, Any]) -> web.Response:
        with self.lock:
            self._requests[(mode, status)] += 1
        return json_response(status, body)

    async def _scrub(self, request: web.Request) -> web.Response:
        key = self.config.api_key
        given = request.headers.get("x-scrubber-key", "")
        if key and not hmac.compare_digest(given.encode("utf-8", "replace"), key.encode("utf-8")):
            return self._answer("unauthorized", 401, {"error": "unauthorized"})
        tenant = request.headers.get("x-tenant-id")
        if tenant and self.config.tenants is not None and tenant not in self.config.tenants:
            return self._answer("tenant", 404, {"error": "tenant_not_found"})
        packs = frozenset(p for p in request.query.get("rules", "base").split(",") if p)
        if not packs or packs - PACKS:
            return self._answer(
                "bad_rules", 400, {"error": f"unknown rule packs; known: {sorted(PACKS)}"}
            )
        try:
            body = parse_json(await request.read())
        except (ValueError, RecursionError):
            body = None
        if (
            isinstance(body, dict)
            and isinstance(body.get("trace"), list)
            and all(isinstance(e, dict) for e in body["trace"])
        ):
            return self._scrub_trace(body["trace"], packs)
        if isinstance(body, dict) and isinstance(body.get("text"), str):
            return self._scrub_text(body["text"], packs)
        return self._answer("bad_body", 400, {"error": BODY_ERROR})

    def _scrub_text(self, text: str, packs: frozenset[str]) -> web.Response:
        redactor = Redactor(packs)
        clean = redactor.scrub(text)
        return self._finish(
            "text", {"text": clean}, redactor, packs, _node_utf8(text), _node_utf8(clean)
        )

    def _scrub_trace(self, trace: list[dict[str, Any]], packs: frozenset[str]) -> web.Response:
        redactor = Redactor(packs)
        clean = []
        for entry in trace:
            out = dict(entry)  # other keys pass through, in their order
            if "content" in entry:
                content = entry["content"]
                out["content"] = redactor.scrub(
                    content if isinstance(content, str) else compact_json(content)
                )
            clean.append(out)
        return self._finish(
            "trace",
            {"trace": clean},
            redactor,
            packs,
            compact_json(trace).encode("utf-8"),
            compact_json(clean).encode("utf-8"),
        )

    def _finish(
        self,
        mode: str,
        answer: dict[str, Any],
        redactor: Redactor,
        packs: frozenset[str],
        input_bytes: bytes,
        output_bytes: bytes,
    ) -> web.Response:
        answer.update(
            {
                "detections": redactor.detections,
                "rules_applied": sorted(packs),
                "engine_version": self.config.engine_version,
                "mapping_id": "map_" + uuid.uuid4().hex,
                "mode": mode,
            }
        )
        if self.config.jwt_secret:
            now = self.clock()
            token = mint_attestation(
                output_bytes,
                self.config.jwt_secret,
                now,
                input_hash=sha256_hex(input_bytes),
                mode=mode,
                engine_version=self.config.engine_version,
            )
            claims = verify_attestation(
                token, self.config.jwt_secret, sha256_hex(output_bytes), now
            )
            answer["attestation"] = token
            answer["attestation_meta"] = {
                k: claims[k] for k in ("jti", "iat", "exp", "input_hash", "output_hash")
            }
        with self.lock:
            self._detections.update(d["category"] for d in redactor.detections)
        return self._answer(mode, 200, answer)


def _parser() -> argparse.ArgumentParser:
    p = stub_arg_parser(
        "python -m devkit.stubs.scrubber",
        "Stub scrubber. From the environment, as the real one: SCRUBBER_API_KEY (when set, "
        "x-scrubber-key is required) and SCRUBBER_JWT_SECRET (when set, answers carry an "
        "attestation).",
        DEFAULT_PORT,
    )
    p.add_argument("--engine-version", default=ENGINE_VERSION)
    p.add_argument(
        "--tenant",
        action="append",
        dest="tenants",
        metavar="ID",
        help="a known x-tenant-id (repeatable); without any, every tenant is accepted",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_stub_process(_parser(), argv, _from_environment)


def _from_environment(args: argparse.Namespace) -> StubScrubber:
    """The stub the options and the environment describe."""
    # The one place the stub reads the environment.
    config = ScrubberStubConfig(
        api_key=os.environ.get("SCRUBBER_API_KEY") or None,
        jwt_secret=os.environ.get("SCRUBBER_JWT_SECRET") or None,
        engine_version=args.engine_version,
        tenants=frozenset(args.tenants) if args.tenants else None,
    )
    log.info(
        "stub scrubber: auth %s, attestation %s",
        "on" if config.api_key else "off",
        "on" if config.jwt_secret else "off",
    )
    return StubScrubber(config, args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
