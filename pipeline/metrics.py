"""Every metric the pipeline exports, declared once. The README's metrics table is checked
against this module by tests/unit/test_metrics_doc.py."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app

RECORDS_IN = Counter("pipeline_records_in_total", "Records read by a stage", ["stage"])
RECORDS_OUT = Counter("pipeline_records_out_total", "Records written by a stage, per output topic",
                      ["stage", "topic"])
DEAD_LETTERS = Counter("pipeline_dead_letters_total", "Records sent to a dead-letter topic",
                       ["topic", "reason"])
PRODUCE_FAILURES = Counter("pipeline_produce_failures_total",
                           "Writes the broker did not take, by the stage, topic and error; the batch is held",
                           ["stage", "topic", "error"])
DECISIONS = Counter("pipeline_sampler_decisions_total", "Sampling decisions by reason",
                    ["reason", "forward"])
SCRUBBER_LATENCY = Histogram("pipeline_scrubber_request_seconds", "Scrubber request latency",
                             ["result"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
SCRUBBER_PROBES = Counter("pipeline_scrubber_probes_total",
                          "Scrub probes (a canary trace, sent when a trace spent its budget and no other passed)",
                          ["result"])
PANEL_LATENCY = Histogram("pipeline_panel_request_seconds", "Panel ingest request latency",
                          ["endpoint", "result"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
DELIVERY_OUTCOMES = Counter("pipeline_delivery_outcomes_total", "Delivery outcomes by status",
                            ["endpoint", "status"])
BREAKER_STATE = Gauge("pipeline_breaker_state", "Breaker state per endpoint (0 closed, 1 half-open, 2 open)",
                      ["endpoint"])
BREAKER_TRANSITIONS = Counter("pipeline_breaker_transitions_total", "Breaker state transitions",
                              ["endpoint", "to"])
CONCURRENCY_LIMIT = Gauge("pipeline_concurrency_limit",
                          "Requests a stage process may have in flight to an endpoint now (adaptive)",
                          ["stage", "endpoint"])
IN_FLIGHT = Gauge("pipeline_in_flight_requests", "Requests a stage process has in flight to an endpoint",
                  ["stage", "endpoint"])
THROTTLED = Counter("pipeline_throttled_total",
                    "429 answers: each pauses the endpoint for its Retry-After (not a breaker failure)",
                    ["stage", "endpoint"])
SAMPLER_BUDGET_USED = Gauge("pipeline_sampler_budget_used",
                            "Traces forwarded for a site in the last rolling hour (budgetPerHour set)", ["site"])
CONSUMER_LAG = Gauge("pipeline_consumer_lag", "Records behind the end of the input partition",
                     ["stage", "topic", "partition"])
# Set beside CONSUMER_LAG by whatever reads lag (every replica for its own stage, and
# `pipeline lag --serve` for all of them), so an alert can tell "no lag" from "lag unknown" and
# see a stage whose every replica is gone. Labelled by stage so no process exports them unset.
CONSUMER_LAG_DRAIN = Gauge("pipeline_consumer_lag_drain_seconds",
                           "Seconds to consume the stage's lag at its measured rate (+Inf: stalled)", ["stage"])
CONSUMER_GROUP_MEMBERS = Gauge("pipeline_consumer_group_members",
                               "Members of the stage's consumer group, as the group coordinator reports them",
                               ["stage"])
LAG_EXPORT_OK = Gauge("pipeline_lag_export_ok",
                      "1 when the last reading of the stage's lag succeeded, 0 when it failed", ["stage"])
LAG_EXPORT_TIMESTAMP = Gauge("pipeline_lag_export_timestamp_seconds",
                             "Unix time of the last successful reading of the stage's lag", ["stage"])
COLLECTOR_CONNECTED = Gauge("pipeline_collector_connected", "1 while the host's event stream is up",
                            ["host"])
COLLECTOR_EVENTS = Counter("pipeline_collector_events_total", "Collector events by outcome",
                           ["host", "outcome"])


def serve(port: int, host: str = "127.0.0.1", health: Callable[[], tuple[bool, str]] | None = None) -> None:
    """Serve /metrics on `port` (0 disables), and /healthz: 200 "ok", or 503 with the reason
    `health` gives (a process without a health check answers 200 while it serves)."""
    if not port:
        return
    metrics_app = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/healthz":
            return metrics_app(environ, start_response)
        ok, why = health() if health is not None else (True, "ok")
        start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")])
        return [why.encode() + b"\n"]

    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scrape never holds the process open


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # a line per scrape would drown the logs
        pass
