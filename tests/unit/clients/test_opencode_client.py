"""OpencodeClient against httpx.MockTransport: requests it makes, errors it raises."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import httpx
import pytest

from pipeline.clients.opencode import (
    InsecureHostError,
    MalformedFrame,
    OpencodeAuthError,
    OpencodeClient,
    OpencodeError,
    OpencodeNotFound,
    OpencodeProtocolError,
    OpencodeUnavailable,
    reply_text,
    split_model,
)

SECRET = "hunter2-not-for-logs"
URL = "http://127.0.0.1:4096"

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A MockTransport handler that records requests and answers from a table."""

    def __init__(self, routes: dict[tuple[str, str], Any] | None = None) -> None:
        self.routes = routes or {}
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.routes.get((request.method, request.url.path))
        if answer is None:
            return httpx.Response(404, json={"name": "NotFoundError"})
        if isinstance(answer, httpx.Response):
            return answer
        if callable(answer):
            return answer(request)
        return httpx.Response(200, json=answer)

    def body(self, index: int = -1) -> Any:
        return json.loads(self.requests[index].content)


def client_for(handler: Handler, **kwargs: Any) -> OpencodeClient:
    return OpencodeClient(kwargs.pop("base_url", URL), transport=httpx.MockTransport(handler), **kwargs)


ASSISTANT = {
    "info": {"id": "msg_2", "role": "assistant", "sessionID": "ses_1", "finish": "stop"},
    "parts": [
        {"type": "step-start"},
        {"type": "text", "text": "first line"},
        {"type": "tool", "tool": "bash", "state": {"status": "completed"}},
        {"type": "text", "text": "second line"},
        {"type": "step-finish", "reason": "stop"},
    ],
}


# -- construction, transport security and secrets ---------------------------


@pytest.mark.parametrize("host", ["example.com", "10.0.0.5", "192.168.1.10", "[2001:db8::1]"])
def test_plain_http_to_remote_host_is_refused_naming_the_host(host: str) -> None:
    with pytest.raises(InsecureHostError) as info:
        OpencodeClient(f"http://{host}:4096", SECRET)
    assert host.strip("[]") in str(info.value)
    assert SECRET not in str(info.value)
    assert isinstance(info.value, OpencodeError)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:4096",
        "http://127.8.9.10:1",
        "http://localhost:4096",
        "http://[::1]:4096",
        "https://example.com",
    ],
)
def test_loopback_and_https_are_allowed(url: str) -> None:
    OpencodeClient(url)


def test_insecure_http_can_be_allowed_explicitly() -> None:
    client = OpencodeClient("http://example.com:4096", allow_insecure_http=True)
    assert client.base_url == "http://example.com:4096"


def test_credentials_in_url_are_rejected_without_echoing_them() -> None:
    with pytest.raises(ValueError) as info:
        OpencodeClient(f"http://opencode:{SECRET}@127.0.0.1:4096")
    assert SECRET not in str(info.value)


def test_non_http_url_is_rejected() -> None:
    with pytest.raises(ValueError):
        OpencodeClient("ftp://127.0.0.1/")


def test_password_never_in_repr() -> None:
    client = OpencodeClient(URL, SECRET)
    assert SECRET not in repr(client)
    assert "auth=basic" in repr(client)


@pytest.mark.asyncio
async def test_basic_auth_header_when_password_set() -> None:
    recorder = Recorder({("GET", "/global/health"): {"healthy": True, "version": "1.18.33"}})
    async with client_for(recorder, password=SECRET) as client:
        assert await client.health() == {"healthy": True, "version": "1.18.33"}
    expected = base64.b64encode(f"opencode:{SECRET}".encode()).decode()
    assert recorder.requests[0].headers["authorization"] == f"Basic {expected}"


@pytest.mark.asyncio
async def test_custom_username() -> None:
    recorder = Recorder({("GET", "/global/health"): {"healthy": True, "version": "x"}})
    async with client_for(recorder, password="pw", username="ci") as client:
        await client.health()
    assert recorder.requests[0].headers["authorization"] == "Basic " + base64.b64encode(b"ci:pw").decode()


