"""The collector's settings: the `[collector]` section, `maxMessages` and `enabled`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.model.envelope import (
    EventFilter,
)
from pipeline.model.records import MAX_RECORD_BYTES
from pipeline.topics import TOPICS

EVENTS_TOPIC = TOPICS["opencode.events"].name


DEAD_TOPIC = TOPICS["collector.dead"].name


@dataclass(frozen=True)
class CollectorSettings:
    enabled: bool = True
    max_messages: int = 25
    heartbeat_period_s: float = 10.0
    dead_after_heartbeats: int = 3
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    # Silent-stream fallback: reconcile every this many seconds while no session frame comes.
    poll_interval_s: float = 10.0  # 0 disables
    settle_initial_s: float = 0.25
    settle_max_delay_s: float = 2.0
    settle_timeout_s: float = 10.0
    fetch_attempts: int = 3
    max_concurrent_fetches: int = 4  # per host
    reconcile_max_sessions: int = 100
    first_start_lookback_s: float = 24 * 3600.0
    reconcile_slack_s: float = 600.0
    max_tracked_sessions: int = 2000
    state_dir: Path | None = None
    checkpoint_interval_s: float = 5.0
    shutdown_flush_timeout_s: float = 10.0
    max_record_bytes: int = MAX_RECORD_BYTES
    event_filter: EventFilter = field(default_factory=EventFilter)
    events_topic: str = EVENTS_TOPIC
    dead_topic: str = DEAD_TOPIC

    def __post_init__(self) -> None:
        for name in ("heartbeat_period_s", "reconnect_min_s", "reconnect_max_s", "settle_initial_s",
                     "settle_max_delay_s", "checkpoint_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"collector.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("dead_after_heartbeats", "max_messages", "fetch_attempts",
                     "max_concurrent_fetches", "reconcile_max_sessions", "max_tracked_sessions"):
            if getattr(self, name) < 1:
                raise ValueError(f"collector.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.poll_interval_s < 0 or self.settle_timeout_s < 0:
            raise ValueError("collector.poll_interval_s and settle_timeout_s must be >= 0")

    @property
    def silence_s(self) -> float:
        return self.heartbeat_period_s * self.dead_after_heartbeats

    @classmethod
    def from_config(cls, config: Config, **overrides: Any) -> CollectorSettings:
        """From the validated config: its `[collector]` section, `maxMessages`, `enabled`.

        Keys the section does not declare keep their defaults here.
        """
        section = config.collector
        values: dict[str, Any] = {"enabled": config.enabled, "max_messages": config.max_messages}
        for name in ("heartbeat_period_s", "dead_after_heartbeats", "reconnect_min_s",
                     "reconnect_max_s", "poll_interval_s", "settle_timeout_s",
                     "reconcile_max_sessions", "first_start_lookback_s", "checkpoint_interval_s"):
            value = getattr(section, name, None)
            if value is not None:
                values[name] = value
        state_dir = getattr(section, "state_dir", "")
        if state_dir:
            values["state_dir"] = Path(state_dir).expanduser()
        values["event_filter"] = EventFilter.from_config(getattr(section, "drop_event_types", None))
        values.update(overrides)
        return cls(**values)
