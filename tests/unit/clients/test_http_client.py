"""pipeline/clients/http.py `pooled_client` over loopback sockets: what every stage client relies
on (no redirect followed, no proxy from the environment, connections kept or not, each phase
bounded) and how a missing answer is told apart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio

from pipeline.clients.http import (
    FRESH_CONNECTION_LIMITS,
    TransportError,
    client_timeout,
    dropped_before_answer,
    no_answer_reason,
    pooled_client,
)

TIMEOUT = httpx.Timeout(connect=2.0, read=5.0, write=5.0, pool=2.0)


class Server:
    """Reads each request whole; answers with `answer` (raw HTTP), keeping the connection."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.connections = 0
        self.paths: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.paths.append(head.split(b" ", 2)[1])
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                writer.write(self.answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def serving(answer: bytes) -> AsyncIterator[tuple[Server, str]]:
    state = Server(answer)
    server = await asyncio.start_server(state.serve, "127.0.0.1", 0)
    async with server:
        yield state, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


@pytest_asyncio.fixture
async def ok() -> AsyncIterator[tuple[Server, str]]:
    async for pair in serving(OK):
        yield pair


@pytest.mark.asyncio
async def test_a_redirect_is_an_answer_not_followed() -> None:
    moved = b"HTTP/1.1 302 Found\r\nlocation: /elsewhere\r\ncontent-length: 0\r\n\r\n"
    async for state, url in serving(moved):
        client = pooled_client(TIMEOUT)
        try:
            answer = await client.post(url + "/v1/scrub", content=b"{}", headers={})
        finally:
            await client.aclose()
        assert answer.status_code == 302 and answer.headers["Location"] == "/elsewhere"
        assert state.paths == [b"/v1/scrub"]


@pytest.mark.asyncio
async def test_no_proxy_is_taken_from_the_environment(ok: tuple[Server, str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    state, url = ok
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = pooled_client(TIMEOUT)
    try:
        answer = await client.post(url + "/x", content=b"{}", headers={"content-type": "application/json"})
    finally:
        await client.aclose()
    assert answer.status_code == 200 and answer.content == b"{}" and state.paths == [b"/x"]


@pytest.mark.asyncio
async def test_the_pool_keeps_its_connection_and_the_fresh_one_does_not(ok: tuple[Server, str]) -> None:
    state, url = ok
    pooled, fresh = pooled_client(TIMEOUT), pooled_client(TIMEOUT, limits=FRESH_CONNECTION_LIMITS)
    try:
        for _ in range(3):
            assert (await pooled.post(url, content=b"{}", headers={})).status_code == 200
        assert state.connections == 1
        for _ in range(3):
            assert (await fresh.post(url, content=b"{}", headers={})).status_code == 200
        assert state.connections == 4
    finally:
        await pooled.aclose()
        await fresh.aclose()


@pytest.mark.asyncio
async def test_a_refused_connection_is_no_dropped_answer() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    client = pooled_client(TIMEOUT)
    try:
        with pytest.raises(TransportError) as caught:
            await client.post(f"http://127.0.0.1:{port}/", content=b"{}", headers={})
    finally:
        await client.aclose()
    assert not dropped_before_answer(caught.value) and no_answer_reason(caught.value) == "transport"


@pytest.mark.asyncio
async def test_a_silent_server_is_a_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        client = pooled_client(httpx.Timeout(connect=1.0, read=0.2, write=1.0, pool=1.0))
        try:
            with pytest.raises(TransportError) as caught:
                await client.post(f"http://127.0.0.1:{port}/", content=b"{}", headers={})
        finally:
            await client.aclose()
    assert not dropped_before_answer(caught.value) and no_answer_reason(caught.value) == "timeout"


def test_every_phase_is_bounded() -> None:
    bounds = client_timeout(httpx.Timeout(connect=1.0, read=2.0, write=3.0, pool=4.0))
    assert (bounds.connect, bounds.sock_connect, bounds.sock_read, bounds.total) == (5.0, 1.0, 2.0, 10.0)
    for missing in ({"read": None}, {"write": None}, {"pool": None}, {"connect": None}):
        with pytest.raises(ValueError, match="must set connect, read, write and pool"):
            pooled_client(httpx.Timeout(**{"connect": 1.0, "read": 1.0, "write": 1.0, "pool": 1.0, **missing}))


def test_a_client_is_made_outside_the_event_loop() -> None:
    # the stages build their clients before the worker's loop runs; the pool opens on first use
    client = pooled_client(TIMEOUT)
    assert client._session is None
