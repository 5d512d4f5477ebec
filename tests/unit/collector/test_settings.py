"""The collector's settings (pipeline/collector/settings.py): read from the config, validated."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from pipeline.collector.settings import CollectorSettings
from pipeline.config import load


def test_settings_from_config_and_validation() -> None:
    cfg = load(env={"PIPELINE_COLLECTOR__HEARTBEAT_PERIOD_S": "5", "PANEL_OPENCODE_DISABLED": "1",
                    "PIPELINE_COLLECTOR__DROP_EVENT_TYPES": '["pty.*"]',
                    "PIPELINE_COLLECTOR__STATE_DIR": "/tmp/x"})
    settings = CollectorSettings.from_config(cfg)
    assert (settings.heartbeat_period_s, settings.silence_s) == (5, 15)
    assert settings.enabled is False and settings.state_dir == Path("/tmp/x")
    assert settings.event_filter.keeps("message.part.delta")
    assert not settings.event_filter.keeps("pty.created")
    with pytest.raises(ValueError, match="heartbeat_period_s"):
        CollectorSettings(heartbeat_period_s=0)
    assert copy.copy(CollectorSettings()).max_messages == 25
