"""Leadership transfer and membership changes with real agent processes on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agents import AgentProcess, Cluster, start_agent, started_cluster
from tests.test_cluster import call, consistent_get, leader_of, wait_until
from tests.test_snapshots import converged, status


def spina(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spina_fast", *args], capture_output=True, text=True, timeout=120)


class Writer:
    """A client writing distinct keys in a loop through the agents it is given; records what was acknowledged."""

    def __init__(self, agents: list[AgentProcess], prefix: str) -> None:
        self.agents = list(agents)
        self.prefix = prefix
        self.acknowledged: dict[str, bytes] = {}
        self.failures: list[str] = []
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        index = 0
        while not self._stop.is_set():
            agent = self.agents[index % len(self.agents)]
            key, value = f"{self.prefix}/{index}", str(index).encode()
            started = time.monotonic()
            try:
                code, body = call(agent, "PUT", f"/v1/kv/{key}", value, timeout=15)
            except OSError as exc:
                code, body = 0, str(exc).encode()
            self.slowest = max(self.slowest, time.monotonic() - started)
            if code == 200 and body == b"true":
                self.acknowledged[key] = value
            else:
                self.failures.append(f"{key}: {code} {body[:200]!r}")
            index += 1

    def wait_for(self, count: int, timeout: float = 30) -> None:
        target = len(self.acknowledged) + count
        wait_until(lambda: len(self.acknowledged) >= target, timeout, f"{count} more acknowledged writes")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with started_cluster(3, tmp_path) as nodes:
        yield nodes


def test_transfer_leader_moves_leadership_to_the_named_voter(cluster: Cluster) -> None:
    leader = leader_of(cluster)
    assert leader is not None
    target = next(node_id for node_id in cluster.ids if node_id != leader)
    follower = next(node_id for node_id in cluster.ids if node_id not in (leader, target))
    # Asked on a follower: the request is forwarded to the leader.
    result = spina("cluster", "--http-addr", cluster.agents[follower].http, "transfer-leader", "--to", target)
    assert result.returncode == 0, result.stderr
    assert f"leader is now {target}" in result.stdout
    assert wait_until(lambda: leader_of(cluster) == target, 10, f"every node to name {target}")
    # Without --to the most up-to-date other voter takes over.
    code, body = call(cluster.agents[target], "POST", "/v1/spina/cluster/transfer-leader")
    assert code == 200, body
    assert json.loads(body)["leader"] != target
    code, body = call(cluster.agents[target], "POST", "/v1/spina/cluster/transfer-leader", b'{"to": "nobody"}')
    assert code in (400, 503) and b"not a voter" in body, body


def test_sigterm_of_the_leader_hands_over_without_failing_writes(cluster: Cluster) -> None:
    leader = leader_of(cluster)
    assert leader is not None
    followers = [cluster.agents[node_id] for node_id in cluster.ids if node_id != leader]
    with Writer(followers, "rolling") as writer:
        writer.wait_for(20)
        assert cluster.agents[leader].terminate() == 0
        new_leader = wait_until(lambda: leader_of(cluster), 10, "the new leader")
        writer.wait_for(20)
    assert new_leader != leader
    assert not writer.failures, writer.failures[:5]
    assert any("raft role changed role=follower" in line for line in cluster.agents[leader].stderr_lines)
    restarted = cluster.start(leader)
    for key, value in list(writer.acknowledged.items())[::7]:
        assert consistent_get(restarted, key) == value


def test_a_fourth_node_joins_under_traffic_and_nodes_are_removed(cluster: Cluster, tmp_path: Path) -> None:
    agents = list(cluster.agents.values())
    with Writer(agents, "members") as writer:
        writer.wait_for(30)
        joiner = start_agent("--node-id", "n4", "--data-dir", str(tmp_path / "n4"), "--join", agents[0].http)
        cluster.agents["n4"] = joiner
        wait_until(lambda: "n4" in status(agents[1])["voters"], 30, "n4 promoted to voter")
        assert status(joiner)["role"] == "follower"
        writer.wait_for(30)

        leader = leader_of(cluster)
        follower = next(node_id for node_id in ("n1", "n2", "n3") if node_id != leader)
        result = spina("cluster", "--http-addr", joiner.http, "remove", follower)
        assert result.returncode == 0, result.stderr
        writer.agents = [agent for node_id, agent in cluster.agents.items() if node_id != follower]
        cluster.agents.pop(follower).kill()
        writer.wait_for(30)

        # Removing the leader: it hands over first, then the new leader removes it.
        leader = wait_until(lambda: leader_of(cluster), 20, "a leader")
        assert isinstance(leader, str)
        remaining = [agent for node_id, agent in cluster.agents.items() if node_id != leader]
        code, body = call(remaining[0], "POST", "/v1/spina/cluster/remove", json.dumps({"node_id": leader}).encode())
        assert code == 200, body
        writer.agents = remaining
        cluster.agents.pop(leader).kill()
        writer.wait_for(30)
    final = list(cluster.agents.values())
    assert len(final) == 2
    voters = status(final[0])["voters"]
    assert sorted(voters) == sorted(cluster.agents), voters
    wait_until(lambda: converged(final), 30, "the remaining members to converge")
    assert len(writer.acknowledged) > 100
    for key, value in list(writer.acknowledged.items())[::5]:
        for agent in final:
            assert consistent_get(agent, key) == value
    # Joining again under a member's id with another address is refused.
    member = next(iter(cluster.agents))
    code, body = call(final[0], "POST", "/v1/spina/cluster/join",
                      json.dumps({"node_id": member, "raft_addr": "127.0.0.1:1"}).encode())
    assert code == 400 and b"already a member" in body, body
