"""Real ``opencode serve`` daemons driven by the scripted model stub.

Session-scoped: one model stub, one open daemon and one password-protected
daemon for the whole run (each start costs seconds). ``OPENCODE_BIN``
overrides where the binary is looked for; by default it is the npm-pinned one
under node/ (``cd node && npm ci``).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from devkit.model_stub import ModelStub
from devkit.opencode_daemon import DEFAULT_BINARY, OpencodeDaemon
from pipeline.clients.opencode import MalformedFrame, OpencodeClient, unwrap_event


@pytest.fixture(scope="session")
def opencode_binary() -> Path:
    return Path(os.environ.get("OPENCODE_BIN") or DEFAULT_BINARY)


@pytest.fixture(scope="session")
def model_stub() -> Iterator[ModelStub]:
    with ModelStub() as stub:
        yield stub


@pytest.fixture(scope="session")
def opencode_daemon(
    tmp_path_factory: pytest.TempPathFactory, model_stub: ModelStub, opencode_binary: Path
) -> Iterator[OpencodeDaemon]:
    workdir = tmp_path_factory.mktemp("opencode-open")
    with OpencodeDaemon(workdir, model_stub.base_url, binary=opencode_binary) as daemon:
        yield daemon


@pytest.fixture(scope="session")
def daemon_password() -> str:
    return secrets.token_urlsafe(18)


@pytest.fixture(scope="session")
def secured_daemon(
    tmp_path_factory: pytest.TempPathFactory,
    model_stub: ModelStub,
    opencode_binary: Path,
    daemon_password: str,
) -> Iterator[OpencodeDaemon]:
    workdir = tmp_path_factory.mktemp("opencode-secured")
    with OpencodeDaemon(workdir, model_stub.base_url, password=daemon_password, binary=opencode_binary) as daemon:
        yield daemon


class EventRecorder:
    """Reads a daemon's event stream in the background; tests wait on conditions.

    Entering returns once the subscription is provably live (an event it
    caused came through), so nothing the test triggers afterwards is missed.
    """

    def __init__(self, client: OpencodeClient, *, global_: bool) -> None:
        self._client = client
        self._global = global_
        self.frames: list[dict[str, Any]] = []
        self.malformed: list[MalformedFrame] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._ended = False
        self._error: Exception | None = None

    async def _run(self) -> None:
        try:
            async with aclosing(self._client.events(global_=self._global)) as stream:
                async for frame in stream:
                    async with self._changed:
                        if isinstance(frame, MalformedFrame):
                            self.malformed.append(frame)
                        else:
                            self.frames.append(frame)
                        self._changed.notify_all()
        except Exception as exc:
            self._error = exc
        finally:
            # Wake waiters so a dead stream fails the test instead of hanging it.
            self._ended = True
            async with self._changed:
                self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 60.0) -> None:
        async def satisfied() -> None:
            async with self._changed:
                while not predicate(self.frames):
                    if self._error is not None:
                        raise self._error
                    if self._ended:
                        raise AssertionError("event stream ended before the condition held")
                    await self._changed.wait()

        await asyncio.wait_for(satisfied(), timeout)

    async def __aenter__(self) -> EventRecorder:
        self._task = asyncio.create_task(self._run())
        await self.wait_for(lambda frames: any(unwrap_event(f).get("type") == "server.connected" for f in frames))
        # opencode 1.18.33 sends server.connected on /global/event before its bus
        # subscription is live: an event published in the next few ms is lost
        # (6 of 15 tries). Only an event we caused and saw proves the stream
        # live, and a new session emits just one, so probe until one arrives.
        for _ in range(20):
            probe = await self._client.create_session(title=f"event-probe-{uuid.uuid4().hex[:8]}")
            try:
                await self.wait_for(_mentions(probe["id"]), timeout=1.0)
            except TimeoutError:
                continue
            return self
        raise AssertionError("the event stream delivered none of 20 probe sessions")

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def _mentions(session_id: str) -> Callable[[list[dict[str, Any]]], bool]:
    def check(frames: list[dict[str, Any]]) -> bool:
        return any(unwrap_event(f).get("properties", {}).get("sessionID") == session_id for f in frames)

    return check


@pytest.fixture
def record_events() -> Callable[..., EventRecorder]:
    def make(client: OpencodeClient, *, global_: bool = False) -> EventRecorder:
        return EventRecorder(client, global_=global_)

    return make


@pytest_asyncio.fixture
async def open_client(opencode_daemon: OpencodeDaemon) -> AsyncIterator[OpencodeClient]:
    async with opencode_daemon.client() as client:
        yield client
