"""Async client for one ``opencode serve`` daemon (HTTP API of opencode 1.18.33).

Every httpx failure and every unexpected answer is translated in one place,
:meth:`OpencodeClient._boundary` plus :func:`_check_response`, into::

    OpencodeError
    ├── InsecureHostError       plain http to a non-loopback host (refused up front)
    ├── OpencodeUnavailable     connect errors, timeouts, 5xx, 408/429: retry later
    ├── OpencodeAuthError       401 / 403
    └── OpencodeProtocolError   other 4xx, payloads of the wrong shape
        └── OpencodeNotFound    404 (a deleted session, for one)

The password is held only inside the httpx auth object: it is never part of a
repr or an error message (error text is also scrubbed of it, in case a server
ever echoes it back: the password, the base64 credential of the Authorization
header, and any ``Basic <credential>`` value).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, TypedDict
from urllib.parse import quote, urlsplit

import httpx

from pipeline.clients.http import ClosingClient, parse_json, tls_context
from pipeline.clients.sse import DEFAULT_MAX_FRAME_BYTES, SSEFrameTooLarge, SSEParser

__all__ = [
    "DEFAULT_TIMEOUT",
    "InsecureHostError",
    "MalformedFrame",
    "OpencodeAuthError",
    "OpencodeClient",
    "OpencodeError",
    "OpencodeNotFound",
    "OpencodeProtocolError",
    "OpencodeUnavailable",
    "TaskResult",
    "is_loopback_host",
    "reply_text",
    "split_model",
    "turn_errors",
    "turn_messages",
    "unwrap_event",
]

# read=30 s outlasts opencode's ~10 s SSE heartbeat, so a silent event stream
# means a dead connection, not a quiet daemon.
DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=30.0, write=30.0, pool=10.0)
# POST /session/{id}/message holds the response until the whole turn ends.
DEFAULT_TURN_TIMEOUT = 900.0
_SNIPPET = 300
_REDACTED = "***"
# "Basic <token>" as an echoed Authorization header shows it (any case, JSON- or header-quoted)
_BASIC = re.compile(r"(?i)\b(basic)\s+([A-Za-z0-9+/]+={0,2})")


class OpencodeError(Exception):
    """Base of this client's errors. ``status_code`` is set for HTTP answers."""

    retriable = False

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class InsecureHostError(OpencodeError, ValueError):
    def __init__(self, host: str) -> None:
        super().__init__(
            f"refusing plain http to non-loopback host {host!r}: basic-auth credentials and "
            "session contents would cross the network in clear; use https, or pass "
            "allow_insecure_http=True if the network is trusted"
        )
        self.host = host


class OpencodeUnavailable(OpencodeError):
    retriable = True


class OpencodeAuthError(OpencodeError):
    pass


class OpencodeProtocolError(OpencodeError):
    pass


class OpencodeNotFound(OpencodeProtocolError):
    pass


@dataclass(frozen=True, slots=True)
class MalformedFrame:
    """An event frame that could not be used as-is; meant for a dead-letter topic.

    ``reason`` is one of ``not-json``, ``not-an-object``, ``invalid-utf8``
    (the JSON may still have parsed: see ``parsed``) or ``oversize``.
    """

    reason: str
    raw: str
    detail: str = ""
    parsed: Any = None


class TaskResult(TypedDict):
    session_id: str
    reply: str
    response: dict[str, Any]


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_model(model: str) -> dict[str, str]:
    """``"provider/model"`` -> ``{providerID, modelID}``; model IDs may contain ``/``."""
    provider, sep, model_id = model.partition("/")
    if not sep or not provider or not model_id:
        raise ValueError(f"model must look like 'provider/model', got {model!r}")
    return {"providerID": provider, "modelID": model_id}


def reply_text(message: Mapping[str, Any]) -> str:
    """The text parts of one ``{info, parts}`` message, joined with newlines."""
    parts = message.get("parts") or []
    return "\n".join(
        str(p.get("text", ""))
        for p in parts
        if isinstance(p, dict) and p.get("type") == "text" and not p.get("ignored")
    )


