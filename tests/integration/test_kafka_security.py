"""The pipeline on the secured broker (`pipeline-dev kafka up --secure`): SASL_SSL, one SCRAM
principal per role, KRaft's StandardAuthorizer with allow.everyone.if.no.acl.found=false and
the ACLs `pipeline kafka acls` computes from the topic table.

- the delivery path runs end to end, every stage as its own principal; the lag exporter's
  principal reads every stage's lag and no record;
- a wrong password is a start-up error naming the bootstrap, the mechanism and the variable
  (never the password), not a hang;
- a stage whose principal lacks WRITE on an output holds its batch uncommitted, names the ACL,
  and delivers every record exactly once when `pipeline kafka acls` grants it again;
- a client that does not authenticate cannot write traces.outbox, nor can a principal that is
  not the breaker's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAuthorizationFailedError

from devkit.kafka_local import LocalBroker
from devkit.local_stack import PipelineProcess, Stack, StackSettings, wait_for
from pipeline.errors import BrokerError
from pipeline.kafka.acls import Acl
from pipeline.kafka.admin import check_access, revoke_acls
from pipeline.kafka.lag import collect_lag
from pipeline.kafka.security import KafkaAccess
from pipeline.model.records import encode
from pipeline.topics import PIPELINE_STAGES, STAGES
from tests.factory import snapshot
from tests.kafka_util import committed, end_offsets, forge_outbox, produce, read_all, values

pytestmark = pytest.mark.integration

WRONG = "not-the-password-7f3a"


def _env(broker: LocalBroker, workdir: Path, **extra: str) -> dict[str, str]:
    """A `pipeline` process's environment for the secured broker: no password but the roles' own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "KAFKA_SASL_"))}
    env.update(broker.client_environment())
    env["PIPELINE_KAFKA__CACHE_DIR"] = str(workdir / "cache")
    env["PIPELINE_KAFKA__PARTITIONS"] = "4"
    env.update(extra)
    return env


def _pipeline(env: dict[str, str], *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout_s)


def test_delivery_path_under_sasl_ssl_with_a_principal_per_stage(secure_kafka: LocalBroker, tmp_path: Path) -> None:
    env = secure_kafka.client_environment()
    assert "KAFKA_SASL_PASSWORD" not in env  # no shared password: each process has only its role's
    passwords = [env[f"KAFKA_SASL_PASSWORD_{s.upper()}"] for s in (*PIPELINE_STAGES, "collector", "operator")]
    assert len(set(passwords)) == len(passwords)

    # the ACLs are there already (the broker applied them at start): applying again changes nothing
    again = _pipeline(_env(secure_kafka, tmp_path), "kafka", "acls")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().endswith("already there") and again.stdout.startswith("0 granted"), again.stdout

    host = f"secure-{uuid.uuid4().hex[:6]}"
    stack = Stack(StackSettings(bootstrap=secure_kafka.bootstrap, workdir=tmp_path, sampling_rate=1.0,
                                extra_env={k: v for k, v in _env(secure_kafka, tmp_path).items()
                                           if k.startswith(("PIPELINE_KAFKA__", "KAFKA_SASL_"))}))
    snaps = [snapshot(i, host=host, with_secrets=True) for i in range(6)]
    with stack.start():  # `pipeline topics create` as the operator, then every stage as itself
        # written as the ingest stage writes them, by its principal
        asyncio.run(produce(secure_kafka.access("ingest"), "sessions.idle",
                            [(f"{host}:{s['session_id']}".encode(), encode(s)) for s in snaps]))
        try:
            # the stub panel is this stack's own: everything it accepted came through this path
            wait_for(lambda: len({t["trace_id"] for t in stack.panel_accepted()}) >= 6, 90,
                     what="6 traces accepted by the panel")
        except TimeoutError:
            pytest.fail(stack.logs_tail())
        # every stage of the path committed its input, read back as the operator (what `pipeline lag` does)
        operator = secure_kafka.access("operator")
        for stage in ("sample", "scrub", "sign", "breaker", "deliver"):
            wait_for(lambda stage=stage: sum(asyncio.run(committed(operator, STAGES[stage].app_id)).values()) > 0,
                     30, what=f"{stage} to commit its input")
        # the lag exporter's principal sees every stage's offsets and members and reads no record
        lag = secure_kafka.access("lag")
        report = asyncio.run(collect_lag(lag, [STAGES[s] for s in PIPELINE_STAGES]))
        for stage in ("sample", "scrub", "sign", "breaker", "deliver"):
            row = report.stage(stage)
            assert row.error is None and row.topic_exists and row.members, row
            assert sum(p.committed or 0 for p in row.partitions) > 0, row
        with pytest.raises(TopicAuthorizationFailedError):
            asyncio.run(read_all(lag, "traces.sampled", 1, timeout_s=20))
        for name, proc in stack.procs.items():
            assert proc.alive(), f"{name} exited: {proc.log()[-2000:]}"
            assert "AuthorizationFailed" not in proc.log(), f"{name}: {proc.log()[-2000:]}"
        assert stack.panel_stats()["refused"] == 0


