"""The pipeline's one error tree.

    PipelineError
    ├── ConfigError                 bad or missing configuration; the CLI exits 2
    │   └── MissingSecretError      a required secret variable is unset (names the variable)
    ├── RecordError                 permanent: this record can never be processed -> dead letter
    │   └── SchemaError             a record does not match its topic's JSON Schema
    ├── RetriableError              transient: try again later (timeouts, 5xx, 429, breaker open)
    └── BrokerError                 the local broker could not be fetched, started or reached

Service clients (opencode, scrubber, panel) translate their transport errors into their
own small trees at one boundary; stages map those onto retriable/permanent here.
"""

from __future__ import annotations

from typing import Any


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose."""


class ConfigError(PipelineError):
    """Configuration is invalid. `key` is the dotted key at fault, when there is one."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class MissingSecretError(ConfigError):
    def __init__(self, variable: str, purpose: str) -> None:
        super().__init__(f"missing secret: set the environment variable {variable} ({purpose})", variable)
        self.variable = variable


class RecordError(PipelineError):
    """A record that no retry will fix. `reason` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.data = data  # structured detail for the dead letter (e.g. the answers that led to it)


class SchemaError(RecordError):
    def __init__(self, schema: str, detail: str) -> None:
        super().__init__("schema_invalid", f"{schema}: {detail}")
        self.schema = schema


class RetriableError(PipelineError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BrokerError(PipelineError):
    """The local Kafka broker could not be installed, started, stopped or reached."""
