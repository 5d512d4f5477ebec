"""docker-compose.yml is for production (tests/deploy/test_stack.py runs it on a real engine, where one
can run): check that it and the test's override parse, that every pipeline service runs a real
`pipeline` subcommand and stage, with JSON logs and a /healthz healthcheck, and that Kafka is secured:
no PLAINTEXT client listener, every pipeline service its own principal and password variable, no
secret value in the file."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import config as config_mod
from pipeline.cli.main import parser
from pipeline.config import kafka_password_variable
from pipeline.kafka.acls import principal
from pipeline.kafka.security import ADMIN, COLLECTOR, LAG, OPERATOR, ROLES
from pipeline.topics import PIPELINE_STAGES, STAGES
from tests.fixtures import REPO

ONE_SHOTS = {"kafka-acls", "topics-init"}  # run once before the stages (restart: "no", no healthcheck)
# the role (principal pipeline-<role>) each `pipeline` subcommand connects as (pipeline/kafka/security.py)
ROLE_OF_COMMAND = {"collect": COLLECTOR, "topics": OPERATOR, "lag": OPERATOR, "dead": OPERATOR, "hosts": OPERATOR,
                   "kafka": ADMIN}
DEPLOYED_ROLES = (*PIPELINE_STAGES, COLLECTOR, OPERATOR, LAG, ADMIN)  # passthrough is a wiring check, never deployed


def compose_doc() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def pipeline_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose_doc()["services"].items() if s.get("build") == "."}


def role_of(svc: dict[str, Any]) -> str:
    args = parser().parse_args(svc["command"])
    if args.command == "worker":
        return args.stage
    return LAG if args.command == "lag" and args.serve else ROLE_OF_COMMAND[args.command]


def properties(env: dict[str, Any]) -> dict[str, str]:
    """The broker's KAFKA_* variables as the properties kafka-run.sh (and apache/kafka) make of them."""
    out = {}
    for name, value in env.items():
        if name.startswith("KAFKA_") and name not in ("KAFKA_HEAP_OPTS", "KAFKA_OPTS", "KAFKA_LOG_LEVEL"):
            key = name[len("KAFKA_"):].lower().replace("___", "-").replace("__", "@")
            key = key.replace("_", ".").replace("@", "_")
            out[key] = str(value)
    return out


def subcommands() -> set[str]:
    action = next(a for a in parser()._actions if a.dest == "command")
    return set(action.choices)  # type: ignore[arg-type]


