"""The provisioned Grafana dashboard only queries metrics pipeline/metrics.py declares, and its
provisioning files agree with each other and with docker-compose.yml."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import yaml

from tests.fixtures import REPO
from tests.unit.test_metrics_doc import declared_metrics

GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "pipeline.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "dashboards.yml"

# What the dashboard is for: each of these must be plotted.
REQUIRED = {"pipeline_consumer_lag", "pipeline_records_in_total", "pipeline_records_out_total",
            "pipeline_sampler_decisions_total", "pipeline_panel_request_seconds", "pipeline_breaker_state",
            "pipeline_dead_letters_total", "pipeline_collector_connected", "pipeline_concurrency_limit",
            "pipeline_in_flight_requests", "pipeline_throttled_total", "pipeline_sampler_budget_used"}
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in items:
        yield p
        yield from panels(p.get("panels", []))  # collapsed rows hold their panels


def queries(dash: dict[str, Any]) -> list[str]:
    out = [t["expr"] for p in panels(dash["panels"]) for t in p.get("targets", []) if t.get("expr")]
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        out.append(query.get("query", "") if isinstance(query, dict) else str(query or ""))
    return out


def metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expression, histogram series mapped to their histogram."""
    declared = declared_metrics()
    names = set()
    for name in re.findall(r"\bpipeline_[a-zA-Z0-9_]+", expr):
        for suffix in HISTOGRAM_SERIES:
            base = name.removesuffix(suffix)
            if base != name and declared.get(base) and declared[base].type == "histogram":
                name = base
                break
        names.add(name)
    return names


def test_dashboard_is_valid_json_with_unique_panel_ids() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in panels(dash["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert all(p.get("gridPos") for p in panels(dash["panels"]))


def test_every_metric_in_the_dashboard_is_declared() -> None:
    declared = declared_metrics()
    used = set().union(*(metric_names(q) for q in queries(dashboard())))
    unknown = sorted(used - set(declared))
    assert not unknown, f"dashboard queries metrics pipeline/metrics.py does not declare: {unknown}"
    missing = sorted(REQUIRED - used)
    assert not missing, f"dashboard does not plot: {missing}"


def test_histogram_quantiles_use_buckets_by_le() -> None:
    for expr in queries(dashboard()):
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and re.search(r"by \([^)]*\ble\b", expr), expr


def test_lag_is_deduplicated_across_replicas() -> None:
    # Every replica exports its group's lag: summing raw series would count it once per replica.
    for expr in queries(dashboard()):
        if "pipeline_consumer_lag" in expr:
            assert "max by (stage, topic, partition) (pipeline_consumer_lag" in expr, expr


def test_panels_use_the_provisioned_datasource() -> None:
    sources = yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))["datasources"]
    uids = {s["uid"] for s in sources if s["type"] == "prometheus"}
    assert len(uids) == 1
    for p in panels(dashboard()["panels"]):
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] in uids, p["title"]
        assert all(t["datasource"]["uid"] in uids for t in p["targets"]), p["title"]


def test_provider_path_is_where_compose_mounts_the_dashboards() -> None:
    providers = yaml.safe_load(PROVIDERS.read_text(encoding="utf-8"))["providers"]
    paths = {p["options"]["path"] for p in providers}
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
    volumes = compose["services"]["grafana"]["volumes"]
    mounts = dict(v.split(":")[:2] for v in volumes)
    assert mounts.get("./deploy/grafana/dashboards") in paths, (mounts, paths)
    assert mounts.get("./deploy/grafana/provisioning") == "/etc/grafana/provisioning"
