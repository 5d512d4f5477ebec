"""The pipeline's Kafka ACLs: one principal per role, least privilege, computed from the topic
table (`pipeline/topics.py`) and nothing else. Pure: `pipeline kafka acls` applies the list
(`pipeline.kafka.admin.apply_acls`).

- each stage: READ on its input and on the topics it follows whole (the sampler's window, the
  breaker state), WRITE on its outputs and its dead-letter topic, READ on its consumer group,
  and its own faust topics (`<app id>-<table>-changelog`, `<app id>-__assignor-__leader`), which
  faust creates at start (CREATE), reads at recovery and writes;
- the collector: WRITE on `opencode.events` and `collector.dead`, READ and WRITE on the host
  table and the per-host state it shares with its replicas (`collector.hosts`,
  `collector.state`), READ on its consumer group;
- the operator (`pipeline topics|lag|dead|hosts`): create and configure the table's topics and
  the changelogs, describe the stages' groups (lag), read the dead letters (unscrubbed up to the
  scrub stage) and write them back to their redrive targets, and edit the host table;
- the lag exporter (`pipeline lag --serve`, a service that runs for ever and answers on the
  network): DESCRIBE the stages' groups and input topics (committed and end offsets, members),
  nothing it could read a record or write with;
- the admin (`pipeline kafka acls`) gets nothing here: it is whoever may change ACLs (a super
  user, or ALTER on the cluster).

A principal is `User:<name>` with the name from `[kafka] sasl_username`, whose `{role}` is the
role (`pipeline-{role}` -> `User:pipeline-sign`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pipeline.kafka.security import COLLECTOR, LAG, OPERATOR, REPLAY
from pipeline.topics import COLLECTOR_GROUP, STAGES, TABLES, TOPICS, Stage, changelog_topic, dead_letter_topics

# Kafka's wire codes (org.apache.kafka.common.resource.ResourceType, acl.AclOperation, ...)
RESOURCE_TYPES = {"TOPIC": 2, "GROUP": 3, "CLUSTER": 4, "TRANSACTIONAL_ID": 5}
PATTERN_TYPES = {"LITERAL": 3, "PREFIXED": 4}
OPERATIONS = {"ALL": 2, "READ": 3, "WRITE": 4, "CREATE": 5, "DELETE": 6, "ALTER": 7, "DESCRIBE": 8,
              "CLUSTER_ACTION": 9, "DESCRIBE_CONFIGS": 10, "ALTER_CONFIGS": 11, "IDEMPOTENT_WRITE": 12}
ALLOW = 3
ANY_HOST = "*"
CLUSTER = "kafka-cluster"

REDRIVE_GROUP = "panel-pipeline-redrive"  # pipeline dead redrive --all (pipeline/kafka/deadletters.py)


@dataclass(frozen=True, order=True)
class Acl:
    """One ALLOW rule: `principal` may `operation` the `resource` named `name` from any host."""

    principal: str
    resource: str  # TOPIC, GROUP, CLUSTER, TRANSACTIONAL_ID
    name: str
    operation: str  # READ, WRITE, DESCRIBE, CREATE, ...
    pattern: str = "LITERAL"

    def __str__(self) -> str:
        what = f"{self.resource} {self.name}" + (" (prefix)" if self.pattern == "PREFIXED" else "")
        return f"{self.principal} may {self.operation} {what}"

    def wire(self) -> tuple[int, str, int, str, str, int, int]:
        """As CreateAcls sends it: resource type, name, pattern type, principal, host, operation, ALLOW."""
        return (RESOURCE_TYPES[self.resource], self.name, PATTERN_TYPES[self.pattern], self.principal, ANY_HOST,
                OPERATIONS[self.operation], ALLOW)


def principal(template: str, role: str) -> str:
    """`User:<name>`: the SASL user `[kafka] sasl_username` gives `role`."""
    return f"User:{template.format(role=role)}"


def faust_topics(stage: Stage) -> list[str]:
    """The topics faust makes for a stage of its own: its tables' changelogs and the leader
    assignor's topic (`<app id>-__assignor-__leader`, created at start by every faust app)."""
    own = [f"{stage.app_id}-__assignor-__leader"]
    if stage.name in TABLES:
        own.append(changelog_topic(stage.name))
    return own