@pytest.mark.asyncio
async def test_no_auth_header_without_password() -> None:
    recorder = Recorder({("GET", "/global/health"): {"healthy": True, "version": "x"}})
    async with client_for(recorder) as client:
        await client.health()
    assert "authorization" not in recorder.requests[0].headers


# -- error translation at the boundary ----------------------------------------


def raising(exc: Exception) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (httpx.ConnectError("Connection refused"), OpencodeUnavailable),
        (httpx.ConnectTimeout("connect timed out"), OpencodeUnavailable),
        (httpx.ReadTimeout("read timed out"), OpencodeUnavailable),
        (httpx.PoolTimeout("pool"), OpencodeUnavailable),
        (httpx.RemoteProtocolError("peer closed"), OpencodeUnavailable),
        (httpx.ReadError("reset"), OpencodeUnavailable),
        (httpx.DecodingError("bad gzip"), OpencodeProtocolError),
        (httpx.TooManyRedirects("loop"), OpencodeProtocolError),
    ],
)
async def test_transport_errors_are_translated(exc: Exception, expected: type[OpencodeError]) -> None:
    async with client_for(raising(exc), password=SECRET) as client:
        with pytest.raises(expected) as info:
            await client.list_sessions()
    assert "GET /session" in str(info.value)
    assert SECRET not in str(info.value)
    assert info.value.__cause__ is None  # the httpx error (and its request) is not chained
    assert info.value.retriable is (expected is OpencodeUnavailable)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (401, OpencodeAuthError),
        (403, OpencodeAuthError),
        (400, OpencodeProtocolError),
        (404, OpencodeNotFound),
        (409, OpencodeProtocolError),
        (408, OpencodeUnavailable),
        (429, OpencodeUnavailable),
        (500, OpencodeUnavailable),
        (502, OpencodeUnavailable),
        (503, OpencodeUnavailable),
        (302, OpencodeProtocolError),
    ],
)
async def test_status_codes_are_translated(status: int, expected: type[OpencodeError]) -> None:
    answer = httpx.Response(status, text=f"failure; password was {SECRET}")
    recorder = Recorder({("GET", "/session/ses_1"): answer})
    async with client_for(recorder, password=SECRET) as client:
        with pytest.raises(expected) as info:
            await client.get_session("ses_1")
    assert info.value.status_code == status
    assert SECRET not in str(info.value)
    assert "GET /session/ses_1" in str(info.value)


def _echo_headers(status: int, shape: str) -> Handler:
    """A server answering with the request's Authorization header in its body (a debug proxy,
    a misconfigured error page), as text or as JSON."""
    def answer(request: httpx.Request) -> httpx.Response:
        auth = request.headers["authorization"]
        if shape == "json":
            return httpx.Response(status, text=json.dumps({"error": "bad", "headers": {"authorization": auth}}))
        return httpx.Response(status, text=f"denied; you sent\nAuthorization: {auth}\n(password {SECRET})")
    return answer


@pytest.mark.asyncio
@pytest.mark.parametrize(("status", "shape"), [(200, "text"),  # 200: "answer is not JSON", quoting it
                                               (400, "text"), (404, "json"), (500, "text"), (503, "json")])
async def test_echoed_authorization_header_is_redacted(status: int, shape: str) -> None:
    credential = base64.b64encode(f"opencode:{SECRET}".encode()).decode()
    async with client_for(_echo_headers(status, shape), password=SECRET) as client:
        with pytest.raises(OpencodeError) as info:
            await client.list_sessions()
    text = str(info.value)
    for leak in (SECRET, credential, credential.rstrip("="), f"Basic {credential[:8]}"):
        assert leak not in text, text
    assert "Basic ***" in text, text  # the answer is still quoted, the credential in it is not


