"""Talking to ``opencode serve`` daemons: SSE parsing, the HTTP client, and the
real-daemon and model-stub harnesses used by tests and demos."""

from pipeline.opencode.client import (
    DEFAULT_TIMEOUT,
    InsecureHostError,
    MalformedFrame,
    OpencodeAuthError,
    OpencodeClient,
    OpencodeError,
    OpencodeNotFound,
    OpencodeProtocolError,
    OpencodeUnavailable,
    TaskResult,
    reply_text,
    split_model,
    unwrap_event,
)
from pipeline.opencode.sse import SSEFrame, SSEFrameTooLarge, SSEParser

__all__ = [
    "DEFAULT_TIMEOUT",
    "InsecureHostError",
    "MalformedFrame",
    "OpencodeAuthError",
    "OpencodeClient",
    "OpencodeError",
    "OpencodeNotFound",
    "OpencodeProtocolError",
    "OpencodeUnavailable",
    "SSEFrame",
    "SSEFrameTooLarge",
    "SSEParser",
    "TaskResult",
    "reply_text",
    "split_model",
    "unwrap_event",
]
