"""docker-compose.yml really starts and delivers: the production file, brought up on a real Docker engine.

What it needs is installed and built here, so the test runs on a bare Debian 12 machine with root:
- the engine: Debian's `docker.io` (apt-get), `dockerd` started in the background when not running;
- `docker compose` v2 (not a Debian package): built from the Go module github.com/docker/compose/v5 at
  COMPOSE_VERSION and installed as the CLI plugin ~/.docker/cli-plugins/docker-compose;
- the images, nothing pulled from Docker Hub: a Debian 12 base from debootstrap
  (deploy/docker/debian-base.sh), Debian's python3 on it (deploy/docker/python/Dockerfile), the pipeline
  image from the project's Dockerfile on that base (offline, from a wheelhouse built on the host: the
  registries answer containers with a certificate of this machine's own CA), and a Kafka image from
  the same Apache jars the local broker runs (devkit.kafka_local.ensure_jars, deploy/docker/kafka/).
The base images, the compose binary and the wheelhouse are cached by a hash of what they are built
from (image tags, the cache dir); the pipeline image is rebuilt every run (Docker's layer cache).

Then docker-compose.yml + deploy/docker/compose.test.yml (local images, host network, loopback only)
run Kafka, topics-init, two collectors, every stage (scrub scaled to 2) and the lag exporter against
the stub panel and scrubber and a real `opencode serve` driven by the scripted model, all on the host.
Kafka runs as the production file has it: SASL_SSL only (a CA and broker certificate from the one-shot
kafka-certs), SCRAM users per role, the StandardAuthorizer, the ACLs applied by kafka-acls; every service
connects as its own principal with its own password from the env file.
A turn on the daemon must reach the panel; one stage's main process is killed (kill -9), the restart
policy must bring the container back, and the next turns must be delivered with nothing lost.

Skips, with the reason, where the engine cannot run (not root, no apt-get, no Go); set
PIPELINE_DEPLOY_TEST_REQUIRED=1 to make that a failure instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.kafka_local import DEFAULT_VERSION as KAFKA_VERSION
from devkit.kafka_local import ensure_jars, free_port
from devkit.local_stack import Stack, StackSettings, wait_for
from devkit.model_stub import ModelStub
from devkit.opencode_daemon import OpencodeDaemon
from pipeline.config import kafka_password_variable
from pipeline.config.loader import DEFAULT_CACHE_DIR
from pipeline.topics import PIPELINE_STAGES
from tests.fixtures import REPO

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(1500)]

COMPOSE_MODULE = "github.com/docker/compose/v5"
COMPOSE_VERSION = "v5.6.0"  # builds with the Go here in about a minute (downloads apart)
GO = os.environ.get("GO") or shutil.which("go") or "/usr/local/go/bin/go"
DOCKER_DIR = REPO / "deploy" / "docker"
WHEELHOUSE = DOCKER_DIR / "wheelhouse"
CACHE = DEFAULT_CACHE_DIR / "deploy-test"
PROJECT = "ocpp-deploy-test"  # not the production project name: a real deployment here is left alone
COMPOSE_FILES = ("-f", str(REPO / "docker-compose.yml"), "-f", str(DOCKER_DIR / "compose.test.yml"))
SCRUB_REPLICAS = 2
# two collectors share the host through their consumer group: one follows it, and each turn arrives once
COLLECTOR_REPLICAS = 2
# the principals docker-compose.yml runs (pipeline-<role>): the stages, the collector, the operator
# (topics-init), the lag exporter and the admin (kafka-acls, the broker itself)
KAFKA_ROLES = (*PIPELINE_STAGES, "collector", "operator", "lag", "admin")


def digest(*parts: str | bytes | Path) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.read_bytes() if isinstance(part, Path) else part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()[:12]


def run(cmd: Sequence[str], *, timeout: float = 900, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc


def cannot(reason: str) -> None:
    if os.environ.get("PIPELINE_DEPLOY_TEST_REQUIRED") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


# ---------------------------------------------------------------- the engine and the compose client


def apt_install(*packages: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if run(["apt-get", "install", "-y", "--no-install-recommends", *packages], check=False, env=env).returncode:
        run(["apt-get", "update"], env=env)
        run(["apt-get", "install", "-y", "--no-install-recommends", *packages], env=env)


def docker_answers() -> bool:
    return shutil.which("docker") is not None and run(["docker", "info"], check=False, timeout=30).returncode == 0


@pytest.fixture(scope="module")
def docker_engine() -> Iterator[None]:
    """A running Docker engine: Debian's docker.io installed and dockerd started when needed.
    A dockerd this fixture started is stopped again at the end (the images stay on disk)."""
    if docker_answers():
        yield
        return
    if os.geteuid() != 0:
        cannot("the Docker engine is not running and starting it needs root")
    if not shutil.which("dockerd"):
        if not shutil.which("apt-get"):
            cannot("no dockerd and no apt-get to install Debian's docker.io")
        apt_install("docker.io")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "dockerd.log", "ab") as log:
        daemon = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not docker_answers():
            if daemon.poll() is not None or time.monotonic() > deadline:
                tail = (CACHE / "dockerd.log").read_text(errors="replace")[-1500:]
                cannot(f"dockerd did not start here (exit {daemon.poll()}):\n{tail}")
            time.sleep(0.5)
        yield
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(10)


def ensure_compose() -> str:
    """`docker compose` as a CLI plugin; built from source when the docker CLI has none. Returns its version."""
    probe = run(["docker", "compose", "version", "--short"], check=False, timeout=30)
    if probe.returncode == 0:
        return probe.stdout.strip()
    built = CACHE / f"docker-compose-{COMPOSE_VERSION}"
    if not built.exists():
        if not Path(GO).exists() and not shutil.which(GO):
            cannot(f"no docker compose and no Go to build {COMPOSE_MODULE}@{COMPOSE_VERSION}")
        env = {**os.environ, "GOFLAGS": "-buildvcs=false -mod=readonly", "CGO_ENABLED": "0"}
        # `go install module/cmd@version` refuses this module (its go.mod has exclude directives):
        # build inside the downloaded module instead, as its main module
        info = json.loads(run([GO, "mod", "download", "-json", f"{COMPOSE_MODULE}@{COMPOSE_VERSION}"],
                              env=env, cwd=tempfile.gettempdir()).stdout)
        partial = built.with_suffix(".partial")
        run([GO, "build", "-trimpath", "-ldflags",
             f"-s -w -X {COMPOSE_MODULE}/internal.Version={COMPOSE_VERSION}", "-o", str(partial), "./cmd"],
            env=env, cwd=info["Dir"], timeout=1200)
        partial.rename(built)
    plugins = Path.home() / ".docker" / "cli-plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    shutil.copy2(built, plugins / "docker-compose")
    return run(["docker", "compose", "version", "--short"], timeout=30).stdout.strip()


# ---------------------------------------------------------------- the images


def image_exists(name: str) -> bool:
    return run(["docker", "image", "inspect", name], check=False, timeout=30).returncode == 0


def image_id(name: str) -> str:
    return run(["docker", "image", "inspect", "-f", "{{.Id}}", name], timeout=30).stdout.strip()


def docker_build(context: Path, tag: str, *args: str, dockerfile: Path | None = None) -> None:
    # the classic builder: Debian's engine has no buildx, and nothing here needs BuildKit
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    run(["docker", "build", "-q", "-t", tag, *(["-f", str(dockerfile)] if dockerfile else []), *args, str(context)],
        env=env, timeout=1200)


def debian_base() -> str:
    script = DOCKER_DIR / "debian-base.sh"
    tag = f"ocpp-deploy/debian:bookworm-{digest(script)}"
    if not image_exists(tag):
        if not shutil.which("debootstrap"):
            apt_install("debootstrap")
        run(["sh", str(script), tag], timeout=1200)
    return tag


def python_base(base: str) -> str:
    folder = DOCKER_DIR / "python"
    tag = f"ocpp-deploy/python:3.11-{digest(image_id(base), folder / 'Dockerfile')}"
    if not image_exists(tag):
        docker_build(folder, tag, "--build-arg", f"BASE={base}")
    return tag


def kafka_image(base: str) -> str:
    folder = DOCKER_DIR / "kafka"
    libs = ensure_jars(KAFKA_VERSION, DEFAULT_CACHE_DIR)
    jars = sorted(p.name for p in libs.glob("*.jar"))
    tag = f"ocpp-deploy/kafka:{KAFKA_VERSION}-" + digest(image_id(base), folder / "Dockerfile",
                                                         folder / "kafka-run.sh", "\n".join(jars))
    if not image_exists(tag):
        with tempfile.TemporaryDirectory() as tmp:
            context = Path(tmp)
            shutil.copy2(folder / "Dockerfile", context / "Dockerfile")
            shutil.copy2(folder / "kafka-run.sh", context / "kafka-run.sh")
            (context / "libs").mkdir()
            for jar in jars:
                shutil.copy2(libs / jar, context / "libs" / jar)
            docker_build(context, tag, "--build-arg", f"BASE={base}")
    return tag


def wheelhouse() -> None:
    """Wheels of every dependency of the product (and its build backend) in deploy/docker/wheelhouse,
    built on the host with its pip (and its registry CA), for the image's offline install."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = [*project["build-system"]["requires"], *project["project"]["dependencies"]]
    marker = WHEELHOUSE / f".complete-{digest(*requirements)}"
    if marker.exists():
        return
    for old in WHEELHOUSE.glob(".complete-*"):
        old.unlink()
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(WHEELHOUSE), *requirements], timeout=900)
    marker.touch()


