"""Kafka client security: the one place where the `[kafka]` security keys and the SASL passwords
become the settings of a Kafka client.

Every Kafka client the project opens (each stage's faust app and the producer it sends through,
the followers, the collector's sink and consumers, the admin, lag and dead-letter commands, the
dev kit's demo) takes its connection settings from `client_settings` (faust's through
`faust_settings`, which is made from it); `tests/unit/kafka/test_security.py` fails on a client
built any other way.

Principals: each process connects as one *role*: a stage (`ingest`, ..., `deliver`,
`passthrough`), `collector`, `operator` (`pipeline topics|lag|dead|hosts`), `replay` (`pipeline replay`) or `admin`
(`pipeline kafka acls`). `[kafka] sasl_username` may hold `{role}` (`pipeline-{role}` makes
`pipeline-ingest`, ...), so one configuration file serves every process and `pipeline kafka acls`
knows every principal it grants to. The password is looked up through `Config` only:
`KAFKA_SASL_PASSWORD_<ROLE>`, else `KAFKA_SASL_PASSWORD`. It never appears in a repr, a log line
or an error: `KafkaAccess.describe()` names the bootstrap, protocol, mechanism, user and the
variable the password came from, never the password.
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError, Secret
from pipeline.topics import STAGES

COLLECTOR = "collector"
OPERATOR = "operator"  # pipeline topics, lag, dead, hosts
LAG = "lag"  # pipeline lag --serve, the long-running exporter: describes the stages' groups and inputs, no more
ADMIN = "admin"  # pipeline kafka acls: may change ACLs (a super user, or ALTER on the cluster)
REPLAY = "replay"  # pipeline replay: reads unscrubbed history, so not the operator's by default
ROLES: tuple[str, ...] = (*STAGES, COLLECTOR, OPERATOR, LAG, REPLAY, ADMIN)


@dataclass(frozen=True)
class KafkaAccess:
    """Where and how one process connects to Kafka: the bootstrap, and who it is there."""

    bootstrap: str
    role: str | None = None
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    username: str | None = None
    password: Secret | None = None  # its repr is Secret('***')
    password_variable: str | None = None  # the environment variable it came from, for errors
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True

    @classmethod
    def plain(cls, bootstrap: str) -> KafkaAccess:
        """No TLS, no authentication: a broker on a trusted network (and the tests' plain broker)."""
        return cls(bootstrap)

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.security_protocol.endswith("SSL")

    @property
    def principal(self) -> str | None:
        """The broker's name for this client (`User:<name>`), when it authenticates with SASL."""
        return f"User:{self.username}" if self.sasl and self.username else None

    def describe(self) -> str:
        """`Kafka at HOST:PORT (SASL_SSL, SCRAM-SHA-512 as pipeline-ingest)`: for errors and logs;
        never the password."""
        how = self.security_protocol
        if self.sasl:
            how += f", {self.sasl_mechanism} as {self.username}"
        return f"Kafka at {self.bootstrap} ({how})"


def access_of(kafka: KafkaAccess | str) -> KafkaAccess:
    """A bootstrap string is a plain connection to it (tests, benchmarks); the product passes the
    `KafkaAccess` of its role (`kafka_access`)."""
    return kafka if isinstance(kafka, KafkaAccess) else KafkaAccess.plain(kafka)


def kafka_access(config: Config, role: str) -> KafkaAccess:
    """The connection of a process acting as `role`, from `[kafka]` and the environment.

    ConfigError (exit 2) when a SASL password is missing (naming the variables looked at) or a
    TLS file cannot be read (naming the key and the path)."""
    if role not in ROLES:
        raise ConfigError(f"unknown Kafka role {role!r} (known: {', '.join(ROLES)})", "role")
    k = config.kafka
    username = password = variable = None
    if k.security_protocol.startswith("SASL_"):
        username = k.sasl_username.format(role=role)
        variable, password = config.kafka_sasl_password(role)
    access = KafkaAccess(
        bootstrap=k.bootstrap, role=role, security_protocol=k.security_protocol,
        sasl_mechanism=k.sasl_mechanism if username else None, username=username, password=password,
        password_variable=variable, ssl_cafile=k.ssl_cafile or None, ssl_certfile=k.ssl_certfile or None,
        ssl_keyfile=k.ssl_keyfile or None, ssl_check_hostname=k.ssl_check_hostname)
    if access.tls:
        _ssl_context(access.ssl_cafile, access.ssl_certfile, access.ssl_keyfile, access.ssl_check_hostname)
    return access


def client_settings(kafka: KafkaAccess | str) -> dict[str, Any]:
    """THE settings of every Kafka client: aiokafka's `bootstrap_servers`, `security_protocol`
    and, as the protocol needs them, `ssl_context` and the SASL mechanism, user and password.
    Pass them whole: `AIOKafkaConsumer(**client_settings(kafka), group_id=...)`."""
    access = access_of(kafka)
    settings: dict[str, Any] = {"bootstrap_servers": access.bootstrap,
                                "security_protocol": access.security_protocol}
    if access.tls:
        settings["ssl_context"] = _ssl_context(access.ssl_cafile, access.ssl_certfile, access.ssl_keyfile,
                                               access.ssl_check_hostname)
    if access.sasl:
        if access.password is None or not access.username:
            raise ConfigError(f"{access.describe()}: no SASL user or password for role {access.role}",
                              "kafka.sasl_username")
        settings.update(sasl_mechanism=access.sasl_mechanism, sasl_plain_username=access.username,
                        sasl_plain_password=access.password.reveal())
    return settings


def faust_settings(kafka: KafkaAccess | str) -> dict[str, Any]:
    """A faust app's `broker` and `broker_credentials`, made from `client_settings`: faust hands
    them to every client it opens (its consumer, its producer, the topic creation on them)."""
    import faust

    settings = client_settings(kafka)
    broker = ";".join(f"kafka://{server}" for server in settings["bootstrap_servers"].split(","))
    protocol = settings["security_protocol"]
    credentials: Any = None
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        credentials = faust.SASLCredentials(username=settings["sasl_plain_username"],
                                            password=settings["sasl_plain_password"],
                                            ssl_context=settings.get("ssl_context"),
                                            mechanism=settings["sasl_mechanism"])
    elif protocol == "SSL":
        credentials = faust.SSLCredentials(settings["ssl_context"])
    return {"broker": broker, "broker_credentials": credentials}


@functools.lru_cache(maxsize=8)
def _ssl_context(cafile: str | None, certfile: str | None, keyfile: str | None, check_hostname: bool) -> ssl.SSLContext:
    """One TLS context per process and setting (building one costs ~50 ms of CPU): every client
    shares it. ConfigError naming the key and the path when a file cannot be used."""
    for key, path in (("kafka.ssl_cafile", cafile), ("kafka.ssl_certfile", certfile), ("kafka.ssl_keyfile", keyfile)):
        if path and not Path(path).is_file():
            raise ConfigError(f"{key}: no such file: {path}", key)
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"kafka.ssl_cafile: {cafile} holds no usable PEM certificate ({type(exc).__name__})",
                          "kafka.ssl_cafile") from None
    # without the host check the certificate is still verified against the CA (CERT_REQUIRED)
    context.check_hostname = check_hostname
    if certfile:
        try:
            context.load_cert_chain(certfile, keyfile)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"kafka.ssl_certfile: cannot load {certfile} with the key {keyfile} "
                              f"({type(exc).__name__})", "kafka.ssl_certfile") from None
    return context
