"""Running a stub as `python -m devkit.stubs.<service>`, as an operator or the demo would."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from tests.fixtures import REPO


@contextmanager
def stub_process(service: str, args: list[str], env: Mapping[str, str]) -> Iterator[str]:
    """Start the stub on a free port with `env`; yields the URL it printed, and on the way out
    checks that SIGTERM ends it cleanly."""
    proc = subprocess.Popen(
        [sys.executable, "-m", f"devkit.stubs.{service}", "--port", "0", *args],
        env={**env, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = re.search(r"listening on (http://\S+)", line)
        assert url, line
        yield url[1]
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
