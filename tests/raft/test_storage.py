"""The Raft write-ahead log: replay, truncation, compaction, torn tails, corruption and group commit."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spina_fast.raft import storage as storage_module
from spina_fast.raft.storage import RaftStorage, StorageCorrupted, StorageError

SEED = 20240611
Entry = tuple[int, int, bytes]


def make_entries(first_index: int, count: int, term: int, rng: random.Random, size: int = 40) -> list[Entry]:
    return [(first_index + i, term, rng.randbytes(rng.randint(0, size))) for i in range(count)]


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("wal-*.log"))


def reopen(directory: Path, **options: object) -> RaftStorage:
    return RaftStorage.open(directory, **options)  # type: ignore[arg-type]


class DurabilityTracker:
    """Wraps the module's fsync calls to know what a power cut would keep: a file's bytes up to its size
    when an fdatasync started (once that fdatasync returned), and the names present when the directory
    was last fsynced. ``crash_image`` copies exactly that into a new directory."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
        self.directory = directory
        self.durable_sizes: dict[str, int] = {}
        self.durable_names: set[str] = set()
        self.data_syncs = 0
        real_fdatasync = storage_module._fdatasync
        real_fsync_directory = storage_module._fsync_directory

        def fdatasync(fd: int) -> None:
            name = self._name_of(fd)
            size = os.fstat(fd).st_size
            real_fdatasync(fd)
            self.data_syncs += 1
            self.durable_sizes[name] = max(self.durable_sizes.get(name, 0), size)

        def fsync_directory(fd: int) -> None:
            names = {path.name for path in directory.iterdir()}
            real_fsync_directory(fd)
            self.durable_names = names

        monkeypatch.setattr(storage_module, "_fdatasync", fdatasync)
        monkeypatch.setattr(storage_module, "_fsync_directory", fsync_directory)

    def _name_of(self, fd: int) -> str:
        inode = os.fstat(fd).st_ino
        for path in self.directory.iterdir():
            if path.stat().st_ino == inode:
                return path.name
        raise AssertionError(f"descriptor {fd} is not a file in {self.directory}")

    def crash_image(self, target: Path) -> Path:
        target.mkdir()
        for name in self.durable_names:
            data = (self.directory / name).read_bytes()[: self.durable_sizes.get(name, 0)]
            (target / name).write_bytes(data)
        return target


# --------------------------------------------------------------------------------------- round trips


def test_new_storage_creates_its_directory_and_starts_empty(tmp_path: Path) -> None:
    storage = RaftStorage.open(tmp_path / "a" / "raft")
    assert storage.hard_state == (0, "", 0)
    assert (storage.snapshot_index, storage.snapshot_term, storage.last_index) == (0, 0, 0)
    assert storage.entries() == []
    assert storage.segment_count == 1
    assert [path.name for path in segment_files(tmp_path / "a" / "raft")] == [
        "wal-0000000000000001-0000000000000001.log"
    ]
    storage.close()


