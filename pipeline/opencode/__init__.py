"""Talking to ``opencode serve`` daemons: SSE parsing, the HTTP client, and the
real-daemon and model-stub harnesses used by tests and demos.

The package exports what its client and SSE modules export, so each name is listed once, in
the module that defines it.
"""

from pipeline.opencode import client, sse
from pipeline.opencode.client import *  # noqa: F403
from pipeline.opencode.sse import *  # noqa: F403

__all__ = [*client.__all__, *sse.__all__]
