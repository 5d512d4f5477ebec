"""What the Kafka benchmarks share: a fresh broker, realistic records, filling a topic, watching
a topic's end offsets grow, the raw aiokafka pass-through (the ceiling), load and markdown.

Not a benchmark itself; `bench/ceiling.py`, `bench/stages.py`, `bench/end_to_end.py` and
`bench/collector.py` import it (each puts the repository root on sys.path first).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import GroupCoordinatorNotAvailableError, TopicAlreadyExistsError

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from devkit.kafka_local import LocalBroker, free_port  # noqa: E402
from pipeline import config  # noqa: E402
from pipeline.config import DEFAULT_CACHE_DIR  # noqa: E402
from pipeline.kafka.security import client_settings  # noqa: E402
from pipeline.model.envelope import turn_ended  # noqa: E402
from pipeline.model.records import encode  # noqa: E402
from pipeline.model.snapshot import SessionState, build_snapshot  # noqa: E402
from pipeline.topics import MAX_MESSAGE_BYTES  # noqa: E402
from tests.factory import messages  # noqa: E402

RESULTS = REPO / "bench" / "results"
CORES = os.cpu_count() or 1
# 1-minute load above this (per core) counts as "high": the run is repeated (bounded).
HIGH_LOAD_PER_CORE = 1.5
TURNS = 13  # messages(sid, turns=13) gives 26 messages; the snapshot keeps the last 25
SITE_KEY = "pk_test_thirdparty"
T0_MS = 1795236913836


# ---------------------------------------------------------------- load, machine, markdown


def load1() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def loadavg() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def load_is_high() -> bool:
    return load1() > HIGH_LOAD_PER_CORE * CORES


def wait_for_calm(max_wait_s: float = 20.0) -> None:
    """Give a busy machine (other engineers' test suites) a little time before measuring."""
    deadline = time.monotonic() + max_wait_s
    while load_is_high() and time.monotonic() < deadline:
        time.sleep(2.0)


def machine() -> str:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    kafka = config.load(None).kafka.version
    return (f"{CORES} cores, {mem_gib:.0f} GiB, {platform.machine()}, Python {platform.python_version()}, "
            f"Kafka {kafka} (local KRaft broker, one node), aiokafka {metadata.version('aiokafka')}, "
            f"faust-streaming {metadata.version('faust-streaming')}; "
            "load averages 1/5/15 min in the tables")


def now_utc() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def result_header(title: str, command: str) -> list[str]:
    """The head every bench/results/<name>.md starts with: title, date, machine, command."""
    return [f"# {title}", "", f"- date: {now_utc()}", f"- machine: {machine()}", f"- command: `{command}`"]


def md_table(header: Sequence[str], align: str, rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table; `align` has one character per column: l (left) or r (right)."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def publish(name: str, text: str, started: float) -> int:
    """Write a benchmark's result table to bench/results/NAME.md, print it, and say how long the
    run took (`started`: time.monotonic() at its start). The exit code of every benchmark."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {path} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- records


def session_id(i: int, prefix: str = "ses_bench") -> str:
    return f"{prefix}{i:07d}"


def session_info(sid: str, i: int) -> dict[str, Any]:
    return {"id": sid, "projectID": "global", "directory": "/home/dev/project", "title": f"bench session {i}",
            "time": {"created": T0_MS + i, "updated": T0_MS + i + 1000}}


def turn_ended_envelope(i: int, *, host: str = "h1", prefix: str = "ses_bench",
                        received_at_ms: int | None = None) -> dict[str, Any]:
    """The collector's `pipeline.turn_ended` for a 26-message session (13 turns), as produced."""
    sid = session_id(i, prefix)
    msgs = messages(sid, turns=TURNS, seed=i, tool_error=i % 7 == 0)
    return turn_ended(host=host, site_key=SITE_KEY, session=session_info(sid, i), messages=msgs,
                      trigger="session.idle", received_at_ms=received_at_ms or T0_MS + i)


def snapshot_record(i: int, *, host: str = "h1", prefix: str = "ses_bench",
                    emitted_at_ms: int | None = None) -> dict[str, Any]:
    """A 25-message `session.snapshot/1` as ingest emits it (`emitted_at` = now when omitted)."""
    env = turn_ended_envelope(i, host=host, prefix=prefix)
    return build_snapshot(env, SessionState(), max_messages=25,
                          now_ms=emitted_at_ms if emitted_at_ms is not None else int(time.time() * 1000))


def small_events(i: int, *, host: str = "h1", prefix: str = "ses_bench") -> list[dict[str, Any]]:
    """The small events the collector produces around one turn of session i (opencode 1.18 shapes):
    the user message, busy, the assistant message created / updated / completed, the session
    updated, idle status and session.idle. Together with the turn_ended: 9 events per turn."""
    sid = session_id(i, prefix)
    msgs = messages(sid, turns=TURNS, seed=i)
    user, assistant = msgs[-2]["info"], msgs[-1]["info"]
    started = {**assistant, "time": {"created": assistant["time"]["created"]}}
    started.pop("finish", None)
    usage = {"tokens": {"input": 5123, "output": 812, "reasoning": 0, "cache": {"read": 4096, "write": 0}},
             "cost": 0.0123, "path": {"cwd": "/home/dev/project", "root": "/home/dev/project"}}
    props: list[tuple[str, dict[str, Any]]] = [
        ("message.updated", {"info": user}),
        ("session.status", {"sessionID": sid, "status": {"type": "busy"}}),
        ("message.updated", {"info": started}),
        ("message.updated", {"info": {**started, **usage}}),
        ("message.updated", {"info": {**assistant, **usage}}),
        ("session.updated", {"info": session_info(sid, i)}),
        ("session.status", {"sessionID": sid, "status": {"type": "idle"}}),
        ("session.idle", {"sessionID": sid}),
    ]
    return [{"schema": "opencode.event/1", "host": host, "site_key": SITE_KEY, "session_id": sid,
             "event_id": f"evt_{i:07d}{n:02d}", "type": kind, "received_at": T0_MS + i * 10 + n,
             "directory": "/home/dev/project", "project": "global", "backfill": False, "source": "sse",
             "properties": p} for n, (kind, p) in enumerate(props)]


def keyed(records: Iterable[dict[str, Any]]) -> list[tuple[bytes, bytes]]:
    return [(f"{r['host']}:{r['session_id']}".encode(), encode(r)) for r in records]


# ---------------------------------------------------------------- broker


@contextlib.contextmanager
def local_broker(workdir: Path | None = None, heap: str = "1g") -> Iterator[LocalBroker]:
    """A fresh single-node broker on free ports with its own data dir, stopped at the end."""
    with contextlib.ExitStack() as stack:
        root = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-kafka-")))
        broker = LocalBroker(host="127.0.0.1", port=free_port(), controller_port=free_port(),
                             data_dir=root / "kafka", cache_dir=DEFAULT_CACHE_DIR, heap=heap)
        try:  # start() polls with asyncio.run: call this outside any running loop
            broker.start()
            yield broker
        finally:
            broker.stop()


async def create_topics(bootstrap: str, names: Sequence[str], partitions: int = 4) -> None:
    admin = AIOKafkaAdminClient(**client_settings(bootstrap))
    await admin.start()
    try:
        for name in names:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([NewTopic(name, partitions, 1,
                                                    topic_configs={"max.message.bytes": str(MAX_MESSAGE_BYTES)})])
    finally:
        await admin.close()
    await asyncio.sleep(1.0)  # leaders


def producer(bootstrap: str, **overrides: Any) -> AIOKafkaProducer:
    """acks=all, as every stage produces; batches up to 1 MiB so 20 KB records share requests."""
    settings: dict[str, Any] = {**client_settings(bootstrap), "acks": "all", "linger_ms": 5,
                                "max_batch_size": 1024 * 1024, "max_request_size": MAX_MESSAGE_BYTES}
    settings.update(overrides)
    return AIOKafkaProducer(**settings)


async def fill(bootstrap: str, topic: str, records: Iterable[tuple[bytes | None, bytes]], chunk: int = 500) -> int:
    """Produce records (key, value), acknowledged; returns how many."""
    prod = producer(bootstrap)
    await prod.start()
    n = 0
    try:
        pending: list[asyncio.Future[Any]] = []
        for key, value in records:
            pending.append(await prod.send(topic, value=value, key=key))
            n += 1
            if len(pending) >= chunk:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await prod.stop()
    return n


class EndOffsets:
    """Sum of a topic's end offsets (= records ever written to it), polled cheaply."""

    def __init__(self, bootstrap: str) -> None:
        self.consumer = AIOKafkaConsumer(**client_settings(bootstrap), group_id=None, enable_auto_commit=False)

    async def __aenter__(self) -> EndOffsets:
        await self.consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    async def parts(self, topic: str) -> list[TopicPartition]:
        for _ in range(50):
            found = self.consumer.partitions_for_topic(topic)
            if found:
                return [TopicPartition(topic, p) for p in sorted(found)]
            await self.consumer._client.force_metadata_update()  # no public way to refresh metadata
            await asyncio.sleep(0.1)
        raise RuntimeError(f"topic {topic} has no partitions")

    async def count(self, topic: str) -> int:
        ends = await self.consumer.end_offsets(await self.parts(topic))
        return sum(ends.values())


async def committed_total(bootstrap: str, group: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(**client_settings(bootstrap))
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    except GroupCoordinatorNotAvailableError:
        return 0
    finally:
        await admin.close()
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset > 0)


@dataclass
class Progress:
    """How a topic's record count grew past `base` while a process worked: when it was first
    seen to grow, and when it was first seen at or past each mark (cumulative counts)."""

    marks: list[int]
    started: float  # when the process was started (monotonic)
    first_at: float | None = None  # first poll that saw output
    first_n: int = 0  # outputs already there at that poll
    first_cpu: float | None = None  # CPU seconds the process had used by then
    crossed: list[tuple[float, int]] = field(default_factory=list)  # (when, count) per mark reached
    crossed_cpu: list[float | None] = field(default_factory=list)

    @property
    def done_at(self) -> float | None:
        return self.crossed[-1][0] if len(self.crossed) == len(self.marks) else None

    def rates(self) -> list[float | None]:
        """Records/s per phase: phase 0 from the first poll that saw output to the poll that saw
        the first mark (start-up, group join and the first fetch left out, as for every row),
        each later phase from one mark's poll to the next."""
        out: list[float | None] = []
        prev: tuple[float | None, int] = (self.first_at, self.first_n)
        for when, n in self.crossed:
            t0, n0 = prev
            out.append((n - n0) / (when - t0) if t0 is not None and when > t0 else None)
            prev = (when, n)
        return out

    def cpu_us(self) -> list[float | None]:
        """CPU time (user + system) of the writing process per record written, per phase: what
        the rate would be bounded by on an idle core, whatever the neighbours were doing."""
        out: list[float | None] = []
        prev = (self.first_cpu, self.first_n)
        for (_, n), cpu in zip(self.crossed, self.crossed_cpu, strict=True):
            c0, n0 = prev
            out.append((cpu - c0) / (n - n0) * 1e6 if cpu is not None and c0 is not None and n > n0 else None)
            prev = (cpu, n)
        return out

    def seconds(self) -> list[float]:
        times = [self.first_at or 0.0] + [t for t, _ in self.crossed]
        return [b - a for a, b in itertools.pairwise(times)]

    @property
    def rate(self) -> float | None:
        return self.rates()[0] if self.crossed else None

    @property
    def startup_s(self) -> float | None:
        return None if self.first_at is None else self.first_at - self.started


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds a process has used (Linux /proc), None when unknown."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def watch(bootstrap: str, topic: str, base: int, marks: int | list[int], started: float, timeout_s: float,
                alive: Callable[[], bool] = lambda: True, interval_s: float = 0.05,
                pid: int | None = None) -> Progress:
    """Poll `topic`'s end offsets until the last mark of records were added past `base`
    (and the CPU time of `pid`, the process writing them, at the same polls)."""
    progress = Progress(marks=[marks] if isinstance(marks, int) else list(marks), started=started)
    async with EndOffsets(bootstrap) as ends:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            n = await ends.count(topic) - base
            now = time.monotonic()
            if n > 0 and progress.first_at is None:
                progress.first_at, progress.first_n, progress.first_cpu = now, n, cpu_seconds(pid)
            while len(progress.crossed) < len(progress.marks) and n >= progress.marks[len(progress.crossed)]:
                progress.crossed.append((now, n))
                progress.crossed_cpu.append(cpu_seconds(pid))
            if progress.done_at is not None:
                return progress
            if not alive():
                raise RuntimeError(f"the process writing {topic} exited with {n}/{progress.marks[-1]} written")
            await asyncio.sleep(interval_s)
    raise TimeoutError(f"{topic}: fewer than {progress.marks[-1]} records after {timeout_s:.0f}s")


# ---------------------------------------------------------------- the ceiling: raw aiokafka pass-through


async def raw_passthrough(bootstrap: str, src: str, dst: str, group: str, expect: int,
                          idle_exit_s: float = 5.0) -> None:
    """Consume `src` in a consumer group, produce every record to `dst`, wait for the broker's
    acks of a fetched batch, then commit its offsets: the at-least-once loop a stage runs,
    without faust, decoding or validation. Exits after `expect` records (or when idle); when it
    has read the whole topic before that, it starts over from the beginning (so a short topic
    can be timed over several passes)."""
    consumer = AIOKafkaConsumer(src, **client_settings(bootstrap), group_id=group, enable_auto_commit=False,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=MAX_MESSAGE_BYTES,
                                fetch_max_bytes=4 * MAX_MESSAGE_BYTES)
    prod = producer(bootstrap)
    await prod.start()
    await consumer.start()
    done, idle_since = 0, time.monotonic()
    ends: dict[TopicPartition, int] = {}
    read: dict[TopicPartition, int] = {}
    try:
        while done < expect and time.monotonic() - idle_since < idle_exit_s:
            batch = await consumer.getmany(timeout_ms=200, max_records=1000)
            if not batch:
                continue
            idle_since = time.monotonic()
            futures = [await prod.send(dst, value=m.value, key=m.key) for msgs in batch.values() for m in msgs]
            await asyncio.gather(*futures)
            await consumer.commit({tp: msgs[-1].offset + 1 for tp, msgs in batch.items()})
            done += len(futures)
            read.update({tp: msgs[-1].offset + 1 for tp, msgs in batch.items()})
            if not ends:
                ends = await consumer.end_offsets(list(consumer.assignment()))
            if done < expect and all(read.get(tp, 0) >= end for tp, end in ends.items()):
                await consumer.seek_to_beginning()
                read = {}
    finally:
        await consumer.stop()
        await prod.stop()


def start_raw_passthrough(bootstrap: str, src: str, dst: str, group: str, expect: int,
                          log: Path) -> subprocess.Popen[bytes]:
    """The ceiling in its own process, as a stage worker is."""
    code = ("import asyncio, sys; sys.path.insert(0, sys.argv[1]); from bench.common import raw_passthrough; "
            "asyncio.run(raw_passthrough(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6])))")
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-c", code, str(REPO), bootstrap, src, dst, group, str(expect)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(10)


@dataclass
class Measured:
    rates: list[float]  # records/s per phase (one phase unless marks were given)
    cpu_us: list[float | None]  # CPU microseconds per record of the pass-through process, per phase
    startup_s: float
    n: int
    load: str
    seconds: list[float]

    @property
    def rate(self) -> float:
        return self.rates[0]


async def measure_ceiling(bootstrap: str, src: str, n: int, tag: str, logdir: Path,
                          timeout_s: float = 120.0, marks: list[int] | None = None, passes: int = 1) -> Measured:
    """Run the raw pass-through over the `n` records of `src` (`passes` times over, from the
    beginning each time; `n` must then be the whole topic) into a fresh topic; its rate (per
    phase, when `marks` splits the records into phases)."""
    n *= passes
    dst = f"bench.ceiling.{tag}"
    await create_topics(bootstrap, [dst])
    async with EndOffsets(bootstrap) as ends:
        base = await ends.count(dst)
    load_before = loadavg()
    started = time.monotonic()
    proc = start_raw_passthrough(bootstrap, src, dst, f"bench-ceiling-{tag}", n, logdir / f"ceiling-{tag}.log")
    try:
        progress = await watch(bootstrap, dst, base, marks or [n], started, timeout_s,
                               alive=lambda: proc.poll() is None, pid=proc.pid)
    finally:
        stop_process(proc)
    rates = progress.rates()
    if any(r is None for r in rates):
        raise RuntimeError(f"ceiling {tag}: too fast to measure with {n} records")
    return Measured(rates=[r for r in rates if r is not None], cpu_us=progress.cpu_us(),
                    startup_s=progress.startup_s or 0.0, n=n, load=f"{load_before} -> {loadavg()}",
                    seconds=progress.seconds())