def test_entries_and_hard_state_survive_reopen(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    written = make_entries(1, 30, 1, rng) + make_entries(31, 20, 2, rng, size=3000)
    storage = RaftStorage.open(tmp_path)
    storage.write((2, "node-ü", 17), written[:30])
    storage.write(None, written[30:])
    storage.close()

    again = RaftStorage.open(tmp_path)
    assert again.entries() == written, f"seed={SEED}"
    assert again.hard_state == (2, "node-ü", 17)
    assert again.last_index == 50
    again.close()


def test_latest_hard_state_wins_and_survives_reopen(tmp_path: Path) -> None:
    storage = RaftStorage.open(tmp_path)
    storage.write((1, "a", 0), [])
    storage.write((2, "", 0), [(1, 2, b"x")])
    storage.write((2, "b", 1), [])
    storage.close()
    again = RaftStorage.open(tmp_path)
    assert again.hard_state == (2, "b", 1)
    assert again.entries() == [(1, 2, b"x")]
    again.close()


def test_reopen_without_close_sees_everything_synced(tmp_path: Path) -> None:
    storage = RaftStorage.open(tmp_path)
    storage.write((3, "c", 2), [(1, 3, b"one"), (2, 3, b"two")])
    storage.sync_blocking()
    crashed_view = RaftStorage.open(tmp_path)  # the first instance never closed: a crash, as far as disk goes
    assert crashed_view.entries() == [(1, 3, b"one"), (2, 3, b"two")]
    assert crashed_view.hard_state == (3, "c", 2)
    crashed_view.close()
    storage.close()


def test_conflicting_suffix_stays_truncated_after_reopen(tmp_path: Path) -> None:
    storage = RaftStorage.open(tmp_path)
    storage.write((1, "", 0), [(i, 1, b"old-%d" % i) for i in range(1, 11)])
    storage.write((2, "", 5), [(6, 2, b"new-6"), (7, 2, b"new-7")])
    assert storage.last_index == 7
    storage.close()
    again = RaftStorage.open(tmp_path)
    assert again.entries() == [(i, 1, b"old-%d" % i) for i in range(1, 6)] + [(6, 2, b"new-6"), (7, 2, b"new-7")]
    assert again.last_index == 7
    again.close()


def test_truncation_below_a_segments_first_index_replays_in_write_order(tmp_path: Path) -> None:
    # The second segment starts at index 21; truncating to 5 makes the third segment's first index (8)
    # smaller than the second's: files must replay by sequence, not by first index.
    storage = RaftStorage.open(tmp_path, segment_bytes=300)
    storage.write(None, [(i, 1, bytes(20)) for i in range(1, 21)])
    storage.write(None, [(21, 1, b"a")])
    storage.write(None, [(5, 2, bytes(100)), (6, 2, bytes(100)), (7, 2, bytes(100))])
    storage.write(None, [(8, 2, b"e")])
    storage.close()
    names = [path.name for path in segment_files(tmp_path)]
    assert names == [
        "wal-0000000000000001-0000000000000001.log",
        "wal-0000000000000002-0000000000000021.log",
        "wal-0000000000000003-0000000000000008.log",
    ]
    again = RaftStorage.open(tmp_path, segment_bytes=300)
    expected = [(i, 1, bytes(20)) for i in range(1, 5)] + [(i, 2, bytes(100)) for i in (5, 6, 7)] + [(8, 2, b"e")]
    assert again.entries() == expected
    again.close()


def test_write_rejects_gaps_reordering_and_compacted_indexes(tmp_path: Path) -> None:
    storage = RaftStorage.open(tmp_path)
    storage.write(None, [(1, 1, b"a"), (2, 1, b"b")])
    with pytest.raises(ValueError, match="gap"):
        storage.write(None, [(4, 1, b"d")])
    with pytest.raises(ValueError, match="not consecutive"):
        storage.write(None, [(3, 1, b"c"), (5, 1, b"e")])
    storage.compact(1, 1)
    with pytest.raises(ValueError, match="snapshot point"):
        storage.write(None, [(1, 2, b"x")])
    assert storage.last_index == 2
    storage.close()
    again = RaftStorage.open(tmp_path)
    assert again.entries() == [(2, 1, b"b")]
    again.close()


def test_entries_is_released_by_the_first_write(tmp_path: Path) -> None:
    storage = RaftStorage.open(tmp_path)
    storage.write(None, [(1, 1, b"a")])
    with pytest.raises(RuntimeError, match="before the first write"):
        storage.entries()
    storage.close()


def test_closed_storage_refuses_writes_and_close_is_idempotent(tmp_path: Path) -> None:
    storage = RaftStorage.open(tmp_path)
    storage.close()
    storage.close()
    with pytest.raises(StorageError, match="closed"):
        storage.write(None, [(1, 1, b"a")])


def test_segment_bytes_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="segment_bytes"):
        RaftStorage.open(tmp_path, segment_bytes=0)


# -------------------------------------------------------------------------- segments and compaction


