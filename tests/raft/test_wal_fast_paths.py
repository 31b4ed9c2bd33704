"""The write path's fast paths: CRC-32C (CPU instruction vs tables), batch WAL encoding, fsync on the loop."""

from __future__ import annotations

import asyncio
import random
import struct
import threading
from pathlib import Path

import pytest

from spina_fast import _raft
from spina_fast._raft import CRC32C_IMPLEMENTATION, crc32c, crc32c_portable, encode_wal_entries
from spina_fast.raft import storage as storage_module
from spina_fast.raft.storage import ENTRY, RaftStorage, StorageError

SEED = 20261127


def _bytewise_crc32c(data: bytes, crc: int = 0) -> int:
    """The textbook one-bit-at-a-time CRC-32C, the reference both implementations must match."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def test_the_extension_is_compiled() -> None:
    assert _raft.__file__.endswith(".so")
    assert CRC32C_IMPLEMENTATION in ("sse4.2", "slicing-by-8")


@pytest.mark.parametrize("function", [crc32c, crc32c_portable])
def test_crc32c_matches_the_published_check_values(function: object) -> None:
    assert callable(function)
    # The CRC catalogue's check value, and RFC 3720 (iSCSI) appendix B.4's test patterns.
    assert function(b"123456789") == 0xE3069283
    assert function(bytes(32)) == 0x8A9136AA
    assert function(b"\xff" * 32) == 0x62A8AB43
    assert function(bytes(range(32))) == 0x46DD794E
    assert function(b"") == 0


def test_crc32c_agrees_with_the_reference_at_every_length_alignment_and_split() -> None:
    rng = random.Random(SEED)
    for length in [*range(0, 70), 255, 256, 1000, 4099]:
        data = rng.randbytes(length + 8)
        for start in range(8):
            view = memoryview(data)[start:start + length]
            expected = _bytewise_crc32c(bytes(view))
            assert crc32c(view) == expected, f"seed={SEED} length={length} start={start}"
            assert crc32c_portable(view) == expected, f"seed={SEED} length={length} start={start}"
            split = rng.randint(0, length)
            assert crc32c(view[split:], crc32c(view[:split])) == expected
            assert crc32c_portable(view[split:], crc32c_portable(view[:split])) == expected


def test_crc32c_takes_bytes_bytearray_and_memoryview_and_refuses_other_things() -> None:
    data = b"spina write-ahead log"
    assert crc32c(data) == crc32c(bytearray(data)) == crc32c(memoryview(data)) == _bytewise_crc32c(data)
    with pytest.raises(TypeError):
        crc32c(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        crc32c("text is not bytes")  # type: ignore[arg-type]
    with pytest.raises(BufferError):
        crc32c(memoryview(data)[::2])  # not contiguous


def _python_records(entries: list[tuple[int, int, bytes]]) -> bytes:
    """storage.py's record format, spelled out: u32 length, u8 type, u64 index, u64 term, payload, u32 CRC."""
    out = b""
    for index, term, payload in entries:
        record = struct.pack("<IBQQ", 1 + 16 + len(payload), ENTRY, index, term) + payload
        out += record + struct.pack("<I", _bytewise_crc32c(record))
    return out