@pytest.mark.asyncio
async def test_any_basic_credential_is_redacted_but_plain_words_stay() -> None:
    other = base64.b64encode(b"someone:else-entirely").decode()
    body = f"basic usage: see docs; authorization: basic {other}"
    recorder = Recorder({("GET", "/session"): httpx.Response(400, text=body)})
    async with client_for(recorder, password=SECRET) as client:
        with pytest.raises(OpencodeProtocolError) as info:
            await client.list_sessions()
    assert other not in str(info.value)
    assert "basic usage: see docs; authorization: basic ***" in str(info.value)


@pytest.mark.asyncio
async def test_a_cut_snippet_leaves_no_prefix_of_the_password() -> None:
    # the echoed answer is cut at 300 characters; the cut must not leave the password's start
    body = "x" * 290 + SECRET
    recorder = Recorder({("GET", "/session"): httpx.Response(500, text=body)})
    async with client_for(recorder, password=SECRET) as client:
        with pytest.raises(OpencodeUnavailable) as info:
            await client.list_sessions()
    assert SECRET[:8] not in str(info.value)


@pytest.mark.asyncio
async def test_auth_error_names_user_not_password() -> None:
    recorder = Recorder({("GET", "/session"): httpx.Response(401, text="Unauthorized")})
    async with client_for(recorder, password=SECRET) as client:
        with pytest.raises(OpencodeAuthError) as info:
            await client.list_sessions()
    assert "'opencode'" in str(info.value)
    assert SECRET not in str(info.value)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("route", "call", "answer"),
    [
        (("GET", "/session"), "list_sessions", {"not": "a list"}),
        (("GET", "/session"), "list_sessions", [{"no": "id"}]),
        (("GET", "/session/status"), "session_status", []),
        (("GET", "/session/status"), "session_status", {"ses_1": "busy"}),
        (("GET", "/global/health"), "health", {"version": "1"}),
        (("GET", "/session/ses_1/message"), "messages", [{"info": {}}]),
        (("GET", "/session/ses_1/message"), "messages", [{"info": [], "parts": []}]),
    ],
)
async def test_unexpected_payloads_are_protocol_errors(route: tuple[str, str], call: str, answer: Any) -> None:
    async with client_for(Recorder({route: answer})) as client:
        method = getattr(client, call)
        with pytest.raises(OpencodeProtocolError):
            await (method("ses_1") if call == "messages" else method())


@pytest.mark.asyncio
async def test_non_json_answer_is_a_protocol_error() -> None:
    recorder = Recorder({("GET", "/session"): httpx.Response(200, text="<html>proxy</html>")})
    async with client_for(recorder) as client:
        with pytest.raises(OpencodeProtocolError, match="not JSON"):
            await client.list_sessions()


# -- requests the API methods make --------------------------------------------


def test_split_model_at_first_slash() -> None:
    assert split_model("anthropic/claude-sonnet-4") == {
        "providerID": "anthropic",
        "modelID": "claude-sonnet-4",
    }
    assert split_model("openrouter/meta-llama/llama-3") == {
        "providerID": "openrouter",
        "modelID": "meta-llama/llama-3",
    }
    for bad in ("no-slash", "/model", "provider/"):
        with pytest.raises(ValueError):
            split_model(bad)


def test_bad_default_model_fails_at_construction() -> None:
    with pytest.raises(ValueError):
        OpencodeClient(URL, model="nope")


@pytest.mark.asyncio
async def test_prompt_body_splits_model_and_sets_agent() -> None:
    recorder = Recorder({("POST", "/session/ses_1/message"): ASSISTANT})
    async with client_for(recorder) as client:
        answer = await client.prompt("ses_1", "fix it", "anthropic/claude-sonnet-4", "plan")
    assert answer == ASSISTANT
    assert recorder.body() == {
        "parts": [{"type": "text", "text": "fix it"}],
        "model": {"providerID": "anthropic", "modelID": "claude-sonnet-4"},
        "agent": "plan",
    }


