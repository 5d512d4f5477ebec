"""The declared keys: the top-level options and every section, one frozen dataclass each.

`pipeline.collector.settings.CollectorSettings` extends `CollectorConfig` with the collector's
internal tuning, so the collector runs with the loaded section plus what is no config key.
`BreakerConfig` declares the `[breaker]` keys; the breaker's `BreakerSettings` (a layer the
config may not import, and which may not import it) is built from it by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.config.keys import (
    BOOL,
    ENV_NAME,
    MAX_SECONDS,
    NONEMPTY,
    PORT,
    SECONDS,
    STR,
    STR_LIST,
    UNIT,
    Rule,
    SettingError,
    between,
    check_fields,
    choice,
    count,
    key,
    optional,
    positive,
    show_nothing,
    show_url,
    typed,
    url,
)
from pipeline.model.envelope import DEFAULT_DROP_TYPES, EventFilter

SAMPLING_RATE_CAP = 0.25
SAMPLING_RATE_DEFAULT = 0.05
# The source topics keep 7 days; an unscrubbed copy may never outlive them.
MAX_UNSCRUBBED_RETENTION_HOURS = 168.0
DEFAULT_CACHE_DIR_TEXT = "~/.cache/opencode-panel-pipeline"


def _sampling_rate_test(value: Any) -> bool:
    # below 0 and NaN are accepted here: the loader falls back to the default with a warning
    if not (isinstance(value, int | float) and not isinstance(value, bool)):
        return False
    return (isinstance(value, float) and math.isnan(value)) or value <= 1


@dataclass(frozen=True)
class PluginOptions:
    """The reference forwarder plugin's options, under its names and with its defaults."""

    panel_url: str = key(
        "http://127.0.0.1:3015", url(False), "the panel; traces go to `{panelUrl}/api/v1/traces`",
        name="panelUrl", show=show_url)
    scrubber_url: str = key(
        "http://127.0.0.1:3017", url(True),
        'the scrubber; `""` bypasses scrubbing, accepted only with `allowUnscrubbed = true` (development only; '
        "logged loudly; nothing is ever attested then, so a panel that requires scrubbing refuses every trace). "
        "An empty `PIPELINE_SCRUBBER_URL` is a config error, never a bypass",
        name="scrubberUrl", show=show_url)
    allow_unscrubbed: bool = key(
        False, BOOL, 'the explicit switch that lets `scrubberUrl = ""` bypass scrubbing', name="allowUnscrubbed")
    site_key: str = key("pk_test_thirdparty", NONEMPTY, "site key sent as `X-Panel-Site-Key`; hosts may override it",
                        name="siteKey")
    source_agent: str = key("opencode", NONEMPTY, "`source_agent` of every trace", name="sourceAgent")
    sampling_rate: float = key(
        SAMPLING_RATE_DEFAULT, Rule("a number between 0 and 1", _sampling_rate_test),
        f"random baseline rate; above {SAMPLING_RATE_CAP} it is capped (with a warning) unless "
        f"`samplingRateOverride`; negative or NaN → {SAMPLING_RATE_DEFAULT} (with a warning); a non-number is a "
        "config error", name="samplingRate")
    sampling_rate_override: bool = key(False, BOOL, f"allow `samplingRate` above {SAMPLING_RATE_CAP}",
                                       name="samplingRateOverride")
    novelty_threshold: float = key(0.7, UNIT, "forward when 1 - max Jaccard ≥ this", name="noveltyThreshold")
    lru_size: int = key(200, count(10_000_000), "novelty window: the last N forwarded sessions per site",
                        name="lruSize")
    max_messages: int = key(25, count(10_000), "messages kept per snapshot and trace", name="maxMessages")
    budget_per_hour: int = key(
        0, between(0, 10_000_000, int, "an integer between 0 and 10000000"),
        "rater budget: the most traces forwarded per site in any rolling hour, spent by priority (error_flag, "
        "then pair, novelty, sample stop at 100 / 90 / 75 / 50 % of it); 0: no budget", name="budgetPerHour")
    enabled: bool = key(True, BOOL, "`PANEL_OPENCODE_DISABLED=1` forces off, `PANEL_OPENCODE_ENABLED=1` forces on")


