"""The ``spina`` command."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import re
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from spina_fast import __version__, cluster_cli, prometheus_cli
from spina_fast.config import (
    DEFAULT_DNS_ADDR,
    DEFAULT_HTTP_ADDR,
    DEFAULT_RAFT_ADDR,
    AgentConfig,
    HostPort,
    parse_host_port,
    parse_peers,
)
from spina_fast.errors import InvalidRequest, SpinaError
from spina_fast.events import cli as events_cli
from spina_fast.log import configure_logging
from spina_fast.runtime import tune_gc

log = logging.getLogger("spina_fast")


class _Parser(argparse.ArgumentParser):
    """Bad flags get one line on stderr and exit code 2 (argparse would print the usage too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _default_node_id() -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname().split(".")[0])[:63].strip("-._")
    return name or "node1"


def _address(what: str) -> Callable[[str], HostPort]:
    def parse(text: str) -> HostPort:
        try:
            return parse_host_port(text, what=what)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def _peers(text: str) -> dict[str, HostPort]:
    try:
        return parse_peers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spina", description="Keiko Spina: service registry, discovery, config and events.")
    parser.add_argument("--version", action="version", version=f"spina {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    agent = commands.add_parser(
        "agent", help="run one Spina node",
        description="Run one Spina node. Without --peers it is a single-node cluster. "
                    "Prints 'spina agent ready ...' when it serves; SIGTERM stops it cleanly.",
    )
    agent.add_argument("--node-id", default=None,
                       help="this node's id (default: the host name; 'dev' with --dev)")
    agent.add_argument("--data-dir", type=Path, default=None,
                       help="where the node keeps its state (default: ./spina-data; a temp dir with --dev)")
    agent.add_argument("--http-addr", type=_address("--http-addr"), default=DEFAULT_HTTP_ADDR,
                       metavar="HOST:PORT", help=f"HTTP API (default {DEFAULT_HTTP_ADDR}; port 0 picks one)")
    agent.add_argument("--dns-addr", type=_address("--dns-addr"), default=DEFAULT_DNS_ADDR,
                       metavar="HOST:PORT", help=f"DNS, UDP and TCP (default {DEFAULT_DNS_ADDR})")
    agent.add_argument("--raft-addr", type=_address("--raft-addr"), default=DEFAULT_RAFT_ADDR,
                       metavar="HOST:PORT", help=f"Raft peer traffic (default {DEFAULT_RAFT_ADDR})")
    agent.add_argument("--peers", type=_peers, default={}, metavar="ID=HOST:PORT,...",
                       help="the other voters of the cluster (none: single-node cluster)")
    agent.add_argument("--datacenter", default="dc1", help="datacenter name reported to Consul clients")
    agent.add_argument("--dns-domain", default="spina", metavar="DOMAIN",
                       help="DNS answers <name>.service.DOMAIN (default spina)")
    agent.add_argument("--dns-ttl", type=int, default=0, metavar="SECONDS",
                       help="TTL of DNS answers (default 0: clients ask every time, like Consul)")
    agent.add_argument("--dns-answer-limit", type=int, default=0, metavar="N",
                       help="at most N instances per DNS answer, rotating through them (default 0: all)")
    agent.add_argument("--dev", action="store_true",
                       help="single node, data in a temp dir (removed on exit), debug logging")
    agent.add_argument("--log-format", choices=("text", "json"), default="text",
                       help="text (default) or one JSON object per line")
    agent.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=None,
                       help="default: info (debug with --dev)")

    kv = commands.add_parser("kv", help="read and write the replicated key/value store",
                             description="Read and write the KV store of a running agent (Consul KV API).")
    kv.add_argument("--http-addr", default=DEFAULT_HTTP_ADDR, metavar="HOST:PORT", help="the agent to talk to")
    kv_commands = kv.add_subparsers(dest="kv_command", metavar="ACTION", parser_class=_Parser)
    kv_commands.required = True
    get = kv_commands.add_parser("get", help="print a key's value")
    get.add_argument("key")
    get.add_argument("--consistent", action="store_true", help="linearizable read (asks the leader)")
    put = kv_commands.add_parser("put", help="set a key ('-' as VALUE reads standard input)")
    put.add_argument("key")
    put.add_argument("value")
    put.add_argument("--flags", type=int, default=None, help="opaque unsigned 64-bit flags")
    put.add_argument("--cas", type=int, default=None,
                     help="only if the key's ModifyIndex is this (0: only if the key does not exist)")
    delete = kv_commands.add_parser("del", help="delete a key (or a prefix with --recurse)")
    delete.add_argument("key")
    delete.add_argument("--recurse", action="store_true")
    delete.add_argument("--cas", type=int, default=None)
    ls = kv_commands.add_parser("ls", help="list keys under a prefix")
    ls.add_argument("prefix", nargs="?", default="")
    ls.add_argument("--separator", default="", help="group keys below this separator (e.g. /)")
    _add_config_parser(commands)
    cluster_cli.add_agent_flags(agent)
    cluster_cli.add_parsers(commands)
    prometheus_cli.add_parsers(commands)
    events_cli.add_parsers(commands)
    return parser


