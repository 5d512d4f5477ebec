"""The collector against small in-process fake daemons (aiohttp) and an in-memory sink.

The fakes speak the HTTP shapes of opencode 1.18.33 that the collector uses; real daemons are
exercised by the e2e suite. Timings are shrunk (10 ms backoffs, 0.2 s silence) so the whole
file runs in a few seconds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import itertools
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from jsonschema import Draft202012Validator

from pipeline.clock import SystemClock
from pipeline.collector.collector import Collector
from pipeline.collector.settings import CollectorSettings
from pipeline.collector.sink import KafkaEventSink, SinkClosed
from pipeline.collector.state import state_file
from pipeline.config import HostConfig
from pipeline.model.envelope import EventFilter, normalise
from pipeline.model.snapshot import snapshot_id
from tests.fixtures import OPENCODE, REPO

REFERENCE = OPENCODE
SCHEMAS = {name: Draft202012Validator(json.loads((REPO / "schemas" / f"{name}.json").read_text()))
           for name in ("event.v1", "dead-letter.v1")}
GLOBAL_SESSION = "ses_e037aa82effej6NcN63unzTIAN"

FAST = dict(heartbeat_period_s=0.1, dead_after_heartbeats=2, reconnect_min_s=0.01,
            reconnect_max_s=0.05, poll_interval_s=0, settle_initial_s=0.02,
            settle_max_delay_s=0.05, settle_timeout_s=1.0, checkpoint_interval_s=0.05,
            shutdown_flush_timeout_s=1.0)
CLOSE = object()
_ids = itertools.count(1)


def now_ms() -> int:
    return SystemClock().now_ms()


def sse(item: Any) -> bytes:
    return item if isinstance(item, bytes) else f"data: {json.dumps(item)}\n\n".encode()


def frame(event_type: str, properties: dict[str, Any], directory: str = "/w") -> dict[str, Any]:
    return {"directory": directory, "project": "global",
            "payload": {"id": f"evt_t{next(_ids):06d}", "type": event_type,
                        "properties": properties}}


def idle_frames(session_id: str) -> list[dict[str, Any]]:
    return [frame("session.status", {"sessionID": session_id, "status": {"type": "idle"}}),
            frame("session.idle", {"sessionID": session_id})]


def session_info(session_id: str, updated: int, directory: str = "/w") -> dict[str, Any]:
    return {"id": session_id, "slug": "s", "projectID": "global", "directory": directory,
            "title": f"title of {session_id}", "version": "1.18.33",
            "time": {"created": updated - 1000, "updated": updated}}


def turn(session_id: str, n: int, *, completed: bool = True) -> list[dict[str, Any]]:
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


class FakeDaemon:
    """Just enough of `opencode serve` for the collector: /global/event and the session reads."""

    def __init__(self, *, heartbeat_s: float | None = 0.05) -> None:
        self.heartbeat_s = heartbeat_s
        self.sessions: dict[str, dict[str, Any]] = {}
        self.listings: dict[str, list[dict[str, Any]]] = {}
        self.status: dict[str, dict[str, Any]] = {}
        self.accepting = True
        self.connections = 0
        self.message_requests = 0
        self.streams: list[asyncio.Queue[Any]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> FakeDaemon:
        app = web.Application()
        app.router.add_get("/global/event", self._events)
        app.router.add_get("/session", self._list)
        app.router.add_get("/session/status", self._status)
        app.router.add_get("/session/{id}", self._session)
        app.router.add_get("/session/{id}/message", self._messages)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        self.drop()
        if self._runner is not None:
            await self._runner.cleanup()

    def put_session(self, session_id: str, listing: list[dict[str, Any]],
                    updated: int | None = None) -> None:
        self.sessions[session_id] = session_info(session_id, updated or now_ms())
        self.listings[session_id] = listing

    def push(self, *items: Any) -> None:
        for queue in self.streams:
            for item in items:
                queue.put_nowait(item)

    def drop(self) -> None:
        for queue in self.streams:
            queue.put_nowait(CLOSE)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if not self.accepting:
            return web.json_response({"error": "starting"}, status=503)
        self.connections += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self.streams.append(queue)
        try:
            await response.write(sse({"payload": {"id": f"evt_c{next(_ids)}",
                                                  "type": "server.connected", "properties": {}}}))
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), self.heartbeat_s)
                except TimeoutError:
                    item = {"payload": {"id": f"evt_h{next(_ids)}", "type": "server.heartbeat",
                                        "properties": {}}}
                if item is CLOSE:
                    break
                await response.write(sse(item))
        except (ConnectionResetError, RuntimeError):
            pass
        finally:
            self.streams.remove(queue)
        return response

    async def _list(self, request: web.Request) -> web.Response:
        limit = int(request.query.get("limit", "1000"))
        ordered = sorted(self.sessions.values(), key=lambda s: -s["time"]["updated"])
        return web.json_response(ordered[:limit])

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status)

    async def _session(self, request: web.Request) -> web.Response:
        info = self.sessions.get(request.match_info["id"])
        return web.json_response(info) if info else web.json_response({"name": "NotFound"},
                                                                       status=404)

    async def _messages(self, request: web.Request) -> web.Response:
        self.message_requests += 1
        listing = self.listings.get(request.match_info["id"])
        if listing is None:
            return web.json_response({"name": "NotFound"}, status=404)
        limit = int(request.query.get("limit", "1000"))
        return web.json_response(listing[-limit:])


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


def host(name: str, url: str) -> HostConfig:
    return HostConfig(name=name, base_url=url, password=None, site_key="pk_test_thirdparty",
                      model=None, agent=None, allow_insecure_http=False)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def daemon(**kwargs: Any) -> AsyncIterator[FakeDaemon]:
    fake = await FakeDaemon(**kwargs).start()
    try:
        yield fake
    finally:
        await fake.stop()


@contextlib.asynccontextmanager
async def running(collector: Collector) -> AsyncIterator[Collector]:
    task = asyncio.create_task(collector.run())
    try:
        yield collector
    finally:
        collector.stop()
        await asyncio.wait_for(task, 5)


def collector(hosts: list[HostConfig], sink: MemorySink, **overrides: Any) -> Collector:
    return Collector(hosts, sink, settings=CollectorSettings(**{**FAST, **overrides}))


@contextlib.asynccontextmanager
async def one_host(sink: MemorySink) -> AsyncIterator[tuple[FakeDaemon, Collector]]:
    """A fake daemon as host "h" and a collector running on it, writing to `sink`."""
    async with daemon() as fake:
        c = collector([host("h", fake.url)], sink)
        async with running(c):
            yield fake, c


def assert_valid(schema: str, record: dict[str, Any]) -> None:
    errors = list(SCHEMAS[schema].iter_errors(record))
    assert not errors, errors[0].message


# ---------------------------------------------------------------- streaming, independence


@pytest.mark.asyncio
async def test_streams_capture_while_another_host_refuses_connections() -> None:
    capture = [json.loads(line) for line in
               (REFERENCE / "opencode-1.18.33-global-events.ndjson").read_text().splitlines()]
    listing = json.loads((REFERENCE / "opencode-1.18.33-messages-tool-session.json").read_text())
    sink = MemorySink()
    async with daemon() as up:
        c = collector([host("down", f"http://127.0.0.1:{closed_port()}"), host("up", up.url)], sink)
        async with running(c):
            await until(lambda: c.stats["up"].reconciles == 1)
            up.put_session(GLOBAL_SESSION, listing)
            up.push(*capture)
            await until(lambda: c.stats["up"].turns_unchanged == 1)  # the second idle
            await until(lambda: c.stats["down"].reconnects >= 3)

    expected = [e for e in (normalise(f, host="up", site_key="k", received_at_ms=0)
                            for f in capture) if e and EventFilter().keeps(e["type"])]
    produced = sink.events(host="up")
    assert [e["event_id"] for e in produced if e["type"] != "pipeline.turn_ended"] == [
        e["event_id"] for e in expected]
    for record in produced:
        assert_valid("event.v1", record)
    assert {k for _, k, _ in sink.records} == {f"up:{GLOBAL_SESSION}".encode()}
    [ended] = sink.turns()
    assert ended["properties"]["trigger"] == "session.status"  # status idle comes first
    assert ended["properties"]["messages"] == listing
    assert ended["properties"]["session"]["id"] == GLOBAL_SESSION
    assert (ended["backfill"], ended["source"]) == (False, "sse")
    # the turn_ended comes after the idle that caused it
    assert produced.index(ended) > [e["type"] for e in produced].index("session.status")

    down, up_stats = c.stats["down"], c.stats["up"]
    assert not down.connected and down.connections == 0 and down.last_error
    # in: the capture, the fake's own server.connected, and however many heartbeats it sent
    assert up_stats.events_in >= len(capture) + 1
    assert up_stats.events_out == len(expected)
    assert up_stats.events_filtered == up_stats.events_in - len(expected)
    assert up_stats.events_malformed == 0 and up_stats.turns_emitted == 1
    assert c.totals()["events_out"] == len(expected)


@pytest.mark.asyncio
async def test_silent_stream_is_reconnected_and_a_heartbeating_one_is_not() -> None:
    sink = MemorySink()
    async with daemon(heartbeat_s=None) as silent, daemon(heartbeat_s=0.03) as alive:
        c = collector([host("silent", silent.url), host("alive", alive.url)], sink)
        async with running(c):
            await until(lambda: silent.connections >= 3)
            assert alive.connections == 1
            assert c.stats["alive"].connected and c.stats["alive"].reconnects == 0
        assert c.stats["silent"].reconnects >= 2
        assert "no frame" in (c.stats["silent"].last_error or "")


# ---------------------------------------------------------------- turn ends


@pytest.mark.asyncio
async def test_turn_ended_waits_for_the_last_message_to_settle() -> None:
    sink = MemorySink()
    async with one_host(sink) as (fake, c):
        await until(lambda: c.stats["h"].reconciles == 1)
        fake.put_session("ses_a", turn("ses_a", 1, completed=False))
        fake.push(*idle_frames("ses_a"))
        await until(lambda: fake.message_requests >= 3)
        assert sink.turns() == []
        fake.listings["ses_a"] = turn("ses_a", 1)
        await until(lambda: c.stats["h"].turns_unchanged == 1)
    [ended] = sink.turns()
    assert ended["properties"]["messages"][-1]["info"]["time"]["completed"]
    assert c.stats["h"].unsettled_turns == 0


@pytest.mark.asyncio
async def test_backfill_after_a_turn_that_ended_while_disconnected() -> None:
    sink = MemorySink()
    async with one_host(sink) as (fake, c):
        await until(lambda: c.stats["h"].reconciles == 1)
        fake.put_session("ses_b", turn("ses_b", 1))
        fake.push(*idle_frames("ses_b"))
        await until(lambda: len(sink.turns()) == 1 and c.stats["h"].turns_unchanged == 1)

        fake.accepting = False
        fake.drop()
        await until(lambda: not c.stats["h"].connected)
        fake.put_session("ses_b", turn("ses_b", 1) + turn("ses_b", 2), updated=now_ms() + 5)
        fake.accepting = True
        await until(lambda: len(sink.turns()) == 2)
        await until(lambda: c.stats["h"].reconciles >= 2)
    live, backfilled = sink.turns()
    assert (live["backfill"], live["source"]) == (False, "sse")
    assert (backfilled["backfill"], backfilled["source"]) == (True, "reconcile")
    assert backfilled["properties"]["trigger"] == "reconcile"
    assert [m["info"]["id"] for m in backfilled["properties"]["messages"]][-1] == "msg_0002b"
    assert c.stats["h"].backfills == 1 and c.stats["h"].connections >= 2


@pytest.mark.asyncio
async def test_restart_with_state_dir_neither_doubles_nor_loses(tmp_path: Path) -> None:
    async with daemon() as fake:
        fake.put_session("ses_c", turn("ses_c", 1))
        fake.put_session("ses_d", turn("ses_d", 1))

        first_sink = MemorySink()
        first = collector([host("h", fake.url)], first_sink, state_dir=tmp_path)
        async with running(first):
            await until(lambda: len(first_sink.turns()) == 2)
        assert {t["session_id"] for t in first_sink.turns()} == {"ses_c", "ses_d"}
        assert all(t["backfill"] for t in first_sink.turns())
        saved = json.loads(state_file(tmp_path, "h").read_text())
        assert set(saved["sessions"]) == {"ses_c", "ses_d"}

        # Restarted: nothing new to report, so not even a message fetch.
        fetched = fake.message_requests
        second_sink = MemorySink()
        # A lenient silence limit: a reconnect on a loaded machine would reconcile again and
        # blur what this case counts.
        second = collector([host("h", fake.url)], second_sink, state_dir=tmp_path,
                           heartbeat_period_s=1.0)
        async with running(second):
            await until(lambda: second.stats["h"].reconciles >= 1 and bool(fake.streams))
            await asyncio.sleep(0.1)
            assert second_sink.turns() == [] and fake.message_requests == fetched
            # ...and what ended next is reported once, though both idle frames ask for it.
            fake.put_session("ses_c", turn("ses_c", 1) + turn("ses_c", 2), updated=now_ms() + 5)
            fake.push(*idle_frames("ses_c"))
            await until(lambda: len(second_sink.turns()) >= 1)
            await asyncio.sleep(0.3)
        assert [t["session_id"] for t in second_sink.turns()] == ["ses_c"]

        # A fresh state dir has no memory: the control case, it re-emits every completed turn
        # in the listings (ses_c's two and ses_d's one); ingest dedupes them by snapshot id.
        third_sink = MemorySink()
        third = collector([host("h", fake.url)], third_sink, state_dir=tmp_path / "fresh")
        async with running(third):
            await until(lambda: len(third_sink.turns()) >= 3)
        assert sorted(t["session_id"] for t in third_sink.turns()) == ["ses_c", "ses_c", "ses_d"]


def turns_of(session_id: str, count: int) -> list[dict[str, Any]]:
    """The listing of a session that has had `count` completed turns, oldest first."""
    return [message for n in range(1, count + 1) for message in turn(session_id, n)]


def last_message_ids(turns: list[dict[str, Any]]) -> list[str]:
    return [t["properties"]["messages"][-1]["info"]["id"] for t in turns]


async def end_turn(fake: FakeDaemon, sink: MemorySink, session_id: str, count: int) -> None:
    """The session's `count`th turn ends: its listing grows and one idle frame says so."""
    reported = len(sink.turns())
    fake.put_session(session_id, turns_of(session_id, count))
    fake.push(frame("session.idle", {"sessionID": session_id}))
    await until(lambda: len(sink.turns()) > reported)


