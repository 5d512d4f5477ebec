"""Property-based fuzzing of the configuration loader (`pipeline.config.load`).

Arbitrary TOML documents (known and unknown keys, every section, `[[hosts]]`, values of every
TOML type, right and wrong, huge numbers and deep nesting included) and arbitrary `PIPELINE_*`
overrides: `load` returns a Config or
raises ConfigError whose `.key` names a key present in the document (or the override that put
it there) and appears in the message; nothing else escapes. A Config it returns holds the
document's values, never shows a host password, and is accepted by what the stages build from
it at start. The CLI turns a ConfigError into exit code 2. Host passwords named by
`password_env` come from the env mapping given to load; URLs with credentials are refused
without showing them.

Inputs that hit a known bug are kept out of the properties by the flags below while a strict
xfail test pins each one; when a fix lands the pinned test XPASSes (a failure under strict):
set the flag to True so the properties cover the input class again.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, currently_in_test_context, given, settings
from hypothesis import event as _event
from hypothesis import strategies as st

from pipeline import config as config_mod
from pipeline.collector.settings import CollectorSettings
from pipeline.config import HOST, TOP, Config, ConfigError, Key
from pipeline.delivery.breaker import BreakerSettings
from pipeline.delivery.retry import RetryPolicy
from pipeline.sampling import NoveltyWindows, reference_sampler
from tests.fixtures import REPO

SECTIONS = config_mod.section_keys()

# ---------------------------------------------------------------- known bugs (see module doc)

URL_PARSE_OK = True  # urlsplit's ValueError ("http://[::1", NFKC netlocs) escapes load as ValueError
ENV_OVER_NON_TABLE_OK = True  # PIPELINE_<S>__<K> where the document's <s> is not a table: TypeError
# keys whose error comes from a rule between keys (a section's __post_init__), named even when defaulted
CROSS_FIELD_KEYS = frozenset({"scrub.retry_max_s", "delivery.retry_max_s",
                              # the [kafka] security keys that only make sense together
                              "kafka.sasl_username", "kafka.sasl_mechanism", "kafka.ssl_cafile",
                              "kafka.ssl_certfile", "kafka.ssl_keyfile"})
CONSUMERS_AGREE = True  # load accepts values the stages' settings then refuse with ValueError
HUGE_INT_OK = True  # tomllib's ValueError on a > 4300-digit integer escapes load
# A fault in one key can be blamed on another that depends on it: allowUnscrubbed = false makes
# scrubberUrl = "" an error; the allow_insecure_http switches guard the service URLs.
LINKED = {"allowUnscrubbed": {"scrubberUrl"}, "delivery.allow_insecure_http": {"panelUrl"},
          "scrub.allow_insecure_http": {"scrubberUrl"}}

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
FUZZ_SMALL = settings(FUZZ, max_examples=100)
FUZZ_TINY = settings(FUZZ, max_examples=60)
URL_KEYS = {"panelUrl", "scrubberUrl", "base_url"}
REQUIRED_LEAVES = {"name"}  # [[hosts]] entries must have a name
SECRET_MARK = "pw-\u2603-"  # host passwords carry it, so a leak is recognisable

# ---------------------------------------------------------------- TOML values

_chars = st.characters(exclude_categories=("Cs",))
texts = st.text(_chars, max_size=12)
keys = st.one_of(texts, st.sampled_from(["", "a.b", "KAFKA", "[x]", "sampler.num_perm", "panel_url"]))
toml_scalars = st.one_of(
    st.booleans(), st.integers(-(2**63), 2**63 - 1), st.integers(-3, 70_000),
    st.floats(allow_nan=True, allow_infinity=True), texts,
    st.datetimes(min_value=dt.datetime(1000, 1, 1), timezones=st.one_of(st.none(), st.just(dt.UTC))),
    st.dates(min_value=dt.date(1000, 1, 1)), st.times(),
)
toml_values = st.recursive(toml_scalars,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
                           max_leaves=6)
EDGES = [0, -1, 1, 16, 15, 65535, 65536, 290, 291, 0.0, -0.5, 1.5, math.inf, -math.inf, math.nan, "", "x",
         True, False, [], {}, ["x"], "http://example.com", "http://[::1", "http://a\uff03b@c", "//[", "ftp://x",
         "https://u:pw@panel.example", 10_001, 10_000_001, 1e300, -1e300, 168.5]
# beyond 64 bits, beyond float (int -> float overflows), beyond int()'s 4300 digits (written in hex)
huge_decimal = st.one_of(st.integers(2**63, 10**30), st.builds(lambda n: 10**n - 1, st.integers(309, 400)))


class HugeInt(int):
    """An int past 4300 digits with a short repr: int's own raises, and hypothesis reprs examples."""

    def __repr__(self) -> str:
        return f"HugeInt(<{self.bit_length()} bits>)"


