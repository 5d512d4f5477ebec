"""devkit.kafka_local pieces that need no broker."""

from __future__ import annotations

import uuid

import pytest

from devkit import kafka_local


def test_a_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # b"\xf8..." encodes to "-..." in base64url: `kafka-storage format -t -...` took it for an option
    drawn = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x10" + bytes(15))])
    monkeypatch.setattr(kafka_local.uuid, "uuid4", lambda: next(drawn))
    cluster = kafka_local._cluster_id()
    assert not cluster.startswith("-") and len(cluster) == 22
