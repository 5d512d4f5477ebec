"""Run the pipeline locally as real processes: each stage its own `pipeline worker`, the stub
panel and scrubber, the collector. Used by `pipeline-dev demo`, the integration and fault tests.

Every process is started in its own process group with its output in a log file, and `stop()`
leaves none behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from devkit.kafka_local import free_port
from pipeline.topics import PIPELINE_STAGES


class PipelineProcess:
    """`python -m pipeline.cli ARGS...` (or another `program`: `devkit` runs the stubs) in its own
    process group, its output in a log file."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], log_dir: Path, name: str,
                 program: str = "pipeline.cli", python: str = sys.executable, cwd: Path | None = None) -> None:
        self.args = list(args)
        self.program = program
        self.python, self.cwd = python, cwd
        self.env = {**os.environ, **env}
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PipelineProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([self.python, "-m", self.program, *self.args], env=self.env, cwd=self.cwd,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        if self.alive():
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout_s: float = 20.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> PipelineProcess:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def wait_for_log(self, pattern: str, timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log())
            if found:
                return found
            if not self.alive():
                raise RuntimeError(f"{self.name} exited: {self.log()[-2000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"{self.name}: no {pattern!r} in its log after {timeout_s}s")


def wait_for(predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.25,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


@dataclass
class StackSettings:
    bootstrap: str
    workdir: Path
    site_key: str = "pk_test_thirdparty"
    panel_secret: str = "local-panel-secret"
    jwt_secret: str = "local-jwt-secret"
    scrubber_key: str = "local-scrubber-key"
    require_scrub: bool = True
    bypass_scrubber: bool = False  # scrubberUrl = "" with allowUnscrubbed = true (development only)
    partitions: int = 4
    # shortened for tests and the demo; production uses the defaults in config.py
    extra_toml: str = ""
    hosts_toml: str = ""
    sampling_rate: float = 1.0
    novelty_threshold: float = 0.7
    stages: tuple[str, ...] = PIPELINE_STAGES
    metrics: bool = False  # serve /metrics from every stage and the collector
    worker_loglevel: str = "warn"  # `pipeline worker --loglevel`: the fault suites read info lines on failure
    extra_env: dict[str, str] = field(default_factory=dict)
    panel_args: tuple[str, ...] = ()  # more options of the stub panel (`--rate-limit 20 --rate-window-s 1`)
    # the interpreter and working directory the product's processes run with (an installed wheel's venv)
    python: str = sys.executable
    cwd: Path | None = None


class Stack:
    """Stub panel + stub scrubber + one process per stage (+ optionally one or more collector replicas)."""

    def __init__(self, settings: StackSettings) -> None:
        self.s = settings
        self.logs = settings.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.panel_port = free_port()
        self.scrubber_port = free_port()
        self.procs: dict[str, PipelineProcess] = {}
        self.config_path = settings.workdir / "pipeline.toml"
        self._metrics_ports: dict[str, int] = {}
        self._collectors: dict[str, tuple[str, ...]] = {}  # collector process name -> its service_args

    @property
    def panel_url(self) -> str:
        return f"http://127.0.0.1:{self.panel_port}"

    @property
    def scrubber_url(self) -> str:
        return f"http://127.0.0.1:{self.scrubber_port}"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "PANEL_", "SCRUBBER_"))}
        env.update({
            "PIPELINE_CONFIG": str(self.config_path),
            "PANEL_INGEST_SECRET_" + re.sub(r"[^A-Z0-9]", "_", self.s.site_key.upper()): self.s.panel_secret,
            "SCRUBBER_JWT_SECRET": self.s.jwt_secret,
            "SCRUBBER_API_KEY": self.s.scrubber_key,
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.s.extra_env)
        return env

    def write_config(self) -> None:
        s = self.s
        scrubber = '""\nallowUnscrubbed = true' if s.bypass_scrubber else f'"{self.scrubber_url}"'
        self.config_path.write_text(f"""
panelUrl = "{self.panel_url}"
scrubberUrl = {scrubber}
siteKey = "{s.site_key}"
samplingRate = {s.sampling_rate}
samplingRateOverride = true
noveltyThreshold = {s.novelty_threshold}

[kafka]
bootstrap = "{s.bootstrap}"
partitions = {s.partitions}
cache_dir = "{s.workdir / 'cache'}"

[collector]
{s.extra_toml}
{s.hosts_toml}
""")

    def _start(self, name: str, args: Sequence[str], program: str = "pipeline.cli") -> PipelineProcess:
        # the product may run from another interpreter (an installed wheel); the dev kit runs from this one
        python, cwd = (self.s.python, self.s.cwd) if program.startswith("pipeline.") else (sys.executable, None)
        proc = PipelineProcess(args, self.env, self.logs, name, program, python, cwd).start()
        self.procs[name] = proc
        return proc

    def start_stubs(self) -> None:
        panel_args = ["stub", "panel", "--port", str(self.panel_port), "--site-key", self.s.site_key]
        if self.s.require_scrub:
            panel_args.append("--require-scrub")
        panel_args += self.s.panel_args
        self._start("panel", panel_args, "devkit").wait_for_log("listening on", 30)
        self._start("scrubber", ["stub", "scrubber", "--port", str(self.scrubber_port)], "devkit").wait_for_log(
            "listening on", 30)

    def start_stage(self, stage: str) -> PipelineProcess:
        args = ["worker", stage, "--loglevel", self.s.worker_loglevel]
        if self.s.metrics:
            args += ["--metrics-port", str(self.metrics_port(stage))]
        return self._start(stage, args)

    def metrics_port(self, name: str) -> int:
        """A free port per process, picked once (consecutive ports may be taken by anything)."""
        if name not in self._metrics_ports:
            self._metrics_ports[name] = free_port()
        return self._metrics_ports[name]

    def start_collector(self, name: str = "collector", *, service_args: Sequence[str] = ()) -> PipelineProcess:
        """`pipeline collect` as the process `name`; another name starts one more replica (they share
        the hosts through the collector group). `service_args` (the hidden `--group` and `--*-topic`
        options: a fleet of its own on a shared broker) run it as `python -m pipeline.collector.service`,
        which takes them; `restart(name)` starts it again with the same ones."""
        self._collectors[name] = tuple(service_args)
        args = [*service_args] if service_args else ["collect"]
        if self.s.metrics:
            args += ["--metrics-port", str(self.metrics_port(name))]
        return self._start(name, args, "pipeline.collector.service" if service_args else "pipeline.cli")

    def start(self, *, collector: bool = False) -> Stack:
        self.write_config()
        subprocess.run([self.s.python, "-m", "pipeline.cli", "topics", "create"], env={**os.environ, **self.env},
                       cwd=self.s.cwd,
                       check=True, capture_output=True, timeout=120)
        self.start_stubs()
        for stage in self.s.stages:
            self.start_stage(stage)
        if collector:
            self.start_collector()
        return self

    def restart(self, name: str, *, hard: bool = True) -> None:
        proc = self.procs[name]
        proc.kill9() if hard else proc.stop()
        if name in PIPELINE_STAGES:
            self.start_stage(name)
        elif name in self._collectors:
            self.start_collector(name, service_args=self._collectors[name])
        else:
            raise ValueError(f"restart of {name} is not supported")

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()

    # ---- the stubs' control and inspection endpoints

    def _stub(self, url: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        with httpx.Client(timeout=10) as client:
            r = client.post(url + path, json=payload) if payload is not None else client.get(url + path)
            r.raise_for_status()
            return r.json()

    def panel_accepted(self) -> list[dict[str, Any]]:
        return list(self._stub(self.panel_url, "/_stub/accepted")["traces"])

    def panel_stats(self) -> dict[str, Any]:
        return dict(self._stub(self.panel_url, "/_stub/stats"))

    def panel_faults(self, **knobs: Any) -> None:
        self._stub(self.panel_url, "/_stub/faults", knobs)

    def scrubber_faults(self, **knobs: Any) -> None:
        self._stub(self.scrubber_url, "/_stub/faults", knobs)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def logs_tail(self, chars: int = 1500) -> str:
        return "\n".join(f"--- {n}\n{p.log()[-chars:]}" for n, p in self.procs.items())


def hosts_toml(daemons: Mapping[str, Any]) -> str:
    """`[[hosts]]` entries for running daemons (anything with `.url` and `.password`)."""
    entries = []
    for name, daemon in daemons.items():
        entry = f'[[hosts]]\nname = "{name}"\nbase_url = "{daemon.url}"\n'
        if daemon.password:
            entry += f'password = "{daemon.password}"\n'
        entries.append(entry)
    return "\n".join(entries)


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
