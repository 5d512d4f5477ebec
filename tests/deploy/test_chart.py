"""The Helm chart (deploy/helm/opencode-panel-pipeline), checked without a cluster.

tools/chartcheck renders it with Helm's own library (values.schema.json included, as `helm
template` does) and decodes every object strictly into the Kubernetes, KEDA and Strimzi types;
here its summary is held against the topic table and the stages, and the rendered pipeline.toml
files against the config loader.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import config as config_mod
from pipeline.cli.main import parser
from pipeline.config import kafka_password_variable
from pipeline.kafka.acls import pipeline_acls, principal
from pipeline.kafka.security import COLLECTOR, LAG
from pipeline.topics import PIPELINE_STAGES, STAGES, TOPICS, partitions_of, topic_table
from tests.fixtures import REPO

pytestmark = pytest.mark.deploy

CHART = REPO / "deploy" / "helm" / "opencode-panel-pipeline"
PRODUCTION = CHART / "ci" / "production-values.yaml"
TOOL = REPO / "tools" / "chartcheck"
GO_FALLBACK = Path("/usr/local/go/bin/go")
EXPORTER = "panel-opencode-panel-pipeline-lag-exporter"  # `pipeline lag --serve`: its Deployment and Service
NOT_STAGES = ("collector", "lag-exporter")  # the components of the Deployments that run no stage


def _go() -> str | None:
    return shutil.which("go") or (str(GO_FALLBACK) if GO_FALLBACK.exists() else None)


@pytest.fixture(scope="session")
def chartcheck() -> Path:
    """tools/chartcheck built into the cache dir (rebuilt when its sources are newer)."""
    built = config_mod.DEFAULT_CACHE_DIR / "chartcheck"
    sources = [TOOL / "main.go", TOOL / "go.mod", TOOL / "go.sum"]
    stale = not built.exists() or built.stat().st_mtime < max(s.stat().st_mtime for s in sources)
    go = _go()
    if stale and go is None:
        pytest.skip("Go is not installed (needed to build tools/chartcheck, the chart's validator)")
    if stale:
        built.parent.mkdir(parents=True, exist_ok=True)
        build = subprocess.run([go, "build", "-o", str(built), "."], cwd=TOOL,  # type: ignore[list-item]
                               env={**os.environ, "GOFLAGS": "-mod=readonly"}, capture_output=True, text=True,
                               timeout=1200)
        if build.returncode != 0:
            pytest.fail(f"building tools/chartcheck failed:\n{build.stderr[-3000:]}")
    return built


def render(tool: Path, *values: Path, chart: Path = CHART) -> subprocess.CompletedProcess[str]:
    flags = [arg for v in values for arg in ("-f", str(v))]
    return subprocess.run([str(tool), *flags, "-namespace", "pipeline", "-release", "panel", str(chart)],
                          capture_output=True, text=True, timeout=120)


def summary(tool: Path, *values: Path) -> dict[str, Any]:
    proc = render(tool, *values)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def of_kind(doc: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {o["name"]: o["object"] for o in doc["objects"] if o["kind"] == kind}


def values_of(*files: Path) -> dict[str, Any]:
    """The merged values (a shallow-enough merge for these files: maps merge, the rest replaces)."""
    def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return out
    merged: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    for f in files:
        merged = merge(merged, yaml.safe_load(f.read_text()))
    return merged


def write(tmp_path: Path, name: str, doc: Any) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    return path


def stage_of(deployment: dict[str, Any]) -> str:
    return deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    [c] = deployment["spec"]["template"]["spec"]["containers"]
    return c


@functools.cache
def cli() -> Any:
    return parser()


def role_of(deployment: dict[str, Any]) -> str:
    """The Kafka role (pipeline/kafka/security.py) the pod's `pipeline` command connects as, from its
    args parsed by the real CLI parser: a stage's worker as the stage, `collect` as the collector,
    `lag --serve` as the lag exporter's `lag`."""
    args = cli().parse_args(container(deployment)["args"])
    if args.command == "worker":
        return str(args.stage)
    if args.command == "collect":
        return COLLECTOR
    assert args.command == "lag" and args.serve, args
    return LAG


