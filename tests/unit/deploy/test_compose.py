"""docker-compose.yml is for production (tests/deploy/test_stack.py runs it on a real engine, where one
can run): check that it and the test's override parse, and that every pipeline service runs a real
`pipeline` subcommand and stage, with JSON logs and a /healthz healthcheck."""

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
from pipeline.topics import PIPELINE_STAGES, STAGES
from tests.fixtures import REPO


def subcommands() -> set[str]:
    action = next(a for a in parser()._actions if a.dest == "command")
    return set(action.choices)  # type: ignore[arg-type]


def test_every_pipeline_service_names_a_real_subcommand() -> None:
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = doc["services"]
    pipeline_services = {n: s for n, s in services.items() if s.get("build") == "."}
    assert {"topics-init", "collector", "lag-exporter", *PIPELINE_STAGES} <= set(pipeline_services)
    known = subcommands()
    for name, svc in pipeline_services.items():
        cmd = svc["command"]
        assert cmd[:2] == ["--log-format", "json"], f"{name}: logs must be JSON lines (--log-format json first)"
        args = parser().parse_args(cmd)
        assert args.command in known, f"{name}: `pipeline {args.command}` does not exist"
        if args.command == "worker":
            assert args.stage in STAGES, f"{name}: unknown stage {args.stage}"
        if name != "topics-init":
            assert svc.get("restart") == "unless-stopped" and "healthcheck" in svc
            assert "/healthz" in " ".join(svc["healthcheck"]["test"]), f"{name}: healthcheck is not /healthz"
            assert args.metrics_port == 9100, f"{name}: /healthz is served on the metrics port the check asks"
    assert parser().parse_args(services["lag-exporter"]["command"]).serve
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "kafka-data" in doc["volumes"]


def test_monitoring_binds_to_loopback_and_takes_its_passwords_from_env() -> None:
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    monitoring = {n: s for n, s in services.items() if "monitoring" in s.get("profiles", [])}
    assert {"prometheus", "grafana", "kafka-ui"} <= set(monitoring)
    for name, svc in monitoring.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is published on every interface"
    assert services["kafka-ui"]["image"].startswith("kafbat/kafka-ui:")
    assert "${GRAFANA_ADMIN_PASSWORD:?" in services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert "${KAFKA_UI_PASSWORD:?" in services["kafka-ui"]["environment"]["SPRING_SECURITY_USER_PASSWORD"]
    assert "./deploy/alerts.yml:/etc/prometheus/alerts.yml:ro" in services["prometheus"]["volumes"]
    example = (REPO / ".env.example").read_text().split()
    assert "GRAFANA_ADMIN_PASSWORD=" in example and "KAFKA_UI_PASSWORD=" in example


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


def test_docker_compose_refuses_to_start_without_the_monitoring_passwords(tmp_path: Path) -> None:
    check = compose_config()
    if check is None:
        pytest.skip("neither a docker compose client nor Go to build tools/composecheck")
    env = tmp_path / ".env"
    env.write_text((REPO / ".env.example").read_text())
    proc = check(REPO / "docker-compose.yml", env, ["monitoring"])
    assert proc.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in proc.stderr


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
