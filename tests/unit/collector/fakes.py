"""What the collector's unit tests run it against: in-process fake daemons, an in-memory sink,
and virtual time.

`FakeDaemon` is an httpx transport that answers the HTTP shapes of opencode 1.18.33 that the
collector uses, so the real `OpencodeClient` (its SSE parsing, its error translation) runs
unchanged, but no socket is opened: nothing the collector waits for depends on the machine's
speed. Its heartbeats, like every wait of the collector, run on the test's `FakeClock`; real
daemons are exercised by the e2e suite.

A test moves time with `until(clock, predicate)` (step by step until something has happened)
or `clock.advance(seconds)` (then asserts that something has not).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from jsonschema import Draft202012Validator

from devkit.clock import FakeClock, settle
from pipeline.clients.opencode import OpencodeClient
from pipeline.collector.collector import Collector
from pipeline.collector.settings import CollectorSettings
from pipeline.config import HostConfig
from tests.fixtures import REPO

SCHEMAS = {name: Draft202012Validator(json.loads((REPO / "schemas" / f"{name}.json").read_text()))
           for name in ("event.v1", "dead-letter.v1")}

# The production defaults, except the poll fallback: off unless a test is about it.
TEST_SETTINGS: dict[str, Any] = dict(poll_interval_s=0)
# Longer than anything the collector waits for on its own (backoff caps at 30 s, the silence
# limit is 30 s, settling gives up after 10 s): after this much virtual time, what has not
# happened will not.
QUIET_S = 120.0

CLOSE = object()
_ids = itertools.count(1)
_ports = itertools.count(41000)


def assert_valid(schema: str, record: dict[str, Any]) -> None:
    errors = list(SCHEMAS[schema].iter_errors(record))
    assert not errors, errors[0].message


# ---------------------------------------------------------------- what daemons say


def sse(item: Any) -> bytes:
    return item if isinstance(item, bytes) else f"data: {json.dumps(item)}\n\n".encode()


def frame(event_type: str, properties: dict[str, Any], directory: str = "/w") -> dict[str, Any]:
    return {"directory": directory, "project": "global",
            "payload": {"id": f"evt_t{next(_ids):06d}", "type": event_type,
                        "properties": properties}}


def idle_frames(session_id: str) -> list[dict[str, Any]]:
    """The two frames opencode sends when a turn ends: status idle, then session.idle."""
    return [frame("session.status", {"sessionID": session_id, "status": {"type": "idle"}}),
            frame("session.idle", {"sessionID": session_id})]


def session_info(session_id: str, updated: int, directory: str = "/w") -> dict[str, Any]:
    return {"id": session_id, "slug": "s", "projectID": "global", "directory": directory,
            "title": f"title of {session_id}", "version": "1.18.33",
            "time": {"created": updated - 1000, "updated": updated}}


def turn(session_id: str, n: int, *, completed: bool = True) -> list[dict[str, Any]]:
    """The `n`th turn of a session: a user message and the assistant's answer."""
    t = 1_795_000_000_000 + n * 1000
    assistant: dict[str, Any] = {"id": f"msg_{n:04d}b", "sessionID": session_id,
                                 "role": "assistant", "time": {"created": t + 1}}
    if completed:
        assistant["time"]["completed"] = t + 500
    return [
        {"info": {"id": f"msg_{n:04d}a", "sessionID": session_id, "role": "user",
                  "time": {"created": t}},
         "parts": [{"id": f"prt_{n:04d}a", "type": "text", "text": f"prompt {n}"}]},
        {"info": assistant,
         "parts": [{"id": f"prt_{n:04d}b", "type": "text", "text": f"answer {n}"}]},
    ]


def turns_of(session_id: str, count: int) -> list[dict[str, Any]]:
    """The listing of a session that has had `count` completed turns, oldest first."""
    return [message for n in range(1, count + 1) for message in turn(session_id, n)]


def last_message_ids(turns: list[dict[str, Any]]) -> list[str]:
    """The id of each turn_ended record's last message."""
    return [t["properties"]["messages"][-1]["info"]["id"] for t in turns]


# ---------------------------------------------------------------- the fakes


class FakeDaemon(httpx.AsyncBaseTransport):
    """Just enough of `opencode serve` for the collector: /global/event and the session reads.

    `heartbeat_s=None` makes a stream that never sends anything after its first frame.
    """

    def __init__(self, clock: FakeClock, *, heartbeat_s: float | None = 10.0) -> None:
        self.clock = clock
        self.heartbeat_s = heartbeat_s
        self.url = f"http://127.0.0.1:{next(_ports)}"  # only a name: no socket is opened
        self.sessions: dict[str, dict[str, Any]] = {}
        self.listings: dict[str, list[dict[str, Any]]] = {}
        self.status: dict[str, dict[str, Any]] = {}
        self.accepting = True
        self.connections = 0
        self.message_requests = 0
        self.streams: list[asyncio.Queue[Any]] = []

    def put_session(self, session_id: str, listing: list[dict[str, Any]],
                    updated: int | None = None) -> None:
        self.sessions[session_id] = session_info(session_id, updated or self.clock.now_ms())
        self.listings[session_id] = listing

    def push(self, *items: Any) -> None:
        """Send frames (dicts, or raw bytes as they are) on every open event stream."""
        for queue in self.streams:
            for item in items:
                queue.put_nowait(item)

    def drop(self) -> None:
        """Close every open event stream from the daemon's side."""
        for queue in self.streams:
            queue.put_nowait(CLOSE)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path, query = request.url.path, request.url.params
        limit = int(query.get("limit", "1000"))
        if path == "/global/event":
            if not self.accepting:
                return httpx.Response(503, json={"error": "starting"})
            self.connections += 1
            return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                                  stream=_EventStream(self))
        if path == "/session":
            ordered = sorted(self.sessions.values(), key=lambda s: -s["time"]["updated"])
            return httpx.Response(200, json=ordered[:limit])
        if path == "/session/status":
            return httpx.Response(200, json=self.status)
        match = re.fullmatch(r"/session/([^/]+)(/message)?", path)
        if match is None:
            return httpx.Response(404, json={"name": "NotFound"})
        session_id, messages = match.group(1), match.group(2)
        if messages:
            self.message_requests += 1
            listing = self.listings.get(session_id)
            if listing is None:
                return httpx.Response(404, json={"name": "NotFound"})
            return httpx.Response(200, json=listing[-limit:])
        info = self.sessions.get(session_id)
        return httpx.Response(200, json=info) if info else httpx.Response(404, json={"name": "NotFound"})