def test_every_pipeline_service_names_a_real_subcommand() -> None:
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = doc["services"]
    pipeline_services = {n: s for n, s in services.items() if s.get("build") == "."}
    assert {*ONE_SHOTS, "collector", "lag-exporter", *PIPELINE_STAGES} <= set(pipeline_services)
    known = subcommands()
    for name, svc in pipeline_services.items():
        cmd = svc["command"]
        assert cmd[:2] == ["--log-format", "json"], f"{name}: logs must be JSON lines (--log-format json first)"
        args = parser().parse_args(cmd)
        assert args.command in known, f"{name}: `pipeline {args.command}` does not exist"
        if args.command == "worker":
            assert args.stage in STAGES, f"{name}: unknown stage {args.stage}"
        if name in ONE_SHOTS:
            assert svc.get("restart") == "no", f"{name}: a one-shot is not restarted"
        else:
            assert svc.get("restart") == "unless-stopped" and "healthcheck" in svc
            assert "/healthz" in " ".join(svc["healthcheck"]["test"]), f"{name}: healthcheck is not /healthz"
            assert args.metrics_port == 9100, f"{name}: /healthz is served on the metrics port the check asks"
    assert parser().parse_args(services["lag-exporter"]["command"]).serve
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "kafka-data" in doc["volumes"]
    # the ACLs exist before topics-init creates the topics as the operator, and before any stage starts
    assert parser().parse_args(services["kafka-acls"]["command"]).action == "acls"
    assert services["kafka-acls"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["topics-init"]["depends_on"]["kafka-acls"]["condition"] == "service_completed_successfully"
    for name, svc in pipeline_services.items():
        if name not in ONE_SHOTS:
            assert svc["depends_on"]["topics-init"]["condition"] == "service_completed_successfully", name


def test_monitoring_binds_to_loopback_and_takes_its_passwords_from_env() -> None:
    services = compose_doc()["services"]
    monitoring = {n: s for n, s in services.items() if "monitoring" in s.get("profiles", [])}
    assert {"prometheus", "grafana"} <= set(monitoring)
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is published on every interface"
    # no Kafka UI: it would show unscrubbed session content to whoever passes its login
    assert not [n for n, s in services.items() if "kafka-ui" in str(s.get("image", ""))]
    assert "${GRAFANA_ADMIN_PASSWORD:?" in services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert "./deploy/alerts.yml:/etc/prometheus/alerts.yml:ro" in services["prometheus"]["volumes"]
    example = (REPO / ".env.example").read_text().split()
    assert "GRAFANA_ADMIN_PASSWORD=" in example


# --- Kafka security ---------------------------------------------------------------------------

def test_kafka_has_no_plaintext_client_listener_and_refuses_what_no_acl_allows() -> None:
    services = compose_doc()["services"]
    override = yaml.safe_load((REPO / "deploy" / "docker" / "compose.test.yml").read_text())["services"]
    for env in (services["kafka"]["environment"], {**services["kafka"]["environment"],
                                                   **override["kafka"]["environment"]}):
        props = properties(env)
        protocols = dict(entry.split(":", 1) for entry in props["listener.security.protocol.map"].split(","))
        controllers = set(props["controller.listener.names"].split(","))
        listeners = {entry.split("://")[0]: entry.split("://")[1] for entry in props["listeners"].split(",")}
        assert "PLAINTEXT" not in protocols.values(), protocols
        for name, address in listeners.items():
            if name in controllers:
                # the controller listener is the broker's own: authenticated, on the loopback interface
                assert protocols[name] == "SASL_PLAINTEXT" and address.split(":")[0] in ("localhost", "127.0.0.1")
            else:
                assert protocols[name] == "SASL_SSL", f"client listener {name} is {protocols[name]}"
        for entry in props["advertised.listeners"].split(","):
            assert protocols[entry.split("://")[0]] == "SASL_SSL", entry
        assert protocols[props["inter.broker.listener.name"]] == "SASL_SSL"
        assert props["authorizer.class.name"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
        assert props["allow.everyone.if.no.acl.found"] == "false"
    props = properties(services["kafka"]["environment"])
    template = services["kafka"]["environment"]["SCRAM_USERNAME_TEMPLATE"]
    assert props["super.users"].split(";") == [principal(template, ADMIN), "User:controller"]
    assert "SCRAM-SHA-512" in props["sasl.enabled.mechanisms"].split(",")
    assert props["ssl.client.auth"] == "none" and props["ssl.keystore.location"].startswith("/etc/kafka/tls/")
    assert "ports" not in services["kafka"], "Kafka is reached inside the compose network only"
    # the health check logs in over SASL_SSL with a client properties file, as the kafka-broker-api-versions
    # check of apache/kafka does
    assert "kafka-health.sh" in " ".join(services["kafka"]["healthcheck"]["test"])
    health = (REPO / "deploy" / "docker" / "kafka" / "kafka-health.sh").read_text()
    assert "kafka-broker-api-versions.sh" in health and "--command-config" in health
    assert services["kafka"]["depends_on"]["kafka-certs"]["condition"] == "service_completed_successfully"


def test_every_pipeline_service_connects_as_its_own_principal_with_its_own_password() -> None:
    doc = compose_doc()
    services = doc["services"]
    cfg = config_mod.load(REPO / "deploy" / "pipeline.toml", env={"OPENCODE_PASSWORD_BUILD1": "x"})
    assert cfg.kafka.security_protocol == "SASL_SSL" and cfg.kafka.sasl_mechanism.startswith("SCRAM-")
    template = cfg.kafka.sasl_username
    assert "{role}" in template, "one principal per role needs {role} in [kafka] sasl_username"
    assert template == services["kafka"]["environment"]["SCRAM_USERNAME_TEMPLATE"]
    every_variable = {"KAFKA_SASL_PASSWORD", *(kafka_password_variable(r) for r in ROLES)}
    seen: dict[str, str] = {}
    for name, svc in pipeline_services().items():
        role = role_of(svc)
        own = kafka_password_variable(role)
        env = svc["environment"]
        assert str(env[own]).startswith(f"${{{own}:?"), f"{name}: {own} must come from .env, required"
        # every other role's password blanked: env_file hands all of .env to every container
        for other in every_variable - {own}:
            assert env.get(other) == "", f"{name} ({role}) can see {other}"
        # the CA file the config names is mounted
        ca_dir = str(Path(cfg.kafka.ssl_cafile).parent)
        assert f"kafka-ca:{ca_dir}:ro" in svc["volumes"], f"{name}: {cfg.kafka.ssl_cafile} is not mounted"
        seen[name] = role
    assert {seen[s] for s in PIPELINE_STAGES} == set(PIPELINE_STAGES)
    assert (seen["collector"], seen["lag-exporter"], seen["topics-init"], seen["kafka-acls"]) == (
        COLLECTOR, LAG, OPERATOR, ADMIN)
    # the broker has a SCRAM user for each of them, with the password from the same variable
    kafka_env = services["kafka"]["environment"]
    users = {n[len("SCRAM_PASSWORD_"):].lower(): v for n, v in kafka_env.items() if n.startswith("SCRAM_PASSWORD_")}
    assert set(users) == set(DEPLOYED_ROLES)
    for role, value in users.items():
        assert str(value).startswith(f"${{{kafka_password_variable(role)}:?"), role
    # .env.example names every variable, empty, and says how to make one
    example = (REPO / ".env.example").read_text()
    for role in DEPLOYED_ROLES:
        assert f"\n{kafka_password_variable(role)}=\n" in example, role
    assert "openssl rand" in example


def test_no_secret_value_in_the_compose_files() -> None:
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|JAAS")
    for path in (REPO / "docker-compose.yml", REPO / "deploy" / "docker" / "compose.test.yml"):
        for name, svc in yaml.safe_load(path.read_text())["services"].items():
            env = svc.get("environment") or {}
            assert isinstance(env, dict), f"{path.name} {name}: environment as a mapping, please"
            for key, value in env.items():
                if secretish.search(key):
                    assert value == "" or re.fullmatch(r"\$\{\w+(:\?[^}]*)?\}", str(value)), (
                        f"{path.name} {name}: {key} holds a value, not a ${{VARIABLE}} from .env")
    text = (REPO / "docker-compose.yml").read_text()
    assert "sasl.jaas.config" not in text.lower() and "password=" not in text.lower()


def test_env_example_is_committed_and_env_is_not() -> None:
    assert (REPO / ".env.example").exists()
    assert ".env" in (REPO / ".gitignore").read_text().split()


def compose_config() -> Callable[..., subprocess.CompletedProcess[str]] | None:
    """`docker compose config` where a compose client exists, else tools/composecheck (the same
    loader, compose-go) built by `./dev setup` into the cache, or built here when Go is present.
    Returns check(compose_file, env_file=None, profiles=()) or None."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        def docker_compose(file: Path, env_file: Path | None = None, profiles: Sequence[str] = (),
                           extra: Sequence[Path] = ()) -> Any:
            flags = [*(["--env-file", str(env_file)] if env_file else []), *(f"--profile={p}" for p in profiles)]
            files = [arg for f in (file, *extra) for arg in ("-f", str(f))]
            return subprocess.run([docker, "compose", *files, *flags, "config", "-q"],
                                  capture_output=True, text=True, cwd=file.parent)
        return docker_compose
    built = config_mod.DEFAULT_CACHE_DIR / "composecheck"
    go = shutil.which("go")
    if not built.exists() and go:
        build = subprocess.run([go, "build", "-o", str(built), "."], cwd=REPO / "tools" / "composecheck",
                               env={**os.environ, "GOFLAGS": "-mod=readonly"}, capture_output=True, text=True,
                               timeout=600)
        if build.returncode != 0:
            pytest.fail(f"building tools/composecheck failed:\n{build.stderr[-2000:]}")
    if not built.exists():
        return None

    def composecheck(file: Path, env_file: Path | None = None, profiles: Sequence[str] = (),
                     extra: Sequence[Path] = ()) -> Any:
        # composecheck loads one file: an override (`extra`) is checked on its own after the file
        flags = [*(["-env-file", str(env_file)] if env_file else []), *(f"-profile={p}" for p in profiles)]
        for f in (file, *extra):
            proc = subprocess.run([str(built), *flags, str(f)], capture_output=True, text=True, cwd=file.parent)
            if proc.returncode != 0:
                break
        return proc
    return composecheck


def filled_env(tmp_path: Path) -> Path:
    """.env.example with every value an operator must fill in filled in."""
    env = tmp_path / ".env"
    lines = (REPO / ".env.example").read_text().splitlines()
    env.write_text("\n".join(f"{ln}filled-in" if ln.endswith("=") and not ln.startswith("#") else ln
                             for ln in lines) + "\n")
    return env


def test_docker_compose_config_accepts_the_production_file(tmp_path: Path) -> None:
    check = compose_config()
    if check is None:
        pytest.skip("neither a docker compose client nor Go to build tools/composecheck")
    proc = check(REPO / "docker-compose.yml", filled_env(tmp_path), ["monitoring"])
    assert proc.returncode == 0, proc.stderr


def test_docker_compose_refuses_to_start_without_the_passwords(tmp_path: Path) -> None:
    check = compose_config()
    if check is None:
        pytest.skip("neither a docker compose client nor Go to build tools/composecheck")
    env = tmp_path / ".env"
    env.write_text((REPO / ".env.example").read_text())
    proc = check(REPO / "docker-compose.yml", env, ["monitoring"])
    assert proc.returncode != 0 and re.search(r"GRAFANA_ADMIN_PASSWORD|KAFKA_SASL_PASSWORD_", proc.stderr)
    # every value filled in but the monitoring login, or one Kafka principal's password: refused, naming it
    for missing in ("GRAFANA_ADMIN_PASSWORD", "KAFKA_SASL_PASSWORD_SIGN"):
        filled = filled_env(tmp_path).read_text().replace(f"{missing}=filled-in\n", f"{missing}=\n")
        env.write_text(filled)
        proc = check(REPO / "docker-compose.yml", env, ["monitoring"])
        assert proc.returncode != 0 and missing in proc.stderr, (missing, proc.stderr)


def test_the_deploy_tests_override_applies_to_the_production_file(tmp_path: Path) -> None:
    # deploy/docker/compose.test.yml (tests/deploy/test_stack.py): both files together must load
    check = compose_config()
    if check is None:
        pytest.skip("neither a docker compose client nor Go to build tools/composecheck")
    env = filled_env(tmp_path)
    text = (REPO / "deploy" / "docker" / "compose.test.yml").read_text()
    names = sorted(set(re.findall(r"\$\{(DEPLOY_TEST_\w+):\?", text)))
    with env.open("a") as f:
        f.writelines(f"{name}={tmp_path / name if name.endswith('CONFIG') else '1'}\n" for name in names)
    proc = check(REPO / "docker-compose.yml", env, (), extra=[REPO / "deploy" / "docker" / "compose.test.yml"])
    assert proc.returncode == 0, proc.stderr
    override = yaml.safe_load(text)
    base = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    for name, svc in base.items():
        if "monitoring" in svc.get("profiles", []):
            continue
        assert override["services"][name].get("network_mode") == "host", f"{name}: not on the host network"


def test_the_compose_check_refuses_what_docker_compose_refuses(tmp_path: Path) -> None:
    # the check above is only worth something if the same loader fails on a broken file
    check = compose_config()
    if check is None:
        pytest.skip("neither a docker compose client nor Go to build tools/composecheck")
    broken = tmp_path / "compose.yml"
    broken.write_text("services:\n  a:\n    image: x\n    depends_on: [missing]\n")
    proc = check(broken)
    assert proc.returncode != 0 and "missing" in proc.stderr