def stage_acls(stage: Stage, who: str) -> list[Acl]:
    acls = [Acl(who, "TOPIC", stage.input, "READ"), Acl(who, "GROUP", stage.app_id, "READ")]
    acls += [Acl(who, "TOPIC", name, "READ") for name in stage.follows]
    acls += [Acl(who, "TOPIC", name, "WRITE") for name in (*stage.outputs, stage.dead)]
    for name in faust_topics(stage):
        acls += [Acl(who, "TOPIC", name, op) for op in ("CREATE", "READ", "WRITE")]
    return acls


def collector_acls(who: str) -> list[Acl]:
    return [
        Acl(who, "TOPIC", "opencode.events", "WRITE"), Acl(who, "TOPIC", "collector.dead", "WRITE"),
        *(Acl(who, "TOPIC", name, op) for name in ("collector.hosts", "collector.state") for op in ("READ", "WRITE")),
        Acl(who, "GROUP", COLLECTOR_GROUP, "READ"),
    ]


def operator_acls(who: str, stages: Iterable[Stage]) -> list[Acl]:
    stages = list(stages)
    managed = [*TOPICS, *(changelog_topic(s) for s in TABLES)]
    acls = [Acl(who, "TOPIC", name, op) for name in managed for op in ("CREATE", "DESCRIBE", "ALTER_CONFIGS")]
    # lag: every stage's group and input; the collector's group
    acls += [Acl(who, "GROUP", group, "DESCRIBE") for group in (*(s.app_id for s in stages), COLLECTOR_GROUP)]
    # dead list / redrive: read every dead-letter topic, write back where the table says, track --all
    acls += [Acl(who, "TOPIC", name, "READ") for name in dead_letter_topics()]
    acls += [Acl(who, "TOPIC", target, "WRITE")
             for target in sorted({t.redrive_to for t in TOPICS.values() if t.redrive_to})]
    acls.append(Acl(who, "GROUP", REDRIVE_GROUP, "READ"))
    # hosts list/add/remove
    acls += [Acl(who, "TOPIC", "collector.hosts", op) for op in ("READ", "WRITE")]
    # budget: the forwards of the last hour (signatures and ids, no session content)
    acls.append(Acl(who, "TOPIC", "sampler.shipped", "READ"))
    return acls


def lag_acls(who: str, stages: Iterable[Stage]) -> list[Acl]:
    stages = list(stages)
    return [*(Acl(who, "GROUP", s.app_id, "DESCRIBE") for s in stages),
            *(Acl(who, "TOPIC", name, "DESCRIBE") for name in sorted({s.input for s in stages}))]


def replay_acls(who: str) -> list[Acl]:
    """`pipeline replay`: read the turns and what was forwarded, write re-decided traces. No group:
    it reads by time and commits nothing."""
    acls = [Acl(who, "TOPIC", name, "READ") for name in ("sessions.idle", "sampler.shipped", "traces.sampled")]
    return [*acls, Acl(who, "TOPIC", "traces.sampled", "WRITE")]


def pipeline_acls(template: str, stages: Mapping[str, Stage] | None = None) -> list[Acl]:
    """Every ACL of the pipeline's principals (`template` is `[kafka] sasl_username`), sorted,
    without duplicates."""
    stages = STAGES if stages is None else stages
    acls: list[Acl] = []
    for stage in stages.values():
        acls += stage_acls(stage, principal(template, stage.name))
    acls += collector_acls(principal(template, COLLECTOR))
    acls += operator_acls(principal(template, OPERATOR), stages.values())
    acls += lag_acls(principal(template, LAG), stages.values())
    acls += replay_acls(principal(template, REPLAY))
    return sorted(set(acls))


def by_principal(acls: Iterable[Acl]) -> dict[str, list[Acl]]:
    out: dict[str, list[Acl]] = {}
    for acl in acls:
        out.setdefault(acl.principal, []).append(acl)
    return out