@dataclass(frozen=True)
class KafkaConfig:
    """The broker, the topics' shape, and the local development broker."""

    PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
    SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

    @staticmethod
    def _username_rule(value: Any) -> bool | str:
        if not isinstance(value, str):
            return False
        try:
            value.format(role="x")
        except (KeyError, IndexError, ValueError):
            return "a user name whose only placeholder is `{role}`"
        return True

    bootstrap: str = key("127.0.0.1:9092", NONEMPTY, "bootstrap servers, `host:port[,host:port...]`")
    partitions: int = key(4, count(10_000), "partitions of every topic `pipeline topics create` makes")
    replication: int = key(1, count(100), "replication factor of every topic")
    local_host: str = key("127.0.0.1", NONEMPTY, "local development broker: the address it listens on")
    local_port: int = key(9092, PORT, "local development broker: its client port")
    controller_port: int = key(9093, PORT, "local development broker: its KRaft controller port")
    local_data_dir: str = key("", STR, "local development broker: its data directory",
                              doc_default="`{cache_dir}/kafka-data-{local_port}`")
    cache_dir: str = key("", STR, "where the local broker's download and data live",
                         doc_default=f"`{DEFAULT_CACHE_DIR_TEXT}`")
    version: str = key("4.3.1", NONEMPTY, "local development broker: the Kafka release it runs")
    heap: str = key("512m", NONEMPTY, "local development broker: its JVM heap")
    session_timeout_s: float = key(
        10.0, between(6.0, 90.0, (int, float), "seconds between 6 and 90"),
        "consumer group session timeout: how long a killed replica holds its partitions "
        "(faust's own 60 s default stalls a stage for a minute after a kill -9)")
    heartbeat_interval_s: float = key(1.0, SECONDS, "consumer group heartbeat interval")
    unscrubbed_retention_hours: float = key(
        MAX_UNSCRUBBED_RETENTION_HOURS,
        positive(MAX_UNSCRUBBED_RETENTION_HOURS, f"hours > 0 and at most {MAX_UNSCRUBBED_RETENTION_HOURS:g}: "
                 "it can never be longer than the 7-day source topics"),
        "how long every topic holding unscrubbed content keeps it, changelogs included (see Security)")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = key(
        "PLAINTEXT", choice(*PROTOCOLS),
        "how every Kafka client of the pipeline connects: `SASL_SSL` for a broker across machines (see Kafka "
        "security); `PLAINTEXT` only for a broker on a trusted network")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = key(
        "SCRAM-SHA-512", choice(*SASL_MECHANISMS),
        "SASL mechanism (`SASL_*` protocols); `PLAIN` sends the password itself, so only over `SASL_SSL`")
    sasl_username: str = key(
        "", Rule("a user name; `{role}` in it is replaced by the process's role (`ingest`, ..., `collector`, "
                 "`operator`, `lag`, `admin`)", _username_rule),
        "SASL user name; `pipeline-{role}` gives every stage, the collector and the operator commands a "
        "principal of their own (what `pipeline kafka acls` grants); the password comes from "
        "`KAFKA_SASL_PASSWORD_<ROLE>` or `KAFKA_SASL_PASSWORD`, never from this file")
    ssl_cafile: str = key("", STR, "PEM file of the CA that signed the broker's certificate (`SSL`, `SASL_SSL`); "
                          "empty: the system's CAs", doc_default="(unset)")
    ssl_certfile: str = key("", STR, "PEM client certificate, for a broker that requires mutual TLS; with "
                            "`ssl_keyfile`", doc_default="(unset)")
    ssl_keyfile: str = key("", STR, "PEM private key of `ssl_certfile` (unencrypted; mount it readable by the "
                           "pipeline's user only)", doc_default="(unset)")
    ssl_check_hostname: bool = key(True, BOOL, "check that the broker's certificate names the host connected to")

    def __post_init__(self) -> None:
        check_fields(self)
        self._check_security()

    def _check_security(self) -> None:
        """The security keys that only make sense together (never echoing a value: a path at most)."""
        protocol = self.security_protocol
        if protocol.startswith("SASL_") and not self.sasl_username:
            raise SettingError("sasl_username", f"a user name with security_protocol = {protocol}", "''")
        if protocol == "SASL_PLAINTEXT" and self.sasl_mechanism == "PLAIN":
            raise SettingError("sasl_mechanism", "SCRAM-SHA-256 or SCRAM-SHA-512 over SASL_PLAINTEXT (PLAIN would "
                               "send the password in the clear)", "'PLAIN'")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, name) and not protocol.endswith("SSL"):
                raise SettingError(name, f"no file with security_protocol = {protocol} (no TLS)",
                                   repr(getattr(self, name))[:80])
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise SettingError("ssl_keyfile" if self.ssl_certfile else "ssl_certfile",
                               "ssl_certfile and ssl_keyfile together", "only one of them")


def _event_types(value: Any) -> bool | str:
    if value is None:
        return True
    if STR_LIST(value) is not None:  # not a list of strings
        return False
    try:
        EventFilter.from_config(value)
    except ValueError as exc:
        return f"a list that keeps the event types ingest needs ({exc})"
    return True


