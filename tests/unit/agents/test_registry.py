"""agents/registry.py: one builder per stage of the topic table, and nothing imported early."""

from __future__ import annotations

import subprocess
import sys

from agents.registry import STAGE_MODULES, build_stage, builder
from pipeline.topics import STAGES
from tests.fixtures import REPO


def test_every_stage_of_the_topic_table_has_a_builder_and_nothing_else_does() -> None:
    assert list(STAGE_MODULES) == list(STAGES)


def test_each_builder_is_its_stage_modules_build() -> None:
    for name in STAGE_MODULES:
        build = builder(name)
        assert build.__module__ == f"agents.{name}" and build.__name__ == "build"


def test_an_unknown_stage_names_the_known_ones() -> None:
    try:
        build_stage("nope", None)  # type: ignore[arg-type]
    except KeyError as exc:
        assert "ingest" in str(exc) and "deliver" in str(exc)
    else:
        raise AssertionError("build_stage accepted an unknown stage")


def test_importing_the_registry_imports_no_stage_and_no_faust() -> None:
    code = ("import sys, agents.registry; "
            "print(sorted(m for m in sys.modules if m == 'faust' or m.startswith('agents.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['agents.registry']"
