"""The collector as a whole: one `HostRunner` task per host, started and stopped together, and
the checkpoint task that saves their state files once the sink has flushed what they record."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict

from pipeline.clock import Clock, SystemClock
from pipeline.collector.host import ClientFactory, HostRunner, default_client_factory
from pipeline.collector.settings import CollectorSettings
from pipeline.collector.sink import EventSink, SinkClosed
from pipeline.collector.state import HostState, HostStats
from pipeline.config import HostConfig

log = logging.getLogger(__name__)


class Collector:
    """Runs one independent task per host; `await run()` until `stop()` (or cancellation).

    Every `checkpoint_interval_s`, and once more on the way out, the state of each host that
    reported something new is saved, after a `flush` of the sink (see `_checkpoint`).
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
    ) -> None:
        names = [h.name for h in hosts]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate host names: {', '.join(duplicates)}")
        self.settings = settings or CollectorSettings()
        self._sink = sink
        self._clock = clock or SystemClock()
        rng = rng or random.Random()
        self._runners = {
            h.name: HostRunner(h, sink, self.settings, self._clock, random.Random(rng.random()),
                               client_factory)
            for h in hosts
        }
        self._stop = asyncio.Event()
        self.checkpoints = 0  # state saves that happened

    @property
    def stats(self) -> dict[str, HostStats]:
        return {name: runner.stats for name, runner in self._runners.items()}

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

    async def run(self) -> None:
        if not self.settings.enabled:
            log.info("collector disabled (enabled = false or PANEL_OPENCODE_DISABLED=1)")
            return
        self._stop.clear()
        tasks = [asyncio.create_task(r.run(), name=f"collector:{name}")
                 for name, r in self._runners.items()]
        checkpointer = asyncio.create_task(self._checkpoint_loop(), name="collector:checkpoint")
        try:
            await self._stop.wait()
        finally:
            for task in [*tasks, checkpointer]:
                task.cancel()
            await asyncio.gather(*tasks, checkpointer, return_exceptions=True)
            await self._checkpoint(timeout_s=self.settings.shutdown_flush_timeout_s)

    async def _checkpoint_loop(self) -> None:
        while True:
            await self._clock.sleep(self.settings.checkpoint_interval_s)
            try:
                await self._checkpoint(timeout_s=None)
            except Exception:
                log.exception("collector checkpoint failed; retrying next interval")

    async def _checkpoint(self, timeout_s: float | None) -> None:
        """Persist what was reported, once the sink holds none of it in memory any more."""
        due = {r: r.state.to_dict(r.host.name) for r in self._runners.values()
               if r.dirty and r.state_path is not None}
        if not due:
            return
        for runner in due:
            runner.dirty = False
        try:
            if timeout_s is None:
                await self._sink.flush()
            else:
                await asyncio.wait_for(self._sink.flush(), timeout_s)
        except (TimeoutError, SinkClosed) as exc:
            for runner in due:
                runner.dirty = True
            # Not saving leaves the old state: the next start re-emits instead of losing.
            log.warning("collector state not saved: the sink did not flush (%s)", exc or "timeout")
            return
        for runner, data in due.items():
            assert runner.state_path is not None
            HostState.save(runner.state_path, data)
        self.checkpoints += 1
