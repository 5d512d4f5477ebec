"""The `pipeline` and `pipeline-dev` command lines without any service: where the common
options go, help text on every option, usage mistakes told apart from configuration errors,
and the pure rules behind the exit codes (lag health, a failed opencode turn)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from agents.registry import STAGE_MODULES
from devkit import cli as dev_cli
from pipeline import config as config_mod
from pipeline import logs
from pipeline.cli import lag as lag_cli
from pipeline.cli import main as cli
from pipeline.cli.errors import UsageError
from pipeline.clients import opencode as opencode_client
from pipeline.clients.opencode import OpencodeClient, turn_errors, turn_messages
from pipeline.errors import ConfigError
from pipeline.kafka.lag import LagReport, PartitionLag, StageLag

REPO = Path(__file__).resolve().parents[3]
FIXTURES = REPO / "tests" / "fixtures" / "opencode"


def run_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.mark.parametrize("argv", [
    ["lag", "--config", "x.toml", "--interval", "0"],
    ["topics", "list", "--config", "x.toml"],
    ["dead", "list", "--config", "x.toml"],
    ["worker", "sign", "--config", "x.toml"],
    ["opencode", "run-task", "--host", "h", "--config", "x.toml", "do it"],
    ["opencode", "--config", "x.toml", "continue", "--host", "h", "ses_1", "go on"],
    ["collect", "--config", "x.toml"],
])
def test_config_verbose_and_log_format_go_after_the_subcommand_too(argv: list[str]) -> None:
    args = cli.parser().parse_args([*argv, "-v", "--log-format", "json"])
    assert (args.config, args.verbose, args.log_format) == ("x.toml", True, "json")
    before = cli.parser().parse_args(["--config", "y.toml", "-v", *[a for a in argv if a not in ("--config",
                                                                                                   "x.toml")]])
    assert (before.config, before.verbose, before.log_format) == ("y.toml", True, "text")
    # after the subcommand wins over before it; absent after, the value before stays
    both = cli.parser().parse_args(["--config", "y.toml", *argv])
    assert both.config == "x.toml"


def test_devkit_takes_the_common_options_after_the_subcommand() -> None:
    args = dev_cli.parser().parse_args(["kafka", "status", "--config", "x.toml", "-v"])
    assert (args.config, args.verbose, args.action) == ("x.toml", True, "status")


def _parsers(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [p]
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in dict.fromkeys(action.choices.values()):
                found += _parsers(sp)
    return found


@pytest.mark.parametrize("top", [cli.parser, dev_cli.parser], ids=["pipeline", "pipeline-dev"])
def test_every_option_and_argument_has_help(top: Any) -> None:
    missing = [f"{p.prog} {'/'.join(a.option_strings) or a.dest}" for p in _parsers(top())
               for a in p._actions
               if not isinstance(a, argparse._SubParsersAction) and a.help in (None, "")]
    assert missing == []


def test_worker_lists_its_stages_without_importing_faust() -> None:
    (stage,) = [a for a in cli.parser()._subparsers._group_actions[0].choices["worker"]._actions  # type: ignore[union-attr]
                if a.dest == "stage"]
    assert list(stage.choices) == list(STAGE_MODULES)
    probe = subprocess.run([sys.executable, "-c", "import sys; from pipeline.cli.main import parser; parser(); "
                            "print(sorted(m for m in ('faust', 'aiokafka', 'httpx') if m in sys.modules))"],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
    assert probe.returncode == 0, probe.stderr
    assert "faust" not in probe.stdout and "aiokafka" not in probe.stdout
    bad = run_cli("worker", "nope")
    assert bad.returncode == 2 and "invalid choice: 'nope'" in bad.stderr and "sign" in bad.stderr
    assert "config error" not in bad.stderr


def test_lag_help_is_for_operators() -> None:
    shown = run_cli("lag", "--help")
    assert shown.returncode == 0
    assert "argparse" not in shown.stdout and "imported" not in shown.stdout
    for code in ("0 ", "1 ", "2 ", "3 ", "4 "):
        assert f"\n  {code}" in shown.stdout, code
    assert "--max-lag" in shown.stdout and "--max-drain-s" in shown.stdout


@pytest.mark.parametrize(("argv", "says"), [
    (["lag", "--config", "x.toml"], None),  # accepted: fails later, on the missing file (a config error)
    (["dead", "redrive"], "dead redrive needs --topic T and one of --id ID or --all"),
    (["dead", "redrive", "--topic", "nope.dead", "--all"], "argument --topic: invalid choice"),
    (["dead", "redrive", "--topic", "traces.dead", "--id", "a", "--all"], "not allowed with argument"),
    (["lag", "--interval", "-1"], "argument --interval"),
    (["lag", "--watch", "--interval", "0"], "--watch needs --interval"),
    (["lag", "--max-drain-s", "5", "--interval", "0"], "--max-drain-s needs rates"),
    (["lag", "--watch", "--max-lag", "5"], "--max-lag and --max-drain-s are for a one-shot check"),
    (["lag", "--stage", "nope"], "argument --stage: invalid choice: 'nope'"),
    (["topics", "drop"], "argument action: invalid choice"),
])
def test_usage_mistakes_exit_2_as_argparse_says_them(argv: list[str], says: str | None) -> None:
    done = run_cli(*argv, env={"PIPELINE_KAFKA__BOOTSTRAP": "127.0.0.1:1"})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    if says is None:
        assert done.stderr.strip() == "pipeline: config error: config file not found: x.toml"
        return
    assert "config error" not in done.stderr
    assert says in done.stderr and done.stderr.startswith("usage: pipeline ")


def test_a_config_error_stays_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[kafka]\npartitions = 0\n")
    for argv in (["--config", str(bad), "lag"], ["lag", "--config", str(bad)]):
        done = run_cli(*argv)
        assert done.returncode == 2
        assert done.stderr.startswith("pipeline: config error: ") and "partitions" in done.stderr
        assert len(done.stderr.splitlines()) == 1


# ---------------------------------------------------------------- lag health: the exit codes' rules


def stage(name: str, lag: int = 0, members: int | None = 1, rate: float | None = 1.0, *,
          topic_exists: bool = True, error: str | None = None) -> StageLag:
    parts = (PartitionLag(0, committed=10, start=0, end=10 + lag),) if topic_exists else ()
    return StageLag(name, f"panel-pipeline-{name}", f"{name}.in", topic_exists, parts, "Stable" if members else "Empty",
                    members, rate=rate, error=error)


def report(*stages: StageLag) -> LagReport:
    return LagReport("b:9092", 0.0, stages, interval_s=1.0)


def test_health_healthy_is_0() -> None:
    verdict = lag_cli.health(report(stage("a"), stage("b", lag=5)), ["a", "b"], max_lag=5, max_drain_s=10)
    assert verdict["exit_code"] == 0 and verdict["problems"] == []


def test_health_no_members_is_3_naming_the_stages() -> None:
    verdict = lag_cli.health(report(stage("a", members=0), stage("b"), stage("c", members=None)), ["a", "b", "c"],
                             None, None)
    assert verdict["exit_code"] == 3 and verdict["no_members"] == ["a", "c"]
    assert verdict["problems"] == ["no running member in stage(s): a, c (nothing consumes their input)"]


def test_health_unchecked_stages_do_not_count() -> None:
    verdict = lag_cli.health(report(stage("passthrough", members=0, lag=100), stage("b")), ["b"], 10, None)
    assert verdict["exit_code"] == 0 and verdict["checked"] == ["b"]


def test_health_over_limits_is_4() -> None:
    over_lag = lag_cli.health(report(stage("a", lag=11), stage("b", lag=10)), ["a", "b"], 10, None)
    assert over_lag["exit_code"] == 4 and over_lag["over_max_lag"] == ["a"]
    assert over_lag["problems"] == ["lag over --max-lag 10: a (11)"]
    slow = lag_cli.health(report(stage("a", lag=100, rate=2.0), stage("b", lag=100, rate=0.0)), ["a", "b"], None, 60)
    assert slow["exit_code"] == 4 and slow["over_max_drain"] == ["b"]  # a drains in 50 s; b is stalled
    assert "time to drain over --max-drain-s 60: b (stalled)" in slow["problems"]


def test_health_order_1_before_3_before_4() -> None:
    unreadable = stage("a", topic_exists=False)
    assert lag_cli.health(report(unreadable, stage("b", members=0)), ["a", "b"], None, None)["exit_code"] == 1
    assert lag_cli.health(report(stage("a", members=0), stage("b", lag=9)), ["a", "b"], 1, None)["exit_code"] == 3
    errored = lag_cli.health(report(stage("a", error="GroupAuthorizationFailedError")), ["a"], None, None)
    assert errored["exit_code"] == 1 and errored["problems"] == ["cannot read stage a: GroupAuthorizationFailedError"]


# ---------------------------------------------------------------- a failed opencode turn


def test_turn_errors_name_the_api_error_of_the_captured_error_session() -> None:
    listing = json.loads((FIXTURES / "opencode-1.18.33-messages-error-session.json").read_text())
    turn = turn_messages(listing, listing[-1])
    assert [m["info"]["role"] for m in turn] == ["user", "assistant"]
    (line,) = turn_errors(turn)
    assert line == "APIError (HTTP 400): bad request: context too long"


def test_turn_errors_name_a_failed_tool_and_nothing_for_a_good_turn() -> None:
    listing = json.loads((FIXTURES / "opencode-1.18.33-messages-tool-session.json").read_text())
    assert turn_errors(turn_messages(listing, listing[-1])) == []
    failed = json.loads(json.dumps(listing))
    tool = next(p for m in failed for p in m["parts"] if p.get("type") == "tool")
    tool["state"] = {"status": "error", "error": "File not found: /x/missing.txt", "input": {}}
    assert turn_errors(turn_messages(failed, failed[-1])) == [f"tool {tool['tool']} failed: File not found: "
                                                              "/x/missing.txt"]


def test_turn_messages_start_at_the_turns_user_message() -> None:
    def msg(i: str, role: str) -> dict[str, Any]:
        return {"info": {"id": i, "role": role}, "parts": []}

    listing = [msg("1", "user"), msg("2", "assistant"), msg("3", "user"), msg("4", "assistant"),
               msg("5", "assistant")]
    assert [m["info"]["id"] for m in turn_messages(listing, listing[-1])] == ["3", "4", "5"]
    assert turn_messages(listing, msg("9", "assistant")) == [msg("9", "assistant")]


# ---------------------------------------------------------------- quiet libraries


def test_libraries_log_warnings_only_unless_verbose() -> None:
    quiet = logs.dict_config("text")
    assert {n: c["level"] for n, c in quiet["loggers"].items()} == {n: "WARNING" for n in logs.LIBRARY_LOGGERS}
    assert quiet["root"]["level"] == "INFO"
    loud = logs.dict_config("text", verbose=True)
    assert all(c["level"] == "DEBUG" for c in loud["loggers"].values())
    worker = logs.dict_config("json", library_level="info")
    assert all(c["level"] == "INFO" for c in worker["loggers"].values())


def test_one_shot_commands_drop_aiokafkas_unreachable_lines_only() -> None:
    assert "reported" in logs.dict_config("text", one_shot=True)["handlers"]["default"]["filters"]
    assert "reported" not in logs.dict_config("text", verbose=True, one_shot=True)["handlers"]["default"]["filters"]
    assert "reported" not in logs.dict_config("text")["handlers"]["default"]["filters"]

    def record(name: str, level: int, msg: str) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, msg, ("127.0.0.1:1", "refused"), None)

    f = logs.ReportedByCommand()
    assert not f.filter(record("aiokafka", logging.ERROR, 'Unable connect to "%s": %s'))
    assert not f.filter(record("aiokafka.client", logging.WARNING, 'Unable to request metadata from "%s": %s'))
    assert f.filter(record("aiokafka", logging.ERROR, "Heartbeat failed: %s %s"))
    assert f.filter(record("pipeline.lag", logging.ERROR, 'Unable connect to "%s": %s'))


# ---------------------------------------------------------------- `pipeline opencode` on several hosts


def test_run_task_takes_several_hosts_or_all_of_them_and_continue_one() -> None:
    one = cli.parser().parse_args(["opencode", "run-task", "--host", "a", "hi"])
    assert (one.hosts, one.all_hosts, one.prompt) == (["a"], False, "hi")
    two = cli.parser().parse_args(["opencode", "run-task", "--host", "a", "--host", "b", "--json", "hi"])
    assert (two.hosts, two.all_hosts, two.json) == (["a", "b"], False, True)
    every = cli.parser().parse_args(["opencode", "run-task", "--all-hosts", "--title", "t", "hi"])
    assert (every.hosts, every.all_hosts, every.title) == (None, True, "t")
    go_on = cli.parser().parse_args(["opencode", "continue", "--host", "a", "ses_1", "more"])
    assert (go_on.hosts, go_on.session_id, go_on.prompt) == (["a"], "ses_1", "more")


@pytest.mark.parametrize(("argv", "says"), [
    (["opencode", "run-task", "hi"], "one of the arguments --host --all-hosts is required"),
    (["opencode", "run-task", "--host", "a", "--all-hosts", "hi"], "not allowed with argument"),
    (["opencode", "continue", "--host", "a", "--all-hosts", "ses_1", "hi"], "unrecognized arguments: --all-hosts"),
    (["opencode", "continue", "ses_1", "hi"], "the following arguments are required: --host"),
])
def test_run_task_host_usage_mistakes(argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.parser().parse_args(argv)
    assert exited.value.code == 2 and says in capsys.readouterr().err


def test_opencode_help_says_how_several_hosts_end() -> None:
    shown = run_cli("opencode", "run-task", "--help")
    assert shown.returncode == 0
    text = " ".join(shown.stdout.split())
    assert "--all-hosts" in text and "repeat it to send the same prompt to several hosts" in text
    assert "the worst of theirs, 1 before 3 before 0" in text


class FakeHosts:
    """opencode daemons behind httpx.MockTransport, one per base URL: what each answers a turn
    (`reply`, or `error` for an assistant message that ended in an API error), and what each
    was sent. `down` hosts refuse the connection. Every prompt waits until all hosts that
    answer have been prompted (at most 10 s): turns run one after the other fail the test."""

    def __init__(self, answers: dict[str, dict[str, Any]], down: tuple[str, ...] = ()) -> None:
        self.answers, self.down = answers, down
        self.sent: dict[str, list[tuple[str, str, Any]]] = {name: [] for name in [*answers, *down]}
        self.prompted: set[str] = set()
        self.all_prompted = asyncio.Event()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{4100 + sorted(self.sent).index(name)}"

    def toml(self) -> str:
        return "".join(f'[[hosts]]\nname = "{n}"\nbase_url = "{self.url(n)}"\n\n' for n in sorted(self.sent))

    def client(self, base_url: str, password: str | None = None, **kwargs: Any) -> OpencodeClient:
        (name,) = [n for n in self.sent if self.url(n) == base_url]
        return OpencodeClient(base_url, password, transport=httpx.MockTransport(self.handler(name)), **kwargs)

    def handler(self, name: str) -> Callable[[httpx.Request], Awaitable[httpx.Response]]:
        async def handle(request: httpx.Request) -> httpx.Response:
            body = json.loads(request.content) if request.content else None
            self.sent[name].append((request.method, request.url.path, body))
            if name in self.down:
                raise httpx.ConnectError("connection refused", request=request)
            sid = f"ses_{name}"
            answer = self.answers[name]
            assistant = {"info": {"id": f"msg_{name}_2", "role": "assistant", "sessionID": sid,
                                  **({"error": answer["error"]} if "error" in answer else {})},
                         "parts": [{"type": "text", "text": answer.get("reply", "")}]}
            if (request.method, request.url.path) == ("POST", "/session"):
                return httpx.Response(200, json={"id": sid})
            if (request.method, request.url.path) == ("POST", f"/session/{sid}/message"):
                self.prompted.add(name)
                if self.prompted == set(self.answers):
                    self.all_prompted.set()
                await asyncio.wait_for(self.all_prompted.wait(), 10)
                return httpx.Response(200, json=assistant)
            if (request.method, request.url.path) == ("GET", f"/session/{sid}/message"):
                user = {"info": {"id": f"msg_{name}_1", "role": "user", "sessionID": sid},
                        "parts": [{"type": "text", "text": "?"}]}
                return httpx.Response(200, json=[user, assistant])
            return httpx.Response(404, json={"name": "NotFoundError"})

        return handle


def run_opencode(fake: FakeHosts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    path = tmp_path / "pipeline.toml"
    path.write_text(fake.toml())
    monkeypatch.setattr(opencode_client, "OpencodeClient", fake.client)
    args = cli.parser().parse_args(["opencode", *argv])
    return cli.cmd_opencode(args, config_mod.load(path, {}))


API_ERROR = {"name": "APIError", "data": {"message": "bad request", "statusCode": 400}}


def test_one_prompt_on_two_hosts_runs_both_at_once_and_prints_a_block_each(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeHosts({"a": {"reply": "from a"}, "b": {"reply": "from b\nsecond line"}})
    assert run_opencode(fake, tmp_path, monkeypatch, "run-task", "--host", "b", "--host", "a", "--title", "T",
                        "same prompt") == 0
    out, err = capsys.readouterr()
    assert err == ""
    # in the order the hosts were named
    assert out == "host b: session ses_b\nfrom b\nsecond line\n\nhost a: session ses_a\nfrom a\n"
    for name in ("a", "b"):  # a new session on each, the same title and prompt
        (create, prompt, listing) = fake.sent[name]
        assert create == ("POST", "/session", {"title": "T"})
        assert prompt[:2] == ("POST", f"/session/ses_{name}/message")
        assert prompt[2]["parts"] == [{"type": "text", "text": "same prompt"}]
        assert listing[:2] == ("GET", f"/session/ses_{name}/message")


def test_several_hosts_as_json_a_list_with_each_host(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeHosts({"a": {"reply": "fine"}, "b": {"error": API_ERROR}})
    assert run_opencode(fake, tmp_path, monkeypatch, "run-task", "--all-hosts", "--json", "hi") == 3
    out, err = capsys.readouterr()
    docs = json.loads(out)
    assert [(d["host"], d["session_id"], d["ok"], d["reply"], d["exit_code"]) for d in docs] == [
        ("a", "ses_a", True, "fine", 0), ("b", "ses_b", False, "", 3)]
    assert docs[1]["errors"] == ["APIError (HTTP 400): bad request"]
    assert [m["info"]["role"] for m in docs[0]["messages"]] == ["user", "assistant"]
    assert set(docs[0]) == {"host", "session_id", "ok", "errors", "reply", "messages", "response", "exit_code"}
    assert err == ("pipeline opencode: the turn ended in an error on host b: APIError (HTTP 400): bad request "
                   "(session ses_b)\n")


def test_all_hosts_with_one_host_still_prints_the_several_hosts_shape(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeHosts({"only": {"reply": "ok"}})
    assert run_opencode(fake, tmp_path, monkeypatch, "run-task", "--all-hosts", "--json", "hi") == 0
    (doc,) = json.loads(capsys.readouterr().out)
    assert doc["host"] == "only"


def test_one_host_keeps_the_single_host_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeHosts({"a": {"reply": "just a"}, "b": {"reply": "never asked"}})
    fake.all_prompted.set()  # only a is prompted
    assert run_opencode(fake, tmp_path, monkeypatch, "run-task", "--host", "a", "hi") == 0
    assert capsys.readouterr().out == "session ses_a\njust a\n"
    assert fake.sent["b"] == []
    assert run_opencode(fake, tmp_path, monkeypatch, "run-task", "--host", "a", "--json", "hi") == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"session_id", "ok", "errors", "reply", "messages", "response"}


def test_an_unreachable_host_does_not_stop_the_others_and_1_is_worse_than_3(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeHosts({"a": {"reply": "fine"}, "b": {"error": API_ERROR}}, down=("gone",))
    code = run_opencode(fake, tmp_path, monkeypatch, "run-task", "--host", "a", "--host", "gone", "--host", "b",
                        "hi")
    assert code == 1
    out, err = capsys.readouterr()
    assert out.split("\n\n") == ["host a: session ses_a\nfine", "host gone: no turn (the host could not run it)",
                                 "host b: session ses_b\n"]
    lines = err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"pipeline: opencode host gone at {fake.url('gone')}: POST /session: ConnectError")
    assert lines[0].endswith("check that `opencode serve` runs there and that [[hosts]] base_url names it")
    assert lines[1].startswith("pipeline opencode: the turn ended in an error on host b: APIError")


def test_an_unknown_or_repeated_host_sends_nothing_anywhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeHosts({"a": {"reply": "x"}, "b": {"reply": "y"}})
    with pytest.raises(ConfigError, match="unknown host 'nope'"):
        run_opencode(fake, tmp_path, monkeypatch, "run-task", "--host", "a", "--host", "nope", "hi")
    with pytest.raises(UsageError, match="--host a given more than once"):
        run_opencode(fake, tmp_path, monkeypatch, "run-task", "--host", "a", "--host", "b", "--host", "a", "hi")
    with pytest.raises(UsageError, match="continue takes one --host"):
        run_opencode(fake, tmp_path, monkeypatch, "continue", "--host", "a", "--host", "b", "ses_a", "hi")
    assert fake.sent == {"a": [], "b": []}


def test_all_hosts_without_hosts_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="no \\[\\[hosts\\]\\] entry is configured"):
        run_opencode(FakeHosts({}), tmp_path, monkeypatch, "run-task", "--all-hosts", "hi")