def test_segments_roll_at_segment_bytes_and_replay_across_them(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    storage = RaftStorage.open(tmp_path, segment_bytes=1000)
    written: list[Entry] = []
    for _ in range(40):
        batch = make_entries(len(written) + 1, rng.randint(1, 5), 1, rng)
        storage.write((1, "n", len(written)), batch)
        written += batch
    assert storage.segment_count == len(segment_files(tmp_path)) > 5
    for path in segment_files(tmp_path)[:-1]:
        # A segment rolls once it reaches segment_bytes; the batch that crosses the limit stays whole.
        assert path.stat().st_size >= 1000
    storage.close()
    again = RaftStorage.open(tmp_path, segment_bytes=1000)
    assert again.entries() == written, f"seed={SEED}"
    again.close()


def test_compaction_deletes_only_segments_the_snapshot_covers(tmp_path: Path) -> None:
    storage = RaftStorage.open(tmp_path, segment_bytes=500)
    for index in range(1, 101):
        storage.write((4, "leader", index - 1) if index == 50 else None, [(index, 4, bytes(30))])
    segments_before = segment_files(tmp_path)
    storage.compact(60, 4)
    remaining = segment_files(tmp_path)
    assert storage.segment_count == len(remaining) < len(segments_before)
    # Every deleted segment held only entries <= 60; the first kept one reaches past 60.
    kept_first = int(remaining[0].name.split("-")[2].split(".")[0])
    assert kept_first <= 61
    assert remaining == segments_before[len(segments_before) - len(remaining):]
    storage.close()

    again = RaftStorage.open(tmp_path, segment_bytes=500)
    assert (again.snapshot_index, again.snapshot_term) == (60, 4)
    assert [entry[0] for entry in again.entries()] == list(range(61, 101))
    # The hard state was written in a deleted segment: compaction restated it.
    assert again.hard_state == (4, "leader", 49)
    assert again.last_index == 100
    again.close()


def test_compaction_beyond_the_last_index_empties_the_log(tmp_path: Path) -> None:
    storage = RaftStorage.open(tmp_path, segment_bytes=200)
    storage.write((1, "", 0), [(i, 1, bytes(50)) for i in range(1, 11)])
    storage.compact(500, 7)
    assert storage.last_index == 500
    with pytest.raises(ValueError, match="gap"):
        storage.write(None, [(502, 7, b"x")])
    storage.write(None, [(501, 7, b"after snapshot")])
    storage.close()
    again = RaftStorage.open(tmp_path, segment_bytes=200)
    assert (again.snapshot_index, again.snapshot_term, again.last_index) == (500, 7, 501)
    assert again.entries() == [(501, 7, b"after snapshot")]
    again.close()


def test_an_older_compaction_point_is_ignored(tmp_path: Path) -> None:
    storage = RaftStorage.open(tmp_path)
    storage.write(None, [(i, 1, b"e") for i in range(1, 6)])
    storage.compact(3, 1)
    storage.compact(2, 1)
    assert storage.snapshot_index == 3
    storage.close()
    again = RaftStorage.open(tmp_path)
    assert again.snapshot_index == 3
    assert [entry[0] for entry in again.entries()] == [4, 5]
    again.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    operations=st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(1, 6), st.binary(max_size=60)),
            st.tuples(st.just("overwrite"), st.integers(0, 8), st.integers(1, 4)),
            st.tuples(st.just("hard_state"), st.integers(0, 50), st.sampled_from(["", "a", "node-2"])),
            st.tuples(st.just("compact"), st.integers(0, 10)),
            st.tuples(st.just("reopen")),
        ),
        max_size=40,
    ),
    segment_bytes=st.sampled_from([64, 300, 5000]),
)
def test_any_sequence_of_operations_replays_to_the_same_log(
    operations: list[tuple[object, ...]], segment_bytes: int
) -> None:
    # A plain-Python model of the log next to the storage; every reopen must rebuild the model exactly.
    model: dict[int, tuple[int, bytes]] = {}
    snapshot = (0, 0)
    hard_state = (0, "", 0)
    term = 1
    last_index = 0
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        storage = RaftStorage.open(directory, segment_bytes=segment_bytes, fsync=False)

        def check(recovered: RaftStorage) -> None:
            assert recovered.entries() == [(index, *model[index]) for index in sorted(model)]
            assert (recovered.snapshot_index, recovered.snapshot_term) == snapshot
            assert recovered.hard_state == hard_state
            assert recovered.last_index == last_index

        for operation in operations:
            kind = operation[0]
            if kind == "append":
                count, payload = operation[1], operation[2]
                assert isinstance(count, int) and isinstance(payload, bytes)
                batch = [(last_index + 1 + i, term, payload) for i in range(count)]
            elif kind == "overwrite":
                back, count = operation[1], operation[2]
                assert isinstance(back, int) and isinstance(count, int)
                term += 1
                first = max(snapshot[0] + 1, last_index + 1 - back)
                batch = [(first + i, term, b"t%d" % term) for i in range(count)]
            elif kind == "hard_state":
                commit, voted_for = operation[1], operation[2]
                assert isinstance(commit, int) and isinstance(voted_for, str)
                hard_state = (term, voted_for, commit)
                storage.write(hard_state, [])
                continue
            elif kind == "compact":
                ahead = operation[1]
                assert isinstance(ahead, int)
                index = min(snapshot[0] + 1 + ahead, last_index + 2)
                snapshot_term = model[index][0] if index in model else term
                storage.compact(index, snapshot_term)
                snapshot = (index, snapshot_term)
                model = {i: value for i, value in model.items() if i > index}
                last_index = max(last_index, index)
                continue
            else:
                storage.close()
                storage = RaftStorage.open(directory, segment_bytes=segment_bytes, fsync=False)
                check(storage)
                continue
            storage.write(None, batch)
            model = {i: value for i, value in model.items() if i < batch[0][0]}
            model.update({index: (entry_term, payload) for index, entry_term, payload in batch})
            last_index = batch[-1][0]
        storage.close()
        final = RaftStorage.open(directory, segment_bytes=segment_bytes, fsync=False)
        check(final)
        final.close()


