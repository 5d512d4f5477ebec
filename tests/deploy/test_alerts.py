"""The alerting rules (deploy/alerts.yml) load, fire when they should and only then, and only
query metrics that exist.

promtool (Prometheus's own checker) validates the rules and runs their unit tests
(deploy/alerts.test.yml: each alert on a synthetic failure beside a healthy series). The
checks that need no promtool run in Python: every alert has a `for:`, a severity and its
annotations, every metric an expression names is declared in pipeline/metrics.py (so renaming
a metric there fails here instead of silencing an alert in production), and the stages the
rules expect are the stages that are deployed.

promtool comes from PATH, else from the cache (`~/.cache/opencode-panel-pipeline/promtool`),
else, as root with apt-get, from Debian's `prometheus` package, downloaded and unpacked into
the cache (`apt-get download` + `dpkg-deb -x`: nothing installed, no Prometheus server started);
otherwise those tests are skipped with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import config as config_mod
from pipeline.topics import PIPELINE_STAGES
from tests.fixtures import REPO
from tests.unit.deploy.test_dashboard import metric_names
from tests.unit.test_metrics_doc import declared_metrics

pytestmark = pytest.mark.deploy

DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "alerts.yml"
ALERT_TESTS = DEPLOY / "alerts.test.yml"
PROMETHEUS = DEPLOY / "prometheus.yml"
COMPOSE = REPO / "docker-compose.yml"
RULES_IN_CONTAINER = "/etc/prometheus/alerts.yml"
SEVERITIES = {"warning", "critical"}
CACHE = Path(config_mod.DEFAULT_CACHE_DIR).expanduser() / "promtool"


def _run(cmd: list[str], timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)


def _unpack_from_debian() -> Path | None:
    """promtool from Debian's `prometheus` package, unpacked into the cache without installing
    the package (whose postinst would start a Prometheus server). None when that is not possible."""
    if not (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") and shutil.which("dpkg-deb")):
        return None
    download = CACHE / "download"
    download.mkdir(parents=True, exist_ok=True)
    got = subprocess.run(["apt-get", "download", "prometheus"], cwd=download, capture_output=True, text=True,
                         timeout=600, check=False)
    if got.returncode != 0:  # a fresh image has no package lists yet
        _run(["apt-get", "update", "-qq"], timeout_s=600)
        got = subprocess.run(["apt-get", "download", "prometheus"], cwd=download, capture_output=True, text=True,
                             timeout=600, check=False)
    debs = sorted(download.glob("prometheus_*.deb"))
    if got.returncode != 0 or not debs:
        return None
    root = CACHE / "root"
    if _run(["dpkg-deb", "-x", str(debs[-1]), str(root)]).returncode != 0:
        return None
    binary = root / "usr" / "bin" / "promtool"
    return binary if binary.exists() else None


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    cached = CACHE / "root" / "usr" / "bin" / "promtool"
    if cached.exists() or _unpack_from_debian():
        return str(cached)
    pytest.skip("promtool not found: not on PATH, not in the cache, and not root with apt-get to unpack "
                "Debian's prometheus package (or the download failed)")


def rules() -> dict[str, Any]:
    return yaml.safe_load(ALERTS.read_text(encoding="utf-8"))


def alerts() -> list[dict[str, Any]]:
    return [r for g in rules()["groups"] for r in g["rules"] if "alert" in r]


def recorded() -> set[str]:
    return {r["record"] for g in rules()["groups"] for r in g["rules"] if "record" in r}


# ---------------------------------------------------------------- promtool


def test_promtool_checks_the_rules(promtool: str) -> None:
    result = _run([promtool, "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass(promtool: str) -> None:
    result = _run([promtool, "test", "rules", str(ALERT_TESTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_loads_the_rules(promtool: str, tmp_path: Path) -> None:
    """prometheus.yml names the rules where compose mounts them; with that path pointed at the
    checkout, promtool loads the whole configuration, the rules included."""
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    assert config["rule_files"] == [RULES_IN_CONTAINER]
    config["rule_files"] = [str(ALERTS)]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = _run([promtool, "check", "config", str(local)])
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- without promtool


def test_every_alert_has_for_severity_and_annotations() -> None:
    names = [a["alert"] for a in alerts()]
    assert names and len(names) == len(set(names)), "alert names must be unique"
    for a in alerts():
        assert re.fullmatch(r"\d+[smh]", str(a.get("for", ""))), f"{a['alert']}: needs a `for:` duration"
        assert a.get("labels", {}).get("severity") in SEVERITIES, f"{a['alert']}: severity one of {SEVERITIES}"
        notes = a.get("annotations", {})
        assert notes.get("summary") and len(notes.get("description", "")) > 40, \
            f"{a['alert']}: needs a summary and a description that says what to do"


def unknown_metrics(expressions: list[str]) -> list[str]:
    """Metric names in `expressions` that pipeline/metrics.py does not declare."""
    declared = declared_metrics()
    return sorted(set().union(*(metric_names(e) for e in expressions)) - set(declared))


def test_expressions_only_name_declared_metrics() -> None:
    exprs = [str(r["expr"]) for g in rules()["groups"] for r in g["rules"]]
    assert not unknown_metrics(exprs), \
        f"deploy/alerts.yml queries metrics pipeline/metrics.py does not declare: {unknown_metrics(exprs)}"
    # Recording rules used by an expression are defined in the file.
    used = set().union(*(re.findall(r"\b[a-z_]+:[a-z_]+:[a-z_]+\b", e) for e in exprs))
    assert used <= recorded(), f"undefined recording rules: {sorted(used - recorded())}"


def test_a_renamed_metric_is_caught() -> None:
    """The checker itself: a metric renamed in pipeline/metrics.py leaves the old name here."""
    assert unknown_metrics(["sum(rate(pipeline_dead_letter_total[5m]))"]) == ["pipeline_dead_letter_total"]
    assert unknown_metrics(["histogram_quantile(0.99, sum by (le) (rate(pipeline_scrubber_request_seconds_bucket[5m])))"
                            ]) == []


def test_the_stages_without_lag_alert_covers_every_deployed_stage() -> None:
    (missing,) = [a for a in alerts() if a["alert"] == "PipelineStageLagMissing"]
    named = re.findall(r'absent\(pipeline_consumer_lag\{stage="([a-z]+)"\}\)', missing["expr"])
    assert sorted(named) == sorted(PIPELINE_STAGES)
    # ... and those are the stages compose runs as workers.
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    workers = set()
    for service in compose["services"].values():
        command = [str(c) for c in service.get("command", [])]
        if "worker" in command:
            workers.add(command[command.index("worker") + 1])
    assert workers == set(PIPELINE_STAGES)


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    """Each alert fires in some test of alerts.test.yml, and is seen silent in one: an explicit
    `exp_alerts: []`, or a healthy series beside the failing one (exp_alerts lists exactly
    what fires, so that series firing too fails the test)."""
    doc = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))
    assert doc["rule_files"] == ["alerts.yml"]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            if check["exp_alerts"]:
                fires.add(check["alertname"])
                if len(case["input_series"]) > 1:
                    silent.add(check["alertname"])
            else:
                silent.add(check["alertname"])
    names = {a["alert"] for a in alerts()}
    assert not names - fires, f"alerts never fired in deploy/alerts.test.yml: {sorted(names - fires)}"
    assert not names - silent, f"alerts never checked silent: {sorted(names - silent)}"


def test_prometheus_scrapes_the_lag_exporter_and_compose_mounts_the_rules() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for sc in jobs["lag-exporter"]["static_configs"] for t in sc["targets"]]
    assert targets == ["lag-exporter:9100"]
    alerts_text = ALERTS.read_text(encoding="utf-8")
    assert 'job="lag-exporter"' in alerts_text  # the job name the exporter alert reads
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    volumes = compose["services"]["prometheus"].get("volumes", [])
    assert f"./deploy/alerts.yml:{RULES_IN_CONTAINER}:ro" in volumes
