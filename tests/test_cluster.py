"""A real 3-node cluster of agent processes on loopback."""

from __future__ import annotations

import base64
import json
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spina_fast._raft import encode_frame
from tests.agents import (  # noqa: F401  (call, put, ... are imported from here by other tests)
    AgentProcess,
    Cluster,
    call,
    consistent_get,
    leader_of,
    make_cluster,
    put,
    started_cluster,
    wait_until,
)
from tests.linearizability import Operation, check_history


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with started_cluster(3, tmp_path) as nodes:
        yield nodes


def test_writes_through_every_node_are_read_consistently_everywhere(cluster: Cluster) -> None:
    for node_id, agent in cluster.agents.items():
        assert put(agent, f"via/{node_id}", node_id.encode()) == b"true"
    for agent in cluster.agents.values():
        for node_id in cluster.ids:
            assert consistent_get(agent, f"via/{node_id}") == node_id.encode()


def test_peers_and_leader_are_reported_by_every_node(cluster: Cluster) -> None:
    expected = sorted(f"127.0.0.1:{port}" for port in cluster.raft_ports.values())
    for agent in cluster.agents.values():
        assert sorted(json.loads(call(agent, "GET", "/v1/status/peers")[1])) == expected
        assert call(agent, "GET", "/v1/kv/none?stale")[0] == 404


def test_leader_kill_fails_over_and_keeps_acknowledged_writes(cluster: Cluster) -> None:
    first_leader = leader_of(cluster)
    assert first_leader is not None
    survivors = [node_id for node_id in cluster.ids if node_id != first_leader]
    for index in range(20):
        put(cluster.agents[survivors[index % 2]], f"before/{index}", str(index).encode())
    cluster.agents[first_leader].process.send_signal(signal.SIGKILL)
    cluster.agents[first_leader].process.wait(10)
    new_leader = wait_until(lambda: leader_of(cluster), 20, "a new leader")
    assert new_leader in survivors
    put(cluster.agents[survivors[0]], "after/kill", b"ok")
    for index in range(20):
        assert consistent_get(cluster.agents[survivors[1]], f"before/{index}") == str(index).encode()
    # The killed node comes back from its disk and catches up.
    restarted = cluster.start(first_leader)
    wait_until(lambda: call(restarted, "GET", "/v1/kv/after/kill?raw&consistent") == (200, b"ok"), 20,
               "the old leader to catch up")


def test_restart_of_all_nodes_at_once_loses_no_acknowledged_write(cluster: Cluster) -> None:
    agents = list(cluster.agents.values())
    acknowledged = {}
    for index in range(60):
        key = f"durable/{index}"
        put(agents[index % 3], key, f"v{index}".encode())
        acknowledged[key] = f"v{index}".encode()
    for agent in agents:
        agent.process.send_signal(signal.SIGKILL)
    for agent in agents:
        agent.process.wait(10)
    cluster.start_all()
    wait_until(lambda: leader_of(cluster), 20, "a leader after the restart")
    for agent in cluster.agents.values():
        for key, value in acknowledged.items():
            assert consistent_get(agent, key) == value


def test_corrupted_wal_tail_is_truncated_and_the_node_catches_up(cluster: Cluster) -> None:
    leader = leader_of(cluster)
    follower = next(node_id for node_id in cluster.ids if node_id != leader)
    put(cluster.agents[follower], "wal/one", b"1")
    wait_until(lambda: call(cluster.agents[follower], "GET", "/v1/kv/wal/one?raw&consistent") == (200, b"1"), 10,
               "replication")
    cluster.agents[follower].process.send_signal(signal.SIGKILL)
    cluster.agents[follower].process.wait(10)
    segments = sorted((cluster.data_dirs[follower] / "raft").glob("wal-*.log"))
    assert segments, "the follower wrote no WAL segment"
    with segments[-1].open("ab") as tail:
        tail.write(b"\x00\x00\x01\x00torn record that never finished")
    put(cluster.agents[leader], "wal/two", b"2")
    restarted = cluster.start(follower)
    wait_until(lambda: call(restarted, "GET", "/v1/kv/wal/two?raw&consistent") == (200, b"2"), 20,
               "the repaired follower to catch up")
    assert consistent_get(restarted, "wal/one") == b"1"
    assert any("torn tail" in line for line in restarted.stderr_lines), "no warning about the torn tail"


