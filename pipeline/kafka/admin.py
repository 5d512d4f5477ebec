"""Broker administration: create the topic table idempotently, and show it against the broker.

Also the one place a command's broker clients are started and their failures translated
(`start_client`, `broker_calls`): whatever aiokafka raises (a refused connection, a broker that
accepts and never answers, a request that times out) becomes one `BrokerError` naming the
bootstrap and what to check, and a client that failed to start is closed, so an operator sees
one line instead of a traceback and "Unclosed AIOKafkaConsumer". A client that the broker does not
let in (a wrong password, an untrusted certificate, a mechanism the listener does not enable)
is told apart from an unreachable broker by `check_access`, which names the bootstrap, the
protocol, the mechanism and user, and the variable the password came from (never the password).

Also the ACLs: `apply_acls` creates those of `pipeline.kafka.acls` the broker does not have yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from pipeline.errors import BrokerError
from pipeline.kafka.acls import Acl
from pipeline.kafka.security import KafkaAccess, access_of, client_settings
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


def unreachable(kafka: KafkaAccess | str, exc: BaseException, timeout_s: float | None = None) -> BrokerError:
    """The one-line error for a broker that could not be reached or stopped answering."""
    access = access_of(kafka)
    bootstrap = access.bootstrap if not (access.sasl or access.tls) else access.describe().removeprefix("Kafka at ")
    refused = refusal(access, exc)
    if refused is not None:
        return refused
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


def refusal(kafka: KafkaAccess | str, exc: BaseException) -> BrokerError | None:
    """The error for a broker that answered and would not let this client in (None: `exc` is
    something else): authentication, TLS, or an operation its principal lacks."""
    access = access_of(kafka)
    name = type(exc).__name__
    where = access.describe()
    if name in ("SaslAuthenticationFailed", "AuthenticationFailedError"):
        source = f"the password in {access.password_variable}" if access.password_variable else "the password"
        return BrokerError(f"{where} refused the credentials: check {source} and that the broker has user "
                           f"{access.username} for {access.sasl_mechanism}")
    if name == "UnsupportedSaslMechanismError":
        return BrokerError(f"{where}: the listener does not enable {access.sasl_mechanism}; set [kafka] "
                           "sasl_mechanism to one it enables")
    if name in ("IllegalSaslStateError",):
        return BrokerError(f"{where}: the SASL exchange failed ({name}); is the listener {access.security_protocol}?")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return BrokerError(f"{where}: the broker's certificate is not trusted ({exc.verify_message}); check [kafka] "
                           "ssl_cafile (and ssl_check_hostname)")
    if isinstance(exc, ssl.SSLError):
        return BrokerError(f"{where}: the TLS handshake failed ({exc.reason or name}); is the listener "
                           f"{access.security_protocol}?")
    if name in ("TopicAuthorizationFailedError", "GroupAuthorizationFailedError", "ClusterAuthorizationFailedError"):
        who = access.principal or "this client"
        return BrokerError(f"{where}: {who} is not allowed this ({name}: {' '.join(str(exc).split())[:200]}); "
                           "`pipeline kafka acls` grants the pipeline's principals what they need")
    return None


async def check_access(kafka: KafkaAccess | str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Connect once to the first bootstrap server as this client would (TLS, SASL): BrokerError
    naming what is wrong when the broker does not let it in. A broker that cannot be reached at
    all is no error here (a stage waits for its broker); use `start_client` for that."""
    from aiokafka.conn import create_conn

    access = access_of(kafka)
    settings = client_settings(access)
    host, _, port = access.bootstrap.split(",")[0].strip().rpartition(":")
    options = {k: v for k, v in settings.items() if k != "bootstrap_servers"}
    try:
        conn = await asyncio.wait_for(
            create_conn(host.strip("[]"), int(port), request_timeout_ms=int(timeout_s * 1000), **options), timeout_s)
    except (KafkaError, OSError, TimeoutError) as exc:
        refused = refusal(access, exc if exc.__cause__ is None else exc.__cause__)
        refused = refused or refusal(access, exc)
        if refused is not None:
            raise refused from None
        return
    conn.close()


