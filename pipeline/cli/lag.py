"""`pipeline lag`: consumer-group lag per stage, its rate, time to drain and the bottleneck.

    pipeline lag                    one table; rates from two samples --interval apart
    pipeline lag --interval 0       one sample at once, no rates (bottleneck by lag)
    pipeline lag --watch            a live table, refreshed every --interval seconds
    pipeline lag --json             the report as JSON (with --watch: one JSON object per line)
    pipeline lag --stage sign ...   only these stages
    pipeline lag --serve --metrics-port 9100
                                    a lag exporter: /metrics with pipeline_consumer_lag for every
                                    stage, read every --interval seconds, whether or not any
                                    replica of the stage runs (a stage exports only its own)

Registered in pipeline/cli/main.py; also runnable alone as `python -m pipeline.cli.lag`.
Only argparse is imported at module level so that building the `pipeline` parser stays cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pipeline.config import Config
from pipeline.errors import ConfigError

log = logging.getLogger("pipeline.lag")

DEFAULT_INTERVAL_S = 5.0  # faust commits every second, so 5 s spans several commits per group


def add_parser(sub: Any) -> None:
    """Add the `lag` subcommand to the `pipeline` subparsers."""
    p = sub.add_parser("lag", help="consumer-group lag per stage, consumption rate, time to drain, bottleneck",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_options(p)


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--watch", action="store_true", help="refresh until interrupted")
    p.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S, metavar="S",
                   help=f"seconds between the samples rates are measured over (default {DEFAULT_INTERVAL_S:g}; "
                        "0: a single sample, no rates)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--stage", action="append", metavar="NAME",
                   help="only this stage (repeatable; default: all, with --serve: the deployed stages)")
    p.add_argument("--serve", action="store_true",
                   help="run as a Prometheus exporter of every stage's lag until interrupted")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="--serve: the /metrics port (default: [metrics] port)")


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Run `pipeline lag`. Broker failures raise BrokerError (the CLI prints it, exit 1)."""
    from pipeline.topics import STAGES

    if args.interval < 0 or (args.watch and args.interval == 0):
        raise ConfigError("--interval: expected seconds > 0 (>= 0 without --watch)", "--interval")
    unknown = [s for s in args.stage or [] if s not in STAGES]
    if unknown:
        raise ConfigError(f"--stage: unknown stage {unknown[0]!r} (stages: {', '.join(STAGES)})", "--stage")
    if args.serve:
        return _serve(args, cfg)
    stages = [STAGES[s] for s in args.stage] if args.stage else list(STAGES.values())
    try:
        if args.watch:
            asyncio.run(_watch(cfg.kafka.bootstrap, stages, args.interval, args.json))
        else:
            asyncio.run(_once(cfg.kafka.bootstrap, stages, args.interval, args.json))
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how --watch ends
    return 0


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
    from pipeline.topics import PIPELINE_STAGES, STAGES

    if args.watch or args.json:
        raise ConfigError("--serve: not with --watch or --json", "--serve")
    if args.interval <= 0:
        raise ConfigError("--interval: expected seconds > 0 with --serve", "--interval")
    port = args.metrics_port if args.metrics_port is not None else cfg.metrics.port
    if not 0 < port <= 65535:
        raise ConfigError("--serve needs a port: --metrics-port PORT or [metrics] port", "--metrics-port")
    # Not passthrough by default: it is a wiring check, never deployed, and its group would
    # show the whole of opencode.events as lag with no members.
    stages = [STAGES[s] for s in args.stage or PIPELINE_STAGES]
    metrics.serve(port, cfg.metrics.host)
    log.info("serving lag of %s on %s:%d/metrics, every %gs", ", ".join(s.name for s in stages),
             cfg.metrics.host, port, args.interval)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C or SIGINT is how it ends
        asyncio.run(export_stages_forever(cfg.kafka.bootstrap, stages, args.interval, name="lag exporter"))
    return 0


async def _once(bootstrap: str, stages: list[Any], interval_s: float, as_json: bool) -> None:
    from pipeline.kafka.lag import collect_lag, render_table, to_json

    report = await collect_lag(bootstrap, stages, interval_s=interval_s or None)
    if as_json:
        print(json.dumps(to_json(report), indent=2))
    else:
        _console().print(render_table(report))


async def _watch(bootstrap: str, stages: list[Any], interval_s: float, as_json: bool) -> None:
    from rich.live import Live

    from pipeline.kafka.lag import LagCollector, render_table, to_json, with_rates

    async with LagCollector(bootstrap) as collector:
        report = await collector.sample(stages)
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
    from pipeline.cli.errors import run_command

    p = argparse.ArgumentParser(prog="python -m pipeline.cli.lag", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML config file (default: $PIPELINE_CONFIG, else built-in defaults)")
    p.add_argument("--log-format", choices=["text", "json"], default="text", help="log lines (default: text)")
    p.add_argument("-v", "--verbose", action="store_true")
    _add_options(p)
    return run_command("pipeline lag", p.parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
