"""OpencodeClient against real opencode 1.18.33 daemons and the scripted model stub.

The stub plans each turn from directives in the prompt (see model_stub), so
each test makes the session it needs by what it says: plain answers, a real
bash tool run, a failing read, an API error.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.model_stub import ModelStub
from devkit.opencode_daemon import REPO_ROOT, OpencodeBinaryNotFound, OpencodeDaemon, opencode_config
from pipeline.clients.opencode import (
    OpencodeAuthError,
    OpencodeClient,
    OpencodeNotFound,
    unwrap_event,
)
from pipeline.clients.sse import SSEParser

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def word() -> str:
    return f"w{uuid.uuid4().hex[:10]}"


def event_type(frame: dict[str, Any]) -> str | None:
    return unwrap_event(frame).get("type")


def event_properties(frame: dict[str, Any]) -> dict[str, Any]:
    props = unwrap_event(frame).get("properties")
    return props if isinstance(props, dict) else {}


def tool_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for m in messages for p in m["parts"] if p.get("type") == "tool"]


@pytest.mark.asyncio
async def test_run_task_returns_the_model_reply(open_client: OpencodeClient, model_stub: ModelStub) -> None:
    marker = word()
    before = model_stub.count("agent")
    result = await open_client.run_task(f"say something about {marker}", title=f"plain {marker}")

    assert result["reply"] == f"Stub reply to: say something about {marker}"
    assert result["session_id"].startswith("ses_")
    info = result["response"]["info"]
    assert info["role"] == "assistant" and info["finish"] == "stop"
    assert info["providerID"] == "stub" and info["modelID"] == "stub-model"
    assert model_stub.count("agent") == before + 1

    session = await open_client.get_session(result["session_id"])
    assert session["title"] == f"plain {marker}"
    assert result["session_id"] in {s["id"] for s in await open_client.list_sessions()}
    # The turn is over, so the session is idle: absent from the status map.
    assert result["session_id"] not in await open_client.session_status()


@pytest.mark.asyncio
async def test_messages_return_real_roles_and_continue_session_appends(
    open_client: OpencodeClient,
) -> None:
    first = await open_client.run_task(f"first {word()}")
    second = await open_client.continue_session(first["session_id"], "[[say:second answer]]")
    assert second["reply"] == "second answer"

    messages = await open_client.messages(first["session_id"])
    assert [m["info"]["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["parts"][0]["text"].startswith("first ")
    assert messages[-1]["info"]["id"] == second["response"]["info"]["id"]
    assert messages[-1]["info"]["parentID"] == messages[-2]["info"]["id"]

    last = await open_client.messages(first["session_id"], limit=1)
    assert [m["info"]["id"] for m in last] == [messages[-1]["info"]["id"]]


@pytest.mark.asyncio
async def test_tool_session_runs_bash_for_real(open_client: OpencodeClient) -> None:
    marker = word()
    result = await open_client.run_task(f"check [[tool:bash:echo out-{marker}; exit 3]]")

    # The follow-up model call saw the real tool output.
    assert f"Last tool said: out-{marker}" in result["reply"]
    messages = await open_client.messages(result["session_id"])
    assert [m["info"]["role"] for m in messages] == ["user", "assistant", "assistant"]
    assert messages[1]["info"]["finish"] == "tool-calls"
    (tool,) = tool_parts(messages)
    assert tool["tool"] == "bash"
    state = tool["state"]
    # A non-zero exit is still a completed tool part; the code is in metadata.
    assert state["status"] == "completed"
    assert state["input"]["command"] == f"echo out-{marker}; exit 3"
    assert f"out-{marker}" in state["output"]
    assert state["metadata"]["exit"] == 3


@pytest.mark.asyncio
async def test_failing_read_tool_ends_in_error_state(open_client: OpencodeClient) -> None:
    result = await open_client.run_task("look [[tool:read:missing.txt]]")

    messages = await open_client.messages(result["session_id"])
    (tool,) = tool_parts(messages)
    assert tool["tool"] == "read"
    assert tool["state"]["status"] == "error"
    assert "File not found" in tool["state"]["error"]
    # The turn itself still finishes normally after the failed tool.
    assert "Last tool said: File not found" in result["reply"]
    assert messages[-1]["info"]["finish"] == "stop"


@pytest.mark.asyncio
async def test_api_error_session(open_client: OpencodeClient) -> None:
    result = await open_client.run_task("please fail [[error:400]]")

    assert result["reply"] == ""
    error = result["response"]["info"]["error"]
    assert error["name"] == "APIError"
    assert error["data"]["statusCode"] == 400
    assert error["data"]["isRetryable"] is False
    assert "stub error 400" in error["data"]["message"]
    messages = await open_client.messages(result["session_id"])
    assert [m["info"]["role"] for m in messages] == ["user", "assistant"]
    assert messages[-1]["info"]["error"]["name"] == "APIError"


@pytest.mark.asyncio
async def test_secured_daemon_needs_its_password(secured_daemon: OpencodeDaemon, daemon_password: str) -> None:
    async with OpencodeClient(secured_daemon.url) as anonymous:
        with pytest.raises(OpencodeAuthError) as no_auth:
            await anonymous.list_sessions()
    async with OpencodeClient(secured_daemon.url, "wrong-password") as wrong:
        with pytest.raises(OpencodeAuthError):
            await wrong.health()
    assert no_auth.value.status_code == 401

    async with secured_daemon.client() as client:
        assert daemon_password not in repr(client)
        assert (await client.health())["version"] == "1.18.33"
        marker = word()
        result = await client.run_task(f"secured {marker}")
        assert result["reply"] == f"Stub reply to: secured {marker}"
        with pytest.raises(OpencodeNotFound) as missing:
            await client.get_session("ses_doesnotexist")
        assert daemon_password not in str(missing.value)


@pytest.mark.asyncio
async def test_two_daemons_keep_separate_sessions(
    opencode_daemon: OpencodeDaemon, secured_daemon: OpencodeDaemon
) -> None:
    assert opencode_daemon.url != secured_daemon.url
    async with opencode_daemon.client() as a, secured_daemon.client() as b:
        created = await a.create_session(title=f"only on a {word()}")
        assert created["id"] not in {s["id"] for s in await b.list_sessions()}
        with pytest.raises(OpencodeNotFound):
            await b.get_session(created["id"])


def turn_ended(session_id: str) -> Callable[[list[dict[str, Any]]], bool]:
    def check(frames: list[dict[str, Any]]) -> bool:
        ours = [f for f in frames if event_properties(f).get("sessionID") == session_id]
        idle_status = any(
            event_type(f) == "session.status" and event_properties(f).get("status", {}).get("type") == "idle"
            for f in ours
        )
        return idle_status and any(event_type(f) == "session.idle" for f in ours)

    return check


@pytest.mark.asyncio
async def test_global_events_report_the_turn_and_its_end(
    secured_daemon: OpencodeDaemon,
    record_events: Callable[..., Any],
) -> None:
    async with (
        secured_daemon.client() as client,
        record_events(client, global_=True) as recorder,
    ):
        result = await client.run_task(f"events {word()} [[tool:bash:echo evt]]")
        sid = result["session_id"]
        await recorder.wait_for(turn_ended(sid))

    assert recorder.malformed == []
    ours = [f for f in recorder.frames if event_properties(f).get("sessionID") == sid]
    types = [event_type(f) for f in ours]
    for expected in (
        "session.created",
        "message.updated",
        "message.part.updated",
        "message.part.delta",
        "session.status",
        "session.idle",
    ):
        assert expected in types, (expected, types)
    # Global frames wrap the event with the instance it came from.
    assert all(f["directory"] == str(secured_daemon.workdir) for f in ours)
    assert types.index("session.created") < types.index("session.idle")
    statuses = [event_properties(f)["status"]["type"] for f in ours if event_type(f) == "session.status"]
    assert statuses[0] == "busy" and statuses[-1] == "idle"
    tool_states = {
        event_properties(f)["part"]["state"]["status"]
        for f in ours
        if event_type(f) == "message.part.updated" and event_properties(f)["part"].get("type") == "tool"
    }
    assert "completed" in tool_states


@pytest.mark.asyncio
async def test_instance_events_report_an_api_error_turn(
    open_client: OpencodeClient, record_events: Callable[..., Any]
) -> None:
    async with record_events(open_client) as recorder:
        session = await open_client.create_session(title="events api error")
        await open_client.prompt(session["id"], "[[error:400]]")
        await recorder.wait_for(turn_ended(session["id"]))

    ours = [f for f in recorder.frames if event_properties(f).get("sessionID") == session["id"]]
    errors = [event_properties(f)["error"] for f in ours if event_type(f) == "session.error"]
    assert errors and errors[0]["name"] == "APIError"
    assert all("payload" not in f for f in recorder.frames)


@pytest.mark.asyncio
async def test_restart_keeps_sessions_and_stop_leaves_no_process(
    tmp_path_factory: pytest.TempPathFactory, model_stub: ModelStub, opencode_binary: Path
) -> None:
    workdir = tmp_path_factory.mktemp("opencode-restart")
    with OpencodeDaemon(workdir, model_stub.base_url, binary=opencode_binary) as daemon:
        async with daemon.client() as client:
            first = await client.run_task(f"before restart {word()}")
        url = daemon.url
        daemon.restart()
        assert daemon.url == url  # same port, so clients' URLs stay valid
        async with daemon.client() as client:
            assert first["session_id"] in {s["id"] for s in await client.list_sessions()}
            again = await client.continue_session(first["session_id"], "[[say:still here]]")
            assert again["reply"] == "still here"
            assert len(await client.messages(first["session_id"])) == 4

            # A tool still running at stop time: opencode starts it in a process
            # group of its own, which stop() must find and end too.
            session = await client.create_session(title="long tool")
            turn = asyncio.create_task(client.prompt(session["id"], "[[tool:bash:sleep 300]]"))
            try:
                await _wait_until(lambda: len(daemon.processes()) > 1)
                daemon.stop()
                assert daemon.processes() == set()
            finally:
                turn.cancel()
                await asyncio.gather(turn, return_exceptions=True)
    assert daemon.state_dir is None


async def _wait_until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)  # poll interval for a condition outside this loop


def test_missing_binary_names_the_install_command(tmp_path: Path, model_stub: ModelStub) -> None:
    daemon = OpencodeDaemon(tmp_path, model_stub.base_url, binary=tmp_path / "no-opencode")
    with pytest.raises(OpencodeBinaryNotFound, match="npm ci") as info:
        daemon.start()
    assert str(tmp_path / "no-opencode") in str(info.value)
    assert daemon.processes() == set()


@pytest.mark.asyncio
async def test_model_stub_runs_as_its_own_process(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"rules": [{"match": "fix it", "directives": "[[tool:bash:ls -la]]"}]}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devkit.model_stub",
        "--port",
        "0",
        "--script",
        str(script),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        base_url = line.rsplit(" ", 1)[-1].strip()
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        async with httpx.AsyncClient(base_url=base_url) as http:
            models = (await http.get("/models")).json()
            assert models["data"][0]["id"] == "stub-model"
            response = await http.post(
                "/chat/completions",
                json={
                    "model": "stub-model",
                    "stream": True,
                    "tools": [{"type": "function", "function": {"name": "bash"}}],
                    "messages": [{"role": "user", "content": "please fix it"}],
                },
            )
            frames = SSEParser().feed(response.content)
            assert frames[-1].data == "[DONE]"
            chunks = [json.loads(f.data) for f in frames[:-1]]
            assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
            assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
            (call,) = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
            assert json.loads(call["function"]["arguments"])["command"] == "ls -la"
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
    assert b"answered 2 request(s)" in await proc.stdout.read()


@pytest.mark.asyncio
async def test_model_stub_in_process_plans_turns_and_counts() -> None:
    async with ModelStub() as stub, httpx.AsyncClient(base_url=stub.base_url) as http:

        async def ask(messages: list[dict[str, Any]], tools: bool = True) -> httpx.Response:
            body: dict[str, Any] = {"model": "stub-model", "messages": messages}
            if tools:
                body["tools"] = [{"type": "function", "function": {"name": "bash"}}]
            return await http.post("/chat/completions", json=body)

        prompt = {"role": "user", "content": "go [[tool:bash:echo a]][[error:503:1]]"}
        first = (await ask([prompt])).json()["choices"][0]
        assert first["finish_reason"] == "tool_calls"
        after_tool = [prompt, {"role": "assistant"}, {"role": "tool", "content": "a\n"}]
        assert (await ask(after_tool)).status_code == 503  # error once...
        final = (await ask(after_tool)).json()["choices"][0]  # ...then the reply
        assert final["message"]["content"] == "Stub reply to: go\nLast tool said: a"
        title = (await ask([{"role": "user", "content": "[[error:400]] x"}], tools=False)).json()
        assert title["choices"][0]["message"]["content"].startswith("Stub title")
        assert (stub.count("agent"), stub.count("auxiliary")) == (3, 1)


@pytest.mark.asyncio
async def test_model_stub_answers_any_model_and_lists_the_configured_ones() -> None:
    assert opencode_config("http://127.0.0.1:1/v1")["model"] == "stub/stub-model"  # the default stays
    config = opencode_config("http://127.0.0.1:1/v1", model_id="stub-model-b")
    assert config["model"] == config["small_model"] == "stub/stub-model-b"
    assert list(config["provider"]["stub"]["models"]) == ["stub-model-b"]
    with pytest.raises(ValueError, match="model_id"):
        opencode_config("http://127.0.0.1:1/v1", model_id=" ")

    async with ModelStub(model_id="stub-model-a", model_ids=["stub-model-b", "stub-model-a"]) as stub, \
            httpx.AsyncClient(base_url=stub.base_url) as http:
        assert [m["id"] for m in (await http.get("/models")).json()["data"]] == ["stub-model-a", "stub-model-b"]
        for name in ("stub-model-b", "anything-else"):
            answer = (await http.post("/chat/completions", json={
                "model": name, "tools": [{"type": "function", "function": {"name": "bash"}}],
                "messages": [{"role": "user", "content": "[[say:hello]]"}]})).json()
            assert answer["model"] == name and answer["choices"][0]["message"]["content"] == "hello"
        assert [(r.kind, r.model) for r in stub.requests] == [
            ("models", ""), ("agent", "stub-model-b"), ("agent", "anything-else")]
        assert stub.count("agent", model="stub-model-b") == 1 and stub.count(model="stub-model-a") == 0


@pytest.mark.asyncio
async def test_two_daemons_with_different_models_share_one_stub(tmp_path: Path, opencode_binary: Path) -> None:
    prompt = f"the same question {word()} [[say:the same answer]]"
    with ModelStub(model_id="stub-model-a", model_ids=["stub-model-b"]) as stub:
        a = OpencodeDaemon(tmp_path / "a", stub.base_url, binary=opencode_binary, model_id="stub-model-a")
        b = OpencodeDaemon(tmp_path / "b", stub.base_url, binary=opencode_binary, model_id="stub-model-b")
        with a, b:
            assert (a.model, b.model) == ("stub/stub-model-a", "stub/stub-model-b")
            async with a.client() as on_a, b.client() as on_b:
                done = await asyncio.gather(on_a.run_task(prompt), on_b.run_task(prompt))
            for result, model_id in zip(done, ("stub-model-a", "stub-model-b"), strict=True):
                info = result["response"]["info"]
                assert (info["providerID"], info["modelID"], result["reply"]) == ("stub", model_id, "the same answer")
                assert stub.count("agent", model=model_id) == 1