def pipeline_image(base: str) -> str:
    wheelhouse()
    tag = "ocpp-deploy/pipeline:test"
    args = ("--build-arg", f"BASE={base}", "--build-arg", "OFFLINE=1", "--label", "ocpp-deploy-test=pipeline")
    # the build stage tagged too, so that the images a rebuild replaces (and only they) are dangling,
    # and removing them keeps the layer cache of the current build
    docker_build(REPO, tag + "-build", "--target", "build", *args)
    docker_build(REPO, tag, *args)
    run(["docker", "image", "prune", "-f", "--filter", "label=ocpp-deploy-test=pipeline"], timeout=300)
    return tag


@pytest.fixture(scope="module")
def images(docker_engine: None) -> Iterator[dict[str, str]]:
    """Every image and the compose client, built in parallel where they do not depend on each other."""
    timings: dict[str, float] = {}

    def timed(name: str, fn: Callable[..., str], *args: str) -> str:
        start = time.monotonic()
        try:
            return fn(*args)
        finally:
            timings[name] = round(time.monotonic() - start, 1)

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        compose = pool.submit(timed, "compose", ensure_compose)
        base = timed("debian-base", debian_base)
        py = pool.submit(timed, "python-base", python_base, base)
        kafka = pool.submit(timed, "kafka-image", kafka_image, base)
        pipeline = timed("pipeline-image", pipeline_image, py.result())
        found = {"compose": compose.result(), "kafka": kafka.result(), "pipeline": pipeline, "base": py.result()}
    print(f"\nbuilt/reused: {found}\ntimings (s): {timings}")
    yield found


