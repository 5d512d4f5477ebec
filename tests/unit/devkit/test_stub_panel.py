"""The stub panel over real HTTP, driven through pipeline.clients.panel.PanelClient: every refusal of
contracts/panel.md in the contract's order, upserts, 202 above 100 KiB, faults, and its own
process."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import pytest_asyncio

from devkit.stubs.panel import PanelStubConfig, StubPanel
from pipeline.clients.panel import INGEST_PATH, PanelClient, PanelUnavailable
from pipeline.delivery.signing import canonical_body, mint_attestation, secret_env_name, sign
from pipeline.model.records import compact_json
from tests.unit.devkit.stub_process import stub_process

SITE = "pk_test_thirdparty"
SITE_SECRET = "site-ingest-secret"
JWT = "scrubber-jwt-secret-at-least-32-bytes!"
TIMEOUT = httpx.Timeout(connect=2.0, read=5.0, write=5.0, pool=2.0)


def body_for(trace_id: str = "tr_oc_00000001", content: str = "hello", *, agent: str | None = None,
             prompt_ref: str | None = None) -> bytes:
    record = {
        "schema": "trace.scrubbed/1" if agent is None else "trace.scrubbed/2",
        "trace_id": trace_id,
        "session_id": "ses_1",
        "project_id": "prj",
        "directory": "/srv/p",
        "messages": [
            {"role": "user", "content": content, "id": "m1", "session_id": "ses_1", "idx": 0},
            {
                "role": "assistant",
                "content": "See https://example.org/x. Done.",
                "id": "m2",
                "session_id": "ses_1",
                "idx": 1,
                "tool_calls": [
                    {
                        "name": "bash",
                        "status": "completed",
                        "error": None,
                        "input": {},
                        "output": "",
                    }
                ],
            },
        ],
        "decision": {"reason": "sample"},
        "scrub": {"mode": "trace"},
    }
    if agent is not None:
        record.update(prompt_ref=prompt_ref, agent_id=agent)
        for message in record["messages"]:
            message.update(agent_id=agent, prompt_ref=prompt_ref)
    return canonical_body(record, "opencode", "0.1.0")


def attest(body: bytes, now: float | None = None, secret: str = JWT) -> str:
    return mint_attestation(body, secret, time.time() if now is None else now)


def config(**overrides: Any) -> PanelStubConfig:
    base: dict[str, Any] = {
        "site_secrets": {SITE: SITE_SECRET},
        "jwt_secret": JWT,
        "require_scrub": True,
    }
    base.update(overrides)
    return PanelStubConfig(**base)


@pytest_asyncio.fixture
async def panel() -> AsyncIterator[StubPanel]:
    async with StubPanel(config()) as stub:
        yield stub


@pytest_asyncio.fixture
async def client(panel: StubPanel) -> AsyncIterator[PanelClient]:
    async with PanelClient(panel.url, TIMEOUT) as c:
        yield c


async def raw_post(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as http:
        return await http.post(url + INGEST_PATH, content=body, headers=headers)


# ---------------------------------------------------------------- acceptance


@pytest.mark.asyncio
async def test_accepts_a_signed_attested_trace(panel: StubPanel, client: PanelClient) -> None:
    body = body_for()
    response = await client.post_trace(body, SITE, sign(body, SITE_SECRET), attest(body))
    assert response.status == 200, response.text
    answer = response.body_json
    assert set(answer) == {"trace_id", "unit_ids", "structural_count", "llm_count", "skipped_count"}
    assert answer["trace_id"] == "tr_oc_00000001"
    assert (answer["structural_count"], answer["llm_count"], answer["skipped_count"]) == (1, 1, 1)
    assert response.ok and response.error is None and response.latency_ms > 0
    accepted = panel.accepted()["tr_oc_00000001"]
    assert accepted["upserts"] == 1 and accepted["body"] == json.loads(body)
    assert re.fullmatch(r"[0-9a-f]{32}", accepted["attestation_jti"])
    assert panel.refused() == []


@pytest.mark.asyncio
async def test_same_trace_id_is_an_upsert(panel: StubPanel, client: PanelClient) -> None:
    answers = []
    for content in ("first", "second"):
        body = body_for(content=content)
        response = await client.post_trace(body, SITE, sign(body, SITE_SECRET), attest(body))
        answers.append(response.body_json)
    assert answers[0]["unit_ids"] == answers[1]["unit_ids"]
    accepted = panel.accepted()
    assert list(accepted) == ["tr_oc_00000001"]
    assert accepted["tr_oc_00000001"]["upserts"] == 2
    assert accepted["tr_oc_00000001"]["body"]["blob"]["messages"][0]["content"] == "second"
    assert panel.stats()["accepted_traces"] == 1 and panel.stats()["upserts"] == 2


@pytest.mark.asyncio
async def test_assistant_messages_of_one_prompt_by_two_agents_across_traces_are_a_pairwise_unit(
        panel: StubPanel, client: PanelClient) -> None:
    ref = "pr_" + "12" * 16
    for n, agent in enumerate(["p/a:build", "p/b:build", "p/b:build"]):
        body = body_for(f"tr_oc_0000000{n}", agent=agent, prompt_ref=ref)
        assert (await client.post_trace(body, SITE, sign(body, SITE_SECRET), attest(body))).status == 200
    other = body_for("tr_oc_00000009", agent="p/a:build", prompt_ref="pr_" + "34" * 16)
    assert (await client.post_trace(other, SITE, sign(other, SITE_SECRET), attest(other))).status == 200
    assert panel.pairwise() == {ref: {"p/a:build": ["tr_oc_00000000"],
                                      "p/b:build": ["tr_oc_00000001", "tr_oc_00000002"]}}


@pytest.mark.asyncio
async def test_202_pending_only_above_100_kib(panel: StubPanel, client: PanelClient) -> None:
    def blob_size(body: bytes) -> int:
        return len(compact_json(json.loads(body)["blob"]).encode())

    pad = 100 * 1024 - blob_size(body_for(content=""))
    at_limit, over = body_for(content="x" * pad), body_for("tr_oc_00000002", "x" * (pad + 1))
    assert blob_size(at_limit) == 100 * 1024
    response = await client.post_trace(
        at_limit, SITE, sign(at_limit, SITE_SECRET), attest(at_limit)
    )
    assert response.status == 200
    response = await client.post_trace(over, SITE, sign(over, SITE_SECRET), attest(over))
    assert response.status == 202
    assert response.body_json == {
        "trace_id": "tr_oc_00000002",
        "status": "pending",
        "poll": "/api/v1/traces/tr_oc_00000002",
    }
    assert panel.accepted()["tr_oc_00000002"]["status"] == 202
    async with httpx.AsyncClient() as http:
        polled = await http.get(panel.url + response.body_json["poll"])
    assert polled.status_code == 200 and polled.json()["status"] == "done"


# ---------------------------------------------------------------- refusals, in order


def auth(body: bytes, site: str = SITE, secret: str = SITE_SECRET) -> dict[str, str]:
    return {"x-panel-site-key": site, "x-panel-ingest-sig": sign(body, secret)}


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hs256(header: dict[str, Any], claims: dict[str, Any], secret: str = JWT) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    return (
        signing_input
        + "."
        + b64(hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest())
    )


def claims_of(token: str) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))


def alg_none(body: bytes) -> str:
    return b64(b'{"alg":"none","typ":"JWT"}') + "." + attest(body).split(".")[1] + "."


def stale(body: bytes) -> str:
    """exp = iat + 300 makes `expired` win over `stale`; a token claiming a longer life is stale."""
    claims = claims_of(attest(body, time.time() - 400))
    return hs256({"alg": "HS256", "typ": "JWT"}, {**claims, "exp": time.time() + 600})


def with_attestation(body: bytes, token: str) -> tuple[dict[str, str], bytes]:
    return {**auth(body), "x-scrubber-attestation": token}, body


# Each case breaks its check AND every later one it can, so only the order picks the answer.
REFUSALS: list[tuple[str, int, Callable[[bytes], tuple[dict[str, str], bytes]]]] = [
    ("missing_auth", 401, lambda b: ({"x-panel-site-key": SITE}, b"{nope")),
    (
        "missing_auth",
        401,
        lambda b: ({"x-panel-ingest-sig": sign(b"{nope", SITE_SECRET)}, b"{nope"),
    ),
    ("ingest_not_configured", 401, lambda b: (auth(b"{nope", site="pk_other"), b"{nope")),
    ("bad_signature", 401, lambda b: ({**auth(b), "x-panel-ingest-sig": "00" * 32}, b"{nope")),
    # The contract's signature is lower-case hex, compared exactly.
    (
        "bad_signature",
        401,
        lambda b: ({**auth(b), "x-panel-ingest-sig": sign(b, SITE_SECRET).upper()}, b),
    ),
    ("bad_json", 400, lambda b: (auth(b"{nope"), b"{nope")),
    ("bad_json", 400, lambda b: (auth(b"\xff{}"), b"\xff{}")),
    ("scrubber_attestation_required", 422, lambda b: (auth(b), b)),
    ("scrubber_attestation_malformed", 422, lambda b: with_attestation(b, "a.b")),
    ("scrubber_attestation_malformed", 422, lambda b: with_attestation(b, alg_none(b))),
    (
        "scrubber_attestation_malformed",
        422,
        lambda b: with_attestation(b, hs256({"alg": "HS512"}, claims_of(attest(b)))),
    ),
    (
        "scrubber_attestation_bad_signature",
        422,
        lambda b: with_attestation(b, attest(b, secret="x" * 32)),
    ),
    (
        "scrubber_attestation_expired",
        422,
        lambda b: with_attestation(b, attest(b, time.time() - 301)),
    ),
    ("scrubber_attestation_stale", 422, lambda b: with_attestation(b, stale(b))),
    ("scrubber_attestation_hash_mismatch", 422, lambda b: with_attestation(b, attest(b + b" "))),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("error", "status", "make"), REFUSALS)
async def test_refusals_in_contract_order(
    panel: StubPanel, error: str, status: int, make: Callable[[bytes], tuple[dict[str, str], bytes]]
) -> None:
    headers, sent = make(body_for())
    response = await raw_post(panel.url, sent, {"content-type": "application/json", **headers})
    assert (response.status_code, response.json()) == (status, {"error": error})
    assert panel.accepted() == {}
    refusal = panel.refused()[-1]
    assert (refusal["status"], refusal["error"], refusal["fault"]) == (status, error, False)


@pytest.mark.asyncio
async def test_no_jwt_secret_is_no_secret_and_unscrubbed_sites_need_no_attestation() -> None:
    body = body_for()
    async with (
        StubPanel(config(jwt_secret=None)) as panel,
        PanelClient(panel.url, TIMEOUT) as client,
    ):
        response = await client.post_trace(body, SITE, sign(body, SITE_SECRET), attest(body))
        assert response.error == "scrubber_attestation_no_secret"
    async with (
        StubPanel(config(require_scrub=frozenset({"pk_scrubbed"}))) as panel,
        PanelClient(panel.url, TIMEOUT) as client,
    ):
        response = await client.post_trace(body, SITE, sign(body, SITE_SECRET), None)
        assert response.status == 200


@pytest.mark.asyncio
async def test_body_of_the_wrong_shape_is_bad_body(panel: StubPanel, client: PanelClient) -> None:
    body = b'{"trace_id":"tr_oc_00000001","source_agent":"opencode","blob":{"messages":[]}}'
    response = await client.post_trace(body, SITE, sign(body, SITE_SECRET), attest(body))
    assert (response.status, response.error) == (400, "bad_body")
    assert "blob lacks" in response.body_json["detail"]


@pytest.mark.asyncio
async def test_fallback_secret_and_site_key_normalisation() -> None:
    body = body_for()
    cfg = config(site_secrets={"pk_a": "secret-a"}, fallback_secret="fallback", require_scrub=False)
    async with StubPanel(cfg) as panel, PanelClient(panel.url, TIMEOUT) as client:
        # pk-a and pk_a name the same variable, PANEL_INGEST_SECRET_PK_A, so share a secret.
        assert secret_env_name("pk-a") == secret_env_name("pk_a")
        assert (await client.post_trace(body, "pk-a", sign(body, "secret-a"), None)).status == 200
        assert (await client.post_trace(body, "pk_zzz", sign(body, "fallback"), None)).status == 200
        assert (await client.post_trace(body, "pk_a", sign(body, "fallback"), None)).status == 401


@pytest.mark.asyncio
async def test_rate_limit_comes_first_with_its_headers() -> None:
    body = body_for()
    async with StubPanel(config(rate_limit=2, rate_window_s=60)) as panel:
        async with PanelClient(panel.url, TIMEOUT) as client:
            for _ in range(2):
                assert (
                    await client.post_trace(body, SITE, sign(body, SITE_SECRET), attest(body))
                ).ok
            limited = await client.post_trace(body, "", "", None)  # also missing auth: 429 wins
        assert limited.status == 429
        assert limited.body_json["error"] == "rate_limited"
        assert 0 < limited.body_json["retry_after_s"] <= 60
        assert 0 < limited.retry_after <= 60
        raw = await raw_post(panel.url, body, {})
        assert (
            raw.headers["x-ratelimit-limit"] == "2" and raw.headers["x-ratelimit-remaining"] == "0"
        )
        assert raw.headers["retry-after"]


# ---------------------------------------------------------------- faults


@pytest.mark.asyncio
async def test_fail_next_n_then_recover(panel: StubPanel, client: PanelClient) -> None:
    body = body_for()
    panel.set_faults(fail_next=2, status=503)
    statuses = [
        (await client.post_trace(body, SITE, sign(body, SITE_SECRET), attest(body))).status
        for _ in range(3)
    ]
    assert statuses == [503, 503, 200]
    assert [r["fault"] for r in panel.refused()] == [True, True]
    assert panel.stats()["faulted"] == 2


@pytest.mark.asyncio
async def test_fail_for_a_while_and_429_with_retry_after(
    panel: StubPanel, client: PanelClient
) -> None:
    body = body_for()
    panel.set_faults(fail_for_s=30, status=429, retry_after_s=4)
    response = await client.post_trace(body, SITE, sign(body, SITE_SECRET), attest(body))
    assert (response.status, response.error, response.retry_after) == (429, "rate_limited", 4)
    panel.set_faults(reset=True)
    assert (await client.post_trace(body, SITE, sign(body, SITE_SECRET), attest(body))).ok


@pytest.mark.asyncio
async def test_latency_beyond_the_read_timeout_is_panel_unavailable(panel: StubPanel) -> None:
    body = body_for()
    panel.set_faults(latency_ms=500)
    short = httpx.Timeout(connect=1.0, read=0.1, write=1.0, pool=1.0)
    async with PanelClient(panel.url, short) as client:
        with pytest.raises(PanelUnavailable) as info:
            await client.post_trace(body, SITE, sign(body, SITE_SECRET), attest(body))
    assert info.value.retriable and info.value.reason == "timeout"


@pytest.mark.asyncio
async def test_connection_refused_is_panel_unavailable() -> None:
    async with StubPanel() as panel:
        url = panel.url
    async with PanelClient(url, TIMEOUT) as client:
        with pytest.raises(PanelUnavailable) as info:
            await client.post_trace(b"{}", SITE, "00", None)
    assert info.value.reason == "transport" and SITE_SECRET not in str(info.value)


def test_panel_client_needs_every_timeout() -> None:
    with pytest.raises(ValueError, match="read"):
        PanelClient("http://127.0.0.1:1", httpx.Timeout(1.0, read=None))
    with pytest.raises(ValueError):
        PanelClient("ftp://x", TIMEOUT)


# ------------------------------------------------------------ from sync code and other processes


def test_in_thread_with_control_routes_over_http() -> None:
    body = body_for()
    with (
        StubPanel(config()).in_thread() as panel,
        httpx.Client(base_url=panel.url, timeout=5) as http,
    ):
        http.post("/_stub/faults", json={"fail_next": 1, "status": 500}).raise_for_status()
        headers = {
            "x-panel-site-key": SITE,
            "x-panel-ingest-sig": sign(body, SITE_SECRET),
            "x-scrubber-attestation": attest(body),
        }
        assert http.post(INGEST_PATH, content=body, headers=headers).status_code == 500
        assert http.post(INGEST_PATH, content=body, headers=headers).status_code == 200
        assert http.post(INGEST_PATH, content=b"{}", headers=headers).status_code == 401
        accepted = http.get("/_stub/accepted").json()
        assert accepted["count"] == 1 and accepted["traces"][0]["trace_id"] == "tr_oc_00000001"
        assert http.get("/_stub/accepted", params={"trace_id": "tr_oc_nope"}).json()["count"] == 0
        refused = http.get("/_stub/refused").json()["refused"]
        assert [(r["error"], r["fault"]) for r in refused] == [
            ("stub_fault", True),
            ("bad_signature", False),
        ]
        stats = http.get("/_stub/stats").json()
        assert stats["refused_by_error"] == {"bad_signature": 1} and stats["faulted"] == 1
        assert http.get("/_stub/faults").json()["fail_next"] == 0
        http.post("/_stub/reset").raise_for_status()
        assert http.get("/_stub/stats").json()["requests"] == 0


def test_main_runs_as_its_own_process_with_secrets_from_the_environment() -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PANEL_", "SCRUBBER_"))},
        secret_env_name("pk_cli"): "cli-secret",
        "SCRUBBER_JWT_SECRET": JWT,
    }
    with stub_process("panel", ["--site-key", "pk_cli", "--require-scrub"], env) as url:
        body = body_for()
        headers = {"x-panel-site-key": "pk_cli", "x-panel-ingest-sig": sign(body, "cli-secret")}
        missing = httpx.post(url + INGEST_PATH, content=body, headers=headers, timeout=5)
        assert missing.json() == {"error": "scrubber_attestation_required"}
        headers["x-scrubber-attestation"] = attest(body)
        assert (
            httpx.post(url + INGEST_PATH, content=body, headers=headers, timeout=5).status_code
            == 200
        )
        other = {"x-panel-site-key": SITE, "x-panel-ingest-sig": sign(body, "cli-secret")}
        refused = httpx.post(url + INGEST_PATH, content=body, headers=other, timeout=5)
        assert refused.json() == {"error": "ingest_not_configured"}


# ---------------------------------------------------------------- load: rate limit and load faults


@pytest.mark.asyncio
async def test_the_rate_limit_is_a_token_bucket_that_says_when_the_next_token_comes() -> None:
    now = [1_700_000_000.0]
    body = body_for()
    headers = {"x-panel-site-key": SITE, "x-panel-ingest-sig": sign(body, SITE_SECRET),
               "x-scrubber-attestation": attest(body, now[0]), "content-type": "application/json"}
    async with StubPanel(config(rate_limit=5, rate_window_s=1.0), clock=lambda: now[0]) as panel:
        statuses = [(await raw_post(panel.url, body, headers)).status_code for _ in range(6)]
        assert statuses == [200] * 5 + [429]  # a burst of 5
        limited = await raw_post(panel.url, body, headers)
        assert limited.json()["retry_after_s"] == pytest.approx(0.2)  # one token each 0.2 s
        assert limited.headers["retry-after"] == "1"  # delta-seconds are whole seconds
        now[0] += 0.2
        assert [(await raw_post(panel.url, body, headers)).status_code for _ in range(2)] == [200, 429]
        now[0] += 10  # a long quiet spell fills the bucket to its burst, no further
        statuses = [(await raw_post(panel.url, body, headers)).status_code for _ in range(6)]
        assert statuses == [200] * 5 + [429]


@pytest.mark.asyncio
async def test_a_fail_rate_fails_about_that_share_of_requests() -> None:
    async with StubPanel(config()) as panel:
        panel.rng.seed(7)
        panel.set_faults(fail_rate=0.3, status=503)
        statuses = [(await raw_post(panel.url, b"{}", {})).status_code for _ in range(200)]
    failed = statuses.count(503)
    assert 35 <= failed <= 85 and panel.faulted == failed
    assert set(statuses) == {503, 401}  # the others reached the contract's checks


@pytest.mark.asyncio
async def test_a_concurrency_cap_answers_503_overloaded_beyond_it() -> None:
    async with StubPanel(config()) as panel:
        panel.set_faults(max_concurrent=2, latency_ms=300)
        async with httpx.AsyncClient(timeout=5) as http:
            answers = await asyncio.gather(*(http.post(panel.url + INGEST_PATH, content=b"{}") for _ in range(5)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [401, 401, 503, 503, 503]
    assert all(a.json()["error"] == "overloaded" for a in answers if a.status_code == 503)
    assert panel.stats()["overloaded"] == 3


@pytest.mark.parametrize("bad", [{"fail_rate": 1.5}, {"drop_rate": -0.1}, {"max_concurrent": "2"}])
def test_load_fault_knobs_are_checked(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        StubPanel(config()).set_faults(**bad)
