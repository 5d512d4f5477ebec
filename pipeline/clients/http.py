"""What the HTTP clients share: the one connection-pool setup of the stage clients (panel,
scrubber: `pooled_client`, on aiohttp), closing on `async with` (those two and the opencode
client), URL checks, telling a timeout from a broken connection, and JSON read as the services'
own JSON.parse reads it (by the clients and by the stubs that stand in for those services).

The stage clients send one small POST per record and read the whole answer; httpx's
AsyncClient cost about four times aiohttp's ClientSession in client CPU per request (the
profile in bench/README.md), so they go through aiohttp. The opencode client stays on httpx
(`pipeline/clients/opencode.py`): it follows long-lived SSE streams and is not on a per-record
path. Both take the one TLS context (`tls_context`), explicit timeouts and no proxy, netrc
or redirect from the environment.

Not named `http`: inside pipeline/ that would shadow the standard library's http package for
any script run from that directory.
"""

from __future__ import annotations

import asyncio
import functools
import json
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self
from urllib.parse import urlsplit

import aiohttp
import httpx
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = [
    "DEFAULT_LIMITS",
    "FRESH_CONNECTION_LIMITS",
    "ClosingClient",
    "HttpAnswer",
    "HttpRequest",
    "Limits",
    "PooledClient",
    "Transport",
    "TransportError",
    "checked_base_url",
    "client_timeout",
    "display_url",
    "dropped_before_answer",
    "no_answer_reason",
    "parse_json",
    "pooled_client",
    "require_explicit_timeout",
]


@dataclass(frozen=True)
class Limits:
    """How many connections a pool opens at once, and whether it keeps them for the next request."""

    max_connections: int = 20
    keep_alive: bool = True


DEFAULT_LIMITS = Limits(max_connections=20)
# No keep-alive: every request through it opens a connection of its own.
FRESH_CONNECTION_LIMITS = Limits(max_connections=20, keep_alive=False)


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


def client_timeout(timeout: httpx.Timeout) -> aiohttp.ClientTimeout:
    """`timeout`'s phases as aiohttp bounds them: waiting for a pooled connection and opening one
    (`connect` = pool + connect, `sock_connect` = connect), each read of the answer (`sock_read` =
    read), and, as aiohttp has no bound of its own on writing the request, the whole request
    (`total` = pool + connect + write + read): a server that stops reading the body is cut off."""
    t = require_explicit_timeout(timeout)
    assert t.connect is not None and t.read is not None and t.write is not None and t.pool is not None
    return aiohttp.ClientTimeout(total=t.pool + t.connect + t.write + t.read, connect=t.pool + t.connect,
                                 sock_connect=t.connect, sock_read=t.read)


@dataclass(frozen=True)
class HttpRequest:
    """A request as a test transport sees it."""

    method: str
    url: str
    headers: Mapping[str, str]
    content: bytes
    params: Mapping[str, str] | None


@dataclass(frozen=True)
class HttpAnswer:
    """An HTTP answer, read whole: status, body and (case-insensitive) headers."""

    status_code: int
    content: bytes
    headers: CIMultiDictProxy[str]

    @classmethod
    def of(cls, status_code: int, content: bytes = b"", headers: Mapping[str, str] | None = None) -> HttpAnswer:
        return cls(status_code, content, CIMultiDictProxy(CIMultiDict(headers or {})))


# What stands in for the network in tests: answers a request, or raises a TransportError.
Transport = Callable[[HttpRequest], Awaitable[HttpAnswer]]
# What a request that got no HTTP answer raises (aiohttp's errors, and its total timeout).
TransportError = (aiohttp.ClientError, asyncio.TimeoutError)


class PooledClient:
    """One aiohttp connection pool, opened on the first request (inside the event loop that sends
    it), sending POSTs and reading their answers whole."""

    def __init__(self, timeout: httpx.Timeout, transport: Transport | None = None,
                 limits: Limits | None = None) -> None:
        self._timeout = client_timeout(timeout)
        self._transport = transport
        self._limits = limits or DEFAULT_LIMITS
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self._limits.max_connections,
                                         force_close=not self._limits.keep_alive, ssl=tls_context(False))
        # trust_env=False: proxies and netrc come from configuration, never silently from the
        # environment of whichever host the stage runs on; no cookies are kept between requests
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout, trust_env=False,
                                              cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def post(self, url: str, *, content: bytes, headers: Mapping[str, str],
                   params: Mapping[str, str] | None = None) -> HttpAnswer:
        """The answer of any status; raises one of TransportError when there is none."""
        if self._transport is not None:
            return await self._transport(HttpRequest("POST", url, headers, content, params))
        session = self._session or self._open()
        async with session.post(url, data=content, headers=headers, params=params,
                                allow_redirects=False) as response:
            return HttpAnswer(response.status, await response.read(), response.headers)

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


def pooled_client(timeout: httpx.Timeout, transport: Transport | None = None,
                  limits: Limits | None = None) -> PooledClient:
    """The connection pool a stage's service client sends through."""
    return PooledClient(timeout, transport, limits)


def dropped_before_answer(exc: BaseException) -> bool:
    """The server closed or reset the connection before any answer: what a pooled keep-alive
    connection the server had already given up on looks like (as opposed to a timeout, or a
    connection that could not be opened)."""
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ServerTimeoutError):
        return False
    return isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError
                      | aiohttp.ClientConnectionResetError)


def no_answer_reason(exc: BaseException) -> str:
    """Why a request got no HTTP answer at all: "timeout" or "transport"."""
    return "timeout" if isinstance(exc, asyncio.TimeoutError) else "transport"


class _Closable(Protocol):
    async def aclose(self) -> None: ...


class ClosingClient:
    """`async with client:` hands back the client and closes its connections on the way out."""

    _client: _Closable

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
