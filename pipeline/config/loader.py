"""Loading: a TOML file plus environment overrides, checked against the declared keys, once.

The result is one frozen `Config`: the top-level options as attributes, each section as the
frozen object declaring it (`config.kafka` is a `KafkaConfig`), and the resolved `[[hosts]]`.
Nothing else reads the environment: secrets are looked up through `Config`.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.config.keys import Key, Secret, SettingError, check_table, keys_of, show
from pipeline.config.sections import (
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

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "opencode-panel-pipeline"
TOP: dict[str, Key] = keys_of(PluginOptions)
HOST: dict[str, Key] = keys_of(HostTable)


# every section's name and declaring class, in the order of the README
SECTIONS: dict[str, type] = {
    "kafka": KafkaConfig, "collector": CollectorConfig, "sampler": SamplerConfig, "scrub": ScrubConfig,
    "breaker": BreakerConfig, "delivery": DeliveryConfig, "metrics": MetricsConfig,
}


def section_keys() -> dict[str, dict[str, Key]]:
    """The keys of every section, by section."""
    return {name: keys_of(cls) for name, cls in SECTIONS.items()}


# ---------------------------------------------------------------- frozen config objects


@dataclass(frozen=True)
class HostConfig:
    """One resolved `[[hosts]]` entry: password looked up, site key defaulted."""

    name: str
    base_url: str
    password: Secret | None
    site_key: str
    model: str | None
    agent: str | None
    allow_insecure_http: bool


@dataclass(frozen=True, kw_only=True)
class Config(PluginOptions):
    """The validated configuration. The top-level options are `PluginOptions`' attributes."""

    hosts: tuple[HostConfig, ...] = ()
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    scrub: ScrubConfig = field(default_factory=ScrubConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    source: str = "<defaults>"
    warnings: tuple[str, ...] = ()
    _env: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    # Secrets are looked up here, once, so no other module touches os.environ.
    def panel_secret(self, site_key: str) -> tuple[str, Secret]:
        """The ingest HMAC secret for a site: `(variable it came from, secret)`."""
        specific = panel_secret_variable(site_key)
        for name in (specific, "PANEL_INGEST_SECRET"):
            if self._env.get(name):
                return name, Secret(self._env[name])
        raise MissingSecretError(f"{specific} (or PANEL_INGEST_SECRET)", f"panel HMAC for site {site_key}")

    def kafka_sasl_password(self, role: str) -> tuple[str, Secret]:
        """The SASL password of the Kafka principal `role` (a stage, `collector`, `operator`,
        `admin`): `(variable it came from, secret)`; the role's own variable wins."""
        specific = kafka_password_variable(role)
        for name in (specific, KAFKA_PASSWORD_FALLBACK):
            if self._env.get(name):
                return name, Secret(self._env[name])
        raise MissingSecretError(f"{specific} (or {KAFKA_PASSWORD_FALLBACK})",
                                 f"the Kafka SASL password of {role} ([kafka] security_protocol = "
                                 f"{self.kafka.security_protocol})")

    def optional_secret(self, variable: str) -> Secret | None:
        value = self._env.get(variable)
        return Secret(value) if value else None

    @property
    def scrubbing_bypassed(self) -> bool:
        """scrubberUrl = "": traces go on unscrubbed (load allowed it only with allowUnscrubbed)."""
        return self.scrubber_url == ""

    @property
    def scrubber_jwt_secret(self) -> Secret | None:
        return self.optional_secret("SCRUBBER_JWT_SECRET")

    @property
    def prompt_ref_key(self) -> Secret | None:
        """The key prompt_refs are an HMAC under (pipeline/model/prompt.py); None: a plain hash."""
        return self.optional_secret("PIPELINE_PROMPT_REF_KEY")

    @property
    def scrubber_api_key(self) -> Secret | None:
        return self.optional_secret("SCRUBBER_API_KEY")

    def host(self, name: str) -> HostConfig:
        for h in self.hosts:
            if h.name == name:
                return h
        known = ", ".join(h.name for h in self.hosts) or "none configured"
        raise ConfigError(f"unknown host {name!r} (configured: {known})", "hosts")

    @property
    def cache_dir(self) -> Path:
        return Path(self.kafka.cache_dir).expanduser() if self.kafka.cache_dir else DEFAULT_CACHE_DIR

    @property
    def kafka_data_dir(self) -> Path:
        if self.kafka.local_data_dir:
            return Path(self.kafka.local_data_dir).expanduser()
        return self.cache_dir / f"kafka-data-{self.kafka.local_port}"


def panel_secret_variable(site_key: str) -> str:
    return "PANEL_INGEST_SECRET_" + re.sub(r"[^A-Z0-9]", "_", site_key.upper())


KAFKA_PASSWORD_FALLBACK = "KAFKA_SASL_PASSWORD"


def kafka_password_variable(role: str) -> str:
    """`KAFKA_SASL_PASSWORD_<ROLE>`: the role upper-cased, every character outside A-Z0-9 as `_`."""
    return f"{KAFKA_PASSWORD_FALLBACK}_" + re.sub(r"[^A-Z0-9]", "_", role.upper())


def env_name(key: str) -> str:
    """`PIPELINE_<KEY>` of a top-level key: `samplingRate` -> `PIPELINE_SAMPLING_RATE`."""
    return "PIPELINE_" + re.sub(r"(?<!^)(?=[A-Z])", "_", key).upper()


# ---------------------------------------------------------------- loading


def load(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load and validate. Raises ConfigError naming the key at fault."""
    env = dict(os.environ if env is None else env)
    path = path or env.get("PIPELINE_CONFIG") or None
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}", "--config") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, ValueError) as exc:
            # ValueError also: int()'s 4300-digit limit on an integer literal
            raise ConfigError(f"{p}: not valid TOML: {str(exc)[:200]}", "--config") from None
        except RecursionError:  # tomllib parses nested arrays and inline tables recursively
            raise ConfigError(f"{p}: not valid TOML: arrays or tables nested too deeply", "--config") from None
        source = str(p)
    _apply_env(raw, env)
    return _build(raw, env, source)


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    top_by_env = {env_name(k): k for k in TOP}
    for name, text in env.items():
        if not name.startswith("PIPELINE_") or name == "PIPELINE_CONFIG":
            continue
        if name == "PIPELINE_SCRUBBER_URL" and not text.strip():
            # an unset template variable, not a decision: bypassing takes scrubberUrl = "" in
            # the file (or PIPELINE_SCRUBBER_URL='""') and allowUnscrubbed = true
            raise ConfigError(f"scrubberUrl: {name} is set but empty; set it to the scrubber's URL or unset "
                              "it (bypassing scrubbing takes scrubberUrl = \"\" and allowUnscrubbed = true, "
                              "development only)", "scrubberUrl")
        value = _parse_env_value(name, text)
        if name in top_by_env:
            raw[top_by_env[name]] = value
        elif "__" in name:
            section, key = name[len("PIPELINE_") :].split("__", 1)
            table = raw.setdefault(section.lower(), {})
            if not isinstance(table, dict):
                raise ConfigError(f"{name}: {section.lower()} is not a section in the config file", name)
            table[key.lower()] = value
        else:
            known = [*top_by_env, "PIPELINE_<SECTION>__<KEY>"]
            raise ConfigError(f"unknown environment override {name}{_did_you_mean(name, top_by_env)} "
                              f"(known: {', '.join(known)})", name)


def _parse_env_value(name: str, text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except ValueError:  # TOMLDecodeError, or an integer past int()'s digit limit: a string then
        return text
    except RecursionError:
        raise ConfigError(f"{name}: arrays or tables nested too deeply", name) from None


def _validate(table: Any, keys: Mapping[str, Key], where: str, also: Iterable[str] = ()) -> dict[str, Any]:
    """The values of a table by attribute; ConfigError naming the key (`where.key`) at fault.

    `also` are names known at this level that are not keys (the sections, at the top).
    """
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a table", where or None)
    known = [*keys, *also]
    unknown = sorted(set(table) - set(known))
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown key {name!r}{_did_you_mean(unknown[0], known)} "
                          f"(known: {', '.join(sorted(known))})", name)
    try:
        return check_table(table, keys)
    except SettingError as exc:
        raise _config_error(exc, where) from None


def _config_error(exc: SettingError, where: str) -> ConfigError:
    name = f"{where}.{exc.key}" if where else exc.key
    return ConfigError(f"{name}: expected {exc.expected}, got {exc.shown}", name)


def _section(name: str, cls: type, table: Any) -> Any:
    values = _validate(table, keys_of(cls), name)
    try:
        return cls(**values)
    except SettingError as exc:  # a rule between keys (retry_max_s >= retry_base_s, ...)
        raise _config_error(exc, name) from None


def _sampling_rate(value: float, override: bool, warnings: list[str]) -> float:
    """The reference forwarder's rule: not a number or negative -> 0.05, above 0.25 capped.

    The declared rule has already refused a value of the wrong TOML type, or above 1: a typo
    should stop a deployment, not silently sample at 5%.
    """
    if (isinstance(value, float) and math.isnan(value)) or value < 0:  # math.isnan(int) overflows past 1e308
        warnings.append(f"samplingRate {show(value)} is not usable; using {SAMPLING_RATE_DEFAULT}")
        return SAMPLING_RATE_DEFAULT
    if value > SAMPLING_RATE_CAP and not override:
        warnings.append(
            f"samplingRate {value} capped to {SAMPLING_RATE_CAP}; set samplingRateOverride = true to allow it"
        )
        return SAMPLING_RATE_CAP
    return float(value)


def _build(raw: dict[str, Any], env: Mapping[str, str], source: str) -> Config:
    raw = dict(raw)
    declared = SECTIONS
    tables = {name: raw.pop(name, {}) for name in declared}
    hosts_raw = raw.pop("hosts", [])
    top = _validate(raw, TOP, "", also=[*declared, "hosts"])
    warnings: list[str] = []
    top["sampling_rate"] = _sampling_rate(top["sampling_rate"], top["sampling_rate_override"], warnings)
    # the plugin's switches: DISABLED wins over the config, ENABLED forces it on
    if env.get("PANEL_OPENCODE_ENABLED") == "1":
        top["enabled"] = True
    if env.get("PANEL_OPENCODE_DISABLED") == "1":
        top["enabled"] = False
    built = {name: _section(name, cls, tables[name]) for name, cls in declared.items()}
    _check_services(top, built)
    retention = built["kafka"].unscrubbed_retention_hours
    if built["sampler"].pair_window_hours > retention:
        # a partner's snapshot is read back from sessions.idle when its pair forms
        warnings.append(f"[sampler] pair_window_hours {built['sampler'].pair_window_hours:g}: pairs form within "
                        f"[kafka] unscrubbed_retention_hours ({retention:g}) only: sessions.idle keeps turns no longer")
    hosts = _hosts(hosts_raw, top["site_key"], env)
    for w in warnings:
        log.warning(w)
    return Config(hosts=hosts, source=source, warnings=tuple(warnings), _env=env, **top, **built)


def _check_services(top: Mapping[str, Any], sections: Mapping[str, Any]) -> None:
    """The panel and scrubber URLs: no unscrubbed traffic unless asked for, no plain http
    to another machine unless asked for (traces, site keys and session content go there)."""
    check_base_url(top["panel_url"], sections["delivery"].allow_insecure_http, "panelUrl",
                   "[delivery] allow_insecure_http = true")
    if top["scrubber_url"] == "":
        if not top["allow_unscrubbed"]:
            raise ConfigError('scrubberUrl: "" bypasses scrubbing (traces reach the panel unscrubbed); '
                              "set allowUnscrubbed = true for development, never in production", "scrubberUrl")
        return
    check_base_url(top["scrubber_url"], sections["scrub"].allow_insecure_http, "scrubberUrl",
                   "[scrub] allow_insecure_http = true")


def _hosts(hosts_raw: Any, default_site: str, env: Mapping[str, str]) -> tuple[HostConfig, ...]:
    if not isinstance(hosts_raw, list):
        raise ConfigError("hosts: expected an array of tables ([[hosts]])", "hosts")
    hosts: list[HostConfig] = []
    for i, entry in enumerate(hosts_raw):
        where = f"hosts[{i}]"
        values = _validate(entry, HOST, where)
        if not values["name"]:
            raise ConfigError(f"{where}.name: expected a host name", f"{where}.name")
        if any(h.name == values["name"] for h in hosts):
            raise ConfigError(f"{where}.name: duplicate host name {values['name']!r}", f"{where}.name")
        check_base_url(values["base_url"], values["allow_insecure_http"], f"{where}.base_url")
        password = _host_password(values, env, where)
        hosts.append(HostConfig(
            name=values["name"], base_url=values["base_url"].rstrip("/"),
            password=Secret(password) if password else None,
            site_key=values["site_key"] or default_site, model=values["model"], agent=values["agent"],
            allow_insecure_http=values["allow_insecure_http"],
        ))
    return tuple(hosts)


def _host_password(values: Mapping[str, Any], env: Mapping[str, str], where: str) -> str | None:
    """The host's password: given inline, or read from the variable `password_env` names."""
    variable = values["password_env"]
    if variable is None:
        return values["password"]
    key = f"{where}.password_env"
    if values["password"] is not None:
        raise ConfigError(f"{key}: give either password or password_env, not both", key)
    if not env.get(variable):
        raise ConfigError(f"{key}: the environment variable {variable} is unset or empty", key)
    return env[variable]


def check_base_url(url: str, allow_insecure_http: bool, key: str,
                   switch: str = "allow_insecure_http = true for this host") -> None:
    """Refuse plain http to a non-loopback host (`key` names the URL, `switch` what allows it):
    an opencode daemon edits files and runs commands; the panel and scrubber get session content."""
    parts = urlsplit(url)
    if parts.scheme != "http" or allow_insecure_http:
        return
    host = parts.hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ConfigError(f"{key}: plain http to non-loopback host {host!r} is refused; use https or set {switch}", key)
