"""sessions.idle -> sample -> scrub -> sign -> breaker -> deliver -> stub panel, every stage its
own process on the real broker, the stubs enforcing the real contracts over HTTP."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from devkit.local_stack import Stack, StackSettings, wait_for
from pipeline.model.records import encode
from pipeline.topics import STAGES
from tests.factory import SEEDED_ASSIGNMENT, SEEDED_SECRETS, snapshot
from tests.integration.test_breaker import running
from tests.kafka_util import produce, read_all, values

pytestmark = pytest.mark.integration


HOST = "delivery-path"  # the broker is shared with suites that reuse the factory's session ids


def sampled_by(bootstrap: str) -> list[dict]:
    """This test's forwarded traces (by host) on the shared broker."""
    everything = values(asyncio.run(read_all(bootstrap, "traces.sampled", expect=10**6, timeout_s=3)))
    return [t for t in everything if t["host"] == HOST]


def _body(accepted: dict) -> dict:
    return accepted["body"] if isinstance(accepted["body"], dict) else json.loads(accepted["body"])


def test_happy_path_delivers_scrubbed_signed_traces(kafka, tmp_path: Path) -> None:
    stack = Stack(StackSettings(bootstrap=kafka.bootstrap, workdir=tmp_path, sampling_rate=1.0))
    snaps = [snapshot(i, host=HOST, with_secrets=True, tool_error=(i % 3 == 0), api_error=(i == 4))
             for i in range(8)]
    # past what earlier tests left in the shared stage groups: a trace signed for a stub panel
    # that is gone would be retried at the head of its partition and hold these back
    with running(stack, extra_groups=[(STAGES["ingest"].app_id, STAGES["ingest"].input)]):
        asyncio.run(produce(kafka.bootstrap, "sessions.idle",
                            [(f"{HOST}:{s['session_id']}".encode(), encode(s)) for s in snaps]))
        try:
            wait_for(lambda: len({t["trace_id"] for t in stack.panel_accepted()}
                                 & {t["trace_id"] for t in sampled_by(kafka.bootstrap)}) >= 8,
                     120, what="8 traces accepted by the panel")
        except TimeoutError:
            pytest.fail(stack.logs_tail())
        # the broker is shared with other tests: look only at this test's sessions
        ours = {t["trace_id"] for t in sampled_by(kafka.bootstrap)}
        accepted = {t["trace_id"]: t for t in stack.panel_accepted() if t["trace_id"] in ours}
        stats = stack.panel_stats()
        sampled = sampled_by(kafka.bootstrap)

    assert len(sampled) == 8
    assert stats["refused"] == 0, stats
    assert set(accepted) == {t["trace_id"] for t in sampled}
    by_session = {t["session_id"]: t for t in sampled}
    for trace in accepted.values():
        body = _body(trace)
        text = json.dumps(body)
        for secret in [*SEEDED_SECRETS, SEEDED_ASSIGNMENT, "sk-live-abcdef"]:
            assert secret not in text, f"unscrubbed {secret!r} reached the panel"
        blob = body["blob"]
        msgs = blob["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
        assert all(m["tool_calls"][0]["name"] == "bash" for m in msgs if m["role"] == "assistant")
        sid = blob["session_id"]
        expected_reason = by_session[sid]["decision"]["reason"]
        assert blob["reason"] == expected_reason
    reasons = {t["session_id"]: t["decision"]["reason"] for t in sampled}
    assert reasons["ses_test000000"] == "error_flag"  # failing tool
    assert reasons["ses_test000004"] == "error_flag"  # APIError on the assistant message