huge_hex = st.builds(lambda n: HugeInt(2**n - 1), st.integers(14_300, 20_000))
huge_ints = st.one_of(huge_decimal, huge_decimal.map(lambda v: -v), huge_hex)
wrong_values = st.one_of(st.sampled_from(EDGES), toml_values, huge_ints, huge_ints.map(lambda v: [v]))

PANEL_URLS = ["http://127.0.0.1:3015", "https://panel.example", "http://localhost:1", "http://[::1]:80",
              "https://10.0.0.1/x/"]


def _valid_values(spec: Key, name: str) -> st.SearchStrategy[Any]:
    """Values `spec` accepts (cross-field rules kept too: loopback http, distinct host names)."""
    default = spec.default
    if name in URL_KEYS:
        good: st.SearchStrategy[Any] = st.sampled_from(PANEL_URLS + ([""] if name == "scrubberUrl" else []))
    elif name == "mode":
        good = st.sampled_from(["hold", "drop"])
    elif name == "drop_event_types":
        good = st.lists(st.sampled_from(["message.part.*", "lsp.*", "x.y", "session.*", "session.idle"]),
                        max_size=3)
    elif name == "password":
        good = st.builds(lambda s: SECRET_MARK + s, st.text("abcdef0123", min_size=4, max_size=8))
    elif name == "model":
        good = st.sampled_from(["stub/stub-model", "anthropic/claude-sonnet-4"])
    elif isinstance(default, bool):
        good = st.booleans()
    elif isinstance(default, int):
        good = st.integers(0, 5000) | st.sampled_from([1, 8, 16, 65535])
    elif isinstance(default, float):
        good = st.floats(0, 400) | st.integers(0, 300) | st.sampled_from([0, 1, 290, math.inf])
    else:
        good = st.one_of(st.text(_chars, min_size=1, max_size=12), st.sampled_from(["127.0.0.1:9092", "512m"]))
    return good.filter(lambda v: spec.check(v) is None)


TOP_VALID: dict[str, st.SearchStrategy[Any]] = {
    **{k: _valid_values(f, k) for k, f in TOP.items()},
    # warnings, not errors: below 0 or NaN -> 0.05, above 0.25 capped (README)
    "samplingRate": st.floats(-1, 1) | st.sampled_from([math.nan, -math.inf, 0, 1]),
}
SECTION_VALID = {s: {k: _valid_values(f, k) for k, f in fields.items()} for s, fields in SECTIONS.items()}
# password_env needs its variable in the env: test_host_password_env_* covers it
HOST_VALID = {k: _valid_values(f, k) for k, f in HOST.items() if k not in ("name", "password_env")}
TOP_NAMES = {*TOP_VALID, *SECTIONS, "hosts"}


def pick(draw: st.DrawFn, items: Sequence[Any]) -> Any:
    """One of `items` (a list built during the draw: cheaper than a sampled_from per call)."""
    return items[draw(st.integers(0, len(items) - 1))]


@st.composite
def valid_tables(draw: st.DrawFn, fields: Mapping[str, st.SearchStrategy[Any]], max_keys: int) -> dict[str, Any]:
    chosen = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=max_keys))
    return {k: draw(fields[k]) for k in chosen}


@st.composite
def valid_documents(draw: st.DrawFn) -> dict[str, Any]:
    doc = draw(valid_tables(TOP_VALID, 4))
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)), unique=True, max_size=3)):
        doc[section] = draw(valid_tables(SECTION_VALID[section], 3))
    if draw(st.booleans()):
        doc["hosts"] = [{"name": f"h{i}", **draw(valid_tables(HOST_VALID, 3))}
                        for i in range(draw(st.integers(0, 3)))]
    if doc.get("scrubberUrl") == "":
        doc["allowUnscrubbed"] = True  # a bypass is valid only when allowed
    return doc


