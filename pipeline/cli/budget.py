"""`pipeline budget`: the rater budget per site, as every sampler replica counts it.

It reads the last hour of sampler.shipped (one record per forward, every replica's) without a
consumer group, and shows per site the forwards of the rolling hour against `budgetPerHour`,
and which reasons may still forward (sample stops at half the budget, novelty at three
quarters, pair at 90 %, error_flag at all of it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from typing import Any

from pipeline.config import Config
from pipeline.errors import RecordError


def add_parser(sub: Any) -> None:
    from pipeline.cli.common import subcommand_options

    common = subcommand_options()
    p = sub.add_parser("budget", help="the rater budget per site: forwards in the last hour against budgetPerHour",
                       description=__doc__ + "\nExit 0 done, 1 the broker cannot be reached, 2 a usage or "
                       "configuration mistake.", formatter_class=argparse.RawDescriptionHelpFormatter,
                       parents=[common])
    p.set_defaults(usage_parser=p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="seconds to wait for the broker to answer before giving up (default 10)")


def run(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.cli.progress import waiting
    from pipeline.kafka.security import OPERATOR, kafka_access

    kafka = kafka_access(cfg, OPERATOR)
    with waiting(f"reading the last hour of sampler.shipped from Kafka at {kafka.bootstrap}"):
        result = asyncio.run(budget_use(cfg, kafka, int(time.time() * 1000), args.timeout))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    per_hour = result["per_hour"]
    print(f"budgetPerHour: {per_hour or 'none (0: every forward allowed)'}")
    print(f"{'site':<28} {'last hour':>9}  still forwarding")
    for site, use in result["sites"].items():
        print(f"{site:<28} {use['used']:>9,}  {', '.join(use['allows']) or 'nothing (budget spent)'}")
    if not result["sites"]:
        print("(no forwards in the last hour)")
    return 0


async def budget_use(cfg: Config, kafka: Any, now_ms: int, timeout_s: float) -> dict[str, Any]:
    from pipeline.kafka.history import Stored, read_between
    from pipeline.model.records import decode
    from pipeline.sampling.budget import HOUR_MS, SHARES, RaterBudget

    # counted as the sampler counts them, whatever the configured budget (0 would count nothing)
    budget = RaterBudget(max(cfg.budget_per_hour, 1))

    def count(stored: Stored) -> None:
        with contextlib.suppress(RecordError):
            budget.record(decode(stored.value, "sampler.shipped"))

    await read_between(kafka, "sampler.shipped", now_ms - HOUR_MS, None, count, timeout_s=timeout_s)
    limited = RaterBudget(cfg.budget_per_hour)
    sites = {}
    for site in budget.sites():
        used = budget.used(site, now_ms)
        allows = [r for r in SHARES if not limited.limited or used < limited.per_hour * SHARES[r]]
        sites[site] = {"used": used, "allows": allows}
    return {"per_hour": cfg.budget_per_hour, "sites": sites}
