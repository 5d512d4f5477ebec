"""The collector into a real Kafka sink: 1, 10 and 100 simulated opencode hosts, or replica processes.

1, 10 and 100 hosts in one in-process collector; or (`--replicas`) 1, 2 and 4 collector replica
processes sharing 100 and 400 of them.

    python bench/collector.py [--hosts 1,10,100] [--rate 1500] [--seconds 20]
    python bench/collector.py --replicas 1,2,4 [--hosts 100,400] [--rate 1500] [--seconds 20]

One fresh local broker. A separate process serves N fake `opencode serve` daemons (aiohttp,
one port each): `/global/event` streams SSE frames at a steady rate (`--rate` frames/s in
total, split evenly between the hosts), and `/session`, `/session/status`, `/session/{id}`,
`/session/{id}/message` answer as opencode 1.18 does. Per turn of a session a daemon sends 28
frames, as a real turn does: busy status, the user message, 20 `message.part.delta` frames
(dropped by the collector's filter, as in production), three assistant `message.updated`,
`session.updated`, idle status and `session.idle`; the idle makes the collector fetch the
session's 26-message listing (`messages(sid, turns=13)` shape, growing by one turn per idle)
and produce a `pipeline.turn_ended`. Five sessions per host take turns. The collector state
files are pre-written as if the turn before had been reported, so no backfill storm at start.

The collector (`Collector` + `KafkaEventSink`, as `pipeline collect` runs them) is its own
process: after a 5 s warm-up its counters are sampled over `--seconds`; events/s = frames read
from the daemons, records/s = records the sink had acknowledged by Kafka. Peak RSS is the
collector process's VmHWM, its CPU the process's user + system time over the window.

`--replicas`: for each host count and replica count, that many `python -m pipeline.collector.service`
processes (what `pipeline collect` runs) with a group, host table, state topic and events topic of
their own on the same broker, sharing the hosts through the consumer group. Once every host is
followed by exactly one replica (their logs say which) and 5 s have passed, over `--seconds`:
records/s into Kafka = the growth of the events topic's end offsets (all replicas together), turns
ended at the daemons, and each replica's CPU (user + system from /proc/<pid>/stat) and peak RSS
(VmHWM from /proc/<pid>/status).

Writes its section of bench/results/collector.md (keeping the other mode's) and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    REPO,
    RESULTS,
    EndOffsets,
    cpu_seconds,
    load_is_high,
    loadavg,
    local_broker,
    md_table,
    publish,
    result_header,
    stop_process,
    wait_for_calm,
)
from pipeline.collector.state import state_file
from pipeline.collector.turns import completed_turns
from pipeline.kafka.security import client_settings
from pipeline.model.snapshot import snapshot_id
from tests.factory import messages

SESSIONS_PER_HOST = 5
FIRST_TURNS = 12  # turns already reported when the run starts
DELTAS_PER_TURN = 20
FRAMES_PER_TURN = DELTAS_PER_TURN + 8
MAX_MESSAGES = 25
T0_MS = 1795236913836


def host_name(h: int) -> str:
    return f"bench-host-{h:03d}"


def sid_of(h: int, s: int) -> str:
    return f"ses_bh{h:03d}s{s}"


def seed_of(h: int, s: int) -> int:
    return h * SESSIONS_PER_HOST + s


def listing(h: int, s: int, turns: int) -> list[dict[str, Any]]:
    return messages(sid_of(h, s), turns=turns, seed=seed_of(h, s))


# ---------------------------------------------------------------- the fake daemons (own process)


class FakeHost:
    """One fake `opencode serve`: its sessions, their turn counters, its event stream."""

    def __init__(self, h: int, rate: float) -> None:
        self.h, self.rate = h, rate
        self.turns = {sid_of(h, s): FIRST_TURNS for s in range(SESSIONS_PER_HOST)}
        self.ids = itertools.count()
        self.paused = False

    def frame(self, kind: str, props: dict[str, Any]) -> bytes:
        body = {"directory": "/home/dev/project", "project": "global",
                "payload": {"id": f"evt_{self.h:03d}{next(self.ids):09d}", "type": kind, "properties": props}}
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    def turn_frames(self, s: int) -> list[bytes]:
        """One turn's frames; the listing grows by the turn as its last frame is sent."""
        sid = sid_of(self.h, s)
        msgs = listing(self.h, s, self.turns[sid] + 1)
        user, assistant = msgs[-2]["info"], msgs[-1]["info"]
        started = {k: v for k, v in assistant.items() if k != "finish"} | {"time": {"created": 1}}
        frames = [self.frame("session.status", {"sessionID": sid, "status": {"type": "busy"}}),
                  self.frame("message.updated", {"info": user})]
        frames += [self.frame("message.part.delta", {"sessionID": sid, "messageID": assistant["id"],
                                                     "partID": "prt_x", "field": "text", "delta": "token "})
                   for _ in range(DELTAS_PER_TURN)]
        frames += [self.frame("message.updated", {"info": started}), self.frame("message.updated", {"info": started}),
                   self.frame("message.updated", {"info": assistant}),
                   self.frame("session.updated", {"info": self.session(sid)}),
                   self.frame("session.status", {"sessionID": sid, "status": {"type": "idle"}}),
                   self.frame("session.idle", {"sessionID": sid})]
        return frames

    def session(self, sid: str) -> dict[str, Any]:
        return {"id": sid, "slug": "s", "projectID": "global", "directory": "/home/dev/project",
                "title": f"bench {sid}", "version": "1.18.33",
                "time": {"created": T0_MS, "updated": T0_MS + self.turns[sid]}}

    async def events(self, request: Any) -> Any:
        from aiohttp import web

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(self.frame("server.connected", {}))
        loop = asyncio.get_running_loop()
        start, sent = loop.time(), 0
        order = itertools.cycle(range(SESSIONS_PER_HOST))
        pending: list[bytes] = []
        sid = ""
        try:
            while True:
                due = int((loop.time() - start) * self.rate) - sent
                chunk: list[bytes] = []
                if self.paused and not pending:  # between turns: only a heartbeat now and then
                    start, sent, due = loop.time(), 0, 0
                    if next(self.ids) % 100 == 0:
                        chunk.append(self.frame("server.heartbeat", {}))
                while len(chunk) < due:
                    if not pending:
                        s = next(order)
                        pending = self.turn_frames(s)
                        sid = sid_of(self.h, s)
                    chunk.append(pending.pop(0))
                    if not pending:
                        self.turns[sid] += 1  # the idle is out: the listing has the new turn
                if chunk:
                    await response.write(b"".join(chunk))
                    sent += len(chunk)
                # every 20 ms, or about once a frame for a slow host: 400 hosts waking 50 times a second
                # would cost the daemons' process more CPU than the frames
                await asyncio.sleep(max(0.02, min(0.25, 1.0 / self.rate)))
        except (ConnectionResetError, RuntimeError, asyncio.CancelledError):
            pass
        return response

    def routes(self) -> Any:
        from aiohttp import web

        async def sessions(request: web.Request) -> web.Response:
            # as opencode lists them, newest first: a reconcile skips what the state says is reported,
            # and finds the turns whose idle a collector killed mid-turn never read
            infos = sorted((self.session(sid) for sid in self.turns), key=lambda i: -i["time"]["updated"])
            return web.json_response(infos)

        async def turns(request: web.Request) -> web.Response:
            return web.json_response(self.turns)

        async def pause(request: web.Request) -> web.Response:
            self.paused = request.query.get("on", "1") == "1"
            return web.json_response({"paused": self.paused})

        async def status(request: web.Request) -> web.Response:
            return web.json_response({})

        async def session(request: web.Request) -> web.Response:
            sid = request.match_info["id"]
            if sid not in self.turns:
                return web.json_response({"name": "NotFound"}, status=404)
            return web.json_response(self.session(sid))

        async def listing_route(request: web.Request) -> web.Response:
            sid = request.match_info["id"]
            if sid not in self.turns:
                return web.json_response({"name": "NotFound"}, status=404)
            limit = int(request.query.get("limit", "1000"))
            s = int(sid[-1])
            return web.json_response(listing(self.h, s, self.turns[sid])[-limit:])

        app = web.Application()
        app.router.add_get("/global/event", self.events)
        app.router.add_get("/session", sessions)
        app.router.add_get("/session/status", status)
        app.router.add_get("/session/{id}", session)
        app.router.add_get("/session/{id}/message", listing_route)
        app.router.add_get("/bench/turns", turns)  # the tests' view: turns ended per session
        app.router.add_post("/bench/pause", pause)  # no more turns (heartbeats only) until resumed
        return app


