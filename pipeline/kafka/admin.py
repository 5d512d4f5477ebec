"""Broker administration: create the topic table idempotently, and show it against the broker.

Also the one place a command's broker clients are started and their failures translated
(`start_client`, `broker_calls`): whatever aiokafka raises (a refused connection, a broker that
accepts and never answers, a request that times out) becomes one `BrokerError` naming the
bootstrap and what to check, and a client that failed to start is closed, so an operator sees
one line instead of a traceback and "Unclosed AIOKafkaConsumer".
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from pipeline.errors import BrokerError
from pipeline.topics import TABLES, TOPICS, changelog_configs, changelog_topic, partitions_of


@dataclass(frozen=True)
class TopicState:
    name: str
    wanted_partitions: int
    actual_partitions: int | None  # None: missing on the broker
    compacted: bool
    schema: str
    key: str

    @property
    def exists(self) -> bool:
        return self.actual_partitions is not None


# How long a command waits for the broker to answer (connecting, and each request after):
# long enough for a busy broker, short enough that a wrong address is reported while the
# operator still watches. `--timeout S` changes it per command.
DEFAULT_TIMEOUT_S = 10.0
_CHECK = "check that a broker runs there and that [kafka] bootstrap (or PIPELINE_KAFKA__BOOTSTRAP) names it"


def unreachable(bootstrap: str, exc: BaseException, timeout_s: float | None = None) -> BrokerError:
    """The one-line error for a broker that could not be reached or stopped answering."""
    if isinstance(exc, TimeoutError | asyncio.TimeoutError) or type(exc).__name__ in (
            "KafkaTimeoutError", "RequestTimedOutError"):
        within = f" within {timeout_s:g}s" if timeout_s else ""
        return BrokerError(f"Kafka at {bootstrap} did not answer{within} (something accepts connections there "
                           f"but does not speak Kafka, or the broker is stuck); {_CHECK}")
    if type(exc).__name__ == "KafkaConnectionError" or isinstance(exc, OSError):
        # aiokafka's own text lists resolved addresses ("Unable to bootstrap from [('127.0.0.1', ...)]")
        return BrokerError(f"cannot reach Kafka at {bootstrap}: connection refused or closed; {_CHECK}")
    text = str(exc) or type(exc).__name__
    text = text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"
    return BrokerError(f"Kafka at {bootstrap}: {' '.join(text.split())}; {_CHECK}")


async def _close(client: Any) -> None:
    """Stop a consumer or producer, close an admin client: whichever it is, started or not."""
    with contextlib.suppress(Exception):
        await (client.close() if isinstance(client, AIOKafkaAdminClient) else client.stop())


async def start_client(client: Any, bootstrap: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Start an aiokafka consumer, producer or admin client within `timeout_s`.

    aiokafka leaves a client that failed to start half-open (collected later with "Unclosed
    AIOKafkaConsumer"), and a listener that accepts and never answers makes `start` wait for
    its whole request timeout: so the wait is bounded here and a failed client is closed here,
    before the failure goes up as one `BrokerError`."""
    try:
        await asyncio.wait_for(client.start(), timeout_s)
    except (KafkaError, OSError, TimeoutError) as exc:
        await _close(client)
        raise unreachable(bootstrap, exc, timeout_s) from None
    except BaseException:
        await _close(client)
        raise


@contextlib.asynccontextmanager
async def broker_calls(bootstrap: str, timeout_s: float | None = None) -> AsyncIterator[None]:
    """Requests to a started client: a broker that stops answering or refuses mid-way is the
    same one-line `BrokerError`, not a traceback of aiokafka's internals."""
    try:
        yield
    except (KafkaError, OSError, TimeoutError) as exc:
        raise unreachable(bootstrap, exc, timeout_s) from None


