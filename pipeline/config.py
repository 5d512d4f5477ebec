"""The one configuration loader: a TOML file plus environment overrides, validated once.

Top-level keys are the reference forwarder plugin's option names, with its defaults, so a
plugin config can be pasted in as it is. Sections hold the streaming deployment's settings.
Every other module gets frozen objects from here and never reads the environment itself.

Environment overrides: `PIPELINE_<KEY>` for a top-level key written in upper snake case
(`PIPELINE_SAMPLING_RATE=0.1` sets `samplingRate`), `PIPELINE_<SECTION>__<KEY>` for a section
key (`PIPELINE_KAFKA__BOOTSTRAP=host:9092`). Values are parsed as TOML values when they parse
(numbers, booleans, arrays) and taken as strings otherwise. `PIPELINE_SCRUBBER_URL=` (empty) is
an error, never a bypass: an unset variable in a deployment template must not turn scrubbing off.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import ConfigError, MissingSecretError

log = logging.getLogger(__name__)

SAMPLING_RATE_CAP = 0.25
SAMPLING_RATE_DEFAULT = 0.05
# Every duration is bounded: a year is far past any sensible timeout, and well inside what
# sleeps, socket timeouts and epoch arithmetic take (1e300 s overflows them).
MAX_SECONDS = 365 * 86400.0
# The source topics keep 7 days; an unscrubbed copy may never outlive them.
MAX_UNSCRUBBED_RETENTION_HOURS = 168.0
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_SHOW_MAX = 80
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "opencode-panel-pipeline"


class Secret:
    """A string that never shows itself in a repr, a log line or an error message."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


# ---------------------------------------------------------------- field specs

Check = Callable[[Any], str | None]  # returns what was expected, or None when fine


def _type_check(kind: type | tuple[type, ...], what: str) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            return what
        return None if isinstance(value, kind) else what

    return check


def _range(lo: float | None, hi: float | None, kind: type | tuple[type, ...], what: str) -> Check:
    base = _type_check(kind, what)

    def check(value: Any) -> str | None:
        if base(value) or (isinstance(value, float) and math.isnan(value)):
            return what
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            return what
        return None

    return check


def _choice(*options: str) -> Check:
    what = "one of " + ", ".join(repr(o) for o in options)
    return lambda value: None if value in options else what


def _url(allow_empty: bool) -> Check:
    what = "an http(s) URL" + (' or "" to disable' if allow_empty else "")

    def check(value: Any) -> str | None:
        if not isinstance(value, str):
            return what
        if value == "" and allow_empty:
            return None
        if "@" in value:  # user:password@ (or a mistake that looks like it): credentials come from the env
            return "an http(s) URL without user:password@ (credentials belong in the environment)"
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on an out-of-range or malformed port
        except ValueError:
            return what
        return None if parts.scheme in ("http", "https") and parts.hostname else what

    return check


