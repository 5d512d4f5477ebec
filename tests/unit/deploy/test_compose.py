"""docker-compose.yml is for production; nothing here runs it, so check that it parses and that
every pipeline service runs a real `pipeline` subcommand and stage."""

from __future__ import annotations

import os
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


def compose_config() -> Callable[..., subprocess.CompletedProcess[str]] | None:
    """`docker compose config` where a compose client exists, else tools/composecheck (the same
    loader, compose-go) built by `./dev setup` into the cache, or built here when Go is present.
    Returns check(compose_file, env_file=None, profiles=()) or None."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        def docker_compose(file: Path, env_file: Path | None = None, profiles: Sequence[str] = ()) -> Any:
            flags = [*(["--env-file", str(env_file)] if env_file else []), *(f"--profile={p}" for p in profiles)]
            return subprocess.run([docker, "compose", "-f", str(file), *flags, "config", "-q"],
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

    def composecheck(file: Path, env_file: Path | None = None, profiles: Sequence[str] = ()) -> Any:
        flags = [*(["-env-file", str(env_file)] if env_file else []), *(f"-profile={p}" for p in profiles)]
        return subprocess.run([str(built), *flags, str(file)], capture_output=True, text=True, cwd=file.parent)
    return composecheck


def test_docker_compose_config_accepts_the_production_file(tmp_path: Path) -> None:
    check = compose_config()
    if check is None:
        pytest.skip("neither a docker compose client nor Go to build tools/composecheck")
    env = tmp_path / ".env"
    env.write_text((REPO / ".env.example").read_text())
    proc = check(REPO / "docker-compose.yml", env, ["monitoring"])
    assert proc.returncode == 0, proc.stderr


def test_the_compose_check_refuses_what_docker_compose_refuses(tmp_path: Path) -> None:
    # the check above is only worth something if the same loader fails on a broken file
    check = compose_config()
    if check is None:
        pytest.skip("neither a docker compose client nor Go to build tools/composecheck")
    broken = tmp_path / "compose.yml"
    broken.write_text("services:\n  a:\n    image: x\n    depends_on: [missing]\n")
    proc = check(broken)
    assert proc.returncode != 0 and "missing" in proc.stderr
