"""Every broker command against no broker, and against a listener that accepts connections and
never answers: one line on stderr naming the bootstrap and what to check, exit 1, within a
bounded wait; no traceback, no "Unclosed AIOKafka..." warning, no aiokafka line before it.
And on a terminal, the wait shows what it waits for."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.kafka_local import free_port

REPO = Path(__file__).resolve().parents[3]

BROKER_COMMANDS = [
    ["topics", "list"],
    ["topics", "create"],
    ["topics", "list", "--json"],
    ["dead", "list"],
    ["dead", "list", "--json", "--topic", "traces.dead"],
    ["dead", "redrive", "--topic", "traces.dead", "--all"],
    ["dead", "redrive", "--topic", "traces.dead", "--id", "x"],
    ["lag"],
    ["lag", "--json"],
    ["lag", "--interval", "0", "--max-lag", "5"],
    ["lag", "--watch", "--interval", "1"],
]


def run_cli(argv: list[str], bootstrap: str, *, terminal: bool = False,
            timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_") and k not in ("FORCE_COLOR",
                                                                                            "TTY_COMPATIBLE")}
    env["PIPELINE_KAFKA__BOOTSTRAP"] = bootstrap
    if terminal:
        env.update(TTY_COMPATIBLE="1", COLUMNS="200")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    return done, time.monotonic() - started


def assert_one_line_failure(done: subprocess.CompletedProcess[str], bootstrap: str, what: str) -> None:
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    (line,) = lines
    assert line.startswith("pipeline: broker: ") and bootstrap in line and what in line, line
    assert "[kafka] bootstrap" in line and "PIPELINE_KAFKA__BOOTSTRAP" in line
    assert "Traceback" not in done.stderr and "Unclosed" not in done.stderr and "aiokafka" not in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("argv", BROKER_COMMANDS, ids=" ".join)
def test_no_broker_is_one_line_and_exit_1(argv: list[str]) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    done, _ = run_cli(argv, bootstrap)
    assert_one_line_failure(done, bootstrap, "cannot reach Kafka at")


@pytest.fixture(scope="module")
def hung_listener() -> Iterator[str]:
    """A plain TCP server that accepts every connection and never answers (a wrong port, a
    stuck broker): the bootstrap a client would wait on until its request timeout."""
    server = socket.create_server(("127.0.0.1", 0), backlog=128)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


@pytest.mark.parametrize("argv", BROKER_COMMANDS, ids=" ".join)
def test_a_hung_listener_is_a_bounded_wait_and_one_line(argv: list[str], hung_listener: str) -> None:
    done, took = run_cli([*argv, "--timeout", "1.5"], hung_listener)
    assert_one_line_failure(done, hung_listener, "did not answer within 1.5s")
    # bounded: the message names the 1.5 s given (the default is 10 s); the margin is for a
    # busy machine, where starting the interpreter alone has taken seconds
    assert took < 30, took


def test_lag_on_a_hung_listener_gives_up_after_the_default_timeout(hung_listener: str) -> None:
    done, took = run_cli(["lag"], hung_listener)
    assert_one_line_failure(done, hung_listener, "did not answer within 10s")
    assert 9 < took < 20, took


def test_the_wait_shows_on_a_terminal_and_not_on_a_pipe(hung_listener: str) -> None:
    """TTY_COMPATIBLE=1 makes rich treat the captured stderr as a terminal."""
    shown, _ = run_cli(["lag", "--timeout", "1.5"], hung_listener, terminal=True)
    assert shown.returncode == 1
    assert f"connecting to Kafka at {hung_listener}" in shown.stderr
    assert shown.stderr.rstrip().splitlines()[-1].endswith("names it")  # the error still ends it, on its own
    quiet, _ = run_cli(["lag", "--timeout", "1.5"], hung_listener)
    assert "connecting to Kafka" not in quiet.stderr and len(quiet.stderr.splitlines()) == 1
