"""Pairs across hosts (issue 15), end to end: the same prompt sent by `pipeline opencode run-task
--host a --host b` to two real `opencode serve` daemons configured with different models
(stub-model-a and stub-model-b, one scripted model stub behind both) reaches the stub panel as
one pair: two traces, each forwarded for the reason "pair", their assistant messages carrying
the same `prompt_ref` and each its own `agent_id`, both blobs with the same `pair_id`.

Everything runs as in production: the collector follows both daemons, every stage is its own
`pipeline worker` on a broker of this test's own, the stub scrubber and the stub panel
(`--require-scrub`) enforce their contracts. The sampling configuration would forward neither
turn on its own: no random baseline (samplingRate 0), no error in the turns, and novelty off
for them: noveltyThreshold is at its maximum (1.0: only a turn with no similar entry in the
window is novel) and the window is seeded, before the turns run, with the signature of exactly
the conversation they will have (the sampler.shipped record a forward of it would have
published). So the only way either turn reaches the panel is the pair window.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devkit.kafka_local import LocalBroker
from devkit.local_stack import Stack, StackSettings, hosts_toml, wait_for
from devkit.model_stub import ModelStub
from devkit.opencode_daemon import PROVIDER_ID, OpencodeDaemon
from pipeline import config as config_mod
from pipeline.model.records import encode
from pipeline.model.trace import trace_id
from pipeline.sampling.configured import ConfiguredSampler
from tests.conftest import local_broker
from tests.kafka_util import produce, read_all

# e2e: real opencode daemons (the npm-pinned binary, OPENCODE_BIN overrides); integration: a
# real broker (this test's own: the stages' groups and the sampler's windows start empty)
pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
MODELS = {"a": "stub-model-a", "b": "stub-model-b"}  # host name -> the model its daemon runs
# the stages' consumer group session: a stage that starts late does not wait out faust's 60 s
FAST_GROUP_ENV = {"BROKER_SESSION_TIMEOUT": "10", "BROKER_HEARTBEAT_INTERVAL": "1"}
START_S = 180.0  # the stack's first start on a loaded machine: imports, group joins, metadata
PAIR_S = 240.0  # from the end of both turns to both traces at the panel
SETTLE_S = 10.0  # after the pair arrived: time for a third trace that must not come


@contextlib.contextmanager
def daemons(workdir: Path, model: ModelStub, binary: Path) -> Iterator[dict[str, OpencodeDaemon]]:
    """One daemon per host of MODELS, each offering its own model, all behind `model`."""
    started: dict[str, OpencodeDaemon] = {}
    try:
        for name, model_id in MODELS.items():
            started[name] = OpencodeDaemon(workdir / f"proj-{name}", model.base_url, binary=binary,
                                           model_id=model_id).start()
        yield started
    finally:
        for daemon in started.values():
            daemon.cleanup()


def seed_novelty_window(stack: Stack, bootstrap: str, prompt: str, reply: str) -> None:
    """Publish on sampler.shipped the signature of the conversation both turns will have (the
    prompt, then the reply), as a forward of such a turn would have: the sample stage's novelty
    window then holds it, and neither turn scores as novel."""
    cfg = config_mod.load(stack.config_path, {})
    seed_id = f"seed-{uuid.uuid4().hex[:12]}"
    seed = {"site_key": cfg.site_key, "snapshot_id": seed_id,
            "messages": [{"info": {"id": "msg_seed_1", "role": "user"}, "parts": [{"type": "text", "text": prompt}]},
                         {"info": {"id": "msg_seed_2", "role": "assistant"},
                          "parts": [{"type": "text", "text": reply}]}]}
    shipped = ConfiguredSampler(cfg).novelty.shipped_record(
        seed, trace_id("seed", f"ses_{seed_id}", "msg_seed_2"), int(time.time() * 1000))
    assert not shipped["empty"], "the seeded conversation has no tokens"
    asyncio.run(produce(bootstrap, "sampler.shipped", [(f"{cfg.site_key}:{seed_id}".encode(), encode(shipped))]))


def pipeline_cli(config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_") and k not in ("FORCE_COLOR",
                                                                                            "TTY_COMPATIBLE")}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *argv, "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def body_of(accepted: dict[str, Any]) -> dict[str, Any]:
    body = accepted["body"]
    return body if isinstance(body, dict) else json.loads(body)


def traces_with(stack: Stack, marker: str) -> dict[str, dict[str, Any]]:
    """The bodies the stub panel accepted whose messages mention `marker`, by trace id."""
    found = {}
    for record in stack.panel_accepted():
        body = body_of(record)
        if any(marker in str(m.get("content", "")) for m in body["blob"]["messages"]):
            found[record["trace_id"]] = body
    return found


def how_far(bootstrap: str, sessions: set[str]) -> str:
    """Where this test's turns got to, for a failure message: their snapshots on sessions.idle and
    their decisions on traces.sampled."""
    def mine(topic: str) -> list[dict[str, Any]]:
        records = asyncio.run(read_all(bootstrap, topic, expect=10**6, timeout_s=5,
                                       keep=lambda m: json.loads(m.value).get("session_id") in sessions))
        return [json.loads(m.value) for m in records]

    snapshots = [{k: s.get(k) for k in ("session_id", "host", "snapshot_id", "prompt_ref", "agent_id", "schema")}
                 for s in mine("sessions.idle")]
    sampled = [{"session_id": t["session_id"], "schema": t.get("schema"), "decision": t.get("decision")}
               for t in mine("traces.sampled")]
    return (f"snapshots on sessions.idle: {json.dumps(snapshots, indent=1)}\n"
            f"traces on traces.sampled: {json.dumps(sampled, indent=1)}")


def test_the_same_prompt_on_two_models_reaches_the_panel_as_one_pair(tmp_path: Path, opencode_binary: Path) -> None:
    marker = f"pair{uuid.uuid4().hex[:12]}"
    reply = f"the pairing answer for {marker}"
    prompt = f"compare how you would explain consumer groups {marker} [[say:{reply}]]"

    with (local_broker(tmp_path / "kafka") as broker,
          ModelStub(model_id=MODELS["a"], model_ids=[MODELS["b"]]) as model,
          daemons(tmp_path, model, opencode_binary) as hosts):
        stack = Stack(StackSettings(bootstrap=broker.bootstrap, workdir=tmp_path / "stack",
                                    hosts_toml=hosts_toml(hosts), sampling_rate=0.0, novelty_threshold=1.0,
                                    extra_env=dict(FAST_GROUP_ENV),
                                    extra_toml="checkpoint_interval_s = 1\npoll_interval_s = 2\n"))
        with stack.start(collector=True):
            run_pair(stack, broker, model, marker, prompt, reply)


def run_pair(stack: Stack, broker: LocalBroker, model: ModelStub, marker: str, prompt: str, reply: str) -> None:
    try:
        stack.procs["collector"].wait_for_log("collecting from 2 hosts", START_S)
    except (TimeoutError, RuntimeError) as exc:
        pytest.fail(f"{exc}\n{stack.logs_tail(3000)}")
    seed_novelty_window(stack, broker.bootstrap, prompt, reply)

    done = pipeline_cli(stack.config_path, "opencode", "run-task", "--host", "a", "--host", "b",
                        "--title", f"pairwise {marker}", prompt)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    blocks = done.stdout.rstrip("\n").split("\n\n")
    sessions: dict[str, str] = {}  # host -> its session
    for name, block in zip(MODELS, blocks, strict=True):
        head, answer = block.split("\n")
        found = re.fullmatch(rf"host {name}: session (ses_\S+)", head)
        assert found, done.stdout
        sessions[name] = found.group(1)
        assert answer == reply
    for model_id in MODELS.values():  # each daemon asked the stub for its own model
        assert model.count("agent", model=model_id) >= 1, [(r.kind, r.model) for r in model.requests]

    try:
        wait_for(lambda: len(traces_with(stack, marker)) >= 2, PAIR_S, interval_s=1.0,
                 what=f"two traces of {marker} at the stub panel")
    except TimeoutError as exc:
        pytest.fail(f"{exc}; the panel has {len(traces_with(stack, marker))}\n"
                    f"{how_far(broker.bootstrap, set(sessions.values()))}\n{stack.logs_tail(2000)}")
    time.sleep(SETTLE_S)
    traces = traces_with(stack, marker)
    assert len(traces) == 2, json.dumps(traces, indent=1)[:4000]

    blobs = {blob["session_id"]: blob for blob in (body["blob"] for body in traces.values())}
    assert set(blobs) == set(sessions.values()), (blobs.keys(), sessions)
    for blob in blobs.values():
        assert blob["reason"] == "pair", {k: v for k, v in blob.items() if k != "messages"}
    (pair_id,) = {blob.get("pair_id") for blob in blobs.values()}
    assert pair_id, "the pair's traces carry no pair_id"

    prompt_refs: set[str] = set()
    agents: dict[str, str] = {}  # host -> the agent_id of its trace's assistant messages
    for name, session in sessions.items():
        assistant = [m for m in blobs[session]["messages"] if m["role"] == "assistant"]
        assert assistant, blobs[session]["messages"]
        (agent,) = {m.get("agent_id") for m in assistant}
        (ref,) = {m.get("prompt_ref") for m in assistant}
        assert agent and ref, assistant
        agents[name], prompt_refs = agent, prompt_refs | {ref}
    assert len(prompt_refs) == 1, prompt_refs  # the same prompt
    # different agents: `<providerID>/<modelID>:<agent>`, each host's own model
    assert agents["a"] != agents["b"]
    for name, model_id in MODELS.items():
        assert agents[name].split(":", 1)[0] == f"{PROVIDER_ID}/{model_id}", agents
