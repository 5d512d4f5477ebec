"""A scripted, loopback OpenAI-compatible model server for driving real opencode.

A test steers a session through what it prompts: the reply is planned from
directives found in the LAST user message of each chat request.

``[[tool:bash:CMD]]``     call ``bash`` with ``{"command": CMD, "description": ...}``
``[[tool:read:PATH]]``    call ``read`` with ``{"filePath": PATH}``
``[[tool:NAME:{json}]]``  call any tool with the given JSON arguments
``[[error:CODE]]``        answer HTTP CODE with an OpenAI-style error body
``[[error:CODE:N]]``      ... for the first N such calls of this prompt only, then
                          go on as if absent (opencode retries 429/5xx itself,
                          so this drives ``session.status`` ``retry``)
``[[slow:SECONDS]]``      wait before answering each call of the turn
``[[say:TEXT]]``          make the final text reply exactly TEXT

Tool directives run in order, one per model call: the plan step is the number
of tool results after the last user message, so the stub keeps no per-session
state and gives the same answer to the same conversation, even across an
opencode restart. After the tools, the turn ends with the error (if any) or a
text reply. Without ``[[say:]]`` the reply echoes words of the prompt (so
sessions differ) and the first line of the last tool result.

Requests that offer no tools (opencode's title and summary calls to its
``small_model``) always get a short plain text answer: directives there would
only break title generation.

Any model name is answered (the reply carries the name the request gave), so
daemons configured with different models (``OpencodeDaemon(...,
model_id="stub-model-b")``) can share one stub; ``/v1/models`` lists
``model_id`` and ``model_ids``, and each recorded request its ``model``.

A ``--script FILE`` (JSON) adds rules that rewrite prompts into directives
before the built-in ones are read, for demos driven from outside::

    {"rules": [{"match": "fix the bug", "directives": "[[tool:bash:ls]]"}],
     "default": "[[say:ok]]"}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

__all__ = [
    "ModelStub",
    "Plan",
    "ScriptRule",
    "StubRequest",
    "load_script",
    "main",
    "plan_reply",
]

MODEL_ID = "stub-model"
_DIRECTIVE = re.compile(r"\[\[(\w+):(.*?)\]\]", re.DOTALL)
_REQUEST_BODY_LIMIT = 64 * 1024 * 1024  # opencode resends the whole history each call


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Plan:
    """What one turn should do, parsed from the prompt's directives."""

    tools: tuple[ToolCall, ...] = ()
    error: int | None = None
    error_times: int | None = None  # None: every time
    delay: float = 0.0
    say: str | None = None


@dataclass(frozen=True, slots=True)
class ScriptRule:
    match: str
    directives: str


@dataclass(frozen=True, slots=True)
class StubRequest:
    """One request the stub answered, kept so tests can count and inspect."""

    path: str
    kind: str  # "agent" | "auxiliary" | "models" | "other"
    stream: bool
    status: int
    prompt: str = ""
    step: int = 0
    model: str = ""  # the chat request's `model` (the daemon's modelID); "" when it named none


def _tool_call(name: str, arg: str) -> ToolCall:
    arg = arg.strip()
    if arg.startswith("{"):
        return ToolCall(name, json.loads(arg))
    if name == "bash":
        return ToolCall(name, {"command": arg, "description": f"Run {arg[:40]}"})
    if name in ("read", "write", "edit"):
        return ToolCall(name, {"filePath": arg})
    if name in ("glob", "grep"):
        return ToolCall(name, {"pattern": arg})
    return ToolCall(name, {"input": arg})