async def start_client(client: Any, kafka: KafkaAccess | str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Start an aiokafka consumer, producer or admin client within `timeout_s`.

    aiokafka leaves a client that failed to start half-open (collected later with "Unclosed
    AIOKafkaConsumer"), and a listener that accepts and never answers makes `start` wait for
    its whole request timeout: so the wait is bounded here and a failed client is closed here,
    before the failure goes up as one `BrokerError`."""
    access = access_of(kafka)
    try:
        await asyncio.wait_for(client.start(), timeout_s)
    except (KafkaError, OSError, TimeoutError) as exc:
        await _close(client)
        if (access.sasl or access.tls) and not isinstance(exc, TimeoutError):
            await check_access(access, timeout_s)  # aiokafka reports "Unable to bootstrap": find out why
        raise unreachable(access, exc, timeout_s) from None
    except BaseException:
        await _close(client)
        raise


@contextlib.asynccontextmanager
async def broker_calls(kafka: KafkaAccess | str, timeout_s: float | None = None) -> AsyncIterator[None]:
    """Requests to a started client: a broker that stops answering or refuses mid-way is the
    same one-line `BrokerError`, not a traceback of aiokafka's internals."""
    try:
        yield
    except (KafkaError, OSError, TimeoutError) as exc:
        raise unreachable(kafka, exc, timeout_s) from None


async def _admin(kafka: KafkaAccess | str, timeout_s: float = DEFAULT_TIMEOUT_S) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(**client_settings(kafka), request_timeout_ms=int(timeout_s * 1000))
    await start_client(admin, kafka, timeout_s)
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


async def topic_states(kafka: KafkaAccess | str, default_partitions: int,
                       timeout_s: float = DEFAULT_TIMEOUT_S) -> list[TopicState]:
    """Every topic of the table, with its partitions on the broker (None: missing there)."""
    admin = await _admin(kafka, timeout_s)
    try:
        async with broker_calls(kafka, timeout_s):
            counts = await _partition_counts(admin)
    finally:
        await _close(admin)
    return [TopicState(t.name, partitions_of(t, default_partitions), counts.get(t.name), t.compacted,
                       t.schema, t.key) for t in TOPICS.values()]


async def create_topics(kafka: KafkaAccess | str, default_partitions: int, replication: int,
                        unscrubbed_retention_ms: int | None = None,
                        timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Create what is missing and bring the retention of what exists to the table's (an
    unscrubbed topic never keeps more than `unscrubbed_retention_ms`).
    Returns {"created": [...], "existing": [...], "mismatched": [...], "updated": [...]}."""
    admin = await _admin(kafka, timeout_s)
    try:
        async with broker_calls(kafka, timeout_s):
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


# ---------------------------------------------------------------- ACLs

_ANY = 1  # ResourceType / PatternType / AclOperation / AclPermissionType ANY, as a filter


async def _acl_call(admin: AIOKafkaAdminClient, request: Any) -> Any:
    return await admin._send_request(request)  # aiokafka 0.14 has the requests, not admin methods


def _acl_error(code: int, message: str | None, what: str) -> BrokerError | None:
    if not code:
        return None
    from aiokafka.errors import for_code

    name = for_code(code).__name__
    hint = ("; run it as a principal that may change ACLs (a super user, or ALTER on the cluster: "
            "`pipeline kafka acls` connects as the `admin` role)") if "Authorization" in name else ""
    return BrokerError(f"{what}: {name}: {message or ''}".rstrip(": ") + hint)


async def current_acls(kafka: KafkaAccess | str, timeout_s: float = DEFAULT_TIMEOUT_S) -> set[Acl]:
    """Every ALLOW ACL on the broker for any host `*`, as `Acl`s (others are ignored)."""
    admin = await _admin(kafka, timeout_s)
    try:
        async with broker_calls(kafka, timeout_s):
            return await _current(admin)
    finally:
        await _close(admin)


async def _current(admin: AIOKafkaAdminClient) -> set[Acl]:
    from aiokafka.protocol.admin import DescribeAclsRequest

    from pipeline.kafka.acls import ALLOW, ANY_HOST, OPERATIONS, PATTERN_TYPES, RESOURCE_TYPES

    response = await _acl_call(admin, DescribeAclsRequest(_ANY, None, _ANY, None, None, _ANY, _ANY))  # type: ignore[arg-type]
    error = _acl_error(response.error_code, response.error_message, "describing the ACLs")
    if error is not None:
        raise error
    resources = {v: k for k, v in RESOURCE_TYPES.items()}
    patterns = {v: k for k, v in PATTERN_TYPES.items()}
    operations = {v: k for k, v in OPERATIONS.items()}
    out: set[Acl] = set()
    for resource_type, name, pattern, acls in response.resources:
        for principal, host, operation, permission in acls:
            if (permission == ALLOW and host == ANY_HOST and resource_type in resources and pattern in patterns
                    and operation in operations):
                out.add(Acl(principal, resources[resource_type], name, operations[operation], patterns[pattern]))
    return out


async def apply_acls(kafka: KafkaAccess | str, wanted: list[Acl], *, prune: bool = False,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, list[Acl]]:
    """Create the ACLs of `wanted` the broker lacks (idempotent); with `prune`, delete the ALLOW
    ACLs the broker holds for the principals of `wanted` that are not in it (what an earlier
    version or a hand granted them). Returns {"created": [...], "existing": [...], "removed": [...]}."""
    from aiokafka.protocol.admin import CreateAclsRequest, DeleteAclsRequest

    admin = await _admin(kafka, timeout_s)
    try:
        async with broker_calls(kafka, timeout_s):
            have = await _current(admin)
            missing = [a for a in wanted if a not in have]
            responses = await asyncio.gather(*(_acl_call(admin, CreateAclsRequest(*a.wire())) for a in missing))
            for acl, response in zip(missing, responses, strict=True):
                for code, message in response.creation_responses:
                    error = _acl_error(code, message, f"granting {acl}")
                    if error is not None:
                        raise error
            removed: list[Acl] = []
            if prune:
                principals = {a.principal for a in wanted}
                removed = sorted(a for a in have if a.principal in principals and a not in set(wanted))
                for acl in removed:
                    response = await _acl_call(admin, DeleteAclsRequest(*acl.wire()))
                    for code, message, _ in response.filter_responses:
                        error = _acl_error(code, message, f"removing {acl}")
                        if error is not None:
                            raise error
            return {"created": missing, "existing": [a for a in wanted if a in have], "removed": removed}
    finally:
        await _close(admin)


async def revoke_acls(kafka: KafkaAccess | str, acls: list[Acl], timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Delete exactly these ACLs (tests revoke one grant to see what a stage without it does)."""
    from aiokafka.protocol.admin import DeleteAclsRequest

    admin = await _admin(kafka, timeout_s)
    try:
        async with broker_calls(kafka, timeout_s):
            for acl in acls:
                await _acl_call(admin, DeleteAclsRequest(*acl.wire()))
    finally:
        await _close(admin)
