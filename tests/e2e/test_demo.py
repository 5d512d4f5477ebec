"""`pipeline-dev demo` is the README's main command: it must run, account for every forwarded
trace, show a panel outage opening the breaker and draining, and leave no process behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

# slow: ~2-4 min of a whole demo; run with `./dev test tests/e2e/test_demo.py -m ""`
pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]


def pipeline_processes() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "pipeline.cli (worker|collect)|devkit stub|opencode serve|pipeline-demo-"],
                         capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def test_demo_with_a_panel_outage() -> None:
    before = pipeline_processes()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    proc = subprocess.run([sys.executable, "-m", "devkit", "demo", "--duration", "50", "--panel-outage", "15"],
                          capture_output=True, text=True, timeout=900, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]

    def row(name: str) -> int:
        found = re.search(rf"{re.escape(name)}\s*│\s*(\d+)", out)
        assert found, f"no {name!r} row in the summary:\n{out[-3000:]}"
        return int(found.group(1))

    assert row("delivered to the panel") > 0
    assert row("unexplained losses") == 0
    delivered, dead = row("delivered to the panel"), row("dead-lettered (with a reason)")
    assert row("traces forwarded by the sampler") == delivered + dead
    assert row("outcome records: breaker->open") >= 1, "the outage did not open the breaker"
    assert row("outcome records: held") >= 1, "no trace was held while the breaker was open"
    assert pipeline_processes() <= before, "the demo left processes behind"
