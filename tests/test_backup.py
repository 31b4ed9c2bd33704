"""Continuous backup (change data capture) and point-in-time recovery.

In-process: the writer and the reader of ``spina_fast.raft.backup`` against a real ``ReplicatedState`` (round
trips, gaps and bases, merged streams, damage of every kind, time targets). Real processes: a 3-node cluster
shipping to a backup folder, restored as of an index and as of a time into a new node; a leader killed with
``kill -9`` during writes (the achieved RPO is measured and printed); damaged backups refused by the CLI.
"""

from __future__ import annotations

import asyncio
import random
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import consul
import pytest

from spina_fast._raft import ENTRY_CONFIG, ENTRY_NORMAL
from spina_fast.config import AgentConfig
from spina_fast.errors import InvalidRequest
from spina_fast.kv.store import encode_put
from spina_fast.raft.backup import (
    BackupCorrupted,
    BackupError,
    BackupWriter,
    encode_segment,
    parse_time,
    scan_backup,
    segment_name,
)
from spina_fast.raft.snapshots import SnapshotCorrupted, SnapshotStore
from spina_fast.state import MODULE_KV, ReplicatedState
from tests.agents import AgentProcess, Cluster, make_cluster, start_agent
from tests.test_cluster import call, leader_of, put, wait_until
from tests.test_snapshots import spina, status

SEED = 20240501
Entry = tuple[int, int, bytes]


def kv_entry(index: int, term: int, key: str, value: bytes) -> Entry:
    return index, term, bytes([ENTRY_NORMAL]) + MODULE_KV + encode_put(key, value)


class FakeNode:
    """Applies entries to a real ReplicatedState the way the Ready loop does, with snapshot files like a node's;
    remembers the state hash after every index."""

    def __init__(self, raft_dir: Path, term: int = 1) -> None:
        self.state = ReplicatedState()
        self.snapshots = SnapshotStore(raft_dir, fsync=False, keep=3)
        self.applied = 0
        self.term = term
        self.hashes: dict[int, str] = {}
        self.entries: list[Entry] = []

    def make(self, count: int, rng: random.Random) -> list[Entry]:
        entries = []
        for index in range(self.applied + 1, self.applied + count + 1):
            if rng.random() < 0.05:
                entries.append((index, self.term, bytes([ENTRY_CONFIG]) + b"{}"))  # not replayed by a restore
            else:
                entries.append(kv_entry(index, self.term, f"key/{rng.randrange(40)}", f"v{index}".encode()))
        return entries

    def apply(self, entries: list[Entry]) -> list[Entry]:
        for index, _, payload in entries:
            if payload[0] == ENTRY_NORMAL:
                self.state.apply(index, payload[1:])
            self.applied = index
            self.hashes[index] = self.state.state_hash()
        self.entries += entries
        return entries

    def take_snapshot(self) -> None:
        self.snapshots.write(self.applied, self.term, None, self.state.snapshot())

    def snapshot_now(self) -> tuple[int, int, Any, bytes]:
        return self.applied, self.term, None, self.state.snapshot()

    def writer(self, directory: Path, node_id: str = "n1") -> BackupWriter:
        return BackupWriter(directory, node_id, snapshot_files=self.snapshots.files, snapshot_now=self.snapshot_now,
                            interval=0.1, base_interval=0, fsync=False)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def rebuilt_hash(directories: list[Path], target: int) -> str:
    return scan_backup(directories).rebuild(target).state_hash


def kv_of(data: bytes, prefix: str) -> dict[str, bytes]:
    state = ReplicatedState()
    state.restore(data)
    return {entry.key: entry.value for entry in state.kv.scan(prefix)}


# --- in-process: writer and reader ------------------------------------------------------------------------