class _EventStream(httpx.AsyncByteStream):
    """One `/global/event` response: server.connected, then pushed frames and heartbeats."""

    def __init__(self, daemon: FakeDaemon) -> None:
        self._daemon = daemon
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        daemon.streams.append(self._queue)
        self._heartbeat: asyncio.Task[None] | None = None
        if daemon.heartbeat_s is not None:
            self._heartbeat = asyncio.create_task(self._beat(daemon.heartbeat_s))

    async def _beat(self, period_s: float) -> None:
        while True:
            await self._daemon.clock.sleep(period_s)
            self._queue.put_nowait({"payload": {"id": f"evt_h{next(_ids)}", "type": "server.heartbeat",
                                                "properties": {}}})

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield sse({"payload": {"id": f"evt_c{next(_ids)}", "type": "server.connected", "properties": {}}})
        while True:
            item = await self._queue.get()
            if item is CLOSE:
                return
            yield sse(item)

    async def aclose(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        with contextlib.suppress(ValueError):
            self._daemon.streams.remove(self._queue)


class RefusingTransport(httpx.AsyncBaseTransport):
    """A host where nothing listens: every request fails to connect."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)


class MemorySink:
    """An EventSink that keeps records; `gate` cleared makes every send wait."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes, dict[str, Any]]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = 0
        self.flushes = 0

    async def send(self, topic: str, key: bytes, value: bytes) -> None:
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        self.records.append((topic, key, json.loads(value)))

    async def flush(self) -> None:
        self.flushes += 1

    def events(self, event_type: str | None = None,
               host: str | None = None) -> list[dict[str, Any]]:
        return [r for t, _, r in self.records if t == "opencode.events"
                and (event_type is None or r["type"] == event_type)
                and (host is None or r["host"] == host)]

    def turns(self, host: str | None = None) -> list[dict[str, Any]]:
        return self.events("pipeline.turn_ended", host)

    def dead(self) -> list[dict[str, Any]]:
        return [r for t, _, r in self.records if t == "collector.dead"]


# ---------------------------------------------------------------- running the collector


def host(name: str, url: str) -> HostConfig:
    return HostConfig(name=name, base_url=url, password=None, site_key="pk_test_thirdparty",
                      model=None, agent=None, allow_insecure_http=False)


def collector(clock: FakeClock, daemons: dict[str, FakeDaemon | None], sink: MemorySink,
              **overrides: Any) -> Collector:
    """A collector on `clock` with one host per entry of `daemons` (None: a host that refuses
    connections), its clients talking to the fakes in-process. `store=` a StateStore."""
    transports: dict[str, httpx.AsyncBaseTransport] = {}
    hosts = []
    for name, fake in daemons.items():
        url = fake.url if fake is not None else f"http://127.0.0.1:{next(_ports)}"
        transports[url] = fake if fake is not None else RefusingTransport()
        hosts.append(host(name, url))

    def client_factory(config: HostConfig, directory: str | None) -> OpencodeClient:
        return OpencodeClient(config.base_url, directory=directory, transport=transports[config.base_url])

    # a StateStore of the test's own instead of the state files `state_dir` implies
    extra = {"store": overrides.pop("store")} if "store" in overrides else {}
    return Collector(hosts, sink, settings=CollectorSettings(**{**TEST_SETTINGS, **overrides}),
                     clock=clock, rng=random.Random(0), client_factory=client_factory, **extra)


@contextlib.asynccontextmanager
async def running(collector: Collector) -> AsyncIterator[Collector]:
    task = asyncio.create_task(collector.run())
    await settle()
    try:
        yield collector
    finally:
        collector.stop()
        await asyncio.wait_for(task, 5)  # a real bound: stopping waits for no clock


@contextlib.asynccontextmanager
async def one_host(clock: FakeClock, sink: MemorySink,
                   **overrides: Any) -> AsyncIterator[tuple[FakeDaemon, Collector]]:
    """A fake daemon as host "h" and a collector running on it, writing to `sink`."""
    fake = FakeDaemon(clock)
    async with running(collector(clock, {"h": fake}, sink, **overrides)) as c:
        yield fake, c


async def until(clock: FakeClock, predicate: Callable[[], bool], *, step_s: float = 0.25,
                limit_s: float = 600.0) -> None:
    """Move virtual time forward in `step_s` steps until `predicate()` holds."""
    await settle()
    waited = 0.0
    while not predicate():
        if waited >= limit_s:
            raise AssertionError(f"still false after {limit_s:.0f}s of virtual time")
        await clock.advance(step_s)
        waited += step_s
