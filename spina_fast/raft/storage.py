"""The durable write-ahead log of a Raft node: append-only segment files of checksummed records.

Record format (integers little-endian, as in etcd's WAL)::

    u32 length    number of bytes from the type byte to the end of the body: 1 + len(body)
    u8  type      ENTRY=1, HARD_STATE=2, TRUNCATE=3, COMPACT=4
    body          ENTRY       u64 index, u64 term, payload (the rest of the body)
                  HARD_STATE  u64 term, u64 commit_index, voted_for as UTF-8 (the rest of the body)
                  TRUNCATE    u64 from_index: entries >= from_index are gone
                  COMPACT     u64 snapshot_index, u64 snapshot_term
    u32 crc       CRC-32C (Castagnoli) of length + type + body

A segment file is ``wal-<sequence>-<first index>.log`` (both 16 decimal digits) and starts with the 8-byte
magic ``SPNWAL01``. The first index is the index the next entry was due to get when the segment was created;
the sequence orders the files, because after a truncation below a segment's first index the next segment's
first index is smaller. Replay applies the records of all segments in order, later records winning (a
TRUNCATE drops the suffix it names, a COMPACT drops the prefix it covers, the last HARD_STATE stands).

Recovery: a record that is cut short or fails its checksum at the end of the last segment is a write torn by
a crash; the file is cut back to the last good record. The same damage followed by any good record, or
anywhere but in the last segment, is corruption of data that may have been committed, and ``open`` refuses
with ``StorageCorrupted`` instead of dropping it (a segment is fsynced before the next one is created, so an
older segment can never be legitimately torn). Known limit: after a power cut (not a process crash) the kernel
may have kept a later unsynced page but not an earlier one; that too reads as damage followed by good records
and is refused, although none of it was acknowledged. Refusing needs an operator; guessing could lose data.

Spare segments: while a segment fills up, a worker thread writes the next one ahead as zeros
(``wal-spare.tmp``, ``segment_bytes`` long, fdatasynced), and a roll renames it into place. Appending to a file
that grows makes every fdatasync commit the new size through the filesystem's journal as well; overwriting
blocks already written and synced does not (here, ext4: one 200-byte record per fdatasync 15.4k/s over zeros
against 9.6k/s appending, ``benchmarks/wal_write.py``'s "raw over zeros" column). So a segment may end in
zeros after its last record: replay reads them as the end of the log, not as damage. A finished segment is cut
to its last record before the next one starts, so only the last segment has such a tail. (etcd keeps a
preallocated spare segment for the same reason.)

Durability: ``write`` hands the bytes to the kernel (one ``os.write`` per call, no fsync); ``sync`` makes
everything written so far durable with one ``fdatasync`` shared by all concurrent callers (group commit).
While the disk's fdatasyncs are fast (a moving average under ``INLINE_FSYNC_SECONDS``), ``sync`` runs it on
the calling (event loop) thread; otherwise in a worker thread, so that a slow disk does not stall the loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from spina_fast._raft import crc32c, encode_wal_entries
from spina_fast.errors import SpinaError

__all__ = ["DEFAULT_SEGMENT_BYTES", "RaftStorage", "StorageCorrupted", "StorageError"]

log = logging.getLogger(__name__)

DEFAULT_SEGMENT_BYTES = 64 << 20

ENTRY = 1
HARD_STATE = 2
TRUNCATE = 3
COMPACT = 4

MAGIC = b"SPNWAL01"

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_TWO_U64 = struct.Struct("<QQ")
# length + type + two u64: the head of ENTRY, HARD_STATE and COMPACT records.
_HEAD_TWO_U64 = struct.Struct("<IBQQ")
_HEAD_ONE_U64 = struct.Struct("<IBQ")
_LENGTH_SIZE = 4
_CRC_SIZE = 4
_SMALLEST_RECORD = _LENGTH_SIZE + 1 + _CRC_SIZE
_TWO_U64_BODY = 16
_ONE_U64_BODY = 8

# Handing an fdatasync to the worker thread and back costs two thread wake-ups, plus a GIL hand-over each
# way; on a busy machine those take longer than a fast disk's fdatasync (0.1-0.4 ms on this project's VMs,
# measured in benchmarks/wal_write.py), and they are on every write's commit path. So an fsync expected to be
# that fast is done right on the event loop; a disk that turns slow sends them back to the thread.
INLINE_FSYNC_SECONDS = 0.001
# Weight of the newest fdatasync in the moving average that decides.
_FSYNC_AVERAGE_WEIGHT = 0.2

_SEGMENT_NAME = re.compile(r"wal-(\d{16})-(\d{16})\.log")
_SPARE_NAME = "wal-spare.tmp"
# The spare is written and fdatasynced this much at a time: one flush of the whole of it would hold the log's
# own fdatasyncs behind it for tens of milliseconds.
_SPARE_STEP_BYTES = 4 << 20
_NONZERO = re.compile(rb"[^\x00]")

# fdatasync flushes the data and the file size (what a reader needs) but not mtime; macOS lacks it.
_fdatasync = getattr(os, "fdatasync", os.fsync)
_fsync_directory = os.fsync
# A spare segment's zeros are not the log's data (a lost spare only costs the speed-up): its own name, so that
# tests that count and model the log's fdatasyncs see only those.
_fdatasync_spare = _fdatasync


class StorageError(SpinaError):
    """The write-ahead log cannot do its job (an fsync or write failed, or the storage is closed)."""

    code = "storage_error"


class StorageCorrupted(StorageError):
    """A segment holds damaged records that are not a torn tail; recovering would lose committed data."""

    code = "storage_corrupted"

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(f"write-ahead log segment {path} is corrupted at byte offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


@dataclass
class _Segment:
    path: Path
    sequence: int
    first_index: int
    # Highest ENTRY index written to the segment (0 when none), truncated or not: compaction deletes a
    # segment only when all of it is covered by the snapshot.
    max_entry_index: int = 0


def _segment_path(directory: Path, sequence: int, first_index: int) -> Path:
    return directory / f"wal-{sequence:016d}-{first_index:016d}.log"


def _encode_hard_state(hard_state: tuple[int, str, int]) -> bytes:
    term, voted_for, commit_index = hard_state
    voted = voted_for.encode()
    head = _HEAD_TWO_U64.pack(1 + _TWO_U64_BODY + len(voted), HARD_STATE, term, commit_index) + voted
    return head + _U32.pack(crc32c(head))


def _encode_truncate(from_index: int) -> bytes:
    head = _HEAD_ONE_U64.pack(1 + _ONE_U64_BODY, TRUNCATE, from_index)
    return head + _U32.pack(crc32c(head))


def _encode_compact(snapshot_index: int, snapshot_term: int) -> bytes:
    head = _HEAD_TWO_U64.pack(1 + _TWO_U64_BODY, COMPACT, snapshot_index, snapshot_term)
    return head + _U32.pack(crc32c(head))


def _body_size_fits(kind: int, body_size: int) -> bool:
    if kind == ENTRY or kind == HARD_STATE:
        return body_size >= _TWO_U64_BODY
    if kind == TRUNCATE:
        return body_size == _ONE_U64_BODY
    if kind == COMPACT:
        return body_size == _TWO_U64_BODY
    return False


def _damage_at(data: bytes, view: memoryview, offset: int) -> str | None:
    """Why the record at ``offset`` is not a whole, intact record (None when it is)."""
    remaining = len(data) - offset
    if remaining < _SMALLEST_RECORD:
        return f"{remaining} trailing bytes are too few for a record"
    (length,) = _U32.unpack_from(data, offset)
    if length < 1:
        return "record length is 0"
    if _LENGTH_SIZE + length + _CRC_SIZE > remaining:
        return f"record of {length} bytes runs {_LENGTH_SIZE + length + _CRC_SIZE - remaining} bytes past the end"
    crc_offset = offset + _LENGTH_SIZE + length
    if crc32c(view[offset:crc_offset]) != _U32.unpack_from(data, crc_offset)[0]:
        return "checksum mismatch"
    return None


def _next_intact_record(data: bytes, view: memoryview, start: int, content_end: int) -> int | None:
    """The first offset at or after ``start`` where a whole, intact, well-formed record begins.

    Only used after damage was found, to tell a torn tail (nothing intact follows) from corruption in the
    middle (intact records follow). The length field of the damaged record may itself be damaged, so every
    byte offset is tried, up to ``content_end`` (the end of the last non-zero byte: a record has a non-zero
    length, so none starts in the zeros after it), skipping runs of zeros.
    """
    end = min(len(data) - _SMALLEST_RECORD, content_end - 1)
    offset = start
    while offset <= end:
        (length,) = _U32.unpack_from(data, offset)
        if length < 1:
            nonzero = _NONZERO.search(data, offset, content_end)
            if nonzero is None:
                return None
            offset = max(offset + 1, nonzero.start() - _LENGTH_SIZE + 1)
            continue
        if offset + _LENGTH_SIZE + length + _CRC_SIZE > len(data) or not _body_size_fits(
                data[offset + _LENGTH_SIZE], length - 1):
            offset += 1
            continue
        if _damage_at(data, view, offset) is None:
            return offset
        offset += 1
    return None


class _Replay:
    """Applies records in order to rebuild the log, the hard state and the compaction point."""

    def __init__(self, first_index: int) -> None:
        # entries[i] has index first + i; with no entries, ``first`` is the index the next entry must have.
        self.first = first_index
        self.entries: list[tuple[int, int, bytes]] = []
        self.hard_state: tuple[int, str, int] = (0, "", 0)
        self.snapshot_index = 0
        self.snapshot_term = 0

    @property
    def next_index(self) -> int:
        return self.first + len(self.entries)

    def segment(self, path: Path, data: bytes, is_last: bool) -> tuple[int, int, str | None]:
        """Apply one segment's records: (end of the last good record, highest entry index, damage or None).

        Damage is only returned for a torn tail of the last segment; anything else raises StorageCorrupted.
        """
        if not data.startswith(MAGIC):
            # A segment started but never written: its header cut short, in front of nothing or of a spare's
            # zeros (a crash between taking the spare and writing the header).
            content = data.rstrip(b"\0")
            if is_last and len(content) < len(MAGIC) and MAGIC.startswith(content):
                return 0, 0, f"segment header cut short at {len(content)} bytes"
            if len(data) < len(MAGIC):
                raise StorageCorrupted(path, 0, "file is too short for the segment header")
            raise StorageCorrupted(path, 0, f"not a write-ahead log segment (header {data[:8]!r})")
        view = memoryview(data)
        max_entry_index = 0
        offset = len(MAGIC)
        size = len(data)
        entries = self.entries
        append = entries.append
        unpack_u32 = _U32.unpack_from
        unpack_two_u64 = _TWO_U64.unpack_from
        while offset < size:
            # The intact-record test of _damage_at, inlined: replay spends its time here.
            length = unpack_u32(data, offset)[0] if size - offset >= _SMALLEST_RECORD else 0
            crc_offset = offset + _LENGTH_SIZE + length
            if not (
                length
                and crc_offset + _CRC_SIZE <= size
                and crc32c(view[offset:crc_offset]) == unpack_u32(data, crc_offset)[0]
            ):
                content_end = len(data.rstrip(b"\0"))
                if is_last and content_end <= offset:
                    break  # the zeros of a spare segment after the last record: the end of the log
                damage = _damage_at(data, view, offset) or "damaged record"
                if not is_last:
                    raise StorageCorrupted(path, offset, f"{damage}, in a segment that is not the last one")
                intact = _next_intact_record(data, view, offset + 1, content_end)
                if intact is not None:
                    raise StorageCorrupted(path, offset, f"{damage}, but an intact record follows at {intact}")
                return offset, max_entry_index, damage
            kind = data[offset + _LENGTH_SIZE]
            body = offset + _LENGTH_SIZE + 1
            if kind == ENTRY and length > _TWO_U64_BODY:
                index, term = unpack_two_u64(data, body)
                if index != self.first + len(entries):
                    raise StorageCorrupted(
                        path, offset, f"entry {index} out of sequence (expected {self.first + len(entries)})"
                    )
                append((index, term, data[body + _TWO_U64_BODY:crc_offset]))
                if index > max_entry_index:
                    max_entry_index = index
            elif not _body_size_fits(kind, crc_offset - body):
                # The checksum matched, so the writer produced this: a bug or a newer format, not a torn write.
                raise StorageCorrupted(path, offset, f"record type {kind} with a {crc_offset - body}-byte body")
            elif kind == HARD_STATE:
                term, commit_index = unpack_two_u64(data, body)
                try:
                    voted_for = data[body + _TWO_U64_BODY:crc_offset].decode()
                except UnicodeDecodeError as exc:
                    raise StorageCorrupted(path, offset, f"hard state's voted_for is not UTF-8: {exc}") from exc
                self.hard_state = (term, voted_for, commit_index)
            elif kind == TRUNCATE:
                self._truncate(path, offset, _U64.unpack_from(data, body)[0])
            else:
                snapshot_index, snapshot_term = unpack_two_u64(data, body)
                self._compact(snapshot_index, snapshot_term)
            offset = crc_offset + _CRC_SIZE
        return offset, max_entry_index, None

    def _truncate(self, path: Path, offset: int, from_index: int) -> None:
        if from_index > self.next_index:
            raise StorageCorrupted(
                path, offset, f"truncation from {from_index} is beyond the log's end {self.next_index - 1}"
            )
        if from_index <= self.first:
            # The suffix may start in a segment already deleted by compaction: nothing of it is held here.
            self.entries.clear()
            self.first = from_index
        else:
            del self.entries[from_index - self.first:]

    def _compact(self, snapshot_index: int, snapshot_term: int) -> None:
        if snapshot_index <= self.snapshot_index:
            return
        self.snapshot_index = snapshot_index
        self.snapshot_term = snapshot_term
        if snapshot_index >= self.first:
            del self.entries[:snapshot_index - self.first + 1]
            self.first = snapshot_index + 1


class RaftStorage:
    """A Raft node's write-ahead log in one directory. Create it with ``RaftStorage.open``.

    ``hard_state`` (term, voted_for, commit_index), ``snapshot_index``/``snapshot_term`` and ``last_index``
    start as recovered by ``open`` and follow every write; ``entries()`` is only what ``open`` recovered.
    Stats: ``fsync_count``, ``bytes_written``, ``segment_count``.

    Not thread-safe: call ``write``/``sync``/``compact`` from one thread (the event loop's); only the fsync
    itself, and ``delete_detached_segments``, run in a worker thread.
    """

    hard_state: tuple[int, str, int]
    snapshot_index: int
    snapshot_term: int
    last_index: int
    fsync_count: int
    bytes_written: int

    def __init__(self, directory: Path, *, segment_bytes: int, fsync: bool) -> None:
        if segment_bytes <= 0:
            raise ValueError(f"segment_bytes must be positive, got {segment_bytes}")
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.hard_state = (0, "", 0)
        self.snapshot_index = 0
        self.snapshot_term = 0
        self.last_index = 0
        # Segment-file fdatasyncs done (group commits, segment rollovers, compactions); not directory fsyncs.
        self.fsync_count = 0
        # Bytes appended by this process; also the position ``sync`` compares against ``_synced``.
        self.bytes_written = 0
        self._synced = 0
        self._segments: list[_Segment] = []
        # Where the next record goes in the last segment, and that file's size (larger while it is a spare's
        # zeros past the last record).
        self._segment_size = 0
        self._segment_file_size = 0
        # The next segment, being written as zeros by a worker thread (None: not asked for yet).
        self._spare: Future[None] | None = None
        self._spare_executor: ThreadPoolExecutor | None = None
        self._fd = -1
        self._directory_fd = -1
        self._retired_fds: list[int] = []
        self._directory_sync_pending = False
        self._recovered: list[tuple[int, int, bytes]] | None = []
        self._fsync_running = False
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._executor: ThreadPoolExecutor | None = None
        # Held by whoever fsyncs or closes file descriptors, so close() never pulls a descriptor out from
        # under an fsync running in the worker thread.
        self._io_lock = threading.Lock()
        self._failure: BaseException | None = None
        self._closed = False
        # Segments a compaction took out of the log, oldest first, until their files are deleted (in that
        # order, under the lock: whoever deletes, a crash leaves a shorter prefix deleted, never a hole).
        self._detached: list[Path] = []
        self._deletion_lock = threading.Lock()
        # Moving average of fdatasync seconds (0 until measured: the first one runs on the loop), and how
        # many of the group commits ran on the loop rather than in the worker thread.
        self.fsync_seconds_average = 0.0
        self.inline_fsync_count = 0
        # Cleared by the node while it writes a snapshot file: its fsync (tens of MB) can hold the disk,
        # and ours behind it, for longer than an election timeout, which the loop must not sit out.
        self.inline_fsync_allowed = True

    # ----------------------------------------------------------------------------------------------- open

    @classmethod
    def open(
        cls, directory: Path | str, *, segment_bytes: int = DEFAULT_SEGMENT_BYTES, fsync: bool = True
    ) -> RaftStorage:
        """Open (creating if needed) the log in ``directory`` and replay it; see the module docstring."""
        storage = cls(Path(directory), segment_bytes=segment_bytes, fsync=fsync)
        try:
            storage._recover()
        except BaseException:
            storage._close_descriptors()
            raise
        return storage

    def _recover(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._directory_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        (self.directory / _SPARE_NAME).unlink(missing_ok=True)  # perhaps half written when we stopped
        found: list[_Segment] = []
        for path in self.directory.iterdir():
            match = _SEGMENT_NAME.fullmatch(path.name)
            if match:
                found.append(_Segment(path, int(match.group(1)), int(match.group(2))))
        found.sort(key=lambda segment: segment.sequence)
        if not found:
            self._open_segment(sequence=1, first_index=1)
            return
        replay = _Replay(found[0].first_index)
        good_end = 0
        for position, segment in enumerate(found):
            is_last = position == len(found) - 1
            if position and segment.sequence != found[position - 1].sequence + 1:
                raise StorageCorrupted(
                    segment.path, 0, f"segment {found[position - 1].sequence + 1} before it is missing"
                )
            if segment.first_index != replay.next_index:
                raise StorageCorrupted(
                    segment.path, 0,
                    f"segment starts at index {segment.first_index} but the log before it ends at "
                    f"{replay.next_index - 1}",
                )
            data = segment.path.read_bytes()
            good_end, segment.max_entry_index, damage = replay.segment(segment.path, data, is_last)
            if damage is not None:
                self._cut_torn_tail(segment.path, good_end, len(data), damage)
            self._segment_file_size = good_end if damage is not None else len(data)
        if replay.first != replay.snapshot_index + 1:
            raise StorageCorrupted(
                found[0].path, 0,
                f"entries {replay.snapshot_index + 1}..{replay.first - 1} are missing "
                f"(snapshot at {replay.snapshot_index}, log resumes at {replay.first})",
            )
        self.hard_state = replay.hard_state
        self.snapshot_index = replay.snapshot_index
        self.snapshot_term = replay.snapshot_term
        self.last_index = replay.next_index - 1
        self._recovered = replay.entries
        self._segments = found
        last = found[-1]
        self._fd = os.open(last.path, os.O_WRONLY | os.O_CLOEXEC)
        self._segment_size = os.lseek(self._fd, good_end, os.SEEK_SET)
        if self._segment_size == 0:
            self._write_all(MAGIC)
            self._segment_size = len(MAGIC)

    def _cut_torn_tail(self, path: Path, good_end: int, size: int, damage: str) -> None:
        log.warning(
            "write-ahead log %s: torn tail at byte offset %d (%s); cutting %d bytes",
            path, good_end, damage, size - good_end,
            extra={"segment": str(path), "offset": good_end, "reason": damage},
        )
        with open(path, "r+b") as file:
            file.truncate(good_end)
            if self.fsync:
                _fdatasync(file.fileno())

    # --------------------------------------------------------------------------------------------- reads

    def entries(self) -> list[tuple[int, int, bytes]]:
        """The (index, term, payload) entries after the snapshot point that ``open`` recovered, in order.

        The driver loads them into its in-memory log before writing; the first ``write`` or ``compact``
        releases them (holding a second copy of the log for the process's life would double its memory).
        """
        if self._recovered is None:
            raise RuntimeError("entries() answers what open() recovered; call it before the first write()")
        return self._recovered

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    # -------------------------------------------------------------------------------------------- writes

    def write(self, hard_state: tuple[int, str, int] | None, entries: list[tuple[int, int, bytes]]) -> None:
        """Append one Ready's records (no fsync: see ``sync``).

        If the first entry's index is already held, the held suffix from it is truncated first (a TRUNCATE
        record, then the entries). The hard state is written after the entries, so a torn write can drop it
        but never leave a commit index pointing past entries that did not make it.
        """
        self._check_usable()
        parts: list[bytes] = []
        next_index = self.last_index + 1
        if entries:
            first_index = entries[0][0]
            if first_index <= self.snapshot_index:
                raise ValueError(
                    f"entry {first_index} is at or below the snapshot point {self.snapshot_index}"
                )
            if first_index > next_index:
                raise ValueError(f"entry {first_index} leaves a gap after the last index {self.last_index}")
            if first_index < next_index:
                parts.append(_encode_truncate(first_index))
            # One C call encodes and checksums the whole batch (and checks the indexes are consecutive).
            parts.append(encode_wal_entries(entries, first_index, ENTRY))
            next_index = first_index + len(entries)
        if hard_state is not None:
            parts.append(_encode_hard_state(hard_state))
        if not parts:
            return
        if self._segment_size >= self.segment_bytes:
            self._roll()
        self._write_all(b"".join(parts))
        self._recovered = None
        if self._spare is None and self.fsync and self._segment_size >= self.segment_bytes // 2:
            self._prepare_spare()
        if entries:
            self.last_index = next_index - 1
            segment = self._segments[-1]
            if self.last_index > segment.max_entry_index:
                segment.max_entry_index = self.last_index
        if hard_state is not None:
            self.hard_state = hard_state

    def _write_all(self, data: bytes) -> None:
        try:
            written = os.write(self._fd, data)
            if written < len(data):
                view = memoryview(data)
                while written < len(data):
                    written += os.write(self._fd, view[written:])
        except OSError as exc:
            # Part of a record may be on disk: anything appended after it would read as corruption in the
            # middle. Stop here; reopening cuts the partial record as a torn tail.
            self._fail(exc)
            raise StorageError(f"write to {self._segments[-1].path} failed: {exc}") from exc
        self._segment_size += len(data)
        self._segment_file_size = max(self._segment_file_size, self._segment_size)
        self.bytes_written += len(data)

    def _roll(self) -> None:
        # The finished segment is made durable before the next one exists, so replay may treat damage in
        # any segment but the last as corruption rather than a torn write; zeros left of a spare go first.
        if self._segment_file_size > self._segment_size:
            os.ftruncate(self._fd, self._segment_size)
        if self.fsync:
            self._fdatasync_or_fail(self._fd)
        if not self._fsync_running:
            os.close(self._fd)
        else:
            self._retired_fds.append(self._fd)  # the in-flight fsync still holds it
        previous = self._segments[-1]
        self._open_segment(sequence=previous.sequence + 1, first_index=self.last_index + 1)

    def _open_segment(self, *, sequence: int, first_index: int) -> None:
        path = _segment_path(self.directory, sequence, first_index)
        spare = self._spare
        if spare is not None and spare.done() and spare.exception() is None:
            self._spare = None
            spare_path = self.directory / _SPARE_NAME
            os.link(spare_path, path)  # as O_EXCL: never over an existing segment
            os.unlink(spare_path)
            self._fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            self._segment_file_size = os.fstat(self._fd).st_size
        else:
            if spare is not None and spare.done():
                self._spare = None  # it failed (logged there): try again for the next roll
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            self._segment_file_size = 0
        self._segments.append(_Segment(path, sequence, first_index))
        self._segment_size = 0
        self._write_all(MAGIC)
        # The new name must reach the disk before records in it count as durable: the next sync does it.
        self._directory_sync_pending = True

    def _prepare_spare(self) -> None:
        if self._spare_executor is None:
            self._spare_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raft-wal-spare")
        self._spare = self._spare_executor.submit(self._write_spare, self.directory / _SPARE_NAME,
                                                  self.segment_bytes)

    def _write_spare(self, path: Path, size: int) -> None:
        """The next segment as ``size`` zero bytes, durable (runs in a worker thread)."""
        if self._closed:
            raise StorageError("closed before preparing the next segment")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                zeros = bytes(min(size, _SPARE_STEP_BYTES))
                written = 0
                while written < size and not self._closed:
                    written += os.write(fd, zeros[:size - written])
                    _fdatasync_spare(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            # Not the log's data: the next segment simply starts empty, as without a spare.
            log.warning("write-ahead log in %s: cannot prepare the next segment: %s", self.directory, exc)
            raise
        if written < size:
            raise StorageError("closed while preparing the next segment")

    # ---------------------------------------------------------------------------------------- durability

    async def sync(self) -> None:
        """Make everything written so far durable (group commit).

        One fdatasync runs at a time, in a worker thread, or (while fdatasyncs are fast) in a callback on the
        event loop scheduled for the end of this loop iteration. A caller whose writes are covered by the
        one in flight waits for it; a caller that wrote after it started waits for the next one, which
        starts as soon as the one in flight ends and covers every such caller.
        """
        self._check_usable()
        target = self.bytes_written
        if not self.fsync:
            self._synced = max(self._synced, target)
            return
        if self._synced >= target:
            return
        loop = asyncio.get_running_loop()
        # A future per caller: a cancelled caller gives up its own wait, never the fsync others share.
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append((target, waiter))
        if not self._fsync_running:
            self._start_fsync(loop)
        try:
            await waiter
        except OSError as exc:
            raise StorageError(f"fsync of the write-ahead log in {self.directory} failed: {exc}") from exc

    def _note_fsync_seconds(self, seconds: float) -> None:
        self.fsync_seconds_average += _FSYNC_AVERAGE_WEIGHT * (seconds - self.fsync_seconds_average)

    def _start_fsync(self, loop: asyncio.AbstractEventLoop) -> None:
        self._fsync_running = True
        if self.inline_fsync_allowed and self.fsync_seconds_average < INLINE_FSYNC_SECONDS:
            # Soon, not now: every caller that writes and syncs in this loop iteration shares the fsync.
            loop.call_soon(self._fsync_on_loop, loop)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raft-wal-fsync")
        directory_too = self._directory_sync_pending
        self._directory_sync_pending = False
        # Not loop.run_in_executor: its asyncio future runs done callbacks one loop iteration after the
        # result lands, and waiters wake one more later. The worker calls back onto the loop itself.
        self._executor.submit(self._fsync_in_thread, loop, self.bytes_written, self._fd, directory_too)

    def _fsync_on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        # Covers everything written until now, including what was written since it was scheduled; a segment
        # rolled over meanwhile was fdatasynced by _roll before its successor existed.
        target = self.bytes_written
        directory_too = self._directory_sync_pending
        self._directory_sync_pending = False
        failure: Exception | None = None
        synced = False
        started = time.perf_counter()
        if not self._closed:
            try:
                _fdatasync(self._fd)
                if directory_too:
                    _fsync_directory(self._directory_fd)
                synced = True
            except OSError as exc:
                failure = exc
        if synced:
            self.inline_fsync_count += 1
        self._fsync_finished(loop, target, synced, failure, time.perf_counter() - started)

    def _fsync_in_thread(self, loop: asyncio.AbstractEventLoop, target: int, fd: int, directory_too: bool) -> None:
        failure: Exception | None = None
        synced = False
        started = time.perf_counter()
        try:
            with self._io_lock:
                if not self._closed:  # else close() synced (or failed) and released the descriptors
                    _fdatasync(fd)
                    if directory_too:
                        _fsync_directory(self._directory_fd)
                    synced = True
        except Exception as exc:  # handed to the loop thread, which fails the storage with it
            failure = exc
        try:
            loop.call_soon_threadsafe(self._fsync_finished, loop, target, synced, failure,
                                      time.perf_counter() - started)
        except RuntimeError:
            return  # the event loop is closed: nobody is waiting any more

    def _fsync_finished(
        self, loop: asyncio.AbstractEventLoop, target: int, synced: bool, failure: Exception | None,
        seconds: float,
    ) -> None:
        self._fsync_running = False
        if synced:
            self._note_fsync_seconds(seconds)
        for retired in self._retired_fds:
            os.close(retired)
        self._retired_fds.clear()
        if failure is not None:
            self._fail(failure)
        elif synced:
            self.fsync_count += 1
            self._synced = max(self._synced, target)
        still_waiting = []
        for waiter_target, waiter in self._waiters:
            if waiter.done():
                continue  # cancelled
            if waiter_target <= self._synced:
                waiter.set_result(None)
            elif failure is not None:
                waiter.set_exception(failure)
            elif self._failure is not None or self._closed:
                waiter.set_exception(StorageError(f"the write-ahead log in {self.directory} was closed or "
                                                  "failed before this write was durable"))
            else:
                still_waiting.append((waiter_target, waiter))
        self._waiters = still_waiting
        if still_waiting:
            self._start_fsync(loop)

    def sync_blocking(self) -> None:
        """``sync`` for callers outside the event loop (tests, shutdown): fsyncs in the calling thread."""
        self._check_usable()
        target = self.bytes_written
        if self.fsync and self._synced < target:
            directory_too = self._directory_sync_pending
            self._directory_sync_pending = False
            with self._io_lock:
                self._fdatasync_or_fail(self._fd)
                if directory_too:
                    self._fsync_directory_or_fail()
        self._synced = max(self._synced, target)

    def _fdatasync_or_fail(self, fd: int) -> None:
        try:
            _fdatasync(fd)
        except OSError as exc:
            # After a failed fsync the kernel may have dropped the dirty pages: retrying can "succeed"
            # without the data (PostgreSQL's fsyncgate, 2018). The only safe answer is to stop.
            self._fail(exc)
            raise StorageError(f"fsync of {self._segments[-1].path} failed: {exc}") from exc
        self.fsync_count += 1

    def _fsync_directory_or_fail(self) -> None:
        try:
            _fsync_directory(self._directory_fd)
        except OSError as exc:
            self._fail(exc)
            raise StorageError(f"fsync of directory {self.directory} failed: {exc}") from exc

    # -------------------------------------------------------------------------------------- compaction

    def compact(self, snapshot_index: int, snapshot_term: int, *, discard_log: bool = False,
                defer_deletion: bool = False) -> bool:
        """Record the snapshot point, then delete the oldest segments it fully covers.

        A snapshot beyond the last index (installed from the leader) empties the log: the next entry is
        ``snapshot_index + 1``. ``discard_log`` empties it in any case (a snapshot installed over a log
        that diverged from the leader's: nothing after the snapshot point may survive a restart). Blocks
        for one fsync, plus one directory fsync per deleted segment, when it deletes a segment or discards
        the log; otherwise the record is made durable by the next ``sync`` (losing it in a crash only means
        replaying entries the snapshot covers, which the node skips), so a snapshot does not stop the event
        loop on an fsync that may queue behind the snapshot file's own.

        With ``defer_deletion`` the covered segments leave the log but their files stay until
        ``delete_detached_segments`` (a worker thread's job: unlinking a 64 MB segment takes ext4 15-40 ms,
        which the event loop must not sit out); returns whether any wait for it.
        """
        self._check_usable()
        if snapshot_index <= self.snapshot_index and not discard_log:
            return False
        # The latest hard state may live in a segment about to be deleted: restate it beside the COMPACT.
        record = _encode_compact(snapshot_index, snapshot_term) + _encode_hard_state(self.hard_state)
        if discard_log:
            record = _encode_truncate(self.snapshot_index + 1) + record
            self.last_index = max(snapshot_index, self.snapshot_index)
        self._write_all(record)
        self._recovered = None
        if snapshot_index > self.snapshot_index:
            self.snapshot_index = snapshot_index
            self.snapshot_term = snapshot_term
        if snapshot_index > self.last_index:
            self.last_index = snapshot_index
        segments = self._segments
        if discard_log or (len(segments) > 1 and segments[0].max_entry_index <= snapshot_index):
            self.sync_blocking()
        detached = []
        while len(segments) > 1 and segments[0].max_entry_index <= snapshot_index:
            detached.append(segments.pop(0).path)
        if not detached:
            return False
        with self._deletion_lock:
            self._detached.extend(detached)
        if defer_deletion:
            return True
        self.delete_detached_segments()
        return False

    def delete_detached_segments(self) -> None:
        """Delete the files of the segments compactions took out of the log (blocking; safe in a worker thread)."""
        with self._deletion_lock:
            while self._detached and not self._closed:
                # Oldest first, each unlink made durable before the next: a crash leaves a shorter prefix
                # deleted, never a hole in the middle that replay would refuse.
                os.unlink(self._detached[0])
                if self.fsync:
                    self._fsync_directory_path()
                self._detached.pop(0)

    def _fsync_directory_path(self) -> None:
        # Its own descriptor: close() may close the log's while a worker thread runs this.
        directory_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _fsync_directory(directory_fd)
        except OSError as exc:
            self._fail(exc)
            raise StorageError(f"fsync of directory {self.directory} failed: {exc}") from exc
        finally:
            os.close(directory_fd)

    # ----------------------------------------------------------------------------------------- closing

    def close(self) -> None:
        """Make what was written durable and release the files. Idempotent."""
        if self._closed:
            return
        try:
            if self._failure is None and self._fd >= 0:
                self.sync_blocking()
        finally:
            self._close_descriptors()

    def _close_descriptors(self) -> None:
        with self._io_lock:
            self._closed = True
            for fd in (self._fd, self._directory_fd, *self._retired_fds):
                if fd >= 0:
                    os.close(fd)
            self._fd = self._directory_fd = -1
            self._retired_fds.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        if self._spare_executor is not None:
            # Stops within one step; waited for, so that a log reopened on this directory never shares its
            # spare file with a thread of this one.
            self._spare_executor.shutdown(wait=True)
            self._spare_executor = None

    def _fail(self, failure: BaseException) -> None:
        if self._failure is None:
            log.error("write-ahead log in %s failed; it refuses further writes: %s", self.directory, failure)
            self._failure = failure

    def _check_usable(self) -> None:
        if self._closed:
            raise StorageError(f"the write-ahead log in {self.directory} is closed")
        if self._failure is not None:
            raise StorageError(
                f"the write-ahead log in {self.directory} failed earlier ({self._failure}); reopen it"
            ) from self._failure