def test_writer_ships_batches_and_a_restart_resumes_without_duplicates(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    node = FakeNode(tmp_path / "raft")
    stream = tmp_path / "backup" / "n1"

    async def first_run() -> None:
        writer = node.writer(stream)
        writer.start()
        for _ in range(6):
            writer.on_commit(node.apply(node.make(rng.randrange(1, 30), rng)))
            await asyncio.sleep(0.12)  # a few intervals: several segments
        await writer.close()

    run(first_run())
    shipped = node.applied
    assert len(list(stream.glob("seg-*.cdc"))) >= 2

    async def second_run() -> None:
        writer = node.writer(stream)
        writer.start()
        # A restart replays the WAL from the node's snapshot: the overlap is not shipped twice.
        writer.on_commit(node.entries[shipped - 10:])
        writer.on_commit(node.apply(node.make(25, rng)))
        await writer.close()

    run(second_run())
    backup = scan_backup([tmp_path / "backup"])
    assert backup.runs() == [(1, node.applied)]
    assert not list(stream.glob("*.tmp"))
    for target in [1, *rng.sample(range(2, node.applied), 8), shipped, node.applied]:
        assert rebuilt_hash([tmp_path / "backup"], target) == node.hashes[target], f"index {target}, seed {SEED}"


def test_a_gap_in_what_the_node_applies_is_bridged_by_a_base_snapshot(tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    node = FakeNode(tmp_path / "raft")
    stream = tmp_path / "backup" / "n1"

    async def scenario() -> None:
        writer = node.writer(stream)
        writer.start()
        writer.on_commit(node.apply(node.make(30, rng)))
        # The node installs a snapshot at 60 from the leader: entries 31..60 never pass through the Ready loop.
        node.apply(node.make(30, rng))
        node.take_snapshot()
        writer.on_commit(node.apply(node.make(20, rng)))
        await writer.close()

    run(scenario())
    assert [path.name for path in stream.glob("base-*.snap")] == ["base-00000000000000000060-00000000000000000001.snap"]
    for target in (20, 30, 60, 61, 80):
        assert rebuilt_hash([stream], target) == node.hashes[target]
    with pytest.raises(BackupError, match=r"gap: no stream holds indexes 31\.\.60 after .*seg-0+1-0+30\.cdc"):
        rebuilt_hash([stream], 45)


def test_a_gap_without_a_snapshot_file_takes_the_current_state_as_base(tmp_path: Path) -> None:
    rng = random.Random(SEED + 2)
    node = FakeNode(tmp_path / "raft")
    stream = tmp_path / "backup" / "n1"

    async def scenario() -> None:
        node.apply(node.make(40, rng))  # history from before the stream began, no snapshot file
        writer = node.writer(stream)
        writer.start()
        writer.on_commit(node.apply(node.make(10, rng)))
        await writer.close()

    run(scenario())
    assert [path.name for path in stream.glob("base-*.snap")] == ["base-00000000000000000050-00000000000000000001.snap"]
    assert rebuilt_hash([stream], 50) == node.hashes[50]
    assert scan_backup([stream]).restorable() == (50, 50)


def test_streams_of_several_nodes_cover_each_others_gaps(tmp_path: Path) -> None:
    rng = random.Random(SEED + 3)
    node = FakeNode(tmp_path / "raft")
    batches = [node.apply(node.make(rng.randrange(5, 25), rng)) for _ in range(8)]

    async def ship(node_id: str, count: int) -> None:
        writer = node.writer(tmp_path / "backup" / node_id, node_id)
        writer.start()
        for batch in batches[:count]:
            writer.on_commit(batch)
            await asyncio.sleep(0.12)
        await writer.close()

    run(ship("n1", 8))
    run(ship("n2", 5))  # killed early
    segments = sorted((tmp_path / "backup" / "n1").glob("seg-*.cdc"))
    lost = segments[1]
    lost.unlink()  # n1 lost one of its segments; n2 holds those indexes
    assert rebuilt_hash([tmp_path / "backup"], node.applied) == node.hashes[node.applied]
    with pytest.raises(BackupError, match="gap"):
        rebuilt_hash([tmp_path / "backup" / "n1"], node.applied)


def test_streams_that_disagree_are_refused(tmp_path: Path) -> None:
    entries = [kv_entry(index, 1, f"k{index}", b"a") for index in range(1, 11)]
    other = [kv_entry(index, 2 if index > 5 else 1, f"k{index}", b"b" if index > 5 else b"a")
             for index in range(1, 11)]
    for node_id, stream in (("n1", entries), ("n2", other)):
        directory = tmp_path / node_id
        directory.mkdir()
        (directory / segment_name(1, 10)).write_bytes(b"".join(encode_segment(node_id, [(100.0, stream)], 101.0)))
    with pytest.raises(BackupError, match=r"streams disagree at index 6: .*n2/seg-.* holds term 2, .*n1/seg-"):
        scan_backup([tmp_path])


def _one_stream(tmp_path: Path, count: int = 20) -> tuple[Path, Path]:
    directory = tmp_path / "backup" / "n1"
    directory.mkdir(parents=True)
    entries = [kv_entry(index, 1, f"k{index}", b"value" * 3) for index in range(1, count + 1)]
    segment = directory / segment_name(1, count)
    segment.write_bytes(b"".join(encode_segment("n1", [(100.0, entries)], 101.0)))
    return directory, segment


@pytest.mark.parametrize("seed", range(12))
def test_any_flipped_byte_in_a_segment_is_refused_with_its_offset(tmp_path: Path, seed: int) -> None:
    directory, segment = _one_stream(tmp_path)
    data = bytearray(segment.read_bytes())
    position = random.Random(seed).randrange(len(data))
    data[position] ^= 1 << random.Random(seed).randrange(8)
    segment.write_bytes(bytes(data))
    with pytest.raises(BackupCorrupted, match=rf"{segment.name} is damaged at byte offset \d+: ") as raised:
        scan_backup([directory])
    # The offset names the damaged record (or the header), never a place after the damage.
    assert raised.value.offset <= position or "truncated" in raised.value.reason, (seed, position, raised.value)


@pytest.mark.parametrize("seed", range(6))
def test_a_truncated_segment_is_refused(tmp_path: Path, seed: int) -> None:
    directory, segment = _one_stream(tmp_path)
    data = segment.read_bytes()
    cut = random.Random(seed).randrange(1, len(data))
    segment.write_bytes(data[:cut])
    with pytest.raises(BackupCorrupted, match=r"truncated|too short|runs past the end"):
        scan_backup([directory])


def test_extra_bytes_a_wrong_name_and_a_damaged_base_are_refused(tmp_path: Path) -> None:
    directory, segment = _one_stream(tmp_path)
    segment.write_bytes(segment.read_bytes() + b"\0")
    with pytest.raises(BackupCorrupted, match="1 unexpected bytes after the last record"):
        scan_backup([directory])
    segment.write_bytes(segment.read_bytes()[:-1])
    renamed = segment.rename(directory / segment_name(1, 19))
    with pytest.raises(BackupCorrupted, match=r"header holds indexes 1\.\.20 .* file name says 1\.\.19"):
        scan_backup([directory])
    renamed.rename(segment)
    base = directory / "base-00000000000000000020-00000000000000000001.snap"
    state = ReplicatedState()
    SnapshotStore(tmp_path / "snaps", fsync=False).write(20, 1, None, state.snapshot())
    data = bytearray(next((tmp_path / "snaps").glob("snap-*.snap")).read_bytes())
    data[-2] ^= 0xFF
    base.write_bytes(bytes(data))
    with pytest.raises(SnapshotCorrupted, match=r"base-0+20-0+1\.snap is not valid: checksum mismatch"):
        scan_backup([directory]).rebuild(20)


def test_a_segment_being_written_when_the_node_died_is_ignored(tmp_path: Path) -> None:
    directory, _ = _one_stream(tmp_path)
    (directory / (segment_name(21, 30) + ".tmp")).write_bytes(b"SPNCDC01 half a segment")
    backup = scan_backup([directory])
    assert backup.restorable() == (1, 20)
    assert kv_of(backup.rebuild(20).data, "k") == {f"k{index}": b"value" * 3 for index in range(1, 21)}


def test_a_time_target_takes_the_earliest_commit_time_of_any_stream(tmp_path: Path) -> None:
    entries = [kv_entry(index, 1, f"k{index}", b"v") for index in range(1, 11)]
    # n1 (the leader) applied each entry first; n2 a little later; n3's clock stepped back at index 6.
    stamps = {"n1": [100.0 + index for index in range(1, 11)], "n2": [100.5 + index for index in range(1, 11)],
              "n3": [100.0 + index if index < 6 else 90.0 + index for index in range(1, 11)]}
    for node_id, times in stamps.items():
        directory = tmp_path / node_id
        directory.mkdir()
        batches = [(stamp, [entry]) for stamp, entry in zip(times, entries, strict=True)]
        (directory / segment_name(1, 10)).write_bytes(b"".join(encode_segment(node_id, batches, 200.0)))
    assert scan_backup([tmp_path / "n1", tmp_path / "n2"]).index_at_time(105.2) == 5
    assert scan_backup([tmp_path / "n2"]).index_at_time(105.2) == 4
    # A later index never counts as older than an earlier one: the prefix stops at the first newer entry.
    assert scan_backup([tmp_path / "n3"]).index_at_time(104.5) == 4
    with pytest.raises(BackupError, match="holds nothing committed at or before"):
        scan_backup([tmp_path / "n1"]).index_at_time(50.0)


def test_times_targets_and_intervals_are_validated(tmp_path: Path) -> None:
    assert parse_time("1700000000.5") == 1700000000.5
    assert parse_time("2023-11-14T22:13:20Z") == parse_time("2023-11-14T22:13:20") == 1700000000.0
    assert parse_time("2023-11-14T23:13:20+01:00") == 1700000000.0
    with pytest.raises(InvalidRequest, match="neither unix seconds nor an ISO 8601 time"):
        parse_time("yesterday")
    with pytest.raises(ValueError, match=r"outside 0\.1\.\.60 s"):
        AgentConfig(node_id="n1", data_dir=tmp_path, backup_dir=tmp_path, backup_interval=61)
    node = FakeNode(tmp_path / "raft")
    with pytest.raises(ValueError, match="the interval is the RPO"):
        BackupWriter(tmp_path, "n1", snapshot_files=node.snapshots.files, snapshot_now=node.snapshot_now,
                     interval=0.01)
    directory, _ = _one_stream(tmp_path)
    with pytest.raises(BackupError, match="past the end of the backup: it holds indexes up to 20"):
        scan_backup([directory]).rebuild(21)
    with pytest.raises(BackupError, match="no backup stream in"):
        scan_backup([tmp_path / "raft"])


# --- real processes ---------------------------------------------------------------------------------------

# Small thresholds: a few hundred writes go through several node snapshots, each copied as a base.
CLUSTER_FLAGS = ("--snapshot-entries", "40", "--snapshot-catch-up", "10", "--backup-base-interval", "0")


def backup_cluster(tmp_path: Path, interval: float) -> Cluster:
    cluster = make_cluster(3, tmp_path, *CLUSTER_FLAGS, "--backup-dir", str(tmp_path / "backup"),
                           "--backup-interval", str(interval))
    cluster.start_all()
    return cluster


def modify_index(cluster: Cluster, key: str) -> int:
    host, port = next(iter(cluster.running().values())).http.rsplit(":", 1)
    _, entry = consul.Consul(host=host, port=int(port)).kv.get(key, consistency="consistent")
    assert entry is not None, key
    return int(entry["ModifyIndex"])


def _all_applied(agents: list[AgentProcess], index: int) -> bool:
    return all(status(agent)["applied_index"] >= index for agent in agents)


def restored_kv(tmp_path: Path, name: str, prefix: str, *restore_args: str) -> dict[str, bytes]:
    """Restore the backup into a new data dir, start a single node on it, and read its KV with python-consul."""
    restored = spina("snapshot", "restore", "--from-backup", str(tmp_path / "backup"), "--data-dir",
                     str(tmp_path / name), *restore_args)
    assert restored.returncode == 0, restored.stderr
    node = start_agent("--node-id", name, "--data-dir", str(tmp_path / name))
    try:
        host, port = node.http.rsplit(":", 1)
        _, entries = consul.Consul(host=host, port=int(port)).kv.get(prefix, recurse=True)
        return {entry["Key"]: entry["Value"] for entry in entries or []}
    finally:
        node.kill()


def backup_reaches(directory: Path, index: int) -> bool:
    if not any(directory.glob("seg-*.cdc")):
        return False  # nothing sealed yet
    restorable = scan_backup([directory]).restorable()
    return restorable is not None and restorable[1] >= index


def test_a_cluster_is_restored_as_of_an_index_and_as_of_a_time(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    cluster = backup_cluster(tmp_path, interval=0.5)
    try:
        wait_until(lambda: leader_of(cluster), 20, "a leader")
        agents = list(cluster.agents.values())
        acked: list[tuple[str, bytes, float]] = []
        middle_index = 0
        moment = 0.0
        for number in range(120):
            key, value = f"pitr/{number:03d}", f"value-{number}-{rng.randrange(10**6)}".encode()
            put(rng.choice(agents), key, value)
            acked.append((key, value, time.time()))
            if number == 40:
                middle_index = modify_index(cluster, key)
            if number == 80:
                # An entry's commit time is the earliest any streaming node applied it; a follower applies it
                # up to a heartbeat after the leader acknowledged it. The moment is taken once every node
                # applied write 80 (and write 81 is sent after it), so it separates the two in every stream.
                index = modify_index(cluster, key)
                wait_until(partial(_all_applied, agents, index), 20, "every node to apply write 80")
                moment = time.time()
        last_index = modify_index(cluster, acked[-1][0])
        # Every node ships its own stream.
        for node_id in cluster.ids:
            wait_until(partial(backup_reaches, tmp_path / "backup" / node_id, last_index), 30,
                       f"{node_id}'s stream to reach index {last_index}")
    finally:
        cluster.stop_all()
    inspected = spina("snapshot", "inspect", "--from-backup", str(tmp_path / "backup"))
    assert inspected.returncode == 0 and "valid; restorable to indexes" in inspected.stdout, inspected.stderr
    assert inspected.stdout.count("stream ") == 3, inspected.stdout
    print(inspected.stdout)

    # As of the middle write's index: exactly the writes acknowledged up to it, nothing after.
    assert restored_kv(tmp_path, "by-index", "pitr/", "--to-index", str(middle_index)) == \
        {key: value for key, value, _ in acked[:41]}
    # As of a moment between write 80 and write 81.
    assert restored_kv(tmp_path, "by-time", "pitr/", "--to-time", f"{moment:.6f}") == \
        {key: value for key, value, _ in acked[:81]}
    assert restored_kv(tmp_path, "latest", "pitr/") == {key: value for key, value, _ in acked}


@dataclass
class Writer:
    """Writes keys through the given agents until stopped; remembers every acknowledged write and its time."""

    cluster: Cluster
    node_ids: list[str]
    acked: list[tuple[str, bytes, float]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, worker: int) -> None:
        number = 0
        while not self.stop.is_set():
            key, value = f"rpo/{worker}/{number:06d}", f"v{number}".encode()
            try:
                status, _ = call(self.cluster.agents[self.node_ids[number % len(self.node_ids)]], "PUT",
                                 f"/v1/kv/{key}", value, timeout=5)
            except OSError:
                status = 0  # unknown outcome (the leader died under it): not counted as acknowledged
            if status == 200:
                self.acked.append((key, value, time.time()))
            number += 1

    def __enter__(self) -> Writer:
        self.threads = [threading.Thread(target=self.run, args=(worker,), daemon=True) for worker in range(2)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


def _latest_kv(directories: list[Path], prefix: str) -> dict[str, bytes]:
    backup = scan_backup(directories)
    restorable = backup.restorable()
    return kv_of(backup.rebuild(restorable[1]).data, prefix) if restorable else {}


def test_a_leader_killed_during_writes_loses_nothing_older_than_the_interval(tmp_path: Path) -> None:
    interval = 1.0
    # Generous on a shared 2-core machine: a seal also waits for its write and fsync in a busy thread pool.
    slack = 3.0
    cluster = backup_cluster(tmp_path, interval=interval)
    try:
        leader = wait_until(lambda: leader_of(cluster), 20, "a leader")
        assert isinstance(leader, str)
        followers = [node_id for node_id in cluster.ids if node_id != leader]
        with Writer(cluster, followers) as writer:
            wait_until(lambda: writer.acked and writer.acked[-1][2] - writer.acked[0][2] > interval + slack + 2,
                       60, "writes spanning a few intervals")
            cluster.agents[leader].process.send_signal(signal.SIGKILL)
            killed_at = time.time()
            cluster.agents[leader].process.wait(10)
            acked_before_kill = list(writer.acked)
        # Right after the kill: what the dead leader's own stream holds (the survivors keep shipping theirs).
        in_leader_stream = _latest_kv([tmp_path / "backup" / leader], "rpo/")
        missing = [(key, ack) for key, value, ack in acked_before_kill if in_leader_stream.get(key) != value]
        oldest_missing_age = killed_at - min((ack for _, ack in missing), default=killed_at)
        newest_missing_age = killed_at - max((ack for _, ack in missing), default=killed_at)
        print(f"\nachieved RPO with --backup-interval {interval:g}: {len(acked_before_kill)} writes acknowledged, "
              f"{len(missing)} missing from the killed leader's stream; the oldest of them was acknowledged "
              f"{oldest_missing_age:.3f}s before the kill (the newest {newest_missing_age:.3f}s)")
        assert oldest_missing_age <= interval + slack, missing[:5]

        # The followers shipped everything acknowledged: the whole backup loses nothing.
        wanted = {key: value for key, value, _ in writer.acked}
        wait_until(lambda: wanted.items() <= _latest_kv([tmp_path / "backup"], "rpo/").items(), 60,
                   "every acknowledged write in the merged backup")

        # The old leader restarts from its disk; its stream carries on without a gap.
        cluster.start(leader)
        put(cluster.agents[followers[0]], "rpo/after-restart", b"x")
        wait_until(lambda: _latest_kv([tmp_path / "backup" / leader], "rpo/").get("rpo/after-restart") == b"x",
                   60, "the restarted node's stream to continue")
    finally:
        cluster.stop_all()


def _more_segments(stream: Path, than: int) -> bool:
    return len(list(stream.glob("seg-*.cdc"))) > than


@pytest.fixture(scope="module")
def single_node_backup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A single node's backup with several segments (written in bursts, each sealed before the next)."""
    base = tmp_path_factory.mktemp("single")
    agent = start_agent("--node-id", "solo", "--data-dir", str(base / "solo"), "--backup-dir", str(base / "backup"),
                        "--backup-interval", "0.2")
    stream = base / "backup" / "solo"
    try:
        for burst in range(4):
            sealed = len(list(stream.glob("seg-*.cdc")))
            for number in range(10):
                put(agent, f"burst/{burst}/{number}", b"v")
            wait_until(partial(_more_segments, stream, sealed), 30, "a sealed segment")
    finally:
        agent.terminate()
    yield base / "backup"


@pytest.mark.parametrize("damage", ["flip", "truncate", "gap"])
def test_restore_refuses_a_damaged_or_incomplete_backup(single_node_backup: Path, tmp_path: Path,
                                                        damage: str) -> None:
    backup = tmp_path / "backup"
    shutil.copytree(single_node_backup, backup)
    segments = sorted((backup / "solo").glob("seg-*.cdc"))
    assert len(segments) >= 3
    victim = segments[1]
    data = victim.read_bytes()
    if damage == "flip":
        victim.write_bytes(data[:-30] + bytes([data[-30] ^ 0x10]) + data[-29:])
        expected = rf"{victim} is damaged at byte offset \d+: checksum mismatch in record"
    elif damage == "truncate":
        victim.write_bytes(data[:len(data) // 2])
        expected = rf"{victim} is damaged at byte offset {len(data) // 2}: truncated"
    else:
        victim.unlink()
        expected = rf"the backup has a gap: no stream holds indexes \d+\.\.\d+ after .*{segments[0].name}"
    result = spina("snapshot", "restore", "--from-backup", str(backup), "--data-dir", str(tmp_path / "target"))
    assert result.returncode == 1
    assert re.search(expected, result.stderr), result.stderr
    assert not (tmp_path / "target" / "raft").exists()
    # The intact backup restores.
    intact = spina("snapshot", "restore", "--from-backup", str(single_node_backup), "--data-dir",
                   str(tmp_path / "intact"))
    assert intact.returncode == 0, intact.stderr
