"""A cluster of real agent processes whose Raft traffic runs through the fault-injecting relay."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from spina_fast.testing import free_ports
from tests.agents import AgentProcess, Cluster, start_agent
from tests.chaos.relay import Network, RelayProcess

T = TypeVar("T")
STATUS_TIMEOUT = 2.0


class ClusterUnhealthy(AssertionError):
    """The cluster did not reach the state a step waits for within its deadline."""


def http_call(port: int, method: str, path: str, body: bytes | None = None,
              timeout: float = STATUS_TIMEOUT) -> tuple[int, bytes]:
    """One request on a fresh connection; OSError (refused, reset, timeout) goes to the caller."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_for(condition: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ClusterUnhealthy(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


@dataclass
class ChaosCluster(Cluster):
    """Every node's ``--peers`` point at relay ports; HTTP ports are fixed so a restarted node keeps its address."""

    relay: RelayProcess | None = None
    http_ports: dict[str, int] = field(default_factory=dict)
    relay_ports: dict[str, int] = field(default_factory=dict)  # the port every other node dials
    # Every process ever started, in order: the logs of killed incarnations still count (leaders per term).
    incarnations: list[tuple[str, AgentProcess]] = field(default_factory=list)
    paused: set[str] = field(default_factory=set)
    # Nodes that joined during the run (membership faults); they talk to the others through the relay, but
    # are dialled directly (the agent announces its own Raft address when it joins).
    extras: dict[str, AgentProcess] = field(default_factory=dict)
    extra_raft_ports: dict[str, int] = field(default_factory=dict)

    network: Network = field(init=False)

    def __post_init__(self) -> None:
        if self.relay is None:
            raise ValueError("a chaos cluster needs the relay its nodes talk through")
        self.network = Network(self.relay, self.ids)

    def args_for(self, node_id: str) -> list[str]:
        peers = ",".join(f"{other}=127.0.0.1:{self.relay_ports[other]}" for other in self.ids if other != node_id)
        return ["--node-id", node_id, "--data-dir", str(self.data_dirs[node_id]),
                "--raft-addr", f"127.0.0.1:{self.raft_ports[node_id]}",
                "--http-addr", f"127.0.0.1:{self.http_ports[node_id]}", "--dns-addr", "127.0.0.1:0",
                "--peers", peers, "--log-format", "json", *self.extra_args]

    def start(self, node_id: str) -> AgentProcess:
        agent = start_agent(*self.args_for(node_id), timeout=60)
        self.agents[node_id] = agent
        self.incarnations.append((node_id, agent))
        self.paused.discard(node_id)
        return agent

    # --- process faults ---------------------------------------------------------------------------------

    def kill(self, node_id: str) -> None:
        agent = self.agents[node_id]
        agent.process.send_signal(signal.SIGKILL)
        agent.process.wait(30)
        self.paused.discard(node_id)

    def terminate(self, node_id: str, timeout: float = 30.0) -> None:
        """SIGTERM: a clean stop (the leader hands over first), which must end with exit code 0."""
        agent = self.agents[node_id]
        try:
            code = agent.terminate(timeout)
        except subprocess.TimeoutExpired:
            agent.kill()
            raise ClusterUnhealthy(f"{node_id} did not stop within {timeout:g}s of SIGTERM") from None
        if code != 0:
            raise ClusterUnhealthy(f"{node_id} exited with code {code} on SIGTERM")

    def pause(self, node_id: str) -> None:
        self.agents[node_id].process.send_signal(signal.SIGSTOP)
        self.paused.add(node_id)

    def resume(self, node_id: str) -> None:
        if node_id in self.paused:
            self.agents[node_id].process.send_signal(signal.SIGCONT)
            self.paused.discard(node_id)

    def is_up(self, node_id: str) -> bool:
        agent = self.agents.get(node_id)
        return agent is not None and agent.process.poll() is None and node_id not in self.paused

    def up(self) -> list[str]:
        return [node_id for node_id in self.ids if self.is_up(node_id)]

    def restore_all(self) -> None:
        """Undo every fault: heal the network, resume paused nodes, restart dead ones from their data dirs."""
        self.network.heal()
        for node_id in list(self.paused):
            self.resume(node_id)
        for node_id in self.ids:
            if not self.is_up(node_id):
                self.start(node_id)

    def start_extra(self, join_via: str) -> str:
        """Start a fresh node (a new id, an empty data dir) that joins through ``join_via``'s HTTP API."""
        node_id = f"x{sum(1 for started, _ in self.incarnations if started not in self.ids) + 1}"
        raft_port, http_port = free_ports(2)
        data_dir = self.data_dirs[self.ids[0]].parent / node_id
        agent = start_agent("--node-id", node_id, "--data-dir", str(data_dir), "--raft-addr", f"127.0.0.1:{raft_port}",
                            "--http-addr", f"127.0.0.1:{http_port}", "--dns-addr", "127.0.0.1:0",
                            "--join", f"127.0.0.1:{self.http_ports[join_via]}", "--log-format", "json",
                            *self.extra_args, timeout=90)
        self.extras[node_id] = agent
        self.extra_raft_ports[node_id] = raft_port
        self.incarnations.append((node_id, agent))
        return node_id

    def stop_extra(self, node_id: str) -> None:
        self.extras.pop(node_id).terminate(30)

    def shutdown(self) -> None:
        for node_id in list(self.paused):
            self.resume(node_id)
        self.stop_all()
        for agent in self.extras.values():
            agent.kill()
        if self.relay is not None:
            self.relay.close()

    # --- status ------------------------------------------------------------------------------------------

    def node_of_raft_address(self, address: str) -> str | None:
        """Map an address from ``/v1/status/leader`` (a node's own port or a relay port) to a node id."""
        if ":" not in address:
            return None
        port = int(address.rsplit(":", 1)[1])
        for ports in (self.raft_ports, self.relay_ports, self.extra_raft_ports):
            for node_id, known in ports.items():
                if known == port:
                    return node_id
        return None

    def get_json(self, node_id: str, path: str, timeout: float = STATUS_TIMEOUT) -> Any:
        """The JSON body of a 200 answer, or None (any other status, refused, timed out)."""
        try:
            status, body = http_call(self.http_ports[node_id], "GET", path, timeout=timeout)
        except OSError:
            return None
        return json.loads(body) if status == 200 else None

    def role(self, node_id: str) -> str | None:
        answer = self.get_json(node_id, "/v1/agent/self")
        return answer["Stats"]["raft"]["state"] if answer else None

    def leader(self) -> str | None:
        """The leader every up node names, if exactly one up node says it leads and all agree on it."""
        up = self.up()
        leaders = [node_id for node_id in up if self.role(node_id) == "Leader"]
        if len(leaders) != 1:
            return None
        for node_id in up:
            named = self.get_json(node_id, "/v1/status/leader")
            if not isinstance(named, str) or self.node_of_raft_address(named) != leaders[0]:
                return None
        return leaders[0]

    def wait_healthy(self, timeout: float) -> str:
        """Wait until every node is up and all agree on one leader; the leader's id."""
        return wait_for(lambda: self.leader() if len(self.up()) == len(self.ids) else None, timeout,
                        f"every node up and agreeing on one leader (up: {self.up()})")

    def leader_status(self) -> dict[str, Any] | None:
        """``/v1/spina/raft/status`` of the up node that says it leads (None if none or several do)."""
        statuses = [self.get_json(node_id, "/v1/spina/raft/status") for node_id in self.up()]
        leading = [status for status in statuses if status and status.get("role") == "leader"]
        return leading[0] if len(leading) == 1 else None

    def bypassed_relay(self) -> list[str]:
        """Peers a node would dial around the relay (known by their real Raft port): partitions between them
        would not be real. Empty where the agent serves no ``/v1/spina/raft/status``."""
        bypassed = []
        for node_id in self.up():
            status = self.get_json(node_id, "/v1/spina/raft/status")
            for peer, address in (status or {}).get("voters", {}).items():
                if peer != node_id and peer in self.relay_ports and address != f"127.0.0.1:{self.relay_ports[peer]}":
                    bypassed.append(f"{node_id} dials {peer} at {address}")
        return bypassed

    def log_entries(self) -> list[tuple[str, dict[str, Any]]]:
        """Every JSON log line of every incarnation, with its node id."""
        entries = []
        for node_id, agent in self.incarnations:
            for line in list(agent.stderr_lines):
                if line.startswith("{"):
                    try:
                        entries.append((node_id, json.loads(line)))
                    except json.JSONDecodeError:
                        continue
        return entries

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for number, (node_id, agent) in enumerate(self.incarnations):
            parts.append(f"--- {node_id} (incarnation {number}, exit {agent.process.poll()}) ---")
            parts.extend(line.rstrip() for line in list(agent.stderr_lines)[-lines:])
        return "\n".join(parts)


def make_chaos_cluster(size: int, base_dir: Path, *extra_args: str) -> ChaosCluster:
    """Ports and relay links for ``size`` nodes; nothing runs yet except the relay (call ``start_all``)."""
    ids = [f"n{i + 1}" for i in range(size)]
    ports = free_ports(2 * size)
    relay = RelayProcess()
    cluster = ChaosCluster(ids, dict(zip(ids, ports[:size], strict=True)),
                           {node_id: base_dir / node_id for node_id in ids}, tuple(extra_args), relay=relay,
                           http_ports=dict(zip(ids, ports[size:], strict=True)))
    try:
        for node_id in ids:
            cluster.relay_ports[node_id] = relay.add_node(node_id, cluster.raft_ports[node_id])
    except BaseException:
        relay.close()
        raise
    return cluster
