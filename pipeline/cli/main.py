"""The `pipeline` command: everything an operator does, one subcommand each.

Exit codes: 0 done, 1 failed (one line on stderr says why: a broker or an opencode host that
cannot be reached, ...), 2 a usage or configuration mistake. `pipeline lag` adds 3 (a stage
has no running member) and 4 (a stage over --max-lag / --max-drain-s); `pipeline opencode`
adds 3 (the turn ended in an error). Library logs (httpx, aiokafka, faust) show warnings only;
-v shows everything. `--config`, `-v` and `--log-format` go before or after the subcommand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipeline import config as config_mod
from pipeline import logs
from pipeline.cli.common import add_global_options, subcommand_options
from pipeline.cli.errors import UsageError, run_command
from pipeline.cli.progress import waiting
from pipeline.errors import PipelineError
from pipeline.topics import hours_ms

log = logging.getLogger("pipeline")
# Young-generation collection threshold for long-running processes (tune_gc); CPython's is 700.
GC_YOUNG_THRESHOLD = 50_000

# The worker's --loglevel names (faust's) and the logging level each sets on the libraries.
LOGLEVELS = {"crit": "CRITICAL", "error": "ERROR", "warn": "WARNING", "info": "INFO", "debug": "DEBUG"}
EXIT_TURN_FAILED = 3  # `pipeline opencode`: the turn ended in an error (the model's API, a failed tool)

Command = Callable[[argparse.Namespace, config_mod.Config], int]
COMMANDS: dict[str, Command] = {}


def command(name: str) -> Callable[[Command], Command]:
    """Register `fn` as the `pipeline NAME` subcommand."""
    def register(fn: Command) -> Command:
        COMMANDS[name] = fn
        return fn

    return register


def operator(cfg: config_mod.Config) -> Any:
    """How the operator commands (topics, lag, dead, hosts) connect: as the `operator` role."""
    from pipeline.kafka.security import OPERATOR, kafka_access

    return kafka_access(cfg, OPERATOR)


@command("topics")
def cmd_topics(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from pipeline.kafka import admin
    kafka, parts = operator(cfg), cfg.kafka.partitions
    bootstrap = kafka.bootstrap
    if args.action == "create":
        with waiting(f"creating the topic table on Kafka at {bootstrap}"):
            result = asyncio.run(admin.create_topics(kafka, parts, cfg.kafka.replication,
                                                     hours_ms(cfg.kafka.unscrubbed_retention_hours),
                                                     timeout_s=args.timeout))
        if result["created"]:
            print(f"created {len(result['created'])} topics: {', '.join(result['created'])}")
        if result["updated"]:
            print(f"set the table's retention on {len(result['updated'])} topics: {', '.join(result['updated'])}")
        if not result["created"] and not result["updated"]:
            print(f"all {len(result['existing'])} topics already exist; nothing changed")
        for line in result["mismatched"]:
            print(f"warning: {line}", file=sys.stderr)
        return 0
    with waiting(f"reading topics from Kafka at {bootstrap}"):
        states = asyncio.run(admin.topic_states(kafka, parts, timeout_s=args.timeout))
    if args.json:
        print(json.dumps([s.__dict__ | {"exists": s.exists} for s in states], indent=2))
        return 0
    print(f"{'topic':<20} {'partitions':>10} {'on broker':>10}  {'compacted':<9} {'key':<22} schema")
    for s in states:
        actual = str(s.actual_partitions) if s.exists else "missing"
        print(f"{s.name:<20} {s.wanted_partitions:>10} {actual:>10}  {s.compacted!s:<9} {s.key:<22} {s.schema}")
    return 0


@command("worker")
def cmd_worker(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    import faust

    from agents.registry import build_stage
    from pipeline import metrics

    app = build_stage(args.stage, cfg)  # argparse already refused a stage not in STAGE_MODULES

    from agents.runtime import app_access
    from pipeline.kafka.lag import export_lag_forever

    kafka = app_access(app)
    if kafka.sasl or kafka.tls:
        from pipeline.kafka.admin import check_access

        # faust would retry a refused login for ever: a wrong password, an untrusted certificate
        # or a mechanism the listener lacks is a start-up error naming it (exit 1)
        asyncio.run(check_access(kafka))

    @app.task
    async def export_lag() -> None:
        # every replica exports its group's lag; dashboards take max by (stage, topic, partition)
        await export_lag_forever(kafka, args.stage, interval_s=15.0)
    metrics.serve(args.metrics_port if args.metrics_port is not None else cfg.metrics.port, cfg.metrics.host,
                  health=app.liveness.check)
    # faust's worker replaces the root logger's handlers when it starts: hand it the chosen format,
    # and --loglevel as the level of faust, mode and aiokafka (the dict is applied as given, so
    # faust's own loglevel argument would not reach them)
    loglevel = args.loglevel or ("debug" if args.verbose else "warn")
    worker = faust.Worker(app, loglevel=loglevel, quiet=True,
                          logging_config=logs.dict_config(args.log_format, args.verbose,
                                                          library_level=LOGLEVELS[loglevel]))
    # faust's terminal spinner, when on, sets the root logger to DEBUG so that it can spin on
    # every record: each debug line of faust and aiokafka would then be formatted
    worker.spinner = None
    tune_gc()
    worker.execute_from_commandline()
    return 0


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for a process that decodes records all day.

    A batch of decoded records (a 21 KB snapshot is ~1 500 objects) outlives several of the
    default 700-allocation young collections, is promoted, and keeps triggering collections
    of the older generations, each walking every long-lived object of faust, aiokafka and the
    imported modules.
    Freezing what start-up allocated takes those objects out of every later collection, and a
    larger young generation lets a batch die young. Reference cycles are still collected."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)


@command("collect")
def cmd_collect(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from pipeline.collector import service

    return service.run(cfg, args.metrics_port)


@command("hosts")
def cmd_hosts(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from pipeline.cli import hosts as hosts_cli

    return hosts_cli.run(args, cfg)


@command("budget")
def cmd_budget(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from pipeline.cli import budget as budget_cli

    return budget_cli.run(args, cfg)


@command("replay")
def cmd_replay(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from pipeline.cli import replay as replay_cli

    return replay_cli.run(args, cfg)


@command("opencode")
def cmd_opencode(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    """Run one turn on a configured host, or the same prompt on several hosts at once (a new
    session on each, all concurrently), and say how each turn ended.

    `prompt` answers with the turn's last message only, and a turn that failed (the model's
    API answered an error, a tool failed) still answers 200: so the turn's messages are read
    back and checked, and a failed turn exits EXIT_TURN_FAILED with each error on stderr
    instead of printing an empty answer and exiting 0. Every host named is looked up, and its
    client built, before anything is sent: an unknown name sends nothing to any host."""
    from pipeline.clients.opencode import OpencodeClient

    hosts = _opencode_hosts(args, cfg)
    clients = [OpencodeClient(h.base_url, h.password.reveal() if h.password else None,
                              allow_insecure_http=h.allow_insecure_http, model=h.model, agent=h.agent)
               for h in hosts]
    if args.action == "continue" or (len(hosts) == 1 and not args.all_hosts):
        return _one_turn(args, hosts[0], clients[0])
    return _turns_on_hosts(args, hosts, clients)


# Several hosts' exit codes as one: the first of these that any host has (a host that could not
# run the turn, then a turn that ended in an error, then all well). A usage or configuration
# mistake (2) is the whole command's, found before any host is sent anything.
EXIT_WORST_FIRST = (1, EXIT_TURN_FAILED, 0)


def _opencode_hosts(args: argparse.Namespace, cfg: config_mod.Config) -> list[config_mod.HostConfig]:
    """The [[hosts]] entries `--host` (once; repeated for run-task) or `--all-hosts` name. Every
    name is checked before any turn starts: an unknown one is a configuration error (exit 2)."""
    names: list[str] = args.hosts
    if args.action == "continue":
        if len(names) > 1:
            raise UsageError("continue takes one --host: the session lives on one host")
        return [cfg.host(names[0])]
    if args.all_hosts:
        if not cfg.hosts:
            raise config_mod.ConfigError("--all-hosts: no [[hosts]] entry is configured", "hosts")
        return list(cfg.hosts)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"--host {', '.join(twice)} given more than once (each host runs the prompt once)")
    return [cfg.host(name) for name in names]


def _host_failure(host: config_mod.HostConfig, exc: Exception) -> str:
    """Why `host` could not run the turn, in one line, with what to check."""
    from pipeline.clients.opencode import OpencodeAuthError, OpencodeUnavailable

    if isinstance(exc, OpencodeAuthError):
        what = "; check [[hosts]] password / password_env"
    elif isinstance(exc, OpencodeUnavailable):
        what = "; check that `opencode serve` runs there and that [[hosts]] base_url names it"
    else:
        what = ""
    return f"opencode host {host.name} at {host.base_url}: {' '.join(str(exc).split())}{what}"


async def _run_turn(args: argparse.Namespace, host: config_mod.HostConfig, client: Any,
                    say: Callable[[str], None]) -> dict[str, Any]:
    """One turn on `host`: a new session (run-task) or `args.session_id` (continue), the prompt,
    and the turn's messages read back. `say` tells the spinner what it waits for."""
    from pipeline.clients.opencode import turn_messages

    async with client:
        session_id = args.session_id if args.action == "continue" else None
        if session_id is None:
            session_id = str((await client.create_session(title=args.title, agent=host.agent))["id"])
        say(f"waiting for the turn to end on host {host.name} (session {session_id})")
        result = dict(await client.continue_session(session_id, args.prompt))
        say(f"reading the turn's messages from host {host.name}")
        result["messages"] = turn_messages(await client.messages(session_id), result["response"])
        return result


