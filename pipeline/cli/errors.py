"""How a command reports a failure: one line on stderr and an exit code, never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from pipeline import config as config_mod
from pipeline import logs
from pipeline.clients.opencode import OpencodeError
from pipeline.errors import BrokerError, ConfigError, PipelineError

# The failures a command reports in one line instead of a traceback: what the line says after
# the program's name, and the exit code (2: the operator must fix the configuration). The
# first entry the exception is an instance of wins, so subclasses come before their bases.
FAILURE_EXITS: dict[type[Exception], tuple[str, int]] = {
    ConfigError: ("config error: ", 2),
    BrokerError: ("broker: ", 1),
    PipelineError: ("", 1),
    OpencodeError: ("opencode: ", 1),
}


def report_failure(prog: str, exc: Exception) -> int:
    """Print `exc` as FAILURE_EXITS says, on stderr, and return its exit code."""
    for kind, (label, code) in FAILURE_EXITS.items():
        if isinstance(exc, kind):
            print(f"{prog}: {label}{exc}", file=sys.stderr)
            return code
    raise exc




def run_command(prog: str, args: argparse.Namespace,
                command: Callable[[argparse.Namespace, config_mod.Config], int]) -> int:
    """What every command line does once its arguments are parsed: set up the logs, load the
    configuration, run `command`, and turn a failure into one line and an exit code."""
    logs.configure(args.log_format, args.verbose)
    try:
        return int(command(args, config_mod.load(args.config)))
    except tuple(FAILURE_EXITS) as exc:
        return report_failure(prog, exc)
    except KeyboardInterrupt:
        return 130