def _add_config_parser(commands: argparse._SubParsersAction[_Parser]) -> None:
    config = commands.add_parser(
        "config", help="layered configuration: resolve, history, diff, rollback",
        description="Layered configuration under config/ (global < env < service < service+env), with the "
                    "history of every change. Keys are full keys, e.g. config/service/api/env/prod/timeout.")
    config.add_argument("--http-addr", default=DEFAULT_HTTP_ADDR, metavar="HOST:PORT", help="the agent to talk to")
    actions = config.add_subparsers(dest="config_command", metavar="ACTION", parser_class=_Parser)
    actions.required = True
    resolve = actions.add_parser("resolve", help="print the effective configuration of a service",
                                 description="Every effective name with its value, the layer it comes from "
                                             "and its version.")
    resolve.add_argument("--service", default=None, help="the service (adds its service layers)")
    resolve.add_argument("--env", default=None, help="the environment (adds its env layers)")
    resolve.add_argument("--json", action="store_true", help="the agent's JSON document")
    history = actions.add_parser("history", help="list the versions of a key, newest first")
    history.add_argument("key")
    history.add_argument("--limit", type=int, default=None, help="at most this many versions")
    history.add_argument("--json", action="store_true", help="the agent's JSON document")
    diff = actions.add_parser("diff", help="show what changed between two versions of a key",
                              description="Unified diff between two versions (default: the latest and the one "
                                          "before it). JSON values are compared in a canonical indented form.")
    diff.add_argument("key")
    diff.add_argument("--from", dest="from_version", type=int, default=None, metavar="V1")
    diff.add_argument("--to", dest="to_version", type=int, default=None, metavar="V2", help="default: the latest")
    diff.add_argument("--json", action="store_true", help="JSON, with RFC 6902 changes for JSON values")
    rollback = actions.add_parser("rollback", help="write an old version of a key as a new version")
    rollback.add_argument("key")
    rollback.add_argument("--to", dest="to_version", type=int, required=True, metavar="V")
    tree = actions.add_parser("rollback-tree", help="restore every key under a prefix to a point in time, atomically",
                              description="Restore every key under PREFIX to its state at --time (RFC 3339 with a "
                                          "zone, or unix seconds) or right after Raft index --index, in one "
                                          "atomic write; keys created since are deleted.")
    tree.add_argument("prefix")
    when = tree.add_mutually_exclusive_group(required=True)
    when.add_argument("--time", default=None, help="e.g. 2026-01-31T12:00:00Z or 1769860800")
    when.add_argument("--index", type=int, default=None, help="a Raft index (the 'index' of a history entry)")
    tree.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    for writer in (rollback, tree):
        writer.add_argument("--author", default=None, help="recorded in the history (default: your user name)")
        writer.add_argument("--description", default="", help="recorded in the history")


def _run_kv(args: argparse.Namespace) -> int:
    from spina_fast.client.http import AgentClient

    client = AgentClient(args.http_addr)
    path = f"/v1/kv/{getattr(args, 'key', getattr(args, 'prefix', ''))}"
    if args.kv_command == "get":
        response = client.request("GET", path, query={"raw": "", **({"consistent": ""} if args.consistent else {})},
                                  allow_404=True)
        if response.status == 404:
            print(f"spina kv get: key {args.key!r} not found", file=sys.stderr)
            return 1
        sys.stdout.buffer.write(response.body)
        if response.body and not response.body.endswith(b"\n") and sys.stdout.isatty():
            sys.stdout.write("\n")
        return 0
    if args.kv_command == "put":
        value = sys.stdin.buffer.read() if args.value == "-" else args.value.encode()
        query = {name: str(getattr(args, name)) for name in ("flags", "cas") if getattr(args, name) is not None}
        ok = client.request("PUT", path, query=query, body=value).json()
        if not ok:
            print(f"spina kv put: check-and-set failed: {args.key!r} has changed", file=sys.stderr)
            return 1
        return 0
    if args.kv_command == "del":
        query = {"recurse": ""} if args.recurse else {}
        if args.cas is not None:
            query["cas"] = str(args.cas)
        ok = client.request("DELETE", path, query=query).json()
        if not ok:
            print(f"spina kv del: check-and-set failed: {args.key!r} has changed", file=sys.stderr)
            return 1
        return 0
    query = {"keys": "", **({"separator": args.separator} if args.separator else {})}
    response = client.request("GET", path, query=query, allow_404=True)
    names = response.json() if response.status == 200 else []
    assert isinstance(names, list)
    for name in names:
        print(name)
    return 0


def _change_headers(args: argparse.Namespace) -> dict[str, str]:
    author = args.author
    if author is None:
        try:
            author = getpass.getuser()
        except (OSError, KeyError):  # no login name and no $USER / $LOGNAME
            author = ""
    if "\n" in author or "\n" in args.description:
        raise InvalidRequest("--author and --description travel in HTTP headers and must be one line")
    # HTTP header values are bytes; the agent reads them as UTF-8, urllib writes them as Latin-1.
    return {"X-Spina-Author": author.encode().decode("latin-1"),
            "X-Spina-Description": args.description.encode().decode("latin-1")}