def assert_stages(doc: dict[str, Any], values: dict[str, Any]) -> None:
    deployments = of_kind(doc, "Deployment")
    by_stage = {stage_of(d): (name, d) for name, d in deployments.items() if stage_of(d) not in NOT_STAGES}
    assert set(by_stage) == set(PIPELINE_STAGES)
    scaled = {so["spec"]["scaleTargetRef"]["name"]: so for so in of_kind(doc, "ScaledObject").values()}
    pdbs = of_kind(doc, "PodDisruptionBudget")
    default_partitions = values["kafka"]["partitions"]
    for stage in PIPELINE_STAGES:
        name, deployment = by_stage[stage]
        assert container(deployment)["args"] == ["--log-format", "json", "worker", stage, "--metrics-port", "9100"]
        # KEDA: one ScaledObject per stage, on its consumer group and its input topic
        so = scaled.pop(name)
        assert so["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        [trigger] = so["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "kafka"
        assert meta["consumerGroup"] == STAGES[stage].app_id
        assert meta["topic"] == STAGES[stage].input
        assert meta["bootstrapServers"] == values["kafka"]["bootstrapServers"]
        stage_values = values["stages"][stage]
        assert int(meta["lagThreshold"]) == stage_values["lagThreshold"]
        partitions = partitions_of(TOPICS[STAGES[stage].input], default_partitions)
        assert so["spec"]["maxReplicaCount"] == stage_values.get("maxReplicas", partitions) <= partitions
        assert so["spec"]["minReplicaCount"] == stage_values["minReplicas"]
        assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
        # a PDB selecting exactly this stage's pods
        selector = pdbs[name]["spec"]["selector"]["matchLabels"]
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items() and selector["app.kubernetes.io/component"] == stage
    assert not scaled, f"ScaledObjects for no stage: {sorted(scaled)}"


def assert_pods(doc: dict[str, Any]) -> None:
    for name, deployment in of_kind(doc, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        c = container(deployment)
        assert c["ports"] == [{"name": "metrics", "containerPort": 9100, "protocol": "TCP"}], name
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, (name, probe)
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], name
        assert c["args"][:2] == ["--log-format", "json"], (name, c["args"])  # logs for the cluster's shipper
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/var/lib/pipeline"]], name
        assert "configMap" in volumes[mounts["/etc/pipeline"]], name
        # secrets only by reference: the only literal env values are the two paths
        for env in c.get("env", []):
            assert "valueFrom" in env or env["name"] in {"PIPELINE_CONFIG", "PIPELINE_KAFKA__CACHE_DIR"}, env
        for source in c.get("envFrom", []):
            assert set(source) == {"secretRef"}


def config_text(doc: dict[str, Any], key: str) -> str:
    return of_kind(doc, "ConfigMap")["panel-opencode-panel-pipeline-config"]["data"][key]


def load_config(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> config_mod.Config:
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return config_mod.load(path, env=env or {})


# --- the topic table has one source -----------------------------------------------------------

def test_files_topics_json_is_the_topic_table() -> None:
    shipped = json.loads((CHART / "files" / "topics.json").read_text())
    assert shipped == json.loads(json.dumps(topic_table())), (
        "deploy/helm/opencode-panel-pipeline/files/topics.json is stale: regenerate it with "
        "`python -m pipeline.topics > deploy/helm/opencode-panel-pipeline/files/topics.json`")
    assert {row["name"] for row in shipped} >= set(TOPICS)


def test_python_m_pipeline_topics_prints_the_table() -> None:
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-m", "pipeline.topics"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads((CHART / "files" / "topics.json").read_text())


# --- rendering ---------------------------------------------------------------------------------

def test_default_values_render_a_stage_deployment_scaledobject_and_pdb_each(chartcheck: Path, tmp_path: Path) -> None:
    doc = summary(chartcheck)
    values = values_of()
    assert_stages(doc, values)
    assert_pods(doc)
    # no hosts by default: no collector, and NOTES say how to add them
    assert not [d for d in of_kind(doc, "Deployment").values() if stage_of(d) == "collector"]
    assert "hosts` is empty" in doc["notes"]
    # topics: the hook Job (`pipeline topics create`), not Strimzi
    assert not of_kind(doc, "KafkaTopic")
    [job] = of_kind(doc, "Job").values()
    assert container(job)["args"] == ["--log-format", "json", "topics", "create"]
    assert {o["kind"] for o in doc["objects"] if o["hook"]} == {"Job", "ConfigMap"}
    # the stages' pipeline.toml is a valid config with the chart's kafka and metrics settings, no hosts
    cfg = load_config(tmp_path, config_text(doc, "pipeline.toml"))
    assert cfg.kafka.bootstrap == values["kafka"]["bootstrapServers"]
    assert cfg.kafka.partitions == values["kafka"]["partitions"] and cfg.metrics.port == 9100
    assert cfg.hosts == () and cfg.lru_size == 10000 and cfg.max_messages == 25


def test_production_values_run_one_collector_deployment_sharing_the_hosts(chartcheck: Path, tmp_path: Path) -> None:
    doc = summary(chartcheck, PRODUCTION)
    values = values_of(PRODUCTION)
    assert_stages(doc, values)
    assert_pods(doc)
    deployments = of_kind(doc, "Deployment")
    collectors = {n: d for n, d in deployments.items() if stage_of(d) == "collector"}
    assert list(collectors) == ["panel-opencode-panel-pipeline-collector"]
    assert len(deployments) == len(PIPELINE_STAGES) + 2  # the stages, the collector and the lag exporter
    passwords = {h["password_env"]: "pw" for h in values["hosts"]}
    deployment = collectors["panel-opencode-panel-pipeline-collector"]
    # replicas share the hosts through the consumer group: several at once, rolled, no volume
    assert deployment["spec"]["replicas"] == values["collector"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert container(deployment)["args"] == ["--log-format", "json", "collect", "--metrics-port", "9100"]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert not [v for v in volumes if "persistentVolumeClaim" in v] and not of_kind(doc, "PersistentVolumeClaim")
    assert "state" not in {v["name"] for v in volumes}
    [config_volume] = [v for v in volumes if v["name"] == "config"]
    [item] = config_volume["configMap"]["items"]
    cfg = load_config(tmp_path, config_text(doc, item["key"]), passwords)
    assert [h.name for h in cfg.hosts] == [h["name"] for h in values["hosts"]], "every host, seeded by every replica"
    assert cfg.collector.state_dir is None, "the state is in collector.state, not on a disk"
    assert cfg.kafka.unscrubbed_retention_hours == 72 and cfg.lru_size == 20000
    # a host with passwordSecret gets exactly its own secretKeyRef (every replica may follow it)
    pool = container(deployment)
    assert {"name": "OPENCODE_PASSWORD_POOL",
            "valueFrom": {"secretKeyRef": {"name": "pool-daemon", "key": "password"}}} in pool["env"]
    # one principal per stage: its own password from its Strimzi KafkaUser Secret, and the cluster CA
    scrub = container(deployments["panel-opencode-panel-pipeline-scrub"])
    assert scrub["envFrom"] == [{"secretRef": {"name": "pipeline-scrubber"}}]
    assert kafka_passwords(scrub) == {"KAFKA_SASL_PASSWORD_SCRUB": ("pipeline-scrub", "password")}
    assert cfg.kafka.security_protocol == "SASL_SSL" and cfg.kafka.sasl_username == "pipeline-{role}"
    for so in of_kind(doc, "ScaledObject").values():
        assert so["spec"]["triggers"][0]["authenticationRef"] == {"name": "pipeline-kafka-lag",
                                                                  "kind": "ClusterTriggerAuthentication"}
    assert not of_kind(doc, "Job"), "Strimzi owns the topics: no topics Job"


def test_strimzi_kafkatopics_are_the_topic_table(chartcheck: Path) -> None:
    doc = summary(chartcheck, PRODUCTION)
    values = values_of(PRODUCTION)
    topics = of_kind(doc, "KafkaTopic")
    table = {row["name"]: row for row in topic_table()}
    assert set(topics) == set(table)
    cap_ms = 72 * 3600 * 1000
    for name, topic in topics.items():
        row = table[name]
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == "panel-kafka"
        assert topic["metadata"]["namespace"] == "kafka"
        spec = topic["spec"]
        assert spec["topicName"] == name and spec["replicas"] == 3
        assert spec["partitions"] == (row["partitions"] or values["kafka"]["partitions"])
        wanted = dict(row["configs"])
        if row["unscrubbed"]:
            wanted["retention.ms"] = str(min(int(row["retention_ms"]), cap_ms))
        assert spec["config"] == wanted, name
    assert topics["opencode.events"]["spec"]["config"]["retention.ms"] == str(cap_ms)
    assert topics["sampler.shipped"]["spec"]["partitions"] == 1
    assert topics["sampler.shipped"]["spec"]["config"]["cleanup.policy"] == "compact,delete"


# --- Kafka security -------------------------------------------------------------------------------

SECURE = {
    "kafka": {"security": {"protocol": "SASL_SSL", "saslMechanism": "SCRAM-SHA-512",
                           "usernameTemplate": "pipeline-{role}",
                           "passwordSecret": {"name": "pipeline-kafka-passwords", "key": "{role}"},
                           "ca": {"secret": "panel-kafka-cluster-ca-cert", "configMap": "", "key": "ca.crt"},
                           "clientCert": {"secret": "pipeline-client-tls", "certKey": "tls.crt", "keyKey": "tls.key"},
                           "checkHostname": True}},
    "topicsJob": {"acls": True},
    "hosts": [{"name": "a", "base_url": "https://a.example:4096"}],
}


def kafka_passwords(c: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """KAFKA_SASL_PASSWORD* variables of a container -> (Secret, key) they come from."""
    return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in c.get("env", []) if e["name"].startswith("KAFKA_SASL_PASSWORD")}


def mounted_at(pod: dict[str, Any], c: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume mounted at the directory of `path` (a file the config names)."""
    [mount] = [m for m in c["volumeMounts"] if m["mountPath"] == str(Path(path).parent)]
    assert mount.get("readOnly") is True, mount
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return volume


def test_kafka_security_reaches_every_pod_each_with_its_own_password(chartcheck: Path, tmp_path: Path) -> None:
    doc = summary(chartcheck, write(tmp_path, "secure.yaml", SECURE))
    assert_pods(doc)
    # the config every pod loads: SASL_SSL, a principal per role, the CA and client certificate files
    cfg = load_config(tmp_path, config_text(doc, "pipeline.toml"))
    k = cfg.kafka
    assert (k.security_protocol, k.sasl_mechanism, k.sasl_username) == ("SASL_SSL", "SCRAM-SHA-512", "pipeline-{role}")
    assert k.ssl_cafile and k.ssl_certfile and k.ssl_keyfile and k.ssl_check_hostname is True
    collector_cfg = load_config(tmp_path, config_text(doc, "collector.toml"))
    assert collector_cfg.kafka.ssl_cafile == k.ssl_cafile and collector_cfg.kafka.sasl_username == k.sasl_username
    by_role = {role_of(d): d for d in of_kind(doc, "Deployment").values()}
    assert set(by_role) == {*PIPELINE_STAGES, COLLECTOR, LAG}
    for role, deployment in by_role.items():
        pod = deployment["spec"]["template"]["spec"]
        c = container(deployment)
        # its own role's password and no other, from the Secret named, by reference only
        assert kafka_passwords(c) == {f"KAFKA_SASL_PASSWORD_{role.upper()}": ("pipeline-kafka-passwords", role)}, role
        [ca] = mounted_at(pod, c, k.ssl_cafile)["projected"]["sources"]
        assert ca == {"secret": {"name": "panel-kafka-cluster-ca-cert",
                                 "items": [{"key": "ca.crt", "path": Path(k.ssl_cafile).name}]}}
        client = mounted_at(pod, c, k.ssl_certfile)
        assert client == mounted_at(pod, c, k.ssl_keyfile) and client["secret"]["secretName"] == "pipeline-client-tls"
        assert {i["path"] for i in client["secret"]["items"]} == {Path(k.ssl_certfile).name, Path(k.ssl_keyfile).name}
        assert client["secret"]["defaultMode"] == 0o440, "the key readable by the pod's group only"
    # the topics Job: `kafka acls` as the admin first, then `topics create` as the operator
    [job] = of_kind(doc, "Job").values()
    pod = job["spec"]["template"]["spec"]
    [acls] = pod["initContainers"]
    [topics] = pod["containers"]
    assert acls["args"] == ["--log-format", "json", "kafka", "acls"]
    assert kafka_passwords(acls) == {"KAFKA_SASL_PASSWORD_ADMIN": ("pipeline-kafka-passwords", "admin")}
    assert topics["args"] == ["--log-format", "json", "topics", "create"]
    assert kafka_passwords(topics) == {"KAFKA_SASL_PASSWORD_OPERATOR": ("pipeline-kafka-passwords", "operator")}
    for c in (acls, topics):
        [ca] = mounted_at(pod, c, k.ssl_cafile)["projected"]["sources"]
        assert ca["secret"]["name"] == "panel-kafka-cluster-ca-cert"
    # KEDA logs in as each stage's principal, through a TriggerAuthentication the chart renders
    auths = of_kind(doc, "TriggerAuthentication")
    users = of_kind(doc, "ConfigMap")["panel-opencode-panel-pipeline-kafka-users"]["data"]
    for so in of_kind(doc, "ScaledObject").values():
        [trigger] = so["spec"]["triggers"]
        stage = trigger["metadata"]["consumerGroup"].removeprefix("panel-pipeline-")
        assert (trigger["metadata"]["sasl"], trigger["metadata"]["tls"]) == ("scram_sha512", "enable")
        ref = trigger["authenticationRef"]
        assert ref["kind"] == "TriggerAuthentication"
        spec = auths[ref["name"]]["spec"]
        secrets = {r["parameter"]: (r["name"], r["key"]) for r in spec["secretTargetRef"]}
        assert secrets == {"password": ("pipeline-kafka-passwords", stage),
                           "ca": ("panel-kafka-cluster-ca-cert", "ca.crt"),
                           "cert": ("pipeline-client-tls", "tls.crt"), "key": ("pipeline-client-tls", "tls.key")}
        [username] = spec["configMapTargetRef"]
        assert username["parameter"] == "username" and users[username["key"]] == f"pipeline-{stage}"
    assert len(auths) == len(PIPELINE_STAGES)


def test_kafka_security_per_role_secrets_and_a_ca_from_a_configmap(chartcheck: Path, tmp_path: Path) -> None:
    # Strimzi's KafkaUser Secrets (one per user, key `password`); SASL without a client certificate
    values = {"kafka": {"security": {**SECURE["kafka"]["security"],
                                     "passwordSecret": {"name": "pipeline-{role}", "key": "password"},
                                     "ca": {"secret": "", "configMap": "kafka-ca", "key": "ca.pem"},
                                     "clientCert": {"secret": "", "certKey": "tls.crt", "keyKey": "tls.key"}}}}
    doc = summary(chartcheck, write(tmp_path, "v.yaml", values))
    assert_pods(doc)
    cfg = load_config(tmp_path, config_text(doc, "pipeline.toml"))
    assert cfg.kafka.ssl_cafile and not cfg.kafka.ssl_certfile
    for d in of_kind(doc, "Deployment").values():
        role = role_of(d)
        c = container(d)
        assert kafka_passwords(c) == {f"KAFKA_SASL_PASSWORD_{role.upper()}": (f"pipeline-{role}", "password")}
        [ca] = mounted_at(d["spec"]["template"]["spec"], c, cfg.kafka.ssl_cafile)["projected"]["sources"]
        assert ca == {"configMap": {"name": "kafka-ca", "items": [{"key": "ca.pem", "path": "ca.crt"}]}}
    for auth in of_kind(doc, "TriggerAuthentication").values():
        refs = {r["parameter"]: r["name"] for r in auth["spec"]["configMapTargetRef"]}
        assert refs["ca"] == "kafka-ca" and "cert" not in {r["parameter"] for r in auth["spec"]["secretTargetRef"]}
    # the topics Job without acls: `topics create` alone, as the operator
    [job] = of_kind(doc, "Job").values()
    assert "initContainers" not in job["spec"]["template"]["spec"]
    assert kafka_passwords(container(job)) == {"KAFKA_SASL_PASSWORD_OPERATOR": ("pipeline-operator", "password")}


def test_plaintext_default_has_no_kafka_credentials(chartcheck: Path, tmp_path: Path) -> None:
    doc = summary(chartcheck)
    cfg = load_config(tmp_path, config_text(doc, "pipeline.toml"))
    assert cfg.kafka.security_protocol == "PLAINTEXT" and not cfg.kafka.ssl_cafile
    assert not of_kind(doc, "TriggerAuthentication")
    for d in [*of_kind(doc, "Deployment").values(), *of_kind(doc, "Job").values()]:
        assert kafka_passwords(container(d)) == {}
        assert not [m for m in container(d)["volumeMounts"] if m["name"].startswith("kafka-")]
    for so in of_kind(doc, "ScaledObject").values():
        assert "sasl" not in so["spec"]["triggers"][0]["metadata"]
        assert "authenticationRef" not in so["spec"]["triggers"][0]


@pytest.mark.parametrize(("security", "extra", "message"), [
    ({"protocol": "SASL_TLS"}, {}, "protocol"),  # not a protocol (schema)
    ({"saslMechanism": "SCRAM-SHA-1"}, {}, "saslMechanism"),
    ({"usernameTemplate": "pipeline-{stage}"}, {}, "usernameTemplate"),  # {role} is the only placeholder
    ({"passwordSecret": {"name": "pipeline-kafka-passwords", "key": "{role}", "value": "hunter2"}}, {},
     "value"),  # a password value has no place in the values
    ({"ca": {"secret": "Not_A_Name", "configMap": "", "key": "ca.crt"}}, {}, "secret"),
    ({"checkHostname": "yes"}, {}, "checkHostname"),
    ({"passwordSecret": {"name": "", "key": "{role}"}}, {}, "needs kafka.security.passwordSecret.name"),
    ({"protocol": "SASL_PLAINTEXT", "saslMechanism": "PLAIN", "ca": {"secret": "", "configMap": "", "key": "ca.crt"},
      "clientCert": {"secret": "", "certKey": "tls.crt", "keyKey": "tls.key"}}, {}, "in the clear"),
    ({"protocol": "PLAINTEXT"}, {"topicsJob": {"acls": False}}, "are for TLS"),
    ({"ca": {"secret": "a", "configMap": "b", "key": "ca.crt"}}, {}, "not both"),
    ({"protocol": "PLAINTEXT", "ca": {"secret": "", "configMap": "", "key": "ca.crt"},
      "clientCert": {"secret": "", "certKey": "tls.crt", "keyKey": "tls.key"}}, {}, "acls grants ACLs to SASL"),
    ({"usernameTemplate": "pipeline"}, {}, "same principal"),
])
def test_broken_kafka_security_values_are_refused(chartcheck: Path, tmp_path: Path, security: dict[str, Any],
                                                  extra: dict[str, Any], message: str) -> None:
    values = {**SECURE, **extra, "kafka": {"security": {**SECURE["kafka"]["security"], **security}}}
    if extra.get("topicsJob"):
        values["topicsJob"] = extra["topicsJob"]
    err = refused(chartcheck, tmp_path, values)
    assert message in err, err


def test_the_chart_sets_the_kafka_security_keys_itself(chartcheck: Path, tmp_path: Path) -> None:
    for key in ("security_protocol", "sasl_username", "ssl_cafile"):
        err = refused(chartcheck, tmp_path, {"config": {"kafka": {key: "x"}}})
        assert "/config/kafka" in err, err


# --- the lag exporter ----------------------------------------------------------------------------

def assert_lag_exporter(doc: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """`pipeline lag --serve` as `values` say, a pod like the stages' behind its own Service; returns
    its container."""
    deployments = of_kind(doc, "Deployment")
    deployment = deployments[EXPORTER]
    stage = deployments["panel-opencode-panel-pipeline-ingest"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["metadata"]["labels"]["app.kubernetes.io/component"] == stage_of(deployment) == "lag-exporter"
    assert labels["app.kubernetes.io/instance"] == "panel"
    assert deployment["spec"]["replicas"] == 1
    c = container(deployment)
    interval = values["lagExporter"]["interval"]
    assert c["args"] == ["--log-format", "json", "lag", "--serve", "--metrics-port", "9100",
                         "--interval", f"{interval:g}"]
    args = cli().parse_args(c["args"])  # what the CLI makes of them
    assert (args.command, args.serve, args.metrics_port, args.interval) == ("lag", True, 9100, float(interval))
    assert role_of(deployment) == LAG
    # the stages' image, security contexts, scheduling and config, restarted when pipeline.toml changes
    pod, stage_pod = deployment["spec"]["template"]["spec"], stage["spec"]["template"]["spec"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/config"]), annotations
    assert annotations["checksum/config"] == stage["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert (annotations["prometheus.io/scrape"], annotations["prometheus.io/port"]) == ("true", "9100")
    assert c["image"] == container(stage)["image"]
    assert c["securityContext"] == container(stage)["securityContext"]
    for key in ("securityContext", "nodeSelector", "tolerations", "imagePullSecrets", "automountServiceAccountToken"):
        assert pod.get(key) == stage_pod.get(key), key
    volume = {v["name"]: v for v in pod["volumes"]}
    assert volume["config"] == {v["name"]: v for v in stage_pod["volumes"]}["config"]
    assert volume["config"]["configMap"]["items"] == [{"key": "pipeline.toml", "path": "pipeline.toml"}]
    assert c["resources"] == values["lagExporter"]["resources"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe
    # no panel, scrubber or host secret: the paths, its own Kafka password (if any), the Kafka client Secret
    assert {e["name"] for e in c["env"]} == {"PIPELINE_CONFIG", "PIPELINE_KAFKA__CACHE_DIR", *kafka_passwords(c)}
    assert [s["secretRef"]["name"] for s in c.get("envFrom", [])] == [
        name for name in [values["kafka"]["credentialsSecret"]] if name]
    # a ClusterIP Service on the metrics port, selecting the exporter's pod and no other
    service = of_kind(doc, "Service")[EXPORTER]
    assert service["metadata"]["labels"]["app.kubernetes.io/component"] == "lag-exporter"
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9100, "targetPort": "metrics", "protocol": "TCP"}]
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in c["ports"]
    selector = service["spec"]["selector"]
    assert [name for name, d in deployments.items()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()] == [EXPORTER]
    assert f"{EXPORTER}.pipeline.svc:9100" in doc["notes"]
    return c


@pytest.mark.parametrize(("files", "passwords"), [
    ((), {}),
    ((PRODUCTION,), {"KAFKA_SASL_PASSWORD_LAG": ("pipeline-lag", "password")}),  # Strimzi's KafkaUser pipeline-lag
], ids=["default", "production"])
def test_lag_exporter_serves_every_stage_lag_behind_its_service(chartcheck: Path, files: tuple[Path, ...],
                                                               passwords: dict[str, tuple[str, str]]) -> None:
    doc = summary(chartcheck, *files)
    c = assert_lag_exporter(doc, values_of(*files))
    assert kafka_passwords(c) == passwords


def test_lag_exporter_gets_only_the_lag_role_password_the_acls_grant(chartcheck: Path, tmp_path: Path) -> None:
    secure = write(tmp_path, "secure.yaml", SECURE)
    doc = summary(chartcheck, secure)
    c = assert_lag_exporter(doc, values_of(secure))
    assert kafka_passwords(c) == {"KAFKA_SASL_PASSWORD_LAG": ("pipeline-kafka-passwords", "lag")}
    # that variable is the one `lag --serve` (the lag role) looks up, and it is enough
    env = {name: "pw" for name in kafka_passwords(c)}
    cfg = load_config(tmp_path, config_text(doc, "pipeline.toml"), env)
    assert cfg.kafka_sasl_password(LAG)[0] == kafka_password_variable(LAG)
    # its principal is one `pipeline kafka acls` grants to: describe every deployed stage's group and
    # input, nothing it could read or write a record with
    who = principal(cfg.kafka.sasl_username, LAG)
    assert who == "User:pipeline-lag"
    granted = {(a.resource, a.name, a.operation) for a in pipeline_acls(cfg.kafka.sasl_username) if a.principal == who}
    assert granted >= {*(("GROUP", STAGES[s].app_id, "DESCRIBE") for s in PIPELINE_STAGES),
                       *(("TOPIC", STAGES[s].input, "DESCRIBE") for s in PIPELINE_STAGES)}
    assert {op for _, _, op in granted} == {"DESCRIBE"}
    # TLS like every pod: the CA and the client certificate the config names
    pod = of_kind(doc, "Deployment")[EXPORTER]["spec"]["template"]["spec"]
    assert mounted_at(pod, c, cfg.kafka.ssl_cafile)["projected"]["sources"][0]["secret"]["name"] == (
        "panel-kafka-cluster-ca-cert")
    assert mounted_at(pod, c, cfg.kafka.ssl_certfile)["secret"]["secretName"] == "pipeline-client-tls"
    # NOTES name the lag role among the passwords the Secret must hold
    assert "({role}: ingest ... deliver, collector, lag," in doc["notes"], doc["notes"]


def test_lag_exporter_enabled_false_removes_it(chartcheck: Path, tmp_path: Path) -> None:
    doc = summary(chartcheck, write(tmp_path, "off.yaml", {"lagExporter": {"enabled": False}}))
    assert not [(o["kind"], o["name"]) for o in doc["objects"] if "lag-exporter" in o["name"]]
    assert EXPORTER not in of_kind(doc, "Deployment") and EXPORTER not in of_kind(doc, "Service")
    assert_stages(doc, values_of())
    assert "Lag exporter: off" in doc["notes"]
    # on (the default), with the interval given: seconds, not necessarily whole
    doc = summary(chartcheck, write(tmp_path, "on.yaml", {"lagExporter": {"interval": 2.5}}))
    assert container(of_kind(doc, "Deployment")[EXPORTER])["args"][-2:] == ["--interval", "2.5"]
    assert EXPORTER in of_kind(doc, "Service")


@pytest.mark.parametrize(("values", "message"), [
    ({"intervall": 5}, "intervall"),  # unknown key (the schema is strict here too)
    ({"replicas": 2}, "replicas"),  # one exporter, not a knob
    ({"interval": 0}, "interval"),  # `lag --serve` needs seconds > 0
    ({"interval": 600}, "interval"),  # past the 5 minutes after which the alerts call the lag stale
    ({"enabled": "yes"}, "enabled"),
    ({"resources": {"limits": {"memroy": "1Gi"}}}, "memroy"),
])
def test_broken_lag_exporter_values_are_refused(chartcheck: Path, tmp_path: Path, values: dict[str, Any],
                                                message: str) -> None:
    err = refused(chartcheck, tmp_path, {"lagExporter": values})
    assert message in err and "lagExporter" in err, err


# --- Prometheus Operator monitors ------------------------------------------------------------------

POD_MONITOR = "panel-opencode-panel-pipeline"  # the stages' and the collector's; the ServiceMonitor is EXPORTER
MONITORED = {  # both monitors on, and a host so that the collector is rendered too
    "monitoring": {"podMonitor": {"enabled": True, "interval": "20s", "scrapeTimeout": "",
                                  "labels": {"release": "prom"}},
                   "serviceMonitor": {"enabled": True, "interval": "", "scrapeTimeout": "5s",
                                      "labels": {"release": "prom", "team": "panel"}}},
    "hosts": [{"name": "a", "base_url": "https://a.example:4096"}],
}


def monitored_values(tmp_path: Path, production: bool) -> tuple[Path, ...]:
    return (PRODUCTION,) if production else (write(tmp_path, "monitored.yaml", MONITORED),)


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against an object's labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        key, operator, values = e["key"], e["operator"], e.get("values", [])
        if not {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}[operator]:
            return False
    return True


def relabel(target: dict[str, str], relabelings: list[dict[str, Any]]) -> dict[str, str]:
    """Prometheus's relabel_configs over a target's labels, for the actions the chart uses (replace,
    labeldrop); the __meta_* labels are gone afterwards, as after discovery."""
    out = dict(target)
    for rule in relabelings:
        action = rule.get("action", "replace").lower()
        regex = re.compile(rule.get("regex", "(.*)"))
        if action == "labeldrop":
            out = {name: value for name, value in out.items() if not regex.fullmatch(name)}
            continue
        assert action == "replace", f"relabel action {action} is not emulated here"
        match = regex.fullmatch(rule.get("separator", ";").join(out.get(s, "") for s in rule.get("sourceLabels", [])))
        if match is None:
            continue
        value = match.expand(re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", rule.get("replacement", "$1")))
        if value:
            out[rule["targetLabel"]] = value
        else:  # Prometheus drops a label set to ""
            out.pop(rule["targetLabel"], None)
    return {name: value for name, value in out.items() if not name.startswith("__")}


def meta(kind: str, labels: dict[str, str]) -> dict[str, str]:
    """An object's labels as service discovery names them: __meta_kubernetes_<kind>_label_<sanitized>."""
    return {f"__meta_kubernetes_{kind}_label_{re.sub('[^a-zA-Z0-9_]', '_', k)}": v for k, v in labels.items()}


def pod_target(monitor: dict[str, Any], endpoint: dict[str, Any], labels: dict[str, str]) -> dict[str, str]:
    """The labels of a pod's series scraped through a PodMonitor endpoint: the relabelings the Prometheus
    Operator generates (job <namespace>/<name>, or the pod's jobLabel value; endpoint, the port's name),
    then the endpoint's own."""
    target = {**meta("pod", labels), "namespace": "pipeline", "job": f"pipeline/{monitor['metadata']['name']}"}
    if labels.get(monitor["spec"].get("jobLabel", "")):
        target["job"] = labels[monitor["spec"]["jobLabel"]]
    return relabel({**target, "endpoint": endpoint["port"]}, endpoint.get("relabelings", []))


def service_target(monitor: dict[str, Any], endpoint: dict[str, Any], service: dict[str, Any]) -> dict[str, str]:
    """The same through a ServiceMonitor endpoint: job is the Service's name, or the value of the Service
    label jobLabel names (operator docs: "If the value of this field is empty or if the label doesn't
    exist for the given Service, the job label ... defaults to the name of the ... Service")."""
    labels, name = service["metadata"]["labels"], service["metadata"]["name"]
    target = {**meta("service", labels), "namespace": "pipeline", "service": name, "job": name}
    if labels.get(monitor["spec"].get("jobLabel", "")):
        target["job"] = labels[monitor["spec"]["jobLabel"]]
    return relabel({**target, "endpoint": endpoint["port"]}, endpoint.get("relabelings", []))


def test_relabel_emulation_follows_prometheus() -> None:
    """The helpers above decide what the job comes out as: check them on rules with a known result."""
    labels = {"__meta_kubernetes_pod_label_app": "ingest", "job": "ns/x", "endpoint": "metrics"}
    assert relabel(labels, [{"targetLabel": "job", "replacement": "pipeline"}])["job"] == "pipeline"
    assert relabel(labels, [{"sourceLabels": ["__meta_kubernetes_pod_label_app"], "regex": "(in)(.*)",
                             "targetLabel": "stage", "replacement": "${2}-$1"}])["stage"] == "gest-in"
    assert relabel(labels, [{"sourceLabels": ["missing"], "regex": "(.+)", "targetLabel": "job"}])["job"] == "ns/x"
    assert relabel(labels, [{"action": "labeldrop", "regex": "endpoint"}]) == {"job": "ns/x"}


def test_default_values_render_no_prometheus_operator_object(chartcheck: Path) -> None:
    doc = summary(chartcheck)
    assert not [(o["kind"], o["name"]) for o in doc["objects"] if o["apiVersion"].startswith("monitoring.coreos.com/")]
    assert "Prometheus Operator" not in doc["notes"] and "Scrape the Service" in doc["notes"]
    # the annotations stay the way to be scraped without the operator
    for deployment in of_kind(doc, "Deployment").values():
        assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


@pytest.mark.parametrize("production", [False, True], ids=["monitored", "production"])
def test_podmonitor_scrapes_every_stage_and_collector_pod_as_job_pipeline(chartcheck: Path, tmp_path: Path,
                                                                          production: bool) -> None:
    files = monitored_values(tmp_path, production)
    doc = summary(chartcheck, *files)
    values = values_of(*files)["monitoring"]["podMonitor"]
    [(name, monitor)] = of_kind(doc, "PodMonitor").items()
    assert name == POD_MONITOR
    assert monitor["metadata"]["labels"].items() >= values["labels"].items()  # what the Prometheus selects by
    deployments = of_kind(doc, "Deployment")
    selector = monitor["spec"]["selector"]
    selected = {stage_of(d): d for d in deployments.values() if selects(selector, pod_labels(d))}
    assert set(selected) == {*PIPELINE_STAGES, "collector"}
    assert not selects(selector, pod_labels(deployments[EXPORTER])), "the lag exporter is its own job"
    assert not monitor["spec"].get("namespaceSelector"), "the release's namespace, where the pods are"
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    assert (endpoint.get("interval", ""), endpoint.get("scrapeTimeout", "")) == (values["interval"],
                                                                                  values["scrapeTimeout"])
    for component, deployment in selected.items():
        c = container(deployment)
        # the port it names is the one the process serves /metrics on
        [port] = [p for p in c["ports"] if p["name"] == endpoint["port"]]
        assert port["containerPort"] == int(c["args"][c["args"].index("--metrics-port") + 1]), component
        target = pod_target(monitor, endpoint, pod_labels(deployment))
        assert target["job"] == "pipeline", (component, target)  # as compose's deploy/prometheus.yml names it
        # no target label `endpoint`: the series' own (the panel or scrubber URL) keeps its name
        assert "endpoint" not in target, target
    assert f"The PodMonitor {POD_MONITOR} scrapes" in doc["notes"]


@pytest.mark.parametrize("production", [False, True], ids=["monitored", "production"])
def test_servicemonitor_scrapes_the_lag_exporter_service_as_job_lag_exporter(chartcheck: Path, tmp_path: Path,
                                                                             production: bool) -> None:
    files = monitored_values(tmp_path, production)
    doc = summary(chartcheck, *files)
    values = values_of(*files)["monitoring"]["serviceMonitor"]
    [(name, monitor)] = of_kind(doc, "ServiceMonitor").items()
    assert name == EXPORTER
    assert monitor["metadata"]["labels"].items() >= values["labels"].items()
    services = of_kind(doc, "Service")
    assert [n for n, s in services.items() if selects(monitor["spec"]["selector"], s["metadata"]["labels"])] == [
        EXPORTER]
    assert not monitor["spec"].get("namespaceSelector")
    service = services[EXPORTER]
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert (endpoint.get("interval", ""), endpoint.get("scrapeTimeout", "")) == (values["interval"],
                                                                                  values["scrapeTimeout"])
    # the Service's port it names leads to the exporter's metrics port
    [port] = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert port["targetPort"] in {p["name"] for p in container(of_kind(doc, "Deployment")[EXPORTER])["ports"]}
    # the job deploy/alerts.yml's PipelineLagExporterDown fires on
    assert 'up{job="lag-exporter"}' in (REPO / "deploy" / "alerts.yml").read_text()
    target = service_target(monitor, endpoint, service)
    assert target["job"] == "lag-exporter", target
    assert "endpoint" not in target, target
    assert "ServiceMonitor" in doc["notes"] and f"{EXPORTER}.pipeline.svc:9100" in doc["notes"]


def test_lag_exporter_disabled_removes_its_servicemonitor(chartcheck: Path, tmp_path: Path) -> None:
    doc = summary(chartcheck, PRODUCTION, write(tmp_path, "off.yaml", {"lagExporter": {"enabled": False}}))
    assert not of_kind(doc, "ServiceMonitor") and EXPORTER not in of_kind(doc, "Service")
    assert list(of_kind(doc, "PodMonitor")) == [POD_MONITOR]
    assert "ServiceMonitor" not in doc["notes"] and "Lag exporter: off" in doc["notes"]


def test_monitors_are_rendered_one_at_a_time(chartcheck: Path, tmp_path: Path) -> None:
    for enabled, kind in (("podMonitor", "PodMonitor"), ("serviceMonitor", "ServiceMonitor")):
        doc = summary(chartcheck, write(tmp_path, "one.yaml", {"monitoring": {enabled: {"enabled": True}}}))
        assert {o["kind"] for o in doc["objects"] if o["apiVersion"] == "monitoring.coreos.com/v1"} == {kind}


@pytest.mark.parametrize(("values", "message"), [
    ({"podMonitor": {"enabeld": True}}, "enabeld"),  # unknown key
    ({"serviceMonitor": {"interval": "30"}}, "interval"),  # a Prometheus duration has a unit
    ({"podMonitor": {"scrapeTimeout": "10 s"}}, "scrapeTimeout"),
    ({"podMonitor": {"labels": {"release": 1}}}, "release"),  # label values are strings
    ({"prometheusRule": {"enabled": True}}, "prometheusRule"),  # the rules stay in deploy/alerts.yml
])
def test_broken_monitoring_values_are_refused(chartcheck: Path, tmp_path: Path, values: dict[str, Any],
                                              message: str) -> None:
    err = refused(chartcheck, tmp_path, {"monitoring": values})
    assert message in err and "monitoring" in err, err


def test_monitor_labels_may_not_replace_the_charts_own(chartcheck: Path, tmp_path: Path) -> None:
    # a second app.kubernetes.io/name would be a duplicate key in the monitor's labels
    err = refused(chartcheck, tmp_path, {"monitoring": {"serviceMonitor": {"labels": {"app.kubernetes.io/name": "x"}}}})
    assert "invalid propertyName 'app.kubernetes.io/name'" in err, err  # (Helm's validator misreports where)


def test_a_scrape_timeout_longer_than_the_interval_is_refused(chartcheck: Path, tmp_path: Path) -> None:
    # the Prometheus Operator would skip the monitor, so nothing would be scraped
    err = refused(chartcheck, tmp_path, {"monitoring": {"podMonitor": {"enabled": True, "interval": "10s",
                                                                       "scrapeTimeout": "1m"}}})
    assert 'scrapeTimeout "1m" greater than interval "10s"' in err, err


# --- what must be refused ----------------------------------------------------------------------

def refused(tool: Path, tmp_path: Path, doc: Any, *, base: Path | None = None) -> str:
    files = [base] if base else []
    proc = render(tool, *files, write(tmp_path, "values.yaml", doc))
    assert proc.returncode != 0, f"accepted:\n{proc.stdout[:2000]}"
    assert proc.stdout == ""
    return proc.stderr


def test_unknown_value_key_is_refused(chartcheck: Path, tmp_path: Path) -> None:
    err = refused(chartcheck, tmp_path, {"stages": {"scrub": {"lagTreshold": 5}}})
    assert "lagTreshold" in err and "schema" in err
    err = refused(chartcheck, tmp_path, {"kafka": {"bootstrap": "kafka:9092"}})
    assert "bootstrap" in err


def test_wrong_value_type_is_refused(chartcheck: Path, tmp_path: Path) -> None:
    err = refused(chartcheck, tmp_path, {"stages": {"deliver": {"lagThreshold": "lots"}}})
    assert "lagThreshold" in err
    err = refused(chartcheck, tmp_path, {"kafka": {"partitions": 0}})
    assert "partitions" in err


def test_chart_managed_config_keys_are_refused(chartcheck: Path, tmp_path: Path) -> None:
    err = refused(chartcheck, tmp_path, {"config": {"kafka": {"bootstrap": "elsewhere:9092"}}})
    assert "/config/kafka" in err


def test_more_replicas_than_partitions_is_refused(chartcheck: Path, tmp_path: Path) -> None:
    err = refused(chartcheck, tmp_path, {"stages": {"sign": {"maxReplicas": 13}}})
    assert "stages.sign.maxReplicas is 13" in err and "traces.scrubbed has 12 partitions" in err
    # the bound follows kafka.partitions
    err = refused(chartcheck, tmp_path, {"stages": {"ingest": {"maxReplicas": 24}}, "kafka": {"partitions": 16}})
    assert "opencode.events has 16 partitions" in err
    proc = render(chartcheck, write(tmp_path, "ok.yaml", {"stages": {"ingest": {"maxReplicas": 16}},
                                                          "kafka": {"partitions": 16}}))
    assert proc.returncode == 0, proc.stderr


def test_a_host_listed_twice_or_with_an_unsourced_password_is_refused(chartcheck: Path, tmp_path: Path) -> None:
    hosts = [{"name": "a", "base_url": "https://a.example:4096"}, {"name": "b", "base_url": "https://b.example:4096"}]
    err = refused(chartcheck, tmp_path, {"hosts": [*hosts, hosts[1]]})
    assert "hosts: b is listed twice" in err
    err = refused(chartcheck, tmp_path, {"hosts": hosts, "collectors": [{"name": "east", "hosts": ["a"]}]})
    assert "collectors" in err, "the per-collector split is gone: the replicas share every host"
    err = refused(chartcheck, tmp_path, {"hosts": [{**hosts[0], "password_env": "PW_A"}]})
    assert "PW_A comes from nowhere" in err
    err = refused(chartcheck, tmp_path, {"hosts": [{**hosts[0], "password": "inline"}]})
    assert "password" in err


def test_default_collector_replicas_share_every_host(chartcheck: Path, tmp_path: Path) -> None:
    hosts = [{"name": "a", "base_url": "https://a.example:4096"}, {"name": "b", "base_url": "https://b.example:4096"}]
    doc = summary(chartcheck, write(tmp_path, "v.yaml", {"hosts": hosts}))
    collectors = {n: d for n, d in of_kind(doc, "Deployment").items() if stage_of(d) == "collector"}
    assert list(collectors) == ["panel-opencode-panel-pipeline-collector"]
    assert collectors["panel-opencode-panel-pipeline-collector"]["spec"]["replicas"] == 2
    cfg = load_config(tmp_path, config_text(doc, "collector.toml"))
    assert [h.name for h in cfg.hosts] == ["a", "b"]


# --- chartcheck itself: strict, so the checks above mean something -----------------------------

def tiny_chart(tmp_path: Path, manifest: str) -> Path:
    chart = tmp_path / "tiny"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: tiny\nversion: 0.1.0\n")
    (chart / "templates" / "x.yaml").write_text(manifest)
    return chart


DEPLOYMENT = """apiVersion: apps/v1
kind: Deployment
metadata: {name: x}
spec:
  %s
  selector: {matchLabels: {app: x}}
  template:
    metadata: {labels: {app: x}}
    spec:
      containers: [{name: x, image: x}]
"""
DEPLOYMENT_WITH_PORT = (DEPLOYMENT % "replicas: 1").replace(
    "{name: x, image: x}", "{name: x, image: x, ports: [{name: metrics, containerPort: 9100}]}") + "---\n"
POD_MONITOR_OF_X = ("apiVersion: monitoring.coreos.com/v1\nkind: PodMonitor\nmetadata: {name: x}\n"
                    "spec: {selector: {matchLabels: {app: x}}, podMetricsEndpoints: [%s]}\n")
SERVICE_OF_X = ("apiVersion: v1\nkind: Service\nmetadata: {name: x, labels: {app: x}}\n"
                "spec: {selector: {app: x}, ports: [{name: metrics, port: 9100}]}\n---\n")


@pytest.mark.parametrize(("manifest", "message"), [
    (DEPLOYMENT % "replica: 2", 'unknown field "spec.replica"'),
    (DEPLOYMENT % "replicas: two", "spec.replicas"),
    ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: 1}\n", "data"),
    ("apiVersion: keda.sh/v1alpha1\nkind: ScaledObject\nmetadata: {name: x}\n"
     "spec: {scaleTargetRef: {name: x}, triggers: [{type: kafka, metadata: {lagThreshold: 5}}]}\n",
     "spec.triggers.metadata of type string"),
    ("apiVersion: kafka.strimzi.io/v1beta2\nkind: KafkaTopic\nmetadata: {name: x}\n"
     "spec: {partitions: 1, replicas: 1, retention: 5}\n", 'unknown field "spec.retention"'),
    ("apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: x}\n", 'unknown kind "Widget"'),
    (DEPLOYMENT_WITH_PORT + POD_MONITOR_OF_X % "{port: metrics, intervall: 30s}",
     'unknown field "spec.podMetricsEndpoints[0].intervall"'),
    (SERVICE_OF_X + "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata: {name: x}\n"
     "spec: {jobLabels: app, selector: {matchLabels: {app: x}}, endpoints: [{port: metrics}]}\n",
     'unknown field "spec.jobLabels"'),
    (DEPLOYMENT % "replicas: 1" + "---\n" + POD_MONITOR_OF_X % "{port: metrics}",
     'names port "metrics", which no container of Deployment "x"'),
    (DEPLOYMENT_WITH_PORT + POD_MONITOR_OF_X % "{port: metrics, interval: 10s, scrapeTimeout: 20s}",
     'scrapeTimeout "20s" greater than interval "10s"'),
    (SERVICE_OF_X + "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata: {name: x}\n"
     "spec: {selector: {matchLabels: {app: nothing}}, endpoints: [{port: metrics}]}\n", "selects no rendered Service"),
    (SERVICE_OF_X + "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata: {name: x}\n"
     "spec: {jobLabel: team, selector: {matchLabels: {app: x}}, endpoints: [{port: metrics}]}\n",
     "its job would be the Service's name"),
    ("apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata: {name: x}\n"
     "spec: {maxUnavailable: 1, selector: {matchLabels: {app: nothing}}}\n", "selects no rendered Deployment"),
])
def test_chartcheck_refuses_what_a_cluster_refuses(chartcheck: Path, tmp_path: Path, manifest: str,
                                                   message: str) -> None:
    proc = render(chartcheck, chart=tiny_chart(tmp_path, manifest))
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr


def test_chartcheck_accepts_a_well_formed_object(chartcheck: Path, tmp_path: Path) -> None:
    proc = render(chartcheck, chart=tiny_chart(tmp_path, DEPLOYMENT % "replicas: 2"))
    assert proc.returncode == 0, proc.stderr
    [obj] = json.loads(proc.stdout)["objects"]
    assert (obj["kind"], obj["name"], obj["object"]["spec"]["replicas"]) == ("Deployment", "x", 2)


def test_the_prompt_ref_key_reaches_ingest_only_and_only_when_named(chartcheck: Path, tmp_path: Path) -> None:
    values = {"secrets": {"prompt": "pipeline-prompt-ref"}, "stages": {"ingest": {"secrets": ["prompt"]}}}
    doc = summary(chartcheck, write(tmp_path, "values.yaml", values))
    refs = {stage_of(d): {s["secretRef"]["name"] for s in container(d).get("envFrom", [])}
            for d in of_kind(doc, "Deployment").values()}
    assert "pipeline-prompt-ref" in refs["ingest"]
    assert not any("pipeline-prompt-ref" in names for stage, names in refs.items() if stage != "ingest")
    err = refused(chartcheck, tmp_path, {"stages": {"ingest": {"secrets": ["prompt"]}}})
    assert "secrets.prompt names no Secret" in err, err
