"""How a command reports a failure: one line on stderr and an exit code, never a traceback.

Exit codes every command shares: 0 done, 1 it failed (the line says why: a broker or daemon
that cannot be reached, nothing to redrive, ...), 2 a usage or configuration mistake (fix the
command line or the config file), 130 interrupted. Some commands add their own above 2 (`pipeline
lag` 3 and 4, `pipeline opencode` 3): the README's command table lists them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from pipeline import config as config_mod
from pipeline import logs
from pipeline.clients.opencode import OpencodeError
from pipeline.errors import BrokerError, ConfigError, PipelineError

USAGE_EXIT = 2


class UsageError(Exception):
    """A command-line mistake argparse cannot see alone (options that exclude each other, a
    value out of range for this mode). Reported the way argparse reports its own mistakes
    (the usage, then `prog: error: ...`, exit 2), not as "config error:": the configuration
    file is fine, the command line is not."""


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
    """Print `exc` as FAILURE_EXITS says, on stderr, on one line, and return its exit code."""
    for kind, (label, code) in FAILURE_EXITS.items():
        if isinstance(exc, kind):
            print(f"{prog}: {label}{' '.join(str(exc).split())}", file=sys.stderr)
            return code
    raise exc


def report_usage(prog: str, args: argparse.Namespace, exc: UsageError) -> int:
    """Print a UsageError as argparse prints its own: the subcommand's usage, then the error."""
    parser = getattr(args, "usage_parser", None)
    if isinstance(parser, argparse.ArgumentParser):
        parser.print_usage(sys.stderr)
        prog = parser.prog
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return USAGE_EXIT


def run_command(prog: str, args: argparse.Namespace,
                command: Callable[[argparse.Namespace, config_mod.Config], int]) -> int:
    """What every command line does once its arguments are parsed: set up the logs, load the
    configuration, run `command`, and turn a failure into one line and an exit code.

    A command whose parser sets `long_running=True` (a worker, the collector) keeps aiokafka's
    lines about an unreachable broker: there they are how an outage shows. Every other command
    reports that failure itself, once (see `logs.ReportedByCommand`)."""
    logs.configure(args.log_format, args.verbose, one_shot=not getattr(args, "long_running", False))
    try:
        return int(command(args, config_mod.load(args.config)))
    except UsageError as exc:
        return report_usage(prog, args, exc)
    except tuple(FAILURE_EXITS) as exc:
        return report_failure(prog, exc)
    except KeyboardInterrupt:
        return 130