@pytest.mark.asyncio
async def test_prompt_uses_constructor_defaults_and_long_read_timeout() -> None:
    recorder = Recorder({("POST", "/session/ses_1/message"): ASSISTANT})
    async with client_for(recorder, model="stub/stub-model", agent="build", turn_timeout=77) as c:
        await c.prompt("ses_1", "hello")
    body = recorder.body()
    assert body["model"] == {"providerID": "stub", "modelID": "stub-model"}
    assert body["agent"] == "build"
    assert recorder.requests[-1].extensions["timeout"]["read"] == 77


@pytest.mark.asyncio
async def test_prompt_without_model_sends_none() -> None:
    recorder = Recorder({("POST", "/session/ses_1/message"): ASSISTANT})
    async with client_for(recorder) as client:
        await client.prompt("ses_1", "hello")
    assert recorder.body() == {"parts": [{"type": "text", "text": "hello"}]}


@pytest.mark.asyncio
async def test_run_task_creates_a_session_and_returns_the_reply() -> None:
    recorder = Recorder(
        {
            ("POST", "/session"): {"id": "ses_1", "title": "t"},
            ("POST", "/session/ses_1/message"): ASSISTANT,
        }
    )
    async with client_for(recorder, agent="build") as client:
        result = await client.run_task("do the thing", title="t")
    assert result == {
        "session_id": "ses_1",
        "reply": "first line\nsecond line",
        "response": ASSISTANT,
    }
    assert recorder.body(0) == {"title": "t", "agent": "build"}
    assert recorder.body(1)["parts"][0]["text"] == "do the thing"


@pytest.mark.asyncio
async def test_continue_session_prompts_the_given_session() -> None:
    recorder = Recorder({("POST", "/session/ses_9/message"): ASSISTANT})
    async with client_for(recorder) as client:
        result = await client.continue_session("ses_9", "more")
    assert result["session_id"] == "ses_9"
    assert result["reply"] == "first line\nsecond line"


def test_reply_text_ignores_non_text_and_ignored_parts() -> None:
    message = {"parts": [{"type": "text", "text": "a"}, {"type": "text", "text": "b", "ignored": True}]}
    assert reply_text(message) == "a"
    assert reply_text({"info": {}, "parts": []}) == ""


@pytest.mark.asyncio
async def test_directory_query_on_instance_routes_only() -> None:
    recorder = Recorder(
        {
            ("GET", "/session"): [],
            ("GET", "/session/status"): {},
            ("GET", "/global/health"): {"healthy": True, "version": "x"},
        }
    )
    async with client_for(recorder, directory="/srv/project") as client:
        await client.list_sessions(limit=5)
        assert await client.session_status() == {}
        await client.health()
    listing, status, health = (r.url for r in recorder.requests)
    assert listing.params["directory"] == "/srv/project"
    assert listing.params["limit"] == "5"
    assert status.params["directory"] == "/srv/project"
    assert "directory" not in health.params


@pytest.mark.asyncio
async def test_messages_and_session_paths_are_quoted() -> None:
    recorder = Recorder({("GET", "/session/ses_1/message"): [ASSISTANT]})
    async with client_for(recorder) as client:
        assert await client.messages("ses_1", limit=2) == [ASSISTANT]
        with pytest.raises(OpencodeNotFound):
            await client.get_session("../global/health")
    assert recorder.requests[0].url.params["limit"] == "2"
    assert recorder.requests[1].url.raw_path.startswith(b"/session/..%2Fglobal%2Fhealth")


@pytest.mark.asyncio
async def test_create_session_sends_only_given_fields() -> None:
    recorder = Recorder({("POST", "/session"): {"id": "ses_new"}})
    async with client_for(recorder) as client:
        assert (await client.create_session())["id"] == "ses_new"
    assert recorder.body() == {}


# -- event streams -------------------------------------------------------------


async def chunks_of(*parts: bytes, then: Exception | None = None) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
    if then is not None:
        raise then


def sse_response(*parts: bytes, then: Exception | None = None, status: int = 200) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            status,
            headers={"content-type": "text/event-stream"},
            content=chunks_of(*parts, then=then),
        )

    return handler


async def collect(client: OpencodeClient, global_: bool = False) -> list[Any]:
    async with aclosing(client.events(global_=global_)) as stream:
        return [frame async for frame in stream]