def turn_messages(listing: list[dict[str, Any]], last: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The messages of the turn that ended with `last` (the assistant message a prompt
    returned): the user message that started it and every message after it, up to `last`.
    ``prompt`` answers with the last message only; a turn's failed tools sit in the earlier
    ones. When `last` is not in `listing` (deleted meanwhile), just ``[last]``."""
    last_id = last.get("info", {}).get("id")
    ids = [m.get("info", {}).get("id") for m in listing]
    if last_id not in ids:
        return [dict(last)]
    end = ids.index(last_id)
    start = end
    while start > 0 and listing[start].get("info", {}).get("role") != "user":
        start -= 1
    return listing[start:end + 1]


def turn_errors(messages: list[dict[str, Any]]) -> list[str]:
    """What went wrong in a turn, one line each: an assistant message that ended in an error
    (``info.error``: its name and message, e.g. the model's API answering 400) and every tool
    call that failed (its tool name and error). Empty for a turn that ended well."""
    found: list[str] = []
    for message in messages:
        info = message.get("info") or {}
        if info.get("role") != "assistant":
            continue
        for part in message.get("parts") or []:
            state = part.get("state") if isinstance(part, dict) and part.get("type") == "tool" else None
            if isinstance(state, dict) and state.get("status") == "error":
                found.append(f"tool {part.get('tool') or '?'} failed: {_one_line(state.get('error'))}")
        error = info.get("error")
        if isinstance(error, dict):
            data = error.get("data") if isinstance(error.get("data"), dict) else {}
            status = f" (HTTP {data['statusCode']})" if isinstance(data.get("statusCode"), int) else ""
            detail = data.get("message") or data or ""
            found.append(f"{error.get('name') or 'error'}{status}: {_one_line(detail)}".rstrip(": "))
        elif error:
            found.append(f"error: {_one_line(error)}")
    return found


def _one_line(value: Any) -> str:
    return _snippet(str(value if value is not None else ""))


def unwrap_event(frame: Mapping[str, Any]) -> dict[str, Any]:
    """The ``{id, type, properties}`` event of an ``/event`` frame, or of a
    ``/global/event`` frame's ``payload``; ``{}`` when there is none."""
    body = frame.get("payload", frame)
    return dict(body) if isinstance(body, Mapping) else {}


class OpencodeClient(ClosingClient):
    """One daemon. Use as ``async with OpencodeClient(...) as client:``."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:4096",
        password: str | None = None,
        *,
        username: str = "opencode",
        directory: str | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        allow_insecure_http: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
        model: str | None = None,
        agent: str | None = None,
        turn_timeout: float | None = DEFAULT_TURN_TIMEOUT,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url must be an http(s) URL with a host, got {base_url!r}")
        if url.username is not None or url.password is not None:
            # Never echo the URL back here: it holds a credential.
            raise ValueError("base_url must not embed credentials; pass password= instead")
        if url.scheme == "http" and not allow_insecure_http and not is_loopback_host(url.hostname):
            raise InsecureHostError(url.hostname)
        if model is not None:
            split_model(model)
        self.base_url = base_url.rstrip("/")
        self.username = username
        self.directory = directory
        self.model = model
        self.agent = agent
        self._timeout = timeout
        self._turn_timeout = turn_timeout
        self._max_frame_bytes = max_frame_bytes
        self._secret = password or None
        self._redact = _secret_forms(username, password) if password else ()
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            auth=httpx.BasicAuth(username, password) if password else None,
            timeout=timeout,
            transport=transport,
            headers={"Accept": "application/json"},
            follow_redirects=False,
            verify=tls_context(True),
        )

    def __repr__(self) -> str:
        return (
            f"OpencodeClient(base_url={self.base_url!r}, username={self.username!r}, "
            f"auth={'basic' if self._secret else 'none'}, directory={self.directory!r})"
        )

    # -- the API ---------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        body = await self._json("GET", "/global/health", scoped=False)
        return _expect_dict(body, "GET /global/health", required=("healthy",))

    async def list_sessions(self, limit: int | None = None) -> list[dict[str, Any]]:
        params = {"limit": limit} if limit is not None else None
        body = await self._json("GET", "/session", params=params)
        return _expect_list_of_dicts(body, "GET /session", required=("id",))

    async def session_status(self) -> dict[str, dict[str, Any]]:
        """Busy/retrying sessions by ID. A session that is absent is idle."""
        body = await self._json("GET", "/session/status")
        status = _expect_dict(body, "GET /session/status")
        if not all(isinstance(v, dict) for v in status.values()):
            raise OpencodeProtocolError("GET /session/status: values are not objects")
        return status

    async def get_session(self, session_id: str) -> dict[str, Any]:
        path = f"/session/{_segment(session_id)}"
        return _expect_dict(await self._json("GET", path), f"GET {path}", required=("id",))

    async def messages(self, session_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        """``[{info, parts}]``, oldest first (the last ``limit`` when given)."""
        path = f"/session/{_segment(session_id)}/message"
        params = {"limit": limit} if limit is not None else None
        body = await self._json("GET", path, params=params)
        listing = _expect_list_of_dicts(body, f"GET {path}", required=("info", "parts"))
        for message in listing:
            _expect_message(message, f"GET {path}")
        return listing

    async def create_session(self, title: str | None = None, agent: str | None = None) -> dict[str, Any]:
        payload: dict[str, Any] = {}
        if title is not None:
            payload["title"] = title
        if agent is not None:
            payload["agent"] = agent
        body = await self._json("POST", "/session", json=payload)
        return _expect_dict(body, "POST /session", required=("id",))

    async def prompt(
        self,
        session_id: str,
        text: str,
        model: str | None = None,
        agent: str | None = None,
    ) -> dict[str, Any]:
        """Send one user message; blocks until the turn ends. Returns the last
        assistant message ``{info, parts}`` (its ``info.error`` says if it failed)."""
        payload: dict[str, Any] = {"parts": [{"type": "text", "text": text}]}
        model = model if model is not None else self.model
        agent = agent if agent is not None else self.agent
        if model is not None:
            payload["model"] = split_model(model)
        if agent is not None:
            payload["agent"] = agent
        path = f"/session/{_segment(session_id)}/message"
        timeout = httpx.Timeout(self._timeout)
        if self._turn_timeout is not None:
            timeout = httpx.Timeout(
                connect=timeout.connect,
                read=self._turn_timeout,
                write=timeout.write,
                pool=timeout.pool,
            )
        body = await self._json("POST", path, json=payload, timeout=timeout)
        return _expect_message(_expect_dict(body, f"POST {path}"), f"POST {path}")

    async def run_task(self, prompt: str, title: str | None = None) -> TaskResult:
        session = await self.create_session(title=title, agent=self.agent)
        return await self.continue_session(str(session["id"]), prompt)

    async def continue_session(self, session_id: str, prompt: str) -> TaskResult:
        response = await self.prompt(session_id, prompt)
        return {"session_id": session_id, "reply": reply_text(response), "response": response}

    async def events(self, global_: bool = False) -> AsyncIterator[dict[str, Any] | MalformedFrame]:
        """Parsed JSON frames of ``/event`` (or ``/global/event``), as they come.

        Ends when the server closes the stream; connection loss and read
        timeouts raise :class:`OpencodeUnavailable`. Frames that are not a
        JSON object come out as :class:`MalformedFrame` so the caller can
        dead-letter them and carry on.
        """
        path = "/global/event" if global_ else "/event"
        parser = SSEParser(self._max_frame_bytes)
        async with self._stream("GET", path, scoped=not global_) as response:
            chunks = response.aiter_bytes()
            while True:
                with self._boundary("GET", path):
                    chunk = await anext(chunks, None)
                if chunk is None:
                    return
                try:
                    frames = parser.feed(chunk)
                except SSEFrameTooLarge as exc:
                    yield MalformedFrame("oversize", "", str(exc))
                    frames = exc.frames
                for frame in frames:
                    yield _decode_frame(frame.data, frame.invalid_utf8)

    # -- the one translation boundary -------------------------------------

    def _params(self, params: Mapping[str, Any] | None, scoped: bool) -> dict[str, Any]:
        merged = dict(params or {})
        if scoped and self.directory is not None:
            merged.setdefault("directory", self.directory)
        return merged

    @contextmanager
    def _boundary(self, method: str, path: str) -> Iterator[None]:
        try:
            yield
        except OpencodeError:
            raise
        except httpx.TimeoutException as exc:
            raise OpencodeUnavailable(self._scrub(f"{method} {path}: timed out ({_kind(exc)})")) from None
        except httpx.TransportError as exc:
            raise OpencodeUnavailable(self._scrub(f"{method} {path}: {_kind(exc)}: {exc}")) from None
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
            raise OpencodeProtocolError(self._scrub(f"{method} {path}: {_kind(exc)}: {exc}")) from None

    def _scrub(self, text: str) -> str:
        """`text` without the password in any form a server could echo it in."""
        text = _BASIC.sub(_redact_basic, text)
        for form in self._redact:
            text = text.replace(form, _REDACTED)
        return text

    def _echo(self, text: str) -> str:
        """A snippet of a server's answer for an error message, scrubbed before it is cut
        (a cut could leave a credential's prefix) and after (the whitespace is folded)."""
        return self._scrub(_snippet(self._scrub(text)))

    async def _json(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        timeout: httpx.Timeout | None = None,
        scoped: bool = True,
    ) -> Any:
        with self._boundary(method, path):
            response = await self._client.request(
                method,
                path,
                params=self._params(params, scoped),
                json=json,
                timeout=timeout if timeout is not None else self._timeout,
            )
            self._check(response, method, path)
            try:
                return response.json()
            except ValueError:
                raise OpencodeProtocolError(
                    self._scrub(f"{method} {path}: answer is not JSON: {self._echo(response.text)}"),
                    status_code=response.status_code,
                ) from None

    @asynccontextmanager
    async def _stream(self, method: str, path: str, *, scoped: bool) -> AsyncIterator[httpx.Response]:
        with self._boundary(method, path):
            request = self._client.build_request(
                method,
                path,
                params=self._params(None, scoped),
                headers={"Accept": "text/event-stream"},
                timeout=self._timeout,
            )
            response = await self._client.send(request, stream=True)
        try:
            with self._boundary(method, path):
                if response.status_code >= 300:
                    await response.aread()
                self._check(response, method, path)
                content_type = response.headers.get("content-type", "")
                if not content_type.startswith("text/event-stream"):
                    raise OpencodeProtocolError(
                        self._scrub(f"{method} {path}: expected text/event-stream, got {content_type!r}"),
                        status_code=response.status_code,
                    )
            yield response
        finally:
            await response.aclose()

    def _check(self, response: httpx.Response, method: str, path: str) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        detail = self._scrub(f"{method} {path}: HTTP {status}: {self._echo(response.text)}")
        if status in (401, 403):
            raise OpencodeAuthError(
                self._scrub(f"{method} {path}: HTTP {status}: authentication failed for user {self.username!r}"),
                status_code=status,
            )
        if status >= 500 or status in (408, 429):
            raise OpencodeUnavailable(detail, status_code=status)
        if status == 404:
            raise OpencodeNotFound(detail, status_code=status)
        raise OpencodeProtocolError(detail, status_code=status)


def _decode_frame(data: str, invalid_utf8: bool) -> dict[str, Any] | MalformedFrame:
    try:
        parsed = parse_json(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        return MalformedFrame("not-json", data, str(exc)[:200])
    if invalid_utf8:
        return MalformedFrame("invalid-utf8", data, "frame bytes were not valid UTF-8", parsed)
    if not isinstance(parsed, dict):
        return MalformedFrame("not-an-object", data, type(parsed).__name__, parsed)
    return parsed


def _secret_forms(username: str, password: str) -> tuple[str, ...]:
    """The password as it could come back: raw, URL-quoted, and as the base64 credential of
    the Basic header (`username:password`, UTF-8, as httpx.BasicAuth encodes it). Longest
    first, so a form containing another is replaced whole."""
    credential = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    forms = {password, quote(password, safe=""), credential, credential.rstrip("=")}
    return tuple(sorted((f for f in forms if f), key=len, reverse=True))


def _redact_basic(match: re.Match[str]) -> str:
    """`Basic ***` for a Basic credential (base64 of `user:password`); other words left alone
    ("basic usage" is not a header)."""
    try:
        decoded = base64.b64decode(match.group(2), validate=True)
    except (binascii.Error, ValueError):
        return match.group(0)
    return f"{match.group(1)} {_REDACTED}" if b":" in decoded else match.group(0)


def _segment(value: str) -> str:
    if not value:
        raise ValueError("an ID must not be empty")
    return quote(value, safe="")


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _SNIPPET else text[:_SNIPPET] + "..."


def _kind(exc: BaseException) -> str:
    return type(exc).__name__


def _expect_dict(body: Any, where: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise OpencodeProtocolError(f"{where}: expected an object, got {type(body).__name__}")
    missing = [key for key in required if key not in body]
    if missing:
        raise OpencodeProtocolError(f"{where}: answer lacks {', '.join(missing)}")
    return body


def _expect_list_of_dicts(body: Any, where: str, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    if not isinstance(body, list):
        raise OpencodeProtocolError(f"{where}: expected an array, got {type(body).__name__}")
    return [_expect_dict(item, where, required) for item in body]


def _expect_message(message: dict[str, Any], where: str) -> dict[str, Any]:
    _expect_dict(message, where, required=("info", "parts"))
    if not isinstance(message["info"], dict) or not isinstance(message["parts"], list):
        raise OpencodeProtocolError(f"{where}: a message needs an object info and a parts array")
    return message
