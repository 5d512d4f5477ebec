"""`pipeline hosts`: the host table the collector replicas share (topic `collector.hosts`).

    pipeline hosts list [--json]       every host, its partition and its config (no password)
    pipeline hosts add NAME            the config's [[hosts]] entry NAME, written to the table
    pipeline hosts add NAME --base-url https://build-7:4096 --password-env OPENCODE_PASSWORD_BUILD7
                                       a host given by options (options also override an entry)
    pipeline hosts remove NAME         a tombstone: the replica following NAME stops

The running replicas pick a change up within a second, without a restart or a rebalance. A
password never goes in the table: `--password-env` names the variable every replica reads it
from (each replica's environment must have it). `pipeline collect` adds its config's [[hosts]]
at start, so remove a host from the config file too, or the next start adds it back.

Registered in pipeline/cli/main.py. Only argparse is imported at module level so that building
the `pipeline` parser stays cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from typing import Any

from pipeline.config import Config
from pipeline.errors import BrokerError, ConfigError
from pipeline.kafka.security import KafkaAccess

_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


def add_parser(sub: Any) -> None:
    """Add the `hosts` subcommand to the `pipeline` subparsers."""
    from pipeline.cli.common import subcommand_options

    common = subcommand_options()
    p = sub.add_parser("hosts", help="list, add or remove the hosts the collector replicas share",
                       description=__doc__ + "\nExit 0 done, 1 the broker cannot be reached or the host is unknown, "
                       "2 a usage or configuration mistake.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, parents=[common])
    p.set_defaults(usage_parser=p)
    actions = p.add_subparsers(dest="action", required=True)
    ls = actions.add_parser("list", help="every host of the table, with its partition", parents=[common])
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add = actions.add_parser("add", help="write a host to the table (from the config's [[hosts]] or options)",
                             parents=[common])
    add.add_argument("name", help="the host's name (its key in the table)")
    add.add_argument("--base-url", help="the daemon's URL (default: the config entry's)")
    add.add_argument("--password-env", help="the variable holding its password, in every replica's environment")
    add.add_argument("--site-key", help="its site key (default: the config entry's, else siteKey)")
    add.add_argument("--model", help='"provider/model" its sessions use')
    add.add_argument("--agent", help="the opencode agent its sessions use")
    add.add_argument("--allow-insecure-http", action="store_true",
                     help="allow plain http to a non-loopback daemon (it edits files and runs commands)")
    rm = actions.add_parser("remove", help="remove a host from the table (a tombstone)", parents=[common])
    rm.add_argument("name", help="the host's name")
    for action in (ls, add, rm):
        action.set_defaults(usage_parser=action)


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Run `pipeline hosts`. Broker failures raise BrokerError (the CLI prints it, exit 1)."""
    from aiokafka.errors import KafkaError

    from pipeline.kafka.admin import refusal

    kafka = _access(cfg)
    try:
        if args.action == "list":
            return asyncio.run(_list(cfg, args.json))
        if args.action == "add":
            return asyncio.run(_add(cfg, args))
        return asyncio.run(_remove(cfg, args.name))
    except (KafkaError, TimeoutError, OSError) as exc:
        refused = refusal(kafka, exc)
        if refused is None and (kafka.sasl or kafka.tls):
            from pipeline.kafka.admin import check_access

            asyncio.run(check_access(kafka))  # a broker that does not let this client in says why
        raise refused or BrokerError(f"{kafka.describe()}: {type(exc).__name__}: {exc}") from None


def _access(cfg: Config) -> KafkaAccess:
    """`pipeline hosts` writes the host table as the operator (with the collector, the only
    principals allowed to)."""
    from pipeline.kafka.security import OPERATOR, kafka_access

    return kafka_access(cfg, OPERATOR)


def _topic() -> str:
    from pipeline.collector.settings import HOSTS_TOPIC

    return HOSTS_TOPIC


async def _list(cfg: Config, as_json: bool) -> int:
    from pipeline.collector.hosts import read_table

    table = await read_table(_access(cfg), _topic())
    rows = [{"name": name, "partition": p, **{k: v for k, v in vars(r).items() if k != "name"}}
            for name, (p, r) in sorted(table.hosts.items())]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{len(rows)} hosts in {_topic()} ({len(table.partitions)} partitions)")
    for row in rows:
        extra = f" password_env={row['password_env']}" if row["password_env"] else ""
        print(f"{row['name']:<24} p{row['partition']:<3} {row['base_url']}  site_key={row['site_key']}{extra}")
    return 0


def record_for(cfg: Config, args: argparse.Namespace, now_ms: int) -> Any:
    """The record `hosts add` writes: the config's entry of that name, overridden by options."""
    from dataclasses import replace

    from pipeline.collector.hosts import HostRecord, records_of
    from pipeline.config.loader import check_base_url

    entry = next((r for r in records_of(cfg, now_ms) if r.name == args.name), None)
    if entry is None and not args.base_url:
        known = ", ".join(h.name for h in cfg.hosts) or "none configured"
        raise ConfigError(f"host {args.name!r} is not in the config's [[hosts]] ({known}): give --base-url",
                          "--base-url")
    if args.password_env is not None and not _ENV_NAME.match(args.password_env):
        raise ConfigError("--password-env: expected an environment variable name (A-Z, 0-9, _)", "--password-env")
    record = entry or HostRecord(name=args.name, base_url=args.base_url, password_env=None,
                                 site_key=cfg.site_key, updated_at_ms=now_ms)
    overrides = {k: v for k, v in (("base_url", args.base_url and args.base_url.rstrip("/")),
                                   ("password_env", args.password_env), ("site_key", args.site_key),
                                   ("model", args.model), ("agent", args.agent)) if v}
    if args.allow_insecure_http:
        overrides["allow_insecure_http"] = True
    record = replace(record, **overrides)
    check_base_url(record.base_url, record.allow_insecure_http, "--base-url", "--allow-insecure-http")
    if entry is not None and entry.password_env is None and cfg.host(args.name).password is not None \
            and args.password_env is None:
        print(f"warning: host {args.name}'s password is inline in the config: only replicas with that [[hosts]] "
              "entry can use it; give --password-env to share it", flush=True)
    return record


async def _send(cfg: Config, key: bytes, value: bytes | None) -> None:
    from aiokafka import AIOKafkaProducer

    from pipeline.kafka.security import client_settings

    producer = AIOKafkaProducer(**client_settings(_access(cfg)), acks="all", enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(_topic(), value, key=key)
    finally:
        await producer.stop()


async def _add(cfg: Config, args: argparse.Namespace) -> int:
    import time

    record = record_for(cfg, args, int(time.time() * 1000))
    await _send(cfg, record.name.encode(), record.encode())
    print(f"added {record.name} ({record.base_url}) to {_topic()}")
    return 0


async def _remove(cfg: Config, name: str) -> int:
    from pipeline.collector.hosts import read_table

    table = await read_table(_access(cfg), _topic())
    if name not in table.hosts:
        print(f"{name} is not in {_topic()}; nothing to remove")
        return 1
    await _send(cfg, name.encode(), None)
    in_config = any(h.name == name for h in cfg.hosts)
    print(f"removed {name} from {_topic()}" + (" (it is still in this config's [[hosts]]: remove it there too, "
                                                 "or the next `pipeline collect` adds it back)" if in_config else ""))
    return 0