@pytest.mark.asyncio
async def test_turns_beyond_max_messages_are_each_reported_once_across_restarts(
        tmp_path: Path) -> None:
    # Two turns fill max_messages=4: from the third on, the listing (fetched with that limit)
    # starts after the first message, so every earlier turn's window is cut shorter than it
    # was when that turn was reported, and its windowed snapshot id is not the reported one.
    settings: dict[str, Any] = dict(max_messages=4, state_dir=tmp_path, heartbeat_period_s=1.0)
    async with daemon() as fake:
        sink = MemorySink()
        first = collector([host("h", fake.url)], sink, **settings)
        async with running(first):
            await until(lambda: first.stats["h"].reconciles >= 1 and bool(fake.streams))
            for count in (1, 2, 3):
                await end_turn(fake, sink, "ses_w", count)
            await asyncio.sleep(0.3)  # room for a duplicate to show up
        assert last_message_ids(sink.turns()) == ["msg_0001b", "msg_0002b", "msg_0003b"]
        assert [len(t["properties"]["messages"]) for t in sink.turns()] == [2, 4, 4]

        second_sink = MemorySink()
        second = collector([host("h", fake.url)], second_sink, **settings)
        async with running(second):
            await until(lambda: second.stats["h"].reconciles >= 1 and bool(fake.streams))
            # an idle with nothing new after the restart: the reported turn is recognised
            fake.push(frame("session.idle", {"sessionID": "ses_w"}))
            await until(lambda: second.stats["h"].turns_unchanged >= 1)
            await end_turn(fake, second_sink, "ses_w", 4)
            await asyncio.sleep(0.3)
        assert last_message_ids(second_sink.turns()) == ["msg_0004b"]
        [fourth] = second_sink.turns()
        assert [m["info"]["id"] for m in fourth["properties"]["messages"]] == [
            "msg_0003a", "msg_0003b", "msg_0004a", "msg_0004b"]


