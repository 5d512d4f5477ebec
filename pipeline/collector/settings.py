"""The collector's settings: the loaded `[collector]` section, extended.

`CollectorSettings` is `CollectorConfig` (the keys an operator sets, declared in
pipeline/config/sections.py) plus the top-level `enabled` and `maxMessages` and the collector's
tuning. The tuning fields (settle backoff, fetch retries, concurrency, bookkeeping bounds, its
topics) pace the collector's algorithms; they stay out of the configuration because no
deployment has needed them changed and each one would be one more knob an operator must
understand. Tests and benchmarks set them directly, checked by the same rules as the keys.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from typing import TYPE_CHECKING, Any

from pipeline.config.keys import NONEMPTY, SECONDS, count, keys_of, same_as, tuning
from pipeline.config.sections import CollectorConfig, PluginOptions
from pipeline.model.envelope import EventFilter
from pipeline.model.records import MAX_RECORD_BYTES
from pipeline.topics import COLLECTOR_GROUP, TOPICS

if TYPE_CHECKING:
    from pipeline.config import Config

EVENTS_TOPIC = TOPICS["opencode.events"].name
DEAD_TOPIC = TOPICS["collector.dead"].name
HOSTS_TOPIC = TOPICS["collector.hosts"].name
STATE_TOPIC = TOPICS["collector.state"].name
# The collector replicas' consumer group: named like the stages' faust app ids.
GROUP_ID = COLLECTOR_GROUP
_TOP = {spec.attr: spec for spec in keys_of(PluginOptions).values()}


@dataclass(frozen=True)
class CollectorSettings(CollectorConfig):
    """What the collector runs with: the `[collector]` keys, two top-level keys, its tuning."""

    # ---- top-level keys: the loaded values come in through from_config
    enabled: bool = same_as(_TOP["enabled"])
    max_messages: int = same_as(_TOP["max_messages"])

    # ---- tuning: not config keys
    settle_initial_s: float = tuning(0.25, SECONDS, "first delay between message listings while a turn settles")
    settle_max_delay_s: float = tuning(2.0, SECONDS, "longest delay between those listings")
    fetch_attempts: int = tuning(3, count(100), "tries of one session fetch before it is given up")
    max_concurrent_fetches: int = tuning(4, count(1000), "session fetches at once, per host")
    reconcile_slack_s: float = tuning(600.0, SECONDS, "a reconcile looks this far before the last watermark")
    max_tracked_sessions: int = tuning(2000, count(10_000_000), "sessions remembered per host state file")
    shutdown_flush_timeout_s: float = tuning(10.0, SECONDS, "how long a shutdown waits for the sink to flush")
    max_record_bytes: int = tuning(MAX_RECORD_BYTES, count(2**31 - 1), "largest record produced")
    events_topic: str = tuning(EVENTS_TOPIC, NONEMPTY, "where events go")
    dead_topic: str = tuning(DEAD_TOPIC, NONEMPTY, "where frames that are no events go")
    # Another fleet of replicas on the same cluster (or a test on a shared broker) sets all three.
    hosts_topic: str = tuning(HOSTS_TOPIC, NONEMPTY, "the host table the replicas share")
    state_topic: str = tuning(STATE_TOPIC, NONEMPTY, "where each host's reported turns are kept")
    group_id: str = tuning(GROUP_ID, NONEMPTY, "the consumer group through which replicas share the hosts")

    @cached_property
    def event_filter(self) -> EventFilter:
        return EventFilter.from_config(self.drop_event_types)

    @property
    def silence_s(self) -> float:
        return self.heartbeat_period_s * self.dead_after_heartbeats

    @classmethod
    def from_config(cls, config: Config, **overrides: Any) -> CollectorSettings:
        """The loaded `[collector]` section with `enabled` and `maxMessages`, then `overrides`."""
        section = {f.name: getattr(config.collector, f.name) for f in fields(config.collector)}
        return cls(**{**section, "enabled": config.enabled, "max_messages": config.max_messages, **overrides})