# ---------------------------------------------------------------------- torn tails and corruption


def write_three_then_one(directory: Path) -> tuple[Path, int, int, list[Entry]]:
    """Three entries, then a final entry record; returns (segment, end of the third, end of the fourth, the
    first three)."""
    rng = random.Random(SEED)
    storage = RaftStorage.open(directory, fsync=False)
    first_three = make_entries(1, 3, 1, rng)
    storage.write(None, first_three)
    segment = segment_files(directory)[-1]
    before = segment.stat().st_size
    storage.write(None, [(4, 1, rng.randbytes(25))])
    after = segment.stat().st_size
    storage.close()
    return segment, before, after, first_three


def test_a_torn_final_record_is_cut_at_every_byte_offset(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    original, before, after, first_three = write_three_then_one(tmp_path / "original")
    data = original.read_bytes()
    for cut in range(before + 1, after):
        directory = tmp_path / f"cut-{cut}"
        directory.mkdir()
        (directory / original.name).write_bytes(data[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="spina_fast.raft.storage"):
            storage = RaftStorage.open(directory)
        assert storage.entries() == first_three, f"cut at {cut}"
        assert (directory / original.name).stat().st_size == before, f"cut at {cut}"
        assert [record.offset for record in caplog.records] == [before], f"cut at {cut}"  # type: ignore[attr-defined]
        assert f"offset {before}" in caplog.text
        # Appending after the cut leaves a clean log.
        storage.write(None, [(4, 2, b"rewritten")])
        storage.close()
        again = RaftStorage.open(directory)
        assert again.entries() == [*first_three, (4, 2, b"rewritten")]
        again.close()


def test_a_flipped_bit_in_the_final_record_cuts_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    original, before, after, first_three = write_three_then_one(tmp_path / "original")
    data = original.read_bytes()
    for position in range(before, after):
        damaged = bytearray(data)
        damaged[position] ^= 1 << (position % 8)
        directory = tmp_path / f"flip-{position}"
        directory.mkdir()
        (directory / original.name).write_bytes(damaged)
        with caplog.at_level(logging.WARNING, logger="spina_fast.raft.storage"):
            storage = RaftStorage.open(directory)
        assert storage.entries() == first_three, f"bit flipped at {position}"
        assert (directory / original.name).stat().st_size == before
        storage.close()


def test_zeros_after_the_last_record_end_the_log_and_are_written_over(tmp_path: Path) -> None:
    original, _, after, first_three = write_three_then_one(tmp_path)
    with open(original, "ab") as file:
        file.write(bytes(100))  # what is left of a spare segment after its last record
    storage = RaftStorage.open(tmp_path)
    assert storage.entries()[:3] == first_three
    assert storage.last_index == 4
    assert original.stat().st_size == after + 100  # kept: writing over them is why they are there
    storage.write(None, [(5, 1, b"five")])
    storage.close()
    assert original.stat().st_size == after + 100
    reopened = RaftStorage.open(tmp_path)
    assert [entry[2] for entry in reopened.entries()[3:]] == [reopened.entries()[3][2], b"five"]
    assert reopened.last_index == 5
    reopened.close()


def test_a_torn_record_in_front_of_zeros_is_cut(tmp_path: Path) -> None:
    original, before, after, first_three = write_three_then_one(tmp_path)
    data = original.read_bytes()
    # The fourth record half written over a spare segment's zeros (64 MB of them: skipped, not scanned).
    original.write_bytes(data[:before + (after - before) // 2] + bytes(64 << 20))
    storage = RaftStorage.open(tmp_path)
    assert storage.entries() == first_three
    assert original.stat().st_size == before
    storage.close()


def test_damage_followed_by_a_record_beyond_zeros_is_refused(tmp_path: Path) -> None:
    original, before, after, _ = write_three_then_one(tmp_path)
    data = original.read_bytes()
    damaged = data[:before] + bytes(after - before) + bytes(1 << 20) + data[before:after]
    original.write_bytes(damaged)
    with pytest.raises(StorageCorrupted, match="intact record follows"):
        RaftStorage.open(tmp_path)
    assert original.read_bytes() == damaged


def test_segments_roll_into_spares_written_ahead(tmp_path: Path) -> None:
    (tmp_path / "wal-spare.tmp").write_bytes(b"half written before a crash")
    storage = RaftStorage.open(tmp_path, segment_bytes=4096)
    assert not (tmp_path / "wal-spare.tmp").exists()
    written = []
    for index in range(1, 101):
        entry = (index, 1, random.Random(index).randbytes(100))
        storage.write(None, [entry])
        written.append(entry)
        if index % 10 == 0:
            storage.sync_blocking()
            assert storage._spare is None or storage._spare.result(timeout=30) is None
    storage.close()
    segments = segment_files(tmp_path)
    assert len(segments) >= 3
    # Every finished segment ends at its last record; the spares' zeros remain only in the last one.
    assert all(not segment.read_bytes().endswith(bytes(8)) for segment in segments[:-1])
    assert segments[-1].stat().st_size == 4096
    assert segments[-1].read_bytes().endswith(bytes(8))
    reopened = RaftStorage.open(tmp_path, segment_bytes=4096)
    assert reopened.entries() == written
    reopened.write(None, [(101, 2, b"after the reopen")])
    reopened.close()
    assert RaftStorage.open(tmp_path, segment_bytes=4096).entries() == [*written, (101, 2, b"after the reopen")]


def test_a_crash_between_taking_the_spare_and_writing_its_header_loses_nothing(tmp_path: Path) -> None:
    storage = RaftStorage.open(tmp_path, segment_bytes=4096)
    written = [(index, 1, random.Random(index).randbytes(100)) for index in range(1, 6)]
    storage.write(None, written)
    storage.close()
    # The spare, renamed into the next segment's name, still all zeros; a second name for it left behind too.
    (tmp_path / "wal-0000000000000002-0000000000000006.log").write_bytes(bytes(4096))
    (tmp_path / "wal-spare.tmp").write_bytes(bytes(4096))
    reopened = RaftStorage.open(tmp_path, segment_bytes=4096)
    assert reopened.entries() == written and reopened.segment_count == 2
    reopened.write(None, [(6, 1, b"six")])
    reopened.close()
    assert RaftStorage.open(tmp_path, segment_bytes=4096).entries() == [*written, (6, 1, b"six")]


def test_a_zero_filled_segment_that_is_not_the_last_is_refused(tmp_path: Path) -> None:
    storage = RaftStorage.open(tmp_path, segment_bytes=4096)
    storage.write(None, [(1, 1, b"one")])
    storage.close()
    (tmp_path / "wal-0000000000000002-0000000000000002.log").write_bytes(bytes(4096))
    (tmp_path / "wal-0000000000000003-0000000000000002.log").write_bytes(b"")
    with pytest.raises(StorageCorrupted, match="not a write-ahead log segment"):
        RaftStorage.open(tmp_path)


def test_close_waits_for_the_spare_and_a_reopen_discards_it(tmp_path: Path) -> None:
    storage = RaftStorage.open(tmp_path, segment_bytes=64 << 20)
    storage.write(None, [(1, 1, bytes(32 << 20))])  # half a segment: the spare is being written now
    assert storage._spare is not None
    spare = storage._spare
    storage.close()
    assert spare.done()  # no thread of the closed log writes any more
    reopened = RaftStorage.open(tmp_path, segment_bytes=64 << 20)
    assert not (tmp_path / "wal-spare.tmp").exists()
    assert reopened.last_index == 1
    reopened.close()


def test_no_spare_without_fsync(tmp_path: Path) -> None:
    storage = RaftStorage.open(tmp_path, segment_bytes=1000, fsync=False)
    for index in range(1, 51):
        storage.write(None, [(index, 1, bytes(100))])
    storage.close()
    assert not (tmp_path / "wal-spare.tmp").exists()
    assert all(not segment.read_bytes().endswith(bytes(8)) for segment in segment_files(tmp_path))


def test_a_flipped_bit_in_a_middle_record_is_refused(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    storage = RaftStorage.open(tmp_path / "original", fsync=False)
    storage.write(None, make_entries(1, 2, 1, rng))
    segment = segment_files(tmp_path / "original")[-1]
    start = segment.stat().st_size
    storage.write(None, make_entries(3, 1, 1, rng))
    end = segment.stat().st_size
    storage.write(None, make_entries(4, 3, 1, rng))
    storage.close()
    data = segment.read_bytes()
    for position in range(start, end):  # every byte of the record: length, type, body and checksum
        damaged = bytearray(data)
        damaged[position] ^= 1 << (position % 8)
        directory = tmp_path / f"flip-{position}"
        directory.mkdir()
        (directory / segment.name).write_bytes(damaged)
        with pytest.raises(StorageCorrupted) as raised:
            RaftStorage.open(directory)
        assert raised.value.path == directory / segment.name
        assert raised.value.offset == start, f"bit flipped at {position}"
        assert "intact record follows" in raised.value.reason
        assert f"offset {start}" in str(raised.value)
        # Refusing did not touch the file.
        assert (directory / segment.name).read_bytes() == damaged


def test_damage_in_a_segment_that_is_not_the_last_is_refused(tmp_path: Path) -> None:
    storage = RaftStorage.open(tmp_path, segment_bytes=200)
    storage.write(None, [(i, 1, bytes(50)) for i in range(1, 5)])
    storage.write(None, [(5, 1, b"in the second segment")])
    storage.close()
    first, second = segment_files(tmp_path)
    os.truncate(first, first.stat().st_size - 3)  # a "torn tail" in the older segment
    with pytest.raises(StorageCorrupted, match="not the last one") as raised:
        RaftStorage.open(tmp_path)
    assert raised.value.path == first
    assert second.exists()


def test_a_missing_segment_is_refused(tmp_path: Path) -> None:
    storage = RaftStorage.open(tmp_path, segment_bytes=100)
    for index in range(1, 6):
        storage.write(None, [(index, 1, bytes(100))])
    storage.close()
    segments = segment_files(tmp_path)
    assert len(segments) >= 3
    segments[1].unlink()
    with pytest.raises(StorageCorrupted, match="missing"):
        RaftStorage.open(tmp_path)


def test_a_missing_first_segment_without_a_snapshot_is_refused(tmp_path: Path) -> None:
    storage = RaftStorage.open(tmp_path, segment_bytes=100)
    for index in range(1, 4):
        storage.write(None, [(index, 1, bytes(100))])
    storage.close()
    segment_files(tmp_path)[0].unlink()
    with pytest.raises(StorageCorrupted, match="missing"):
        RaftStorage.open(tmp_path)


def test_a_file_that_is_not_a_segment_is_refused(tmp_path: Path) -> None:
    (tmp_path / "wal-0000000000000001-0000000000000001.log").write_bytes(b"hello, world, not a log")
    with pytest.raises(StorageCorrupted, match="not a write-ahead log segment"):
        RaftStorage.open(tmp_path)


def test_a_segment_created_just_before_a_crash_is_reused(tmp_path: Path) -> None:
    storage = RaftStorage.open(tmp_path)
    storage.write((1, "", 0), [(1, 1, b"a")])
    storage.close()
    # The crash came between creating the next segment and finishing its header.
    (tmp_path / "wal-0000000000000002-0000000000000002.log").write_bytes(b"SPN")
    storage = RaftStorage.open(tmp_path)
    assert storage.entries() == [(1, 1, b"a")]
    storage.write(None, [(2, 1, b"b")])
    storage.close()
    again = RaftStorage.open(tmp_path)
    assert again.entries() == [(1, 1, b"a"), (2, 1, b"b")]
    assert again.segment_count == 2
    again.close()


# ----------------------------------------------------------------------------------- group commit


async def test_concurrent_syncs_share_few_fsyncs_and_every_acknowledged_write_is_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "wal"
    tracker = DurabilityTracker(monkeypatch, directory)
    storage = RaftStorage.open(directory, segment_bytes=20_000)
    rng = random.Random(SEED)
    callers, rounds = 32, 8
    acknowledged = 0
    written: dict[int, bytes] = {}

    async def client() -> None:
        nonlocal acknowledged
        for _ in range(rounds):
            index = storage.last_index + 1
            payload = rng.randbytes(rng.randint(1, 200))
            storage.write((1, "leader", acknowledged), [(index, 1, payload)])
            written[index] = payload
            await storage.sync()
            acknowledged = max(acknowledged, index)

    await asyncio.gather(*(client() for _ in range(callers)))
    sync_calls = callers * rounds
    assert acknowledged == sync_calls
    assert storage.segment_count > 1  # rollovers happened under concurrent syncs too
    assert storage.fsync_count == tracker.data_syncs
    print(f"{sync_calls} sync() calls, {storage.fsync_count} fsyncs")
    assert storage.fsync_count <= sync_calls // 8, (storage.fsync_count, sync_calls)

    image = RaftStorage.open(tracker.crash_image(tmp_path / "after-power-cut"))
    recovered = image.entries()
    assert image.last_index >= acknowledged
    assert recovered == [(index, 1, written[index]) for index in range(1, image.last_index + 1)], f"seed={SEED}"
    image.close()
    storage.close()


async def test_a_sync_after_a_rollover_covers_the_previous_segment_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "wal"
    tracker = DurabilityTracker(monkeypatch, directory)
    storage = RaftStorage.open(directory, segment_bytes=200)
    before_rollover = [(i, 1, bytes(60)) for i in range(1, 5)]
    storage.write((1, "a", 0), before_rollover)  # fills the first segment; not synced yet
    storage.write(None, [(5, 1, b"in the second segment")])
    assert storage.segment_count == 2
    await storage.sync()
    image = RaftStorage.open(tracker.crash_image(tmp_path / "after-power-cut"))
    assert image.entries() == [*before_rollover, (5, 1, b"in the second segment")]
    image.close()
    storage.close()


class GatedFsync:
    """An fdatasync that waits for the test's permission, so the test decides when each one finishes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = threading.Semaphore(0)
        self.allowed = threading.Semaphore(0)
        self.calls = 0
        real = storage_module._fdatasync

        def fdatasync(fd: int) -> None:
            self.calls += 1
            self.started.release()
            if not self.allowed.acquire(timeout=10):
                raise AssertionError("the test never let the fsync finish")
            real(fd)

        monkeypatch.setattr(storage_module, "_fdatasync", fdatasync)
        # The gate blocks the thread that fsyncs: keep every fsync in the worker thread, as a slow disk does.
        monkeypatch.setattr(storage_module, "INLINE_FSYNC_SECONDS", 0.0)

    async def wait_started(self) -> None:
        assert await asyncio.to_thread(self.started.acquire, True, 10), "no fsync started"

    def finish_one(self) -> None:
        self.allowed.release()


async def test_a_write_after_an_fsync_started_waits_for_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = RaftStorage.open(tmp_path)
    gate = GatedFsync(monkeypatch)
    storage.write(None, [(1, 1, b"first")])
    first_sync = asyncio.create_task(storage.sync())
    await gate.wait_started()

    storage.write(None, [(2, 1, b"second")])
    later_syncs = [asyncio.create_task(storage.sync()) for _ in range(5)]
    gate.finish_one()
    await first_sync
    await gate.wait_started()  # the later callers started exactly one more fsync...
    assert not any(task.done() for task in later_syncs)  # ...and wait for it, not the first one
    gate.finish_one()
    await asyncio.gather(*later_syncs)
    assert gate.calls == 2
    assert storage.fsync_count == 2
    storage.close()


async def test_cancelling_one_waiter_does_not_cancel_the_shared_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = RaftStorage.open(tmp_path)
    gate = GatedFsync(monkeypatch)
    storage.write(None, [(1, 1, b"a")])
    impatient = asyncio.create_task(storage.sync())
    patient = asyncio.create_task(storage.sync())
    await gate.wait_started()
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    gate.finish_one()
    await patient
    assert gate.calls == 1 and storage.fsync_count == 1
    storage.close()


async def test_close_during_an_fsync_waits_for_it_and_releases_the_waiter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = RaftStorage.open(tmp_path)
    gate = GatedFsync(monkeypatch)
    storage.write(None, [(1, 1, b"a")])
    waiting = asyncio.create_task(storage.sync())
    await gate.wait_started()
    gate.finish_one()
    # close() cannot know yet that the worker's fsync covered everything, so it runs its own, after the
    # worker let go of the descriptor; only then does it close it.
    gate.finish_one()
    storage.close()
    await waiting
    assert gate.calls == 2
    again = RaftStorage.open(tmp_path)
    assert again.entries() == [(1, 1, b"a")]
    again.close()


async def test_a_failed_fsync_fails_the_storage_for_good(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = RaftStorage.open(tmp_path)

    def failing_fdatasync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(storage_module, "_fdatasync", failing_fdatasync)
    storage.write(None, [(1, 1, b"a")])
    with pytest.raises(StorageError, match="fsync"):
        await storage.sync()
    monkeypatch.undo()
    # Retrying an fsync after EIO can report success for data the kernel already dropped: never retry.
    with pytest.raises(StorageError, match="failed earlier"):
        storage.write(None, [(2, 1, b"b")])
    with pytest.raises(StorageError, match="failed earlier"):
        await storage.sync()
    storage.close()


async def test_without_fsync_sync_returns_at_once_and_the_data_is_still_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(storage_module, "_fdatasync", calls.append)
    monkeypatch.setattr(storage_module, "_fsync_directory", calls.append)
    storage = RaftStorage.open(tmp_path, segment_bytes=100, fsync=False)
    for index in range(1, 21):
        storage.write((1, "", index), [(index, 1, bytes(40))])
        await storage.sync()
    storage.compact(5, 1)
    storage.close()
    assert calls == [] and storage.fsync_count == 0
    again = RaftStorage.open(tmp_path, fsync=False)
    assert [entry[0] for entry in again.entries()] == list(range(6, 21))
    again.close()


def test_sync_blocking_counts_one_fsync_per_call_with_new_data(tmp_path: Path) -> None:
    storage = RaftStorage.open(tmp_path)
    storage.write(None, [(1, 1, b"a")])
    storage.sync_blocking()
    storage.sync_blocking()  # nothing new: no fsync
    assert storage.fsync_count == 1
    storage.close()


# -------------------------------------------------------------------------------- a real crash

CHILD = textwrap.dedent(
    """
    import asyncio, hashlib, random, sys
    from spina_fast.raft.storage import RaftStorage

    def payload(index):
        return hashlib.sha256(b"%d" % index).digest() * (1 + index % 40)

    async def main(directory, seed):
        storage = RaftStorage.open(directory, segment_bytes=64 * 1024)
        rng = random.Random(seed)
        index = storage.last_index
        while True:
            batch = [(index + 1 + i, 1, payload(index + 1 + i)) for i in range(rng.randint(1, 30))]
            storage.write((1, "child", index), batch)
            index += len(batch)
            await storage.sync()
            print(index, flush=True)

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


def expected_payload(index: int) -> bytes:
    return hashlib.sha256(b"%d" % index).digest() * (1 + index % 40)


def run_child_until_killed(directory: Path, seed: int, reports: int) -> int:
    """Run the writer, SIGKILL it right after its ``reports``-th durable report; the last index it reported."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory), str(seed)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert child.stdout is not None
    last_reported = 0
    try:
        for _ in range(reports):
            line = child.stdout.readline()
            if not line:
                child.wait(10)
                raise AssertionError(f"writer died early: {child.stderr.read() if child.stderr else ''}")
            last_reported = int(line)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert child.returncode == -signal.SIGKILL
    return last_reported


def test_a_killed_writer_loses_nothing_it_reported_synced(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    directory = tmp_path / "wal"
    for round_number in range(4):
        seed = rng.randrange(1 << 30)
        last_reported = run_child_until_killed(directory, seed, reports=rng.randint(20, 300))
        storage = RaftStorage.open(directory, segment_bytes=64 * 1024)
        recovered = storage.entries()
        context = f"seed={SEED} round={round_number}"
        assert storage.last_index >= last_reported, context
        assert [entry[0] for entry in recovered] == list(range(1, storage.last_index + 1)), context
        assert all(payload == expected_payload(index) for index, _, payload in recovered), context
        storage.close()
    assert len(segment_files(directory)) > 1


def test_copying_the_files_of_a_live_writer_recovers_a_prefix(tmp_path: Path) -> None:
    # A file copy taken while the writer runs is what a crash at that moment could leave (at best):
    # it must open cleanly (a torn tail at most) and hold a prefix of what was written.
    directory = tmp_path / "wal"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory), str(SEED)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert child.stdout is not None
    try:
        copies: list[tuple[Path, int]] = []
        for copy_number in range(5):
            for _ in range(50):
                reported = int(child.stdout.readline())
            copy = tmp_path / f"copy-{copy_number}"
            copy.mkdir()
            for path in sorted(directory.iterdir()):
                try:
                    shutil.copyfile(path, copy / path.name)
                except FileNotFoundError:
                    pass  # gone since the listing, as rsync reports "vanished": the spare segment, renamed
            copies.append((copy, reported))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    for copy, reported in copies:
        storage = RaftStorage.open(copy, segment_bytes=64 * 1024)
        assert storage.last_index >= reported
        assert all(payload == expected_payload(index) for index, _, payload in storage.entries())
        storage.close()


@pytest.mark.parametrize(
    "tool",
    [
        ["ruff", "check", "spina_fast/raft/storage.py", "tests/raft/test_storage.py", "benchmarks/wal_write.py"],
        ["mypy", "spina_fast/raft/storage.py"],
    ],
    ids=["ruff", "mypy"],
)
def test_storage_code_passes_lint_and_type_checks(tool: list[str]) -> None:
    pytest.importorskip(tool[0])
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-m", *tool], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_deferred_compaction_keeps_files_until_deleted_and_recovers_either_way(tmp_path: Path) -> None:
    storage = RaftStorage.open(tmp_path, segment_bytes=500)
    for index in range(1, 101):
        storage.write((4, "leader", index - 1) if index == 50 else None, [(index, 4, bytes(30))])
    segments_before = segment_files(tmp_path)
    assert storage.compact(60, 4, defer_deletion=True) is True
    # Out of the log, still on disk: a crash now must recover the same log as after the deletion.
    assert segment_files(tmp_path) == segments_before
    assert storage.segment_count < len(segments_before)
    crashed = RaftStorage.open(tmp_path, segment_bytes=500)
    assert (crashed.snapshot_index, [entry[0] for entry in crashed.entries()]) == (60, list(range(61, 101)))
    crashed.close()
    storage.delete_detached_segments()
    assert len(segment_files(tmp_path)) == storage.segment_count
    assert storage.compact(60, 4, defer_deletion=True) is False  # nothing new to compact
    storage.close()
    again = RaftStorage.open(tmp_path, segment_bytes=500)
    assert (again.snapshot_index, [entry[0] for entry in again.entries()]) == (60, list(range(61, 101)))
    assert again.hard_state == (4, "leader", 49)
    again.close()