@pytest.mark.asyncio
async def test_a_state_file_from_before_turn_digests_does_not_resend_the_reported_turn(
        tmp_path: Path) -> None:
    # What an older collector saved after reporting turn 2 of a session: a snapshot id of the
    # window it sent and the last message id, no digest of that message.
    reported_window = turns_of("ses_v", 2)
    legacy = {"version": 1, "host": "h", "watermark_ms": None, "sessions": {"ses_v": {
        "snapshot_id": snapshot_id("h", "ses_v", reported_window), "last_message_id": "msg_0002b",
        "session_updated": 0, "reported_at": 0}}}
    state_file(tmp_path, "h").write_text(json.dumps(legacy))
    sink = MemorySink()
    async with daemon() as fake:
        fake.put_session("ses_v", turns_of("ses_v", 3))
        c = collector([host("h", fake.url)], sink, max_messages=4, state_dir=tmp_path)
        async with running(c):
            await until(lambda: len(sink.turns()) >= 1)  # the connect's reconcile finds turn 3
            await asyncio.sleep(0.3)
    [backfilled] = sink.turns()
    assert last_message_ids([backfilled]) == ["msg_0003b"] and backfilled["backfill"]
    saved = json.loads(state_file(tmp_path, "h").read_text())["sessions"]["ses_v"]
    assert saved["last_message_id"] == "msg_0003b"


