"""How a configuration key is declared: a dataclass field whose metadata holds its rule and help.

A section of the configuration is a frozen dataclass; each of its keys is a field made by `key()`,
carrying the default (the field's own), the rule a value must pass (bounds included) and the help
text the README's tables are generated from. Settings a component needs that are no config key
are made by `tuning()`: checked by the same rules, never read from the file.

This module imports nothing else from the pipeline, so the components that own a section's class
(the collector, the breaker) can import it without importing the loader.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

# Every duration is bounded: a year is far past any sensible timeout, and well inside what
# sleeps, socket timeouts and epoch arithmetic take (1e300 s overflows them).
MAX_SECONDS = 365 * 86400.0
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_SHOW_MAX = 80

Check = Callable[[Any], str | None]  # returns what was expected, or None when the value is fine


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


# ---------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """What a key accepts: `what` says it (in errors and in the README), `test` decides.

    `test` returns True for a good value, False for a bad one, or a string saying more precisely
    what was expected for this bad value.
    """

    what: str
    test: Callable[[Any], bool | str]

    def __call__(self, value: Any) -> str | None:
        verdict = self.test(value)
        if verdict is True:
            return None
        return verdict if isinstance(verdict, str) else self.what


def _is(kind: type | tuple[type, ...], value: Any) -> bool:
    """isinstance, where a bool is no number (TOML's true is not 1)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return isinstance(value, kind) and (bool in kinds or not isinstance(value, bool))


def typed(kind: type | tuple[type, ...], what: str) -> Rule:
    return Rule(what, lambda v: _is(kind, v))


def between(lo: float | None, hi: float | None, kind: type | tuple[type, ...], what: str,
            above_lo: bool = False) -> Rule:
    """A number in [lo, hi] ((lo, hi] with `above_lo`). A huge int is compared, never converted."""

    def test(v: Any) -> bool:
        if not _is(kind, v) or (isinstance(v, float) and math.isnan(v)):
            return False
        if lo is not None and (v < lo or (above_lo and v == lo)):
            return False
        return hi is None or v <= hi

    return Rule(what, test)


def count(hi: int) -> Rule:
    """An integer 1..hi: every count sizes something (a buffer, a window, a topic)."""
    return between(1, hi, int, f"an integer between 1 and {hi}")


def positive(hi: float, what: str) -> Rule:
    """A number > 0 and <= hi."""
    return between(0, hi, (int, float), what, above_lo=True)


def choice(*options: str) -> Rule:
    return Rule("one of " + ", ".join(repr(o) for o in options), lambda v: v in options)


def url(allow_empty: bool) -> Rule:
    what = "an http(s) URL" + (' or "" to disable' if allow_empty else "")

    def test(value: Any) -> bool | str:
        if not isinstance(value, str):
            return False
        if value == "" and allow_empty:
            return True
        if "@" in value:  # user:password@ (or a mistake that looks like it): credentials come from the env
            return "an http(s) URL without user:password@ (credentials belong in the environment)"
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on an out-of-range or malformed port
        except ValueError:
            return False
        return parts.scheme in ("http", "https") and bool(parts.hostname)

    return Rule(what, test)


def optional(rule: Rule) -> Rule:
    """`rule`, or None: a key whose default is "not set" (TOML itself cannot write None)."""
    return Rule(rule.what, lambda v: v is None or rule.test(v))


STR = typed(str, "a string")
NONEMPTY = Rule("a non-empty string", lambda v: isinstance(v, str) and v != "")
BOOL = typed(bool, "true or false")
PORT = between(0, 65535, int, "a port number 0..65535")
UNIT = between(0.0, 1.0, (int, float), "a number between 0 and 1")
SECONDS = positive(MAX_SECONDS, f"seconds > 0 and at most {MAX_SECONDS:.0f} (a year)")
STR_LIST = Rule("a list of strings", lambda v: isinstance(v, list | tuple) and all(isinstance(s, str) for s in v))
ENV_NAME = Rule("an environment variable name (A-Z, 0-9, _; not starting with a digit)",
                lambda v: isinstance(v, str) and _ENV_NAME.match(v) is not None)


# ---------------------------------------------------------------- showing a refused value


def show(value: Any) -> str:
    """`value` for an error message, bounded: repr of a > 4300-digit integer (a TOML hex literal
    has no digit limit) raises, and a 10 KB value would bury the key the message names."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return "a value too large to show"
    return text if len(text) <= _SHOW_MAX else f"{text[:_SHOW_MAX]}... ({len(text)} characters)"


def show_url(value: Any) -> str:
    # a URL with an @ may hold a password: say what is wrong with it, never what it is
    return "a URL with credentials (not shown)" if isinstance(value, str) and "@" in value else show(value)


def show_nothing(value: Any) -> str:
    return f"a {type(value).__name__} (not shown)"


# ---------------------------------------------------------------- declaring keys


@dataclass(frozen=True)
class Key:
    """One key: its name in the file, its attribute, default, rule and help.

    `parse` turns an accepted value into what the attribute holds (a TOML string into a Path).
    `doc_default` is how the default reads in the README when the value itself says little.
    `is_key` is False for a `tuning()` field: checked the same way, but not read from the file.
    """

    name: str
    attr: str
    default: Any
    check: Check
    help: str
    show: Callable[[Any], str] = show
    parse: Callable[[Any], Any] | None = None
    doc_default: str | None = None
    is_key: bool = True


_META = "pipeline.config"


def key(default: Any, check: Check, help: str, *, name: str | None = None, show: Callable[[Any], str] = show,
        parse: Callable[[Any], Any] | None = None, doc_default: str | None = None) -> Any:
    """A dataclass field declaring a config key (`name` when the file spells it otherwise)."""
    spec = Key(name or "", "", default, check, help, show, parse, doc_default)
    return dataclasses.field(default=default, metadata={_META: spec})


def tuning(default: Any, check: Check, help: str) -> Any:
    """A dataclass field for a setting that is no config key: internal, checked all the same."""
    return dataclasses.field(default=default, metadata={_META: Key("", "", default, check, help, is_key=False)})


def same_as(spec: Key) -> Any:
    """A field holding a key declared elsewhere (the top-level `maxMessages` in the collector's
    settings): same default and rule, filled in by the loader, not a key of this section."""
    return dataclasses.field(default=spec.default, metadata={_META: dataclasses.replace(spec, is_key=False)})


def _specs(cls: type) -> list[Key]:
    out = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(_META)
        if spec is not None:
            out.append(dataclasses.replace(spec, attr=f.name, name=spec.name or f.name))
    return out


def keys_of(cls: type) -> dict[str, Key]:
    """The config keys `cls` declares, by their name in the file, in declaration order."""
    return {spec.name: spec for spec in _specs(cls) if spec.is_key}


class SettingError(ValueError):
    """A settings object refused a value: `key` names the field, the message says what it expected."""

    def __init__(self, key: str, expected: str, shown: str) -> None:
        super().__init__(f"{key}: expected {expected}, got {shown}")
        self.key, self.expected, self.shown = key, expected, shown


def check_fields(obj: Any) -> None:
    """Check every declared field of a settings object, then store its parsed form.

    Called from the `__post_init__` of every section, so an object built in code (a test, a
    benchmark) obeys the same rules as one loaded from a file.
    """
    for spec in _specs(type(obj)):
        value = getattr(obj, spec.attr)
        expected = spec.check(value)
        if expected:
            raise SettingError(spec.name, expected, spec.show(value))
        if spec.parse is not None:
            object.__setattr__(obj, spec.attr, spec.parse(value))


def check_table(table: Mapping[str, Any], keys: Mapping[str, Key]) -> dict[str, Any]:
    """The values of `table` (a parsed TOML table of known keys) by attribute, defaults filled in.

    Raises SettingError naming the first refused key.
    """
    out = {}
    for name, spec in keys.items():
        if name in table:
            value = table[name]
            expected = spec.check(value)
            if expected:
                raise SettingError(name, expected, spec.show(value))
            out[spec.attr] = value
        else:
            out[spec.attr] = spec.default
    return out
