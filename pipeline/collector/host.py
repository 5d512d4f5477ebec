"""One host's task: its event stream, turn fetches, reconcile and poll passes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any

from pipeline.clients.opencode import (
    InsecureHostError,
    MalformedFrame,
    OpencodeClient,
    OpencodeError,
    OpencodeNotFound,
)
from pipeline.clock import Clock
from pipeline.collector.settings import CollectorSettings
from pipeline.collector.sink import EventSink
from pipeline.collector.state import HostState, HostStats
from pipeline.collector.turns import (
    TurnRequest,
    already_reported,
    has_assistant,
    idle_trigger,
    message_digest,
    message_id,
    settled,
    turn_ends,
    unreported_ends,
    updated_ms,
)
from pipeline.config import HostConfig
from pipeline.delivery.retry import RetryPolicy
from pipeline.model.envelope import (
    TURN_ENDED,
    MalformedEvent,
    Source,
    normalise,
    turn_ended,
)
from pipeline.model.records import dead_letter, encode
from pipeline.model.snapshot import snapshot_id

log = logging.getLogger(__name__)


# Where a dead-lettered frame came from: not a topic, the daemon's stream.
SSE_SOURCE = "sse:/global/event"


ClientFactory = Callable[[HostConfig, "str | None"], OpencodeClient]


def reserialised(frame: Any) -> bytes:
    """The bytes a rejected frame's dead letter holds: the client parsed the wire bytes, so the
    frame is written back as JSON. A lone surrogate (a `\\ud800` escape on the wire, legal JSON)
    cannot be UTF-8: that frame is written with its non-ASCII escaped, as the wire had it."""
    try:
        return json.dumps(frame, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(frame, ensure_ascii=True, default=str).encode("ascii")


def default_client_factory(host: HostConfig, directory: str | None) -> OpencodeClient:
    password = host.password.reveal() if host.password is not None else None
    return OpencodeClient(host.base_url, password, directory=directory,
                          allow_insecure_http=host.allow_insecure_http)


class HostRunner:
    """Everything the collector does for one host, in tasks of its own; `await run()` until cancelled.

    `run` keeps one event-stream connection up, reconnecting with backoff. Each connection
    spawns a reconcile pass and the poll fallback; each turn end spawns one fetch task per
    session. `state` is what was reported (loaded and saved by the `Collector` through its
    `StateStore`, when `dirty`), `stats` the counters the metrics module reads.
    """

    # One client per instance directory asked for its status; the oldest is closed past this.
    _MAX_DIRECTORY_CLIENTS = 32

    def __init__(self, host: HostConfig, sink: EventSink, settings: CollectorSettings,
                 clock: Clock, rng: random.Random, client_factory: ClientFactory,
                 state: HostState | None = None) -> None:
        self.host = host
        self.stats = HostStats(host.name)
        self._sink = sink
        self._settings = settings
        self._clock = clock
        self._client_factory = client_factory
        self._backoff = RetryPolicy(base_s=settings.reconnect_min_s, max_s=settings.reconnect_max_s,
                                    rng=rng)
        # Loaded by the Collector from its StateStore: a file, or the topic the replicas share.
        self.state = state if state is not None else HostState()
        self.dirty = False
        self._clients: dict[str | None, OpencodeClient] = {}
        self._busy: dict[str, str | None] = {}  # session id -> its directory
        # session id -> a re-fetch requested while one was running (None: none requested)
        self._inflight: dict[str, TurnRequest | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._fetch_slots = asyncio.Semaphore(settings.max_concurrent_fetches)
        self._last_session_frame = clock.monotonic()
        # When `_read` began waiting for the next frame; None while it handles one.
        self._waiting_since: float | None = None

    # -- lifecycle ------------------------------------------------------

    async def run(self) -> None:
        attempt = 0
        try:
            while True:
                started = self._clock.monotonic()
                try:
                    await self._connection()
                    reason = "stream ended"
                except TimeoutError:
                    reason = f"no frame for {self._settings.silence_s:.1f}s"
                except InsecureHostError as exc:
                    self.stats.last_error = str(exc)
                    log.error("host %s: %s; not collecting from it", self.host.name, exc)
                    return
                except OpencodeError as exc:
                    reason = str(exc)
                except Exception as exc:  # one host's bug must not end the others' collection
                    log.exception("host %s: collector error", self.host.name)
                    reason = f"{type(exc).__name__}: {exc}"
                was_connected, self.stats.connected = self.stats.connected, False
                self.stats.last_error = reason
                self.stats.reconnects += 1
                # A connection that stayed up a while resets the backoff; one that fails at
                # once keeps growing it, however often the daemon accepts and drops.
                healthy = self._clock.monotonic() - started >= self._settings.heartbeat_period_s
                attempt = 1 if (was_connected and healthy) else attempt + 1
                delay = self._backoff.delay(attempt)
                log.warning("host %s: event stream lost (%s); reconnecting in %.2fs",
                            self.host.name, reason, delay)
                await self._clock.sleep(delay)
        finally:
            self.stats.connected = False
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for client in self._clients.values():
                with contextlib.suppress(Exception):
                    await client.aclose()
            self._clients.clear()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=f"collector:{self.host.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _client(self, directory: str | None) -> OpencodeClient:
        client = self._clients.get(directory)
        if client is None:
            if len(self._clients) >= self._MAX_DIRECTORY_CLIENTS:
                oldest = next(k for k in self._clients if k is not None)
                self._spawn(self._clients.pop(oldest).aclose(), "close-client")
            client = self._clients[directory] = self._client_factory(self.host, directory)
        return client

    async def _connection(self) -> None:
        """One connection's life: read frames until the stream ends, fails or goes silent.

        Silence is `silence_s` of the clock without a frame while waiting for the daemon, and
        raises TimeoutError; time spent handing a frame to a sink that applies back-pressure
        does not count, so a stalled broker never looks like a dead daemon.
        """
        stream = self._client(None).events(global_=True)
        helpers: list[asyncio.Task[None]] = []
        self._waiting_since = self._clock.monotonic()  # connecting counts as waiting
        reader = asyncio.create_task(self._read(stream, helpers),
                                     name=f"collector:{self.host.name}:read")
        watch = asyncio.create_task(self._silence(), name=f"collector:{self.host.name}:silence")
        try:
            await asyncio.wait((reader, watch), return_when=asyncio.FIRST_COMPLETED)
            if not reader.done():
                raise TimeoutError
            reader.result()
        finally:
            for task in (reader, watch, *helpers):
                task.cancel()
            await asyncio.gather(reader, watch, *helpers, return_exceptions=True)
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def _read(self, stream: AsyncIterator[dict[str, Any] | MalformedFrame],
                    helpers: list[asyncio.Task[None]]) -> None:
        async for item in stream:
            self._waiting_since = None
            if not self.stats.connected:
                self.stats.connected = True
                self.stats.connections += 1
                log.info("host %s: event stream connected", self.host.name)
                helpers.append(self._spawn(self._reconcile_with_retry(), "reconcile"))
                if self._settings.poll_interval_s > 0:
                    helpers.append(self._spawn(self._poll_loop(), "poll"))
            await self._handle(item)
            self._waiting_since = self._clock.monotonic()

    async def _silence(self) -> None:
        """Returns once the daemon has sent nothing for `silence_s` while `_read` waited for it."""
        silence_s = self._settings.silence_s
        while True:
            since = self._waiting_since
            if since is None:  # handling a frame (the sink may be holding it): look again later
                await self._clock.sleep(silence_s)
                continue
            remaining = since + silence_s - self._clock.monotonic()
            if remaining <= 0:
                return
            await self._clock.sleep(remaining)

    # -- frames ---------------------------------------------------------

    async def _handle(self, item: dict[str, Any] | MalformedFrame) -> None:
        self.stats.events_in += 1
        now = self._clock.now_ms()
        self.stats.last_frame_at_ms = now
        if isinstance(item, MalformedFrame):
            await self._dead(item.reason.replace("-", "_"), item.detail or item.reason,
                             item.raw.encode("utf-8", "replace"), now)
            return
        try:
            envelope = normalise(item, host=self.host.name, site_key=self.host.site_key,
                                 received_at_ms=now)
        except MalformedEvent as exc:
            await self._dead(exc.reason, exc.detail, reserialised(item), now)
            return
        if envelope is None:
            self.stats.events_filtered += 1
            return
        self._observe(envelope)
        if self._settings.event_filter.keeps(envelope["type"]):
            await self._produce(envelope)
            self.stats.events_out += 1
        else:
            self.stats.events_filtered += 1
        trigger = idle_trigger(envelope)
        if trigger is not None:
            self.request_turn_end(envelope["session_id"], TurnRequest(trigger, "sse", False))

    def _observe(self, envelope: Mapping[str, Any]) -> None:
        self._last_session_frame = self._clock.monotonic()
        session_id, event_type = envelope["session_id"], envelope["type"]
        if event_type == "session.status":
            status = envelope["properties"].get("status")
            kind = status.get("type") if isinstance(status, Mapping) else None
            if kind in ("busy", "retry"):
                self._busy[session_id] = envelope.get("directory")
            elif kind == "idle":
                self._busy.pop(session_id, None)
        elif event_type in ("session.idle", "session.deleted"):
            self._busy.pop(session_id, None)

    async def _dead(self, reason: str, error: str, raw: bytes, now: int) -> None:
        self.stats.events_malformed += 1
        record = dead_letter(stage="collector", source_topic=SSE_SOURCE, raw=raw, reason=reason,
                             error=error, key=self.host.name, redrive_topic=self._settings.events_topic,
                             detail={"host": self.host.name}, at=now)
        log.warning("host %s: malformed frame dead-lettered (%s)", self.host.name, reason)
        await self._sink.send(self._settings.dead_topic, self.host.name.encode("utf-8"), encode(record))

    async def _produce(self, envelope: dict[str, Any]) -> None:
        value = encode(envelope)
        if len(value) > self._settings.max_record_bytes and envelope["type"] == TURN_ENDED:
            value = self._trim(envelope)
        if len(value) > self._settings.max_record_bytes:
            self.stats.oversize_drops += 1
            log.error("host %s: %s for session %s is %d bytes, over max_record_bytes %d; dropped",
                      self.host.name, envelope["type"], envelope["session_id"], len(value),
                      self._settings.max_record_bytes)
            return
        key = f"{self.host.name}:{envelope['session_id']}".encode()
        await self._sink.send(self._settings.events_topic, key, value)

    def _trim(self, envelope: dict[str, Any]) -> bytes:
        """Drop the oldest messages until the record fits: the snapshot is a tail anyway."""
        messages: list[Any] = envelope["properties"]["messages"]
        value = encode(envelope)
        while len(value) > self._settings.max_record_bytes and len(messages) > 1:
            del messages[0]
            value = encode(envelope)
        self.stats.trimmed_turns += 1
        log.warning("host %s: turn_ended for %s trimmed to its last %d messages to fit %d bytes",
                    self.host.name, envelope["session_id"], len(messages), self._settings.max_record_bytes)
        return value

    # -- turn ends ------------------------------------------------------

    def request_turn_end(self, session_id: str, request: TurnRequest) -> None:
        """Fetch the session's turn end in a task of its own. A request while that runs is kept
        (one at most, a live one preferred) and fetched again after it."""
        if session_id in self._inflight:
            pending = self._inflight[session_id]
            # A live trigger outranks a reconcile one: it says the turn was seen ending.
            if pending is None or pending.source != "sse" or request.source == "sse":
                self._inflight[session_id] = request
            return
        self._inflight[session_id] = None
        self._spawn(self._turn_end_loop(session_id, request), f"turn-end:{session_id}")

    async def _turn_end_loop(self, session_id: str, request: TurnRequest) -> None:
        try:
            while True:
                try:
                    await self._turn_end(session_id, request)
                except OpencodeError as exc:
                    self.stats.fetch_failures += 1
                    log.warning("host %s: turn end of %s not fetched (%s); the next reconcile "
                                "retries it", self.host.name, session_id, exc)
                next_request = self._inflight.get(session_id)
                if next_request is None:
                    return
                self._inflight[session_id] = None
                request = next_request
        finally:
            self._inflight.pop(session_id, None)

    async def _turn_end(self, session_id: str, request: TurnRequest) -> None:
        """Fetch the session's settled listing and produce a turn_ended for each turn in it that
        was not reported as it is now; remember what was reported either way."""
        client = self._client(None)
        for attempt in range(1, self._settings.fetch_attempts + 1):
            try:
                async with self._fetch_slots:
                    listing = await self._settled_listing(client, session_id)
                    # After the listing, so a title set at the end of the turn is included.
                    session = await client.get_session(session_id)
                break
            except OpencodeNotFound:
                log.info("host %s: session %s is gone; no turn_ended", self.host.name, session_id)
                return
            except OpencodeError:
                if attempt == self._settings.fetch_attempts:
                    raise
                await self._clock.sleep(self._backoff.delay(attempt))
        previous = self.state.sessions.get(session_id)
        for end in unreported_ends(listing, turn_ends(listing), previous):
            kept = listing[:end][-self._settings.max_messages:]
            snap = snapshot_id(self.host.name, session_id, kept)
            digest = message_digest(self.host.name, session_id, listing[end - 1])
            if already_reported(previous, listing[end - 1], digest):
                self.stats.turns_unchanged += 1
            elif request.source != "sse" and not has_assistant(kept):
                pass  # nothing has answered yet, so no turn ended; remembered so polls skip it
            else:
                envelope = turn_ended(host=self.host.name, site_key=self.host.site_key, session=session,
                                      messages=kept, trigger=request.trigger,
                                      received_at_ms=self._clock.now_ms(), source=request.source,
                                      backfill=request.backfill)
                await self._produce(envelope)
                self.stats.turns_emitted += 1
                if request.backfill:
                    self.stats.backfills += 1
            self._remember(session_id, snap, kept, digest, updated_ms(session))
            previous = self.state.sessions.get(session_id)

    async def _settled_listing(self, client: OpencodeClient,
                               session_id: str) -> list[dict[str, Any]]:
        """The listing once the last assistant message has finished, or when waiting is over.

        Its last `message.updated` can land after `session.idle`; an unsettled listing is
        still emitted when the bound is reached, and the next idle or reconcile, seeing
        different content, emits the settled one.
        """
        delay, waited = self._settings.settle_initial_s, 0.0
        while True:
            listing = await client.messages(session_id, limit=self._settings.max_messages)
            if settled(listing):
                return listing
            if waited >= self._settings.settle_timeout_s:
                self.stats.unsettled_turns += 1
                log.warning("host %s: session %s still unfinished after %.1fs; emitting as is",
                            self.host.name, session_id, waited)
                return listing
            await self._clock.sleep(delay)
            waited += delay
            delay = min(delay * 2, self._settings.settle_max_delay_s)

    def _remember(self, session_id: str, snap: str, kept: Sequence[Mapping[str, Any]],
                  last_message_digest: str, updated: int | None) -> None:
        self.state.sessions[session_id] = {
            "snapshot_id": snap, "last_message_id": message_id(kept[-1]) if kept else None,
            "last_message_digest": last_message_digest, "session_updated": updated or 0,
            "reported_at": self._clock.now_ms(),
        }
        if len(self.state.sessions) > self._settings.max_tracked_sessions:
            sessions = self.state.sessions
            oldest = sorted(sessions, key=lambda k: sessions[k]["reported_at"])
            for stale in oldest[: len(sessions) - self._settings.max_tracked_sessions]:
                del sessions[stale]
        if updated is not None:
            self.state.watermark_ms = max(self.state.watermark_ms or 0, updated)
        self.dirty = True

    # -- reconcile and poll -----------------------------------------------

    async def _reconcile_with_retry(self) -> None:
        for attempt in range(1, self._settings.fetch_attempts + 1):
            try:
                await self.reconcile("reconcile")
                return
            except OpencodeError as exc:
                log.warning("host %s: reconcile failed (%s)", self.host.name, exc)
                if attempt < self._settings.fetch_attempts:
                    await self._clock.sleep(self._backoff.delay(attempt))

    async def _poll_loop(self) -> None:
        while True:
            await self._clock.sleep(self._settings.poll_interval_s)
            if self._clock.monotonic() - self._last_session_frame < self._settings.poll_interval_s:
                continue
            self.stats.polls += 1
            try:
                await self.reconcile("poll")
            except OpencodeError as exc:
                log.info("host %s: status poll failed (%s)", self.host.name, exc)

    async def reconcile(self, source: Source) -> None:
        """Request a turn end for every recently updated session that is idle and unreported."""
        sessions = await self._client(None).list_sessions(limit=self._settings.reconcile_max_sessions)
        if self.state.watermark_ms is None:
            floor = self._clock.now_ms() - int(self._settings.first_start_lookback_s * 1000)
        else:
            floor = self.state.watermark_ms - int(self._settings.reconcile_slack_s * 1000)
        candidates: list[tuple[str, str | None]] = []
        for info in sessions:
            session_id, updated = info.get("id"), updated_ms(info)
            if not isinstance(session_id, str) or updated is None:
                continue
            previous = self.state.sessions.get(session_id)
            if session_id not in self._busy:
                if previous is not None and updated <= previous.get("session_updated", 0):
                    continue
                if previous is None and updated < floor:
                    continue
            directory = info.get("directory")
            candidates.append((session_id, directory if isinstance(directory, str) else None))
        if source == "reconcile":
            self.stats.reconciles += 1
        if not candidates:
            return
        busy, unknown = await self._busy_in({d for _, d in candidates})
        for session_id, directory in candidates:
            if directory in unknown:
                continue  # status unknown: never report a turn that may still be running
            if session_id in busy:
                self._busy[session_id] = directory
                continue
            self._busy.pop(session_id, None)
            # Live and polled turn ends were seen during a connection; only a reconnect's are
            # backfill in the schema's sense.
            request = TurnRequest("reconcile", source, backfill=source == "reconcile")
            self.request_turn_end(session_id, request)

    async def _busy_in(self, directories: Iterable[str | None]) -> tuple[set[str], set[str | None]]:
        busy: set[str] = set()
        unknown: set[str | None] = set()
        for directory in directories:
            try:
                busy.update(await self._client(directory).session_status())
            except OpencodeError as exc:
                unknown.add(directory)
                log.info("host %s: status of %s unknown (%s)", self.host.name, directory, exc)
        return busy, unknown
