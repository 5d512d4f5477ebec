"""The pipeline's ACLs, computed from the topic table: each principal gets what it needs and
nothing else."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.kafka import acls as acls_mod
from pipeline.kafka.acls import Acl, by_principal, pipeline_acls
from pipeline.kafka.deadletters import REDRIVE_GROUP
from pipeline.topics import STAGES, TOPICS, changelog_topic, unscrubbed_topics

ACLS = pipeline_acls("pipeline-{role}")
BY = by_principal(ACLS)


def grants(role: str, operation: str, resource: str = "TOPIC") -> set[str]:
    return {a.name for a in BY[f"User:pipeline-{role}"] if a.operation == operation and a.resource == resource}


def test_one_principal_per_stage_the_collector_and_the_operator() -> None:
    assert set(BY) == {f"User:pipeline-{r}" for r in (*STAGES, "collector", "operator", "lag", "replay")}
    assert sorted(set(ACLS)) == ACLS  # sorted, no duplicates
    assert all(a.pattern == "LITERAL" for a in ACLS)  # no prefixes: nothing granted by name likeness


@pytest.mark.parametrize("name", list(STAGES))
def test_a_stage_reads_its_input_writes_its_outputs_and_its_dead_letters(name: str) -> None:
    stage = STAGES[name]
    own = {f"{stage.app_id}-__assignor-__leader"} | ({changelog_topic(name)} if name in ("ingest", "sample") else set())
    assert grants(name, "READ") == {stage.input, *stage.follows, *own}
    assert grants(name, "WRITE") == {*stage.outputs, stage.dead, *own}
    assert grants(name, "CREATE") == own  # faust creates its own topics at start, nothing else
    assert grants(name, "READ", "GROUP") == {stage.app_id}
    assert {a.resource for a in BY[f"User:pipeline-{name}"]} == {"TOPIC", "GROUP"}  # no cluster rights


def test_the_stages_that_follow_shared_state() -> None:
    assert grants("sample", "READ") >= {"sampler.shipped"}
    assert grants("breaker", "READ") >= {"delivery.outcomes"}
    assert grants("deliver", "READ") >= {"delivery.outcomes"}


def test_only_the_breaker_writes_the_outbox_and_only_the_collector_writes_events() -> None:
    writers: dict[str, set[str]] = {}
    for acl in ACLS:
        if acl.operation == "WRITE" and acl.resource == "TOPIC":
            writers.setdefault(acl.name, set()).add(acl.principal)
    assert writers["traces.outbox"] == {"User:pipeline-breaker"}
    # the operator writes a redrive target back (opencode.events is passthrough's and ingest's)
    assert writers["opencode.events"] == {"User:pipeline-collector", "User:pipeline-operator"}
    # scrubbed traces come from the scrub stage, and back from sign.dead by a redrive
    assert writers["traces.scrubbed"] == {"User:pipeline-scrub", "User:pipeline-operator"}
    # sampled traces come from the sample stage, a redrive of scrub.dead, and `pipeline replay`
    assert writers["traces.sampled"] == {"User:pipeline-sample", "User:pipeline-operator", "User:pipeline-replay"}


def test_the_collector_writes_events_and_dead_letters_and_shares_its_tables() -> None:
    assert grants("collector", "WRITE") == {"opencode.events", "collector.dead", "collector.hosts", "collector.state"}
    assert grants("collector", "READ") == {"collector.hosts", "collector.state"}
    assert grants("collector", "READ", "GROUP") == {"panel-pipeline-collector"}


def test_who_reads_unscrubbed_content() -> None:
    readers: dict[str, set[str]] = {}
    for acl in ACLS:
        if acl.operation == "READ" and acl.resource == "TOPIC" and acl.name in unscrubbed_topics():
            readers.setdefault(acl.name, set()).add(acl.principal.removeprefix("User:pipeline-"))
    assert readers["opencode.events"] == {"ingest", "passthrough"}
    assert readers["sessions.idle"] == {"sample", "replay"}  # `pipeline replay` re-decides history
    assert readers["traces.sampled"] == {"scrub", "replay"}
    assert readers["collector.dead"] == {"operator"}  # `pipeline dead list`


def test_the_operator_manages_topics_lag_and_dead_letters() -> None:
    managed = {*TOPICS, changelog_topic("ingest"), changelog_topic("sample")}
    assert grants("operator", "CREATE") == managed
    assert grants("operator", "ALTER_CONFIGS") == managed
    assert grants("operator", "DESCRIBE", "GROUP") == {*(s.app_id for s in STAGES.values()),
                                                        "panel-pipeline-collector"}
    assert grants("operator", "READ", "GROUP") == {REDRIVE_GROUP}
    assert grants("operator", "WRITE") == {"collector.hosts"} | {t.redrive_to for t in TOPICS.values()
                                                                 if t.redrive_to}


def test_the_lag_exporter_describes_the_stages_and_reads_nothing() -> None:
    # a service that runs for ever and answers on the network: offsets and members, no record
    assert {a.operation for a in BY["User:pipeline-lag"]} == {"DESCRIBE"}
    assert grants("lag", "DESCRIBE", "GROUP") == {s.app_id for s in STAGES.values()}
    assert grants("lag", "DESCRIBE") == {s.input for s in STAGES.values()}


def test_wire_codes() -> None:
    acl = Acl("User:a", "TOPIC", "t", "WRITE")
    assert acl.wire() == (2, "t", 3, "User:a", "*", 4, 3)
    assert str(acl) == "User:a may WRITE TOPIC t"


def test_the_stages_use_the_followers_the_table_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Stage.follows` (what the ACLs grant READ on) is what the stages really follow."""
    from agents import runtime
    from agents.registry import build_stage
    from pipeline import config as config_mod

    followed: dict[str, set[str]] = {}
    current: list[str] = []

    def record(app: Any, follower: Any) -> Any:
        followed.setdefault(current[0], set()).add(follower.name)
        return follower

    monkeypatch.setattr(runtime, "follow", record)
    for module in ("agents.sample", "agents.breaker", "agents.deliver"):
        monkeypatch.setattr(f"{module}.follow", record, raising=False)
    cfg = config_mod.load(None, {"PANEL_INGEST_SECRET": "x", "SCRUBBER_JWT_SECRET": "y"})
    for name in STAGES:
        current[:] = [name]
        build_stage(name, cfg)
    for name, stage in STAGES.items():
        assert followed.get(name, set()) == set(stage.follows), name


def test_no_role_placeholder_means_one_principal() -> None:
    assert {a.principal for a in pipeline_acls("pipeline")} == {"User:pipeline"}
    assert acls_mod.principal("svc-{role}", "sign") == "User:svc-sign"