def _slots(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any], str, Key | None]]:
    """(path, table, key, spec) of every value of a valid document that a fault may replace."""
    out: list[tuple[str, dict[str, Any], str, Key | None]] = []
    for key, value in doc.items():
        if key in SECTIONS and isinstance(value, dict):
            out += [(f"{key}.{k}", value, k, SECTIONS[key][k]) for k in value if k in SECTIONS[key]]
        elif key == "hosts" and isinstance(value, list):
            for i, host in enumerate(value):
                if isinstance(host, dict):
                    out += [(f"hosts[{i}].{k}", host, k, HOST[k]) for k in host if k in HOST]
        elif key in TOP_VALID:
            out.append((key, doc, key, TOP.get(key)))
    return out


@st.composite
def documents(draw: st.DrawFn, max_faults: int = 3) -> tuple[dict[str, Any], list[str], list[str]]:
    """(document, paths of the faults put in it, paths of those certain to be refused).

    A valid document, then 0..max_faults faults: a value replaced by one of any type, an unknown
    key, a section or `hosts` that is not a table/array, a host without a name or with another
    host's name, a host on plain http to a non-loopback address."""
    doc = draw(valid_documents())
    faults: list[str] = []
    certain: list[str] = []
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 1, 2, max_faults]))):
        kind = draw(st.sampled_from(["value", "value", "unknown", "section", "hosts"]))
        slots = _slots(doc)
        if kind == "value" and slots:
            path, table, key, spec = pick(draw, slots)
            value = draw(wrong_values)
            table[key] = value
            faults.append(path)
            if path in certain:  # a second fault in the same place replaces the first one's value
                certain.remove(path)
            if spec is not None and key not in URL_KEYS and spec.check(value) is not None:
                certain.append(path)
        elif kind == "unknown":
            where = draw(st.sampled_from(["", *[s for s in SECTIONS if isinstance(doc.get(s), dict)]]))
            table = doc[where] if where else doc
            known = TOP_NAMES if not where else set(SECTIONS[where])
            key = draw(keys.filter(lambda k, known=known, table=table: k not in known and k not in table))
            table[key] = draw(toml_values)
            faults.append(f"{where}.{key}" if where else key)
            certain.append(faults[-1])
        elif kind == "section":
            name = draw(st.sampled_from([*SECTIONS, "hosts"]))
            bad = toml_values.filter(lambda v, name=name: not isinstance(v, list if name == "hosts" else dict))
            doc[name] = draw(bad)
            faults.append(name)
            certain.append(name)
        elif isinstance(doc.get("hosts"), list) and doc["hosts"]:
            i = draw(st.integers(0, len(doc["hosts"]) - 1))
            host = doc["hosts"][i]
            how = draw(st.sampled_from(["no_name", "same_name", "insecure", "not_table"]))
            if how == "not_table" or not isinstance(host, dict):
                doc["hosts"][i] = draw(toml_values.filter(lambda v: not isinstance(v, dict)))
                faults.append(f"hosts[{i}]")
            elif how == "no_name":
                host.pop("name", None)
                faults.append(f"hosts[{i}].name")
            elif how == "same_name" and i > 0 and isinstance(doc["hosts"][0], dict):
                host["name"] = doc["hosts"][0].get("name", "h0")
                faults.append(f"hosts[{i}].name")
            else:
                host["base_url"], host["allow_insecure_http"] = "http://example.com", False
                faults.append(f"hosts[{i}].base_url")
    if not URL_PARSE_OK:
        _replace_unparseable_urls(doc)
    return doc, faults, certain


def event(value: str) -> None:
    """hypothesis.event, also callable from the plain (pinned) tests that share the helpers."""
    if currently_in_test_context():
        _event(value)


def _splits(value: Any) -> bool:
    try:
        urlsplit(value)
    except ValueError:
        return False
    return True


def _replace_unparseable_urls(doc: dict[str, Any]) -> None:
    tables_ = [doc, *(h for h in doc.get("hosts", []) if isinstance(h, dict))] \
        if isinstance(doc.get("hosts", []), list) else [doc]
    for table in tables_:
        for key in URL_KEYS & set(table):
            if isinstance(table[key], str) and not _splits(table[key]):
                table[key] = "http://127.0.0.1:1"