# ---------------------------------------------------------------- the stack


class Compose:
    def __init__(self, env_file: Path) -> None:
        self.env_file = env_file

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["docker", "compose", "-p", PROJECT, *COMPOSE_FILES, "--env-file", str(self.env_file), *args],
                   timeout=timeout, check=check, cwd=REPO)

    def containers(self) -> list[dict[str, Any]]:
        ids = self("ps", "-a", "-q").stdout.split()
        if not ids:
            return []
        return list(json.loads(run(["docker", "inspect", *ids], timeout=60).stdout))

    def of(self, service: str) -> list[dict[str, Any]]:
        return [c for c in self.containers() if c["Config"]["Labels"].get("com.docker.compose.service") == service]

    def logs(self, tail: int = 60) -> str:
        return self("logs", "--no-color", "--tail", str(tail), check=False, timeout=120).stdout


def healthy(c: dict[str, Any]) -> bool:
    return bool(c["State"]["Running"]) and c["State"].get("Health", {}).get("Status") == "healthy"


def metrics_port(container: dict[str, Any]) -> int:
    return int(run(["docker", "exec", container["Id"], "cat", "/tmp/metrics-port"], timeout=30).stdout)


def stack_config(daemon: OpencodeDaemon, path: Path) -> Path:
    """deploy/pipeline.toml with its host pointing at the test's daemon; everything else is the
    production file, overridden only by the environment in compose.test.yml."""
    text = (REPO / "deploy" / "pipeline.toml").read_text()
    text, n = re.subn(r'(?m)^base_url = ".*"', f'base_url = "{daemon.url}"', text)
    assert n == 1, "deploy/pipeline.toml: expected one [[hosts]] entry with a base_url"
    path.write_text(text)
    path.chmod(0o644)
    return path


async def run_turns(daemon: OpencodeDaemon, prompts: Sequence[str], session: str | None = None) -> str:
    async with daemon.client() as client:
        if session is None:
            session = (await client.run_task(prompts[0], title=prompts[0][:20]))["session_id"]
            prompts = prompts[1:]
        for prompt in prompts:
            await client.continue_session(session, prompt)
    return session