@pytest.mark.asyncio
async def test_events_yield_json_and_malformed_frames() -> None:
    connected = b'data: {"id":"evt_1","type":"server.connected","properties":{}}\n\n'
    handler = sse_response(
        connected[:10],
        connected[10:] + b": ping\n\ndata: {not json\n\n",
        b'data: [1, 2]\n\ndata: {"type":"session.idle","prop',
        b'erties":{"sessionID":"ses_1"}}\r\n\r\n',
        b'data: {"type":"x","t":"\xff"}\n\n',
    )
    recorder = Recorder({("GET", "/event"): handler})
    async with client_for(recorder, directory="/p") as client:
        frames = await collect(client)
    assert frames[0] == {"id": "evt_1", "type": "server.connected", "properties": {}}
    assert isinstance(frames[1], MalformedFrame) and frames[1].reason == "not-json"
    assert frames[1].raw == "{not json"
    assert isinstance(frames[2], MalformedFrame) and frames[2].reason == "not-an-object"
    assert frames[3] == {"type": "session.idle", "properties": {"sessionID": "ses_1"}}
    assert isinstance(frames[4], MalformedFrame) and frames[4].reason == "invalid-utf8"
    assert frames[4].parsed == {"type": "x", "t": "\ufffd"}
    request = recorder.requests[0]
    assert request.headers["accept"] == "text/event-stream"
    assert request.url.params["directory"] == "/p"


@pytest.mark.asyncio
async def test_global_events_use_global_route_without_directory() -> None:
    frame = b'data: {"directory":"/p","payload":{"type":"session.idle"}}\n\n'
    recorder = Recorder({("GET", "/global/event"): sse_response(frame)})
    async with client_for(recorder, directory="/p", password=SECRET) as client:
        frames = await collect(client, global_=True)
    assert frames == [{"directory": "/p", "payload": {"type": "session.idle"}}]
    assert "directory" not in recorder.requests[0].url.params
    assert recorder.requests[0].headers["authorization"].startswith("Basic ")


@pytest.mark.asyncio
async def test_oversize_event_becomes_malformed_frame_and_stream_goes_on() -> None:
    big = b"data: " + b"x" * 200 + b"\n\n"
    handler = sse_response(big + b'data: {"type":"after"}\n\n')
    async with client_for(Recorder({("GET", "/event"): handler}), max_frame_bytes=64) as client:
        frames = await collect(client)
    assert isinstance(frames[0], MalformedFrame) and frames[0].reason == "oversize"
    assert frames[1] == {"type": "after"}


@pytest.mark.asyncio
async def test_connection_lost_mid_stream_is_unavailable() -> None:
    handler = sse_response(b'data: {"type":"a"}\n\n', then=httpx.ReadError("reset by peer"))
    seen: list[Any] = []
    async with client_for(Recorder({("GET", "/event"): handler})) as client:
        with pytest.raises(OpencodeUnavailable, match="GET /event"):
            async with aclosing(client.events()) as stream:
                async for frame in stream:
                    seen.append(frame)
    assert seen == [{"type": "a"}]


@pytest.mark.asyncio
async def test_event_stream_auth_failure() -> None:
    recorder = Recorder({("GET", "/event"): httpx.Response(401, text="Unauthorized")})
    async with client_for(recorder, password="wrong") as client:
        with pytest.raises(OpencodeAuthError):
            await collect(client)


@pytest.mark.asyncio
async def test_event_stream_with_wrong_content_type_is_a_protocol_error() -> None:
    recorder = Recorder({("GET", "/event"): {"type": "not a stream"}})
    async with client_for(recorder) as client:
        with pytest.raises(OpencodeProtocolError, match="text/event-stream"):
            await collect(client)


@pytest.mark.asyncio
async def test_event_stream_connect_failure_is_unavailable() -> None:
    async with client_for(raising(httpx.ConnectError("refused"))) as client:
        with pytest.raises(OpencodeUnavailable):
            await collect(client)