@pytest.mark.asyncio
async def test_poll_fallback_when_the_stream_only_sends_heartbeats() -> None:
    sink = MemorySink()
    async with daemon(heartbeat_s=0.03) as fake:
        fake.put_session("ses_p", turn("ses_p", 1, completed=False))
        fake.status = {"ses_p": {"type": "busy"}}
        c = collector([host("h", fake.url)], sink, poll_interval_s=0.05)
        async with running(c):
            await until(lambda: c.stats["h"].polls >= 2)
            assert sink.turns() == []  # busy: nothing ended yet
            fake.listings["ses_p"] = turn("ses_p", 1)
            fake.status = {}
            await until(lambda: len(sink.turns()) == 1)
    [ended] = sink.turns()
    assert (ended["source"], ended["backfill"]) == ("poll", False)
    assert ended["properties"]["messages"][-1]["info"]["time"]["completed"]


# ---------------------------------------------------------------- garbage and back-pressure


@pytest.mark.asyncio
async def test_malformed_frames_are_dead_lettered_and_the_stream_goes_on() -> None:
    sink = MemorySink()
    async with one_host(sink) as (fake, c):
        await until(lambda: c.stats["h"].connected)
        good = frame("session.updated", {"sessionID": "ses_g", "info": {"id": "ses_g"}})
        wrong = {"payload": {"id": "evt_x", "type": "session.idle",
                             "properties": {"sessionID": 7}}}
        fake.push(b"data: {not json\n\n", wrong, b"data: [1, 2]\n\n", good)
        await until(lambda: len(sink.events("session.updated")) == 1)
    dead = sink.dead()
    assert [d["reason"] for d in dead] == ["not_json", "bad_session_id", "not_an_object"]
    for record in dead:
        assert_valid("dead-letter.v1", record)
        assert (record["stage"], record["key"]) == ("collector", "h")
    assert base64.b64decode(dead[0]["original_b64"]) == b"{not json"
    assert json.loads(base64.b64decode(dead[1]["original_b64"])) == wrong
    assert c.stats["h"].events_malformed == 3 and c.stats["h"].connections == 1


