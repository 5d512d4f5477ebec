"""The stored opencode captures still describe the daemon node/ installs.

Runs ``python -m tests.fixtures.opencode.capture`` against the pinned ``opencode serve`` (and the
scripted model) into a temporary folder, then compares with tests/fixtures/opencode what the
pipeline relies on: the event types of each session on both streams (as the collector
normalises them), the shape of the message listings, and the API paths the client calls.
Timestamps, ids and texts differ between captures and are not compared.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from pipeline.model.envelope import REQUIRED_TYPES, TURN_ENDED, normalise
from tests.fixtures import OPENCODE_VERSION, REPO, opencode_capture

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

FILES = (
    "events.ndjson",
    "global-events.ndjson",
    "messages-tool-session.json",
    "messages-error-session.json",
    "openapi.json",
)
# What the collector and ingest read (pipeline/model/envelope.py, pipeline/collector): the
# types ingest builds snapshots from, the `sync` copies normalise must recognise to skip, the
# part events (dropped by default, but an operator may keep them), and server.connected.
RELIED_ON = (REQUIRED_TYPES - {TURN_ENDED}) | {
    "message.part.updated",
    "message.part.delta",
    "server.connected",
    "sync",
}
# (method, path) -> query parameters of the calls in pipeline/clients/opencode.py
CLIENT_OPERATIONS: dict[tuple[str, str], tuple[str, ...]] = {
    ("get", "/global/health"): (),
    ("get", "/global/event"): (),
    ("get", "/event"): ("directory",),
    ("get", "/session"): ("directory", "limit"),
    ("post", "/session"): ("directory",),
    ("get", "/session/status"): ("directory",),
    ("get", "/session/{sessionID}"): ("sessionID", "directory"),
    ("get", "/session/{sessionID}/message"): ("sessionID", "directory", "limit"),
    ("post", "/session/{sessionID}/message"): ("sessionID", "directory"),
}


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory, opencode_binary: Path) -> Path:
    out = tmp_path_factory.mktemp("opencode-capture")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fixtures.opencode.capture", "--out", str(out), "--binary", str(opencode_binary)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out


def stored(name: str) -> Path:
    return opencode_capture(name)


def fresh(out: Path, name: str) -> Path:
    return out / f"opencode-{OPENCODE_VERSION}-{name}"


def read_frames(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def label(event: Mapping[str, Any]) -> str:
    """The event type; session.status with its kind, which turn detection reads."""
    kind = str(event.get("type"))
    if kind == "session.status":
        status = event.get("properties", {}).get("status")
        return f"{kind}/{status.get('type') if isinstance(status, Mapping) else status}"
    return kind


def relied_on_by_session(frames: list[dict[str, Any]]) -> tuple[set[str], list[set[str]]]:
    """(labels of frames without a session, [labels of each session, in order of appearance]),
    for the types in RELIED_ON, each frame put where the collector's normalise puts it."""
    sessionless: set[str] = set()
    sessions: dict[str, set[str]] = {}
    for frame in frames:
        event = frame.get("payload", frame)
        if event.get("type") not in RELIED_ON:
            continue
        envelope = normalise(frame, host="capture", site_key="k", received_at_ms=0)  # raises if malformed
        if envelope is None:
            sessionless.add(label(event))
        else:
            sessions.setdefault(envelope["session_id"], set()).add(label(event))
    return sessionless, list(sessions.values())


def frame_shapes(frames: list[dict[str, Any]]) -> set[tuple[str, ...]]:
    return {tuple(sorted(f)) for f in frames if f.get("payload", f).get("type") in RELIED_ON}


def test_files_carry_the_pinned_version(captured: Path) -> None:
    names = sorted(p.name for p in captured.iterdir())
    assert names == sorted(f"opencode-{OPENCODE_VERSION}-{name}" for name in FILES), (
        f"the installed opencode is not {OPENCODE_VERSION} (tests/fixtures/__init__.py): re-capture "
        "into tests/fixtures/opencode and update OPENCODE_VERSION, see tests/fixtures/opencode/capture.py"
    )
    for name in FILES:
        assert stored(name).is_file(), stored(name)