def test_encode_wal_entries_writes_the_documented_record_format() -> None:
    rng = random.Random(SEED)
    entries = [(7 + i, 3 + i // 2, rng.randbytes(rng.randint(0, 300))) for i in range(20)]
    assert encode_wal_entries(entries, 7, ENTRY) == _python_records(entries)
    assert encode_wal_entries([], 1, ENTRY) == b""


def test_encode_wal_entries_refuses_gaps_and_malformed_entries() -> None:
    with pytest.raises(ValueError, match="not consecutive: 9 follows 7"):
        encode_wal_entries([(7, 1, b"a"), (9, 1, b"b")], 7, ENTRY)
    with pytest.raises(ValueError, match="not consecutive"):
        encode_wal_entries([(8, 1, b"a")], 7, ENTRY)
    with pytest.raises(TypeError, match="entry 1 is not an"):
        encode_wal_entries([(1, 1, b"a"), (2, 1, "text")], 1, ENTRY)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="entry 0 is not an"):
        encode_wal_entries([[1, 1, b"a"]], 1, ENTRY)  # type: ignore[list-item]


class FsyncThreads:
    """Records which thread ran each fdatasync of the storage module; the real one runs too unless ``instant``
    (then the disk's own speed cannot sway what the test looks at)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: bool = False, instant: bool = False) -> None:
        self.threads: list[int] = []
        real = storage_module._fdatasync

        def fdatasync(fd: int) -> None:
            self.threads.append(threading.get_ident())
            if fail:
                raise OSError(5, "Input/output error")
            if not instant:
                real(fd)

        monkeypatch.setattr(storage_module, "_fdatasync", fdatasync)


async def test_a_fast_disk_is_synced_on_the_loop_and_concurrent_callers_share_one_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = RaftStorage.open(tmp_path)
    fsyncs = FsyncThreads(monkeypatch)

    async def write_and_sync(index: int) -> None:
        storage.write(None, [(index, 1, b"x")])
        await storage.sync()

    await asyncio.gather(*(write_and_sync(index) for index in range(1, 11)))
    assert fsyncs.threads == [threading.get_ident()]  # one fsync, on the event loop's thread
    assert storage.fsync_count == storage.inline_fsync_count == 1
    storage.close()
    reopened = RaftStorage.open(tmp_path)
    assert [index for index, _, _ in reopened.entries()] == list(range(1, 11))
    reopened.close()


async def test_a_slow_disk_is_synced_in_the_worker_until_its_fsyncs_are_fast_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = RaftStorage.open(tmp_path)
    fsyncs = FsyncThreads(monkeypatch, instant=True)
    # As if the last fdatasyncs took twice the limit: the next ones go to the worker, and each fast one
    # brings the moving average down until syncs come back to the loop.
    storage.fsync_seconds_average = 2 * storage_module.INLINE_FSYNC_SECONDS
    loop_thread = threading.get_ident()
    for index in range(1, 200):
        storage.write(None, [(index, 1, b"x")])
        await storage.sync()
        if fsyncs.threads[-1] == loop_thread:
            break
    assert fsyncs.threads[0] != loop_thread
    assert fsyncs.threads[-1] == loop_thread
    assert 0 < storage.inline_fsync_count < storage.fsync_count == len(fsyncs.threads)
    storage.close()


async def test_an_fsync_failing_on_the_loop_fails_the_waiters_and_the_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = RaftStorage.open(tmp_path)
    FsyncThreads(monkeypatch, fail=True)
    storage.write(None, [(1, 1, b"x")])
    results = await asyncio.gather(storage.sync(), storage.sync(), return_exceptions=True)
    assert all(isinstance(result, StorageError) and "Input/output error" in str(result) for result in results)
    with pytest.raises(StorageError, match="failed earlier"):
        storage.write(None, [(2, 1, b"y")])


async def test_syncs_go_to_the_worker_while_the_node_writes_a_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = RaftStorage.open(tmp_path)
    fsyncs = FsyncThreads(monkeypatch, instant=True)
    storage.inline_fsync_allowed = False
    storage.write(None, [(1, 1, b"x")])
    await storage.sync()
    storage.inline_fsync_allowed = True
    # The first sync also fsynced the new directory for real; a slow disk must not decide where the next runs.
    storage.fsync_seconds_average = 0.0
    storage.write(None, [(2, 1, b"y")])
    await storage.sync()
    assert fsyncs.threads[0] != threading.get_ident()
    assert fsyncs.threads[1] == threading.get_ident()
    assert storage.inline_fsync_count == 1 and storage.fsync_count == 2
    storage.close()
