"""Consumer-group lag per stage: how far each stage is behind its input topic, how fast it
reads, how long it needs to drain, and which stage is the bottleneck.

    pipeline lag                    one table; rates from two samples --interval seconds apart
    pipeline lag --interval 0       one sample at once, no rates (bottleneck by lag)
    pipeline lag --watch            a live table, refreshed every --interval seconds
    pipeline lag --json             the report as JSON (with --watch: one JSON object per line)
    pipeline lag --stage sign ...   only these stages
    pipeline lag --max-lag 10000 --max-drain-s 600
                                    a health check: exit 4 past either limit
    pipeline lag --serve --metrics-port 9100
                                    a lag exporter: /metrics with pipeline_consumer_lag for every
                                    stage, read every --interval seconds, whether or not any
                                    replica of the stage runs (a stage exports only its own);
                                    it connects as the `lag` role, the rest as `operator`

exit codes (one-shot, without --watch or --serve):
  0  every checked stage has a running member and is within --max-lag / --max-drain-s
  1  the broker cannot be reached, or a checked stage cannot be read (its input topic is
     missing, or its group's offsets could not be fetched)
  2  a usage or configuration mistake
  3  a checked stage has no running member (nothing consumes it); stderr names the stages
  4  a checked stage's lag is over --max-lag N, or its time to drain over --max-drain-s S
     (a stalled stage, lag and nothing read, is over any --max-drain-s); stderr names them
The lowest code that applies wins (1 before 3 before 4). The checked stages are those given
with --stage, else every deployed stage (all but passthrough, the wiring check, which is
shown but never deployed). --json carries the same verdict under "health".
"""

# Registered in pipeline/cli/main.py; also runnable alone as `python -m pipeline.cli.lag`.
# Only argparse is imported at module level so that building the `pipeline` parser stays cheap.

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import sys
from collections.abc import Sequence
from typing import Any

from pipeline.cli.common import subcommand_options
from pipeline.cli.errors import UsageError
from pipeline.config import Config

log = logging.getLogger("pipeline.lag")

DEFAULT_INTERVAL_S = 5.0  # faust commits every second, so 5 s spans several commits per group
DEFAULT_TIMEOUT_S = 10.0  # pipeline.kafka.admin.DEFAULT_TIMEOUT_S, without importing aiokafka here

EXIT_OK, EXIT_ERROR, EXIT_NO_MEMBERS, EXIT_OVER_LIMIT = 0, 1, 3, 4


def add_parser(sub: Any) -> None:
    """Add the `lag` subcommand to the `pipeline` subparsers."""
    p = sub.add_parser("lag", help="consumer-group lag per stage, consumption rate, time to drain, bottleneck",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       parents=[subcommand_options()])
    _add_options(p)
    p.set_defaults(usage_parser=p)


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0, got {text!r}")
    return value