# ---------------------------------------------------------------- a TOML writer

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else toml_string(key)


def toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        # hex has no digit limit (str() of a > 4300-digit int raises); huge_ints makes those positive
        return hex(value) if value.bit_length() > 14_000 else str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def toml_document(doc: Mapping[str, Any], headers: bool) -> str:
    """`doc` as TOML: tables as `[name]` / `[[name]]` sections when `headers`, else inline."""
    lines, sections = [], []
    for key, value in doc.items():
        if headers and isinstance(value, dict):
            sections.append(f"[{toml_key(key)}]")
            sections.extend(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items())
        elif headers and isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for table in value:
                sections.append(f"[[{toml_key(key)}]]")
                sections.extend(f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items())
        else:
            lines.append(f"{toml_key(key)} = {toml_value(value)}")
    return "\n".join([*lines, *sections]) + "\n"


def present_keys(doc: Any, prefix: str = "") -> Iterator[str]:
    """Every key path of a document as ConfigError spells them: `a`, `a.b`, `hosts[0].name`."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            path = f"{prefix}.{key}" if prefix else key
            yield path
            yield from present_keys(value, path)
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            path = f"{prefix}[{i}]"
            yield path
            yield from present_keys(value, path)


def _passwords(doc: Mapping[str, Any]) -> list[str]:
    hosts = doc.get("hosts")
    return [h["password"] for h in hosts if isinstance(h, dict) and isinstance(h.get("password"), str)
            and h["password"].startswith(SECRET_MARK)] if isinstance(hosts, list) else []


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-config") / "pipeline.toml"


def load_checked(path: Path, text: str | bytes, env: Mapping[str, str],
                 allowed: set[str] | None = None) -> Config | ConfigError:
    """load `text`: a Config, or the ConfigError, which must name a key of the document (or one
    of `allowed`), in its message, without a password; no other exception."""
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    try:
        parsed: Any = tomllib.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):  # TOMLDecodeError, int()'s digit limit, nesting
        parsed = None
    try:
        cfg = config_mod.load(path, env)
    except ConfigError as exc:
        if parsed is None:
            assert exc.key == "--config", exc.key
            event("ConfigError: not TOML")
            return exc
        known = set(present_keys(parsed)) | (allowed or set())
        # A required key left out is named where it belongs: `hosts[0].name` in a present `hosts[0]`.
        parent, _, leaf = (exc.key or "").rpartition(".")
        missing_required = parent in known and leaf in REQUIRED_LEAVES
        assert exc.key in known or missing_required or exc.key in CROSS_FIELD_KEYS, \
            f"{exc.key!r} is not a key of the document: {sorted(known)}"
        assert exc.key in str(exc) or repr(exc.key) in str(exc)  # repr for keys with control characters
        for secret in _passwords(parsed):
            assert secret not in str(exc)
        event("ConfigError: " + re.sub(r"\[\d+\]", "[i]", exc.key))
        return exc
    assert parsed is not None, "load accepted a file that is not TOML"
    for secret in _passwords(parsed):
        assert secret not in repr(cfg)
    event("Config")
    return cfg


def check_values(cfg: Config, doc: Mapping[str, Any]) -> None:
    """A loaded Config holds what the document said (no env overrides in play)."""
    for key, spec in TOP.items():
        if key in doc and key != "samplingRate":  # the rate has fallbacks: checked below
            assert getattr(cfg, spec.attr) == doc[key]
    for section, fields in SECTIONS.items():
        for key, value in (doc.get(section) or {}).items():
            spec = fields[key]
            assert getattr(getattr(cfg, section), spec.attr) == (spec.parse(value) if spec.parse else value)
    assert len(cfg.hosts) == len(doc.get("hosts", []))
    assert 0.0 <= cfg.sampling_rate <= (1.0 if cfg.sampling_rate_override else 0.25)


# ---------------------------------------------------------------- properties


@FUZZ
@given(documents(), st.booleans())
def test_load_gives_a_config_or_a_config_error_naming_a_fault(
        config_file: Path, case: tuple[dict[str, Any], list[str], list[str]], headers: bool) -> None:
    doc, faults, certain = case
    text = toml_document(doc, headers)
    parsed = tomllib.loads(text)  # the writer wrote TOML
    event(f"faults: {len(faults)}")
    cfg = load_checked(config_file, text, {})
    if isinstance(cfg, ConfigError) and cfg.key in CROSS_FIELD_KEYS:
        return  # a rule between keys the generator does not model; pinned by test_loader_refuses_...
    if isinstance(cfg, ConfigError):
        assert faults, f"a document of valid values was refused: {cfg}"
        blamed = set(faults).union(*(LINKED.get(f, set()) for f in faults))
        assert cfg.key in blamed, f"{cfg.key!r} is none of the faults {faults}"
    else:
        assert not certain, f"accepted although {certain} cannot be valid"
        check_values(cfg, parsed)


SAMPLE_DOCUMENT = """samplingRate = 0.1
panelUrl = "https://panel.example"
[kafka]
bootstrap = "127.0.0.1:9092"
partitions = 4
[breaker]
mode = "drop"
[[hosts]]
name = "a"
base_url = "http://127.0.0.1:4096"
password = "pw-\u2603-abcd"
[[hosts]]
name = "b"
model = "stub/stub-model"
"""


@FUZZ_SMALL
@given(st.one_of(st.binary(max_size=200),
                 st.builds(lambda cut, junk: SAMPLE_DOCUMENT.encode("utf-8")[:cut] + junk,
                           st.integers(0, len(SAMPLE_DOCUMENT)), st.sampled_from([b"", b"\xff", b"=", b"\n[", b'"'])),
                 st.sampled_from([b"\xff", b"a =", b"[kafka]\n[kafka]\n", b"a = 1\na = 2\n", b"\x00"])))
def test_load_of_any_bytes_gives_a_config_or_a_config_error(config_file: Path, raw: bytes) -> None:
    load_checked(config_file, raw, {})


ENV_NAMES = st.one_of(
    st.sampled_from(["PIPELINE_SAMPLING_RATE", "PIPELINE_LRU_SIZE", "PIPELINE_PANEL_URL", "PIPELINE_ENABLED",
                     "PIPELINE_SCRUBBER_URL", "PIPELINE_ALLOW_UNSCRUBBED", "PIPELINE_DELIVERY__ALLOW_INSECURE_HTTP",
                     "PIPELINE_KAFKA__UNSCRUBBED_RETENTION_HOURS",
                     "PIPELINE_KAFKA__BOOTSTRAP", "PIPELINE_KAFKA__PARTITIONS", "PIPELINE_BREAKER__MODE",
                     "PIPELINE_SAMPLER__NUM_PERM", "PIPELINE_COLLECTOR__DROP_EVENT_TYPES",
                     "PIPELINE_METRICS__PORT", "PIPELINE_HOSTS__NAME", "PIPELINE_NOPE",
                     "PIPELINE_NOPE__NOPE", "PIPELINE_KAFKA__NOPE", "PIPELINE_KAFKA__A__B", "PIPELINE___",
                     "PIPELINE_CONFIG", "OTHER_VARIABLE"]),
    st.builds(lambda a, b: f"PIPELINE_{a}__{b}", st.text("ABKFZ_", max_size=5), st.text("ABXY_", max_size=5)),
)
ENV_VALUES = st.one_of(st.sampled_from(["1", "0", "-1", "true", "x", "[1, 2]", '"s"', "nan", "", "{a = 1}",
                                        '["session.*"]', "1979-05-27", "hold", "drop", "http://[::1", " ",
                                        "1e400", "9" * 400, "9" * 5000, "0x" + "f" * 5000, "[" * 3000 + "]" * 3000,
                                        "{a = " * 2000 + "1" + "}" * 2000, "https://u:pw@x.example"]),
                       st.text(_chars, max_size=10))


TOP_ENV = {"PIPELINE_" + re.sub(r"(?<!^)(?=[A-Z])", "_", k).upper(): k for k in TOP}


def _env_paths(name: str) -> set[str]:
    """The keys an override can be blamed under: its name, and the key it sets."""
    if name in TOP_ENV:
        return {name, TOP_ENV[name]}
    if "__" not in name:
        return {name}
    section, key = name[len("PIPELINE_"):].split("__", 1)
    return {name, section.lower(), f"{section.lower()}.{key.lower()}"}


def _env_known_bug(doc: Mapping[str, Any], name: str) -> bool:
    if ENV_OVER_NON_TABLE_OK or "__" not in name or not name.startswith("PIPELINE_"):
        return False
    section = name[len("PIPELINE_"):].split("__", 1)[0].lower()
    return section == "enabled" or (section in doc and not isinstance(doc[section], dict))


@FUZZ_TINY
@given(documents(1), st.dictionaries(ENV_NAMES, ENV_VALUES, max_size=4))
def test_env_overrides_give_a_config_or_a_config_error_naming_the_key(
        config_file: Path, case: tuple[dict[str, Any], list[str], list[str]], env: dict[str, str]) -> None:
    doc = case[0]
    env = {k: v for k, v in env.items() if not _env_known_bug(doc, k)}
    if not URL_PARSE_OK:
        env = {k: v for k, v in env.items() if k != "PIPELINE_PANEL_URL" or _splits(v)}
    allowed: set[str] = set().union(*(_env_paths(n) for n in env if n.startswith("PIPELINE_")))
    load_checked(config_file, toml_document(doc, True), env, allowed)


def nested_text(depth: int, as_table: bool) -> str:
    """A TOML value `depth` arrays or inline tables deep (written here: the writer would recurse)."""
    return "{k = " * depth + "1" + "}" * depth if as_table else "[" * depth + "1" + "]" * depth


@FUZZ_TINY
@given(valid_documents(), st.one_of(st.sampled_from([1, 100, 300, 400, 1000, 3000, 10_000]), st.integers(1, 6000)),
       st.booleans(), st.sampled_from(["", "kafka", "collector", "hosts"]),
       st.sampled_from(["lruSize", "bootstrap", "name", "nested_key", "samplingRate"]))
def test_nesting_at_any_depth_gives_a_config_or_a_config_error(
        config_file: Path, doc: dict[str, Any], depth: int, as_table: bool, where: str, key: str) -> None:
    """tomllib parses nested arrays and inline tables recursively: too deep is a RecursionError
    in it, which load must turn into a ConfigError naming the file."""
    if where == "hosts":
        doc["hosts"] = [{"name": "h0"}]
    elif where:
        doc[where] = doc.get(where) if isinstance(doc.get(where), dict) else {}
    marker = "__nested__"
    table = doc["hosts"][0] if where == "hosts" else (doc[where] if where else doc)
    table[key] = marker
    text = toml_document(doc, True).replace(toml_string(marker), nested_text(depth, as_table))
    result = load_checked(config_file, text, {})
    if isinstance(result, ConfigError) and result.key == "--config":
        assert "nested too deeply" in str(result) or depth < 100, str(result)


_PASSWORD_VARS = ["OPENCODE_PASSWORD_A", "OPENCODE_PASSWORD_B", "PW"]


@FUZZ_SMALL
@given(st.lists(st.tuples(st.sampled_from([None, *_PASSWORD_VARS]), st.sampled_from([None, SECRET_MARK + "inline"])),
                min_size=1, max_size=3),
       st.dictionaries(st.sampled_from(_PASSWORD_VARS), st.sampled_from(["", SECRET_MARK + "env", SECRET_MARK + "x"]),
                       max_size=3))
def test_host_password_env_is_read_from_the_env_given_to_load(
        config_file: Path, hosts: list[tuple[str | None, str | None]], env: dict[str, str]) -> None:
    """Each host: password inline, or from the variable password_env names (set, not empty), not
    both; a ConfigError names hosts[i].password_env and never a password."""
    doc = {"hosts": [{"name": f"h{i}", **({"password_env": var} if var else {}),
                      **({"password": pw} if pw else {})} for i, (var, pw) in enumerate(hosts)]}
    result = load_checked(config_file, toml_document(doc, True), env)
    expected: list[str | None] = []
    for i, (var, pw) in enumerate(hosts):
        if var is not None and (pw is not None or not env.get(var)):
            assert isinstance(result, ConfigError), (hosts, env)
            assert result.key == f"hosts[{i}].password_env" and (pw is not None or var in str(result))
            assert all(v not in str(result) for v in env.values() if v)
            return
        expected.append(env[var] if var is not None else pw)
    assert isinstance(result, Config), result
    assert [h.password.reveal() if h.password else None for h in result.hosts] == expected


@FUZZ_SMALL
@given(st.sampled_from(["panelUrl", "scrubberUrl", "base_url"]), st.sampled_from(["http", "https"]),
       st.text(st.characters(codec="ascii", categories=("L", "N")), min_size=1, max_size=8),
       st.text(st.characters(codec="ascii", exclude_characters="\"\\/?#"), min_size=0, max_size=12),
       st.sampled_from(["127.0.0.1:1", "panel.example", "[::1]:3015", "10.0.0.1", "[::1"]))
def test_urls_with_credentials_are_refused_without_showing_them(
        config_file: Path, key: str, scheme: str, user: str, password: str, host: str) -> None:
    user = f"usr-{user}"
    url = f"{scheme}://{user}:{SECRET_MARK}{password}@{host}/"
    doc = {"hosts": [{"name": "a", "base_url": url}]} if key == "base_url" else {key: url}
    result = load_checked(config_file, toml_document(doc, True), {})
    assert isinstance(result, ConfigError) and result.key in (key, "hosts[0].base_url")
    assert SECRET_MARK not in str(result) and user not in str(result)


def _consumer_known_bug(cfg: Config) -> str | None:
    """Which known load/stage disagreement `cfg` falls into, if any (CONSUMERS_AGREE False)."""
    if CONSUMERS_AGREE:
        return None
    positive = [cfg.collector.heartbeat_period_s, cfg.collector.reconnect_min_s, cfg.collector.reconnect_max_s,
                cfg.collector.checkpoint_interval_s, cfg.scrub.retry_base_s, cfg.scrub.retry_max_s,
                cfg.delivery.retry_base_s, cfg.delivery.retry_max_s, cfg.delivery.max_age_s,
                cfg.breaker.failure_window_s, cfg.breaker.open_s]
    if any(v == 0 or math.isinf(v) for v in positive):
        return "zero or infinite seconds"
    if cfg.scrub.retry_max_s < cfg.scrub.retry_base_s or cfg.delivery.retry_max_s < cfg.delivery.retry_base_s:
        return "retry_max_s < retry_base_s"
    if cfg.sampler.num_perm < 16:
        return "num_perm < 16"
    drop = cfg.collector.drop_event_types or []
    if any(t == "session.*" or t in ("session.idle", "pipeline.turn_ended") for t in drop):
        return "drop_event_types drops a required type"
    return None


def build_stage_settings(cfg: Config) -> None:
    """What the stages construct from the config when they start (agents/*.py, collector)."""
    CollectorSettings.from_config(cfg)
    b = cfg.breaker
    BreakerSettings(failure_threshold=b.failure_threshold, failure_window_s=b.failure_window_s,
                    open_s=b.open_s, mode=b.mode)
    RetryPolicy(base_s=cfg.scrub.retry_base_s, max_s=cfg.scrub.retry_max_s)
    d = cfg.delivery
    RetryPolicy(base_s=d.retry_base_s, max_s=d.retry_max_s, max_age_s=d.max_age_s)
    windows = NoveltyWindows(size=cfg.lru_size, num_perm=cfg.sampler.num_perm, threshold=cfg.novelty_threshold)
    reference_sampler(windows, rate=cfg.sampling_rate, rate_override=cfg.sampling_rate_override,
                      max_messages=cfg.max_messages, token_messages=cfg.sampler.novelty_window_tokens_messages)


@FUZZ_TINY
@given(documents(1), st.booleans())
def test_every_loaded_config_is_accepted_by_the_stages(
        config_file: Path, case: tuple[dict[str, Any], list[str], list[str]], headers: bool) -> None:
    cfg = load_checked(config_file, toml_document(case[0], headers), {})
    if isinstance(cfg, ConfigError) or cfg.lru_size * cfg.sampler.num_perm > 2_000_000:
        return  # rejected, or a window too large to allocate here (not a config question)
    bug = _consumer_known_bug(cfg)
    if bug:
        event(f"known bug: {bug}")
        return
    build_stage_settings(cfg)


# ---------------------------------------------------------------- the CLI: exit code 2

CLI_CASES = {  # file contents -> the key the message must name
    'lruSize = "x"\n': "lruSize",
    "[kafka]\npartitions = 0\n": "kafka.partitions",
    '[[hosts]]\nname = "a"\nbase_url = "http://example.com"\n': "hosts[0].base_url",
    'panelUrl = "http://[::1"\n': "panelUrl",  # the URL bug: pinned below
    "lruSize = 0x" + "f" * 5000 + "\n": "lruSize",
    "a = " + "{b = " * 5000 + "1" + "}" * 5000 + "\n": "nested too deeply",
    '[[hosts]]\nname = "a"\npassword_env = "UNSET_IN_THIS_TEST"\n': "UNSET_IN_THIS_TEST",
}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    """`pipeline --config F topics list` for every case, run side by side."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    folder = tmp_path_factory.mktemp("cli-config")
    procs = {}
    for i, text in enumerate(CLI_CASES):
        path = folder / f"c{i}.toml"
        path.write_text(text, encoding="utf-8")
        procs[text] = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "--config", str(path), "topics", "list"],
                                       cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for text, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        results[text] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize("text", [t for t in CLI_CASES if "[::1" not in t])
def test_cli_exits_2_naming_the_key(cli_results: dict[str, subprocess.CompletedProcess[str]], text: str) -> None:
    result = cli_results[text]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "config error" in result.stderr and CLI_CASES[text] in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- pinned bugs (strict xfail)


@pytest.mark.xfail(not URL_PARSE_OK, strict=True, reason="bug: config._url/_hosts let urlsplit's ValueError out")
@pytest.mark.parametrize("text", ['panelUrl = "http://[::1"\n', 'scrubberUrl = "http://a\uff03b@c"\n',
                                  '[[hosts]]\nname = "a"\nbase_url = "http://[zz"\n'])
def test_bug_unparseable_url_is_a_config_error(tmp_path: Path, text: str) -> None:
    load_checked(tmp_path / "c.toml", text, {})


@pytest.mark.xfail(not URL_PARSE_OK, strict=True, reason="bug: the CLI exits 1 with a traceback, not 2")
def test_bug_cli_exits_2_on_an_unparseable_url(cli_results: dict[str, subprocess.CompletedProcess[str]]) -> None:
    result = cli_results['panelUrl = "http://[::1"\n']
    assert result.returncode == 2, result.stderr[-2000:]


@pytest.mark.xfail(not HUGE_INT_OK, strict=True, reason="bug: load catches TOMLDecodeError, not int()'s ValueError")
def test_bug_huge_integer_is_a_config_error(tmp_path: Path) -> None:
    load_checked(tmp_path / "c.toml", "lruSize = " + "1" * 4301 + "\n", {})


@pytest.mark.xfail(not ENV_OVER_NON_TABLE_OK, strict=True,
                   reason="bug: _apply_env indexes a non-table document value (TypeError)")
@pytest.mark.parametrize("text,name", [("kafka = 3\n", "PIPELINE_KAFKA__BOOTSTRAP"),
                                       ('[[hosts]]\nname = "a"\n', "PIPELINE_HOSTS__NAME"),
                                       ("enabled = true\n", "PIPELINE_ENABLED__X")])
def test_bug_env_override_into_a_non_table(tmp_path: Path, text: str, name: str) -> None:
    load_checked(tmp_path / "c.toml", text, {name: "x"}, _env_paths(name))


@pytest.mark.parametrize("text", [
    "[sampler]\nnum_perm = 8\n",  # MinHasher needs >= 16
    '[collector]\ndrop_event_types = ["session.*"]\n',  # EventFilter refuses to drop required types
    "[collector]\nheartbeat_period_s = 0\n",  # the old POS_FLOAT said "> 0" but admitted 0
    "[scrub]\nretry_base_s = 0\n",
    "[scrub]\nretry_base_s = 5.0\nretry_max_s = 1.0\n",  # RetryPolicy needs max >= base
    "[breaker]\nopen_s = inf\n",  # BreakerSettings needs finite
])
def test_loader_refuses_what_a_stage_would_refuse(tmp_path: Path, text: str) -> None:
    # once a bug (load accepted, the stage refused at start with a ValueError): now exit 2 at load
    cfg = load_checked(tmp_path / "c.toml", text, {})
    assert isinstance(cfg, ConfigError), cfg
