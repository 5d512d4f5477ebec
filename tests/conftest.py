"""Shared fixtures: a real Kafka broker (the same code as `pipeline-dev kafka up`), on a free port
with a fresh data dir, started once per test session and stopped at the end."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from devkit.kafka_local import LocalBroker, free_port
from pipeline import config as config_mod

REPO = Path(__file__).resolve().parent.parent

# Property tests explore new examples on every developer run; CI (`.ci/run` sets
# HYPOTHESIS_PROFILE=ci) replays a fixed derivation, so a red CI run is the code's doing and
# reproduces, and never waits on a slow shared machine's timing.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@contextlib.contextmanager
def local_broker(data_dir: Path, *extra_properties: str) -> Iterator[LocalBroker]:
    """A real broker on free ports, stopped on exit (`extra_properties`: server.properties lines)."""
    broker = LocalBroker(host="127.0.0.1", port=free_port(), controller_port=free_port(), data_dir=data_dir,
                         cache_dir=config_mod.DEFAULT_CACHE_DIR, extra_properties=extra_properties)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    with local_broker(tmp_path_factory.mktemp("kafka")) as broker:
        yield broker


@pytest.fixture(scope="session")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """The secured broker (`pipeline-dev kafka up --secure`): SASL_SSL on free ports of its own, a
    SCRAM user per role, the StandardAuthorizer with the pipeline's ACLs applied. Its clients
    take `secure_kafka.access(role)`; a `pipeline` process takes `secure_kafka.client_environment()`."""
    broker = LocalBroker(host="127.0.0.1", port=free_port(), controller_port=free_port(),
                         data_dir=tmp_path_factory.mktemp("kafka-secure"), cache_dir=config_mod.DEFAULT_CACHE_DIR,
                         secure=True)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_env(kafka: LocalBroker) -> dict[str, str]:
    """Environment for `pipeline` subprocesses and config.load() pointing at the test broker."""
    return {
        "PIPELINE_KAFKA__BOOTSTRAP": kafka.bootstrap,
        "PIPELINE_KAFKA__PARTITIONS": "4",
    }


@pytest.fixture(scope="session")
def kafka_config(kafka_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> config_mod.Config:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update(kafka_env)
    env["PIPELINE_KAFKA__CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    return config_mod.load(None, env)
