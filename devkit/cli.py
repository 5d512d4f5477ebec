"""`pipeline-dev` (or `python -m devkit`): the development kit's commands.

    pipeline-dev kafka up|down|status      a real local Apache Kafka broker (KRaft) from Apache's jars
    pipeline-dev stub panel|scrubber ...   a contract-enforcing stub service
    pipeline-dev demo [--duration S]       everything, locally, with a live view

They read the same configuration as `pipeline` and report failures the same way: exit 0 done,
1 failed (one line says why; `kafka status`: the broker does not answer), 2 a usage or
configuration mistake. `--config`, `-v` and `--log-format` go before or after the subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from devkit.kafka_local import LocalBroker
from pipeline import config as config_mod
from pipeline.cli.common import add_global_options, subcommand_options
from pipeline.cli.errors import run_command


def local_broker(cfg: config_mod.Config, secure: bool = False) -> LocalBroker:
    """The configured local broker; a secure one keeps its data apart (`<data dir>-secure`, unless
    [kafka] local_data_dir names one): a data directory is formatted either way, once."""
    data_dir = cfg.kafka_data_dir
    if secure and not cfg.kafka.local_data_dir:
        data_dir = data_dir.with_name(data_dir.name + "-secure")
    return LocalBroker(host=cfg.kafka.local_host, port=cfg.kafka.local_port,
                       controller_port=cfg.kafka.controller_port, data_dir=data_dir,
                       cache_dir=cfg.cache_dir, version=cfg.kafka.version, heap=cfg.kafka.heap, secure=secure)


def cmd_kafka(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    broker = local_broker(cfg, args.secure)
    if args.action == "up":
        broker.start()
        print(f"kafka {broker.version} (KRaft) up at {broker.bootstrap}  data={broker.data_dir}  "
              f"log={broker.log_file}")
        if broker.secure:
            files = broker.security
            print(f"SASL_SSL with a principal per role and the pipeline's ACLs; client settings: {files.client_toml} "
                  f"(the [kafka] keys) and {files.client_env} (the same as PIPELINE_KAFKA__* plus every "
                  f"KAFKA_SASL_PASSWORD_<ROLE>; `set -a; . {files.client_env}; set +a`), CA: {files.ca_cert}")
    elif args.action == "down":
        stopped = broker.stop()
        print(f"kafka at {broker.bootstrap} stopped" if stopped else f"no local broker running for {broker.data_dir}")
    else:
        status = broker.status()
        state = "up" if status["answers"] else ("starting or stuck" if status["running"] else "down")
        print(f"kafka at {status['bootstrap']}: {state}  pid={status['pid']}  data={status['data_dir']}")
        return 0 if status["answers"] else 1
    return 0


def cmd_stub(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    module = importlib.import_module(f"devkit.stubs.{args.service}")
    return int(module.main(args.stub_args) or 0)


def cmd_demo(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from devkit import demo

    return demo.run(cfg, args.duration, args.panel_outage, secure=args.secure)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipeline-dev", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_global_options(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = subcommand_options()

    k = sub.add_parser("kafka", help="run a real local Kafka broker (KRaft) from Apache's jars", parents=[common],
                       description="up: download (once) and start the local broker, wait until it answers. "
                                   "down: stop it. status: whether it answers (exit 0) or not (exit 1).")
    k.add_argument("action", choices=["up", "down", "status"], help="start, stop, or report the local broker")
    k.add_argument("--secure", action="store_true",
                   help="the broker with a SASL_SSL listener, SCRAM users per role, ACLs (allow.everyone.if.no.acl."
                        "found=false); writes the client settings to <data dir>-secure/security/")
    k.set_defaults(run=cmd_kafka, usage_parser=k, long_running=True)

    s = sub.add_parser("stub", help="run a stub panel or scrubber that enforces the real contract", parents=[common],
                       description="Run a stub service until Ctrl-C. Options after the service name are the "
                                   "stub's own (`pipeline-dev stub panel --help` lists them).")
    s.add_argument("service", choices=["panel", "scrubber"], help="which stub to run")
    s.add_argument("stub_args", nargs=argparse.REMAINDER, help="the stub's own options (--port, ...)")
    s.set_defaults(run=cmd_stub, usage_parser=s, long_running=True)

    m = sub.add_parser("demo", help="everything, locally, with a live view (the README's main command)",
                       parents=[common])
    m.add_argument("--duration", type=float, default=None, help="seconds of workload (default: until Ctrl-C)")
    m.add_argument("--panel-outage", type=float, default=None, metavar="SECONDS",
                   help="fail the panel for this long, a quarter into the run: the breaker opens and holds")
    m.add_argument("--secure", action="store_true",
                   help="run it on a broker with TLS, SASL (a principal per stage) and ACLs")
    m.set_defaults(run=cmd_demo, usage_parser=m, long_running=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_command("pipeline-dev", args, args.run)


if __name__ == "__main__":
    sys.exit(main())
