"""Every stage the `pipeline worker STAGE` command can run, by name: one entry per stage of
pipeline.topics.STAGES (tests/unit/agents/test_registry.py checks both agree).

Each entry imports its stage module only when called, so `pipeline --help` and the commands
that run no stage never import faust.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline.config import Config

if TYPE_CHECKING:
    import faust

Build = Callable[..., "faust.App"]  # build(config, **app_overrides) -> faust.App

# stage -> the module whose `build` makes its app: a fixed table, so no other name can load a module
STAGE_MODULES: dict[str, str] = {
    "passthrough": "agents.passthrough",
    "ingest": "agents.ingest",
    "sample": "agents.sample",
    "scrub": "agents.scrub",
    "sign": "agents.sign",
    "breaker": "agents.breaker",
    "deliver": "agents.deliver",
}


def builder(stage: str) -> Build:
    """The `build` function of `stage`, imported now."""
    build: Build = importlib.import_module(STAGE_MODULES[stage]).build
    return build


def build_stage(stage: str, config: Config, **app_overrides: Any) -> faust.App:
    """The faust App of `stage`; KeyError naming the known stages for any other name."""
    if stage not in STAGE_MODULES:
        raise KeyError(f"unknown stage {stage!r} (stages: {', '.join(STAGE_MODULES)})")
    return builder(stage)(config, **app_overrides)