def parse_plan(text: str) -> Plan:
    tools: list[ToolCall] = []
    error: int | None = None
    error_times: int | None = None
    delay = 0.0
    say: str | None = None
    for name, arg in _DIRECTIVE.findall(text):
        if name == "tool":
            tool, _, rest = arg.partition(":")
            tools.append(_tool_call(tool.strip(), rest))
        elif name == "error":
            code, _, times = arg.partition(":")
            error = int(code.strip())
            error_times = int(times) if times.strip() else None
        elif name == "slow":
            delay = float(arg.strip())
        elif name == "say":
            say = arg
    return Plan(tuple(tools), error, error_times, delay, say)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _last_user_turn(messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[str]]:
    """The last user message's text, and the tool results that followed it."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "user":
            results = [_content_text(m.get("content")) for m in messages[index + 1 :] if m.get("role") == "tool"]
            return _content_text(messages[index].get("content")), results
    return "", []


def _echo_words(text: str, limit: int = 12) -> str:
    words = _DIRECTIVE.sub(" ", text).split()
    return " ".join(words[:limit]) or "(empty prompt)"


def plan_reply(text: str, rules: Sequence[ScriptRule] = (), default: str | None = None) -> Plan:
    """The plan for a prompt: script rules rewrite it into directives first."""
    for rule in rules:
        if rule.match in text:
            return parse_plan(rule.directives + "\n" + text)
    if default is not None and not _DIRECTIVE.search(text):
        return parse_plan(default + "\n" + text)
    return parse_plan(text)


def load_script(path: str | Path) -> tuple[list[ScriptRule], str | None]:
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    rules = [ScriptRule(str(r["match"]), str(r["directives"])) for r in raw.get("rules", [])]
    default = raw.get("default")
    return rules, None if default is None else str(default)


def _chunks(text: str, size: int = 24) -> Iterator[str]:
    # Several deltas per reply, so consumers see message.part.delta streaming.
    for start in range(0, len(text), size):
        yield text[start : start + size]


class ModelStub:
    """The stub server. ``async with`` runs it on the current loop; ``with``
    (or ``start()``/``stop()``) runs it on its own loop in a daemon thread."""

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        *,
        rules: Sequence[ScriptRule] = (),
        default: str | None = None,
        model_id: str = MODEL_ID,
        model_ids: Sequence[str] = (),
    ) -> None:
        self._host = host
        self._want_port = port
        self._rules = list(rules)
        self._default = default
        self.model_id = model_id
        # every name /v1/models lists: model_id first, then the others (daemons configured with
        # different models share one stub); a chat request is answered whatever model it names
        self.model_ids: tuple[str, ...] = tuple(dict.fromkeys([model_id, *model_ids]))
        self._port: int | None = None
        self._runner: web.AppRunner | None = None
        self._lock = threading.Lock()
        self._requests: list[StubRequest] = []
        self._errors_served: dict[str, int] = {}
        self._call_ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- addresses and bookkeeping ----------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("model stub is not running")
        return self._port

    @property
    def base_url(self) -> str:
        """The OpenAI base URL to configure (ends in ``/v1``)."""
        return f"http://{self._host}:{self.port}/v1"

    @property
    def requests(self) -> list[StubRequest]:
        with self._lock:
            return list(self._requests)

    def count(self, kind: str | None = None, model: str | None = None) -> int:
        """Requests answered, of one `kind` and for one `model` when given."""
        with self._lock:
            return sum(1 for r in self._requests
                       if (kind is None or r.kind == kind) and (model is None or r.model == model))

    def _take_error(self, prompt: str, times: int | None) -> bool:
        if times is None:
            return True
        with self._lock:
            used = self._errors_served.get(prompt, 0)
            if used >= times:
                return False
            self._errors_served[prompt] = used + 1
            return True

    def _record(self, request: StubRequest) -> None:
        with self._lock:
            self._requests.append(request)

    # -- async lifecycle ---------------------------------------------------

    async def start_async(self) -> ModelStub:
        app = web.Application(client_max_size=_REQUEST_BODY_LIMIT)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_route("*", "/{tail:.*}", self._other)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        # Binding the socket ourselves tells us the port port=0 picked.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._want_port))
        try:
            await web.SockSite(runner, sock).start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._port = sock.getsockname()[1]
        self._runner = runner
        return self

    async def stop_async(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ModelStub:
        return await self.start_async()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop_async()

    # -- threaded lifecycle (for sync code) --------------------------------

    def start(self, timeout: float = 10.0) -> ModelStub:
        if self._thread is not None:
            raise RuntimeError("model stub already started")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        async def boot() -> None:
            try:
                await self.start_async()
            except BaseException as exc:  # surfaced to the starting thread below
                failure.append(exc)
            finally:
                ready.set()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(boot())
            if not failure:
                loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="model-stub", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("model stub did not start in time")
        if failure:
            self._thread.join()
            self._thread = self._loop = None
            raise failure[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop_async(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._loop = self._thread = None

    def __enter__(self) -> ModelStub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- handlers ----------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        self._record(StubRequest(request.path, "models", False, 200))
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": name, "object": "model", "created": 0, "owned_by": "stub"} for name in self.model_ids],
            }
        )

    async def _other(self, request: web.Request) -> web.Response:
        self._record(StubRequest(request.path, "other", False, 404))
        return _error_response(404, f"no route {request.method} {request.path}")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._record(StubRequest(request.path, "agent", False, 400))
            return _error_response(400, "request body is not JSON")
        if not isinstance(body, dict):
            body = {}
        messages = body.get("messages") if isinstance(body.get("messages"), list) else []
        messages = [m for m in messages if isinstance(m, dict)]
        stream = bool(body.get("stream"))
        model = body.get("model") if isinstance(body.get("model"), str) else ""
        prompt, tool_results = _last_user_turn(messages)
        step = len(tool_results)
        if not body.get("tools"):
            self._record(StubRequest(request.path, "auxiliary", stream, 200, prompt, step, model))
            text = f"Stub title {_echo_words(prompt, 5)}"
            return await self._answer(request, body, stream, text, None)

        try:
            plan = plan_reply(prompt, self._rules, self._default)
        except (ValueError, json.JSONDecodeError) as exc:
            self._record(StubRequest(request.path, "agent", stream, 400, prompt, step, model))
            return _error_response(400, f"bad stub directive: {exc}")
        if plan.delay > 0:
            # A deliberately slow model: the delay is the behaviour under test.
            await asyncio.sleep(plan.delay)
        if step < len(plan.tools):
            self._record(StubRequest(request.path, "agent", stream, 200, prompt, step, model))
            call = plan.tools[step]
            return await self._answer(request, body, stream, f"Calling {call.name}.", call)
        if plan.error is not None and self._take_error(prompt, plan.error_times):
            self._record(StubRequest(request.path, "agent", stream, plan.error, prompt, step, model))
            return _error_response(plan.error, f"stub error {plan.error} for: {_echo_words(prompt, 6)}")
        self._record(StubRequest(request.path, "agent", stream, 200, prompt, step, model))
        if plan.say is not None:
            text = plan.say
        else:
            text = f"Stub reply to: {_echo_words(prompt)}"
            if tool_results:
                first = (tool_results[-1].strip().splitlines() or [""])[0]
                text += f"\nLast tool said: {first[:200]}"
        return await self._answer(request, body, stream, text, None)

    async def _answer(
        self,
        request: web.Request,
        body: Mapping[str, Any],
        stream: bool,
        text: str,
        call: ToolCall | None,
    ) -> web.StreamResponse:
        completion_id = f"chatcmpl-stub-{next(self._call_ids)}"
        call_id = f"call_{completion_id.rsplit('-', 1)[1]}"
        model = str(body.get("model") or self.model_id)
        created = int(time.time())
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        finish = "tool_calls" if call else "stop"
        tool_calls = (
            [
                {
                    "index": 0,
                    "id": call_id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
                }
            ]
            if call
            else None
        )
        if not stream:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if tool_calls:
                message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in tool_calls]
            return web.json_response(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": usage,
                }
            )

        def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> bytes:
            frame = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
                **extra,
            }
            return b"data: " + json.dumps(frame).encode() + b"\n\n"

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        await response.write(chunk({"role": "assistant", "content": ""}))
        for piece in _chunks(text):
            await response.write(chunk({"content": piece}))
        if tool_calls:
            await response.write(chunk({"tool_calls": tool_calls}))
        await response.write(chunk({}, finish, usage=usage))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _error_response(status: int, message: str) -> web.Response:
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": None, "code": str(status)}},
        status=status,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--script", type=Path, default=None, help="JSON rules file")
    parser.add_argument("--model", action="append", default=[], metavar="NAME",
                        help=f"a model name /v1/models lists (repeatable; default {MODEL_ID}); any name is answered")
    args = parser.parse_args(argv)
    models: list[str] = args.model or [MODEL_ID]
    rules, default = load_script(args.script) if args.script else ([], None)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        async with ModelStub(args.port, args.host, rules=rules, default=default, model_id=models[0],
                             model_ids=models[1:]) as stub:
            print(f"model stub listening on {stub.base_url}", flush=True)
            await stop.wait()
            print(f"model stub answered {stub.count()} request(s)", flush=True)

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
