"""Trust decisions come from configuration and the topic table, never from a record; nothing
unscrubbed passes the scrub stage: each reproduction of the attacker's tries, on the real
broker with every stage its own process and the stubs enforcing the real contracts.

- a record on traces.outbox naming an endpoint that is not configured is a dead letter, never a
  request (the site secret and a fresh attestation went with it before);
- a record written straight to traces.scrubbed without the scrubber's result is not signed;
- a forged scrub.dead letter naming traces.outbox is redriven to where the table says
  (traces.sampled), or refused when its original is not such a record;
- one trace the scrubber keeps failing while it scrubs the others goes to scrub.dead, with the
  scrubber's answers, after its retry budget; the others are delivered.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from devkit.kafka_local import LocalBroker, free_port
from devkit.local_stack import Stack, StackSettings, wait_for
from pipeline.clients.scrubber import bypass_record
from pipeline.model.records import dead_letter, encode, validate_for_topic
from pipeline.model.trace import sampled_trace
from pipeline.sampling.base import Decision
from tests.factory import SEEDED_SECRETS, snapshot, text_snapshot
from tests.integration.test_breaker import (
    DELIVERY_STAGES,
    WAIT_S,
    accepted_ids,
    fast_toml,
    forward,
    read_values,
    running,
    snapshots,
    unique_host,
    wait_accepted,
)
from tests.kafka_util import produce

pytestmark = pytest.mark.integration

BUDGET_TOML = """
[scrub]
retry_base_s = 0.2
retry_max_s = 0.5
max_attempts = 3
max_age_s = 2
"""


@pytest.fixture(scope="module")
def stack(kafka: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = StackSettings(bootstrap=kafka.bootstrap, workdir=tmp_path_factory.mktemp("trust"),
                             stages=DELIVERY_STAGES, extra_toml=fast_toml(extra=BUDGET_TOML))
    with running(Stack(settings)) as started:
        yield started


def _letters(bootstrap: str, topic: str, match: str) -> list[dict[str, Any]]:
    return [d for d in read_values(bootstrap, topic)
            if match in (d.get("key") or "") or match.encode() in base64.b64decode(d["original_b64"])]


def _wait_letter(stack: Stack, topic: str, match: str) -> dict[str, Any]:
    try:
        wait_for(lambda: _letters(stack.s.bootstrap, topic, match), WAIT_S, interval_s=0.5,
                 what=f"a dead letter for {match} in {topic}")
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n{stack.logs_tail(3000)}")
    return _letters(stack.s.bootstrap, topic, match)[0]


def _sampled(host: str, i: int = 0) -> dict[str, Any]:
    decision = Decision(forward=True, reason="sample", rate=1.0)
    return sampled_trace(snapshot(i, host=host, with_secrets=True), decision, 25, int(time.time() * 1000))


def _signed(host: str, endpoint: str) -> dict[str, Any]:
    """A well-formed trace.signed record an attacker wrote, naming `endpoint`."""
    now = int(time.time() * 1000)
    record = {
        "schema": "trace.signed/1", "trace_id": f"tr_oc_{uuid.uuid4().hex[:16]}", "snapshot_id": "snap_x",
        "host": host, "site_key": "pk_test_thirdparty", "session_id": "ses_forged", "endpoint": endpoint,
        "body": json.dumps({"trace_id": "x", "source_agent": "opencode", "blob": {"messages": []}}),
        "signature": "0" * 64, "attestation": None, "attestation_iat": None, "reason": "sample",
        "signed_at": now, "first_signed_at": now,
        "scrub": {"mode": "trace", "jti": "f" * 32, "engine_version": "forged", "input_hash": None},
    }
    validate_for_topic("traces.outbox", record)
    return record


class _Listener:
    """An HTTP server that only counts the requests it gets (where a forged record points)."""

    def __init__(self) -> None:
        self.hits = 0
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                listener.hits += 1
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_a_record_naming_an_endpoint_not_configured_is_dead_lettered_not_sent(stack: Stack) -> None:
    listener = _Listener()
    try:
        forged = _signed(unique_host("forged-endpoint"), listener.url)
        asyncio.run(produce(stack.s.bootstrap, "traces.outbox", [(forged["trace_id"].encode(), encode(forged))]))
        letter = _wait_letter(stack, "traces.dead", forged["trace_id"])
        time.sleep(1)
        assert letter["reason"] == "unknown_endpoint"
        assert listener.hits == 0, "the deliver stage sent a request to an endpoint it was not configured with"
        assert listener.url not in letter["error"]
    finally:
        listener.close()


def test_a_trace_without_the_scrubbers_result_is_not_signed(stack: Stack) -> None:
    host = unique_host("unscrubbed")
    forged = bypass_record(_sampled(host), int(time.time() * 1000))  # the shape of a scrubbed trace, raw text
    asyncio.run(produce(stack.s.bootstrap, "traces.scrubbed", [(f"{host}:x".encode(), encode(forged))]))
    letter = _wait_letter(stack, "sign.dead", host)
    assert letter["reason"] == "not_scrubbed"
    assert not [r for r in read_values(stack.s.bootstrap, "traces.signed") if r["host"] == host]


def _redrive(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "dead", "redrive", *args],
                          env={**os.environ, **stack.env}, capture_output=True, text=True, timeout=120)


def test_redrive_goes_where_the_topic_table_says_never_where_the_letter_says(stack: Stack) -> None:
    bootstrap = stack.s.bootstrap
    host = unique_host("forged-letter")
    # a letter whose original is a signed trace, asking to go straight to delivery
    forged_signed = _signed(host, stack.panel_url)
    bad = dead_letter(stage="scrub", source_topic="traces.sampled", raw=encode(forged_signed), reason="x",
                      error="x", redrive_topic="traces.outbox")
    # a letter whose original is a real sampled trace, also asking for traces.outbox
    sampled = _sampled(host, 1)
    good = dead_letter(stage="scrub", source_topic="traces.sampled", raw=encode(sampled), reason="x", error="x",
                       redrive_topic="traces.outbox", key=f"{host}:{sampled['session_id']}")
    asyncio.run(produce(bootstrap, "scrub.dead", [(None, encode(bad)), (None, encode(good))]))

    refused = _redrive(stack, "--topic", "scrub.dead", "--id", bad["dead_id"])
    assert refused.returncode == 1, refused.stdout + refused.stderr  # nothing to redrive: a failure, not usage
    assert "not valid traces.sampled records" in refused.stderr
    done = _redrive(stack, "--topic", "scrub.dead", "--id", good["dead_id"])
    assert done.returncode == 0, done.stderr
    assert "-> traces.sampled" in done.stdout
    # it goes through the scrubber like any other trace, and is delivered scrubbed
    wait_accepted(stack, {sampled["trace_id"]})
    accepted = {t["trace_id"]: t for t in stack.panel_accepted()}[sampled["trace_id"]]
    text = json.dumps(accepted["body"])
    assert not any(secret in text for secret in SEEDED_SECRETS)
    outbox = [r for r in read_values(bootstrap, "traces.outbox") if r["host"] == host]
    assert {r["trace_id"] for r in outbox} == {sampled["trace_id"]}, "a forged letter reached traces.outbox"


def test_a_trace_the_scrubber_keeps_failing_alone_is_dead_lettered_with_its_answers(stack: Stack) -> None:
    host = unique_host("poison")
    marker = f"POISON{uuid.uuid4().hex}"
    stack.scrubber_faults(fail_matching=marker, status=500)
    try:
        poison = text_snapshot(0, f"please fix {marker}", "done", host=host)
        fine = snapshots(host, range(1, 4))
        ids = forward(stack, [poison, *fine])
        letter = _wait_letter(stack, "scrub.dead", marker)
        assert letter["reason"] == "scrub_budget_exhausted"
        assert letter["detail"]["attempts"] >= 3
        assert letter["detail"]["answers"] and all(a["http_status"] == 500 for a in letter["detail"]["answers"])
        poison_id = json.loads(base64.b64decode(letter["original_b64"]))["trace_id"]
        wait_accepted(stack, ids - {poison_id})
        assert poison_id not in accepted_ids(stack)
    finally:
        stack.scrubber_faults(reset=True)
