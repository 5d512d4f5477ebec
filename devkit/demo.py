"""`pipeline-dev demo`: the whole pipeline on this machine, with a live view.

A fresh local Kafka broker, the topics, every stage as its own process, the collector, the
stub scrubber and panel, two real `opencode serve` daemons whose model is the scripted
loopback stub, and a workload of coding sessions driven through them. At the end (Ctrl-C or
`--duration`) it waits for the pipeline to drain, prints a summary that accounts for every
forwarded trace, and stops everything it started.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from devkit.kafka_local import LocalBroker, free_port
from devkit.local_stack import Stack, StackSettings, hosts_toml
from devkit.model_stub import ModelStub
from devkit.opencode_daemon import OpencodeDaemon
from pipeline.config import Config
from pipeline.kafka.admin import topic_partitions
from pipeline.kafka.lag import collect_lag
from pipeline.kafka.security import KafkaAccess, client_settings
from pipeline.topics import PIPELINE_STAGES, STAGES, dead_letter_topics

PROMPTS = [
    "explain the {a} module and how {b} uses it",
    "[[tool:bash:ls -la]] list the files then describe {a}",
    "[[tool:bash:echo {a} {b}]] echo the two words",
    "[[tool:read:missing-{a}.txt]] read the {a} notes",
    "write a short plan to refactor {a} into {b}",
    "[[error:400]] this request about {a} fails at the provider",
    "summarise the {a} {b} discussion for the team",
]
WORDS = """
parser cache scheduler router schema kafka sampler novelty scrubber panel rater breaker
config logger metrics tracer compiler linter bundler migrations auth billing search
""".split()


@dataclass
class Progress:
    turns: int = 0
    sessions: int = 0
    failures: int = 0
    outage_started: float | None = None
    outage_s: float = 0.0
    notes: list[str] = field(default_factory=list)


async def drive(daemons: list[OpencodeDaemon], progress: Progress, stop: asyncio.Event, seed: int = 7) -> None:
    """Two concurrent workers per host: new sessions of 1-3 turns, built from mixed prompts."""
    rng = random.Random(seed)

    async def worker(daemon: OpencodeDaemon) -> None:
        async with daemon.client() as client:
            while not stop.is_set():
                turns = rng.choice([1, 1, 2, 3])
                prompt = rng.choice(PROMPTS).format(a=rng.choice(WORDS), b=rng.choice(WORDS))
                try:
                    result = await client.run_task(prompt, title=prompt[:30])
                    progress.sessions += 1
                    progress.turns += 1
                    for _ in range(turns - 1):
                        if stop.is_set():
                            break
                        follow = rng.choice(PROMPTS).format(a=rng.choice(WORDS), b=rng.choice(WORDS))
                        await client.continue_session(result["session_id"], follow)
                        progress.turns += 1
                except Exception as exc:  # a failed turn is part of the show, not the end of it
                    progress.failures += 1
                    progress.notes.append(f"turn failed: {type(exc).__name__}")
                await asyncio.sleep(rng.uniform(0.2, 1.0))

    await asyncio.gather(*(worker(d) for d in daemons for _ in range(2)))


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return {}
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def topic_counts(kafka: KafkaAccess | str, topics: list[str]) -> dict[str, int]:
    consumer = AIOKafkaConsumer(**client_settings(kafka), group_id=None)
    await consumer.start()
    try:
        tps = await topic_partitions(consumer, topics)
        consumer.assign(tps)  # aiokafka 0.14's stop() raises CancelledError on a never-assigned consumer
        ends = await consumer.end_offsets(tps) if tps else {}
        begins = await consumer.beginning_offsets(tps) if tps else {}
        counts: Counter[str] = Counter()
        for tp in tps:
            counts[tp.topic] += ends[tp] - begins[tp]
        return dict(counts)
    finally:
        await consumer.stop()


async def read_values(kafka: KafkaAccess | str, topic: str) -> list[dict[str, Any]]:
    consumer = AIOKafkaConsumer(**client_settings(kafka), group_id=None, auto_offset_reset="earliest",
                                max_partition_fetch_bytes=16 * 1024 * 1024)
    await consumer.start()
    try:
        tps = await topic_partitions(consumer, [topic])
        if not tps:
            return []
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        out = []
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                out.extend(json.loads(m.value) for m in msgs)
        return out
    finally:
        await consumer.stop()


class Demo:
    def __init__(self, config: Config, duration_s: float | None, panel_outage_s: float | None,
                 console: Console | None = None, secure: bool = False) -> None:
        self.config, self.duration_s, self.panel_outage_s = config, duration_s, panel_outage_s
        self.secure = secure
        self.console = console or Console()
        self.workdir = Path(tempfile.mkdtemp(prefix="pipeline-demo-"))
        self.progress = Progress()
        self.started = time.monotonic()
        self.last_lag: Any = None

    def view(self, stack: Stack, counts: dict[str, int], lag: Any) -> Group:
        p = self.progress
        decisions: Counter[str] = Counter()
        for (name, labels), value in scrape(stack.metrics_port("sample")).items():
            if name == "pipeline_sampler_decisions_total":
                decisions[dict(labels)["reason"]] += int(value)
        breaker = "?"
        for (name, _labels), value in scrape(stack.metrics_port("breaker")).items():
            if name == "pipeline_breaker_state":
                breaker = {0: "closed", 1: "half-open", 2: "open"}.get(int(value), "?")
        try:
            panel = stack.panel_stats()
        except httpx.HTTPError:
            panel = {}
        dead = sum(counts.get(t, 0) for t in dead_letter_topics())
        elapsed = time.monotonic() - self.started
        of = f" / {self.duration_s:.0f}s" if self.duration_s else ""
        head = Table(title=f"pipeline demo  {elapsed:5.0f}s{of}", show_header=False)
        head.add_row("sessions / turns driven", f"{p.sessions} / {p.turns}  (failed calls: {p.failures})")
        head.add_row("events collected", str(counts.get("opencode.events", 0)))
        head.add_row("snapshots (sessions.idle)", str(counts.get("sessions.idle", 0)))
        head.add_row("decisions", ", ".join(f"{k}={v}" for k, v in sorted(decisions.items())) or "-")
        head.add_row("forwarded (traces.sampled)", str(counts.get("traces.sampled", 0)))
        head.add_row("delivered (panel accepted)", str(panel.get("accepted_traces", "?")))
        head.add_row("dead letters", str(dead))
        outage = ""
        if p.outage_started is not None:
            left = p.outage_s - (time.monotonic() - p.outage_started)
            outage = f"  [panel outage: {max(left, 0):.0f}s left]" if left > 0 else "  [panel recovered]"
        head.add_row("breaker", breaker + outage)
        lag_table = Table(title="consumer lag")
        for col in ("stage", "input", "lag", "rate/s"):
            lag_table.add_column(col)
        if lag is not None:
            for s in lag.stages:
                total = sum(max(part.end - (part.committed if part.committed is not None else part.start), 0)
                            for part in s.partitions)
                lag_table.add_row(s.stage, s.topic, str(total), f"{s.rate:.1f}" if s.rate is not None else "-")
        return Group(head, lag_table)

    async def loop(self, stack: Stack, daemons: list[OpencodeDaemon], bootstrap: KafkaAccess) -> None:
        stop = asyncio.Event()
        driver = asyncio.create_task(drive(daemons, self.progress, stop))
        watched = ["opencode.events", "sessions.idle", "traces.sampled", *dead_letter_topics()]
        stages = [STAGES[s] for s in PIPELINE_STAGES]
        outage_at = (self.duration_s or 120) / 4 if self.panel_outage_s else None
        with Live(console=self.console, refresh_per_second=2) as live:
            try:
                while self.duration_s is None or time.monotonic() - self.started < self.duration_s:
                    if outage_at is not None and time.monotonic() - self.started >= outage_at:
                        outage_at = None
                        stack.panel_faults(fail_for_s=self.panel_outage_s, status=503)
                        self.progress.outage_started, self.progress.outage_s = time.monotonic(), self.panel_outage_s
                    counts = await topic_counts(bootstrap, watched)
                    self.last_lag = await collect_lag(bootstrap, stages, previous=self.last_lag)
                    live.update(self.view(stack, counts, self.last_lag))
                    await asyncio.sleep(1.0)
            except asyncio.CancelledError:
                pass
            finally:
                stop.set()
                _, pending = await asyncio.wait([driver], timeout=30)
                for task in pending:  # a turn stuck in a daemon must not hold the demo open
                    task.cancel()
                self.console.print("workload stopped; waiting for the pipeline to drain ...")
                await self.drain(stack, bootstrap, live, watched, stages)

    async def drain(self, stack: Stack, bootstrap: KafkaAccess, live: Live, watched: list[str],
                    stages: list[Any]) -> None:
        """Wait until every forwarded trace is delivered or dead-lettered (bounded)."""
        deadline = time.monotonic() + 120 + (self.panel_outage_s or 0)
        while time.monotonic() < deadline:
            counts = await topic_counts(bootstrap, watched)
            self.last_lag = await collect_lag(bootstrap, stages, previous=self.last_lag)
            live.update(self.view(stack, counts, self.last_lag))
            summary = await self.account(stack, bootstrap)
            if summary["unexplained"] == 0 and (summary["forwarded"] > 0 or self.progress.turns == 0):
                return
            await asyncio.sleep(2.0)

    async def account(self, stack: Stack, bootstrap: KafkaAccess) -> dict[str, Any]:
        forwarded = {t["trace_id"] for t in await read_values(bootstrap, "traces.sampled")}
        accepted = {t["trace_id"] for t in stack.panel_accepted()}
        dead = {}
        for topic in dead_letter_topics():
            for d in await read_values(bootstrap, topic):
                dead[d.get("key") or d["dead_id"]] = d.get("reason")
        dead_traces = {tid for tid in forwarded if tid in dead}
        unexplained = forwarded - accepted - dead_traces
        outcomes: Counter[str] = Counter()
        for o in await read_values(bootstrap, "delivery.outcomes"):
            outcomes[o["status"] if o["status"] != "transition" else f"breaker->{o['detail'].get('to')}"] += 1
        return {"forwarded": len(forwarded), "delivered": len(forwarded & accepted),
                "dead_lettered": len(dead_traces), "dead_letters_total": len(dead),
                "unexplained": len(unexplained), "unexplained_ids": sorted(unexplained)[:10],
                "outcomes": dict(outcomes)}

    def run(self) -> int:
        for noisy in ("httpx", "aiokafka"):  # a line per request or metadata refresh drowns the view
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # --secure: SASL_SSL, a principal per stage and ACLs; the demo's own reader is the admin
        broker = LocalBroker("127.0.0.1", free_port(), free_port(), self.workdir / "kafka", self.config.cache_dir,
                             version=self.config.kafka.version, secure=self.secure)
        model = ModelStub()
        daemons: list[OpencodeDaemon] = []
        stack: Stack | None = None
        try:
            self.console.print(f"demo workdir: {self.workdir}")
            self.console.print("starting Kafka (KRaft) ...")
            broker.start()
            model.start()
            self.console.print("starting two opencode daemons ...")
            daemons = [OpencodeDaemon(self.workdir / "host-a", model.base_url).start(),
                       OpencodeDaemon(self.workdir / "host-b", model.base_url, password="demo-password").start()]
            hosts = hosts_toml(dict(zip(("host-a", "host-b"), daemons, strict=True)))
            # short breaker timings so an outage shows opening, holding and draining within minutes
            stack = Stack(StackSettings(
                bootstrap=broker.bootstrap, workdir=self.workdir / "stack", hosts_toml=hosts, sampling_rate=0.25,
                metrics=True, extra_env=broker.client_environment(),
                extra_toml="[breaker]\nfailure_window_s = 30\nopen_s = 15\n[delivery]\nretry_max_s = 5\n"))
            self.console.print("starting topics, stubs, 6 stages and the collector ...")
            stack.start(collector=True)
            try:
                asyncio.run(self.loop(stack, daemons, broker.access()))
            except KeyboardInterrupt:
                self.console.print("interrupted")
            summary = asyncio.run(self.account(stack, broker.access()))
            self.console.print(self.summary_table(summary))
            return 0 if summary["unexplained"] == 0 else 1
        finally:
            if stack is not None:
                stack.stop()
            for d in daemons:
                d.stop()
            model.stop()
            broker.stop()
            self.console.print(f"stopped everything; logs are in {self.workdir}")

    def summary_table(self, summary: dict[str, Any]) -> Table:
        t = Table(title="demo summary")
        t.add_column("what")
        t.add_column("count", justify="right")
        p = self.progress
        t.add_row("sessions driven", str(p.sessions))
        t.add_row("turns driven", str(p.turns))
        t.add_row("traces forwarded by the sampler", str(summary["forwarded"]))
        t.add_row("delivered to the panel", str(summary["delivered"]))
        t.add_row("dead-lettered (with a reason)", str(summary["dead_lettered"]))
        t.add_row("unexplained losses", str(summary["unexplained"]))
        for status, n in sorted(summary["outcomes"].items()):
            t.add_row(f"outcome records: {status}", str(n))
        return t


def run(config: Config, duration_s: float | None, panel_outage_s: float | None, secure: bool = False) -> int:
    return Demo(config, duration_s, panel_outage_s, secure=secure).run()