def _run_config(args: argparse.Namespace) -> int:
    from spina_fast.client.http import AgentClient

    client = AgentClient(args.http_addr)
    base = "/v1/spina/config"
    command = args.config_command
    if command == "resolve":
        query = {name: getattr(args, name) for name in ("service", "env") if getattr(args, name) is not None}
        view = client.request("GET", f"{base}/resolve", query=query).json()
        assert isinstance(view, dict)
        if args.json:
            print(json.dumps(view, indent=2))
            return 0
        for name, item in view.items():
            print(f"{name} = {item['value']}  ({item['layer']}, v{item['version']})")
        return 0
    if command == "history":
        query = {"limit": str(args.limit)} if args.limit else {}
        versions = client.request("GET", f"{base}/history/{args.key}", query=query).json()
        assert isinstance(versions, list)
        if args.json:
            print(json.dumps(versions, indent=2))
            return 0
        for version in versions:
            content = "(deleted)" if version["deleted"] else json.dumps(version["value"])
            if len(content) > 60:
                content = content[:57] + "..."
            print(f"v{version['version']}  {version['time']}  index {version['index']}  "
                  f"{version['author'] or '-'}  {content}  {version['description']}".rstrip())
        return 0
    if command == "diff":
        query = {name: str(value) for name, value in (("from", args.from_version), ("to", args.to_version))
                 if value is not None}
        if args.json:
            query["format"] = "json"
        response = client.request("GET", f"{base}/diff/{args.key}", query=query)
        sys.stdout.write(json.dumps(response.json(), indent=2) + "\n" if args.json else response.body.decode())
        return 0
    if command == "rollback":
        result = client.request("POST", f"{base}/rollback/{args.key}", query={"to": str(args.to_version)},
                                headers=_change_headers(args)).json()
        assert isinstance(result, dict)
        if result["changed"]:
            print(f"{args.key}: version {args.to_version} restored as version {result['version']}")
        else:
            print(f"{args.key}: already as in version {args.to_version} (deleted); nothing written")
        return 0
    query = {"time": args.time} if args.time is not None else {"index": str(args.index)}
    if args.dry_run:
        query["dry-run"] = ""
    result = client.request("POST", f"{base}/rollback-tree/{args.prefix}", query=query,
                            headers=_change_headers(args)).json()
    assert isinstance(result, dict)
    for change in result["changes"]:
        restored = f"version {change['restored']}" if change["restored"] else "absent"
        print(f"{change['action']:6}  {change['key']}  (back to {restored})")
    verb = "would change" if args.dry_run else "changed"
    print(f"{len(result['changes'])} key(s) {verb}")
    return 0


def _agent_config(args: argparse.Namespace) -> tuple[AgentConfig, Path | None]:
    temp_dir = None
    data_dir = args.data_dir
    if data_dir is None and args.dev:
        temp_dir = Path(tempfile.mkdtemp(prefix="spina-dev-"))
        data_dir = temp_dir
    if args.dev and args.peers:
        raise ValueError("--dev runs a single node; drop --peers or --dev")
    node_id = args.node_id or ("dev" if args.dev else _default_node_id())
    config = AgentConfig(
        node_id=node_id, data_dir=data_dir or Path("spina-data"), http_addr=args.http_addr,
        dns_addr=args.dns_addr, raft_addr=args.raft_addr, peers=args.peers,
        datacenter=args.datacenter, dev=args.dev, dns_domain=args.dns_domain, dns_ttl=args.dns_ttl,
        dns_answer_limit=args.dns_answer_limit, **cluster_cli.agent_config_fields(args),
    )
    return config, temp_dir


async def _run_agent(config: AgentConfig) -> int:
    from spina_fast.agent import Agent

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    agent = Agent(config)
    await agent.start()
    tune_gc()
    print(agent.ready_line(), flush=True)
    try:
        await stop.wait()
        log.info("stopping on signal")
    finally:
        await agent.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "agent":
        try:
            config, temp_dir = _agent_config(args)
        except ValueError as exc:
            parser.exit(2, f"spina agent: error: {exc}\n")
        configure_logging(args.log_format, args.log_level or ("debug" if args.dev else "info"))
        import uvloop

        try:
            return uvloop.run(_run_agent(config))
        except SpinaError as exc:
            print(f"spina agent: error: {exc.message}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"spina agent: error: {exc}", file=sys.stderr)
            return 1
        finally:
            if temp_dir is not None:
                shutil.rmtree(temp_dir, ignore_errors=True)
    clients = {"kv": _run_kv, "config": _run_config, "cluster": cluster_cli.run_cluster,
               "snapshot": cluster_cli.run_snapshot, "prometheus": prometheus_cli.run_prometheus}
    clients["events"] = events_cli.run_events
    if args.command in clients:
        try:
            return clients[args.command](args)
        except SpinaError as exc:
            print(f"spina {args.command}: error: {exc.message}", file=sys.stderr)
            return 1
    parser.error(f"unknown command {args.command!r}")