def test_a_wrong_password_is_a_clear_start_up_error(secure_kafka: LocalBroker, tmp_path: Path) -> None:
    # a worker: faust alone would retry the refused login for ever
    env = _env(secure_kafka, tmp_path, KAFKA_SASL_PASSWORD_INGEST=WRONG)
    started = time.monotonic()
    with PipelineProcess(["worker", "ingest"], env, tmp_path, "ingest") as worker:
        assert worker.proc is not None
        code = worker.proc.wait(60)
    took = time.monotonic() - started
    text = worker.log()
    assert code == 1, text[-2000:]
    assert took < 30, f"{took:.0f}s to fail"
    for expected in (secure_kafka.bootstrap, "SASL_SSL", "SCRAM-SHA-512", "pipeline-ingest",
                     "KAFKA_SASL_PASSWORD_INGEST", "refused the credentials"):
        assert expected in text, text[-2000:]
    assert WRONG not in text
    assert "Traceback" not in text

    # an operator command: one line, exit 1
    listed = _pipeline(_env(secure_kafka, tmp_path, KAFKA_SASL_PASSWORD_OPERATOR=WRONG), "topics", "list",
                       timeout_s=30)
    assert listed.returncode == 1, listed.stderr
    line = listed.stderr.strip().splitlines()[-1]
    assert secure_kafka.bootstrap in line and "SCRAM-SHA-512" in line and "KAFKA_SASL_PASSWORD_OPERATOR" in line
    assert WRONG not in listed.stderr + listed.stdout

    # a CA that did not sign the broker's certificate (here: the system's): named as such
    untrusted = dataclasses.replace(secure_kafka.access("operator"), ssl_cafile=None)
    with pytest.raises(BrokerError, match="certificate is not trusted"):
        asyncio.run(check_access(untrusted, timeout_s=10))


def test_a_stage_without_its_write_acl_holds_uncommitted_and_names_the_acl(secure_kafka: LocalBroker,
                                                                           tmp_path: Path) -> None:
    admin, operator = secure_kafka.access("admin"), secure_kafka.access("operator")
    grant = Acl("User:pipeline-passthrough", "TOPIC", "passthrough.out", "WRITE")
    assert _pipeline(_env(secure_kafka, tmp_path), "topics", "create").returncode == 0
    asyncio.run(revoke_acls(admin, [grant]))
    host = f"noacl-{uuid.uuid4().hex[:6]}"
    events = [{"schema": "opencode.event/1", "host": host, "site_key": "pk_test_thirdparty",
               "session_id": f"ses_{i}", "event_id": f"evt_{i}", "type": "session.idle",
               "received_at": 1795236913680 + i, "directory": "/w", "project": "global", "backfill": False,
               "source": "sse", "properties": {"sessionID": f"ses_{i}"}} for i in range(5)]
    # written by the collector's principal, the only one that may
    asyncio.run(produce(secure_kafka.access("collector"), "opencode.events",
                        [(f"{host}:{e['session_id']}".encode(), encode(e)) for e in events]))
    ends = asyncio.run(end_offsets(operator, "opencode.events"))
    group = STAGES["passthrough"].app_id

    def caught_up() -> bool:
        offsets = asyncio.run(committed(operator, group))
        return all(offsets.get(("opencode.events", p), 0) >= end for p, end in ends.items())

    try:
        with PipelineProcess(["worker", "passthrough"], _env(secure_kafka, tmp_path), tmp_path, "passthrough") as w:
            w.wait_for_log(r"User:pipeline-passthrough lacks the ACL to WRITE TOPIC passthrough\.out", 60)
            time.sleep(2.0)  # past a commit interval: nothing of the held batch may be committed
            assert not caught_up(), "the stage committed past records it could not write"
            assert w.alive()

            granted = _pipeline(_env(secure_kafka, tmp_path), "kafka", "acls")
            assert granted.returncode == 0, granted.stderr
            assert f"granted: {grant}" in granted.stdout, granted.stdout

            out = asyncio.run(read_all(admin, "passthrough.out", expect=5, timeout_s=60,
                                       keep=lambda m: json.loads(m.value)["host"] == host))
            wait_for(caught_up, 60, what="the passthrough group to commit to the end of opencode.events")
            time.sleep(1.0)
            out = asyncio.run(read_all(admin, "passthrough.out", expect=10**6, timeout_s=3,
                                       keep=lambda m: json.loads(m.value)["host"] == host))
    finally:
        _pipeline(_env(secure_kafka, tmp_path), "kafka", "acls")  # leave the grant in place for other tests
    assert sorted(r["event_id"] for r in values(out)) == [f"evt_{i}" for i in range(5)]  # each exactly once


def test_only_the_breaker_can_write_the_outbox(secure_kafka: LocalBroker) -> None:
    admin = secure_kafka.access("admin")
    before = asyncio.run(end_offsets(admin, "traces.outbox"))

    # no authentication at all (plain, or TLS without SASL): the listener does not let it in
    with pytest.raises(KafkaConnectionError):
        asyncio.run(forge_outbox(KafkaAccess.plain(secure_kafka.bootstrap)))
    tls_only = KafkaAccess(secure_kafka.bootstrap, security_protocol="SSL",
                           ssl_cafile=str(secure_kafka.security.ca_cert))
    with pytest.raises(KafkaError):
        asyncio.run(forge_outbox(tls_only))
    # authenticated, but a principal with no grant on the outbox (the collector's, the sign stage's)
    for role in ("collector", "sign"):
        with pytest.raises(TopicAuthorizationFailedError):
            asyncio.run(forge_outbox(secure_kafka.access(role)))
    assert asyncio.run(end_offsets(admin, "traces.outbox")) == before
