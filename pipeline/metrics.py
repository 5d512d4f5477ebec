"""Every metric the pipeline exports, declared once. The README's metrics table is checked
against this module by tests/unit/test_metrics_doc.py."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

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
PANEL_LATENCY = Histogram("pipeline_panel_request_seconds", "Panel ingest request latency",
                          ["endpoint", "result"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
DELIVERY_OUTCOMES = Counter("pipeline_delivery_outcomes_total", "Delivery outcomes by status",
                            ["endpoint", "status"])
BREAKER_STATE = Gauge("pipeline_breaker_state", "Breaker state per endpoint (0 closed, 1 half-open, 2 open)",
                      ["endpoint"])
BREAKER_TRANSITIONS = Counter("pipeline_breaker_transitions_total", "Breaker state transitions",
                              ["endpoint", "to"])
CONSUMER_LAG = Gauge("pipeline_consumer_lag", "Records behind the end of the input partition",
                     ["stage", "topic", "partition"])
COLLECTOR_CONNECTED = Gauge("pipeline_collector_connected", "1 while the host's event stream is up",
                            ["host"])
COLLECTOR_EVENTS = Counter("pipeline_collector_events_total", "Collector events by outcome",
                           ["host", "outcome"])


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics on `port` (0 disables)."""
    if port:
        start_http_server(port, addr=host)
