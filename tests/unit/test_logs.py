"""pipeline/logs.py: one JSON object a line with the context fields, today's text format for
people, context that follows tasks and threads, and nothing from the environment or config."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
from collections.abc import Iterator

import pytest

from pipeline import logs


@pytest.fixture
def root() -> Iterator[logging.Logger]:
    """The root logger as it was, after the test replaced its handlers."""
    logger = logging.getLogger()
    handlers, level = logger.handlers[:], logger.level
    try:
        yield logger
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)


def capture(fmt: logs.LogFormat, verbose: bool = False) -> io.StringIO:
    """configure(), then point its handler at a buffer (it writes to stderr)."""
    logs.configure(fmt, verbose)
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler, logging.StreamHandler)
    buffer = io.StringIO()
    handler.setStream(buffer)
    return buffer


def lines(buffer: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_json_lines_carry_time_level_logger_message(root: logging.Logger) -> None:
    out = capture("json")
    logging.getLogger("pipeline.test").info("read %d records from %s", 3, "traces.signed")
    logging.getLogger("pipeline.test").debug("not at INFO")
    (doc,) = lines(out)
    assert doc["level"] == "INFO" and doc["logger"] == "pipeline.test"
    assert doc["message"] == "read 3 records from traces.signed"
    assert str(doc["time"]).endswith("Z") and "T" in str(doc["time"])
    assert set(doc) == {"time", "level", "logger", "message"}  # no context: no context fields


def test_verbose_logs_debug(root: logging.Logger) -> None:
    out = capture("json", verbose=True)
    logging.getLogger("x").debug("now visible")
    assert [d["level"] for d in lines(out)] == ["DEBUG"]


def test_exception_text_stays_on_one_line(root: logging.Logger) -> None:
    out = capture("json")
    try:
        raise ValueError("bad record\nsecond line")
    except ValueError:
        logging.getLogger("x").exception("could not process")
    assert len(out.getvalue().splitlines()) == 1
    (doc,) = lines(out)
    assert doc["level"] == "ERROR" and "Traceback" in str(doc["exception"])
    assert "ValueError: bad record\nsecond line" in str(doc["exception"])


def test_context_fields_nest_and_unwind(root: logging.Logger) -> None:
    out = capture("json")
    log = logging.getLogger("x")
    with logs.log_context(stage="sign"):
        log.info("a")
        with logs.log_context(trace_id="t-1", session="build1:ses_1", partition=3):
            log.info("b")
        log.info("c")
    log.info("d")
    a, b, c, d = lines(out)
    assert a["stage"] == "sign" and "trace_id" not in a
    assert (b["stage"], b["trace_id"], b["session"], b["partition"]) == ("sign", "t-1", "build1:ses_1", 3)
    assert c["stage"] == "sign" and "trace_id" not in c
    assert "stage" not in d and logs.current_log_context() == {}


def test_bind_and_reset_without_a_block(root: logging.Logger) -> None:
    out = capture("json")
    token = logs.bind_log_context(stage="deliver", trace_id="t-2")
    logging.getLogger("x").info("inside")
    logs.reset_log_context(token)
    logging.getLogger("x").info("outside")
    inside, outside = lines(out)
    assert inside["trace_id"] == "t-2" and "trace_id" not in outside


def test_extra_fields_win_over_the_context(root: logging.Logger) -> None:
    out = capture("json")
    with logs.log_context(stage="sign", trace_id="from-context"):
        logging.getLogger("x").info("m", extra={"trace_id": "from-extra"})
    (doc,) = lines(out)
    assert doc["trace_id"] == "from-extra" and doc["stage"] == "sign"


def test_context_is_per_task_and_per_thread(root: logging.Logger) -> None:
    """Concurrent records on one event loop (and a thread beside it) never see each other's fields."""
    out = capture("json")
    log = logging.getLogger("x")

    async def one(trace: str) -> None:
        with logs.log_context(trace_id=trace):
            await asyncio.sleep(0.01)  # the other task runs meanwhile
            log.info(trace)

    async def both() -> None:
        await asyncio.gather(one("t-a"), one("t-b"))

    with logs.log_context(stage="sign"):
        asyncio.run(both())
        thread = threading.Thread(target=lambda: log.info("thread"))  # a new thread starts with no context
        thread.start()
        thread.join()
    by_message = {d["message"]: d for d in lines(out)}
    assert by_message["t-a"]["trace_id"] == "t-a" and by_message["t-b"]["trace_id"] == "t-b"
    assert by_message["t-a"]["stage"] == "sign"  # tasks inherit the context they were created in
    assert "stage" not in by_message["thread"]


def test_unknown_context_fields_are_refused() -> None:
    """The allow-list keeps config objects and secrets out by construction."""
    with pytest.raises(TypeError, match="unknown field"), logs.log_context(config="x"):
        pass
    with pytest.raises(TypeError, match="password"):
        logs.bind_log_context(stage="sign", password="hunter2")
    assert logs.current_log_context() == {}


def test_non_scalar_context_values_become_strings(root: logging.Logger) -> None:
    out = capture("json")

    class Odd:
        def __str__(self) -> str:
            return "odd"

    with logs.log_context(topic=Odd(), offset=None):
        logging.getLogger("x").info("m")
    (doc,) = lines(out)
    assert doc["topic"] == "odd" and "offset" not in doc


def test_no_environment_or_config_in_a_line(root: logging.Logger, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "s3cr3t-panel-key-value"
    monkeypatch.setenv("PANEL_INGEST_SECRET", secret)
    monkeypatch.setenv("SCRUBBER_API_KEY", secret)
    out = capture("json", verbose=True)
    with logs.log_context(stage="sign", trace_id="t-3"):
        logging.getLogger("pipeline.delivery").info("signed %s", "t-3")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("pipeline.delivery").exception("failed")
    text = out.getvalue()
    assert secret not in text and "PANEL_INGEST_SECRET" not in text and "SCRUBBER_API_KEY" not in text
    assert all(set(d) <= {"time", "level", "logger", "message", "exception", "stack", *logs.CONTEXT_FIELDS}
               for d in lines(out))


def test_text_format_is_todays(root: logging.Logger) -> None:
    out = capture("text")
    with logs.log_context(stage="sign"):
        logging.getLogger("pipeline.cli").warning("careful: %s", "x")
    line = out.getvalue().rstrip("\n")
    assert " WARNING pipeline.cli: careful: x" in line and not line.startswith("{")
    assert logs.TEXT_FORMAT == "%(asctime)s %(levelname)s %(name)s: %(message)s"


def test_configure_replaces_handlers_and_rejects_unknown_formats(root: logging.Logger) -> None:
    logs.configure("text")
    logs.configure("json")
    assert len(logging.getLogger().handlers) == 1  # not one per call
    with pytest.raises(ValueError, match="log format"):
        logs.configure("yaml")  # type: ignore[arg-type]


def test_dict_config_keeps_existing_loggers() -> None:
    """faust's worker takes this dict as logging_config: loggers made before it must keep logging."""
    config = logs.dict_config("json", verbose=False)
    assert config["disable_existing_loggers"] is False
    assert config["root"] == {"level": "INFO", "handlers": ["default"]}
    assert config["handlers"]["default"]["filters"] == ["context"]
