"""Snapshots taken by a forked child (the default where the OS can fork) or on the event loop: same files."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from spina_fast.config import HostPort
from spina_fast.kv.store import encode_put
from spina_fast.raft import node as node_module
from spina_fast.raft.node import RaftNode
from spina_fast.state import MODULE_KV, ReplicatedState


async def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def start_single_node(data_dir: Path, state: ReplicatedState) -> RaftNode:
    node = RaftNode("solo", HostPort("127.0.0.1", 0), {}, data_dir, state, tick_seconds=0.01,
                    snapshot_entries=20, catch_up_entries=5)
    await node.start()
    await wait_until(lambda: node.is_leader, 20, "the single node to lead")
    return node


@pytest.mark.parametrize("in_child", [True, False], ids=["forked-child", "event-loop"])
async def test_a_snapshot_holds_the_state_at_its_index_and_a_restart_loads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_child: bool
) -> None:
    if in_child and not node_module.SNAPSHOT_IN_CHILD:
        pytest.skip("this OS cannot fork")
    monkeypatch.setattr(node_module, "SNAPSHOT_IN_CHILD", in_child)
    node = await start_single_node(tmp_path, ReplicatedState())
    try:
        for index in range(100):
            await node.propose(MODULE_KV + encode_put(f"k/{index}", f"value-{index}".encode()))
        await wait_until(lambda: node.snapshot_index >= 80, 30, "a snapshot at or past index 80")
        # The newest two are kept (one may be mid-publish right now: wait for its prune).
        await wait_until(lambda: 1 <= len(list((tmp_path / "raft").glob("snap-*.snap"))) <= 2, 10,
                         "old snapshots to be pruned")
        hash_before = node.state_machine.state_hash()  # type: ignore[attr-defined]
        applied_before = node.applied_index
    finally:
        await node.stop()
    restarted = await start_single_node(tmp_path, ReplicatedState())
    try:
        assert restarted.snapshot_index >= 80
        await wait_until(lambda: restarted.applied_index >= applied_before, 20, "the WAL replay after the snapshot")
        assert restarted.state_machine.state_hash() == hash_before  # type: ignore[attr-defined]
    finally:
        await restarted.stop()


class BrokenSnapshots(ReplicatedState):
    """Serves writes but cannot serialize itself (``snapshot()`` joins these pieces; the child writes them)."""

    def snapshot_pieces(self) -> list[bytes]:
        raise RuntimeError("cannot serialize")


async def test_a_failing_snapshot_child_leaves_no_file_and_the_node_keeps_serving(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    if not node_module.SNAPSHOT_IN_CHILD:
        pytest.skip("this OS cannot fork")
    node = await start_single_node(tmp_path, BrokenSnapshots())
    try:
        for index in range(60):
            await node.propose(MODULE_KV + encode_put(f"k/{index}", b"v"))
        await wait_until(lambda: "cannot serialize" in capfd.readouterr().err, 30, "the child's report")
        assert await node.propose(MODULE_KV + encode_put("after", b"v")) is True
        assert node.snapshot_index == 0
        assert not list((tmp_path / "raft").glob("snap-*")) and not list((tmp_path / "raft").glob("*.snap.tmp"))
    finally:
        await node.stop()


def test_nodes_of_one_cluster_take_their_snapshots_at_staggered_indexes(tmp_path: Path) -> None:
    """Every node applies the same indexes: with one threshold all of them would fork at once on the same cores.
    The i-th of n members snapshots at k * snapshot_entries + i * snapshot_entries / (2n) instead."""
    # Never started: the addresses only name the members, nothing binds them.
    addresses = {name: HostPort("127.0.0.1", 7000 + number) for number, name in enumerate(["n1", "n2", "n3"])}
    nodes = [RaftNode(name, addresses[name], {peer: address for peer, address in addresses.items() if peer != name},
                      tmp_path / name, ReplicatedState(), snapshot_entries=600) for name in addresses]
    try:
        assert [node._next_snapshot_index() for node in nodes] == [600, 700, 800]
        # A late snapshot (the pacing held it back) or one installed from the leader: back to the node's phase,
        # never sooner than half the threshold after the last one.
        for node, taken_at, next_at in [(nodes[0], 650, 1200), (nodes[0], 1000, 1800), (nodes[1], 1200, 1900),
                                        (nodes[2], 1100, 1400), (nodes[2], 1201, 2000)]:
            node.snapshot_index = taken_at
            assert node._next_snapshot_index() == next_at, (node.node_id, taken_at)
    finally:
        for node in nodes:
            node.storage.close()


async def test_forwarded_writes_keep_their_order_while_the_connection_to_the_leader_comes_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A follower's writes that wait for its connection to the leader are not overtaken by later ones: a
    pipelined ``PUT a?cas=0`` ... ``PUT a`` from one client would otherwise commit the last one first."""
    addresses = {"n1": HostPort("127.0.0.1", 7001), "n2": HostPort("127.0.0.1", 7002)}
    node = RaftNode("n1", addresses["n1"], {"n2": addresses["n2"]}, tmp_path / "n1", ReplicatedState(),
                    tick_seconds=0.01)
    connected = False
    sent: list[bytes] = []
    monkeypatch.setattr(RaftNode, "leader_id", property(lambda self: "n2"))
    monkeypatch.setattr(node.transport, "is_connected", lambda peer: connected)
    monkeypatch.setattr(node, "_queue_frame", lambda peer, frame, future=None: sent.append(frame))
    node._running = True
    loop = asyncio.get_running_loop()
    names = [b"first", b"second", b"third"]
    futures = [loop.create_future() for _ in names]
    try:
        node._forward(node_module.KIND_FORWARD, names[0], futures[0])
        node._forward(node_module.KIND_FORWARD, names[1], futures[1])
        connected = True  # the third comes after the connection is up, behind two that still wait
        node._forward(node_module.KIND_FORWARD, names[2], futures[2])
        await wait_until(lambda: len(sent) == 3, 10, "the three writes to be sent to the leader")
        assert [next(name for name in names if name in frame) for frame in sent] == names
    finally:
        node._running = False
        node.storage.close()