def test_malformed_peer_frames_are_rejected_and_the_node_keeps_serving(cluster: Cluster) -> None:
    node_id = cluster.ids[0]
    agent = cluster.agents[node_id]
    for garbage in (b"\xff" * 64, encode_frame(200, b"n2") + b"\x00\x00\x00\x05\x01abcd\x00\x00\x00\x00",
                    encode_frame(200, b"intruder") + encode_frame(1, b"x")):
        with socket.create_connection(("127.0.0.1", cluster.raft_ports[node_id]), timeout=5) as connection:
            connection.sendall(garbage)
            connection.settimeout(5)
            try:
                assert connection.recv(1) == b""  # the node closes the connection
            except ConnectionResetError:
                pass
    assert put(agent, "still/serving", b"yes") == b"true"
    assert agent.process.poll() is None
    wait_until(lambda: any("malformed" in line or "unknown node" in line for line in agent.stderr_lines), 10,
               "a log line about the bad frames")


def test_concurrent_clients_see_a_linearizable_history(cluster: Cluster) -> None:
    seed = random.randrange(1 << 30)
    keys = ["lin/a", "lin/b", "lin/c"]
    for key in keys:
        put(cluster.agents[cluster.ids[0]], key, b"init")
    history: list[Operation] = []
    lock = threading.Lock()
    counter = iter(range(1_000_000))
    started = time.monotonic()

    def client(process: int) -> None:
        local = random.Random(seed + process)
        agents = list(cluster.agents.values())
        for _ in range(40):
            agent = local.choice(agents)
            key = local.choice(keys)
            kind = local.choice(["read", "write", "cas"])
            begin = time.monotonic() - started
            if kind == "read":
                status, body = call(agent, "GET", f"/v1/kv/{key}?consistent")
                end = time.monotonic() - started
                value = json.loads(body)[0]["Value"] if status == 200 else None
                op = Operation(process, key, "read", None, base64.b64decode(value).decode() if value else None,
                               begin, end, "ok" if status in (200, 404) else "fail")
            elif kind == "write":
                value = f"w{next(counter)}"
                status, body = call(agent, "PUT", f"/v1/kv/{key}", value.encode())
                end = time.monotonic() - started
                op = Operation(process, key, "write", value, None, begin, end,
                               "ok" if status == 200 else "info")
            else:
                status, body = call(agent, "GET", f"/v1/kv/{key}?consistent")
                if status != 200:
                    continue
                current = json.loads(body)[0]
                old = base64.b64decode(current["Value"]).decode()
                new = f"c{next(counter)}"
                begin = time.monotonic() - started
                status, body = call(agent, "PUT", f"/v1/kv/{key}?cas={current['ModifyIndex']}", new.encode())
                end = time.monotonic() - started
                op = Operation(process, key, "cas", (old, new), body == b"true" if status == 200 else None,
                               begin, end, "ok" if status == 200 else "info")
            with lock:
                history.append(op)

    threads = [threading.Thread(target=client, args=(process,)) for process in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(history) > 150, f"seed {seed}: only {len(history)} operations completed"
    result = check_history(history, initial="init")
    assert result.ok, f"seed {seed}: history not linearizable on key {result.key} (timed out: {result.timed_out})"


def test_five_node_cluster_keeps_serving_with_two_nodes_down(tmp_path: Path) -> None:
    cluster = make_cluster(5, tmp_path)
    cluster.start_all()
    try:
        leader = wait_until(lambda: leader_of(cluster), 30, "a leader of five")
        for node_id, agent in cluster.agents.items():
            put(agent, f"five/{node_id}", node_id.encode())
        victims = [leader, next(node_id for node_id in cluster.ids if node_id != leader)]
        for victim in victims:
            cluster.agents[victim].process.send_signal(signal.SIGKILL)
            cluster.agents[victim].process.wait(10)
        wait_until(lambda: leader_of(cluster), 30, "a leader among the three survivors")
        survivors = [agent for node_id, agent in cluster.agents.items() if node_id not in victims]
        put(survivors[0], "five/after", b"ok")
        for agent in survivors:
            assert consistent_get(agent, "five/after") == b"ok"
            for node_id in cluster.ids:
                assert consistent_get(agent, f"five/{node_id}") == node_id.encode()
    finally:
        cluster.stop_all()
