"""The package is the product: the wheel, installed into a fresh virtualenv outside the checkout
and run from a directory that is not the checkout, creates the topic table and delivers a trace.

What the installed package lacks (its JSON Schemas, a module only the checkout has) shows here
and nowhere else: every other suite imports the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.local_stack import Stack, StackSettings, wait_for
from pipeline.topics import TOPICS
from tests.conftest import local_broker
from tests.fixtures import REPO
from tests.integration.test_breaker import send_snapshots, snapshots

pytestmark = pytest.mark.deploy

HOST = "wheel-check"
DELIVERY_PATH = ("sample", "scrub", "sign", "breaker", "deliver")
# what the product's wheel is built from (the Dockerfile copies the same)
PRODUCT = ("pyproject.toml", "README.md", "pipeline", "agents", "schemas")


def run(cmd: list[str], cwd: Path, timeout_s: float = 600, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The python of a fresh virtualenv holding the built wheel and what it depends on, nothing else."""
    root = tmp_path_factory.mktemp("wheel")
    # built from a copy of what the wheel is made of: setuptools writes its build/ beside the sources
    source = root / "source"
    source.mkdir()
    for name in PRODUCT:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(REPO / name, source / name)
    wheels = root / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(source)], cwd=root)
    built = sorted(wheels.glob("opencode_panel_pipeline-*.whl"))
    assert len(built) == 1, built
    run([sys.executable, "-m", "venv", str(root / "venv")], cwd=root)
    python = root / "venv" / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", str(built[0])], cwd=root)
    yield python


def test_the_wheel_holds_the_product_and_only_it(installed: Path, tmp_path: Path) -> None:
    where = run([str(installed), "-c", "import pipeline.model.records as r, agents; print(r.SCHEMA_DIR)"],
                cwd=tmp_path).strip()
    schema_dir = Path(where)
    assert schema_dir.is_relative_to(installed.parent.parent), f"schemas found outside the venv: {where}"
    assert {p.stem for p in schema_dir.glob("*.json")} >= {t.schema for t in TOPICS.values()}
    kit = subprocess.run([str(installed), "-c", "import devkit"], cwd=tmp_path, capture_output=True, text=True)
    assert kit.returncode != 0 and "No module named 'devkit'" in kit.stderr
    tests = subprocess.run([str(installed), "-c", "import tests.fixtures"], cwd=tmp_path, capture_output=True)
    assert tests.returncode != 0


def test_installed_pipeline_creates_topics_and_delivers(installed: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with local_broker(tmp_path / "kafka") as broker:
        env = {"PIPELINE_KAFKA__BOOTSTRAP": broker.bootstrap, "PIPELINE_KAFKA__PARTITIONS": "2"}
        created = run([str(installed.parent / "pipeline"), "topics", "create"], cwd=outside, env=env)
        assert f"created {len(TOPICS)} topics" in created, created
        stack = Stack(StackSettings(bootstrap=broker.bootstrap, workdir=tmp_path / "stack", partitions=2,
                                    stages=DELIVERY_PATH, python=str(installed), cwd=outside))
        with stack.start():
            expected = send_snapshots(broker.bootstrap, snapshots(HOST, range(3)))
            try:
                wait_for(lambda: expected <= {t["trace_id"] for t in stack.panel_accepted()}, 180,
                         what="3 traces delivered by the installed stages")
            except TimeoutError:
                pytest.fail(stack.logs_tail())
            assert stack.panel_stats()["refused"] == 0
