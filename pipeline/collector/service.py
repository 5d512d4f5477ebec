"""`pipeline collect` as a whole: one replica of the collector, sharing the hosts with the others.

    pipeline collect [--metrics-port P]
    python -m pipeline.collector.service [--config F] [--metrics-port P]   (the same, without the CLI)

It seeds the host table (`collector.hosts`) with the config's `[[hosts]]` (only records that
differ: starting ten replicas at once rewrites nothing), joins the consumer group, and follows
the hosts of the partitions the group gives it, each host's state read from `collector.state`
(or, once, from a state file of `[collector] state_dir` left by a collector from before the
topic). A replica that is the only one follows every host. SIGTERM or SIGINT: its hosts stop,
their state is saved after a flush, it leaves the group, and the others take its hosts at once.

The hidden `--group` and `--*-topic` options run a separate fleet (its own group, tables and
output) on the same cluster, which is what the integration tests do on a shared broker.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.clock import Clock, SystemClock
from pipeline.collector.collector import Collector
from pipeline.collector.host import ClientFactory, default_client_factory
from pipeline.collector.hosts import records_of
from pipeline.collector.replica import Replica
from pipeline.collector.settings import CollectorSettings
from pipeline.collector.sink import KafkaEventSink
from pipeline.collector.state import FileStateStore
from pipeline.collector.store import KafkaStateStore
from pipeline.config import Config
from pipeline.kafka.security import COLLECTOR, kafka_access

log = logging.getLogger("pipeline.collector")

METRIC_FIELDS = ("events_in", "events_out", "events_filtered", "events_malformed", "turns_emitted", "backfills",
                 "reconnects", "fetch_failures", "oversize_drops")


@dataclass
class Running:
    """What `serve` built, for the caller that wants to look (tests, the metrics exporter)."""

    collector: Collector
    replica: Replica
    sink: KafkaEventSink
    store: KafkaStateStore


def settings_for(cfg: Config, **overrides: Any) -> CollectorSettings:
    return CollectorSettings.from_config(cfg, **overrides)


async def serve(cfg: Config, settings: CollectorSettings, stop: asyncio.Event, *,
                seed: bool = True, clock: Clock | None = None, client_factory: ClientFactory = default_client_factory,
                started: asyncio.Future[Running] | None = None) -> None:
    """Run one replica until `stop` is set; then hand its hosts over cleanly and return."""
    clock = clock or SystemClock()
    kafka = kafka_access(cfg, COLLECTOR)
    async with KafkaEventSink(kafka, max_buffered=cfg.collector.buffer_max_records) as sink:
        fallback = FileStateStore(settings.state_dir) if settings.state_dir else None
        store = KafkaStateStore(kafka, settings.state_topic, sink, fallback=fallback)
        collector = Collector([], sink, settings=settings, clock=clock, client_factory=client_factory, store=store)
        replica = Replica(collector, sink, kafka, lambda record: record.resolve(cfg),
                          session_timeout_s=cfg.kafka.session_timeout_s,
                          heartbeat_interval_s=cfg.kafka.heartbeat_interval_s,
                          seed=records_of(cfg, clock.now_ms()) if seed else ())
        collecting = asyncio.create_task(collector.run(), name="collector")
        membership = asyncio.create_task(replica.run(), name="collector:replica")
        if started is not None:
            started.set_result(Running(collector, replica, sink, store))
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([collecting, membership, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            # The replica first: its hosts stop and their state is saved, then it leaves the group.
            membership.cancel()
            await asyncio.gather(membership, return_exceptions=True)
            collector.stop()
            await asyncio.gather(collecting, return_exceptions=True)
        for task in (membership, collecting):
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]


async def export_metrics(collector: Collector, interval_s: float = 1.0) -> None:
    """The collector's counters as Prometheus metrics, per host; a host handed to another replica
    drops out of this one's series (its counters continue there)."""
    from pipeline import metrics

    last: dict[tuple[str, str], int] = {}
    shown: set[str] = set()
    while True:
        stats = collector.stats
        for host in shown - set(stats):
            metrics.COLLECTOR_CONNECTED.remove(host)
            for key in [k for k in last if k[0] == host]:
                del last[key]
        shown = set(stats)
        for host, s in stats.items():
            metrics.COLLECTOR_CONNECTED.labels(host).set(1 if s.connected else 0)
            for field in METRIC_FIELDS:
                value = int(getattr(s, field))
                delta = value - last.get((host, field), 0)
                if delta > 0:
                    metrics.COLLECTOR_EVENTS.labels(host, field).inc(delta)
                last[(host, field)] = value
        await asyncio.sleep(interval_s)


def run(cfg: Config, metrics_port: int | None = None, **overrides: Any) -> int:
    """`pipeline collect`: one replica until SIGTERM or SIGINT. `overrides` are collector settings
    (the group and topics of another fleet)."""
    from pipeline import metrics
    from pipeline.health import Liveness

    if not cfg.enabled:
        print("pipeline collect: disabled (PANEL_OPENCODE_DISABLED=1 or enabled = false): shipping nothing",
              file=sys.stderr)
        return 0
    if not cfg.hosts:
        log.info("no [[hosts]] in the config: following the hosts of the shared table only")
    liveness = Liveness()
    metrics.serve(metrics_port if metrics_port is not None else cfg.metrics.port, cfg.metrics.host,
                  health=liveness.check)
    settings = settings_for(cfg, **overrides)
    kafka = kafka_access(cfg, COLLECTOR)
    if kafka.sasl or kafka.tls:
        from pipeline.kafka.admin import check_access

        # a broker that does not let this principal in is a start-up error naming why, not a
        # sink that retries its producer forever
        asyncio.run(check_access(kafka))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        started: asyncio.Future[Running] = loop.create_future()
        beats = asyncio.create_task(liveness.run_beats())
        serving = asyncio.create_task(serve(cfg, settings, stop, started=started))
        await asyncio.wait([serving, started], return_when=asyncio.FIRST_COMPLETED)
        exporter = asyncio.create_task(export_metrics(started.result().collector)) if started.done() else None
        log.info("collector replica of group %s started; %d hosts in the config", settings.group_id,
                 len(cfg.hosts))
        try:
            await serving
        finally:
            for task in (beats, exporter):
                if task is not None:
                    task.cancel()

    asyncio.run(main())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline import config as config_mod
    from pipeline import logs
    from pipeline.errors import PipelineError

    p = argparse.ArgumentParser(prog="python -m pipeline.collector.service", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML config file (default: $PIPELINE_CONFIG, else built-in defaults)")
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--metrics-port", type=int, default=None)
    p.add_argument("--group", default=None, help=argparse.SUPPRESS)
    p.add_argument("--hosts-topic", default=None, help=argparse.SUPPRESS)
    p.add_argument("--state-topic", default=None, help=argparse.SUPPRESS)
    p.add_argument("--events-topic", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dead-topic", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logs.configure(args.log_format, args.verbose)
    overrides = {k: v for k, v in (("group_id", args.group), ("hosts_topic", args.hosts_topic),
                                   ("state_topic", args.state_topic), ("events_topic", args.events_topic),
                                   ("dead_topic", args.dead_topic)) if v}
    try:
        return run(config_mod.load(args.config), args.metrics_port, **overrides)
    except PipelineError as exc:
        print(f"pipeline collect: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