def delivered(stubs: Stack) -> dict[str, set[str]]:
    """session id -> the trace ids the stub panel accepted for it."""
    by_session: dict[str, set[str]] = {}
    for trace in stubs.panel_accepted():
        by_session.setdefault(trace["body"]["blob"]["session_id"], set()).add(trace["trace_id"])
    return by_session


def wait_delivered(stubs: Stack, expected: dict[str, int], timeout_s: float, compose: Compose) -> None:
    def done() -> bool:
        got = delivered(stubs)
        return all(len(got.get(sid, ())) >= n for sid, n in expected.items())
    try:
        wait_for(done, timeout_s, interval_s=1.0, what=f"traces of {expected} at the panel")
    except TimeoutError:
        raise AssertionError(f"panel has {delivered(stubs)}; panel stats {stubs.panel_stats()}\n"
                             f"{compose.logs()}\n{stubs.logs_tail()}") from None


def assert_broker_enforces(bootstrap: str, ca: Path, env_file: Path) -> None:
    """A PLAINTEXT client cannot even connect; the sign stage's principal (SASL_SSL, its own password
    from the compose env) connects but may not write traces.outbox (only the breaker's may)."""
    from aiokafka.errors import KafkaConnectionError, TopicAuthorizationFailedError

    from pipeline.config import Secret
    from pipeline.kafka.security import KafkaAccess
    from tests.kafka_util import forge_outbox

    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)

    with pytest.raises(KafkaConnectionError):
        asyncio.run(forge_outbox(KafkaAccess.plain(bootstrap)))
    sign = KafkaAccess(bootstrap, role="sign", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                       username="pipeline-sign", password=Secret(env[kafka_password_variable("sign")]),
                       ssl_cafile=str(ca))
    with pytest.raises(TopicAuthorizationFailedError):
        asyncio.run(forge_outbox(sign))