def _turn_json(result: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    return {"session_id": result["session_id"], "ok": not errors, "errors": errors, "reply": result["reply"],
            "messages": result["messages"], "response": result["response"]}


def _one_turn(args: argparse.Namespace, host: config_mod.HostConfig, client: Any) -> int:
    """`pipeline opencode` on one host: the session id and the reply (or JSON); a host that
    cannot run the turn is the command's failure (one line, exit 1)."""
    from pipeline.clients.opencode import OpencodeAuthError, OpencodeUnavailable, turn_errors

    async def run() -> dict[str, Any]:
        with waiting(f"connecting to opencode host {host.name} at {host.base_url}") as say:
            return await _run_turn(args, host, client, say)

    try:
        result = asyncio.run(run())
    except (OpencodeUnavailable, OpencodeAuthError) as exc:
        raise PipelineError(_host_failure(host, exc)) from None
    errors = turn_errors(result["messages"])
    if args.json:
        print(json.dumps(_turn_json(result, errors), indent=2, default=str))
    else:
        print(f"session {result['session_id']}")
        if result["reply"]:
            print(result["reply"])
    for line in errors:
        print(f"pipeline opencode: the turn ended in an error: {line} (session {result['session_id']})",
              file=sys.stderr)
    return EXIT_TURN_FAILED if errors else 0


def _turns_on_hosts(args: argparse.Namespace, hosts: Sequence[config_mod.HostConfig], clients: Sequence[Any]) -> int:
    """`pipeline opencode run-task` on several hosts at once: each host's outcome (a block of
    text naming the host, or one JSON object with its `host`), and the worst exit code of
    theirs. A host that cannot run the turn does not stop the others."""
    from pipeline.clients.opencode import OpencodeError, turn_errors

    names = [h.name for h in hosts]

    async def run() -> list[dict[str, Any] | str]:
        with waiting(f"running the turn on {len(hosts)} opencode hosts: {', '.join(names)}") as say:
            pending = set(names)

            async def one(host: config_mod.HostConfig, client: Any) -> dict[str, Any] | str:
                try:
                    return await _run_turn(args, host, client, lambda _text: None)
                except OpencodeError as exc:
                    return _host_failure(host, exc)
                finally:
                    pending.discard(host.name)
                    if pending:
                        say(f"waiting for the turn to end on {', '.join(n for n in names if n in pending)}")

            return list(await asyncio.gather(*(one(h, c) for h, c in zip(hosts, clients, strict=True))))

    outcomes = asyncio.run(run())
    codes: list[int] = []
    documents: list[dict[str, Any]] = []
    for index, (host, outcome) in enumerate(zip(hosts, outcomes, strict=True)):
        if isinstance(outcome, str):
            codes.append(1)
            documents.append({"host": host.name, "session_id": None, "ok": False, "errors": [outcome],
                              "reply": "", "messages": [], "response": None, "exit_code": 1})
            if not args.json:
                print(("\n" if index else "") + f"host {host.name}: no turn (the host could not run it)")
            print(f"pipeline: {outcome}", file=sys.stderr)
            continue
        errors = turn_errors(outcome["messages"])
        code = EXIT_TURN_FAILED if errors else 0
        codes.append(code)
        documents.append({"host": host.name, **_turn_json(outcome, errors), "exit_code": code})
        if not args.json:
            print(("\n" if index else "") + f"host {host.name}: session {outcome['session_id']}")
            if outcome["reply"]:
                print(outcome["reply"])
        for line in errors:
            print(f"pipeline opencode: the turn ended in an error on host {host.name}: {line} "
                  f"(session {outcome['session_id']})", file=sys.stderr)
    if args.json:
        print(json.dumps(documents, indent=2, default=str))
    return next(code for code in EXIT_WORST_FIRST if code in codes)


@command("lag")
def cmd_lag(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from pipeline.cli import lag as lag_cli
    return lag_cli.run(args, cfg)


@command("dead")
def cmd_dead(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from pipeline.kafka import deadletters
    if args.action == "list":
        if args.id or args.all:
            raise UsageError("--id and --all are for `dead redrive`")
        with waiting(f"reading dead letters from Kafka at {cfg.kafka.bootstrap}"):
            letters = asyncio.run(deadletters.read(operator(cfg), args.topic, timeout_s=args.timeout))
        # the original bytes are session content (unscrubbed up to the scrub stage): shown only on request
        shown = [deadletters.shown(d, original=args.show_original) for d in letters]
        if args.json:
            rows = [r | {"_topic": d.topic, "_offset": d.offset} for d, r in zip(letters, shown, strict=True)]
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{len(letters)} dead letters")
        for d, r in zip(letters, shown, strict=True):
            target = deadletters.redrive_target(d.topic) or "(not redrivable)"
            print(f"{d.topic}[{d.partition}]@{d.offset}  {r.get('dead_id')}  stage={r.get('stage')}  "
                  f"reason={r.get('reason')}  -> {target}\n    {str(r.get('error'))[:200]}")
            if args.show_original:
                print(f"    original: {r.get('original')}")
        return 0
    if not args.topic or not (args.id or args.all):
        raise UsageError("dead redrive needs --topic T and one of --id ID or --all")
    if args.show_original:
        raise UsageError("--show-original is for `dead list`")
    target = deadletters.redrive_target(args.topic)
    if target is None:
        raise UsageError(f"{args.topic} cannot be redriven: nothing reads its letters again "
                         "(inspect them with `pipeline dead list`)")
    with waiting(f"redriving {args.topic} to {target} on Kafka at {cfg.kafka.bootstrap}"):
        done = asyncio.run(deadletters.redrive(operator(cfg), args.topic, dead_id=args.id,
                                               timeout_s=args.timeout))
    for d in done:
        print(f"redrove {d.record.get('dead_id')} ({d.record.get('reason')}) -> {deadletters.redrive_target(d.topic)}")
    print(f"{len(done)} redriven")
    return 0


@command("kafka")
def cmd_kafka(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    """`pipeline kafka acls`: grant every principal of the pipeline what it needs and nothing
    else, as the `admin` role (idempotent)."""
    from pipeline.kafka import admin
    from pipeline.kafka.acls import by_principal, pipeline_acls
    from pipeline.kafka.security import ADMIN, kafka_access

    template = cfg.kafka.sasl_username
    if not template:
        raise UsageError("pipeline kafka acls grants to SASL principals: set [kafka] security_protocol = "
                         "\"SASL_SSL\" and sasl_username (e.g. \"pipeline-{role}\")")
    if "{role}" not in template:
        raise UsageError(f"[kafka] sasl_username = {template!r} gives every role the same principal, so no ACL "
                         "can tell the stages apart; use a template with {role} (e.g. \"pipeline-{role}\")")
    wanted = pipeline_acls(template)
    if args.dry_run:
        if args.json:
            print(json.dumps([a.__dict__ for a in wanted], indent=2))
        else:
            for who, acls in by_principal(wanted).items():
                print(who)
                for acl in acls:
                    print(f"  {acl.operation:<14} {acl.resource:<6} {acl.name}")
        return 0
    kafka = kafka_access(cfg, ADMIN)
    with waiting(f"applying {len(wanted)} ACLs on {kafka.describe()}"):
        result = asyncio.run(admin.apply_acls(kafka, wanted, prune=args.prune, timeout_s=args.timeout))
    if args.json:
        print(json.dumps({k: [a.__dict__ for a in v] for k, v in result.items()}, indent=2))
        return 0
    for acl in result["created"]:
        print(f"granted: {acl}")
    for acl in result["removed"]:
        print(f"removed: {acl}")
    print(f"{len(result['created'])} granted, {len(result['existing'])} already there"
          + (f", {len(result['removed'])} removed" if args.prune else ""))
    return 0


def _timeout(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def _add_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=_timeout, default=10.0, metavar="S",
                   help="seconds to wait for the broker to answer before giving up (default 10)")


def parser() -> argparse.ArgumentParser:
    """The `pipeline` parser. Cheap to build: no aiokafka, faust or httpx import."""
    from agents.registry import STAGE_MODULES
    from pipeline.topics import dead_letter_topics

    p = argparse.ArgumentParser(prog="pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_global_options(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = subcommand_options()

    def add(name: str, parent: Any = sub, **kwargs: Any) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, parents=[common], **kwargs)
        sp.set_defaults(usage_parser=sp)
        return sp

    t = add("topics", help="create or list the topic table on the broker",
            description="create: make every topic of the table that is missing and bring the retention of "
                        "existing ones to the table's (idempotent). list: the table against the broker. "
                        "Exit 0 done, 1 the broker cannot be reached, 2 a usage or configuration mistake.")
    t.add_argument("action", choices=["create", "list"], help="create the missing topics, or list the table")
    t.add_argument("--json", action="store_true", help="list: print JSON instead of a table")
    _add_timeout(t)

    w = add("worker", help="run one stage (its own consumer group) until stopped",
            description="Run one stage's faust worker until SIGTERM or Ctrl-C. Exit 0 stopped, "
                        "2 a configuration mistake (a missing secret is named).")
    w.add_argument("stage", choices=list(STAGE_MODULES),
                   help="the stage to run (passthrough is the wiring check, never deployed)")
    w.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve /metrics and /healthz on PORT (default: [metrics] port; 0: off)")
    w.add_argument("--loglevel", default=None, choices=list(LOGLEVELS),
                   help="level of faust, mode and aiokafka log lines (default: warn, debug with -v); "
                        "the pipeline's own lines are info (debug with -v)")
    w.set_defaults(long_running=True)

    c = add("collect", help="follow this replica's share of the opencode hosts (all of them when alone)",
            description="Publish the config's [[hosts]] to collector.hosts, join the collector group, and read "
                        "the events of the hosts this replica is given into opencode.events until SIGTERM or "
                        "Ctrl-C. Exit 0 stopped, 1 broker unreachable, 2 a configuration mistake.")
    c.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve /metrics and /healthz on PORT (default: [metrics] port; 0: off)")
    c.set_defaults(long_running=True)

    turn_codes = ("Exit 0 the turn ended well, 1 the host cannot be reached or refused the request, "
                  "2 a usage or configuration mistake (an unknown --host), 3 the turn ended in an error "
                  "(the model's API failed, a tool failed): each error on stderr.")
    several = (" On several hosts the exit code is the worst of theirs, 1 before 3 before 0: a host that "
               "cannot run the turn does not stop the others; an unknown name is exit 2 before anything is sent.")
    o = add("opencode", help="run a coding task on one or several configured opencode hosts",
            description="Send a prompt to an [[hosts]] daemon, or the same prompt to several at once, and wait "
                        "for the turn to end. " + turn_codes + several)
    osub = o.add_subparsers(dest="action", required=True, metavar="ACTION")
    rt = add("run-task", osub, help="create a session, send the prompt, wait for the turn (on one host or several)",
             description="Create a session on the host, send the prompt, wait for the turn to end and print "
                         "the session id and the reply. With several hosts (--host repeated, or --all-hosts) "
                         "the same prompt goes to each at once, a new session on each, and each host's "
                         "result is printed: a block naming the host, or with --json a list of the per-host "
                         "objects, each with its `host` (and `exit_code`). " + turn_codes + several)
    co = add("continue", osub, help="send a prompt to an existing session, wait for the turn",
             description="Send the prompt to an existing session of one host, wait for the turn to end and "
                         "print the session id and the reply. " + turn_codes)
    targets = rt.add_mutually_exclusive_group(required=True)
    targets.add_argument("--host", dest="hosts", action="append", metavar="NAME",
                         help="the [[hosts]] entry's name; repeat it to send the same prompt to several hosts "
                              "at once (one new session on each)")
    targets.add_argument("--all-hosts", action="store_true",
                         help="send the same prompt to every configured [[hosts]] entry at once")
    co.add_argument("--host", dest="hosts", action="append", required=True, metavar="NAME",
                    help="the [[hosts]] entry's name (one: the session lives on that host)")
    rt.add_argument("--json", action="store_true",
                    help="print the turn as JSON: session_id, ok, errors, reply and the turn's messages; "
                         "with several hosts, a list of those objects, each with its host")
    co.add_argument("--json", action="store_true",
                    help="print the turn as JSON: session_id, ok, errors, reply and the turn's messages")
    rt.add_argument("--title", help="the new session's title (each host's, with several)")
    co.add_argument("session_id", metavar="SESSION_ID", help="the session to continue (ses_...)")
    for op in (rt, co):
        op.add_argument("prompt", help="what to ask (the prompt text)")

    d = add("dead", help="inspect and redrive dead letters",
            description="list: every dead letter (reason, error, where it would go back to). redrive: put "
                        "letters back on the topic of the stage that failed them. Exit 0 done, 1 the broker "
                        "cannot be reached or nothing could be redriven (a missing --id, letters that do not "
                        "fit their target), 2 a usage or configuration mistake.")
    d.add_argument("action", choices=["list", "redrive"], help="list the letters, or redrive them")
    d.add_argument("--topic", choices=dead_letter_topics(), metavar="TOPIC",
                   help=f"one dead-letter topic (list: default all; redrive: required); one of "
                        f"{', '.join(dead_letter_topics())}")
    which = d.add_mutually_exclusive_group()
    which.add_argument("--id", help="redrive: this dead letter (its dead_id)")
    which.add_argument("--all", action="store_true", help="redrive: every dead letter not redriven before")
    d.add_argument("--json", action="store_true", help="list: print JSON instead of text")
    d.add_argument("--show-original", action="store_true",
                   help="list: include each letter's original bytes (session content, unscrubbed before scrub)")
    _add_timeout(d)

    k = add("kafka", help="Kafka security: grant the pipeline's principals their ACLs",
            description="acls: grant every stage, the collector and the operator the ACLs they need and "
                        "nothing else, computed from the topic table, to the principals [kafka] sasl_username "
                        "names (`pipeline-{role}`); idempotent, connects as the admin role "
                        "(KAFKA_SASL_PASSWORD_ADMIN). Exit 0 done, 1 the broker cannot be reached or refused, "
                        "2 a usage or configuration mistake.")
    k.add_argument("action", choices=["acls"], help="apply the ACLs")
    k.add_argument("--dry-run", action="store_true", help="print the ACLs, change nothing (no broker needed)")
    k.add_argument("--prune", action="store_true",
                   help="also remove ALLOW ACLs of these principals that the pipeline does not need")
    k.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_timeout(k)

    from pipeline.cli import budget as budget_cli
    from pipeline.cli import hosts as hosts_cli
    from pipeline.cli import lag as lag_cli
    from pipeline.cli import replay as replay_cli
    lag_cli.add_parser(sub)
    hosts_cli.add_parser(sub)
    replay_cli.add_parser(sub)
    budget_cli.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_command("pipeline", args, COMMANDS[args.command])


if __name__ == "__main__":
    sys.exit(main())
