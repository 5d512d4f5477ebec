"""Every ended turn on two real `opencode serve` daemons becomes exactly one snapshot on
sessions.idle — through the real collector and ingest processes on the real broker — also
across a collector kill -9 and a daemon restart mid-stream."""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from devkit.local_stack import Stack, StackSettings, hosts_toml, wait_for
from devkit.model_stub import ModelStub
from devkit.opencode_daemon import OpencodeDaemon
from pipeline.model.records import validate
from tests.kafka_util import read_all

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

# (host, prompts of the session's turns)
WORKLOAD_1 = [
    ("a", ["plain reply about parsers one"]),
    ("a", ["[[tool:bash:echo hello]] run a shell command"]),
    ("a", ["[[tool:read:missing.txt]] read a missing file"]),
    ("a", ["[[error:400]] this turn fails at the provider"]),
    ("a", ["first turn of a long talk", "second turn please continue", "third and last turn"]),
    ("b", ["plain reply about kafka two"]),
    ("b", ["[[tool:bash:ls]] list the files"]),
    ("b", ["multi turn on b", "[[tool:bash:echo again]] and a tool"]),
    ("b", ["[[tool:read:nope.txt]] another failing read"]),
    ("a", ["a plain session about schemas"]),
]
WORKLOAD_2 = [  # driven while the collector is down, then across a daemon restart
    ("a", ["while the collector was away"]),
    ("b", ["[[tool:bash:echo away]] tool while away"]),
]
WORKLOAD_3 = [
    ("a", ["after the daemon restart"]),
    ("b", ["after the restart on b too"]),
]


async def drive(daemons: dict[str, OpencodeDaemon], workload: list[tuple[str, list[str]]]) -> dict[str, int]:
    """Run the workload; returns session id -> number of turns driven."""
    turns: dict[str, int] = {}

    async def one(host: str, prompts: list[str]) -> None:
        async with daemons[host].client() as client:
            result = await client.run_task(prompts[0], title=prompts[0][:20])
            sid = result["session_id"]
            for prompt in prompts[1:]:
                await client.continue_session(sid, prompt)
            turns[sid] = len(prompts)

    await asyncio.gather(*(one(h, p) for h, p in workload))
    return turns


def snapshots(bootstrap: str, sessions: Iterable[str], expect: int, timeout_s: float) -> list[dict[str, Any]]:
    """This test's snapshots (of `sessions`) on sessions.idle, once `expect` of them are there."""
    wanted = set(sessions)
    mine = asyncio.run(read_all(bootstrap, "sessions.idle", expect, timeout_s,
                                keep=lambda m: json.loads(m.value)["session_id"] in wanted))
    return [json.loads(m.value) for m in mine]


def check_exactly_one_per_turn(snaps: list[dict[str, Any]], turns: dict[str, int]) -> None:
    per_session: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in snaps:
        per_session[s["session_id"]].append(s)
    for sid, n in turns.items():
        got = per_session.get(sid, [])
        assert len(got) == n, f"{sid}: {len(got)} snapshots for {n} turns"
        ids = [s["snapshot_id"] for s in got]
        assert len(set(ids)) == len(ids), f"{sid}: a turn was snapshotted twice"
        # each snapshot ends with the turn's final assistant message, in its final state
        last_users = [next(m for m in reversed(s["messages"]) if m["info"]["role"] == "user") for s in got]
        assert len({u["info"]["id"] for u in last_users}) == n, json.dumps(
            [{"snap": s["snapshot_id"], "at": s["emitted_at"], "backfill": s["backfill"],
              "msgs": [(m["info"]["id"], m["info"]["role"], m["info"].get("time"),
                        [(p["type"], p.get("state", {}).get("status"), (p.get("text") or "")[:30]) for p in m["parts"]])
                       for m in s["messages"]]} for s in got], indent=1)
        for s in got:
            last = s["messages"][-1]["info"]
            assert last["role"] == "assistant"
            assert last.get("time", {}).get("completed") or last.get("error"), last


def test_every_turn_one_snapshot_across_restarts(kafka, tmp_path: Path) -> None:
    with ModelStub() as model:
        daemons = {
            "a": OpencodeDaemon(tmp_path / "proj-a", model.base_url),
            "b": OpencodeDaemon(tmp_path / "proj-b", model.base_url, password="pw-" + tmp_path.name),
        }
        for d in daemons.values():
            d.start()
        try:
            hosts = hosts_toml(daemons)
            stack = Stack(StackSettings(bootstrap=kafka.bootstrap, workdir=tmp_path / "stack", stages=("ingest",),
                                        hosts_toml=hosts,
                                        extra_toml="checkpoint_interval_s = 1\npoll_interval_s = 2\n"))
            with stack.start(collector=True):
                stack.procs["collector"].wait_for_log("collecting from 2 hosts", 60)
                turns = asyncio.run(drive(daemons, WORKLOAD_1))
                expected = sum(turns.values())
                snaps = snapshots(kafka.bootstrap, turns, expected, 120)
                check_exactly_one_per_turn(snaps, turns)
                for s in snaps:
                    validate("snapshot.v2", s)

                # a session's latest snapshot (its last turn holds every earlier message): sessions.idle
                # is keyed by prompt, so one session's turns sit on different partitions and are
                # not read back in the order they ended
                by_sid: dict[str, dict[str, Any]] = {}
                for s in snaps:
                    if len(s["messages"]) > len(by_sid.get(s["session_id"], {"messages": ()})["messages"]):
                        by_sid[s["session_id"]] = s
                markers = {sid: Counter(m["source"] for m in s["error_markers"]) for sid, s in by_sid.items()}
                sessions = list(turns)
                # WORKLOAD_1 order is kept by gather's result dict only loosely: find sessions by content
                def session_with(text: str) -> str:
                    for sid in sessions:
                        s = by_sid[sid]
                        if any(text in p.get("text", "") for m in s["messages"] for p in m["parts"]):
                            return sid
                    raise AssertionError(f"no session with {text!r}")
                assert markers[session_with("read a missing file")]["tool"] >= 1
                assert markers[session_with("this turn fails at the provider")]["message"] >= 1
                assert not markers[session_with("plain reply about parsers one")]
                roles = [m["info"]["role"] for m in by_sid[session_with("third and last turn")]["messages"]]
                assert roles.count("user") == 3 and roles[0] == "user"

                # collector killed while turns end, restarted after: backfill, nothing doubled
                stack.procs["collector"].kill9()
                turns.update(asyncio.run(drive(daemons, WORKLOAD_2)))
                stack.restart("collector")
                # one daemon restarted mid-stream (its sessions persist in its data dir)
                daemons["a"].restart()
                wait_for(lambda: daemons["a"].running, 30, what="daemon a back")
                turns.update(asyncio.run(drive(daemons, WORKLOAD_3)))
                expected = sum(turns.values())
                snaps = snapshots(kafka.bootstrap, turns, expected, 180)
                # give a late duplicate the chance to show up before asserting there is none
                snaps = snapshots(kafka.bootstrap, turns, expected + 1, 10)
                check_exactly_one_per_turn(snaps, turns)
                backfilled = [s for s in snaps if s["backfill"]]
                assert backfilled, "turns that ended while the collector was down were not reconciled"
        finally:
            for d in daemons.values():
                d.stop()
