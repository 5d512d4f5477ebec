"""opencode → panel trace forwarding pipeline: the library (pure logic, no broker needed)."""

__version__ = "0.1.0"
