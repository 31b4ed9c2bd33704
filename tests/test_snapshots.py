"""Snapshots with real agent processes: compaction, restart from snapshot + WAL, InstallSnapshot to a lagging
follower, and backups (``spina snapshot save|restore``)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.agents import AgentProcess, Cluster, start_agent, started_cluster
from tests.test_cluster import call, consistent_get, leader_of, put, wait_until

# Small thresholds so a few hundred writes go through several snapshots and compactions.
SNAPSHOT_FLAGS = ("--snapshot-entries", "40", "--snapshot-catch-up", "10")


def status(agent: AgentProcess) -> dict[str, Any]:
    code, body = call(agent, "GET", "/v1/spina/raft/status?hash", timeout=5)
    assert code == 200, body
    document = json.loads(body)
    assert isinstance(document, dict)
    return document


def write_many(agents: list[AgentProcess], prefix: str, count: int) -> dict[str, bytes]:
    """``count`` acknowledged writes spread over ``agents`` by a few concurrent clients."""
    def one(index: int) -> tuple[str, bytes]:
        key, value = f"{prefix}/{index}", f"value-{index}".encode()
        put(agents[index % len(agents)], key, value)
        return key, value

    with ThreadPoolExecutor(8) as pool:
        return dict(pool.map(one, range(count)))


def spina(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spina_fast", *args], capture_output=True, text=True, timeout=120)


def converged(agents: list[AgentProcess]) -> bool:
    states = [status(agent) for agent in agents]
    return len({(state["applied_index"], state["state_hash"]) for state in states}) == 1


def test_single_node_compacts_and_restarts_from_snapshot_and_wal(tmp_path: Path) -> None:
    args = ("--node-id", "solo", "--data-dir", str(tmp_path / "solo"), *SNAPSHOT_FLAGS)
    agent = start_agent(*args)
    try:
        written = write_many([agent], "solo", 300)
        # Snapshots run in a forked child and are paced, so the last one due may still be on its way.
        wait_until(lambda: status(agent)["snapshot_index"] >= 240, 30, "a snapshot at index 240 or later")
        before = status(agent)
        # The state hash reads the whole state on the node's loop: only on request.
        code, body = call(agent, "GET", "/v1/spina/raft/status", timeout=5)
        assert code == 200 and "state_hash" not in json.loads(body), body
        assert isinstance(before["state_hash"], str) and before["state_hash"], before
        keys_before = call(agent, "GET", "/v1/kv/solo/?recurse")
        assert before["snapshot_index"] >= 240, before
        # The in-memory log is bounded: at most a threshold's worth plus the catch-up tail.
        assert before["log_entries"] <= 40 + 10 + 40, before
        assert before["first_index"] > 200, before
        # The newest two are kept (one may be mid-publish right now: wait for its prune).
        wait_until(lambda: 1 <= len(list((tmp_path / "solo" / "raft").glob("snap-*.snap"))) <= 2, 10,
                   "old snapshots to be pruned")
    finally:
        agent.process.send_signal(signal.SIGKILL)
        agent.process.wait(10)
    agent = start_agent(*args)
    try:
        after = status(agent)
        assert after["applied_index"] >= before["applied_index"]
        # Values and Raft indexes exactly as before (the whole state hash is not compared: the agent
        # re-registers itself, with a new port, in the service registry when it starts).
        assert call(agent, "GET", "/v1/kv/solo/?recurse") == keys_before
        for key, value in list(written.items())[::17]:
            assert consistent_get(agent, key) == value
    finally:
        agent.kill()


def test_a_corrupt_snapshot_file_is_refused_loudly(tmp_path: Path) -> None:
    args = ("--node-id", "solo", "--data-dir", str(tmp_path / "solo"), *SNAPSHOT_FLAGS)
    agent = start_agent(*args)
    try:
        write_many([agent], "solo", 100)
        wait_until(lambda: status(agent)["snapshot_index"] > 0, 10, "a snapshot")
    finally:
        agent.terminate()
    newest = sorted((tmp_path / "solo" / "raft").glob("snap-*.snap"))[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r"snapshot .*snap-.* is not valid: checksum mismatch"):
        start_agent(*args)


@pytest.fixture
def snapshot_cluster(tmp_path: Path) -> Any:
    with started_cluster(3, tmp_path, *SNAPSHOT_FLAGS) as nodes:
        yield nodes


def test_a_follower_far_behind_installs_the_leaders_snapshot_and_converges(snapshot_cluster: Cluster) -> None:
    cluster = snapshot_cluster
    leader = leader_of(cluster)
    assert leader is not None
    lagging = next(node_id for node_id in cluster.ids if node_id != leader)
    cluster.agents[lagging].process.send_signal(signal.SIGKILL)
    cluster.agents[lagging].process.wait(10)
    running = [agent for node_id, agent in cluster.agents.items() if node_id != lagging]
    written = write_many(running, "lag", 400)
    # The log the lagging follower would need is gone from the leader.
    wait_until(lambda: status(cluster.agents[leader])["first_index"] > 100, 20, "compaction on the leader")
    restarted = cluster.start(lagging)
    wait_until(lambda: converged(list(cluster.agents.values())), 60, "every node at the same applied index and hash")
    assert status(restarted)["snapshot_index"] > 0
    assert any("snapshot installed" in line for line in restarted.stderr_lines)
    for key, value in list(written.items())[::23]:
        assert consistent_get(restarted, key) == value
    # It keeps following the log after the snapshot.
    put(running[0], "lag/after", b"tail")
    wait_until(lambda: call(restarted, "GET", "/v1/kv/lag/after?raw&stale") == (200, b"tail"), 20,
               "the entry after the snapshot")


def test_backup_from_a_live_cluster_restores_into_a_new_node(snapshot_cluster: Cluster, tmp_path: Path) -> None:
    cluster = snapshot_cluster
    agents = list(cluster.agents.values())
    written = write_many(agents, "backup", 120)
    backup = tmp_path / "backup.snap"
    saved = spina("snapshot", "--http-addr", agents[1].http, "save", str(backup))
    assert saved.returncode == 0, saved.stderr
    assert "index" in saved.stdout and backup.exists()
    source_keys = call(agents[1], "GET", "/v1/kv/backup/?recurse")[1]

    inspected = spina("snapshot", "inspect", str(backup))
    assert inspected.returncode == 0 and "valid" in inspected.stdout, inspected.stderr
    restored = spina("snapshot", "restore", str(backup), "--data-dir", str(tmp_path / "restored"))
    assert restored.returncode == 0, restored.stderr
    again = spina("snapshot", "restore", str(backup), "--data-dir", str(tmp_path / "restored"))
    assert again.returncode == 1 and "empty data dir" in again.stderr

    node = start_agent("--node-id", "fresh", "--data-dir", str(tmp_path / "restored"))
    try:
        # The whole KV as it was (values and Raft indexes); the state hash would differ, since an agent
        # registers itself in the service registry when it starts.
        assert call(node, "GET", "/v1/kv/backup/?recurse") == (200, source_keys)
        assert status(node)["applied_index"] >= int(saved.stdout.split("index ")[1].split(",")[0])
        for key, value in list(written.items())[::11]:
            assert consistent_get(node, key) == value
        put(node, "backup/new-cluster", b"writable")
    finally:
        node.kill()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_restore_refuses_a_damaged_backup(tmp_path: Path, damage: str) -> None:
    agent = start_agent("--node-id", "solo", "--data-dir", str(tmp_path / "solo"))
    try:
        put(agent, "k", b"v")
        backup = tmp_path / "backup.snap"
        assert spina("snapshot", "--http-addr", agent.http, "save", str(backup)).returncode == 0
    finally:
        agent.kill()
    data = backup.read_bytes()
    # A flipped bit in the state data, just before the 4-byte CRC; or the tail cut off.
    backup.write_bytes(data[:-7] if damage == "truncate" else data[:-6] + bytes([data[-6] ^ 1]) + data[-5:])
    result = spina("snapshot", "restore", str(backup), "--data-dir", str(tmp_path / "target"))
    assert result.returncode == 1
    assert "is not valid" in result.stderr
    assert ("truncated" if damage == "truncate" else "checksum mismatch") in result.stderr, result.stderr
    assert not (tmp_path / "target" / "raft").exists()
