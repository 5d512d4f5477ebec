"""The options every command takes, accepted before and after the subcommand.

`pipeline --config F lag` and `pipeline lag --config F` mean the same: an operator adds the
config file where it is natural, and argparse would otherwise answer the second with
"unrecognized arguments". The top-level parser holds the defaults; each subcommand's parser
takes the same options with `argparse.SUPPRESS` defaults, so a value given after the
subcommand wins and an absent one leaves the top-level value alone.
"""

from __future__ import annotations

import argparse
from typing import Any

CONFIG_HELP = "TOML config file (default: $PIPELINE_CONFIG, else built-in defaults)"
VERBOSE_HELP = "debug lines, the libraries' (httpx, aiokafka, faust) included; without it they show warnings only"
LOG_FORMAT_HELP = "log lines: text for people (default), json for log shippers, one object a line"


def _add(p: Any, **defaults: Any) -> None:
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP, **defaults)
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP, **defaults)
    p.add_argument("--log-format", choices=["text", "json"], help=LOG_FORMAT_HELP,
                   **(defaults or {"default": "text"}))


def add_global_options(p: argparse.ArgumentParser) -> None:
    """`--config`, `-v`, `--log-format` with their defaults, on the top-level parser."""
    _add(p)


def subcommand_options() -> argparse.ArgumentParser:
    """A parent parser (`parents=[...]`) giving a subcommand the same options, defaults
    suppressed so they override the top-level ones only when given."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("common options (also accepted before the subcommand)")
    _add(group, default=argparse.SUPPRESS)
    return parent