def _drop_list(value: list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(value)


def _state_dir(value: str | Path | None) -> Path | None:
    return Path(value).expanduser() if value else None


@dataclass(frozen=True)
class CollectorConfig:
    """The collector: every `[[hosts]]` daemon's event stream into `opencode.events`."""

    drop_event_types: tuple[str, ...] | None = key(
        None, Rule("a list of strings", _event_types),
        "event types not produced: exact types or `family.*` prefixes; a list replaces the default one (even "
        "empty: keep everything); types ingest needs (`session.idle`, ...) cannot be dropped",
        parse=_drop_list, doc_default="`" + ", ".join(sorted(DEFAULT_DROP_TYPES)) + "`")
    heartbeat_period_s: float = key(10.0, SECONDS, "the daemon's heartbeat period")
    dead_after_heartbeats: int = key(
        3, count(1000), "a stream silent for this many heartbeat periods is dead: reconnect")
    reconnect_min_s: float = key(0.5, SECONDS, "first reconnect delay (exponential backoff, full jitter)")
    reconnect_max_s: float = key(30.0, SECONDS, "longest reconnect delay")
    buffer_max_records: int = key(
        10000, count(10_000_000), "records buffered while Kafka is unreachable; past that the host tasks wait")
    state_dir: Path | None = key(  # noqa: RUF009 - key() returns a dataclasses.field
        None, Rule("a directory path", lambda v: v is None or isinstance(v, str | Path)),
        "state files of a collector from before the `collector.state` topic: read once per host that has no "
        "state there, never written", parse=_state_dir)
    poll_interval_s: float = key(
        10.0, between(0.0, MAX_SECONDS, (int, float), f"seconds >= 0 and at most {MAX_SECONDS:.0f} (0 turns it off)"),
        "while no session frame comes (daemons that send only heartbeats), reconcile every this many seconds; "
        "0 turns polling off")
    settle_timeout_s: float = key(
        10.0, SECONDS, "at a turn end, how long to wait for the last assistant message to complete or fail")
    reconcile_max_sessions: int = key(100, count(100_000), "sessions listed per reconcile pass")
    first_start_lookback_s: float = key(
        86400.0, SECONDS, "without a state file, how far back a reconcile looks for turns to backfill")
    checkpoint_interval_s: float = key(5.0, SECONDS, "how often the state files are written (after a flush)")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class SamplerConfig:
    """The novelty sampler's MinHash and the pair window."""

    num_perm: int = key(128, between(16, 1024, int, "an integer between 16 and 1024"),
                        "MinHash permutations per session signature")
    novelty_window_tokens_messages: int = key(8, count(10_000),
                                              "the last N messages of a session its novelty tokens come from")
    pair_window_hours: float = key(
        24.0, between(0.0, MAX_UNSCRUBBED_RETENTION_HOURS, (int, float), "hours between 0 and 168"),
        "pairs across hosts: turns of the same prompt answered by different agents that end at most this far "
        "apart are forwarded as a pair (cut to `[kafka] unscrubbed_retention_hours` with a warning: the partner "
        "is read back from sessions.idle); 0: no pairing")
    pair_max_turns: int = key(16, between(2, 1000, int, "an integer between 2 and 1000"),
                              "turns of one prompt the pair window remembers (the oldest go first)")

    def __post_init__(self) -> None:
        check_fields(self)


def _retry_order(section: ScrubConfig | DeliveryConfig) -> None:
    if section.retry_max_s < section.retry_base_s:
        raise SettingError("retry_max_s", f">= retry_base_s ({section.retry_base_s})", repr(section.retry_max_s))


@dataclass(frozen=True)
class ScrubConfig:
    """The scrub stage's calls to the scrubber."""

    timeout_s: float = key(10.0, SECONDS, "timeout of one scrub request")
    retry_base_s: float = key(0.5, SECONDS, "first retry delay (exponential backoff, full jitter)")
    retry_max_s: float = key(30.0, SECONDS, "longest retry delay; at least `retry_base_s`")
    max_attempts: int = key(
        8, count(10_000), "with `max_age_s`: the retry budget of one trace the scrubber keeps failing while it "
        "scrubs others (both must be spent), then `scrub.dead`; while the scrubber fails everything, traces wait")
    max_age_s: float = key(900.0, SECONDS, "with `max_attempts`: the retry budget of one trace, in seconds")
    max_in_flight: int = key(
        50, count(1000), "most scrubber requests one scrub process has in flight; the adaptive limit moves "
        "below it (see Delivery at volume)")
    allow_insecure_http: bool = key(
        False, BOOL, "allow plain http to a non-loopback scrubber (it sends session content in the clear)")

    def __post_init__(self) -> None:
        check_fields(self)
        _retry_order(self)


@dataclass(frozen=True)
class BreakerConfig:
    """One circuit breaker per panel endpoint: failures in a window open it, one probe closes it."""

    failure_threshold: int = key(
        3, count(10_000), "failures within `failure_window_s` that open the breaker (with fewer than `min_calls` "
        "attempts in the window: the contract's rule)")
    failure_window_s: float = key(60.0, SECONDS, "the window failures and attempts are counted in")
    open_s: float = key(300.0, SECONDS, "how long an open breaker stays open before one probe is let through")
    mode: Literal["hold", "drop"] = key(
        "hold", choice("hold", "drop"),
        "while open: `hold` blocks the partition on the held trace (the wait shows as lag on `traces.signed`); "
        "`drop` records a `circuit_open` outcome instead (the reference behaviour)")
    min_calls: int = key(
        20, count(100_000), "when the last `min_calls` attempts all fall within `failure_window_s` (volume), "
        "the breaker judges their failure rate instead of the failure count")
    failure_rate: float = key(
        0.5, between(0.01, 1.0, (int, float), "a number between 0.01 and 1"),
        "at volume: the share of the last `min_calls` attempts that must have failed to open the breaker "
        "(and at least `failure_threshold` of them)")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class DeliveryConfig:
    """The deliver stage's calls to the panel."""

    connect_timeout_s: float = key(5.0, SECONDS, "connect timeout of one delivery")
    read_timeout_s: float = key(30.0, SECONDS, "read timeout of one delivery")
    write_timeout_s: float = key(10.0, SECONDS, "write timeout of one delivery")
    pool_timeout_s: float = key(5.0, SECONDS, "wait for a pooled connection")
    retry_base_s: float = key(0.5, SECONDS, "first retry delay (exponential backoff, full jitter)")
    retry_max_s: float = key(30.0, SECONDS, "longest retry delay; at least `retry_base_s`")
    max_age_s: float = key(3600.0, SECONDS, "with `max_attempts`: the budget before `max_age_exceeded`")
    max_attempts: int = key(3, count(10_000), "with `max_age_s`: the budget before `max_age_exceeded`")
    max_in_flight: int = key(
        50, count(1000), "most panel requests one deliver process has in flight; the adaptive limit moves "
        "below it (see Delivery at volume)")
    attestation_refresh_s: float = key(
        120.0, between(1.0, 290.0, (int, float), "seconds between 1 and 290"),
        "re-mint an attestation older than this before an attempt (the panel refuses one older than 300 s)")
    allow_insecure_http: bool = key(
        False, BOOL, "allow plain http to a non-loopback panel (it sends signed traces and the site key in the clear)")

    def __post_init__(self) -> None:
        check_fields(self)
        _retry_order(self)


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint of every process."""

    port: int = key(0, PORT, "port of the `/metrics` endpoint; 0 turns it off")
    host: str = key("127.0.0.1", NONEMPTY, "address the `/metrics` endpoint listens on")

    def __post_init__(self) -> None:
        check_fields(self)


def _has_slash(value: Any) -> bool:
    return isinstance(value, str) and "/" in value


@dataclass(frozen=True)
class HostTable:
    """The keys of one `[[hosts]]` entry: an `opencode serve` daemon the collector reads.

    Only a declaration: the loader resolves an entry into a `HostConfig` (password looked up,
    site key defaulted), which is what the collector gets.
    """

    name: str | None = key(None, optional(typed(str, "a host name")), "the host's name, unique",
                           doc_default="(required)")
    base_url: str = key("http://127.0.0.1:4096", url(False),
                        "the daemon; plain http only to loopback unless `allow_insecure_http`", show=show_url)
    password: str | None = key(None, optional(STR), "the daemon's password, inline; prefer `password_env`",
                               show=show_nothing)
    password_env: str | None = key(
        None, optional(ENV_NAME), "the name of the environment variable holding the password (e.g. "
        "`OPENCODE_PASSWORD_BUILD1`): the way to keep it out of the file; not together with `password`")
    site_key: str | None = key(None, optional(NONEMPTY), "this host's site key", doc_default="`siteKey`")
    model: str | None = key(None, optional(Rule('"provider/model"', _has_slash)),
                            'the model its sessions use, `"provider/model"`')
    agent: str | None = key(None, optional(STR), "the opencode agent its sessions use")
    allow_insecure_http: bool = key(
        False, BOOL, "allow plain http to a non-loopback daemon (it edits files and runs commands)")


__all__ = ["DEFAULT_CACHE_DIR_TEXT", "MAX_SECONDS", "MAX_UNSCRUBBED_RETENTION_HOURS", "SAMPLING_RATE_CAP",
           "SAMPLING_RATE_DEFAULT", "BreakerConfig", "CollectorConfig", "DeliveryConfig", "HostTable", "KafkaConfig",
           "MetricsConfig", "PluginOptions", "SamplerConfig", "ScrubConfig"]
