"""One Spina node: owns its data directory and runs the network front ends."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import uuid
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

from spina_fast.api.fast_http import FastHTTPServer
from spina_fast.api.http import build_app
from spina_fast.api.registry import ResponseCache, server_registration
from spina_fast.config import AgentConfig
from spina_fast.dns import DNSServer
from spina_fast.errors import InvalidRequest, SpinaError, Unavailable
from spina_fast.observability.metrics import AgentMetrics
from spina_fast.raft.backup import BackupWriter
from spina_fast.raft.node import RaftNode
from spina_fast.registry.leases import LeaseKeeper
from spina_fast.runtime import raise_fd_limit
from spina_fast.state import ReplicatedState, encode_registry_batch

log = logging.getLogger(__name__)


class DataDir:
    """The node's directory: identity file plus an exclusive lock, so two agents never share one."""

    def __init__(self, path: Path, node_id: str) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(path / "LOCK", "a+b")  # held (and locked) for the agent's lifetime
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise InvalidRequest(f"data dir {path} is in use by another running agent") from None
        identity_path = path / "node.json"
        if identity_path.exists():
            identity = orjson.loads(identity_path.read_bytes())
            if identity["node_id"] != node_id:
                self.close()
                raise InvalidRequest(
                    f"data dir {path} belongs to node {identity['node_id']!r}, not {node_id!r}"
                )
        else:
            identity = {"node_id": node_id, "node_uuid": str(uuid.uuid4())}
            tmp = identity_path.with_suffix(".tmp")
            tmp.write_bytes(orjson.dumps(identity))
            os.replace(tmp, identity_path)
        self.node_uuid: str = identity["node_uuid"]

    def close(self) -> None:
        if not self._lock_file.closed:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()


_CONSUL_ROLES = {"leader": "Leader", "follower": "Follower", "candidate": "Candidate",
                 "pre_candidate": "Candidate"}


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.metrics = AgentMetrics()
        self.state = ReplicatedState()
        self.responses = ResponseCache()
        self._data_dir: DataDir | None = None
        self._node: RaftNode | None = None
        self._backup: BackupWriter | None = None
        self._runner: web.AppRunner | None = None
        self._http: FastHTTPServer | None = None
        self._leases: LeaseKeeper | None = None
        self._http_client: aiohttp.ClientSession | None = None
        self._background: list[asyncio.Task[None]] = []
        self.bound_http_addr = config.http_addr
        self.bound_dns_addr = config.dns_addr
        self._dns: DNSServer | None = None
        self.bound_raft_addr = config.raft_addr

    @property
    def node(self) -> RaftNode:
        if self._node is None:
            raise Unavailable("the agent is not running")
        return self._node

    @property
    def leases(self) -> LeaseKeeper:
        if self._leases is None:
            raise Unavailable("the agent is not running")
        return self._leases

    def http_client(self) -> aiohttp.ClientSession:
        """One pooled client for the requests this agent makes to others (heartbeats forwarded to the leader)."""
        if self._http_client is None or self._http_client.closed:
            self._http_client = aiohttp.ClientSession()
        return self._http_client

    @property
    def node_uuid(self) -> str:
        return self._data_dir.node_uuid if self._data_dir else ""

    def raft_state(self) -> str:
        return _CONSUL_ROLES.get(self._node.role, "Follower") if self._node else "Shutdown"

    def leader_address(self) -> str:
        return self._node.leader_address() if self._node else ""

    def voter_addresses(self) -> list[str]:
        if self._node is None:
            return []
        return [str(address) for address in self._node.addresses.values()]

    async def start(self) -> None:
        config = self.config
        raise_fd_limit()
        self._data_dir = DataDir(config.data_dir, config.node_id)
        try:
            self._node = RaftNode.from_config(config, self.state)
            if config.backup_dir is not None:
                # Observing from before the node starts: entries replayed from the WAL are shipped if missing.
                self._backup = BackupWriter(config.backup_dir / config.node_id, config.node_id,
                                            snapshot_files=self._node.snapshots.files,
                                            snapshot_now=self._node.snapshot_now, interval=config.backup_interval,
                                            base_interval=config.backup_base_interval, fsync=config.fsync)
                self._backup.start()
                self._node.on_commit = self._backup.on_commit
            self.bound_raft_addr = await self._node.start()
            self._leases = LeaseKeeper(self._node, self.state.registry)
            self._leases.start()
            # One listening port: the fast front end serves the hot routes and hands every other
            # connection to the aiohttp application (its runner has no site of its own).
            self._runner = web.AppRunner(build_app(self), access_log=None, handle_signals=False)
            await self._runner.setup()
            if self._runner.server is None:
                raise Unavailable("the aiohttp runner did not set up its server")
            self._http = FastHTTPServer(self, self._runner.server)
            self.bound_http_addr = await self._http.start(config.http_addr.host, config.http_addr.port)
            # UDP cache hits are answered by a native thread, off this loop; its cache is told of every apply.
            self._dns = DNSServer(self.state.registry, domain=config.dns_domain, ttl=config.dns_ttl,
                                  answer_limit=config.dns_answer_limit, udp="thread")
            self.state.registry_listeners.append(self._dns.registry_changed)
            self.bound_dns_addr = await self._dns.start(config.dns_addr.host, config.dns_addr.port)
            if not config.peers:
                # A single voter elects itself within one election timeout; wait so "ready" means writable.
                await self._wait_for_leader(timeout=10.0)
            self._background.append(asyncio.get_running_loop().create_task(self._register_self()))
        except BaseException:
            await self.stop()
            raise
        log.info("agent started", extra={"node_id": config.node_id, "http": str(self.bound_http_addr),
                                         "raft": str(self.bound_raft_addr), "data_dir": str(config.data_dir)})

    async def _wait_for_leader(self, timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.node.leader_id:
            if asyncio.get_running_loop().time() > deadline:
                raise Unavailable(f"no leader elected within {timeout:g}s")
            await asyncio.sleep(0.01)

    async def _register_self(self) -> None:
        """Put this agent into the catalog (service ``spina``), retrying until a leader takes it."""
        command = encode_registry_batch([server_registration(self)])
        delay = 0.05
        while True:
            if self._node is not None and self._node.leader_id:
                try:
                    await self._node.propose(command)
                    return
                except SpinaError as exc:
                    log.debug("self-registration not committed yet", extra={"error": exc.message})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    def ready_line(self) -> str:
        return (f"spina agent ready http={self.bound_http_addr} dns={self.bound_dns_addr} "
                f"raft={self.bound_raft_addr} leader={self.leader_address()}")

    async def stop(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background.clear()
        if self._leases is not None:
            await self._leases.stop()
            self._leases = None
        if self._http_client is not None:
            await self._http_client.close()
            self._http_client = None
        if self._dns is not None:
            self.state.registry_listeners.remove(self._dns.registry_changed)
            await self._dns.close()
            self._dns = None
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._node is not None:
            await self._node.stop()
            self._node = None
        if self._backup is not None:
            await self._backup.close()  # seals what the node applied last
            self._backup = None
        if self._data_dir is not None:
            self._data_dir.close()
            self._data_dir = None
        log.info("agent stopped", extra={"node_id": self.config.node_id})
