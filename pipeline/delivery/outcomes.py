"""Delivery outcome records (topic delivery.outcomes): one builder, so every writer agrees."""

from __future__ import annotations

import hashlib
from typing import Any

from pipeline.delivery.breaker import Transition
from pipeline.model.records import validate


def outcome(*, stage: str, endpoint: str, status: str, trace_id: str | None, at: int,
            http_status: int | None = None, error: str | None = None, latency_ms: float | None = None,
            attempt: int = 0, probe: bool = False, detail: dict[str, Any] | None = None,
            identity: str | None = None) -> dict[str, Any]:
    """`identity` makes the outcome id deterministic where the same fact may be written twice
    (a breaker transition seen by two replicas); otherwise the id is unique to this attempt."""
    ident = identity or f"{stage}|{endpoint}|{trace_id}|{status}|{attempt}|{at}"
    record = {
        "schema": "delivery.outcome/1",
        "outcome_id": "oc_" + hashlib.sha256(ident.encode()).hexdigest()[:24],
        "trace_id": trace_id,
        "endpoint": endpoint,
        "status": status,
        "http_status": http_status,
        "error": error,
        "latency_ms": latency_ms,
        "attempt": attempt,
        "probe": probe,
        "stage": stage,
        "detail": detail or {},
        "at": at,
    }
    validate("outcome.v1", record)
    return record


def transition_outcome(t: Transition) -> dict[str, Any]:
    return outcome(stage="breaker", endpoint=t.endpoint, status="transition", trace_id=None, at=t.at,
                   detail={"from": str(t.from_state), "to": str(t.to_state), "reason": t.reason},
                   identity=f"transition|{t.endpoint}|{t.from_state}|{t.to_state}|{t.at}")
