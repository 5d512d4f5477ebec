"""pipeline/sampling/replay.py and the command's time parsing: a replay decides as the sample
stage would, once per snapshot, and tallies what it forwards against what was recorded."""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path
from typing import Any

import pytest

from pipeline.cli.replay import parse_instant, render
from pipeline.model.records import encode
from pipeline.sampling.configured import Forwarded
from pipeline.sampling.replay import Replay
from tests.factory import snapshot, text_snapshot
from tests.unit.agents.conftest import make_config

NOW_S = 1_800_000_000.0


@pytest.mark.parametrize(("text", "expected_s"), [
    ("7d", NOW_S - 7 * 86400), ("36h", NOW_S - 36 * 3600), ("90m", NOW_S - 5400), ("30s", NOW_S - 30),
    ("2026-11-29T08:00:00Z", datetime.datetime(2026, 11, 29, 8, tzinfo=datetime.UTC).timestamp()),
    ("2026-11-29T09:00:00+01:00", datetime.datetime(2026, 11, 29, 8, tzinfo=datetime.UTC).timestamp()),
    ("2026-11-29", datetime.datetime(2026, 11, 29, tzinfo=datetime.UTC).timestamp()),
])
def test_instants_are_iso_times_or_times_ago(text: str, expected_s: float) -> None:
    assert parse_instant(text, NOW_S) == int(expected_s * 1000)


@pytest.mark.parametrize("bad", ["yesterday", "7w", "-3d", ""])
def test_an_instant_that_is_neither_says_what_is_expected(bad: str) -> None:
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_instant(bad, NOW_S)


class Recorded:
    """sessions.idle as a replay reads it: each snapshot at an offset, readable back by it."""

    def __init__(self) -> None:
        self.stored: dict[tuple[int, int], bytes] = {}

    def decide(self, job: Replay, snap: dict[str, Any], now_ms: int) -> Forwarded | None:
        forwards = self.decide_all(job, snap, now_ms)
        return forwards[0] if forwards else None

    def decide_all(self, job: Replay, snap: dict[str, Any], now_ms: int) -> list[Forwarded]:
        offset = len(self.stored)
        self.stored[(0, offset)] = encode(snap)
        return asyncio.run(job.decide(snap, 0, offset, self.read, now_ms))

    async def read(self, partition: int, offset: int) -> bytes | None:
        return self.stored.get((partition, offset))


def test_a_replay_tallies_now_against_before_per_site(tmp_path: Path) -> None:
    config = make_config(tmp_path, PIPELINE_SAMPLING_RATE="1.0", PIPELINE_SAMPLING_RATE_OVERRIDE="true")
    job, topic = Replay(config), Recorded()
    snaps = [snapshot(i, tool_error=i % 2 == 0) for i in range(6)] + [snapshot(9, site_key="pk_other")]
    forwarded = [topic.decide(job, s, 1) for s in snaps]
    assert all(f is not None for f in forwarded) and job.turns == 7
    assert topic.decide(job, snaps[0], 2) is None and job.turns == 7  # a repeated idle is decided once
    recorded = [f.trace for f in forwarded[:2] if f is not None]  # two of them were forwarded then
    recorded.append({"trace_id": "tr_not_replayed", "decision": {"reason": "sample"}})  # outside: ignored
    sites = job.report(recorded)
    main, other = sites["pk_test_thirdparty"], sites["pk_other"]
    assert (main.turns, sum(main.now.values()), sum(main.before.values())) == (6, 6, 2)
    assert (main.both, main.only_now, main.only_before) == (2, 4, 0)
    assert main.now["error_flag"] == 3 and other.to_dict()["forwarded_before"] == 0
    text = render({"turns": 7, "records_read": 8, "from": "a", "to": None, "dry_run": True, "sent": 0,
                   "unusable_records": {}, "sites": {k: v.to_dict() for k, v in sites.items()}})
    assert "pk_test_thirdparty" in text and "only now 4" in text and "dry run" in text


def test_a_replay_under_the_default_policy_forwards_errors_and_the_first_novel_turn(tmp_path: Path) -> None:
    job = Replay(make_config(tmp_path, PIPELINE_SAMPLING_RATE="0.0", PIPELINE_NOVELTY_THRESHOLD="1.0"))
    topic = Recorded()
    reasons = [(f.decision.reason if (f := topic.decide(job, snapshot(i, tool_error=i == 3), 1)) else None)
               for i in range(5)]
    assert reasons[0] == "novelty" and reasons[3] == "error_flag"
    assert reasons.count(None) == 3


def test_a_replay_pairs_the_same_prompt_answered_by_two_models(tmp_path: Path) -> None:
    job, topic = Replay(make_config(tmp_path, PIPELINE_SAMPLING_RATE="0.0")), Recorded()
    prompt, reply = "rename the config loader and update its callers", "renamed and updated every caller " * 3
    assert topic.decide(job, text_snapshot(1, prompt, reply), 1) is not None  # novel: fills the window
    assert topic.decide_all(job, text_snapshot(2, prompt, reply, model="p/a", host="h1"), 2) == []
    pair = topic.decide_all(job, text_snapshot(3, prompt, reply, model="p/b", host="h2"), 3)
    assert [f.decision.reason for f in pair] == ["pair", "pair"]
    tally = job.report([])["pk_test_thirdparty"]
    assert tally.now["pair"] == 2 and tally.turns == 3
