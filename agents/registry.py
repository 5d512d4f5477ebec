"""Every stage the `pipeline worker STAGE` command can run, by name: one entry per stage of
pipeline.topics.STAGES (tests/unit/agents/test_registry.py checks both agree).

Each entry imports its stage module only when called, so `pipeline --help` and the commands
that run no stage never import faust.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline.config import Config

if TYPE_CHECKING:
    import faust

Build = Callable[..., "faust.App"]  # build(config, **app_overrides) -> faust.App


def _passthrough() -> Build:
    from agents.passthrough import build
    return build


def _ingest() -> Build:
    from agents.ingest import build
    return build


def _sample() -> Build:
    from agents.sample import build
    return build


def _scrub() -> Build:
    from agents.scrub import build
    return build


def _sign() -> Build:
    from agents.sign import build
    return build


def _breaker() -> Build:
    from agents.breaker import build
    return build


def _deliver() -> Build:
    from agents.deliver import build
    return build


STAGE_BUILDERS: dict[str, Callable[[], Build]] = {
    "passthrough": _passthrough,
    "ingest": _ingest,
    "sample": _sample,
    "scrub": _scrub,
    "sign": _sign,
    "breaker": _breaker,
    "deliver": _deliver,
}


def build_stage(stage: str, config: Config, **app_overrides: Any) -> faust.App:
    """The faust App of `stage`; KeyError naming the known stages for any other name."""
    if stage not in STAGE_BUILDERS:
        raise KeyError(f"unknown stage {stage!r} (stages: {', '.join(STAGE_BUILDERS)})")
    return STAGE_BUILDERS[stage]()(config, **app_overrides)
