"""`pipeline replay`: re-decide recorded turns under a policy, to tune it on real traffic before
changing production, or to send what a new policy picks from history.

It reads sessions.idle between --from and --to and decides every turn with the sampling policy
of the configuration it runs with (`--config OTHER.toml`: a copy of production's with other
samplingRate, noveltyThreshold, lruSize, ...), starting from production's novelty window as it
stood at --from (sampler.shipped before it). It compares what that policy forwards with what was
forwarded when the turns happened (traces.sampled), per site and reason.

--dry-run prints the comparison and sends nothing. Without it, every trace the policy forwards
goes to traces.sampled, and from there through scrub, sign, breaker and deliver like any other;
trace ids are stable, so a turn the panel already has is upserted, not added twice. Replayed
traces say so in their decision's detail (`replayed: ...`), and later replays do not count them
as forwarded before. The novelty window of the live sample stage does not learn them.

It reads without a consumer group and commits nothing, so it runs beside the live pipeline. It
connects as the `replay` role (`KAFKA_SASL_PASSWORD_REPLAY` on a secured broker), whose ACLs
read sessions.idle, sampler.shipped and traces.sampled and write traces.sampled.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import re
import time
from collections.abc import Mapping
from typing import Any

from pipeline.config import Config
from pipeline.errors import RecordError

REPLAYED = "replayed: "
_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_instant(text: str, now_s: float) -> int:
    """Epoch ms of `text`: an ISO 8601 time (`2026-11-29`, `2026-11-29T08:00:00Z`; no zone means
    UTC) or a time ago (`90m`, `36h`, `7d`). ValueError names what is wrong."""
    text = text.strip()
    ago = _AGO.match(text)
    if ago:
        return int((now_s - float(ago.group(1)) * _UNIT_S[ago.group(2)]) * 1000)
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"expected an ISO 8601 time (2026-11-29T08:00:00Z) or a time ago (90m, 36h, 7d), "
                         f"got {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return int(when.timestamp() * 1000)


def _instant(text: str) -> int:
    try:
        return parse_instant(text, time.time())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(sub: Any) -> None:
    """Add the `replay` subcommand to the `pipeline` subparsers."""
    from pipeline.cli.common import subcommand_options

    common = subcommand_options()
    p = sub.add_parser("replay", help="re-decide recorded turns under this configuration's sampling policy",
                       description=__doc__ + "\nExit 0 done, 1 the broker cannot be reached, 2 a usage or "
                       "configuration mistake.", formatter_class=argparse.RawDescriptionHelpFormatter,
                       parents=[common])
    p.set_defaults(usage_parser=p)
    p.add_argument("--from", dest="from_ms", type=_instant, required=True, metavar="TIME",
                   help="the window's start: ISO 8601 (UTC unless it says) or a time ago (7d, 36h, 90m)")
    p.add_argument("--to", dest="to_ms", type=_instant, default=None, metavar="TIME",
                   help="the window's end (default: now)")
    p.add_argument("--dry-run", action="store_true", help="compare only; send nothing")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="seconds to wait for the broker to answer before giving up (default 10)")


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Run `pipeline replay`; broker failures raise BrokerError (the CLI prints it, exit 1)."""
    from pipeline.cli.errors import UsageError
    from pipeline.cli.progress import waiting
    from pipeline.kafka.security import REPLAY, kafka_access

    if args.to_ms is not None and args.to_ms <= args.from_ms:
        raise UsageError("--to must be later than --from")
    kafka = kafka_access(cfg, REPLAY)  # its own principal: it reads unscrubbed history
    with waiting(f"replaying sessions.idle from Kafka at {kafka.bootstrap}") as say:
        result = asyncio.run(replay(cfg, kafka, args.from_ms, args.to_ms, send=not args.dry_run,
                                    timeout_s=args.timeout, say=say))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render(result))
    return 0


