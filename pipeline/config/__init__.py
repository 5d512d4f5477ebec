"""The one configuration: every key declared once, loaded from a TOML file plus the environment.

Top-level keys are the reference forwarder plugin's option names, with its defaults, so a
plugin config can be pasted in as it is. Sections hold the streaming deployment's settings.
Every other module gets frozen objects from here and never reads the environment itself.

- `keys`: how a key is declared: a dataclass field with its default, its rule (type and bounds)
  and its help text; `check_fields` applies the rules to an object built in code too.
- `sections`: the top-level options and every section. The collector's `CollectorSettings` is
  `CollectorConfig` extended with its internal tuning; the breaker's `BreakerSettings` is built
  from `BreakerConfig` by field name.
- `loader`: `load()` and `Config`. `doc`: the README's tables, generated from the declarations
  (`python -m pipeline.config --markdown`).

Environment overrides: `PIPELINE_<KEY>` for a top-level key written in upper snake case
(`PIPELINE_SAMPLING_RATE=0.1` sets `samplingRate`), `PIPELINE_<SECTION>__<KEY>` for a section
key (`PIPELINE_KAFKA__BOOTSTRAP=host:9092`). Values are parsed as TOML values when they parse
(numbers, booleans, arrays) and taken as strings otherwise. `PIPELINE_SCRUBBER_URL=` (empty) is
an error, never a bypass: an unset variable in a deployment template must not turn scrubbing off.

Why a hand-written loader on dataclasses rather than pydantic-settings: the behaviour operators
rely on is specific and pinned by tests: errors that name the key (`hosts[1].base_url`) and never
echo a secret or a 5000-digit value, the plugin's samplingRate fallback (a warning, not an error),
environment values parsed as TOML, `PIPELINE_<SECTION>__<KEY>` nesting, `[[hosts]]` with passwords
from named variables, no silent coercion (`"25"` is not 25, `true` is not 1). pydantic-settings
would need a custom source, custom error rendering and strict mode on every field to do the same,
and would add a runtime dependency to every stage; the dataclasses keep each rule a small
function next to the key it guards, and the same declarations feed the README.
"""

from __future__ import annotations

from pipeline.config.keys import MAX_SECONDS, Check, Key, Rule, Secret, SettingError, check_fields, keys_of
from pipeline.config.loader import (
    DEFAULT_CACHE_DIR,
    HOST,
    SECTIONS,
    TOP,
    Config,
    HostConfig,
    check_base_url,
    env_name,
    kafka_password_variable,
    load,
    panel_secret_variable,
    section_keys,
)
from pipeline.config.sections import (
    MAX_UNSCRUBBED_RETENTION_HOURS,
    SAMPLING_RATE_CAP,
    SAMPLING_RATE_DEFAULT,
    BreakerConfig,
    CollectorConfig,
    DeliveryConfig,
    HostTable,
    KafkaConfig,
    MetricsConfig,
    PluginOptions,
    SamplerConfig,
    ScrubConfig,
)
from pipeline.errors import ConfigError, MissingSecretError

__all__ = [
    "DEFAULT_CACHE_DIR", "HOST", "MAX_SECONDS", "MAX_UNSCRUBBED_RETENTION_HOURS", "SAMPLING_RATE_CAP",
    "SAMPLING_RATE_DEFAULT", "SECTIONS", "TOP", "BreakerConfig", "Check", "CollectorConfig", "Config", "ConfigError",
    "DeliveryConfig", "HostConfig", "HostTable", "KafkaConfig", "Key", "MetricsConfig", "MissingSecretError",
    "PluginOptions", "Rule", "SamplerConfig", "ScrubConfig", "Secret", "SettingError", "check_base_url",
    "check_fields", "env_name", "kafka_password_variable", "keys_of", "load", "panel_secret_variable", "section_keys",
]