@pytest.mark.asyncio
async def test_a_blocked_sink_pauses_reading_without_loss_or_reconnect() -> None:
    sink = MemorySink()
    sink.gate.clear()
    async with one_host(sink) as (fake, c):
        await until(lambda: c.stats["h"].connected)
        frames = [frame("session.updated", {"sessionID": "ses_q", "info": {"id": "ses_q"}})
                  for _ in range(50)]
        fake.push(*frames)
        await until(lambda: sink.waiting == 1)
        await asyncio.sleep(0.4)  # twice the 0.2 s silence bound
        assert sink.records == [] and sink.waiting == 1
        assert c.stats["h"].events_out == 0 and fake.connections == 1
        sink.gate.set()
        await until(lambda: len(sink.records) == 50)
    assert [r["event_id"] for r in sink.events()] == [f["payload"]["id"] for f in frames]
    assert fake.connections == 1


@pytest.mark.asyncio
async def test_disabled_collector_connects_to_nothing() -> None:
    sink = MemorySink()
    async with daemon() as fake:
        c = collector([host("h", fake.url)], sink, enabled=False)
        await asyncio.wait_for(c.run(), 1)
        assert fake.connections == 0


def test_duplicate_host_names_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate host names: h"):
        Collector([host("h", "http://127.0.0.1:1"), host("h", "http://127.0.0.1:2")],
                  MemorySink())