async def replay(cfg: Config, kafka: Any, from_ms: int, to_ms: int | None, *, send: bool, timeout_s: float,
                 say: Any = None) -> dict[str, Any]:
    """The comparison, as `--json` prints it; with `send`, the forwarded traces are on traces.sampled."""
    from aiokafka import AIOKafkaProducer

    from pipeline.kafka.admin import start_client
    from pipeline.kafka.history import RecordReader, Stored, read_between
    from pipeline.kafka.security import client_settings
    from pipeline.model.records import decode, encode, validate_for_topic
    from pipeline.sampling.replay import Replay

    def show(what: str) -> Any:
        return (lambda done, total: say(f"{what}: {done:,} of {total:,} records")) if say else None

    job = Replay(cfg)
    skipped: dict[str, int] = {}

    def unusable(topic: str, exc: Exception) -> None:
        skipped[topic] = skipped.get(topic, 0) + 1

    def seed(stored: Stored) -> None:
        try:
            job.seed(decode(stored.value, "sampler.shipped"))
        except (RecordError, ValueError) as exc:
            unusable("sampler.shipped", exc)

    await read_between(kafka, "sampler.shipped", None, from_ms, seed, progress=show("novelty window at --from"),
                       timeout_s=timeout_s)
    recorded: list[dict[str, Any]] = []

    def record(stored: Stored) -> None:
        try:
            trace = decode(stored.value, "traces.sampled")
        except RecordError as exc:
            unusable("traces.sampled", exc)
            return
        if not str(trace["decision"].get("detail", "")).startswith(REPLAYED):
            recorded.append({"trace_id": trace["trace_id"], "decision": {"reason": trace["decision"]["reason"]}})

    await read_between(kafka, "traces.sampled", from_ms, None, record, progress=show("what was forwarded"),
                       timeout_s=timeout_s)
    outgoing: list[tuple[bytes | None, bytes]] = []
    now_ms = int(time.time() * 1000)

    partners = RecordReader(kafka, "sessions.idle", timeout_s)

    async def decide(stored: Stored) -> None:
        try:
            snapshot = decode(stored.value, "sessions.idle")
        except RecordError as exc:
            unusable("sessions.idle", exc)
            return
        for forwarded in await job.decide(snapshot, stored.partition, stored.offset, partners.read, now_ms):
            if not send:
                continue
            trace = forwarded.trace
            trace["decision"]["detail"] = (REPLAYED + trace["decision"]["detail"])[:500]
            validate_for_topic("traces.sampled", trace)
            outgoing.append((f"{trace['host']}:{trace['session_id']}".encode(), encode(trace)))

    # in time order across partitions, as close as a replay gets to the order the turns were decided in
    try:
        read = await read_between(kafka, "sessions.idle", from_ms, to_ms, decide,
                                  progress=show("re-deciding turns"), in_time_order=True, timeout_s=timeout_s)
    finally:
        await partners.close()
    sent = 0
    if outgoing:
        producer = AIOKafkaProducer(**client_settings(kafka), acks="all", enable_idempotence=True,
                                    max_request_size=16 * 1024 * 1024, request_timeout_ms=int(timeout_s * 1000))
        await start_client(producer, kafka, timeout_s)
        try:
            futures = [await producer.send("traces.sampled", value, key=key) for key, value in outgoing]
            for future in futures:
                await future
                sent += 1
                if say and sent % 100 == 0:
                    say(f"sending to traces.sampled: {sent:,} of {len(outgoing):,}")
        finally:
            await producer.stop()
    sites = job.report(recorded)
    return {"from": _iso(from_ms), "to": _iso(to_ms) if to_ms is not None else None, "records_read": read,
            "turns": job.turns, "sent": sent, "dry_run": not send, "unusable_records": skipped,
            "sites": {site: tally.to_dict() for site, tally in sites.items()}}


def _iso(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).isoformat(timespec="seconds")


def render(result: Mapping[str, Any]) -> str:
    """The comparison as a text table: per site and reason, forwarded now against before."""
    lines = [f"replayed {result['turns']:,} turns ({result['records_read']:,} records) of sessions.idle from "
             f"{result['from']} to {result['to'] or 'now'}" + (" (dry run: nothing sent)" if result["dry_run"]
                                                               else f"; sent {result['sent']:,} to traces.sampled")]
    header = f"{'site':<24} {'reason':<12} {'now':>7} {'before':>7}"
    lines += ["", header, "-" * len(header)]
    for site, tally in result["sites"].items():
        reasons = sorted(set(tally["now"]) | set(tally["before"]))
        for reason in reasons:
            lines.append(f"{site:<24} {reason:<12} {tally['now'].get(reason, 0):>7,} "
                         f"{tally['before'].get(reason, 0):>7,}")
        lines.append(f"{site:<24} {'all':<12} {tally['forwarded_now']:>7,} {tally['forwarded_before']:>7,}   "
                     f"of {tally['turns']:,} turns; both {tally['both']:,}, only now {tally['only_now']:,}, "
                     f"only before {tally['only_before']:,}")
    if not result["sites"]:
        lines.append("(no turns in the window)")
    for topic, n in result["unusable_records"].items():
        lines.append(f"warning: {n} unusable record(s) on {topic} skipped")
    return "\n".join(lines)