async def _admin(bootstrap: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    await start_client(admin, bootstrap, timeout_s)
    return admin


async def _partition_counts(admin: AIOKafkaAdminClient) -> dict[str, int]:
    names = [n for n in await admin.list_topics() if not n.startswith("__")]
    if not names:
        return {}
    described = await admin.describe_topics(names)
    return {d["topic"]: len(d["partitions"]) for d in described if not d.get("error_code")}


async def _wait_for_leaders(admin: AIOKafkaAdminClient, names: list[str], timeout_s: float = 30.0) -> None:
    """A new topic refuses produce requests until each partition has a leader; wait for that."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        described = await admin.describe_topics(names)
        if all(not d.get("error_code") and d["partitions"] and all(p["leader"] >= 0 for p in d["partitions"])
               for d in described):
            return
        await asyncio.sleep(0.2)
    raise BrokerError(f"topics {', '.join(names)} have no partition leaders after {timeout_s:.0f}s")


async def topic_states(bootstrap: str, default_partitions: int,
                       timeout_s: float = DEFAULT_TIMEOUT_S) -> list[TopicState]:
    """Every topic of the table, with its partitions on the broker (None: missing there)."""
    admin = await _admin(bootstrap, timeout_s)
    try:
        async with broker_calls(bootstrap, timeout_s):
            counts = await _partition_counts(admin)
    finally:
        await _close(admin)
    return [TopicState(t.name, partitions_of(t, default_partitions), counts.get(t.name), t.compacted,
                       t.schema, t.key) for t in TOPICS.values()]


async def create_topics(bootstrap: str, default_partitions: int, replication: int,
                        unscrubbed_retention_ms: int | None = None,
                        timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Create what is missing and bring the retention of what exists to the table's (an
    unscrubbed topic never keeps more than `unscrubbed_retention_ms`).
    Returns {"created": [...], "existing": [...], "mismatched": [...], "updated": [...]}."""
    admin = await _admin(bootstrap, timeout_s)
    try:
        async with broker_calls(bootstrap, timeout_s):
            return await _create(admin, default_partitions, replication, unscrubbed_retention_ms)
    finally:
        await _close(admin)


async def _create(admin: AIOKafkaAdminClient, default_partitions: int, replication: int,
                  unscrubbed_retention_ms: int | None) -> dict[str, Any]:
    counts = await _partition_counts(admin)
    missing = [t for t in TOPICS.values() if t.name not in counts]
    created: list[str] = []
    if missing:
        new = [NewTopic(t.name, partitions_of(t, default_partitions), replication,
                        topic_configs=t.configs(unscrubbed_retention_ms)) for t in missing]
        # a concurrent creator winning the race leaves the same outcome
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics(new, timeout_ms=30000)
        created = [t.name for t in missing]
        await _wait_for_leaders(admin, created)
    existing = [t.name for t in TOPICS.values() if t.name in counts]
    mismatched = [f"{t.name}: has {counts[t.name]} partitions, table says {partitions_of(t, default_partitions)}"
                  for t in TOPICS.values()
                  if t.name in counts and counts[t.name] != partitions_of(t, default_partitions)]
    updated = await _reconcile_retention(admin, existing, unscrubbed_retention_ms)
    if unscrubbed_retention_ms is not None:
        changelogs = [c for c in (changelog_topic(s) for s in TABLES) if c in counts]
        updated += await _reconcile_changelogs(admin, changelogs, unscrubbed_retention_ms)
    return {"created": created, "existing": existing, "mismatched": mismatched, "updated": updated}


async def _reconcile_retention(admin: AIOKafkaAdminClient, names: list[str],
                               unscrubbed_retention_ms: int | None) -> list[str]:
    """Set the table's configs on existing topics whose retention.ms differs from it: a topic
    created before a retention change (or by hand) keeps unscrubbed content no longer than
    configured. AlterConfigs replaces a topic's settings as a whole, so the table's full set goes."""
    current = await _configs(admin, names)
    drifted = [TOPICS[n] for n in names
               if current.get(n, {}).get("retention.ms") != str(TOPICS[n].retention(unscrubbed_retention_ms))]
    if drifted:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, t.name,
                                                  configs=t.configs(unscrubbed_retention_ms)) for t in drifted])
    return [t.name for t in drifted]


async def _reconcile_changelogs(admin: AIOKafkaAdminClient, names: list[str], retention_ms: int) -> list[str]:
    """The stages' table changelogs (created by faust, before a retention change too) get the
    bounded retention as well."""
    wanted = changelog_configs(retention_ms)
    current = await _configs(admin, names)
    drifted = [n for n in names if any(current.get(n, {}).get(k) != v for k, v in wanted.items())]
    if drifted:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, n, configs=wanted) for n in drifted])
    return drifted


async def _configs(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, dict[str, str]]:
    if not names:
        return {}
    out: dict[str, dict[str, str]] = {}
    for response in await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names]):
        for resource in response.resources:
            out[resource[3]] = {entry[0]: entry[1] for entry in resource[4]}
    return out


async def topic_partitions(consumer: AIOKafkaConsumer, topics: list[str]) -> list[TopicPartition]:
    """Every partition of `topics`. A consumer that subscribed to nothing has no metadata for
    them (`partitions_for_topic` answers None), and `consumer.topics()` fetches metadata into a
    throwaway object: this fetches it and reads the partitions from that."""
    cluster = await consumer._client.fetch_all_metadata()
    return [TopicPartition(t, p) for t in topics for p in sorted(cluster.partitions_for_topic(t) or ())]
