"""Snapshot files (CRC'd, atomically published) and the WAL's reset after a snapshot install."""

from __future__ import annotations

from pathlib import Path

import pytest

from spina_fast.config import HostPort
from spina_fast.raft.membership import ClusterConfig
from spina_fast.raft.snapshots import SnapshotCorrupted, SnapshotStore, read_snapshot, verify_snapshot_file
from spina_fast.raft.storage import RaftStorage

CONFIG = ClusterConfig({"a": HostPort("127.0.0.1", 7001)}, {"b": HostPort("127.0.0.1", 7002)})


def test_a_written_snapshot_reads_back_with_its_metadata(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    data = bytes(range(256)) * 5000  # spans several CRC chunks
    path = store.write(42, 7, CONFIG, data)
    meta, read = read_snapshot(path)
    assert (meta.index, meta.term, meta.config, read) == (42, 7, CONFIG, data)
    assert verify_snapshot_file(path).data_length == len(data)
    assert store.latest() == (42, 7, path)


def test_only_the_newest_snapshots_are_kept_and_leftovers_are_removed(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, keep=2)
    for index in (10, 20, 30):
        store.write(index, 1, None, b"x" * index)
    assert [index for index, _, _ in store.files()] == [20, 30]
    store.temp_path("from-n2-40").write_bytes(b"half a snapshot")
    assert not list(SnapshotStore(tmp_path).directory.glob("*.tmp"))


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda data: data[:-1], "truncated"),
    (lambda data: data + b"\x00", "unexpected bytes"),
    (lambda data: data[:-5] + bytes([data[-5] ^ 0x10]) + data[-4:], "checksum mismatch"),
    (lambda data: b"NOTASNAP" + data[8:], "not a Spina snapshot"),
    (lambda data: data[:6], "too short"),
])
def test_damaged_files_are_refused_with_the_reason(tmp_path: Path, damage: object, reason: str) -> None:
    path = SnapshotStore(tmp_path).write(5, 2, CONFIG, b"state" * 100)
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    with pytest.raises(SnapshotCorrupted, match=reason):
        read_snapshot(path)
    with pytest.raises(SnapshotCorrupted, match=reason):
        SnapshotStore(tmp_path).load_latest()


def test_discarding_the_log_after_an_installed_snapshot_survives_a_reopen(tmp_path: Path) -> None:
    storage = RaftStorage.open(tmp_path, fsync=False)
    storage.write((3, "a", 2), [(1, 1, b"\x00one"), (2, 1, b"\x00two"), (3, 2, b"\x00diverged")])
    storage.compact(10, 3, discard_log=True)
    storage.write(None, [(11, 3, b"\x00after")])
    storage.close()
    reopened = RaftStorage.open(tmp_path, fsync=False)
    assert (reopened.snapshot_index, reopened.snapshot_term, reopened.last_index) == (10, 3, 11)
    assert reopened.entries() == [(11, 3, b"\x00after")]
    reopened.close()