async def serve_daemons(hosts: int, rate: float, port_file: Path) -> None:
    from aiohttp import web

    ports = []
    for h in range(hosts):
        runner = web.AppRunner(FakeHost(h, rate / hosts).routes(), access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    port_file.write_text(json.dumps(ports))
    await asyncio.Event().wait()


# ---------------------------------------------------------------- the collector (own process)


def write_states(state_dir: Path, hosts: int, names: list[str] | None = None) -> None:
    """State files as the collector would have left them after reporting turn FIRST_TURNS; `names`:
    the hosts' names in the collector's config, by index (default `host_name(h)`)."""
    from pipeline.collector.state import HostState

    for h in range(hosts):
        name = names[h] if names is not None else host_name(h)
        sessions = {}
        for s in range(SESSIONS_PER_HOST):
            got = listing(h, s, FIRST_TURNS)[-MAX_MESSAGES:]
            end = completed_turns(got)[-1]
            kept = got[:end][-MAX_MESSAGES:]
            sessions[sid_of(h, s)] = {"snapshot_id": snapshot_id(name, sid_of(h, s), kept),
                                      "last_message_id": kept[-1]["info"]["id"],
                                      "session_updated": T0_MS + FIRST_TURNS, "reported_at": T0_MS}
        HostState.save(state_file(state_dir, name),
                       {"version": 1, "host": name, "watermark_ms": T0_MS + FIRST_TURNS, "sessions": sessions})


def rss_peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run_collector(bootstrap: str, ports: list[int], state_dir: Path, warmup_s: float, seconds: float) -> None:
    from pipeline.collector.collector import Collector
    from pipeline.collector.settings import CollectorSettings
    from pipeline.collector.sink import KafkaEventSink
    from pipeline.config import HostConfig

    hosts = [HostConfig(name=host_name(h), base_url=f"http://127.0.0.1:{port}", password=None,
                        site_key="pk_test_thirdparty", model=None, agent=None, allow_insecure_http=False)
             for h, port in enumerate(ports)]
    settings = CollectorSettings(poll_interval_s=0, state_dir=state_dir, settle_initial_s=0.05)
    async with KafkaEventSink(bootstrap) as sink:
        collector = Collector(hosts, sink, settings=settings, rng=random.Random(1))
        task = asyncio.create_task(collector.run())
        await asyncio.sleep(warmup_s)
        before, sent0, cpu0, t0 = collector.totals(), sink.sent, cpu_seconds(os.getpid()), time.monotonic()
        await asyncio.sleep(seconds)
        after, sent1, cpu1, t1 = collector.totals(), sink.sent, cpu_seconds(os.getpid()), time.monotonic()
        buffered = sink.buffered
        collector.stop()
        await task
    span = t1 - t0
    rates = {k: (after.get(k, 0) - before.get(k, 0)) / span for k in after}
    print(json.dumps({"rates": rates, "kafka_records_per_s": (sent1 - sent0) / span,
                      "cpu_share": ((cpu1 or 0) - (cpu0 or 0)) / span, "rss_peak_mib": rss_peak_mib(),
                      "connected": after.get("connected", 0), "reconnects": after.get("reconnects", 0),
                      "buffered_at_end": buffered}))


# ---------------------------------------------------------------- the harness


def measure(bootstrap: str, hosts: int, rate: float, seconds: float, workdir: Path) -> dict[str, Any]:
    run_dir = workdir / f"hosts-{hosts}"
    state_dir = run_dir / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    write_states(state_dir, hosts)
    port_file = run_dir / "ports.json"
    me = str(Path(__file__).resolve())
    with open(run_dir / "daemons.log", "ab") as log:
        daemons = subprocess.Popen([sys.executable, me, "--serve-daemons", str(hosts), "--rate", str(rate),
                                    "--port-file", str(port_file)], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        ports = json.loads(port_file.read_text())
        wait_for_calm(10)
        load_before = loadavg()
        child = subprocess.run([sys.executable, me, "--run-collector", bootstrap, "--ports", json.dumps(ports),
                                "--state-dir", str(state_dir), "--seconds", str(seconds)],
                               capture_output=True, text=True, timeout=seconds + 120, cwd=REPO)
        if child.returncode != 0:
            raise RuntimeError(f"collector with {hosts} hosts failed: {child.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    finally:
        stop_process(daemons)
    result.update(hosts=hosts, offered=rate, load=f"{load_before} -> {loadavg()}")
    r = result["rates"]
    print(f"{hosts} hosts: {r.get('events_in', 0):,.0f} events/s read, {result['kafka_records_per_s']:,.0f} "
          f"records/s to Kafka, {r.get('turns_emitted', 0):,.1f} turns/s, peak RSS {result['rss_peak_mib']:.0f} MiB "
          f"(load {result['load']})", file=sys.stderr)
    return result


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        *result_header(HOSTS_TITLE,
                       f"python bench/collector.py --hosts {args.hosts} --rate {args.rate:g} "
                       f"--seconds {args.seconds:g}"),
        "- method: one fresh local broker; a separate process serves the fake `opencode serve` daemons (aiohttp, "
        "one port per host: `/global/event` SSE at a steady rate, `/session`, `/session/status`, "
        "`/session/{id}`, `/session/{id}/message`). Offered load: `--rate` frames/s in total, split evenly "
        f"between the hosts; per turn {FRAMES_PER_TURN} frames ({DELTAS_PER_TURN} `message.part.delta`, dropped "
        "by the collector's filter as in production; busy/idle status, user and assistant `message.updated`, "
        "`session.updated`, `session.idle`), and each idle makes the collector fetch a 25-message listing and "
        "produce a ~21 KB `pipeline.turn_ended`. The collector (`Collector` + `KafkaEventSink`: zstd, "
        "batches up to 1 MiB, acks=all, idempotent, as `pipeline collect` runs them) is its own process; "
        "after a 5 s warm-up its "
        f"counters are sampled over {args.seconds:g} s. Peak RSS = the collector process's VmHWM; CPU = its user "
        "+ system time over the window (1.0 = one core). \"Kafka records acked/s\" is what the collector sustains: "
        "frames read beyond it only fill the sink's buffer (10,000 records), after which reading slows to it.",
        "",
    ]
    lines += md_table(
        ["hosts", "offered frames/s", "frames read/s", "events handed to the sink/s", "turn_ended/s",
         "Kafka records acked/s", "sink backlog at end", "collector CPU (cores)", "peak RSS MiB", "reconnects",
         "load avg before -> after"], "rrrrrrrrrrl",
        [[r["hosts"], f"{r['offered']:,.0f}", f"{r['rates'].get('events_in', 0):,.0f}",
          f"{r['rates'].get('events_out', 0) + r['rates'].get('turns_emitted', 0):,.0f}",
          f"{r['rates'].get('turns_emitted', 0):,.1f}", f"{r['kafka_records_per_s']:,.0f}",
          f"{r['buffered_at_end']:,}", f"{r['cpu_share']:.2f}", f"{r['rss_peak_mib']:,.0f}",
          r["reconnects"], r["load"]] for r in rows])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- replicas: `pipeline.collector.service` processes

REPLICAS_TITLE = "Collector replicas: processes sharing simulated opencode hosts through the consumer group"
HOSTS_TITLE = "Collector: simulated opencode hosts into Kafka"
FOLLOW_EVENT = re.compile(r"(collecting from|stopped following) \d+ hosts: (.*)$", re.M)


def followed(log_path: Path) -> set[str]:
    """The hosts a replica's log says it follows now."""
    hosts: set[str] = set()
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    for m in FOLLOW_EVENT.finditer(text):
        names = set(m.group(2).split(", "))
        hosts = names if m.group(1) == "collecting from" else hosts - names
    return hosts


def rss_peak_of(pid: int) -> float:
    """VmHWM of `pid` in MiB (0 when unknown)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def create_fleet_topics(bootstrap: str, topics: dict[str, str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from pipeline.topics import COLLECTOR_PARTITIONS

    admin = AIOKafkaAdminClient(**client_settings(bootstrap))
    await admin.start()
    try:
        compact = {"cleanup.policy": "compact", "retention.ms": "-1"}
        await admin.create_topics([
            NewTopic(topics["hosts"], COLLECTOR_PARTITIONS, 1, topic_configs=compact),
            NewTopic(topics["state"], COLLECTOR_PARTITIONS, 1, topic_configs=compact),
            NewTopic(topics["events"], 4, 1, topic_configs={"max.message.bytes": str(8 * 1024 * 1024)}),
            NewTopic(topics["dead"], 1, 1)])
    finally:
        await admin.close()
    await asyncio.sleep(1.0)  # leaders


async def events_end(bootstrap: str, topic: str) -> int:
    async with EndOffsets(bootstrap) as ends:
        return await ends.count(topic)


async def daemon_turns(ports: list[int]) -> int:
    """Turns ended so far on all the daemons (a turn ends as its idle frame is sent)."""
    import httpx

    async with httpx.AsyncClient(timeout=30) as client:
        sem = asyncio.Semaphore(50)

        async def one(port: int) -> int:
            async with sem:
                r = await client.get(f"http://127.0.0.1:{port}/bench/turns")
                return sum(r.json().values())

        return sum(await asyncio.gather(*(one(p) for p in ports)))


def measure_replicas(bootstrap: str, hosts: int, replicas: int, rate: float, seconds: float,
                     workdir: Path) -> dict[str, Any]:
    run_dir = workdir / f"hosts-{hosts}-replicas-{replicas}"
    state_dir = run_dir / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    write_states(state_dir, hosts)
    tag = uuid.uuid4().hex[:8]
    topics = {"hosts": f"b{tag}.collector.hosts", "state": f"b{tag}.collector.state",
              "events": f"b{tag}.opencode.events", "dead": f"b{tag}.collector.dead"}
    asyncio.run(create_fleet_topics(bootstrap, topics))
    port_file = run_dir / "ports.json"
    me = str(Path(__file__).resolve())
    with open(run_dir / "daemons.log", "ab") as log:
        daemons = subprocess.Popen([sys.executable, me, "--serve-daemons", str(hosts), "--rate", str(rate),
                                    "--port-file", str(port_file)], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, cwd=REPO)
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        ports: list[int] = json.loads(port_file.read_text())
        config = run_dir / "pipeline.toml"
        config.write_text(f'[kafka]\nbootstrap = "{bootstrap}"\n\n[collector]\npoll_interval_s = 0\n'
                          f'state_dir = "{state_dir}"\n\n'
                          + "".join(f'[[hosts]]\nname = "{host_name(h)}"\nbase_url = "http://127.0.0.1:{port}"\n\n'
                                    for h, port in enumerate(ports)))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
        wait_for_calm(10)
        load_before = loadavg()
        started = time.monotonic()
        for i in range(replicas):
            log_path = run_dir / f"replica-{i}.log"
            with open(log_path, "ab") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "pipeline.collector.service", "--config", str(config), "--metrics-port",
                     "0", "--group", f"bench-collector-{tag}", "--hosts-topic", topics["hosts"], "--state-topic",
                     topics["state"], "--events-topic", topics["events"], "--dead-topic", topics["dead"]],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO, env=env)
            procs.append((proc, log_path))
        names = {host_name(h) for h in range(hosts)}

        def shared() -> list[set[str]] | None:
            each = [followed(log_path) for _, log_path in procs]
            owners = Counter(h for hs in each for h in hs)
            if set(owners) == names and all(n == 1 for n in owners.values()) and all(each):
                return each
            return None

        deadline = time.monotonic() + 120
        split = shared()
        while split is None and time.monotonic() < deadline:
            if any(p.poll() is not None for p, _ in procs):
                raise RuntimeError(f"a replica exited; see the logs in {run_dir}")
            time.sleep(0.5)
            split = shared()
        # None: not once every host followed by exactly one replica with every replica following some,
        # within 120 s; measured anyway, as it is
        shared_after = time.monotonic() - started if split is not None else None
        time.sleep(5.0)  # warm-up: reconnects and reconciles after the last rebalance
        pids = [p.pid for p, _ in procs]
        logs = [log_path for _, log_path in procs]
        events0 = group_events(logs)
        end0, turns0 = asyncio.run(events_end(bootstrap, topics["events"])), asyncio.run(daemon_turns(ports))
        cpu0, t0 = [cpu_seconds(pid) or 0.0 for pid in pids], time.monotonic()
        time.sleep(seconds)
        cpu1, t1 = [cpu_seconds(pid) or 0.0 for pid in pids], time.monotonic()
        end1, turns1 = asyncio.run(events_end(bootstrap, topics["events"])), asyncio.run(daemon_turns(ports))
        events1 = group_events(logs)
        rss = [rss_peak_of(pid) for pid in pids]
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        stop_process(daemons)
    span = t1 - t0
    result = {"hosts": hosts, "replicas": replicas, "offered": rate, "seconds": span,
              "records_per_s": (end1 - end0) / span, "turns_per_s": (turns1 - turns0) / span,
              "cpu": [(b - a) / span for a, b in zip(cpu0, cpu1, strict=True)], "rss": rss,
              "split": sorted((len(hs) for hs in split), reverse=True) if split is not None else None,
              "shared_after_s": shared_after, "load": f"{load_before} -> {loadavg()}",
              "assignments": events1[0] - events0[0], "expired": events1[1] - events0[1],
              "expired_total": events1[1]}
    print(f"{hosts} hosts, {replicas} replicas: {result['records_per_s']:,.0f} records/s into Kafka, "
          f"{result['turns_per_s']:,.1f} turns/s at the daemons, CPU {sum(result['cpu']):.2f} cores "
          f"({' / '.join(f'{c:.2f}' for c in result['cpu'])}), peak RSS {' / '.join(f'{r:.0f}' for r in rss)} MiB "
          f"; in the window {result['assignments']} assignments, {result['expired']} heartbeat sessions expired "
          f"(load {result['load']})", file=sys.stderr)
    return result


def group_events(logs: list[Path]) -> tuple[int, int]:
    """Partition assignments and expired heartbeat sessions so far, over the replicas' logs."""
    text = "".join(p.read_text(errors="replace") for p in logs if p.exists())
    return text.count("collector group: assigned partitions"), text.count("Heartbeat session expired")


def replicas_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        *result_header(REPLICAS_TITLE, f"python bench/collector.py --replicas {args.replicas} --hosts {args.hosts} "
                                       f"--rate {args.rate:g} --seconds {args.seconds:g}"),
        "- method: one fresh local broker; the fake `opencode serve` daemons of the table above (same process, "
        f"same frames: {FRAMES_PER_TURN} per turn, `--rate` frames/s in total split evenly between the hosts; a "
        "host's stream sleeps max(20 ms, min(250 ms, 1/its rate)) between writes). For each point, that many "
        "`python -m pipeline.collector.service` processes (`pipeline collect` without the CLI; `--metrics-port 0`), "
        "with a consumer group, host table, state topic and events topic (4 partitions) of their own; their config "
        "names every host and `[collector] state_dir` holds state files as if turn "
        f"{FIRST_TURNS} of every session had been reported (read once, since the state topic is empty), so no "
        "backfill storm. Timing starts once the replicas' logs show every host followed by exactly one replica "
        f"and 5 s more have passed; over {args.seconds:g} s: records/s = growth of the events topic's end offsets "
        "(every replica together: small events and `pipeline.turn_ended`, acks=all), turns/s = turns ended at "
        "the daemons (a daemon writes only as fast as its reader takes frames, so this is what the collectors "
        "kept up with), CPU per replica = user + system time from /proc/<pid>/stat over the window (1.0 = one "
        "core), peak RSS = VmHWM at the end (the first replica's includes the time it followed every host alone). "
        "Assignments / sessions expired: the replicas' log lines `collector group: assigned partitions` (each "
        "rebalance restarts every host of every replica) and aiokafka's `Heartbeat session expired` (a replica "
        "thrown out of the group) during the window. The daemons, the broker and the replicas share the "
        "machine's cores.",
        "",
    ]
    lines += md_table(
        ["hosts", "replicas", "offered frames/s", "records into Kafka/s", "turns ended/s",
         "hosts per replica", "CPU per replica (cores)", "CPU total", "peak RSS per replica MiB",
         "shared after s", "assignments / sessions expired in the window", "load avg before -> after"],
        "rrrrrlrrlrll",
        [[r["hosts"], r["replicas"], f"{r['offered']:,.0f}", f"{r['records_per_s']:,.0f}",
          f"{r['turns_per_s']:,.1f}",
          " / ".join(str(n) for n in r["split"]) if r["split"] is not None else "never split once in 120 s",
          " / ".join(f"{c:.2f}" for c in r["cpu"]), f"{sum(r['cpu']):.2f}",
          " / ".join(f"{m:,.0f}" for m in r["rss"]),
          f"{r['shared_after_s']:.0f}" if r["shared_after_s"] is not None else "-",
          f"{r['assignments']} / {r['expired']}", r["load"]] for r in rows])
    return "\n".join(lines) + "\n"


def with_other_sections(text: str, title: str) -> str:
    """`text` (the section titled `title`) with the other mode's section of the results file kept."""
    path = RESULTS / "collector.md"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    sections = re.split(r"(?m)^(?=# )", old)
    kept = [sec.rstrip() + "\n" for sec in sections if sec.strip() and not sec.startswith(f"# {title}\n")]
    order = [text, *kept] if title == HOSTS_TITLE else [*kept, text]
    return "\n".join(order)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default=None, help="host counts (default 1,10,100; with --replicas 100,400)")
    parser.add_argument("--replicas", default=None, help="replica process counts, e.g. 1,2,4: the replica mode")
    parser.add_argument("--rate", type=float, default=1500.0, help="frames/s offered, all hosts together")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--serve-daemons", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run-collector", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ports", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_daemons is not None:
        asyncio.run(serve_daemons(args.serve_daemons, args.rate, args.port_file))
        return 0
    if args.run_collector is not None:
        asyncio.run(run_collector(args.run_collector, json.loads(args.ports), args.state_dir, 5.0, args.seconds))
        return 0
    begun = time.monotonic()
    print(f"load before: {loadavg()}", file=sys.stderr)
    if args.replicas:
        args.hosts = args.hosts or "100,400"
        return run_replicas(args, begun)
    args.hosts = args.hosts or "1,10,100"
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-collector-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        with local_broker(workdir) as broker:
            from bench.common import create_topics

            asyncio.run(create_topics(broker.bootstrap, ["opencode.events", "collector.dead"]))
            for hosts in [int(h) for h in args.hosts.split(",") if h]:
                row = measure(broker.bootstrap, hosts, args.rate, args.seconds, workdir)
                if load_is_high():
                    print(f"{hosts} hosts: load {loadavg()} is high; measuring again", file=sys.stderr)
                    again = measure(broker.bootstrap, hosts, args.rate, args.seconds, workdir / "again")
                    row = max(row, again, key=lambda r: r["rates"].get("events_in", 0))
                rows.append(row)
    text = table(rows, args)
    return publish("collector", with_other_sections(text, HOSTS_TITLE), begun)


def run_replicas(args: argparse.Namespace, begun: float) -> int:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-collector-replicas-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        with local_broker(workdir) as broker:
            for hosts in [int(h) for h in args.hosts.split(",") if h]:
                for replicas in [int(r) for r in args.replicas.split(",") if r]:
                    rows.append(measure_replicas(broker.bootstrap, hosts, replicas, args.rate, args.seconds, workdir))
    text = replicas_table(rows, args)
    return publish("collector", with_other_sections(text, REPLICAS_TITLE), begun)


if __name__ == "__main__":
    sys.exit(main())