def _show(value: Any) -> str:
    """`value` for an error message, bounded: repr of a > 4300-digit integer (a TOML hex literal
    has no digit limit) raises, and a 10 KB value would bury the key the message names."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return "a value too large to show"
    return text if len(text) <= _SHOW_MAX else f"{text[:_SHOW_MAX]}... ({len(text)} characters)"


def _show_url(value: Any) -> str:
    # a URL with an @ may hold a password: say what is wrong with it, never what it is
    return "a URL with credentials (not shown)" if isinstance(value, str) and "@" in value else _show(value)


def _env_name(value: Any) -> str | None:
    ok = value is None or (isinstance(value, str) and _ENV_NAME.match(value) is not None)
    return None if ok else "an environment variable name (A-Z, 0-9, _; not starting with a digit)"


def _str_list(value: Any) -> str | None:
    ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    return None if ok else "a list of strings"


STR = _type_check(str, "a string")
NONEMPTY = lambda v: None if isinstance(v, str) and v else "a non-empty string"  # noqa: E731
BOOL = _type_check(bool, "true or false")
PORT = _range(0, 65535, int, "a port number 0..65535")
UNIT = _range(0.0, 1.0, (int, float), "a number between 0 and 1")


def _count(hi: int) -> Check:
    """An integer 1..hi: every count sizes something (a buffer, a window, a topic)."""
    return _range(1, hi, int, f"an integer between 1 and {hi}")


def _positive(hi: float, what: str) -> Check:
    """A number > 0 and <= hi (no overflow: a huge int is compared, never converted)."""
    base = _range(0, hi, (int, float), what)
    return lambda v: base(v) or (what if v == 0 else None)


SECONDS = _positive(MAX_SECONDS, f"seconds > 0 and at most {MAX_SECONDS:.0f} (a year)")


@dataclass(frozen=True)
class Field:
    key: str
    default: Any
    check: Check
    attr: str = ""
    show: Callable[[Any], str] = _show  # how a refused value appears in the error


_SHOWN_AS = {
    "password": lambda v: f"a {type(v).__name__} (not shown)",
    "panelUrl": _show_url, "scrubberUrl": _show_url, "base_url": _show_url,
}


def _fields(*specs: tuple[str, Any, Check] | tuple[str, Any, Check, str]) -> dict[str, Field]:
    out = {}
    for spec in specs:
        key, default, check, *attr = spec
        out[key] = Field(key, default, check, attr[0] if attr else _snake(key), _SHOWN_AS.get(key, _show))
    return out


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


TOP = _fields(
    ("panelUrl", "http://127.0.0.1:3015", _url(False)),
    ("scrubberUrl", "http://127.0.0.1:3017", _url(True)),
    ("siteKey", "pk_test_thirdparty", NONEMPTY),
    ("sourceAgent", "opencode", NONEMPTY),
    # samplingRate is special-cased (the reference falls back instead of failing); see _sampling_rate
    ("samplingRateOverride", False, BOOL),
    ("noveltyThreshold", 0.7, UNIT),
    ("lruSize", 200, _count(10_000_000)),
    ("maxMessages", 25, _count(10_000)),
    ("enabled", True, BOOL),
    # scrubberUrl = "" (no scrubbing) is accepted only with this set: development only
    ("allowUnscrubbed", False, BOOL),
)

SECTIONS: dict[str, dict[str, Field]] = {
    "kafka": _fields(
        ("bootstrap", "127.0.0.1:9092", NONEMPTY),
        ("partitions", 4, _count(10_000)),
        ("replication", 1, _count(100)),
        ("local_host", "127.0.0.1", NONEMPTY),
        ("local_port", 9092, PORT),
        ("controller_port", 9093, PORT),
        ("local_data_dir", "", STR),
        ("cache_dir", "", STR),
        ("version", "4.3.1", NONEMPTY),
        ("heap", "512m", NONEMPTY),
        # faust's default 60 s session timeout stalls a stage for a minute after a kill -9
        ("session_timeout_s", 10.0, _range(6.0, 90.0, (int, float), "seconds between 6 and 90")),
        ("heartbeat_interval_s", 1.0, SECONDS),
        ("unscrubbed_retention_hours", MAX_UNSCRUBBED_RETENTION_HOURS,
         _positive(MAX_UNSCRUBBED_RETENTION_HOURS, f"hours > 0 and at most {MAX_UNSCRUBBED_RETENTION_HOURS:g}: "
                   "it can never be longer than the 7-day source topics")),
    ),
    "collector": _fields(
        ("drop_event_types", None, lambda v: None if v is None else _str_list(v)),
        ("heartbeat_period_s", 10.0, SECONDS),
        ("dead_after_heartbeats", 3, _count(1000)),
        ("reconnect_min_s", 0.5, SECONDS),
        ("reconnect_max_s", 30.0, SECONDS),
        ("buffer_max_records", 10000, _count(10_000_000)),
        ("state_dir", "", STR),
        ("poll_interval_s", 10.0, _range(0.0, MAX_SECONDS, (int, float),
                                         f"seconds >= 0 and at most {MAX_SECONDS:.0f} (0 turns polling off)")),
        ("settle_timeout_s", 10.0, SECONDS),
        ("reconcile_max_sessions", 100, _count(100_000)),
        ("first_start_lookback_s", 86400.0, SECONDS),
        ("checkpoint_interval_s", 5.0, SECONDS),
    ),
    "sampler": _fields(
        ("num_perm", 128, _range(16, 1024, int, "an integer between 16 and 1024")),
        ("novelty_window_tokens_messages", 8, _count(10_000)),
    ),
    "scrub": _fields(
        ("timeout_s", 10.0, SECONDS),
        ("retry_base_s", 0.5, SECONDS),
        ("retry_max_s", 30.0, SECONDS),
        # the retry budget of one trace the scrubber keeps failing while it scrubs others (both
        # must be spent): then scrub.dead; while the scrubber fails everything, traces wait
        ("max_attempts", 8, _count(10_000)),
        ("max_age_s", 900.0, SECONDS),
        # plain http to a non-loopback scrubber sends session content in the clear
        ("allow_insecure_http", False, BOOL),
    ),
    "breaker": _fields(
        ("failure_threshold", 3, _count(10_000)),
        ("failure_window_s", 60.0, SECONDS),
        ("open_s", 300.0, SECONDS),
        ("mode", "hold", _choice("hold", "drop")),
    ),
    "delivery": _fields(
        ("connect_timeout_s", 5.0, SECONDS),
        ("read_timeout_s", 30.0, SECONDS),
        ("write_timeout_s", 10.0, SECONDS),
        ("pool_timeout_s", 5.0, SECONDS),
        ("retry_base_s", 0.5, SECONDS),
        ("retry_max_s", 30.0, SECONDS),
        ("max_age_s", 3600.0, SECONDS),
        ("max_attempts", 3, _count(10_000)),  # with max_age_s: the budget before max_age_exceeded
        ("attestation_refresh_s", 120.0, _range(1.0, 290.0, (int, float), "seconds between 1 and 290")),
        # plain http to a non-loopback panel sends signed traces and the site key in the clear
        ("allow_insecure_http", False, BOOL),
    ),
    "metrics": _fields(
        ("port", 0, PORT),
        ("host", "127.0.0.1", NONEMPTY),
    ),
}

HOST = _fields(
    ("name", None, _type_check(str, "a host name")),
    ("base_url", "http://127.0.0.1:4096", _url(False)),
    ("password", None, lambda v: None if v is None or isinstance(v, str) else "a string"),
    # the name of the variable holding the password, so the password stays out of the file
    ("password_env", None, _env_name),
    ("site_key", None, lambda v: None if v is None or (isinstance(v, str) and v) else "a site key"),
    ("model", None, lambda v: None if v is None or (isinstance(v, str) and "/" in v) else '"provider/model"'),
    ("agent", None, lambda v: None if v is None or isinstance(v, str) else "a string"),
    ("allow_insecure_http", False, BOOL),
)


# ---------------------------------------------------------------- frozen config objects


@dataclass(frozen=True)
class HostConfig:
    name: str
    base_url: str
    password: Secret | None
    site_key: str
    model: str | None
    agent: str | None
    allow_insecure_http: bool


@dataclass(frozen=True)
class Section:
    """A validated section: attribute access to its keys (`cfg.kafka.bootstrap`)."""

    name: str
    values: Mapping[str, Any]

    def __getattr__(self, item: str) -> Any:
        try:
            return self.values[item]
        except KeyError:
            raise AttributeError(f"{self.name}.{item}") from None


@dataclass(frozen=True)
class Config:
    panel_url: str
    scrubber_url: str
    site_key: str
    source_agent: str
    sampling_rate: float
    sampling_rate_override: bool
    novelty_threshold: float
    lru_size: int
    max_messages: int
    enabled: bool
    allow_unscrubbed: bool
    hosts: tuple[HostConfig, ...]
    kafka: Section
    collector: Section
    sampler: Section
    scrub: Section
    breaker: Section
    delivery: Section
    metrics: Section
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


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    top_by_env = {"PIPELINE_" + _snake(k).upper(): k for k in [*TOP, "samplingRate"]}
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
            raise ConfigError(f"unknown environment override {name}", name)


def _parse_env_value(name: str, text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except ValueError:  # TOMLDecodeError, or an integer past int()'s digit limit: a string then
        return text
    except RecursionError:
        raise ConfigError(f"{name}: arrays or tables nested too deeply", name) from None


def _validate(table: Mapping[str, Any], fields: dict[str, Field], where: str) -> dict[str, Any]:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a table", where or None)
    unknown = sorted(set(table) - set(fields))
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown key {name!r} (known: {', '.join(sorted(fields))})", name)
    out = {}
    for key, spec in fields.items():
        value = table.get(key, spec.default)
        name = f"{where}.{key}" if where else key
        if key in table:
            expected = spec.check(value)
            if expected:
                raise ConfigError(f"{name}: expected {expected}, got {spec.show(value)}", name)
        out[spec.attr] = value
    return out


def _sampling_rate(raw: Mapping[str, Any], override: bool, warnings: list[str]) -> float:
    """The reference forwarder's rule: not a number or negative -> 0.05, above 0.25 capped.

    A value of the wrong TOML type is still a config error (exit 2): a typo should stop a
    deployment, not silently sample at 5%.
    """
    if "samplingRate" not in raw:
        return SAMPLING_RATE_DEFAULT
    value = raw["samplingRate"]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"samplingRate: expected a number between 0 and 1, got {_show(value)}", "samplingRate")
    if (isinstance(value, float) and math.isnan(value)) or value < 0:  # math.isnan(int) overflows past 1e308
        warnings.append(f"samplingRate {_show(value)} is not usable; using {SAMPLING_RATE_DEFAULT}")
        return SAMPLING_RATE_DEFAULT
    if value > 1:
        raise ConfigError(f"samplingRate: expected a number between 0 and 1, got {_show(value)}", "samplingRate")
    if value > SAMPLING_RATE_CAP and not override:
        warnings.append(
            f"samplingRate {value} capped to {SAMPLING_RATE_CAP}; set samplingRateOverride = true to allow it"
        )
        return SAMPLING_RATE_CAP
    return float(value)


def _build(raw: dict[str, Any], env: Mapping[str, str], source: str) -> Config:
    raw = dict(raw)
    sections = {name: raw.pop(name, {}) for name in SECTIONS}
    hosts_raw = raw.pop("hosts", [])
    rate_present = {k: raw.pop(k) for k in ["samplingRate"] if k in raw}
    top = _validate(raw, TOP, "")
    warnings: list[str] = []
    rate = _sampling_rate(rate_present, top["sampling_rate_override"], warnings)
    # the plugin's switches: DISABLED wins over the config, ENABLED forces it on
    if env.get("PANEL_OPENCODE_ENABLED") == "1":
        top["enabled"] = True
    if env.get("PANEL_OPENCODE_DISABLED") == "1":
        top["enabled"] = False
    built = {name: Section(name, _validate(sections[name], fields, name)) for name, fields in SECTIONS.items()}
    _cross_checks(built)
    _check_services(top, built)
    hosts = _hosts(hosts_raw, top["site_key"], env)
    for w in warnings:
        log.warning(w)
    return Config(sampling_rate=rate, hosts=hosts, source=source, warnings=tuple(warnings), _env=env,
                  **top, **built)


def _cross_checks(sections: Mapping[str, Section]) -> None:
    """Rules between keys, so a stage never refuses at start what the loader accepted."""
    for name in ("scrub", "delivery"):
        sec = sections[name]
        if sec.retry_max_s < sec.retry_base_s:
            raise ConfigError(f"{name}.retry_max_s: expected >= {name}.retry_base_s ({sec.retry_base_s}), "
                              f"got {sec.retry_max_s}", f"{name}.retry_max_s")
    drop = sections["collector"].drop_event_types
    if drop is not None:
        from pipeline.model.envelope import EventFilter

        try:
            EventFilter.from_config(drop)
        except ValueError as exc:
            raise ConfigError(f"collector.drop_event_types: {exc}", "collector.drop_event_types") from None


def _check_services(top: Mapping[str, Any], sections: Mapping[str, Section]) -> None:
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
