"""`pipeline opencode run-task|continue` against real opencode daemons and the scripted model,
as an operator runs it: a turn that ends in an error says so (name and message) and exits 3;
`--json` carries the turn's messages; no httpx line per request unless -v; one prompt on
several hosts (`--host` repeated, `--all-hosts`) prints each host's turn and exits with the
worst of their codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from devkit.kafka_local import free_port
from devkit.opencode_daemon import OpencodeDaemon

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def config(opencode_daemon: OpencodeDaemon, secured_daemon: OpencodeDaemon,
           tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli-opencode") / "pipeline.toml"
    path.write_text(f'[[hosts]]\nname = "h"\nbase_url = "{opencode_daemon.url}"\n\n'
                    f'[[hosts]]\nname = "gone"\nbase_url = "http://127.0.0.1:{free_port()}"\n\n'
                    f'[[hosts]]\nname = "s"\nbase_url = "{secured_daemon.url}"\n'
                    f'password = "{secured_daemon.password}"\n')
    return path


def pipeline(config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_") and k not in ("FORCE_COLOR",
                                                                                            "TTY_COMPATIBLE")}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *argv, "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=240, cwd=REPO)


def word() -> str:
    return f"w{uuid.uuid4().hex[:10]}"


def test_a_turn_that_ends_well_prints_the_reply_and_nothing_else(config: Path) -> None:
    marker = word()
    done = pipeline(config, "opencode", "run-task", "--host", "h", f"[[say:fine {marker}]]")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no httpx INFO line per request
    session, reply = done.stdout.splitlines()
    assert session.startswith("session ses_") and reply == f"fine {marker}"

    verbose = pipeline(config, "opencode", "continue", "--host", "h", "-v", session.split()[1], "[[say:again]]")
    assert verbose.returncode == 0, verbose.stderr
    assert "HTTP Request: POST" in verbose.stderr  # -v lets the libraries' lines through
    assert verbose.stdout.splitlines()[-1] == "again"


def test_an_api_error_turn_says_so_and_exits_3(config: Path) -> None:
    done = pipeline(config, "opencode", "run-task", "--host", "h", f"please fail {word()} [[error:400]]")
    assert done.returncode == 3, done.stdout + done.stderr
    (session_line,) = done.stdout.splitlines()  # no empty "answer" line
    session_id = session_line.split()[1]
    (line,) = done.stderr.splitlines()
    assert line.startswith("pipeline opencode: the turn ended in an error: APIError (HTTP 400): ")
    assert "stub error 400" in line and line.endswith(f"(session {session_id})")

    # continue on that session: the same again, and --json gives a script the turn's messages
    again = pipeline(config, "opencode", "continue", "--host", "h", "--json", session_id, "once more [[error:400]]")
    assert again.returncode == 3, again.stderr
    doc = json.loads(again.stdout)
    assert doc["session_id"] == session_id and doc["ok"] is False and doc["reply"] == ""
    assert [m["info"]["role"] for m in doc["messages"]] == ["user", "assistant"]
    assert doc["messages"][0]["parts"][0]["text"] == "once more [[error:400]]"
    assert doc["messages"][-1]["info"]["error"]["name"] == "APIError"
    assert len(doc["errors"]) == 1 and doc["errors"][0].startswith("APIError (HTTP 400): ")
    assert "APIError" in again.stderr and len(again.stderr.splitlines()) == 1


def test_a_failed_tool_says_so_and_exits_3(config: Path) -> None:
    done = pipeline(config, "opencode", "run-task", "--host", "h", "--json", "look [[tool:read:missing.txt]]")
    assert done.returncode == 3, done.stderr
    doc = json.loads(done.stdout)
    assert [m["info"]["role"] for m in doc["messages"]] == ["user", "assistant", "assistant"]
    (error,) = doc["errors"]
    assert error.startswith("tool read failed: ") and "File not found" in error
    assert "Last tool said: File not found" in doc["reply"]
    assert done.stderr.startswith("pipeline opencode: the turn ended in an error: tool read failed: ")


def test_an_unreachable_host_is_one_line_and_exit_1(config: Path) -> None:
    done = pipeline(config, "opencode", "run-task", "--host", "gone", "hello")
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith("pipeline: opencode host gone at http://127.0.0.1:") and "opencode serve" in line
    assert "Traceback" not in done.stderr
    unknown = pipeline(config, "opencode", "run-task", "--host", "nope", "hello")
    assert unknown.returncode == 2 and unknown.stderr.startswith("pipeline: config error: unknown host 'nope'")


def test_one_prompt_on_several_hosts_prints_each_and_exits_with_the_worst(config: Path) -> None:
    marker = word()
    both = pipeline(config, "opencode", "run-task", "--host", "h", "--host", "s", f"[[say:both {marker}]]")
    assert both.returncode == 0, both.stderr
    assert both.stderr == ""
    blocks = [block.splitlines() for block in both.stdout.rstrip("\n").split("\n\n")]
    assert [(head.split(": ")[0], reply) for head, reply in blocks] == [("host h", f"both {marker}"),
                                                                        ("host s", f"both {marker}")]
    sessions = [head.split("session ")[1] for head, _ in blocks]
    assert all(sid.startswith("ses_") for sid in sessions) and sessions[0] != sessions[1]  # one new session each

    failed = pipeline(config, "opencode", "run-task", "--host", "s", "--host", "h", f"no {marker} [[error:400]]")
    assert failed.returncode == 3, failed.stdout + failed.stderr
    lines = failed.stderr.splitlines()
    assert [line.split(": APIError")[0] for line in lines] == [
        "pipeline opencode: the turn ended in an error on host s",
        "pipeline opencode: the turn ended in an error on host h"]

    # every configured host, one of them unreachable: the others still run, and 1 is the exit code
    every = pipeline(config, "opencode", "run-task", "--all-hosts", "--json", f"[[say:all {marker}]]")
    assert every.returncode == 1, every.stderr
    docs = json.loads(every.stdout)
    assert [(d["host"], d["ok"], d["exit_code"], d["reply"]) for d in docs] == [
        ("h", True, 0, f"all {marker}"), ("gone", False, 1, ""), ("s", True, 0, f"all {marker}")]
    assert docs[1]["session_id"] is None and "opencode serve" in docs[1]["errors"][0]
    (line,) = every.stderr.splitlines()
    assert line.startswith("pipeline: opencode host gone at http://127.0.0.1:") and "Traceback" not in every.stderr

    unknown = pipeline(config, "opencode", "run-task", "--host", "h", "--host", "nope", "hello")
    assert unknown.returncode == 2 and unknown.stderr.startswith("pipeline: config error: unknown host 'nope'")
    assert unknown.stdout == ""
