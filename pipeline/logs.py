"""Log output: plain text for people at a terminal, one JSON object a line for log shippers.

A JSON line carries `time` (UTC, ISO 8601), `level`, `logger`, `message`, `exception` (the
traceback text) when there is one, and the context fields known where the line was logged:
`stage`, `trace_id`, `session`, ... The runtime sets those per record it processes with
`log_context(...)`, so a line logged deep inside a client still says which trace it was about,
without every call site passing them along.

What a line holds is the message, its logger and that context: never the environment or the
configuration (the formatter has no access to either), so secrets stay out of the logs as long
as messages keep them out, which the rest of the code already does. Context values are limited
to `CONTEXT_FIELDS` for the same reason: a mistaken `log_context(config=cfg)` fails at once
instead of shipping a config object to the log store.

Libraries are quiet by default: httpx, httpcore, aiokafka, faust and mode log at WARNING and
above (one INFO line per HTTP request is noise before a command's answer); `-v` lets their
DEBUG lines through, and a worker's `--loglevel` sets their level. A one-shot command that
reports an unreachable broker itself (one line, exit 1) also drops aiokafka's own "Unable
connect to ..." lines, which would only say the same thing first.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import logging.config
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The fields a context may carry, in the order a JSON line lists them.
CONTEXT_FIELDS = ("stage", "host", "session", "trace_id", "topic", "partition", "offset")

# The libraries whose INFO lines are not the operator's business unless asked for (-v).
LIBRARY_LOGGERS = ("aiohttp", "httpx", "httpcore", "aiokafka", "faust", "mode")
# aiokafka's lines about a broker it cannot reach: a one-shot command reports that itself.
_BROKER_UNREACHABLE = re.compile(r"^Unable (connect to|to request metadata|to update metadata|to bootstrap)")

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("pipeline_log_context", default=_EMPTY)


def _checked(fields: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(fields) - set(CONTEXT_FIELDS))
    if unknown:
        raise TypeError(f"log context: unknown field(s) {unknown} (known: {', '.join(CONTEXT_FIELDS)})")
    # Scalars only: an object's repr could carry anything, a secret included.
    return {k: v if v is None or isinstance(v, bool | int | float) else str(v) for k, v in fields.items()}


def bind_log_context(**fields: Any) -> contextvars.Token[Mapping[str, Any]]:
    """Add `fields` to the current context (an asyncio task or thread has its own) and return
    the token that `reset_log_context` takes to undo it. A field set to None is dropped.

    For code that cannot use a `with` block (a callback that starts a record and another that
    ends it); otherwise prefer `log_context`."""
    merged = {**_context.get(), **_checked(fields)}
    return _context.set(MappingProxyType({k: v for k, v in merged.items() if v is not None}))


def reset_log_context(token: contextvars.Token[Mapping[str, Any]]) -> None:
    """Undo the `bind_log_context` that returned `token`."""
    _context.reset(token)


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Every line logged inside the block (in this task or thread) carries `fields`, on top of
    the enclosing context: `with log_context(stage="sign", trace_id=t): ...`."""
    token = bind_log_context(**fields)
    try:
        yield
    finally:
        _context.reset(token)


def current_log_context() -> dict[str, Any]:
    """The fields lines logged here would carry."""
    return dict(_context.get())


class ContextFilter(logging.Filter):
    """Copies the context onto each record when it is logged, in the logging task: a handler
    that formats later or elsewhere (a queue, another thread) still sees the right fields.
    Fields passed as `extra={...}` win over the context."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class ReportedByCommand(logging.Filter):
    """Drops aiokafka's warnings and errors about a broker it cannot reach. For one-shot
    commands only: they turn that failure into their own one line (naming the bootstrap and
    what to check), so aiokafka's line before it says the same thing twice. A long-running
    process (a worker, the collector) keeps them: there they are how an outage shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("aiokafka") and record.levelno >= logging.WARNING:
            return not _BROKER_UNREACHABLE.match(str(record.msg))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line. Only the record's own fields are read: the message, its logger,
    level and time, the exception, and the `CONTEXT_FIELDS` it carries."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = _context.get()
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, context.get(key))
            if value is not None:
                doc[key] = value if isinstance(value, bool | int | float | str) else str(value)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exception"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        # json.dumps escapes newlines: a traceback stays on its one line.
        return json.dumps(doc, ensure_ascii=False, default=str)


def dict_config(fmt: LogFormat, verbose: bool = False, stream: str = "ext://sys.stderr", *,
                library_level: str | None = None, one_shot: bool = False) -> dict[str, Any]:
    """The `logging.config.dictConfig` dict `configure` applies. faust's worker (mode) replaces
    the root logger's handlers when it starts: pass this as `faust.Worker(..., logging_config=...)`
    so a worker keeps the chosen format (and its `--loglevel`, as `library_level`).

    `library_level`: the level of `LIBRARY_LOGGERS` (default WARNING, DEBUG with `verbose`).
    `one_shot`: drop aiokafka's unreachable-broker lines (`ReportedByCommand`) unless `verbose`."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format: expected 'text' or 'json', got {fmt!r}")
    level = "DEBUG" if verbose else "INFO"
    libraries = (library_level or ("DEBUG" if verbose else "WARNING")).upper()
    formatter: dict[str, Any] = {"()": f"{__name__}.JsonFormatter"} if fmt == "json" else {"format": TEXT_FORMAT}
    filters = ["context", "reported"] if one_shot and not verbose else ["context"]
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": f"{__name__}.ContextFilter"},
                    "reported": {"()": f"{__name__}.ReportedByCommand"}},
        "formatters": {"default": formatter},
        # the loggers decide what passes (a library may be more verbose than the root)
        "handlers": {"default": {"class": "logging.StreamHandler", "stream": stream, "formatter": "default",
                                 "filters": filters, "level": "DEBUG"}},
        "loggers": {name: {"level": libraries} for name in LIBRARY_LOGGERS},
        "root": {"level": level, "handlers": ["default"]},
    }


def configure(fmt: LogFormat = "text", verbose: bool = False, *, one_shot: bool = False) -> None:
    """Log to stderr in `fmt`, DEBUG with `verbose` else INFO (libraries: WARNING unless
    `verbose`), replacing the root logger's handlers (so calling it twice does not print every
    line twice). `one_shot`: see `dict_config`."""
    logging.config.dictConfig(dict_config(fmt, verbose, one_shot=one_shot))
