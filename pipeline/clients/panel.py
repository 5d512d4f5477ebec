"""Async client for one panel endpoint's trace ingest (`POST /api/v1/traces`).

It sends bytes it is given (already signed and attested) and reports what came back; it
never retries: retries, re-signing and the breaker belong to the deliver stage, except the one
immediate retry, on a new connection, of a request whose pooled connection the server had dropped.
Every failure of the HTTP client (`pipeline.clients.http.TransportError`) is translated in one
place, `PanelClient.post_trace`, into::

    PanelError
    └── PanelUnavailable    no HTTP answer at all (connect error, timeout, broken connection)

An HTTP answer of any status is a PanelResponse, not an error: only the deliver stage knows
whether a 401 or 422 means "dead-letter" or "re-sign and try again".
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from pipeline.clients.http import (
    FRESH_CONNECTION_LIMITS,
    ClosingClient,
    Limits,
    PooledClient,
    Transport,
    TransportError,
    checked_base_url,
    display_url,
    dropped_before_answer,
    no_answer_reason,
    pooled_client,
)
from pipeline.delivery.retry import parse_retry_after

__all__ = [
    "INGEST_PATH",
    "PanelClient",
    "PanelError",
    "PanelResponse",
    "PanelUnavailable",
]

INGEST_PATH = "/api/v1/traces"
# Error pages from proxies can be large; the deliver stage only needs the start of one.
_MAX_TEXT = 4096


class PanelError(Exception):
    retriable = False

    def __init__(self, message: str, *, reason: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


class PanelUnavailable(PanelError):
    retriable = True


@dataclass(frozen=True)
class PanelResponse:
    status: int
    body_json: Any  # the parsed answer, None when it was not JSON
    text: str  # the raw answer (first 4 KiB)
    latency_ms: float
    retry_after: float | None  # seconds, from Retry-After or the 429 body's retry_after_s

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def error(self) -> str | None:
        """The panel's refusal code (`bad_signature`, `scrubber_attestation_stale`, ...)."""
        if isinstance(self.body_json, dict) and isinstance(self.body_json.get("error"), str):
            return self.body_json["error"]
        return None


class PanelClient(ClosingClient):
    """One pooled connection set to one panel endpoint; use as an async context manager."""

    def __init__(
        self,
        base_url: str,
        timeout: httpx.Timeout,
        transport: Transport | None = None,
        *,
        limits: Limits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = checked_base_url(base_url)
        self._clock = clock
        self._url = self.base_url + INGEST_PATH
        self._client: PooledClient = pooled_client(timeout, transport, limits)
        # the one immediate retry of a request whose pooled connection the server had dropped
        self._fresh = pooled_client(timeout, transport, FRESH_CONNECTION_LIMITS)

    def __repr__(self) -> str:
        return f"PanelClient({display_url(self.base_url)!r})"

    async def aclose(self) -> None:
        await self._client.aclose()
        await self._fresh.aclose()

    async def post_trace(
        self, body: bytes, site_key: str, signature: str, attestation: str | None
    ) -> PanelResponse:
        headers = {
            "content-type": "application/json",
            "x-panel-site-key": site_key,
            "x-panel-ingest-sig": signature,
        }
        if attestation:
            headers["x-scrubber-attestation"] = attestation
        started = time.perf_counter()
        # A POST that timed out may still have been accepted; that is safe because the panel
        # upserts by trace_id, so the retry the deliver stage makes is not a second trace. The
        # same holds for the one retry at once, on a new connection, of a request whose pooled
        # connection the server closed before answering (it had timed the connection out): that
        # is no failure of the panel, and must not count toward its breaker.
        url = self._url
        try:
            try:
                response = await self._client.post(url, content=body, headers=headers)
            except TransportError as exc:
                if not dropped_before_answer(exc):
                    raise
                started = time.perf_counter()
                response = await self._fresh.post(url, content=body, headers=headers)
        except TransportError as exc:
            raise PanelUnavailable(
                f"panel {self!r}: {type(exc).__name__}", reason=no_answer_reason(exc)
            ) from exc
        latency_ms = (time.perf_counter() - started) * 1000.0
        try:
            body_json: Any = json.loads(response.content)
        except (ValueError, RecursionError):
            body_json = None
        return PanelResponse(
            status=response.status_code,
            body_json=body_json,
            text=response.content[:_MAX_TEXT].decode("utf-8", errors="replace"),
            latency_ms=latency_ms,
            retry_after=parse_retry_after(
                response.headers.get("retry-after"), self._clock(), body_json
            ),
        )