def test_the_compose_file_runs_and_delivers(images: dict[str, str], tmp_path: Path) -> None:
    started = time.monotonic()
    stubs = Stack(StackSettings(bootstrap="127.0.0.1:1", workdir=tmp_path / "stubs"))
    password = "pw-" + os.urandom(6).hex()
    kafka_port, controller_port = free_port(), free_port()
    env_file = tmp_path / "compose.env"
    compose = Compose(env_file)
    with contextlib.ExitStack() as stack:
        model = stack.enter_context(ModelStub())
        daemon = stack.enter_context(OpencodeDaemon(tmp_path / "project", model.base_url, password=password))
        stack.callback(stubs.stop)
        stubs.write_config()  # the stubs' own (they read no more of it than a pipeline config must have)
        stubs.start_stubs()
        secrets = stubs.env
        env_file.write_text("\n".join(f"{k}={v}" for k, v in {
            "DEPLOY_TEST_PIPELINE_IMAGE": images["pipeline"],
            "DEPLOY_TEST_KAFKA_IMAGE": images["kafka"],
            "DEPLOY_TEST_KAFKA_PORT": kafka_port,
            "DEPLOY_TEST_CONTROLLER_PORT": controller_port,
            "DEPLOY_TEST_PANEL_URL": stubs.panel_url,
            "DEPLOY_TEST_SCRUBBER_URL": stubs.scrubber_url,
            "DEPLOY_TEST_CONFIG": stack_config(daemon, tmp_path / "pipeline.toml"),
            "PANEL_INGEST_SECRET_PK_TEST_THIRDPARTY": secrets["PANEL_INGEST_SECRET_PK_TEST_THIRDPARTY"],
            "SCRUBBER_JWT_SECRET": secrets["SCRUBBER_JWT_SECRET"],
            "SCRUBBER_API_KEY": secrets["SCRUBBER_API_KEY"],
            "OPENCODE_PASSWORD_BUILD1": password,
            "GRAFANA_ADMIN_PASSWORD": "unused-here",
            # one SCRAM principal per role (docker-compose.yml), each with a password of its own
            **{kafka_password_variable(role): os.urandom(24).hex() for role in KAFKA_ROLES},
        }.items()) + "\n")

        compose("down", "-v", "--remove-orphans", "--timeout", "5", check=False)  # a run killed half-way
        stack.callback(lambda: compose("down", "-v", "--remove-orphans", "--timeout", "10", check=False))
        up = compose("up", "-d", "--no-build", "--scale", f"scrub={SCRUB_REPLICAS}",
                     "--scale", f"collector={COLLECTOR_REPLICAS}", timeout=420, check=False)
        assert up.returncode == 0, f"compose up failed:\n{up.stderr[-3000:]}\n{compose.logs()}"
        t_up = time.monotonic()

        services = {"collector", *PIPELINE_STAGES, "lag-exporter"}
        running = {c["Config"]["Labels"]["com.docker.compose.service"] for c in compose.containers()
                   if c["State"]["Running"]}
        assert services | {"kafka"} <= running, f"not running: {services - running}\n{compose.logs()}"
        assert len(compose.of("scrub")) == SCRUB_REPLICAS
        assert len(compose.of("collector")) == COLLECTOR_REPLICAS
        for one_shot in ("kafka-certs", "kafka-acls", "topics-init"):
            state = compose.of(one_shot)[0]["State"]
            assert (state["Status"], state["ExitCode"]) == ("exited", 0), f"{one_shot}: {state}\n{compose.logs()}"

        # a real turn on the daemon, through the collector and every stage, to the panel
        first = asyncio.run(run_turns(daemon, ["[[tool:bash:echo deployed]] run a command in the deployed stack"]))
        expected = {first: 1}
        wait_delivered(stubs, expected, 240, compose)
        t_first = time.monotonic()

        # every process answers its /healthz (the compose healthchecks), as its user, with JSON logs
        def all_healthy() -> bool:
            return all(healthy(c) for s in services for c in compose.of(s))
        try:
            wait_for(all_healthy, 120, interval_s=2.0, what="every pipeline container healthy")
        except TimeoutError:
            states = {c["Name"]: c["State"].get("Health", {}).get("Status") for c in compose.containers()}
            raise AssertionError(f"health: {states}\n{compose.logs()}") from None
        collector = compose.of("collector")[0]
        # the runtime user owns its data directory; the collector's state is in Kafka, on no volume
        owner = run(["docker", "exec", collector["Id"], "stat", "-c", "%u", "/var/lib/pipeline"]).stdout
        assert owner.strip() == "10001"
        mounts = json.loads(run(["docker", "inspect", "-f", "{{json .Mounts}}", collector["Id"]]).stdout)
        # one volume only, read-only: the CA certificate of the broker (kafka-ca)
        volumes = [(m["Destination"], m["RW"]) for m in mounts if m.get("Type") == "volume"]
        assert volumes == [("/etc/pipeline/kafka-ca", False)], mounts
        logs = run(["docker", "logs", collector["Id"]])
        lines = [ln for ln in (logs.stdout + logs.stderr).splitlines() if ln.startswith("{")]
        assert lines and all(isinstance(json.loads(ln), dict) for ln in lines), "collector logs are not JSON lines"
        lag = httpx.get(f"http://127.0.0.1:{metrics_port(compose.of('lag-exporter')[0])}/metrics", timeout=10)
        assert lag.status_code == 200 and 'stage="deliver"' in lag.text, lag.text[-2000:]
        # the broker lets no one in without SASL over TLS, and a principal only where its ACLs allow
        ca = tmp_path / "kafka-ca.pem"
        ca.write_text(run(["docker", "exec", compose.of("kafka")[0]["Id"], "cat", "/etc/kafka/tls/ca.pem"]).stdout)
        assert_broker_enforces(f"127.0.0.1:{kafka_port}", ca, env_file)

        # kill -9 the main process of a stage's only replica: the restart policy brings it back
        victim = compose.of("sign")[0]
        os.kill(int(victim["State"]["Pid"]), signal.SIGKILL)
        wait_for(lambda: compose.of("sign")[0]["RestartCount"] > victim["RestartCount"]
                 and compose.of("sign")[0]["State"]["Running"], 60, what="sign restarted by its restart policy")
        t_killed = time.monotonic()

        # the next turns (one on the same session, one new) still arrive, and nothing is lost
        asyncio.run(run_turns(daemon, ["second turn after the kill"], session=first))
        second = asyncio.run(run_turns(daemon, ["[[tool:read:missing.txt]] a new session after the kill"]))
        expected = {first: 2, second: 1}
        wait_delivered(stubs, expected, 240, compose)
        got = delivered(stubs)
        assert {sid: len(got[sid]) for sid in expected} == expected
        wait_for(lambda: healthy(compose.of("sign")[0]), 120, interval_s=2.0, what="sign healthy again")
        t_done = time.monotonic()
        print(f"\nstack: up {t_up - started:.0f}s, first trace +{t_first - t_up:.0f}s, "
              f"restart +{t_killed - t_first:.0f}s, after-kill traces +{t_done - t_killed:.0f}s")

    assert not compose.containers(), "compose down left containers behind"