def _add_options(p: argparse.ArgumentParser) -> None:
    from pipeline.topics import STAGES

    p.add_argument("--watch", action="store_true", help="refresh until interrupted (Ctrl-C; exits 0)")
    p.add_argument("--interval", type=_seconds, default=DEFAULT_INTERVAL_S, metavar="S",
                   help=f"seconds between the samples rates are measured over (default {DEFAULT_INTERVAL_S:g}; "
                        "0: a single sample at once, no rates)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--stage", action="append", metavar="NAME", choices=list(STAGES),
                   help=f"only this stage, shown and checked (repeatable; one of {', '.join(STAGES)}; default: "
                        "all shown, all but passthrough checked; with --serve: all but passthrough)")
    p.add_argument("--max-lag", type=_count, default=None, metavar="N",
                   help="health check: exit 4 when a checked stage's lag is over N records")
    p.add_argument("--max-drain-s", type=_seconds, default=None, metavar="S",
                   help="health check: exit 4 when a checked stage needs over S seconds to drain its lag "
                        "(needs rates: not with --interval 0)")
    p.add_argument("--timeout", type=_positive_seconds, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help=f"seconds to wait for the broker to answer before giving up (default {DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--serve", action="store_true",
                   help="run as a Prometheus exporter of every stage's lag until interrupted")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="--serve: the /metrics port (default: [metrics] port)")


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Run `pipeline lag`; the exit code is the health verdict (module docstring). Broker
    failures raise BrokerError (the CLI prints it, exit 1)."""
    from pipeline.kafka.security import OPERATOR
    from pipeline.topics import PIPELINE_STAGES, STAGES

    if args.watch and args.interval == 0:
        raise UsageError("--watch needs --interval S > 0")
    limits = args.max_lag is not None or args.max_drain_s is not None
    if limits and (args.watch or args.serve):
        raise UsageError("--max-lag and --max-drain-s are for a one-shot check, not with --watch or --serve")
    if args.max_drain_s is not None and args.interval == 0:
        raise UsageError("--max-drain-s needs rates: an --interval S > 0 (two samples S seconds apart)")
    if args.serve:
        return _serve(args, cfg)
    stages = [STAGES[s] for s in args.stage] if args.stage else list(STAGES.values())
    try:
        if args.watch:
            asyncio.run(_watch(_access(cfg, OPERATOR), stages, args.interval, args.json, args.timeout))
            return EXIT_OK
        report = asyncio.run(_once(_access(cfg, OPERATOR), stages, args.interval, args.timeout))
    except KeyboardInterrupt:
        return EXIT_OK  # Ctrl-C is how --watch ends
    from pipeline.kafka.lag import render_table, to_json

    checked = list(args.stage) if args.stage else [s for s in PIPELINE_STAGES if s in STAGES]
    verdict = health(report, checked, args.max_lag, args.max_drain_s)
    if args.json:
        print(json.dumps(to_json(report) | {"health": verdict}, indent=2))
    else:
        _console().print(render_table(report))
    for line in verdict["problems"]:
        print(f"pipeline lag: {line}", file=sys.stderr)
    return int(verdict["exit_code"])


def health(report: Any, checked: Sequence[str], max_lag: int | None, max_drain_s: float | None) -> dict[str, Any]:
    """The verdict a health check acts on: which checked stages cannot be read, have no
    running member, or are past a limit; the exit code (module docstring) and one line per
    finding. Pure, so the rules are tested without a broker."""
    by_name = {s.stage: s for s in report.stages}
    stages = [by_name[name] for name in checked if name in by_name]
    unreadable = {s.stage: s.error or f"input topic {s.topic} does not exist (pipeline topics create)"
                  for s in stages if s.error or not s.topic_exists}
    readable = [s for s in stages if s.stage not in unreadable]
    no_members = [s.stage for s in readable if not s.members]
    over_lag = [s.stage for s in readable if max_lag is not None and s.lag > max_lag]
    over_drain = [s.stage for s in readable
                  if max_drain_s is not None and s.drain_s is not None and s.drain_s > max_drain_s]
    problems = [f"cannot read stage {name}: {why}" for name, why in unreadable.items()]
    if no_members:
        problems.append(f"no running member in stage(s): {', '.join(no_members)} (nothing consumes their input)")
    if over_lag:
        problems.append("lag over --max-lag {}: {}".format(
            max_lag, ", ".join(f"{n} ({by_name[n].lag})" for n in over_lag)))
    if over_drain:
        problems.append("time to drain over --max-drain-s {:g}: {}".format(
            max_drain_s, ", ".join(f"{n} ({_drain(by_name[n].drain_s)})" for n in over_drain)))
    code = (EXIT_ERROR if unreadable else EXIT_NO_MEMBERS if no_members
            else EXIT_OVER_LIMIT if over_lag or over_drain else EXIT_OK)
    return {"exit_code": code, "checked": [s.stage for s in stages], "unreadable": sorted(unreadable),
            "no_members": no_members, "over_max_lag": over_lag, "over_max_drain": over_drain,
            "max_lag": max_lag, "max_drain_s": max_drain_s, "problems": problems}


def _drain(seconds: float | None) -> str:
    return "stalled" if seconds is not None and math.isinf(seconds) else f"{seconds or 0:.0f}s"


def _serve(args: argparse.Namespace, cfg: Config) -> int:
    """`--serve`: /metrics from the start, then the export loop until interrupted.

    The stages export their own group's lag, so a stage with every replica down (or never
    started) reports none; this exporter runs outside the stages and reports every one, with
    the group's member count. Both export the same series under the same names: Prometheus
    tells them apart by the scrape job, and `max by (stage, topic, partition)` merges them.
    A broker that is down is reported (`pipeline_lag_export_ok` 0), never fatal.
    """
    from pipeline import metrics
    from pipeline.kafka.lag import export_stages_forever
    from pipeline.kafka.security import LAG
    from pipeline.topics import PIPELINE_STAGES, STAGES

    if args.watch or args.json:
        raise UsageError("--serve: not with --watch or --json")
    if args.interval <= 0:
        raise UsageError("--interval: expected seconds > 0 with --serve")
    port = args.metrics_port if args.metrics_port is not None else cfg.metrics.port
    if not 0 < port <= 65535:
        raise UsageError("--serve needs a port: --metrics-port PORT (1..65535) or [metrics] port")
    # Not passthrough by default: it is a wiring check, never deployed, and its group would
    # show the whole of opencode.events as lag with no members.
    stages = [STAGES[s] for s in args.stage or PIPELINE_STAGES]
    metrics.serve(port, cfg.metrics.host)
    log.info("serving lag of %s on %s:%d/metrics, every %gs", ", ".join(s.name for s in stages),
             cfg.metrics.host, port, args.interval)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C or SIGINT is how it ends
        asyncio.run(export_stages_forever(_access(cfg, LAG), stages, args.interval, name="lag exporter",
                                          request_timeout_ms=int(args.timeout * 1000)))
    return 0


async def _countdown(seconds: float, say: Any, text: str) -> None:
    """Sleep `seconds`, telling the spinner how many are left."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while (left := end - loop.time()) > 0:
        say(f"{text}: {math.ceil(left)}s left (--interval 0 skips this)")
        await asyncio.sleep(min(left, 0.5))


