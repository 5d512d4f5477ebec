"""faust's consumer hands records over one fetched batch at a time, not one at a time: the stage's
input records to its agent loop's intake (`agents/intake.py`), the changelog records to faust.

faust 0.15.3's `Consumer._drain_messages` delivers every fetched record through
`wait_first(callback(message), suspend_flow.wait())`: four tasks and an `asyncio.wait` per
record, so that a rebalance (which sets `suspend_flow`) can interrupt a delivery blocked on a
full stream buffer. `drain_messages` below is the same loop with that race run once per fetched
batch, since those tasks cost more than handling a small record. What stays exactly as upstream:
- the fetch (`getmany`) runs in the drain loop, never inside the race: when the flow stops
  while records are being fetched, faust's getmany seeks back to the committed offsets, and
  cancelling it there would lose the fetched records;
- the periodic commit (every `broker_commit_every` acked records) runs outside the race, so a
  rebalance never cancels a commit half-way;
- records are handed over in fetch order, gaps recorded, records behind the read offset dropped.
When a rebalance interrupts a batch, the rest of it is not handed over and, unlike upstream, its
read offsets are not advanced; faust seeks to the committed offsets after every rebalance (a
partition without one to its beginning, `perform_seek` below), so those records come again.

One thing differs on purpose: a stream record fetched while the app is rebalancing is held until
the rebalance is over. A stage with a table resumes the flow early, to read its changelog, and
its stream partitions are resumed and seeked (`Recovery.on_recovery_completed`) before
`app.flow_control.resume()`, which empties every stream queue. A record fetched in that window
went into a queue that was then emptied, while the fetch position had moved past it: a
restarted sampler in the fault suite logged 20 records fetched and handed over during that seek
and never processed a record again. Upstream's loop hands records over in the same window (read, not
measured). Changelog records are handed over at once: the recovery waits for them. Since
`fetch_active` (below) leaves stream partitions out of every fetch begun while the app
rebalances, only a fetch begun before the rebalance can still bring such a record.

Two more replacements keep the fetch position from passing a record no stream was handed:
- `fetch_active` (faust's `_getmany`) asks aiokafka for a copy of the partitions faust lets
  through, and while the app rebalances only for its changelog partitions. faust passed its own
  set of active partitions, which the recovery empties once a table's changelog is read (its
  stream partitions are still paused then); aiokafka reads an empty set as "every partition", so
  a fetch already waiting returned the paused stream partitions' records, moved their positions
  past them, and faust's getmany dropped them as not active. The recovery's seek to the committed
  offsets brought back those of partitions with a commit; on a partition never committed the
  records were skipped, and faust committed past them with the next record there: a restarted
  ingest lost a turn that way (`tests/integration/test_at_least_once.py`: the sample case's
  intermittent failure; its last test writes a record in that window).
  Stream records are now fetched once the rebalance is over, from where the recovery sought.
- `perform_seek` (faust's seek to the committed offsets after every rebalance) seeks a stream
  partition with no committed offset to its beginning, where a consumer without one starts:
  aiokafka's seek_to_committed leaves it where it is, so whatever faust dropped there during the
  rebalance (a fetch that ended after the flow stopped) was skipped.

`install()` replaces the three methods on faust's Consumer classes;
`tests/unit/agents/test_consumer_drain.py` pins the upstream sources they were written against,
so a faust upgrade is a deliberate review.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

from faust.transport import consumer as faust_consumer
from mode import Service

UPSTREAM = faust_consumer.Consumer._drain_messages
UPSTREAM_GETMANY = faust_consumer.ThreadDelegateConsumer._getmany
UPSTREAM_PERFORM_SEEK = faust_consumer.Consumer.perform_seek
YIELD_EVERY = 100  # records between yields to the loop, as upstream
REBALANCE_POLL_S = 0.01  # faust has no event for a rebalance's end, only app.rebalancing
NOTHING_TO_FETCH_S = 0.05  # a rebalance with no changelog to read: wait this long, then ask again


async def drain_messages(self: Any, fetcher: Any) -> None:  # pragma: no cover - runs in workers
    callback = self.callback
    getmany = self.getmany
    consumer_should_stop = cast(Service, self)._stopped.is_set
    fetcher_should_stop = cast(Service, fetcher)._stopped.is_set
    get_read_offset = self._read_offset.__getitem__
    set_read_offset = self._read_offset.__setitem__
    set_flag = self.diag.set_flag
    unset_flag = self.diag.unset_flag
    commit_every = self._commit_every
    acks_enabled_for = self.app.topics.acks_enabled_for

    suspended = self.suspend_flow.is_set
    app = self.app
    intake = getattr(app, "intake", None)  # the stage's input goes to its agent loop directly (agents/intake.py)
    intake_topic = intake.topic if intake is not None else None

    async def rebalance_over() -> None:
        """Return once the app's rebalance has ended (faust has emptied its stream queues by then);
        a new rebalance beginning (the flow suspended) ends the wait too, and the caller stops."""
        self.log.info("holding fetched stream records until the rebalance is over")
        while app.rebalancing and not suspended():
            await asyncio.sleep(REBALANCE_POLL_S)

    async def deliver(batch: list[tuple[Any, Any]], cursor: list[int]) -> None:
        """Hand batch[cursor[0]:] over in order, advancing the cursor past each record handed
        over; return early when a rebalance began or a commit is due (committed by the caller,
        outside the race, as upstream: a commit must not be cancelled half-way)."""
        since_yield = 0
        while cursor[0] < len(batch):
            if suspended():  # a rebalance began: hand nothing more over (the race stops a blocked one)
                return
            if commit_every is not None and self._n_acked >= commit_every:
                return
            tp, message = batch[cursor[0]]
            since_yield += 1
            if since_yield > YIELD_EVERY:
                await asyncio.sleep(0)
                since_yield = 0
            if app.rebalancing and message.topic not in app.tables.changelog_topics:
                await rebalance_over()
                if suspended():
                    return
            offset = message.offset
            r_offset = get_read_offset(tp)
            if r_offset is None or offset >= r_offset:
                gap = offset - (r_offset or 0)
                if gap > 1 and r_offset and acks_enabled_for(message.topic):
                    await self._add_gap(tp, r_offset + 1, offset)
                if message.topic == intake_topic:
                    await intake.put(message)
                else:
                    await callback(message)
                set_read_offset(tp, offset)
            cursor[0] += 1

    try:
        while not (consumer_should_stop() or fetcher_should_stop()):
            set_flag(faust_consumer.CONSUMER_FETCHING)
            fetched = cast(AsyncIterator[Any], getmany(timeout=1.0))
            await self.sleep(0)  # upstream: getmany may not release the loop on its own
            if not self.should_stop:
                # the fetch (and its seek back when the flow stopped) as upstream, outside the race
                batch = [item async for item in fetched]
                cursor = [0]
                while cursor[0] < len(batch) and not suspended():
                    if commit_every is not None and self._n_acked >= commit_every:
                        self._n_acked = 0
                        await self.commit()
                    waited = await self.wait_first(deliver(batch, cursor), self.suspend_flow.wait())
                    if waited.stopped:  # the consumer is stopping or crashed
                        break
            unset_flag(faust_consumer.CONSUMER_FETCHING)
    except self.consumer_stopped_errors:
        if self.transport.app.should_stop:
            self.log.info("Broker stopped consumer, shutting down...")
            return
        raise
    except asyncio.CancelledError:
        if self.transport.app.should_stop:
            self.log.info("Consumer shutting down for user cancel.")
            return
        raise
    except Exception as exc:
        self.log.exception("Drain messages raised: %r", exc)
        raise
    finally:
        unset_flag(faust_consumer.CONSUMER_FETCHING)


async def fetch_active(self: Any, active_partitions: set[Any] | None, timeout: float) -> Mapping[Any, list[Any]]:
    """faust's `_getmany`, asking aiokafka for a copy of the partitions to read, and while the app
    rebalances only for its changelog partitions (what the table recovery reads).

    aiokafka's fetched_records reads the set while it waits for records, and an empty set as
    every partition; faust's own set empties while a fetch waits (the recovery pauses the
    changelog partitions it has read, the stream partitions are still paused), and the fetch
    then took the stream partitions' records, moving their positions past records faust then
    dropped. A stream partition resumed during the rebalance is read once it is over, from the
    position the recovery sought it to."""
    thread = self._thread
    if active_partitions is None:  # a client-only app reads every partition, as upstream
        return cast(Mapping[Any, list[Any]], await thread.getmany(None, timeout))
    app = self.app
    if app.rebalancing:
        changelogs = app.tables.changelog_topics
        partitions = {tp for tp in active_partitions if tp.topic in changelogs}
    else:
        partitions = set(active_partitions)
    if not partitions:
        await asyncio.sleep(min(timeout, NOTHING_TO_FETCH_S))
        return {}
    return cast(Mapping[Any, list[Any]], await thread.getmany(partitions, timeout))


async def perform_seek(self: Any) -> None:
    """faust's seek of every partition to its committed offset (after every rebalance, and when
    a fetch ends after the flow stopped), with a stream partition that has no committed offset
    sought to its beginning, where a consumer without one starts (auto_offset_reset earliest).

    aiokafka's seek_to_committed leaves such a partition where it is, so records faust fetched
    there and dropped were never read again, unlike those of a partition with a commit."""
    read_offset = self._read_offset
    committed: Mapping[Any, int | None] = await self.seek_to_committed()
    read_offset.update({tp: offset if offset is not None and offset >= 0 else None
                        for tp, offset in committed.items()})
    self._committed_offset.update({faust_consumer.ensure_TP(tp): offset if offset else None
                                   for tp, offset in committed.items() if offset is not None})
    app = self.app
    acks_enabled_for = app.topics.acks_enabled_for
    changelogs = app.tables.changelog_topics
    uncommitted = [tp for tp, offset in committed.items()
                   if not offset and acks_enabled_for(tp.topic) and tp.topic not in changelogs]
    if uncommitted:
        await self._thread.seek_to_beginning(*uncommitted)


def install() -> None:
    faust_consumer.Consumer._drain_messages = drain_messages  # type: ignore[method-assign]
    faust_consumer.ThreadDelegateConsumer._getmany = fetch_active  # type: ignore[method-assign]
    faust_consumer.Consumer.perform_seek = perform_seek  # type: ignore[method-assign]
