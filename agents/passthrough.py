"""Wiring check: copies schema-valid events to passthrough.out; invalid ones are dead-lettered."""

from __future__ import annotations

from typing import Any

import faust

from agents.runtime import bind, make_app
from agents.stage import Meta, Out
from pipeline.config import Config

STAGE = "passthrough"


class PassthroughStage:
    async def handle(self, record: dict[str, Any], meta: Meta) -> list[Out]:
        return [Out("passthrough.out", meta.key, record)]


def build(config: Config, **app_overrides: Any) -> faust.App:
    app = make_app(STAGE, config, **app_overrides)
    bind(app, STAGE, config, PassthroughStage().handle)
    return app
