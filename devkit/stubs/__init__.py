"""Real HTTP stand-ins for the panel and the scrubber, for tests, the demo and local runs.

Each stub is an aiohttp server that enforces its service's contract (shared/contracts/) and
adds test controls under `/_stub/`, so a test in another process can drive and inspect it:

    GET  /_stub/stats      counters
    GET  /_stub/faults     the fault knobs as they stand
    POST /_stub/faults     {"reset"?, "fail_next"?, "status"?, "fail_for_s"?, "latency_ms"?,
                            "retry_after_s"?}: fail the next N requests (or every request for
                            T seconds) with `status` (default 503; 429 answers rate_limited
                            with Retry-After), and add latency to every request;
                            "fail_matching": S fails every request whose body holds S (a
                            trace the service keeps failing while it answers the others);
                            "fail_rate": P fails each request with probability P;
                            "drop_rate": P closes the connection of each request with
                            probability P without answering (a server dropping keep-alive
                            connections); "max_concurrent": N answers 503 `overloaded` to a
                            request that finds N already in progress (0: no cap)
    POST /_stub/reset      forget everything recorded and clear the faults

Three ways to run one: `async with StubPanel(...) as stub` (on a free loopback port, in the
running loop); `with StubPanel(...).in_thread() as stub` (its own loop in a daemon thread, for
sync code); `python -m devkit.stubs.panel --port N` (its own process, see `main`).
This module holds what both stubs share: lifecycle, config and clock, fault knobs, the control
routes, and running as a process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import random
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from aiohttp import web

__all__ = [
    "FaultKnobs",
    "StubServer",
    "json_response",
    "run_stub_process",
    "serve_until_signalled",
    "stub_arg_parser",
]

log = logging.getLogger(__name__)

STUB_PREFIX = "/_stub/"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ConfigT = TypeVar("ConfigT")


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    # ASCII-escaped: a lone surrogate in echoed content must not make the answer unencodable.
    return web.Response(
        status=status, text=json.dumps(body), content_type="application/json", headers=headers
    )


@dataclass
class FaultKnobs:
    fail_next: int = 0
    status: int = 503
    fail_until: float = 0.0  # time.monotonic() instant
    latency_s: float = 0.0
    retry_after_s: float = 1.0
    fail_matching: str = ""
    fail_rate: float = 0.0
    drop_rate: float = 0.0
    max_concurrent: int = 0

    _FIELDS = ("reset", "fail_next", "status", "fail_for_s", "latency_ms", "retry_after_s", "fail_matching",
               "fail_rate", "drop_rate", "max_concurrent")
    _RATES = ("fail_rate", "drop_rate")

    def update(self, spec: dict[str, Any], now: float) -> None:
        """Apply a POST /_stub/faults body; ValueError names what is wrong with it."""
        unknown = sorted(set(spec) - set(self._FIELDS))
        if unknown:
            raise ValueError(f"unknown fault knobs {unknown}; known: {list(self._FIELDS)}")
        for name in ("fail_next", "fail_for_s", "latency_ms", "retry_after_s", "max_concurrent", *self._RATES):
            value = spec.get(name)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"{name} must be a number >= 0")
        for name in self._RATES:
            if spec.get(name, 0) > 1:
                raise ValueError(f"{name} must be a probability between 0 and 1")
        status = spec.get("status", self.status)
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            raise ValueError("status must be an HTTP error status 400-599")
        matching = spec.get("fail_matching", self.fail_matching)
        if not isinstance(matching, str):
            raise ValueError("fail_matching must be a string")
        if spec.get("reset"):
            for knob in fields(self):
                setattr(self, knob.name, knob.default)
        self.status = status
        if "fail_matching" in spec:
            self.fail_matching = matching
        if "fail_next" in spec:
            self.fail_next = int(spec["fail_next"])
        if "fail_for_s" in spec:
            self.fail_until = now + float(spec["fail_for_s"])
        if "latency_ms" in spec:
            self.latency_s = float(spec["latency_ms"]) / 1000.0
        if "retry_after_s" in spec:
            self.retry_after_s = float(spec["retry_after_s"])
        for name in self._RATES:
            if name in spec:
                setattr(self, name, float(spec[name]))
        if "max_concurrent" in spec:
            self.max_concurrent = int(spec["max_concurrent"])

    def take(self, now: float, body: bytes = b"", rng: random.Random | None = None) -> int | None:
        """The status to fail this request with, or None; counts down fail_next."""
        if self.fail_matching and self.fail_matching.encode("utf-8") in body:
            return self.status
        if self.fail_next > 0:
            self.fail_next -= 1
            return self.status
        if self.fail_rate and (rng or random).random() < self.fail_rate:
            return self.status
        return self.status if now < self.fail_until else None

    def describe(self, now: float) -> dict[str, Any]:
        state = asdict(self)
        state["fail_for_s"] = max(0.0, state.pop("fail_until") - now)
        state["latency_ms"] = state.pop("latency_s") * 1000.0
        return state


class StubServer(Generic[ConfigT]):
    """Lifecycle and fault handling shared by the stubs; subclasses add routes and name the
    type of their config, whose defaults are used when none is given."""

    name = "stub"
    max_body_bytes = 32 * 1024 * 1024
    config_type: type[ConfigT]

    def __init__(
        self,
        config: ConfigT | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config if config is not None else self.config_type()
        # Rate windows and attestation times read this, so a test can shift the stub in time.
        self.clock = clock
        self.host = host
        self.port = port
        self.faults = FaultKnobs()
        # Handlers run on the server's loop; tests read state from other threads.
        self.lock = threading.Lock()
        self.faulted = 0
        self.dropped = 0  # connections closed without an answer (drop_rate)
        self.overloaded = 0  # requests refused by the max_concurrent cap
        self.in_progress = 0
        self.rng = random.Random()
        self._runner: web.AppRunner | None = None
        self.reset_records()

    # ------------------------------------------------------------ for subclasses

    def add_routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        raise NotImplementedError

    def reset_records(self) -> None:
        raise NotImplementedError

    def on_fault(self, request: web.Request, status: int) -> None:
        """Called (under the lock) for each request a fault knob failed."""

    def fault_response(self, status: int) -> web.Response:
        if status == 429:
            wait = self.faults.retry_after_s
            return json_response(
                429,
                {"error": "rate_limited", "retry_after_s": wait},
                {"Retry-After": str(math.ceil(wait))},
            )
        return json_response(status, {"error": "stub_fault", "status": status})

    # ------------------------------------------------------------ app

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._faults_mw])
        app.router.add_get(STUB_PREFIX + "stats", self._get_stats)
        app.router.add_get(STUB_PREFIX + "faults", self._get_faults)
        app.router.add_post(STUB_PREFIX + "faults", self._post_faults)
        app.router.add_post(STUB_PREFIX + "reset", self._post_reset)
        self.add_routes(app)
        return app

    @web.middleware
    async def _faults_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(STUB_PREFIX):
            return await handler(request)
        with self.lock:
            cap, drop = self.faults.max_concurrent, self.rng.random() < self.faults.drop_rate
            overloaded = bool(cap) and self.in_progress >= cap
            self.overloaded += overloaded
            self.dropped += drop
            if overloaded:
                self.on_fault(request, 503)
            else:
                self.in_progress += 1
        if overloaded:
            return json_response(503, {"error": "overloaded", "max_concurrent": cap})
        try:
            if drop:
                await request.read()
                assert request.transport is not None
                request.transport.close()  # no answer at all, as a server dropping the connection
                return web.Response(status=500)  # never reaches the client
            return await self._after_faults(request, handler)
        finally:
            with self.lock:
                self.in_progress -= 1

    async def _after_faults(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        with self.lock:
            latency = self.faults.latency_s
        if latency:
            await asyncio.sleep(latency)
        with self.lock:
            matching = self.faults.fail_matching
        body = await request.read() if matching else b""  # aiohttp keeps it for the handler
        with self.lock:
            status = self.faults.take(time.monotonic(), body, self.rng)
            if status is not None:
                self.faulted += 1
                self.on_fault(request, status)
        if status is not None:
            return self.fault_response(status)
        return await handler(request)

    async def _get_stats(self, request: web.Request) -> web.Response:
        return json_response(200, self.stats())

    async def _get_faults(self, request: web.Request) -> web.Response:
        with self.lock:
            return json_response(200, self.faults.describe(time.monotonic()))

    async def _post_faults(self, request: web.Request) -> web.Response:
        try:
            spec = await request.json()
            if not isinstance(spec, dict):
                raise ValueError("body must be a JSON object")
            self.set_faults(**spec)
        except ValueError as exc:
            return json_response(400, {"error": "bad_faults", "detail": str(exc)})
        return await self._get_faults(request)

    async def _post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return json_response(200, {"reset": True})

    # ------------------------------------------------------------ in-process controls

    def set_faults(self, **spec: Any) -> None:
        """Same knobs as POST /_stub/faults, e.g. `set_faults(fail_next=2, status=503)`."""
        with self.lock:
            self.faults.update(spec, time.monotonic())

    def reset(self) -> None:
        with self.lock:
            self.faults = FaultKnobs()
            self.faulted = self.dropped = self.overloaded = 0
            self.reset_records()

    @property
    def url(self) -> str:
        if self._runner is None:
            raise RuntimeError(f"{self.name} is not running")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> str:
        # Binding the socket ourselves gives the real port when 0 asked for a free one.
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        runner = web.AppRunner(self.build_app(), access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._runner = runner
        log.info("%s listening on %s", self.name, self.url)
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @contextlib.contextmanager
    def in_thread(self, start_timeout_s: float = 10.0) -> Iterator[Self]:
        """Run on its own event loop in a daemon thread, for sync tests and tools."""
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # handed to the waiting thread below
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        thread = threading.Thread(target=run, name=f"{self.name}-{id(self):x}", daemon=True)
        thread.start()
        if not started.wait(start_timeout_s):
            raise RuntimeError(f"{self.name} did not start within {start_timeout_s}s")
        if failure:
            raise failure[0]
        try:
            yield self
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(start_timeout_s)


async def serve_until_signalled(server: StubServer[Any]) -> None:
    """Run until SIGTERM or SIGINT; prints the URL on stdout so a parent process can read it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(f"{server.name} listening on {server.url}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()


# ---------------------------------------------------------------- its own process


def stub_arg_parser(prog: str, description: str, default_port: int) -> argparse.ArgumentParser:
    """A parser with the options every stub process takes: --host, --port and --verbose."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=default_port, help="0 picks a free port (printed)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def run_stub_process(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    make_server: Callable[[argparse.Namespace], StubServer[Any]],
) -> int:
    """A stub's `main`: parse argv, set up logging, then serve until signalled.

    `make_server` runs after logging is set up, so what it logs about its config is seen.
    """
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(serve_until_signalled(make_server(args)))
    return 0
