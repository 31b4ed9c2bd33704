"""The ``spina`` command."""

from __future__ import annotations

import argparse
import asyncio
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

from spina_fast import __version__
from spina_fast.config import (
    DEFAULT_DNS_ADDR,
    DEFAULT_HTTP_ADDR,
    DEFAULT_RAFT_ADDR,
    AgentConfig,
    HostPort,
    parse_host_port,
    parse_peers,
)
from spina_fast.errors import SpinaError
from spina_fast.log import configure_logging

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
    agent.add_argument("--dev", action="store_true",
                       help="single node, data in a temp dir (removed on exit), debug logging")
    agent.add_argument("--log-format", choices=("text", "json"), default="text",
                       help="text (default) or one JSON object per line")
    agent.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=None,
                       help="default: info (debug with --dev)")
    return parser


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
        datacenter=args.datacenter, dev=args.dev,
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
    parser.error(f"unknown command {args.command!r}")
