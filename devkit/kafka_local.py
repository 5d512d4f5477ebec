"""A real single-node Apache Kafka broker (KRaft, broker + controller) from Apache's own jars.

The jars come from Maven Central through Maven and are cached outside the repository, so a
second start downloads nothing. Used by `pipeline-dev kafka up|down|status`, the test fixtures and
the demo alike, so tests run on exactly what operators run locally.

`secure=True` (`pipeline-dev kafka up --secure`): the same broker with one SASL_SSL listener
(a local CA and broker certificate, SCRAM-SHA-256/512 credentials for every pipeline role
created when the data directory is formatted), the KRaft controller listener on SASL_PLAINTEXT
(PLAIN, a password of its own), KRaft's StandardAuthorizer with
`allow.everyone.if.no.acl.found=false` and the admin principal (`pipeline-admin`, also the
broker's own) as the super user. At start it applies the pipeline's ACLs (one principal per
role, `pipeline.kafka.acls`) and writes the client settings (`security/client.toml`,
`security/client.env`; see `devkit/kafka_security.py`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from devkit.kafka_security import MECHANISM, SecurityFiles
from pipeline.errors import BrokerError
from pipeline.kafka.security import ADMIN, ROLES, KafkaAccess, client_settings

# Newest release that faust-streaming 0.15.3 / aiokafka 0.14.0 were run against here.
# 4.4.0 is listed on Maven Central but its kafka-tools-api artifact is missing there.
DEFAULT_VERSION = "4.3.1"
SLF4J_VERSION = "1.7.36"  # the slf4j API line Kafka 4.3 is built against

POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.pipeline</groupId><artifactId>kafka-runtime</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{version}</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-simple</artifactId><version>{slf4j}</version></dependency>
  </dependencies>
</project>
"""


def ensure_jars(version: str, cache_dir: Path) -> Path:
    """Return the directory holding Kafka's runtime classpath, fetching it once with Maven."""
    libs = cache_dir / f"kafka-{version}" / "libs"
    marker = libs / ".complete"
    if marker.exists():
        return libs
    mvn = shutil.which("mvn")
    if not shutil.which("java") or not mvn:
        raise BrokerError("Java 17+ and Maven are needed to run the local broker: apt-get install "
                          "openjdk-17-jre-headless maven")
    work = cache_dir / f"kafka-{version}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "pom.xml").write_text(POM.format(version=version, slf4j=SLF4J_VERSION))
    tmp = work / "libs.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run(
        [mvn, "-q", "-B", "-f", str(work / "pom.xml"), "dependency:copy-dependencies",
         f"-DoutputDirectory={tmp}", "-DincludeScope=runtime"],
        capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        raise BrokerError(f"Maven could not fetch org.apache.kafka:kafka_2.13:{version}: " + " | ".join(tail))
    shutil.rmtree(libs, ignore_errors=True)
    tmp.rename(libs)
    marker.write_text(version)
    return libs


