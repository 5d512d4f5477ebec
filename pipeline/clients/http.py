"""What the HTTP clients share: the one connection-pool setup of the stage clients (panel,
scrubber), closing on `async with` (those two and the opencode client), URL checks, telling a
timeout from a broken connection, and JSON read as the services' own JSON.parse reads it (by
the clients and by the stubs that stand in for those services).

Not named `http`: inside pipeline/ that would shadow the standard library's http package for
any script run from that directory.
"""

from __future__ import annotations

import functools
import json
import ssl
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import httpx

__all__ = [
    "DEFAULT_LIMITS",
    "FRESH_CONNECTION_LIMITS",
    "ClosingClient",
    "checked_base_url",
    "display_url",
    "dropped_before_answer",
    "no_answer_reason",
    "parse_json",
    "pooled_client",
    "require_explicit_timeout",
]

DEFAULT_LIMITS = httpx.Limits(max_connections=20, max_keepalive_connections=10)


def display_url(url: str) -> str:
    """scheme://host[:port]/path without any user:password part, for reprs and errors."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def require_explicit_timeout(timeout: httpx.Timeout) -> httpx.Timeout:
    """A client without a bound on every phase can hang a stage forever on one request."""
    missing = [
        name for name in ("connect", "read", "write", "pool") if getattr(timeout, name) is None
    ]
    if missing:
        raise ValueError(
            f"httpx.Timeout must set connect, read, write and pool; unset: {', '.join(missing)}"
        )
    return timeout


def checked_base_url(url: str) -> str:
    """`url` without its trailing slash; ValueError unless http(s) with a host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"base_url must be an http(s) URL with a host, got {display_url(url)!r}")
    return url.rstrip("/")


@functools.cache
def tls_context(trust_env: bool) -> ssl.SSLContext:
    """One TLS context per process (per `trust_env`, which decides whether SSL_CERT_FILE is read),
    shared by every client: building one loads the CA bundle, about 50 ms of CPU, and a collector
    opens a client per host and directory at once, long enough to miss its group's heartbeats."""
    return httpx.create_ssl_context(trust_env=trust_env)


def pooled_client(
    timeout: httpx.Timeout,
    transport: httpx.AsyncBaseTransport | None = None,
    limits: httpx.Limits | None = None,
) -> httpx.AsyncClient:
    """The connection pool a stage's service client sends through."""
    # trust_env=False: proxies and netrc come from configuration, never silently from the
    # environment of whichever host the stage runs on.
    return httpx.AsyncClient(
        timeout=require_explicit_timeout(timeout),
        transport=transport,
        limits=limits or DEFAULT_LIMITS,
        follow_redirects=False,
        trust_env=False,
        verify=tls_context(False),
    )


# No keep-alive: every request through it opens a connection of its own.
FRESH_CONNECTION_LIMITS = httpx.Limits(max_connections=20, max_keepalive_connections=0)


def dropped_before_answer(exc: httpx.HTTPError) -> bool:
    """The server closed or reset the connection before any answer: what a pooled keep-alive
    connection the server had already given up on looks like (as opposed to a timeout, or a
    connection that could not be opened)."""
    return isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError)


def no_answer_reason(exc: httpx.HTTPError) -> str:
    """Why a request got no HTTP answer at all: "timeout" or "transport"."""
    return "timeout" if isinstance(exc, httpx.TimeoutException) else "transport"


class ClosingClient:
    """`async with client:` hands back the client and closes its connections on the way out."""

    _client: httpx.AsyncClient

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: str | bytes) -> Any:
    """`raw` as JSON, refusing NaN and Infinity as JavaScript's JSON.parse does (they could
    never be signed or hashed the same on the other side); raises ValueError, or
    RecursionError for absurdly deep nesting."""
    return json.loads(raw, parse_constant=_refuse_constant)
