"""The collector as a whole: one `HostRunner` task per followed host, and the checkpoint task that
saves their state through a `StateStore` once the sink has flushed what they recorded.

The set of followed hosts can change while it runs (`follow`, `unfollow`): that is how the
replicas of `pipeline collect` hand hosts to each other (pipeline.collector.replica). Handing a
host over is: stop its task, flush the sink, save its state; the next owner loads that state
before it connects, so what was reported is not reported again."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Collection, Sequence
from dataclasses import asdict

from pipeline.clock import Clock, SystemClock
from pipeline.collector.host import ClientFactory, HostRunner, default_client_factory
from pipeline.collector.settings import CollectorSettings
from pipeline.collector.sink import EventSink, SinkClosed
from pipeline.collector.state import FileStateStore, HostStats, StateStore
from pipeline.config import HostConfig

log = logging.getLogger(__name__)

_FROM_SETTINGS: StateStore = FileStateStore.__new__(FileStateStore)  # sentinel: the store state_dir implies


class Collector:
    """Runs one independent task per followed host; `await run()` until `stop()` (or cancellation).

    `hosts` are followed from the start; `follow` and `unfollow` change the set while running.
    Every `checkpoint_interval_s`, on every `unfollow`, and once more on the way out, the state of
    each host that reported something new is saved to `store`, after a `flush` of the sink (see
    `_checkpoint`). `store` defaults to the state files of `settings.state_dir` (none: memory only).
    """

    def __init__(
        self,
        hosts: Sequence[HostConfig],
        sink: EventSink,
        *,
        settings: CollectorSettings | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        client_factory: ClientFactory = default_client_factory,
        store: StateStore | None = _FROM_SETTINGS,
    ) -> None:
        names = [h.name for h in hosts]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate host names: {', '.join(duplicates)}")
        self.settings = settings or CollectorSettings()
        if store is _FROM_SETTINGS:
            store = FileStateStore(self.settings.state_dir) if self.settings.state_dir else None
        self._store = store
        self._sink = sink
        self._clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._client_factory = client_factory
        self._initial = list(hosts)
        # Built now so `stats` lists the configured hosts before `run` has started them.
        self._runners = {h.name: self._runner(h) for h in hosts}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stop = asyncio.Event()
        # One checkpoint at a time: two interleaved ones could save an older state after a newer one.
        self._checkpointing = asyncio.Lock()
        self.checkpoints = 0  # state saves that happened

    def _runner(self, host: HostConfig) -> HostRunner:
        return HostRunner(host, self._sink, self.settings, self._clock, random.Random(self._rng.random()),
                          self._client_factory)

    @property
    def stats(self) -> dict[str, HostStats]:
        return {name: runner.stats for name, runner in self._runners.items()}

    @property
    def followed(self) -> list[str]:
        """The hosts whose tasks are running, by name."""
        return sorted(name for name, task in self._tasks.items() if not task.done())

    def totals(self) -> dict[str, int]:
        """Every numeric counter summed over hosts, plus how many hosts are connected."""
        out: dict[str, int] = {}
        for stats in self.stats.values():
            for key, value in asdict(stats).items():
                if isinstance(value, bool):
                    out[key] = out.get(key, 0) + int(value)
                elif isinstance(value, int) and key != "last_frame_at_ms":
                    out[key] = out.get(key, 0) + value
        return out

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """Stopped or stopping: `follow` starts nothing more."""
        return self._stop.is_set()

    async def run(self) -> None:
        if not self.settings.enabled:
            log.info("collector disabled (enabled = false or PANEL_OPENCODE_DISABLED=1)")
            return
        self._stop.clear()
        checkpointer = asyncio.create_task(self._checkpoint_loop(), name="collector:checkpoint")
        try:
            await self.follow(self._initial)
            await self._stop.wait()
        finally:
            checkpointer.cancel()
            await asyncio.gather(checkpointer, return_exceptions=True)
            await self.unfollow(list(self._tasks), timeout_s=self.settings.shutdown_flush_timeout_s, forget=False)

    async def follow(self, hosts: Sequence[HostConfig]) -> list[str]:
        """Start a task for each of `hosts` not followed yet, its saved state loaded first.

        Returns the names started. A host followed already under another config is left as it
        is: `unfollow` it first (the replica does, when a host record changes)."""
        new = [h for h in hosts if h.name not in self._tasks]
        if not new or self.stopping:
            return []
        states = await self._store.load([h.name for h in new]) if self._store is not None else {}
        if self.stopping:
            return []
        for host in new:
            runner = self._runners.get(host.name)
            if runner is None or runner.host != host or runner.stats.connections:
                runner = self._runners[host.name] = self._runner(host)
            if host.name in states:
                runner.state = states[host.name]
            runner.dirty = False
            self._tasks[host.name] = asyncio.create_task(runner.run(), name=f"collector:{host.name}")
        return [h.name for h in new]

    async def unfollow(self, names: Collection[str], *, timeout_s: float | None = None,
                       forget: bool = True) -> list[str]:
        """Stop the tasks of `names`, then save their state once the sink flushed what they sent.

        When this returns, what they reported is acknowledged and recorded as reported (unless
        the sink could not flush within `timeout_s`: then the next owner re-reports, which
        ingest's snapshot-id dedupe absorbs). `forget`: drop their counters too (a host handed
        to another replica), not kept for a last look (shutdown). Returns the names stopped."""
        tasks = {n: self._tasks.pop(n) for n in names if n in self._tasks}
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        if tasks:
            await self._checkpoint(timeout_s=timeout_s, only=set(tasks))
        for name in tasks if forget else ():
            self._runners.pop(name, None)
        return sorted(tasks)

    async def _checkpoint_loop(self) -> None:
        while True:
            await self._clock.sleep(self.settings.checkpoint_interval_s)
            try:
                await self._checkpoint(timeout_s=None)
            except Exception:
                log.exception("collector checkpoint failed; retrying next interval")

    async def _checkpoint(self, timeout_s: float | None, only: Collection[str] | None = None) -> None:
        """Persist what was reported, once the sink holds none of it in memory any more."""
        if self._store is None:
            return
        async with self._checkpointing:
            due = {r: r.state.to_dict(r.host.name) for name, r in self._runners.items()
                   if r.dirty and (only is None or name in only)}
            if not due:
                return
            for runner in due:
                runner.dirty = False
            store = self._store

            async def persist() -> None:
                await self._sink.flush()
                await store.save({r.host.name: data for r, data in due.items()})

            try:
                await (persist() if timeout_s is None else asyncio.wait_for(persist(), timeout_s))
            except (TimeoutError, SinkClosed) as exc:
                for runner in due:
                    runner.dirty = True
                # Not saving leaves the old state: the next start re-emits instead of losing.
                log.warning("collector state not saved: the sink did not flush (%s)", exc or "timeout")
                return
            except BaseException:  # cancelled mid-way (shutdown): the final checkpoint must still save
                for runner in due:
                    runner.dirty = True
                raise
            self.checkpoints += 1