# ---------------------------------------------------------------- the Kafka sink, broker down


@pytest.mark.asyncio
async def test_kafka_sink_buffers_to_its_bound_then_blocks_and_counts_drops(
        caplog: pytest.LogCaptureFixture) -> None:
    sink = KafkaEventSink(f"127.0.0.1:{closed_port()}", max_buffered=3, retry_min_s=0.01,
                          retry_max_s=0.02)
    await sink.start()
    for i in range(3):
        await asyncio.wait_for(sink.send("opencode.events", b"h:s", b'{"n": %d}' % i), 0.5)
    assert sink.buffered == 3
    blocked = asyncio.create_task(sink.send("opencode.events", b"h:s", b"{}"))
    await asyncio.sleep(0.2)
    assert not blocked.done()  # back-pressure: the fourth waits for room
    blocked.cancel()
    with caplog.at_level(logging.ERROR, logger="pipeline.collector"):
        lost = await sink.close(timeout_s=0.1)
    assert lost == 3 and sink.dropped == 3 and sink.sent == 0 and not sink.broker_up
    assert "3 undelivered records" in caplog.text
    with pytest.raises(SinkClosed):
        await sink.send("opencode.events", b"h:s", b"{}")


def test_settings_from_config_and_validation() -> None:
    from pipeline.config import load

    cfg = load(env={"PIPELINE_COLLECTOR__HEARTBEAT_PERIOD_S": "5", "PANEL_OPENCODE_DISABLED": "1",
                    "PIPELINE_COLLECTOR__DROP_EVENT_TYPES": '["pty.*"]',
                    "PIPELINE_COLLECTOR__STATE_DIR": "/tmp/x"})
    settings = CollectorSettings.from_config(cfg)
    assert (settings.heartbeat_period_s, settings.silence_s) == (5, 15)
    assert settings.enabled is False and settings.state_dir == Path("/tmp/x")
    assert settings.event_filter.keeps("message.part.delta")
    assert not settings.event_filter.keeps("pty.created")
    with pytest.raises(ValueError, match="heartbeat_period_s"):
        CollectorSettings(heartbeat_period_s=0)
    assert copy.copy(CollectorSettings()).max_messages == 25


def _msg(mid: str, role: str, *, completed: bool = True, finish: str | None = "stop", error: bool = False) -> dict:
    info: dict = {"id": mid, "role": role, "time": {"created": 1}}
    if role == "assistant":
        if completed:
            info["time"]["completed"] = 2
        if finish:
            info["finish"] = finish
        if error:
            info["error"] = {"name": "APIError", "data": {}}
    return {"info": info, "parts": []}


def test_completed_turns_ignore_a_turn_still_in_progress() -> None:
    from pipeline.collector.turns import completed_turns

    u1, a1, u2 = _msg("u1", "user"), _msg("a1", "assistant"), _msg("u2", "user")
    a2_tools = _msg("a2", "assistant", finish="tool-calls")
    a2_running = _msg("a2", "assistant", completed=False, finish=None)
    a2_failed = _msg("a2", "assistant", completed=False, finish=None, error=True)
    assert completed_turns([u1, a1]) == [2]
    assert completed_turns([u1, a1, u2]) == [2]  # the next prompt was sent before the fetch
    assert completed_turns([u1, a1, u2, a2_running]) == [2]
    assert completed_turns([u1, a1, u2, a2_tools]) == [2]  # more assistant messages will follow
    assert completed_turns([u1, a1, u2, a2_failed]) == [2, 4]
    assert completed_turns([u1, a2_tools, _msg("a3", "assistant")]) == [3]
    assert completed_turns([u1]) == []
