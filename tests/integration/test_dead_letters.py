"""Permanent refusals go to traces.dead with the panel's answer, `pipeline dead list` shows them,
and `pipeline dead redrive` delivers them once the cause is fixed: on the real broker, every
stage its own process (issue 5).

The stub panel keeps the right secrets throughout; only the deliver process is started wrong:
first with a wrong ingest secret (401 bad_signature), then without SCRUBBER_JWT_SECRET, so a
trace whose attestation outlived the panel's 300 s window goes out as it is (422
scrubber_attestation_expired). A deliver started right re-signs and re-mints the redriven ones.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from devkit.kafka_local import LocalBroker
from devkit.local_stack import Stack, wait_for
from pipeline.config import panel_secret_variable
from pipeline.delivery.signing import mint_attestation, sign
from pipeline.kafka.deadletters import REDRIVE_GROUP
from pipeline.model.records import compact_json, encode, validate_for_topic
from pipeline.topics import STAGES
from tests.integration.test_breaker import (
    WAIT_S,
    accepted_ids,
    delivery_stack,
    extra_worker,
    fast_toml,
    forward,
    jwt_claims,
    read_values,
    running,
    snapshots,
    unique_host,
    wait_accepted,
    wait_committed,
)
from tests.kafka_util import produce

pytestmark = pytest.mark.integration

DELIVER_GROUP = STAGES["deliver"].app_id
STALE_S = 400  # older than the attestation's 300 s lifetime


def pipeline_cli(stack: Stack, *args: str) -> str:
    """`pipeline ARGS` as an operator runs it, with the stack's configuration and secrets."""
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env={**os.environ, **stack.env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def dead_for(bootstrap: str, ids: set[str]) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in read_values(bootstrap, "traces.dead") if r["key"] in ids}


def wait_dead(stack: Stack, ids: set[str]) -> dict[str, dict[str, Any]]:
    try:
        wait_for(lambda: set(dead_for(stack.s.bootstrap, ids)) == ids, WAIT_S, interval_s=0.5,
                 what=f"{len(ids)} dead letters in traces.dead")
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n{stack.logs_tail(3000)}")
    return dead_for(stack.s.bootstrap, ids)


def drain_deliver(stack: Stack) -> None:
    # the deliver group committed everything it handled: a replacement starts after it
    wait_committed(stack.s.bootstrap, DELIVER_GROUP, "traces.outbox", what="the deliver group to commit")


def stale_copy(stack: Stack, signed: dict[str, Any]) -> dict[str, Any]:
    """A traces.signed record under a new trace id, signed and attested STALE_S seconds ago,
    as if it had been held that long: its attestation is past the panel's window."""
    trace_id = "tr_oc_" + uuid.uuid4().hex
    body = json.loads(signed["body"])
    body["trace_id"] = trace_id
    raw = compact_json(body, sort_keys=True).encode("utf-8")  # as pipeline.delivery.signing.canonical_body
    then = time.time() - STALE_S
    record = {**signed, "trace_id": trace_id, "body": raw.decode("utf-8"),
              "signature": sign(raw, stack.s.panel_secret),
              "attestation": mint_attestation(raw, stack.s.jwt_secret, then), "attestation_iat": int(then),
              "signed_at": int(then * 1000), "first_signed_at": int(then * 1000)}
    validate_for_topic("traces.signed", record)
    return record


def test_401_and_422_are_dead_lettered_listed_and_redriven(kafka: LocalBroker, tmp_path: Path) -> None:
    # refusals count as breaker failures; a high threshold keeps the breaker out of this test
    stack = delivery_stack(kafka, tmp_path, fast_toml(threshold=100), stages=("sample", "scrub", "sign", "breaker"))
    host = unique_host("dead")
    secret_var = panel_secret_variable(stack.s.site_key)
    # earlier tests' dead letters are not this test's to redrive
    with running(stack, [(REDRIVE_GROUP, "traces.dead")]):
        # 401: a deliver process with the wrong ingest secret
        wrong = extra_worker(stack, "deliver", "deliver-wrong-secret", {secret_var: "not-the-panel-secret"})
        unsigned_ids = forward(stack, snapshots(host, range(0, 2)))
        dead_401 = wait_dead(stack, unsigned_ids)
        drain_deliver(stack)
        wrong.stop()

        # 422: a deliver process that cannot re-mint, and a trace attested 400 s ago
        no_jwt = extra_worker(stack, "deliver", "deliver-no-jwt", {"SCRUBBER_JWT_SECRET": ""})
        template = next(r for r in read_values(kafka.bootstrap, "traces.signed") if r["trace_id"] in unsigned_ids)
        stale = stale_copy(stack, template)
        asyncio.run(produce(kafka.bootstrap, "traces.signed", [(stale["trace_id"].encode(), encode(stale))]))
        dead_422 = wait_dead(stack, {stale["trace_id"]})
        drain_deliver(stack)
        no_jwt.stop()
        refused_before = stack.panel_stats()["refused_by_error"]
        assert not accepted_ids(stack), "a refused trace was accepted before the redrive"

        listing = pipeline_cli(stack, "dead", "list", "--topic", "traces.dead")

        # fixed: a deliver with the right configuration, then the operator's redrive
        stack.start_stage("deliver")
        redrive = pipeline_cli(stack, "dead", "redrive", "--topic", "traces.dead", "--all")
        all_ids = unsigned_ids | {stale["trace_id"]}
        wait_accepted(stack, all_ids)
        accepted = {t["trace_id"]: t for t in stack.panel_accepted()}
        stats = stack.panel_stats()
        relisted = pipeline_cli(stack, "dead", "redrive", "--topic", "traces.dead", "--all")

    letters = {**dead_401, **dead_422}
    for tid, letter in letters.items():
        status, error = (422, "scrubber_attestation_expired") if tid == stale["trace_id"] else (401, "bad_signature")
        assert letter["stage"] == "deliver" and letter["reason"] == f"panel_{status}", letter
        assert letter["source_topic"] == "traces.outbox" and letter["redrive_topic"] == "traces.signed"
        assert letter["detail"]["http_status"] == status
        assert json.loads(letter["detail"]["panel_body"])["error"] == error  # the panel's own answer
        assert error in letter["error"]
        original = json.loads(base64.b64decode(letter["original_b64"]))
        assert original["trace_id"] == tid and original["schema"] == "trace.signed/1"
        # the operator's view: every letter with its reason and the panel's error
        line = next((ln for ln in listing.splitlines() if letter["dead_id"] in ln), "")
        assert f"reason=panel_{status}" in line and "-> traces.signed" in line, listing
        assert error in listing.split(letter["dead_id"], 1)[1].splitlines()[1], listing
        assert f"redrove {letter['dead_id']} (panel_{status})" in redrive, redrive
    assert refused_before == {"bad_signature": 2, "scrubber_attestation_expired": 1}, refused_before
    assert set(accepted) == all_ids
    assert stats["refused"] == 3, stats  # the redriven ones were not refused again
    # the stale trace went out with an attestation minted at delivery, not its old one
    assert accepted[stale["trace_id"]]["attestation_jti"] != jwt_claims(stale["attestation"])["jti"]
    assert "0 redriven" in relisted, "a second redrive --all must not send the letters again"
