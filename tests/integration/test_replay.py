"""`pipeline replay` on the real broker beside the live pipeline (sample ... deliver, the stub
panel): the dry run compares what another policy would forward with what the live stage
forwarded, sends nothing and commits nothing; the real run puts the re-decided traces on
traces.sampled, marked as replayed, the panel upserts the turns it had instead of adding them
twice, and a later replay does not count them as forwarded before."""

from __future__ import annotations

import asyncio
import datetime
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from devkit.kafka_local import LocalBroker
from devkit.local_stack import Stack, StackSettings, wait_for
from tests.factory import snapshot
from tests.integration.test_breaker import DELIVERY_STAGES, read_values, running, send_snapshots, wait_accepted
from tests.kafka_util import committed

pytestmark = pytest.mark.integration

TURNS = 12
ERRORS = range(0, TURNS, 3)  # the turns with a failed tool call: error_flag under any policy
WAIT_S = 90


def replay(stack: Stack, config: Path, *args: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "replay", "--config", str(config), "--json", *args],
                          env=stack.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def test_replay_compares_sends_and_marks_what_it_sent(kafka: LocalBroker, tmp_path: Path) -> None:
    # the live policy forwards errors only (no random share; novelty only for a window's first turn)
    stack = Stack(StackSettings(bootstrap=kafka.bootstrap, workdir=tmp_path, stages=DELIVERY_STAGES,
                                sampling_rate=0.0, novelty_threshold=1.0))
    site, host = stack.s.site_key, f"replay-{uuid.uuid4().hex[:8]}"
    snaps = [snapshot(i, host=host, site_key=site, tool_error=i in ERRORS) for i in range(TURNS)]
    everything = tmp_path / "everything.toml"
    with running(stack, extra_groups=()):
        started = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
        # the first turn (an error) alone, so that it is decided first live as in the replay
        # (which reads in time order): it fills the window, and no later turn is novel at 1.0
        ids = send_snapshots(kafka.bootstrap, snaps[:1])
        wait_for(lambda: any(t["host"] == host for t in read_values(kafka.bootstrap, "traces.sampled")),
                 WAIT_S, what="the first turn's forward")
        ids |= send_snapshots(kafka.bootstrap, snaps[1:])

        def live_forwards() -> list[dict[str, Any]]:
            return [t for t in read_values(kafka.bootstrap, "traces.sampled") if t["host"] == host]

        wait_for(lambda: len(live_forwards()) >= len(ERRORS), WAIT_S, what="the live sample stage's forwards")
        time.sleep(2)  # the others it declined are decided too
        live = {t["trace_id"]: t["decision"]["reason"] for t in live_forwards()}
        assert set(live) <= ids and sum(1 for r in live.values() if r == "error_flag") == len(ERRORS)
        wait_accepted(stack, set(live))
        groups_before = asyncio.run(committed(kafka.bootstrap, "panel-pipeline-sample"))

        # another policy: every turn (samplingRate 1.0); the same broker and keys otherwise
        everything.write_text(stack.config_path.read_text().replace("samplingRate = 0.0", "samplingRate = 1.0"))
        since = started.isoformat().replace("+00:00", "Z")
        dry = replay(stack, everything, "--from", since, "--dry-run")
        tally = dry["sites"][site]
        assert dry["dry_run"] and dry["sent"] == 0 and dry["turns"] == TURNS
        assert tally["forwarded_now"] == TURNS and tally["forwarded_before"] == len(live)
        assert tally["both"] == len(live) and tally["only_now"] == TURNS - len(live) and tally["only_before"] == 0
        assert tally["now"]["error_flag"] == len(ERRORS) == tally["before"]["error_flag"]
        assert len(live_forwards()) == len(live)  # sent nothing
        # the live policy replayed over its own traffic forwards what it forwarded
        same = replay(stack, stack.config_path, "--from", since, "--dry-run")["sites"][site]
        assert (same["forwarded_now"], same["only_now"], same["only_before"]) == (len(live), 0, 0)

        sent = replay(stack, everything, "--from", since)
        assert sent["sent"] == TURNS
        replayed = [t for t in live_forwards() if t["decision"]["detail"].startswith("replayed: ")]
        assert sorted(t["trace_id"] for t in replayed) == sorted(ids)  # the same stable trace ids
        again = replay(stack, everything, "--from", since, "--dry-run")["sites"][site]
        assert again["forwarded_before"] == len(live)  # what replay sent is not "forwarded before"
        # the panel gets every replayed turn; the ones it had are upserted, not added again
        wait_accepted(stack, ids)
        accepted = {t["trace_id"]: t["upserts"] for t in stack.panel_accepted() if t["trace_id"] in ids}
        assert accepted == {tid: 2 if tid in live else 1 for tid in ids}
        # and the live stage's committed offsets were never touched by any of it
        assert asyncio.run(committed(kafka.bootstrap, "panel-pipeline-sample")) == groups_before
