"""Wiring check: copies schema-valid events to passthrough.out; invalid ones are dead-lettered."""

from __future__ import annotations

import faust

from agents.base import Meta, Out, bind, make_app
from pipeline.config import Config

STAGE = "passthrough"


def build(config: Config, **app_overrides: object) -> faust.App:
    app = make_app(STAGE, config, **app_overrides)

    async def handle(record: dict, meta: Meta) -> list[Out]:
        return [Out("passthrough.out", meta.key, record)]

    bind(app, STAGE, config, handle)
    return app
