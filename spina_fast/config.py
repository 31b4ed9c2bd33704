"""Agent configuration: parsed from the command line, validated once, frozen."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_HTTP_ADDR = "127.0.0.1:8700"
DEFAULT_DNS_ADDR = "127.0.0.1:8600"
DEFAULT_RAFT_ADDR = "127.0.0.1:8701"

_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(text: str, *, what: str) -> HostPort:
    """Parse ``HOST:PORT`` or ``[V6]:PORT``; port 0 means "any free port"."""
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{what} {text!r} is not HOST:PORT")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{what} {text!r} has a port outside 0..65535")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{what} {text!r}: host must be an IP address or localhost") from None
    return HostPort(host, int(port_text))


def validate_node_id(node_id: str) -> str:
    if not _NODE_ID.match(node_id):
        raise ValueError(
            f"node id {node_id!r} must be 1-63 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return node_id


def parse_peers(text: str) -> dict[str, HostPort]:
    """Parse ``ID=HOST:PORT,ID=HOST:PORT`` (the other voters of the cluster)."""
    peers: dict[str, HostPort] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        node_id, sep, address = item.partition("=")
        if not sep:
            raise ValueError(f"peer {item!r} is not ID=HOST:PORT")
        validate_node_id(node_id)
        if node_id in peers:
            raise ValueError(f"peer {node_id!r} is given twice")
        hp = parse_host_port(address, what=f"peer {node_id}")
        if hp.port == 0:
            raise ValueError(f"peer {node_id!r} needs a real port, not 0")
        peers[node_id] = hp
    return peers


_DNS_DOMAIN = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    node_id: str
    data_dir: Path
    http_addr: HostPort = field(default_factory=lambda: parse_host_port(DEFAULT_HTTP_ADDR, what="http"))
    dns_addr: HostPort = field(default_factory=lambda: parse_host_port(DEFAULT_DNS_ADDR, what="dns"))
    raft_addr: HostPort = field(default_factory=lambda: parse_host_port(DEFAULT_RAFT_ADDR, what="raft"))
    peers: dict[str, HostPort] = field(default_factory=dict)
    datacenter: str = "dc1"
    dev: bool = False
    # DNS: answers under <name>.service.<dns_domain>; TTL 0 like Consul; a limit > 0 rotates through instances.
    dns_domain: str = "spina"
    dns_ttl: int = 0
    dns_answer_limit: int = 0
    # Raft timing: failover takes about election_ticks..2*election_ticks ticks (0.5-1 s by default).
    tick_seconds: float = 0.05
    election_ticks: int = 10
    heartbeat_ticks: int = 2
    fsync: bool = True
    # Raft snapshots: taken once this many entries or payload bytes were applied since the last one; the log
    # keeps snapshot_catch_up_entries behind it so a slightly lagging follower needs no snapshot.
    snapshot_entries: int = 100_000
    snapshot_bytes: int = 64 << 20
    snapshot_catch_up_entries: int = 1_000
    # HTTP address of a running member: a node with an empty data dir asks it to be added as a learner.
    join: HostPort | None = None
    # Continuous backup (raft/backup.py): committed entries shipped to backup_dir/<node_id>/, sealed at least
    # every backup_interval seconds (the RPO, at most 60 s); node snapshots copied as bases at most once per
    # backup_base_interval seconds (0: every one).
    backup_dir: Path | None = None
    backup_interval: float = 10.0
    backup_base_interval: float = 600.0

    def __post_init__(self) -> None:
        validate_node_id(self.node_id)
        if self.node_id in self.peers:
            raise ValueError(f"--peers lists this node's own id {self.node_id!r}")
        if not _DNS_DOMAIN.fullmatch(self.dns_domain):
            raise ValueError(f"DNS domain {self.dns_domain!r} is not a dot-separated list of DNS labels")
        if not 0 <= self.dns_ttl <= 2**31 - 1:
            raise ValueError(f"DNS TTL {self.dns_ttl} is outside 0..2147483647 seconds")
        if self.dns_answer_limit < 0:
            raise ValueError(f"DNS answer limit {self.dns_answer_limit} must not be negative")
        if not 0.001 <= self.tick_seconds <= 10:
            raise ValueError(f"raft tick {self.tick_seconds}s is outside 0.001..10 s")
        if not 1 <= self.heartbeat_ticks < self.election_ticks:
            raise ValueError("raft heartbeat ticks must be at least 1 and fewer than the election ticks")
        if self.snapshot_entries < 1:
            raise ValueError(f"snapshot entries threshold {self.snapshot_entries} must be at least 1")
        if self.snapshot_bytes < 1024:
            raise ValueError(f"snapshot bytes threshold {self.snapshot_bytes} must be at least 1024")
        if self.snapshot_catch_up_entries < 0:
            raise ValueError("snapshot catch-up entries must not be negative")
        if self.join is not None and self.peers:
            raise ValueError("--join adds this node to a running cluster; --peers bootstraps a new one: give one")
        if self.join is not None and self.join.port == 0:
            raise ValueError("--join needs the member's real HTTP port, not 0")
        if not 0.1 <= self.backup_interval <= 60:
            raise ValueError(f"backup interval {self.backup_interval:g}s is outside 0.1..60 s: it bounds the RPO, "
                             "which must stay within a minute")
        if self.backup_base_interval < 0:
            raise ValueError(f"backup base interval {self.backup_base_interval:g}s must not be negative")
        if not re.match(r"^[a-z0-9][a-z0-9_-]{0,62}$", self.datacenter):
            raise ValueError(f"datacenter {self.datacenter!r} must be lower-case letters, digits, '_' or '-'")

