"""pipeline/clients/panel.py: a request whose connection the server dropped before answering is
sent once more at once, on a new connection, and only then counts as no answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio

from devkit.stubs.panel import PanelStubConfig, StubPanel
from pipeline.clients.panel import PanelClient, PanelUnavailable

TIMEOUT = httpx.Timeout(5.0)
BODY = b'{"trace_id": "tr_1"}'


async def read_request(reader: asyncio.StreamReader) -> bool:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    await reader.readexactly(length)
    return True


class KeepAliveDropper:
    """Answers every request 200, except the second request on the first connection: that
    connection it closes without an answer, as a server that timed an idle connection out."""

    def __init__(self) -> None:
        self.connections = 0
        self.answered = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        first_connection = self.connections == 1
        served = 0
        try:
            while await read_request(reader):
                served += 1
                if first_connection and served == 2:
                    writer.close()
                    return
                self.answered += 1
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
                             b"connection: keep-alive\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


@pytest_asyncio.fixture
async def dropper() -> AsyncIterator[tuple[KeepAliveDropper, str]]:
    server_state = KeepAliveDropper()
    server = await asyncio.start_server(server_state.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield server_state, f"http://127.0.0.1:{port}"


@pytest.mark.asyncio
async def test_a_dropped_keep_alive_connection_is_retried_once_on_a_new_one(
        dropper: tuple[KeepAliveDropper, str]) -> None:
    state, url = dropper
    async with PanelClient(url, TIMEOUT) as client:
        assert (await client.post_trace(BODY, "pk", "sig", None)).status == 200
        assert (await client.post_trace(BODY, "pk", "sig", None)).status == 200  # not PanelUnavailable
    assert state.connections == 2 and state.answered == 2


@pytest.mark.asyncio
async def test_a_server_that_drops_every_connection_is_unavailable_after_one_retry() -> None:
    async with StubPanel(PanelStubConfig()) as panel:
        panel.set_faults(drop_rate=1.0)
        async with PanelClient(panel.url, TIMEOUT) as client:
            with pytest.raises(PanelUnavailable) as caught:
                await client.post_trace(BODY, "pk", "sig", None)
        assert caught.value.reason == "transport"
        assert panel.stats()["dropped"] == 2  # the request and its one retry, no more


@pytest.mark.asyncio
async def test_a_timeout_is_not_retried_at_once() -> None:
    async with StubPanel(PanelStubConfig()) as panel:
        panel.set_faults(latency_ms=2000)
        async with PanelClient(panel.url, httpx.Timeout(5.0, read=0.3)) as client:
            with pytest.raises(PanelUnavailable) as caught:
                await client.post_trace(BODY, "pk", "sig", None)
        assert caught.value.reason == "timeout"
        assert panel.in_progress == 1  # the one request, still waiting out its latency: no second one
