"""The `pipeline` command: everything an operator does, one subcommand each."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipeline import config as config_mod
from pipeline import logs
from pipeline.cli.errors import run_command
from pipeline.errors import ConfigError
from pipeline.health import Liveness
from pipeline.topics import hours_ms

log = logging.getLogger("pipeline")
# Young-generation collection threshold for long-running processes (tune_gc); CPython's is 700.
GC_YOUNG_THRESHOLD = 50_000

Command = Callable[[argparse.Namespace, config_mod.Config], int]
COMMANDS: dict[str, Command] = {}

def command(name: str) -> Callable[[Command], Command]:
    def register(fn: Command) -> Command:
        COMMANDS[name] = fn
        return fn

    return register


@command("topics")
def cmd_topics(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from pipeline.kafka import admin
    bootstrap, parts = cfg.kafka.bootstrap, cfg.kafka.partitions
    if args.action == "create":
        result = asyncio.run(admin.create_topics(bootstrap, parts, cfg.kafka.replication,
                                                 hours_ms(cfg.kafka.unscrubbed_retention_hours)))
        if result["created"]:
            print(f"created {len(result['created'])} topics: {', '.join(result['created'])}")
        if result["updated"]:
            print(f"set the table's retention on {len(result['updated'])} topics: {', '.join(result['updated'])}")
        if not result["created"] and not result["updated"]:
            print(f"all {len(result['existing'])} topics already exist; nothing changed")
        for line in result["mismatched"]:
            print(f"warning: {line}", file=sys.stderr)
        return 0
    states = asyncio.run(admin.topic_states(bootstrap, parts))
    if args.json:
        print(json.dumps([s.__dict__ | {"exists": s.exists} for s in states], indent=2))
        return 0
    print(f"{'topic':<20} {'partitions':>10} {'on broker':>10}  {'compacted':<9} {'key':<22} schema")
    for s in states:
        actual = str(s.actual_partitions) if s.exists else "missing"
        print(f"{s.name:<20} {s.wanted_partitions:>10} {actual:>10}  {s.compacted!s:<9} {s.key:<22} {s.schema}")
    return 0


@command("worker")
def cmd_worker(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    import faust

    from agents.registry import STAGE_MODULES, build_stage
    from pipeline import metrics

    if args.stage not in STAGE_MODULES:
        raise ConfigError(f"unknown stage {args.stage!r} (stages: {', '.join(STAGE_MODULES)})", "STAGE")
    app = build_stage(args.stage, cfg)

    from pipeline.kafka.lag import export_lag_forever

    @app.task
    async def export_lag() -> None:
        # every replica exports its group's lag; dashboards take max by (stage, topic, partition)
        await export_lag_forever(cfg.kafka.bootstrap, args.stage, interval_s=15.0)
    metrics.serve(args.metrics_port if args.metrics_port is not None else cfg.metrics.port, cfg.metrics.host,
                  health=app.liveness.check)
    # faust's worker replaces the root logger's handlers when it starts: hand it the chosen format
    worker = faust.Worker(app, loglevel=args.loglevel, quiet=True,
                          logging_config=logs.dict_config(args.log_format, args.verbose))
    # faust's terminal spinner, when on, sets the root logger to DEBUG so that it can spin on
    # every record: each debug line of faust and aiokafka would then be formatted
    worker.spinner = None
    tune_gc()
    worker.execute_from_commandline()
    return 0


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for a process that decodes records all day.

    A batch of decoded records (a 21 KB snapshot is ~1 500 objects) outlives several of the
    default 700-allocation young collections, is promoted, and keeps triggering collections
    of the older generations, each walking every long-lived object of faust, aiokafka and the
    imported modules.
    Freezing what start-up allocated takes those objects out of every later collection, and a
    larger young generation lets a batch die young. Reference cycles are still collected."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)


@command("collect")
def cmd_collect(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from pipeline import metrics
    from pipeline.collector.collector import Collector
    from pipeline.collector.settings import CollectorSettings
    from pipeline.collector.sink import KafkaEventSink

    if not cfg.enabled:
        print("pipeline collect: disabled (PANEL_OPENCODE_DISABLED=1 or enabled = false): shipping nothing",
              file=sys.stderr)
        return 0
    if not cfg.hosts:
        raise ConfigError("no opencode hosts configured: add [[hosts]] entries", "hosts")
    liveness = Liveness()
    metrics.serve(args.metrics_port if args.metrics_port is not None else cfg.metrics.port, cfg.metrics.host,
                  health=liveness.check)
    settings = CollectorSettings.from_config(cfg)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        async with KafkaEventSink(cfg.kafka.bootstrap, max_buffered=cfg.collector.buffer_max_records) as sink:
            collector = Collector(cfg.hosts, sink, settings=settings)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, collector.stop)
            exporter = asyncio.create_task(_export_collector_metrics(collector))
            beats = asyncio.create_task(liveness.run_beats())
            log.info("collecting from %d hosts: %s", len(cfg.hosts), ", ".join(h.name for h in cfg.hosts))
            try:
                await collector.run()
            finally:
                exporter.cancel()
                beats.cancel()

    asyncio.run(run())
    return 0


async def _export_collector_metrics(collector: Any) -> None:
    from pipeline import metrics

    last: dict[tuple[str, str], int] = {}
    while True:
        for host, stats in collector.stats.items():
            metrics.COLLECTOR_CONNECTED.labels(host).set(1 if stats.connected else 0)
            for field in ("events_in", "events_out", "events_filtered", "events_malformed", "turns_emitted",
                          "backfills", "reconnects", "fetch_failures", "oversize_drops"):
                value = int(getattr(stats, field))
                delta = value - last.get((host, field), 0)
                if delta > 0:
                    metrics.COLLECTOR_EVENTS.labels(host, field).inc(delta)
                last[(host, field)] = value
        await asyncio.sleep(1.0)


@command("opencode")
def cmd_opencode(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from pipeline.clients.opencode import OpencodeClient

    host = cfg.host(args.host)
    client = OpencodeClient(host.base_url, host.password.reveal() if host.password else None,
                            allow_insecure_http=host.allow_insecure_http, model=host.model, agent=host.agent)

    async def run() -> dict[str, Any]:
        async with client:
            if args.action == "run-task":
                return dict(await client.run_task(args.prompt, title=args.title))
            return dict(await client.continue_session(args.session_id, args.prompt))

    result = asyncio.run(run())
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(f"session {result['session_id']}")
        print(result["reply"])
    return 0


@command("lag")
def cmd_lag(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from pipeline.cli import lag as lag_cli
    return lag_cli.run(args, cfg)


@command("dead")
def cmd_dead(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from pipeline.kafka import deadletters
    if args.action == "list":
        letters = asyncio.run(deadletters.read(cfg.kafka.bootstrap, args.topic))
        # the original bytes are session content (unscrubbed up to the scrub stage): shown only on request
        shown = [deadletters.shown(d, original=args.show_original) for d in letters]
        if args.json:
            rows = [r | {"_topic": d.topic, "_offset": d.offset} for d, r in zip(letters, shown, strict=True)]
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{len(letters)} dead letters")
        for d, r in zip(letters, shown, strict=True):
            target = deadletters.redrive_target(d.topic) or "(not redrivable)"
            print(f"{d.topic}[{d.partition}]@{d.offset}  {r.get('dead_id')}  stage={r.get('stage')}  "
                  f"reason={r.get('reason')}  -> {target}\n    {str(r.get('error'))[:200]}")
            if args.show_original:
                print(f"    original: {r.get('original')}")
        return 0
    if not args.topic or not (args.id or args.all):
        raise ConfigError("dead redrive needs --topic T and one of --id ID or --all", "--topic")
    done = asyncio.run(deadletters.redrive(cfg.kafka.bootstrap, args.topic, dead_id=args.id))
    for d in done:
        print(f"redrove {d.record.get('dead_id')} ({d.record.get('reason')}) -> {deadletters.redrive_target(d.topic)}")
    print(f"{len(done)} redriven")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    p.add_argument("--config", help="TOML config file (default: $PIPELINE_CONFIG, else built-in defaults)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="text for people (default), json for log shippers: one object a line")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("topics", help="create or list the topic table on the broker")
    t.add_argument("action", choices=["create", "list"])
    t.add_argument("--json", action="store_true")

    w = sub.add_parser("worker", help="run one stage (its own consumer group)")
    w.add_argument("stage")
    w.add_argument("--metrics-port", type=int, default=None)
    w.add_argument("--loglevel", default="warn", choices=["crit", "error", "warn", "info", "debug"])

    c = sub.add_parser("collect", help="attach to every configured opencode host and feed opencode.events")
    c.add_argument("--metrics-port", type=int, default=None)

    o = sub.add_parser("opencode", help="run a coding task on a configured opencode host")
    osub = o.add_subparsers(dest="action", required=True)
    rt = osub.add_parser("run-task", help="create a session, send the prompt, wait for the turn")
    rt.add_argument("--host", required=True)
    rt.add_argument("--title")
    rt.add_argument("--json", action="store_true")
    rt.add_argument("prompt")
    co = osub.add_parser("continue", help="send a prompt to an existing session")
    co.add_argument("--host", required=True)
    co.add_argument("--json", action="store_true")
    co.add_argument("session_id")
    co.add_argument("prompt")

    d = sub.add_parser("dead", help="inspect and redrive dead letters")
    d.add_argument("action", choices=["list", "redrive"])
    d.add_argument("--topic", help="one dead-letter topic (default: all of them)")
    d.add_argument("--id", help="redrive this dead letter")
    d.add_argument("--all", action="store_true", help="redrive every dead letter not redriven before")
    d.add_argument("--json", action="store_true")
    d.add_argument("--show-original", action="store_true",
                   help="list: include each letter's original bytes (session content, unscrubbed before scrub)")

    from pipeline.cli import lag as lag_cli
    lag_cli.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_command("pipeline", args, COMMANDS[args.command])


if __name__ == "__main__":
    sys.exit(main())