@dataclass
class LocalBroker:
    host: str
    port: int
    controller_port: int
    data_dir: Path
    cache_dir: Path
    version: str = DEFAULT_VERSION
    heap: str = "512m"
    # server.properties lines that override the defaults below (a later key wins in Kafka's loader)
    extra_properties: tuple[str, ...] = ()
    # SASL_SSL, SCRAM per role, the StandardAuthorizer with the pipeline's ACLs (see the module doc)
    secure: bool = False

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def security(self) -> SecurityFiles:
        return SecurityFiles(self.data_dir / "security")

    def access(self, role: str = ADMIN) -> KafkaAccess:
        """How a client of `role` reaches this broker (plain for a broker that is not secure)."""
        return self.security.access(self.bootstrap, role) if self.secure else KafkaAccess.plain(self.bootstrap)

    def client_environment(self) -> dict[str, str]:
        """The environment a `pipeline` process needs to reach this broker (secure: the
        `[kafka]` security keys and every role's password)."""
        if not self.secure:
            return {"PIPELINE_KAFKA__BOOTSTRAP": self.bootstrap}
        return self.security.client_environment(self.bootstrap)

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "broker.pid"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "broker.log"

    def _listeners(self) -> list[str]:
        if not self.secure:
            return [
                f"listeners=PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
                f"advertised.listeners=PLAINTEXT://{self.host}:{self.port}",
                "controller.listener.names=CONTROLLER",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                "inter.broker.listener.name=PLAINTEXT",
            ]
        files = self.security
        passwords = files.passwords()
        admin = f"pipeline-{ADMIN}"
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule"
        plain = "org.apache.kafka.common.security.plain.PlainLoginModule"
        return [
            f"listeners=SECURE://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
            f"advertised.listeners=SECURE://{self.host}:{self.port}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=SECURE:SASL_SSL,CONTROLLER:SASL_PLAINTEXT",
            "inter.broker.listener.name=SECURE",
            # clients: SCRAM over TLS; the broker talks to itself as the admin principal
            "listener.name.secure.sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512",
            f"sasl.mechanism.inter.broker.protocol={MECHANISM}",
            *(f'listener.name.secure.{mechanism}.sasl.jaas.config={scram} required username="{admin}" '
              f'password="{passwords[ADMIN]}";' for mechanism in ("scram-sha-256", "scram-sha-512")),
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={files.broker_pem}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={files.ca_cert}",
            "ssl.client.auth=none",
            # KRaft controllers cannot use SCRAM: the controller listener takes PLAIN, on this host only
            "listener.name.controller.sasl.enabled.mechanisms=PLAIN",
            "sasl.mechanism.controller.protocol=PLAIN",
            f'listener.name.controller.plain.sasl.jaas.config={plain} required username="controller" '
            f'password="{passwords["controller"]}" user_controller="{passwords["controller"]}";',
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found=false",
            f"super.users=User:{admin};User:controller",
        ]

    def _properties(self) -> Path:
        logs = self.data_dir / "logs"
        props = self.data_dir / "server.properties"
        props.touch(mode=0o600)
        os.chmod(props, 0o600)  # a secure broker's file holds the admin's and the controller's passwords
        props.write_text("\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@{self.host}:{self.controller_port}",
            *self._listeners(),
            f"log.dirs={logs}",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=10",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=true",
            "num.partitions=1",
            *self.extra_properties,
            "",
        ]))
        return props

    def _java(self, libs: Path, *args: str) -> list[str]:
        return ["java", f"-Xmx{self.heap}", "-Xms128m", "-XX:+UseSerialGC",
                "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn", "-cp", f"{libs}/*", *args]

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return None
        # guard against a recycled pid: only our broker, with our data dir
        return pid if b"kafka.Kafka" in cmdline and str(self.data_dir).encode() in cmdline else None

    def start(self, timeout_s: float = 90.0) -> None:
        if self.pid():
            if self.answers():
                return
            raise BrokerError(f"a broker process for {self.data_dir} exists but does not answer; "
                              "run `pipeline-dev kafka down` first")
        if _port_in_use(self.host, self.port):
            raise BrokerError(f"{self.host}:{self.port} is already in use by another process")
        libs = ensure_jars(self.version, self.cache_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        formatted = (self.data_dir / "logs" / "meta.properties").exists()
        if formatted and self.secure != self.security.credentials.exists():
            raise BrokerError(f"{self.data_dir} was formatted {'without' if self.secure else 'with'} --secure; "
                              "use another data directory ([kafka] local_data_dir) or remove this one")
        if self.secure:
            self.security.ensure([self.host])
        props = self._properties()
        if not formatted:
            cluster = _cluster_id()
            fmt = subprocess.run(
                self._java(libs, "kafka.tools.StorageTool", "format", "-t", cluster, "-c", str(props),
                           *self._scram_credentials()),
                capture_output=True, text=True, timeout=120)
            if fmt.returncode != 0:
                raise BrokerError(f"formatting {self.data_dir} failed: {fmt.stderr.strip()[-500:]}")
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(self._java(libs, "kafka.Kafka", str(props)), stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BrokerError(f"broker exited with {proc.returncode}; see {self.log_file}: "
                                  + _tail(self.log_file))
            if self.answers():
                if self.secure:
                    self._secure_clients()
                return
            time.sleep(0.5)
        self.stop()
        raise BrokerError(f"broker did not answer metadata requests within {timeout_s:.0f}s; see {self.log_file}")

    def _scram_credentials(self) -> list[str]:
        """`--add-scram` options of the format: every role's SCRAM-SHA-256 and -512 credentials."""
        if not self.secure:
            return []
        out: list[str] = []
        for role, password in self.security.passwords().items():
            if role in ROLES:
                for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                    out += ["--add-scram", f"{mechanism}=[name=pipeline-{role},password={password}]"]
        return out

    def _secure_clients(self) -> None:
        """Grant every role its ACLs (idempotent) and write the client settings."""
        from pipeline.kafka.acls import pipeline_acls
        from pipeline.kafka.admin import apply_acls

        self.security.write_client_settings(self.bootstrap)
        asyncio.run(apply_acls(self.access(ADMIN), pipeline_acls("pipeline-{role}")))

    def answers(self, timeout_s: float = 5.0) -> bool:
        """True when the broker answers a metadata request (not just an open port)."""
        if not _port_in_use(self.host, self.port):
            return False
        quiet = logging.getLogger("aiokafka")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # connection refusals while it boots are expected
        try:
            return asyncio.run(_metadata_ok(self.access(ADMIN), timeout_s))
        finally:
            quiet.setLevel(level)

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the broker and wait until its process is gone. False when none was running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.2)
            if not _alive(pid):
                break
        self.pid_file.unlink(missing_ok=True)
        return True

    def status(self) -> dict[str, object]:
        pid = self.pid()
        return {"bootstrap": self.bootstrap, "pid": pid, "running": pid is not None,
                "answers": bool(pid) and self.answers(), "data_dir": str(self.data_dir),
                "version": self.version, "log": str(self.log_file), "secure": self.secure}


async def _metadata_ok(kafka: KafkaAccess, timeout_s: float) -> bool:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**client_settings(kafka), request_timeout_ms=int(timeout_s * 1000))
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        await asyncio.wait_for(admin.describe_cluster(), timeout_s)
        return True
    except Exception:  # any failure means "not answering yet"; the caller polls
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def _cluster_id() -> str:
    # Kafka's cluster id format: a UUID as unpadded base64url (what `StorageTool random-uuid`
    # prints). Like Kafka's Uuid.randomUuid, never one starting with "-": `format -t -x...`
    # reads it as an option and fails (one start in 64 did, in the fault tests).
    while True:
        cluster = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not cluster.startswith("-"):
            return cluster


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
