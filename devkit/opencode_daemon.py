"""Start and stop a real ``opencode serve`` for tests and demos.

Each daemon gets its own XDG data/config/cache/state (and HOME) under one
temporary directory, so several run side by side without sharing a database
or reading the developer's own opencode setup. ``stop()`` keeps that
directory, so ``restart()`` (or ``start()`` again) finds the sessions;
``cleanup()`` or leaving the ``with`` block deletes it, and so does garbage
collection or interpreter exit for a daemon nobody cleaned up.

``stop()`` returns only once no process the daemon started is left: its
process group, plus anything carrying its environment marker (opencode runs
each bash tool in a process group of its own).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from pipeline.clients.opencode import OpencodeClient

__all__ = [
    "DEFAULT_BINARY",
    "INSTALL_HINT",
    "MODEL_ID",
    "PROVIDER_ID",
    "OpencodeBinaryNotFound",
    "OpencodeDaemon",
    "OpencodeDaemonError",
    "opencode_config",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BINARY = REPO_ROOT / "node" / "node_modules" / ".bin" / "opencode"
INSTALL_HINT = "cd node && npm ci   (node/package-lock.json pins opencode-ai 1.18.33)"
PROVIDER_ID = "stub"
MODEL_ID = "stub-model"

_MARKER_ENV = "PIPELINE_OPENCODE_DAEMON"
_LISTENING = re.compile(r"listening on (https?://\S+)")
# Inherited variables that would change which config, auth or database the
# daemon uses; the test decides those, not the developer's shell.
_DROP_ENV_PREFIXES = ("OPENCODE_", "XDG_")
# Quiet, offline and self-contained: no models.dev fetch, no update check, no
# LSP downloads, nothing read from ~/.claude.
_QUIET_ENV = {
    "OPENCODE_DISABLE_AUTOUPDATE": "1",
    "OPENCODE_DISABLE_MODELS_FETCH": "1",
    "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
    "OPENCODE_DISABLE_SHARE": "1",
    "OPENCODE_DISABLE_CLAUDE_CODE": "1",
}


class OpencodeDaemonError(RuntimeError):
    """The daemon could not be started, or died. The message ends with its log tail."""


class OpencodeBinaryNotFound(OpencodeDaemonError, FileNotFoundError):
    def __init__(self, path: Path) -> None:
        super().__init__(f"opencode binary not found at {path}; install it with: {INSTALL_HINT}")
        self.path = path


class _ExitedEarly(OpencodeDaemonError):
    """The process ended before it printed where it listens (a port race, say)."""


def opencode_config(model_base_url: str, model_id: str = MODEL_ID) -> dict[str, Any]:
    """The ``opencode.json`` of contracts/opencode.md, pointed at ``model_base_url``, its
    provider ``stub`` offering the one model ``model_id`` (the default and small model).

    Two daemons given different ``model_id`` behind one :class:`~devkit.model_stub.ModelStub`
    stand for hosts running different models: their assistant messages carry
    ``providerID "stub"`` and their own ``modelID``, and the stub answers each under its name."""
    if not model_id.strip():
        raise ValueError(f"model_id must be a non-empty model name, got {model_id!r}")
    return {
        "$schema": "https://opencode.ai/config.json",
        "provider": {
            PROVIDER_ID: {
                "npm": "@ai-sdk/openai-compatible",
                "name": "Stub",
                "options": {"baseURL": model_base_url, "apiKey": "x"},
                "models": {model_id: {"name": "Stub Model", "tool_call": True}},
            }
        },
        "model": f"{PROVIDER_ID}/{model_id}",
        "small_model": f"{PROVIDER_ID}/{model_id}",
        "autoupdate": False,
        "share": "disabled",
        "permission": {"bash": "allow", "edit": "allow"},
    }


class OpencodeDaemon:
    """``with OpencodeDaemon(workdir, stub.base_url) as daemon: daemon.url``.

    ``model_id`` names the model the daemon's opencode.json offers (and uses by default);
    daemons with different ones share a stub: ``OpencodeDaemon(a, stub.base_url,
    model_id="stub-model-a")``."""

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        model_base_url: str,
        port: int = 0,
        password: str | None = None,
        binary: str | os.PathLike[str] | None = None,
        *,
        username: str | None = None,
        startup_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        extra_env: Mapping[str, str] | None = None,
        log_lines: int = 400,
        model_id: str = MODEL_ID,
    ) -> None:
        opencode_config(model_base_url, model_id)  # a bad model_id fails here, not at start()
        self.workdir = Path(workdir).resolve()
        self.model_base_url = model_base_url
        self.model_id = model_id
        self.port = port
        self.username = username or "opencode"
        self._username_set = username is not None
        self._password = password or None
        self.binary = Path(binary) if binary is not None else DEFAULT_BINARY
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._extra_env = dict(extra_env or {})
        self._log: collections.deque[str] = collections.deque(maxlen=log_lines)
        self._log_lock = threading.Lock()
        self._state_dir: Path | None = None
        # Safety nets for a daemon that is dropped or outlives the test without
        # cleanup(): at collection or interpreter exit, kill and delete.
        self._dir_finalizer: weakref.finalize | None = None
        self._proc_finalizer: weakref.finalize | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._url_found = threading.Event()
        self._url: str | None = None
        # Inherited by every process the daemon starts, so stop() can find them.
        self._marker = uuid.uuid4().hex
        self._last_pgid: int | None = None

    def __repr__(self) -> str:
        return (
            f"OpencodeDaemon(url={self._url!r}, workdir={str(self.workdir)!r}, "
            f"auth={'basic' if self._password else 'none'}, pid={self.pid})"
        )

    # -- state ----------------------------------------------------------

    @property
    def url(self) -> str:
        if self._url is None or not self.running:
            raise OpencodeDaemonError("opencode daemon is not running")
        return self._url

    @property
    def password(self) -> str | None:
        return self._password

    @property
    def model(self) -> str:
        """The daemon's default model, ``provider/model`` (``stub/stub-model`` unless ``model_id``
        named another): what its assistant messages' ``providerID``/``modelID`` say."""
        return f"{PROVIDER_ID}/{self.model_id}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def processes(self) -> set[int]:
        """PIDs of live processes this daemon started (itself, its tools).

        Empty after stop(); tests use it to check nothing was left behind.
        """
        pgid = self._proc.pid if self._proc is not None else self._last_pgid
        return set() if pgid is None else _leftovers(pgid, self._marker)

    @property
    def state_dir(self) -> Path | None:
        """The temporary directory holding this daemon's XDG dirs and HOME."""
        return self._state_dir

    @property
    def log(self) -> list[str]:
        with self._log_lock:
            return list(self._log)

    def client(self, **kwargs: Any) -> OpencodeClient:
        """An :class:`OpencodeClient` for this daemon, with its password."""
        kwargs.setdefault("password", self._password)
        if self._username_set:
            kwargs.setdefault("username", self.username)
        return OpencodeClient(self.url, **kwargs)

    # -- lifecycle --------------------------------------------------------

    def start(self) -> OpencodeDaemon:
        if self.running:
            raise OpencodeDaemonError("opencode daemon already running")
        if not self.binary.exists():
            raise OpencodeBinaryNotFound(self.binary)
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "opencode.json").write_text(
            json.dumps(opencode_config(self.model_base_url, self.model_id), indent=2) + "\n", encoding="utf-8"
        )
        if self._state_dir is None:
            self._state_dir = Path(tempfile.mkdtemp(prefix="opencode-daemon-"))
            self._dir_finalizer = weakref.finalize(self, shutil.rmtree, self._state_dir, ignore_errors=True)
        # opencode 1.18.33 reads --port 0 as "4096 if free", which would squat
        # the port a developer's own opencode expects: pick a free one instead,
        # and try another if something took it before opencode bound it.
        attempts = 1 if self.port else 3
        for attempt in range(1, attempts + 1):
            self._launch(self.port or _free_port())
            try:
                self._wait_ready()
            except _ExitedEarly:
                self.stop()
                if attempt == attempts:
                    raise
            except BaseException:
                self.stop()
                raise
            else:
                return self
        raise AssertionError("unreachable")

    def _launch(self, port: int) -> None:
        assert self._state_dir is not None
        self._url = None
        self._url_found.clear()
        with self._log_lock:
            self._log.clear()
        self._proc = subprocess.Popen(
            [str(self.binary), "serve", "--port", str(port), "--hostname", "127.0.0.1"],
            cwd=self.workdir,
            env=self._env(self._state_dir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() reaches its children
        )
        self._proc_finalizer = weakref.finalize(self, _kill_all, self._proc.pid, self._marker)
        self._reader = threading.Thread(target=self._read_output, args=(self._proc,), name="opencode-log", daemon=True)
        self._reader.start()

    def stop(self) -> None:
        """Terminate the daemon and everything it started; return once none is left."""
        proc = self._proc
        if proc is None:
            return
        if self._proc_finalizer is not None:
            self._proc_finalizer.detach()
        pgid = proc.pid  # start_new_session made the leader's pid the group id
        self._last_pgid = pgid
        _signal_group(pgid, signal.SIGTERM)
        try:
            proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            _signal_group(pgid, signal.SIGKILL)
            proc.wait(self.stop_timeout)
        # opencode runs each bash tool in a process group of its own, and an
        # orphan belongs to no tree we could walk; the env marker finds both.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            leftovers = _leftovers(pgid, self._marker)
            if not leftovers:
                break
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if _wait_gone(pgid, self._marker, self.stop_timeout):
                break
        else:
            left = sorted(_leftovers(pgid, self._marker))
            raise OpencodeDaemonError(f"opencode processes {left} survived SIGKILL")
        if self._reader is not None:
            self._reader.join(self.stop_timeout)
        if proc.stdout is not None:
            proc.stdout.close()
        self._proc = None
        self._reader = None

    def restart(self) -> OpencodeDaemon:
        """Stop and start again with the same data dirs (sessions survive) and,
        when possible, the same port, so existing client URLs stay valid."""
        if self._url is not None:
            self.port = httpx.URL(self._url).port or self.port
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        """Stop, and delete the temporary state directory."""
        self.stop()
        if self._dir_finalizer is not None:
            self._dir_finalizer()  # removes the state dir, once
        self._state_dir = None

    def __enter__(self) -> OpencodeDaemon:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- internals --------------------------------------------------------

    def _env(self, state: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_DROP_ENV_PREFIXES)}
        for name in ("data", "config", "cache", "state"):
            path = state / name
            path.mkdir(exist_ok=True)
            env[f"XDG_{name.upper()}_HOME"] = str(path)
        home = state / "home"
        home.mkdir(exist_ok=True)
        env["HOME"] = str(home)
        env.update(_QUIET_ENV)
        if self._password:
            env["OPENCODE_SERVER_PASSWORD"] = self._password
            if self._username_set:
                env["OPENCODE_SERVER_USERNAME"] = self.username
        env.update(self._extra_env)
        env[_MARKER_ENV] = self._marker
        return env

    def _read_output(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            with self._log_lock:
                self._log.append(line)
            match = _LISTENING.search(line)
            if match and not self._url_found.is_set():
                self._url = match.group(1).rstrip("/")
                self._url_found.set()

    def _failure(self, what: str, kind: type[OpencodeDaemonError] = OpencodeDaemonError) -> OpencodeDaemonError:
        tail = "\n".join(self.log[-40:])
        return kind(f"{what}\n--- opencode output (tail) ---\n{tail}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        proc = self._proc
        assert proc is not None
        while not self._url_found.wait(0.05):
            if proc.poll() is not None:
                raise self._failure(
                    f"opencode serve exited with {proc.returncode} before listening",
                    _ExitedEarly,
                )
            if time.monotonic() > deadline:
                raise self._failure(f"opencode serve printed no 'listening on' line in {self.startup_timeout:.0f}s")
        auth = httpx.BasicAuth(self.username, self._password) if self._password else None
        last = "no answer yet"
        with httpx.Client(base_url=self._url or "", auth=auth, timeout=2.0) as http:
            while True:
                if proc.poll() is not None:
                    raise self._failure(f"opencode serve exited with {proc.returncode} during start")
                try:
                    response = http.get("/global/health")
                    if response.status_code == 200 and response.json().get("healthy") is True:
                        return
                    last = f"HTTP {response.status_code}"
                except (httpx.HTTPError, ValueError) as exc:
                    last = type(exc).__name__
                if time.monotonic() > deadline:
                    raise self._failure(f"/global/health not healthy in {self.startup_timeout:.0f}s (last: {last})")
                time.sleep(0.1)  # poll interval between health probes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _kill_all(pgid: int, marker: str) -> None:
    """Last resort for a daemon never stopped: no grace, just SIGKILL."""
    _signal_group(pgid, signal.SIGKILL)
    for pid in _leftovers(pgid, marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _wait_gone(pgid, marker, 5.0)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _leftovers(pgid: int, marker: str) -> set[int]:
    """Live (non-zombie) processes in the daemon's group or carrying its marker.

    Zombies are skipped: an orphan reparented to a PID 1 that never reaps
    would otherwise look alive forever, though it holds no resources.
    """
    proc = Path("/proc")
    if not proc.is_dir():  # no procfs: the group is all we can see
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return set()
        return {pgid}
    needle = f"{_MARKER_ENV}={marker}".encode()
    found: set[int] = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            # The command name may hold spaces or parentheses: split after its last ')'.
            state, _ppid, group = stat[stat.rfind(")") + 2 :].split()[:3]
            if state in ("Z", "X"):
                continue
            if int(group) == pgid or needle in (entry / "environ").read_bytes().split(b"\0"):
                found.add(int(entry.name))
        except (OSError, ValueError):
            continue  # exited while we looked, or not ours to read
    found.discard(os.getpid())
    return found


def _wait_gone(pgid: int, marker: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _leftovers(pgid, marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # poll interval while the last processes exit
    return True
