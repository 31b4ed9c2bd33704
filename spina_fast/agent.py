"""One Spina node: owns its data directory and runs the network front ends."""

from __future__ import annotations

import fcntl
import logging
import os
import uuid
from pathlib import Path

import orjson
from aiohttp import web

from spina_fast.api.http import build_app
from spina_fast.config import AgentConfig, HostPort
from spina_fast.errors import InvalidRequest
from spina_fast.observability.metrics import AgentMetrics

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


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.metrics = AgentMetrics()
        self._data_dir: DataDir | None = None
        self._runner: web.AppRunner | None = None
        self.bound_http_addr = config.http_addr
        # DNS and Raft listeners arrive with their issues; until then the configured addresses are reported.
        self.bound_dns_addr = config.dns_addr
        self.bound_raft_addr = config.raft_addr

    @property
    def node_uuid(self) -> str:
        return self._data_dir.node_uuid if self._data_dir else ""

    def raft_state(self) -> str:
        # A single voter is its own majority, so it leads; a node with peers has no leader until
        # the Raft transport connects it to them.
        return "Leader" if not self.config.peers else "Follower"

    def leader_address(self) -> str:
        return str(self.bound_raft_addr) if self.raft_state() == "Leader" else ""

    def voter_addresses(self) -> list[str]:
        return [str(self.bound_raft_addr), *(str(peer) for peer in self.config.peers.values())]

    async def start(self) -> None:
        self._data_dir = DataDir(self.config.data_dir, self.config.node_id)
        try:
            self._runner = web.AppRunner(build_app(self), access_log=None, handle_signals=False)
            await self._runner.setup()
            http = self.config.http_addr
            site = web.TCPSite(self._runner, http.host, http.port, backlog=1024, reuse_address=True)
            await site.start()
        except BaseException:
            await self.stop()
            raise
        host, port = self._runner.addresses[0][:2]
        self.bound_http_addr = HostPort(host, port)
        log.info("agent started", extra={"node_id": self.config.node_id, "http": str(self.bound_http_addr),
                                         "data_dir": str(self.config.data_dir)})

    def ready_line(self) -> str:
        return (f"spina agent ready http={self.bound_http_addr} dns={self.bound_dns_addr} "
                f"raft={self.bound_raft_addr} leader={self.leader_address()}")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._data_dir is not None:
            self._data_dir.close()
            self._data_dir = None
        log.info("agent stopped", extra={"node_id": self.config.node_id})
