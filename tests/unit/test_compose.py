"""docker-compose.yml is for production; nothing here runs it, so check that it parses and that
every pipeline service runs a real `pipeline` subcommand and stage."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.cli import parser
from pipeline.topics import PIPELINE_STAGES, STAGES

REPO = Path(__file__).resolve().parents[2]


def subcommands() -> set[str]:
    action = next(a for a in parser()._actions if a.dest == "command")
    return set(action.choices)  # type: ignore[arg-type]


def test_every_pipeline_service_names_a_real_subcommand() -> None:
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = doc["services"]
    pipeline_services = {n: s for n, s in services.items() if s.get("build") == "."}
    assert {"topics-init", "collector", *PIPELINE_STAGES} <= set(pipeline_services)
    known = subcommands()
    for name, svc in pipeline_services.items():
        cmd = svc["command"]
        assert cmd[0] in known, f"{name}: `pipeline {cmd[0]}` does not exist"
        if cmd[0] == "worker":
            assert cmd[1] in STAGES, f"{name}: unknown stage {cmd[1]}"
            assert svc.get("restart") == "unless-stopped" and "healthcheck" in svc
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "kafka-data" in doc["volumes"]


def test_env_example_is_committed_and_env_is_not() -> None:
    assert (REPO / ".env.example").exists()
    assert ".env" in (REPO / ".gitignore").read_text().split()


def test_docker_compose_config_parses_when_a_client_is_present(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no docker compose client here; the YAML check above covers the commands")
    env = tmp_path / ".env"
    env.write_text((REPO / ".env.example").read_text())
    proc = subprocess.run([docker, "compose", "-f", str(REPO / "docker-compose.yml"), "--env-file", str(env),
                           "--profile", "monitoring", "config", "-q"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