def _access(cfg: Any, role: str) -> Any:
    """`pipeline lag` reads offsets as the `operator` (whoever runs it at a shell); the exporter
    (`--serve`), a service that runs for ever, as `lag`, which may describe groups and topics only."""
    from pipeline.kafka.security import kafka_access

    return kafka_access(cfg, role)


async def _once(kafka: Any, stages: list[Any], interval_s: float, timeout_s: float) -> Any:
    """One report; with `interval_s`, rates from a second sample that long after the first."""
    from pipeline.cli.progress import waiting
    from pipeline.kafka.lag import LagCollector, with_rates

    bootstrap = kafka.bootstrap
    with waiting(f"connecting to Kafka at {bootstrap} (up to {timeout_s:g}s)") as say:
        async with LagCollector(kafka, request_timeout_ms=int(timeout_s * 1000)) as collector:
            say(f"reading consumer-group offsets from {bootstrap}")
            first = await collector.sample(stages)
            if not interval_s:
                return first
            await _countdown(interval_s, say, "measuring read rates: second sample")
            say(f"reading consumer-group offsets from {bootstrap} again")
            return with_rates(await collector.sample(stages), first)


async def _watch(kafka: Any, stages: list[Any], interval_s: float, as_json: bool, timeout_s: float) -> None:
    from pipeline.cli.progress import waiting
    from pipeline.kafka.lag import LagCollector

    bootstrap = kafka.bootstrap
    collector = LagCollector(kafka, request_timeout_ms=int(timeout_s * 1000))
    try:
        with waiting(f"connecting to Kafka at {bootstrap} (up to {timeout_s:g}s)") as say:
            await collector.start()
            say(f"reading consumer-group offsets from {bootstrap}")
            report = await collector.sample(stages)
        await _refresh(collector, stages, report, interval_s, as_json)
    finally:
        await collector.close()


async def _refresh(collector: Any, stages: list[Any], report: Any, interval_s: float, as_json: bool) -> None:
    """--watch after its first sample: a frame every `interval_s` until interrupted."""
    from rich.live import Live

    from pipeline.kafka.lag import render_table, to_json, with_rates

    if as_json:
        # One object per line (NDJSON), flushed, so `| jq` or a log shipper sees each at once.
        while True:
            print(json.dumps(to_json(report)), flush=True)
            await asyncio.sleep(interval_s)
            report = with_rates(await collector.sample(stages), report)
    console = _console()
    if not console.is_terminal:
        # Live only shows its last frame on a file or pipe: print every frame instead,
        # so `pipeline lag --watch > lag.log` keeps the history.
        while True:
            console.print(render_table(report))
            console.file.flush()
            await asyncio.sleep(interval_s)
            report = with_rates(await collector.sample(stages), report)
    # The first frame has no rates; each later one measures since the frame before.
    with Live(render_table(report), console=console, auto_refresh=False) as live:
        while True:
            await asyncio.sleep(interval_s)
            report = with_rates(await collector.sample(stages), report)
            live.update(render_table(report), refresh=True)


def _console() -> Any:
    from rich.console import Console

    console = Console()
    # Piped output has no terminal width; rich would squeeze the table into 80 columns.
    return console if console.is_terminal else Console(width=200)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m pipeline.cli.lag [--config F] [lag options]`: the same command without the rest of the CLI."""
    from pipeline.cli.common import add_global_options
    from pipeline.cli.errors import run_command

    p = argparse.ArgumentParser(prog="python -m pipeline.cli.lag", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_global_options(p)
    _add_options(p)
    p.set_defaults(usage_parser=p)
    return run_command("pipeline lag", p.parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
