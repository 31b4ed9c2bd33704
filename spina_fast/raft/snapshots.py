"""Snapshot files: the state machine as of one Raft index, beside the write-ahead log.

File format (integers little-endian, like the WAL)::

    8 bytes  magic "SPNSNP01"
    u32      length of the metadata
    metadata JSON: {"index", "term", "config": {"voters": {id: addr}, "learners": {...}} | null,
                    "created": unix seconds, "data_length": N}
    N bytes  the state machine's ``snapshot()`` bytes (opaque here)
    u32      CRC-32C of everything before it

The same bytes are what a leader streams to a follower (InstallSnapshot) and what ``spina snapshot save``
downloads, so one verifier guards all three. A file is written under a ``.tmp`` name, fsynced, renamed to
``snap-<index>-<term>.snap`` and the directory fsynced: a crash leaves either the old set of snapshots or
the new one, never a half-written file under a final name. A final-named file that does not verify is
damage, and is refused loudly (``SnapshotCorrupted``), never applied.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import orjson

from spina_fast._raft import crc32c
from spina_fast.raft.membership import ClusterConfig
from spina_fast.raft.storage import StorageError

__all__ = ["SnapshotCorrupted", "SnapshotMeta", "SnapshotStore", "encode_snapshot", "read_snapshot",
           "verify_snapshot_file"]

log = logging.getLogger(__name__)

MAGIC = b"SPNSNP01"
_U32 = struct.Struct("<I")
MAX_META_BYTES = 1 << 20
CHUNK_BYTES = 1 << 20
# A snapshot file is made durable a few MB at a time, not in one fsync at the end: on ext4 (data=ordered)
# the WAL's own fsync commits the journal, which first writes out other files' dirty data. Measured here
# (4 KB WAL appends + fdatasync beside a 90 MB snapshot write): the slowest WAL fsync took 44-48 ms behind
# one final fsync, 3-12 ms with one every 4 MB.
SYNC_EVERY_BYTES = 4 << 20
_NAME = re.compile(r"snap-(\d{20})-(\d{20})\.snap")
_fdatasync = getattr(os, "fdatasync", os.fsync)


class SnapshotCorrupted(StorageError):
    """A snapshot file is truncated, damaged or not a snapshot at all."""

    code = "snapshot_corrupted"

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"snapshot {source} is not valid: {reason}")
        self.source = source
        self.reason = reason


@dataclass(frozen=True)
class SnapshotMeta:
    index: int
    term: int
    config: ClusterConfig | None
    created: float
    data_length: int

    def header(self) -> bytes:
        meta = orjson.dumps({"index": self.index, "term": self.term,
                             "config": self.config.to_json() if self.config is not None else None,
                             "created": self.created, "data_length": self.data_length})
        return MAGIC + _U32.pack(len(meta)) + meta


def encode_snapshot(index: int, term: int, config: ClusterConfig | None, data: bytes | Sequence[bytes]
                    ) -> Iterator[bytes]:
    """The snapshot file's bytes, in pieces (the data, one ``bytes`` or the pieces whose concatenation it
    is, is not copied into one big buffer)."""
    pieces = [data] if isinstance(data, bytes) else data
    header = SnapshotMeta(index, term, config, time.time(), sum(len(piece) for piece in pieces)).header()
    crc = crc32c(header)
    yield header
    for data_piece in pieces:
        view = memoryview(data_piece)
        for start in range(0, len(data_piece), CHUNK_BYTES):
            piece = view[start:start + CHUNK_BYTES]
            crc = crc32c(piece, crc)
            yield bytes(piece)
    yield _U32.pack(crc)


def _parse_header(source: str, head: bytes, total_size: int) -> tuple[SnapshotMeta, int]:
    """The metadata and the offset where the data begins; checks the size adds up."""
    if len(head) < len(MAGIC) + 4:
        raise SnapshotCorrupted(source, f"only {len(head)} bytes: too short for a snapshot header")
    if not head.startswith(MAGIC):
        raise SnapshotCorrupted(source, f"not a Spina snapshot (starts with {head[:8]!r})")
    (meta_length,) = _U32.unpack_from(head, len(MAGIC))
    start = len(MAGIC) + 4
    if meta_length > MAX_META_BYTES or start + meta_length > len(head):
        raise SnapshotCorrupted(source, f"metadata length {meta_length} runs past the header")
    try:
        document = orjson.loads(head[start:start + meta_length])
        config = document["config"]
        meta = SnapshotMeta(int(document["index"]), int(document["term"]),
                            ClusterConfig.from_json(config) if config is not None else None,
                            float(document["created"]), int(document["data_length"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotCorrupted(source, f"metadata is damaged ({exc})") from None
    data_start = start + meta_length
    expected = data_start + meta.data_length + 4
    if total_size < expected:
        raise SnapshotCorrupted(source, f"truncated: {total_size} bytes, the header promises {expected}")
    if total_size > expected:
        raise SnapshotCorrupted(source, f"{total_size - expected} unexpected bytes after the end")
    return meta, data_start


def _read_verified(file: BinaryIO, source: str, total_size: int, keep_data: bool) -> tuple[SnapshotMeta, bytes]:
    head = file.read(min(total_size, MAX_META_BYTES + len(MAGIC) + 4))
    meta, data_start = _parse_header(source, head, total_size)
    crc = crc32c(memoryview(head)[:data_start])
    pieces: list[bytes] = []
    # Whatever of the data the header read already holds, then the rest in chunks.
    buffered = head[data_start:data_start + meta.data_length]
    remaining = meta.data_length - len(buffered)
    crc = crc32c(buffered, crc)
    if keep_data:
        pieces.append(buffered)
    tail = head[data_start + len(buffered):]
    while remaining > 0:
        piece = file.read(min(CHUNK_BYTES, remaining))
        if not piece:
            raise SnapshotCorrupted(source, "truncated while reading the data")
        crc = crc32c(piece, crc)
        remaining -= len(piece)
        if keep_data:
            pieces.append(piece)
    trailer = tail + file.read(4 - len(tail))
    if len(trailer) != 4 or _U32.unpack(trailer)[0] != crc:
        raise SnapshotCorrupted(source, "checksum mismatch: the file is damaged")
    return meta, b"".join(pieces)


def read_snapshot(path: Path) -> tuple[SnapshotMeta, bytes]:
    """Verify the whole file and return its metadata and data; raises SnapshotCorrupted."""
    try:
        with path.open("rb") as file:
            return _read_verified(file, str(path), os.fstat(file.fileno()).st_size, keep_data=True)
    except OSError as exc:
        raise SnapshotCorrupted(str(path), f"cannot be read ({exc})") from None


def verify_snapshot_file(path: Path) -> SnapshotMeta:
    """Verify the whole file (checksum included) without keeping its data in memory."""
    try:
        with path.open("rb") as file:
            return _read_verified(file, str(path), os.fstat(file.fileno()).st_size, keep_data=False)[0]
    except OSError as exc:
        raise SnapshotCorrupted(str(path), f"cannot be read ({exc})") from None


def snapshot_name(index: int, term: int) -> str:
    return f"snap-{index:020d}-{term:020d}.snap"


class SnapshotStore:
    """The snapshot files of one node, in the WAL's directory. Keeps the newest ``keep`` of them."""

    def __init__(self, directory: Path, *, fsync: bool = True, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError("keep at least one snapshot")
        self.directory = directory
        self.fsync = fsync
        self.keep = keep
        directory.mkdir(parents=True, exist_ok=True)
        for leftover in directory.glob("*.snap.tmp"):
            # A snapshot being written or received when the process died: never renamed, never used.
            leftover.unlink()

    def files(self) -> list[tuple[int, int, Path]]:
        """(index, term, path) of every snapshot file, oldest first."""
        found = []
        for path in self.directory.iterdir():
            match = _NAME.fullmatch(path.name)
            if match:
                found.append((int(match.group(1)), int(match.group(2)), path))
        return sorted(found)

    def latest(self) -> tuple[int, int, Path] | None:
        files = self.files()
        return files[-1] if files else None

    def load_latest(self) -> tuple[SnapshotMeta, bytes] | None:
        """The newest snapshot, verified. A damaged newest file is refused (not skipped): the log behind it
        is compacted away, so an older snapshot would silently lose committed writes."""
        latest = self.latest()
        if latest is None:
            return None
        index, term, path = latest
        meta, data = read_snapshot(path)
        if (meta.index, meta.term) != (index, term):
            raise SnapshotCorrupted(str(path), f"holds index {meta.index} term {meta.term}, not what its name says")
        return meta, data

    def temp_path(self, label: str) -> Path:
        return self.directory / f"{label}.snap.tmp"

    def write(self, index: int, term: int, config: ClusterConfig | None, data: bytes | Sequence[bytes]) -> Path:
        """Write, fsync and publish one snapshot (blocking: run it in a worker thread); ``data`` as for
        ``encode_snapshot``."""
        temp = self.temp_path(f"local-{index}")
        with temp.open("wb") as file:
            unsynced = 0
            for piece in encode_snapshot(index, term, config, data):
                file.write(piece)
                unsynced += len(piece)
                if self.fsync and unsynced >= SYNC_EVERY_BYTES:
                    file.flush()
                    _fdatasync(file.fileno())
                    unsynced = 0
            file.flush()
            if self.fsync:
                _fdatasync(file.fileno())
        return self.publish(temp, index, term)

    def publish(self, temp: Path, index: int, term: int) -> Path:
        """Rename a complete, fsynced temporary file to its final name and make the rename durable."""
        final = self.directory / snapshot_name(index, term)
        os.replace(temp, final)
        if self.fsync:
            directory_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory_fd)
            finally:
                os.close(directory_fd)
        self.prune()
        return final

    def prune(self) -> None:
        for _, _, path in self.files()[:-self.keep]:
            path.unlink(missing_ok=True)