@pytest.mark.parametrize("stream", ["events.ndjson", "global-events.ndjson"])
def test_event_streams_have_the_types_the_pipeline_relies_on(captured: Path, stream: str) -> None:
    reference, now = read_frames(stored(stream)), read_frames(fresh(captured, stream))
    ref_sessionless, ref_sessions = relied_on_by_session(reference)
    now_sessionless, now_sessions = relied_on_by_session(now)

    assert now_sessionless == ref_sessionless
    # The stored /global/event capture holds the tool session only; /event holds both, tool first.
    assert ref_sessions and len(now_sessions) == 2, now_sessions
    for which, ref, got in zip(("tool session", "error session"), ref_sessions, now_sessions, strict=False):
        assert got == ref, f"{stream}, {which}: missing {sorted(ref - got)}, new {sorted(got - ref)}"
    assert "session.error" in now_sessions[1] and "session.status/idle" in now_sessions[1]
    assert frame_shapes(now) == frame_shapes(reference)


def message_shape(message: dict[str, Any]) -> tuple[list[str], str, list[str]]:
    return sorted(message), message["info"]["role"], sorted(message["info"])


@pytest.mark.parametrize("listing", ["messages-tool-session.json", "messages-error-session.json"])
def test_listings_have_the_stored_shape(captured: Path, listing: str) -> None:
    reference = json.loads(stored(listing).read_text(encoding="utf-8"))
    now = json.loads(fresh(captured, listing).read_text(encoding="utf-8"))
    assert isinstance(now, list) and all(isinstance(m, dict) for m in now)
    assert [message_shape(m) for m in now] == [message_shape(m) for m in reference]
    assert all(isinstance(m["parts"], list) for m in now)


def tool_states(listing: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(p["tool"], p["state"]["status"]) for m in listing for p in m["parts"] if p.get("type") == "tool"]


def test_tool_session_has_a_tool_part(captured: Path) -> None:
    name = "messages-tool-session.json"
    reference = json.loads(stored(name).read_text(encoding="utf-8"))
    now = json.loads(fresh(captured, name).read_text(encoding="utf-8"))
    assert tool_states(now) == tool_states(reference) == [("bash", "completed")]
    assert now[-1]["info"]["finish"] == reference[-1]["info"]["finish"] == "stop"


def test_error_session_ends_in_an_error(captured: Path) -> None:
    name = "messages-error-session.json"
    reference = json.loads(stored(name).read_text(encoding="utf-8"))
    now = json.loads(fresh(captured, name).read_text(encoding="utf-8"))
    last = next(m for m in reversed(now) if m["info"]["role"] == "assistant")
    ref_error = reference[-1]["info"]["error"]
    assert last["info"].get("error"), last["info"]
    assert last["info"]["error"]["name"] == ref_error["name"] == "APIError"
    assert sorted(last["info"]["error"]["data"]) == sorted(ref_error["data"])
    assert last["info"]["error"]["data"]["statusCode"] == 400


@pytest.mark.parametrize("which", ["stored", "captured"])
def test_openapi_has_the_paths_the_client_uses(captured: Path, which: str) -> None:
    path = stored("openapi.json") if which == "stored" else fresh(captured, "openapi.json")
    document = json.loads(path.read_text(encoding="utf-8"))
    missing = []
    for (method, api_path), params in CLIENT_OPERATIONS.items():
        operation = document["paths"].get(api_path, {}).get(method)
        if operation is None:
            missing.append(f"{method.upper()} {api_path}")
            continue
        declared = {p["name"] for p in operation.get("parameters", [])}
        missing += [f"{method.upper()} {api_path} ?{p}" for p in params if p not in declared]
    assert missing == []
