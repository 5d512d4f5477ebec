"""Delivery at volume: the delivered rate against a rate-limited panel, and the time to drain a
backlog after an outage.

    python bench/backpressure.py [--limit 20] [--traces 600] [--fail-rate 0.01] [--outage-s 300] [--backlog 1000]

One fresh local broker; `sample`, `scrub`, `sign`, `breaker` and `deliver` as real worker
processes (devkit/local_stack.py's Stack) with the production defaults of `[breaker]`,
`[delivery]` and `[scrub]`, the stub scrubber, and the stub panel with a token bucket of
`--limit` requests a second (burst `--limit`; 429 with `retry_after_s` and Retry-After beyond it).

1. Rate: `--traces` snapshots produced at once, the panel also failing `--fail-rate` of its
   requests with a 503. Delivered rate = the panel's accepts between the 10th and 90th
   percentile of their accept times; target >= 90 % of `--limit`. Counted: 429s, 503s, breaker
   transitions (from delivery.outcomes), dead letters.
2. Outage: the panel answers 503 to everything for `--outage-s`; `--backlog` snapshots are
   produced as it begins (they wait, held at the breaker, scrubbed and signed); time to drain =
   from the end of the outage until the panel has accepted the whole backlog, against the least
   the rate limit allows (`--backlog / --limit`).
Writes bench/results/backpressure.md and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import loadavg, local_broker, md_table, publish, result_header
from bench.end_to_end import Panel, Snapshots, produce
from devkit.local_stack import Stack, StackSettings
from tests.kafka_util import read_to_end

STAGES = ("sample", "scrub", "sign", "breaker", "deliver")
TARGET_SHARE = 0.9


def transitions(bootstrap: str, endpoint: str) -> list[str]:
    records = asyncio.run(read_to_end(bootstrap, "delivery.outcomes"))
    outcomes = [json.loads(r.value) for r in records]
    return [f"{o['detail']['from']}->{o['detail']['to']}" for o in outcomes
            if o["status"] == "transition" and o["endpoint"] == endpoint]


def steady_rate(times: list[float]) -> float:
    times = sorted(times)
    lo, hi = round(0.1 * (len(times) - 1)), round(0.9 * (len(times) - 1))
    return (hi - lo) / (times[hi] - times[lo])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=20, help="the panel's rate limit, requests a second")
    parser.add_argument("--traces", type=int, default=600)
    parser.add_argument("--fail-rate", type=float, default=0.01)
    parser.add_argument("--outage-s", type=float, default=300.0)
    parser.add_argument("--backlog", type=int, default=1000)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    begun = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-backpressure-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        with local_broker(workdir) as broker:
            settings = StackSettings(bootstrap=broker.bootstrap, workdir=workdir, stages=STAGES, sampling_rate=1.0,
                                     panel_args=("--rate-limit", str(args.limit), "--rate-window-s", "1"))
            with Stack(settings).start() as stack:
                panel, snaps = Panel(stack.panel_url), Snapshots()
                asyncio.run(produce(broker.bootstrap, snaps.take(5), None))  # warm-up
                panel.wait_for(5, 180)
                panel.reset()

                load_before = loadavg()
                stack.panel_faults(fail_rate=args.fail_rate, status=503)
                began = time.time()
                asyncio.run(produce(broker.bootstrap, snaps.take(args.traces), None))
                panel.wait_for(args.traces, 60 + 5 * args.traces / args.limit)
                accepted = panel.accepted_at()
                rate, overall = steady_rate(list(accepted.values())), args.traces / (max(accepted.values()) - began)
                stats = stack.panel_stats()
                rate_transitions = transitions(broker.bootstrap, stack.panel_url)
                rate_load = f"{load_before} -> {loadavg()}"
                print(f"rate: {rate:.1f}/s steady, {overall:.1f}/s overall; {stats}", file=sys.stderr)

                panel.reset()
                stack.panel_faults(fail_for_s=args.outage_s, status=503)
                outage_end = time.time() + args.outage_s
                asyncio.run(produce(broker.bootstrap, snaps.take(args.backlog), None))
                panel.wait_for(args.backlog, args.outage_s + 120 + 5 * args.backlog / args.limit)
                drained = max(panel.accepted_at().values()) - outage_end
                outage_transitions = transitions(broker.bootstrap, stack.panel_url)[len(rate_transitions):]
                print(f"drained {args.backlog} in {drained:.1f} s after the outage", file=sys.stderr)
                panel.client.close()

    share = rate / args.limit
    lines = [
        *result_header("Delivery at volume: a rate-limited panel, and a backlog after an outage",
                       f"python bench/backpressure.py --limit {args.limit} --traces {args.traces} --fail-rate "
                       f"{args.fail_rate:g} --outage-s {args.outage_s:g} --backlog {args.backlog}"),
        "- method: one fresh local broker, sample, scrub, sign, breaker and deliver as real worker processes with "
        "the production defaults of [breaker], [delivery] and [scrub]; the stub panel rate-limits with a token "
        f"bucket of {args.limit} requests/s (429 with retry_after_s and Retry-After beyond it).",
        "",
    ]
    lines += md_table(
        ["measure", "result", "target", "detail"], "lrrl",
        [["delivered rate, steady (10th-90th pct of accepts)", f"{rate:.1f}/s ({share:.0%} of the limit)",
          f">= {TARGET_SHARE:.0%}", f"{args.traces} traces at once, {args.fail_rate:.0%} random 503s; overall "
          f"{overall:.1f}/s; 429s {stats['refused_by_error'].get('rate_limited', 0)}, 503s {stats['faulted']}; "
          f"breaker transitions: {', '.join(rate_transitions) or 'none'}; load {rate_load}"],
         ["time to drain the backlog after the outage", f"{drained:.1f} s",
          f"{args.backlog / args.limit:.0f} s at the limit",
          f"{args.backlog} traces produced as a {args.outage_s:g} s outage (503) began; breaker: "
          f"{', '.join(outage_transitions) or 'none'}"]])
    return publish("backpressure", "\n".join(lines) + "\n", begun)


if __name__ == "__main__":
    sys.exit(main())
