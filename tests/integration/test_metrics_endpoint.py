"""A real worker process serves /metrics with every documented metric, and its counters move
when a record goes through it."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devkit.kafka_local import free_port
from devkit.local_stack import PipelineProcess, wait_for
from pipeline.kafka import admin
from pipeline.model.records import encode
from pipeline.topics import STAGES, TOPICS, partitions_of
from tests.kafka_util import produce
from tests.unit.test_metrics_doc import README, parse_metrics_table

pytestmark = pytest.mark.integration

STAGE = "passthrough"
TIMEOUT_S = 180.0  # a faust worker on a loaded 2-core machine can take a while to join its group


def event(i: int) -> dict:
    return {"schema": "opencode.event/1", "host": "metrics-test", "site_key": "pk_test_thirdparty",
            "session_id": f"ses_m{i}", "event_id": f"evt_metrics_{i}", "type": "session.idle",
            "received_at": 1795236913680 + i, "directory": "/w", "project": "global", "backfill": False,
            "source": "sse", "properties": {"sessionID": f"ses_m{i}"}}


class Scraper:
    def __init__(self, port: int, worker: PipelineProcess) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.worker = worker

    def text(self) -> str | None:
        assert self.worker.alive(), f"worker exited:\n{self.worker.log()[-3000:]}"
        try:
            with urllib.request.urlopen(self.url, timeout=10) as response:
                return response.read().decode()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None  # not listening yet

    def types(self) -> dict[str, str]:
        """`# TYPE` lines: every registered metric, samples or not, by its scraped name."""
        text = self.text() or ""
        return {parts[2]: parts[3] for parts in (line.split() for line in text.splitlines())
                if len(parts) == 4 and parts[:2] == ["#", "TYPE"]}

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        text = self.text() or ""
        return [(s.labels, s.value) for family in text_string_to_metric_families(text)
                for s in family.samples if s.name == name]


@pytest.fixture(scope="module")
def worker(kafka, kafka_env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraper]:
    asyncio.run(admin.create_topics(kafka.bootstrap, int(kafka_env["PIPELINE_KAFKA__PARTITIONS"]), 1))
    port = free_port()
    log_dir: Path = tmp_path_factory.mktemp("metrics-worker")
    with PipelineProcess(["--log-format", "json", "worker", STAGE, "--metrics-port", str(port), "--loglevel", "info"],
                         kafka_env, log_dir,
                         name="metrics-worker") as proc:
        scraper = Scraper(port, proc)
        wait_for(scraper.text, 60, what=f"{scraper.url} to answer")
        # After the worker is up, so the record is new to it whatever the group committed before.
        records = [(f"metrics-test:ses_m{i}".encode(), encode(event(i))) for i in range(3)]
        asyncio.run(produce(kafka.bootstrap, STAGES[STAGE].input, records))
        yield scraper


def test_worker_serves_every_documented_metric(worker: Scraper) -> None:
    documented = parse_metrics_table(README.read_text(encoding="utf-8"), "README.md")

    def counted() -> bool:
        ins = [v for labels, v in worker.samples("pipeline_records_in_total") if labels == {"stage": STAGE}]
        return bool(ins) and ins[0] >= 3

    wait_for(counted, TIMEOUT_S, what=f"pipeline_records_in_total{{stage={STAGE!r}}} >= 3")
    types = worker.types()
    missing = sorted(name for name in documented if name not in types)
    assert not missing, f"documented but not served: {missing}"
    for name, doc in documented.items():
        assert types[name] == doc.type, f"{name}: served as {types[name]}, documented as {doc.type}"

    def written() -> bool:
        out = [v for labels, v in worker.samples("pipeline_records_out_total")
               if labels == {"stage": STAGE, "topic": "passthrough.out"}]
        return bool(out) and out[0] >= 3

    wait_for(written, TIMEOUT_S, what="pipeline_records_out_total for passthrough.out >= 3")
    # Samples carry exactly the documented labels.
    for name in ("pipeline_records_in_total", "pipeline_records_out_total"):
        for labels, _ in worker.samples(name):
            assert sorted(labels) == sorted(documented[name].labels), (name, labels)


def test_worker_exports_its_consumer_lag(worker: Scraper) -> None:
    """Needs the worker to run pipeline.kafka.lag.export_lag_forever for its stage."""
    stage = STAGES[STAGE]
    partitions = {str(p) for p in range(partitions_of(TOPICS[stage.input], 4))}

    def caught_up() -> bool:
        lag = {labels["partition"]: v for labels, v in worker.samples("pipeline_consumer_lag")
               if labels["stage"] == STAGE and labels["topic"] == stage.input}
        return set(lag) == partitions and sum(lag.values()) == 0

    wait_for(caught_up, TIMEOUT_S, interval_s=1.0,
             what=f"pipeline_consumer_lag{{stage={STAGE!r}}} on every partition of {stage.input}, summing to 0")


def test_worker_answers_healthz_while_its_agent_runs(worker: Scraper) -> None:
    def health() -> tuple[int, str] | None:
        try:
            with urllib.request.urlopen(worker.url.replace("/metrics", "/healthz"), timeout=5) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as refused:
            return refused.code, refused.read().decode()
        except OSError:
            return None

    # unhealthy until the group is joined and the loop turns; then healthy, and it stays so
    assert wait_for(lambda: health() == (200, "ok\n"), TIMEOUT_S, what="/healthz 200 ok")
    time.sleep(2)
    assert health() == (200, "ok\n")


def test_worker_logs_one_json_object_a_line(worker: Scraper) -> None:
    def json_lines() -> list[dict]:
        found = []
        for line in worker.worker.log().splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict):
                found.append(doc)
        return found

    lines = wait_for(json_lines, TIMEOUT_S, what="a JSON log line from the worker")
    assert all({"time", "level", "logger", "message"} <= set(doc) for doc in lines), lines[:3]
