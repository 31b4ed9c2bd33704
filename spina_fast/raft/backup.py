"""Continuous backup (change data capture) and point-in-time recovery.

An agent started with ``--backup-dir DIR`` ships every entry it applies into its own stream folder
``DIR/<node-id>/``, laid out like an object-store bucket (files are written once, under a temporary name,
and renamed when complete; a complete file is never modified)::

    seg-<first index>-<last index>.cdc   committed entries, one segment per flush (every --backup-interval)
    base-<index>-<term>.snap             base snapshots, in the snapshot file format of ``snapshots.py``

Segment format (integers little-endian, like the WAL and snapshots)::

    8 bytes  magic "SPNCDC01"
    u32      length of the header
    header   JSON: {"node_id", "first_index", "last_index", "records", "body_bytes", "oldest", "sealed"}
    u32      CRC-32C of everything before it
    records, each: u64 index, u64 term, f64 commit time (the node's wall clock when it applied the entry,
             unix seconds), u32 payload length, the Raft entry payload (kind byte + command),
             u32 CRC-32C of the record's header and payload

Why every node writes its own stream, not only the leader: all nodes apply the same committed entries at the
same indexes (Raft's State Machine Safety), so every stream is a valid copy of the history, and a restore
merges whichever streams it is given. A leader killed with unshipped entries then loses nothing the
followers shipped, no hand-over of "where the old leader stopped" is needed on failover, and a single damaged
or lost stream is covered by the others. The cost is N copies of the log in the backup folder.

RPO: entries are buffered in memory (the Ready loop only appends a reference to the batch it applied) and
sealed into a fsynced segment at least every ``interval`` seconds (at most 60), by a task that does the
writing in a worker thread. A committed entry is therefore durable in the backup at most ``interval`` (plus
one write) after a node applied it; with several nodes streaming, it is lost from the backup only if every
streaming node dies within that window.

Base snapshots keep a restore from replaying the log from the beginning of time: the node's own snapshot
files are copied as bases (at most once per ``base_interval``), and a base is written at once whenever the
stream would otherwise have a gap (a snapshot installed from the leader, a restart from a snapshot, a stream
started on a node with history).

Restoring (``rebuild``) verifies every segment of every stream (header and record checksums, sizes, index
continuity, and that streams agree where they overlap), picks the newest base at or below the target, and
replays the records after it through a real ``ReplicatedState``. Temporary files (a segment being written
when the node died) are never read; anything damaged under a final name is refused with its path and byte
offset, and a range of indexes no stream holds is refused as a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import statistics
import struct
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from spina_fast import _raft
from spina_fast._raft import crc32c
from spina_fast.errors import InvalidRequest, SpinaError, Unavailable
from spina_fast.raft.snapshots import (
    MAX_META_BYTES,
    SnapshotCorrupted,
    _parse_header,
    encode_snapshot,
    read_snapshot,
    verify_snapshot_file,
)
from spina_fast.state import ReplicatedState

__all__ = ["BackupCorrupted", "BackupError", "BackupIndex", "BackupWriter", "Rebuilt", "parse_time",
           "scan_backup"]

log = logging.getLogger(__name__)

SEGMENT_MAGIC = b"SPNCDC01"
_U32 = struct.Struct("<I")
_RECORD = struct.Struct("<QQdI")  # index, term, commit time, payload length
MAX_HEADER_BYTES = 1 << 16
MAX_INTERVAL_SECONDS = 60.0
MIN_INTERVAL_SECONDS = 0.1
DEFAULT_INTERVAL_SECONDS = 10.0
DEFAULT_BASE_INTERVAL_SECONDS = 600.0
# A write burst seals a segment early rather than buffering without bound until the next interval.
MAX_BUFFERED_ENTRIES = 50_000
_SEGMENT_NAME = re.compile(r"seg-(\d{20})-(\d{20})\.cdc")
_BASE_NAME = re.compile(r"base-(\d{20})-(\d{20})\.snap")
_NORMAL = _raft.ENTRY_NORMAL
_fdatasync = getattr(os, "fdatasync", os.fsync)

Entry = tuple[int, int, bytes]  # index, term, payload: what the Ready loop applied
SnapshotFiles = Callable[[], list[tuple[int, int, Path]]]
SnapshotNow = Callable[[], tuple[int, int, Any, bytes]]
SegmentRecord = tuple[int, int, int, float, memoryview]  # offset, index, term, commit time, payload


class BackupError(SpinaError):
    """A backup cannot be restored as asked (a gap, a target outside it, streams that disagree)."""

    code = "backup_invalid"


class BackupCorrupted(BackupError):
    """A file of the backup is truncated or damaged; nothing is restored from a backup holding it."""

    code = "backup_corrupted"

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(f"backup file {path} is damaged at byte offset {offset}: {reason}; refusing to restore")
        self.path = path
        self.offset = offset
        self.reason = reason


def segment_name(first: int, last: int) -> str:
    return f"seg-{first:020d}-{last:020d}.cdc"


def base_name(index: int, term: int) -> str:
    return f"base-{index:020d}-{term:020d}.snap"


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(temp: Path, final: Path, fsync: bool) -> None:
    """Rename a complete, fsynced file to its final name and make the rename durable."""
    os.replace(temp, final)
    if fsync:
        _fsync_directory(final.parent)


def _stream_files(directory: Path) -> tuple[list[tuple[int, int, Path]], list[tuple[int, int, Path]]]:
    """(first, last, path) of the sealed segments and (index, term, path) of the bases, oldest first."""
    segments, bases = [], []
    for path in directory.iterdir():
        if match := _SEGMENT_NAME.fullmatch(path.name):
            segments.append((int(match.group(1)), int(match.group(2)), path))
        elif match := _BASE_NAME.fullmatch(path.name):
            bases.append((int(match.group(1)), int(match.group(2)), path))
    return sorted(segments), sorted(bases)


# --- writing --------------------------------------------------------------------------------------------


def encode_segment(node_id: str, batches: Sequence[tuple[float, Sequence[Entry]]], sealed: float) -> list[bytes]:
    """A segment's bytes, in pieces: ``batches`` are (commit time, contiguous entries), in index order."""
    pieces: list[bytes] = []
    first = batches[0][1][0][0]
    expected = first
    body_bytes = 0
    for stamp, entries in batches:
        for index, term, payload in entries:
            if index != expected:
                raise ValueError(f"backup records must be contiguous: got index {index} after {expected - 1}")
            head = _RECORD.pack(index, term, stamp, len(payload))
            pieces += (head, payload, _U32.pack(crc32c(payload, crc32c(head))))
            body_bytes += _RECORD.size + len(payload) + 4
            expected += 1
    header = orjson.dumps({"node_id": node_id, "first_index": first, "last_index": expected - 1,
                           "records": expected - first, "body_bytes": body_bytes,
                           "oldest": batches[0][0], "sealed": sealed})
    prefix = SEGMENT_MAGIC + _U32.pack(len(header)) + header
    return [prefix, _U32.pack(crc32c(prefix)), *pieces]


@dataclass
class WriterStats:
    """What the writer has done, for logs and status: the achieved RPO is ``max_seal_delay``."""

    segments: int = 0
    records: int = 0
    bases: int = 0
    last_shipped_index: int = 0
    last_seal_time: float = 0.0
    max_seal_delay: float = 0.0
    failures: int = 0


class BackupWriter:
    """Ships the committed entries one node applies into ``directory`` (that node's stream folder).

    ``on_commit`` is the Ready loop's observer: it only appends a reference to the applied batch. A task on
    the event loop seals the buffer into a segment every ``interval`` seconds (sooner when it grows past
    ``MAX_BUFFERED_ENTRIES`` or a gap needs a base), writing and fsyncing in a worker thread.
    """

    def __init__(self, directory: Path, node_id: str, *, snapshot_files: SnapshotFiles, snapshot_now: SnapshotNow,
                 interval: float = DEFAULT_INTERVAL_SECONDS,
                 base_interval: float = DEFAULT_BASE_INTERVAL_SECONDS, fsync: bool = True) -> None:
        if not MIN_INTERVAL_SECONDS <= interval <= MAX_INTERVAL_SECONDS:
            raise ValueError(f"backup interval {interval:g}s is outside {MIN_INTERVAL_SECONDS:g}.."
                             f"{MAX_INTERVAL_SECONDS:g} s (the interval is the RPO)")
        if base_interval < 0:
            raise ValueError(f"backup base interval {base_interval:g}s must not be negative")
        self.directory = directory
        self.node_id = node_id
        self.interval = interval
        self.base_interval = base_interval
        self.fsync = fsync
        self.stats = WriterStats()
        self._snapshot_files = snapshot_files
        self._snapshot_now = snapshot_now
        # Runs of contiguous entries; a gap in what the node applies starts a new run (a new segment).
        self._runs: list[list[tuple[float, list[Entry]]]] = []
        self._buffered = 0
        self._next_index: int | None = None  # the index the stream continues with; None: an empty stream
        self._base_wanted: int | None = None
        self._last_base_index = 0
        self._last_base_at = 0.0
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Pick the stream up where it ends (a restart ships only what is not in it yet) and start sealing."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.glob("*.tmp"):
            # A segment or base being written when the process died: never published, its entries are
            # shipped again from the node's log.
            leftover.unlink()
        segments, bases = _stream_files(self.directory)
        ends = [last for _, last, _ in segments] + [index for index, _, _ in bases]
        if ends:
            self._next_index = max(ends) + 1
            self.stats.last_shipped_index = max(ends)
        if bases:
            self._last_base_index = bases[-1][0]
            self._last_base_at = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._run())
        log.info("continuous backup started", extra={"directory": str(self.directory), "interval": self.interval,
                                                     "resumes_at": self._next_index or 1})

    def on_commit(self, entries: list[Entry]) -> None:
        """Called with each batch of committed entries right after the node applied them."""
        if not entries:
            return
        first = entries[0][0]
        expected = self._next_index
        if expected is not None and first < expected:
            # Replayed from the WAL after a restart: what the stream already holds is not shipped twice.
            if entries[-1][0] < expected:
                return
            entries = entries[expected - first:]
            first = expected
        if first != (expected if expected is not None else 1):
            # The node skipped indexes (it installed or restarted from a snapshot): the stream needs a base
            # there, and the entries after it go into a segment of their own.
            self._runs.append([])
            self._base_wanted = first - 1
            self._wake.set()
        elif not self._runs:
            self._runs.append([])
        self._runs[-1].append((time.time(), list(entries)))
        self._next_index = entries[-1][0] + 1
        self._buffered += len(entries)
        if self._buffered >= MAX_BUFFERED_ENTRIES:
            self._wake.set()

    async def close(self) -> None:
        """Seal what is buffered and stop (a clean shutdown loses nothing)."""
        if self._task is None:
            return
        self._closing = True
        self._wake.set()
        await self._task
        self._task = None

    def status(self) -> dict[str, Any]:
        stats = self.stats
        return {"directory": str(self.directory), "interval": self.interval, "segments": stats.segments,
                "records": stats.records, "bases": stats.bases, "last_shipped_index": stats.last_shipped_index,
                "last_seal_time": stats.last_seal_time, "max_seal_delay": round(stats.max_seal_delay, 3),
                "buffered": self._buffered, "failures": stats.failures}

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_seal = loop.time() + self.interval
        while not self._closing:
            # Until the interval is up (the normal case) or something cannot wait (a burst, a gap, closing).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_seal - loop.time()))
            self._wake.clear()
            next_seal = loop.time() + self.interval
            await self._flush()
        await self._flush()
        log.info("continuous backup stopped", extra=self.status())

    async def _flush(self) -> None:
        runs, self._runs = self._runs, []
        self._buffered = 0
        try:
            if self._base_wanted is not None:
                await self._write_gap_base(self._base_wanted)
            elif self.base_interval == 0 or time.monotonic() - self._last_base_at >= self.base_interval:
                await self._copy_newest_snapshot()
        except (OSError, SpinaError) as exc:
            self.stats.failures += 1
            log.warning("writing a backup base failed; retrying at the next interval", extra={"reason": str(exc)})
        for position, run in enumerate(runs):
            if not run:
                continue
            try:
                await asyncio.to_thread(self._write_segment, run)
            except OSError as exc:
                # Keep what was not written; the next interval tries again (the RPO is missed meanwhile).
                self.stats.failures += 1
                self._runs[:0] = runs[position:]
                self._buffered += sum(len(entries) for pending in runs[position:] for _, entries in pending)
                log.error("writing a backup segment failed; retrying at the next interval",
                          extra={"directory": str(self.directory), "reason": str(exc)})
                return

    def _write_segment(self, run: list[tuple[float, list[Entry]]]) -> None:
        """Encode, write, fsync and publish one segment (blocking: runs in a worker thread)."""
        sealed = time.time()
        pieces = encode_segment(self.node_id, run, sealed)
        first, last = run[0][1][0][0], run[-1][1][-1][0]
        final = self.directory / segment_name(first, last)
        temp = final.with_name(final.name + ".tmp")
        with temp.open("wb") as file:
            file.writelines(pieces)
            file.flush()
            if self.fsync:
                _fdatasync(file.fileno())
        _publish(temp, final, self.fsync)
        stats = self.stats
        stats.segments += 1
        stats.records += last - first + 1
        stats.last_shipped_index = max(stats.last_shipped_index, last)
        stats.last_seal_time = sealed
        stats.max_seal_delay = max(stats.max_seal_delay, time.time() - run[0][0])
        log.debug("backup segment sealed", extra={"first": first, "last": last, "file": final.name})

    async def _write_gap_base(self, index: int) -> None:
        """A base at ``index`` (the node's own snapshot file there, or the state as it is now)."""
        for snapshot_index, term, path in self._snapshot_files():
            if snapshot_index == index:
                try:
                    await asyncio.to_thread(self._copy_base, path, snapshot_index, term)
                except (FileNotFoundError, SnapshotCorrupted) as exc:
                    # Pruned by the node meanwhile, or damaged: the current state serves as the base instead.
                    log.info("node snapshot not copied; taking the current state as base", extra={"reason": str(exc)})
                    break
                self._base_wanted = None
                return
        try:
            current, term, _, data = self._snapshot_now()
        except Unavailable:
            return  # a snapshot from the leader is being installed: the next interval tries again
        await asyncio.to_thread(self._write_base, current, term, data)
        self._base_wanted = None

    async def _copy_newest_snapshot(self) -> None:
        files = self._snapshot_files()
        if files and files[-1][0] > self._last_base_index:
            index, term, path = files[-1]
            try:
                await asyncio.to_thread(self._copy_base, path, index, term)
            except FileNotFoundError:
                return  # pruned by the node meanwhile: a newer one is there next time

    def _copy_base(self, source: Path, index: int, term: int) -> None:
        final = self.directory / base_name(index, term)
        temp = final.with_name(final.name + ".tmp")
        # Open first: the node may prune the file while it is copied, the open descriptor keeps it readable.
        with source.open("rb") as reader, temp.open("wb") as writer:
            while chunk := reader.read(1 << 20):
                writer.write(chunk)
            writer.flush()
            if self.fsync:
                _fdatasync(writer.fileno())
        try:
            meta = verify_snapshot_file(temp)
            if (meta.index, meta.term) != (index, term):
                raise SnapshotCorrupted(str(source), f"holds {meta.index}@{meta.term}, not what its name says")
        except SnapshotCorrupted:
            temp.unlink(missing_ok=True)
            raise
        _publish(temp, final, self.fsync)
        self._based(index)

    def _write_base(self, index: int, term: int, data: bytes) -> None:
        final = self.directory / base_name(index, term)
        temp = final.with_name(final.name + ".tmp")
        with temp.open("wb") as file:
            file.writelines(encode_snapshot(index, term, None, data))
            file.flush()
            if self.fsync:
                _fdatasync(file.fileno())
        _publish(temp, final, self.fsync)
        self._based(index)

    def _based(self, index: int) -> None:
        self._last_base_index = max(self._last_base_index, index)
        self._last_base_at = time.monotonic()
        self.stats.bases += 1
        log.info("backup base written", extra={"index": index, "directory": str(self.directory)})


# --- reading and restoring -------------------------------------------------------------------------------


def _segment_header(path: Path, data: bytes, first: int, last: int) -> tuple[dict[str, Any], int]:
    """The header of a segment read into ``data``, checked, and the offset where its records begin."""
    start = len(SEGMENT_MAGIC) + 4
    if len(data) < start + 4:
        raise BackupCorrupted(path, 0, f"only {len(data)} bytes: too short for a segment header (truncated)")
    if not data.startswith(SEGMENT_MAGIC):
        raise BackupCorrupted(path, 0, f"not a Spina backup segment (starts with {data[:8]!r})")
    (length,) = _U32.unpack_from(data, len(SEGMENT_MAGIC))
    end = start + length
    if length > MAX_HEADER_BYTES or end + 4 > len(data):
        raise BackupCorrupted(path, len(SEGMENT_MAGIC), f"header length {length} runs past the end (truncated?)")
    if crc32c(memoryview(data)[:end]) != _U32.unpack_from(data, end)[0]:
        raise BackupCorrupted(path, 0, "checksum mismatch in the segment header")
    try:
        header = orjson.loads(data[start:end])
        promised = (int(header["first_index"]), int(header["last_index"]), int(header["records"]),
                    int(header["body_bytes"]))
        float(header["oldest"]), float(header["sealed"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BackupCorrupted(path, start, f"the header is not a segment header ({exc})") from None
    if promised[:3] != (first, last, last - first + 1):
        raise BackupCorrupted(path, start, f"the header holds indexes {promised[0]}..{promised[1]} in "
                                           f"{promised[2]} records; the file name says {first}..{last}")
    body_start = end + 4
    size = body_start + promised[3]
    if len(data) < size:
        raise BackupCorrupted(path, len(data), f"truncated: the file has {len(data)} bytes, its header "
                                               f"promises {size}")
    if len(data) > size:
        raise BackupCorrupted(path, size, f"{len(data) - size} unexpected bytes after the last record")
    return header, body_start


def open_segment(path: Path, first: int, last: int) -> tuple[dict[str, Any], Iterator[SegmentRecord]]:
    """Read one segment, check its header, and return the header and an iterator that verifies and yields
    its records: (offset, index, term, commit time, payload)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BackupCorrupted(path, 0, f"cannot be read ({exc})") from None
    header, offset = _segment_header(path, data, first, last)
    return header, _records(path, data, offset, first, last)


def _records(path: Path, data: bytes, offset: int, first: int, last: int) -> Iterator[SegmentRecord]:
    view = memoryview(data)
    end = len(data)
    expected = first
    while offset < end:
        if offset + _RECORD.size + 4 > end:
            raise BackupCorrupted(path, offset, "a record header runs past the end of the file")
        index, term, stamp, size = _RECORD.unpack_from(data, offset)
        payload_start = offset + _RECORD.size
        record_end = payload_start + size + 4
        if record_end > end:
            raise BackupCorrupted(path, offset, f"the record length field ({size} bytes) runs past the end of "
                                                "the file: the record is damaged")
        payload = view[payload_start:record_end - 4]
        if crc32c(payload, crc32c(view[offset:payload_start])) != _U32.unpack_from(data, record_end - 4)[0]:
            raise BackupCorrupted(path, offset, f"checksum mismatch in record {expected - first + 1} "
                                                f"(index {expected})")
        if index != expected:
            raise BackupCorrupted(path, offset, f"holds index {index} where index {expected} belongs")
        yield offset, index, term, stamp, payload
        expected += 1
        offset = record_end
    if expected != last + 1:
        raise BackupCorrupted(path, end, f"truncated: the records end at index {expected - 1}, the segment "
                                         f"promises {last}")


@dataclass(frozen=True)
class SegmentFile:
    path: Path
    first: int
    last: int
    oldest: float  # commit time of its first record
    sealed: float  # when it was written: sealed - oldest is how long its oldest entry waited (achieved RPO)


@dataclass(frozen=True)
class BaseFile:
    path: Path
    index: int
    term: int
    created: float  # when the snapshot was taken: its index was committed no later


@dataclass(frozen=True)
class Rebuilt:
    """The state as of ``index``: ``data`` is ``ReplicatedState.snapshot()`` bytes."""

    index: int
    term: int
    data: bytes
    state_hash: str
    base_index: int
    replayed: int
    commit_time: float | None


@dataclass
class BackupIndex:
    """Every stream of a backup, verified, merged into one view of the indexes it holds.

    For each index in ``lo..`` the arrays hold the term, the CRC of the payload (to check that streams agree),
    the earliest commit time any stream recorded (what ``--to-time`` compares) and which segment to read it
    from; a term of 0 means no stream holds that index.
    """

    streams: list[Path]
    segments: list[SegmentFile]
    bases: list[BaseFile]
    lo: int
    terms: array[int]
    crcs: array[int]
    times: array[float]
    owner: array[int]
    stream_of: dict[Path, Path] = field(default_factory=dict)

    @property
    def hi(self) -> int:
        return self.lo + len(self.terms) - 1

    def holds(self, index: int) -> bool:
        return self.lo <= index <= self.hi and self.terms[index - self.lo] != 0

    def runs(self) -> list[tuple[int, int]]:
        """The ranges of indexes some stream holds, in order."""
        found: list[tuple[int, int]] = []
        start: int | None = None
        for offset, term in enumerate(self.terms):
            if term and start is None:
                start = offset
            elif not term and start is not None:
                found.append((self.lo + start, self.lo + offset - 1))
                start = None
        if start is not None:
            found.append((self.lo + start, self.hi))
        return found

    def _restorable_ends(self) -> list[tuple[int, int]]:
        """(base index, newest index restorable from it) for every base; base index 0 is the empty state,
        usable when the records begin at index 1."""
        runs = self.runs()
        starts = ([0] if self.holds(1) else []) + [base.index for base in self.bases]
        return [(start, next((run_end for run_start, run_end in runs if run_start <= start + 1 <= run_end), start))
                for start in starts]

    def restorable(self) -> tuple[int, int] | None:
        """The oldest and newest index this backup can be restored to (anything between, gaps aside)."""
        ends = self._restorable_ends()
        if not ends:
            return None
        oldest = min(base for base, _ in ends)
        return max(oldest, 1), max(end for _, end in ends)

    def commit_time(self, index: int) -> float | None:
        if self.holds(index):
            return self.times[index - self.lo]
        return min((base.created for base in self.bases if base.index == index), default=None)

    def index_at_time(self, moment: float) -> int:
        """The newest index committed at or before ``moment``: a prefix of the history (commit times of
        different nodes' clocks are made monotonic by a running maximum, so a later index never counts as
        older than an earlier one)."""
        best = 0
        newest = -math.inf
        for offset, term in enumerate(self.terms):
            if not term:
                continue
            newest = max(newest, self.times[offset])
            if newest > moment:
                break
            best = self.lo + offset
        for base in self.bases:
            if base.created <= moment:
                best = max(best, base.index)
        if best == 0:
            earliest = min([*(self.times[offset] for offset, term in enumerate(self.terms) if term),
                            *(base.created for base in self.bases)], default=None)
            when = _iso(earliest) if earliest is not None else "never (the backup is empty)"
            raise BackupError(f"the backup holds nothing committed at or before {_iso(moment)}; its earliest "
                              f"entry was committed at {when}")
        return best

    def _newest_base(self, target: int) -> BaseFile | None:
        candidates = [base for base in self.bases if base.index <= target]
        return max(candidates, key=lambda base: base.index) if candidates else None

    def _check_covered(self, start: int, target: int, base: BaseFile | None) -> None:
        for index in range(start, target + 1):
            if self.holds(index):
                continue
            gap_end = next((later - 1 for later in range(index + 1, self.hi + 1) if self.holds(later)), target)
            before = self._segment_ending(index - 1)
            after = self._segment_ending(gap_end + 1, starting=True)
            where = "".join([f" after {before.name}" if before else "", f" before {after.name}" if after else ""])
            restorable = self.restorable()
            hint = f"; this backup can be restored to indexes {restorable[0]}..{restorable[1]} outside gaps" \
                if restorable else ""
            from_base = f"base {base.path}" if base is not None else "the beginning of the log (no base snapshot)"
            raise BackupError(f"the backup has a gap: no stream holds indexes {index}..{gap_end}{where}, needed to "
                              f"replay from {from_base} to index {target}{hint}")

    def _segment_ending(self, index: int, starting: bool = False) -> Path | None:
        for segment in self.segments:
            if (segment.first if starting else segment.last) == index:
                return segment.path
        return None

    def resolve_target(self, to_index: int | None = None, to_time: float | None = None) -> int:
        if to_index is not None and to_time is not None:
            raise InvalidRequest("give --to-index or --to-time, not both")
        if to_index is not None:
            if to_index < 1:
                raise InvalidRequest(f"--to-index {to_index} must be at least 1")
            return to_index
        if to_time is not None:
            return self.index_at_time(to_time)
        # The newest index held: a gap before it is refused by ``rebuild`` rather than silently restoring less.
        return self.newest_index()

    def newest_index(self) -> int:
        return max(self.hi, max((base.index for base in self.bases), default=0))

    def rebuild(self, target: int) -> Rebuilt:
        """Replay the backup into a fresh ``ReplicatedState`` up to and including index ``target``."""
        newest = self.newest_index()
        if target > newest:
            raise BackupError(f"index {target} is past the end of the backup: it holds indexes up to {newest}")
        base = self._newest_base(target)
        start = base.index if base is not None else 0
        if base is None and not self.holds(1):
            oldest = min((base.index for base in self.bases), default=None)
            raise BackupError(f"index {target} is older than anything this backup can rebuild: it has no base "
                              f"snapshot at or before it" + (f" (the oldest is at index {oldest})" if oldest else ""))
        self._check_covered(start + 1, target, base)
        state = ReplicatedState()
        term = 0
        if base is not None:
            meta, data = read_snapshot(base.path)
            if (meta.index, meta.term) != (base.index, base.term):
                raise BackupCorrupted(base.path, 0, f"holds {meta.index}@{meta.term}, not what its name says")
            state.restore(data)
            term = meta.term
        index = start + 1
        while index <= target:
            segment = self.segments[self.owner[index - self.lo]]
            _, records = open_segment(segment.path, segment.first, segment.last)
            for offset, record_index, record_term, _, payload in records:
                if record_index < index:
                    continue
                position = record_index - self.lo
                if (record_term, crc32c(payload)) != (self.terms[position], self.crcs[position]):
                    raise BackupCorrupted(segment.path, offset, "changed since the backup was verified")
                _replay(state, record_index, payload, segment.path, offset)
                term = record_term
                index = record_index + 1
                if index > target:
                    break
        return Rebuilt(target, term, state.snapshot(), state.state_hash(), start, target - start,
                       self.commit_time(target))

    def summary(self) -> dict[str, Any]:
        """What ``spina snapshot inspect --from-backup`` prints."""
        streams = []
        for stream in self.streams:
            segments = [segment for segment in self.segments if self.stream_of[segment.path] == stream]
            bases = [base for base in self.bases if self.stream_of[base.path] == stream]
            delays = [segment.sealed - segment.oldest for segment in segments]
            streams.append({
                "directory": str(stream), "segments": len(segments), "bases": [base.index for base in bases],
                "first_index": min((segment.first for segment in segments), default=None),
                "last_index": max((segment.last for segment in segments), default=None),
                "last_sealed": max((segment.sealed for segment in segments), default=None),
                "seal_delay_median": round(statistics.median(delays), 3) if delays else None,
                "seal_delay_max": round(max(delays), 3) if delays else None,
            })
        restorable = self.restorable()
        return {"streams": streams, "runs": self.runs(),
                "restorable": list(restorable) if restorable else None,
                "restorable_times": [self.commit_time(end) for end in restorable] if restorable else None}


def _replay(state: ReplicatedState, index: int, payload: memoryview, path: Path, offset: int) -> None:
    if not payload or payload[0] != _NORMAL:
        return  # a no-op or a configuration entry: the restored node takes its members from its own flags
    try:
        state.apply(index, bytes(payload[1:]))
    except InvalidRequest:
        # The live nodes refused this command the same way (a failed CAS, an invalid registration).
        return
    except (ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"entry {index} in {path} (offset {offset}) cannot be applied: {exc}") from None


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> float:
    """``--to-time``: unix seconds, or ISO 8601 (``2024-05-01T12:00:00.250Z``; no offset means UTC)."""
    try:
        return float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise InvalidRequest(f"--to-time {text!r} is neither unix seconds nor an ISO 8601 time like "
                                 "2024-05-01T12:00:00Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _is_stream(folder: Path) -> bool:
    return any(_SEGMENT_NAME.fullmatch(path.name) or _BASE_NAME.fullmatch(path.name) for path in folder.iterdir())


def _find_streams(directories: Sequence[Path]) -> list[Path]:
    """A folder holding segments or bases is a stream; otherwise each subfolder that does."""
    streams: list[Path] = []
    for directory in directories:
        if not directory.is_dir():
            raise InvalidRequest(f"backup folder {directory} does not exist or is not a directory")
        found = [directory] if _is_stream(directory) else sorted(
            child for child in directory.iterdir() if child.is_dir() and _is_stream(child))
        if not found:
            raise BackupError(f"no backup stream in {directory}: neither it nor its subfolders hold seg-*.cdc or "
                              "base-*.snap files")
        streams += [stream for stream in found if stream not in streams]
    return streams


def _read_base(path: Path, index: int, term: int) -> BaseFile:
    try:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            head = file.read(MAX_META_BYTES + 16)
    except OSError as exc:
        raise BackupCorrupted(path, 0, f"cannot be read ({exc})") from None
    try:
        meta, _ = _parse_header(str(path), head, size)
    except SnapshotCorrupted as exc:
        raise BackupCorrupted(path, 0, exc.reason) from None
    if (meta.index, meta.term) != (index, term):
        raise BackupCorrupted(path, 0, f"holds {meta.index}@{meta.term}, not what its name says")
    return BaseFile(path, index, term, meta.created)


def scan_backup(directories: Sequence[Path]) -> BackupIndex:
    """Find and verify every stream under ``directories`` (each record's checksum, every size and index
    sequence, base headers) and merge them; raises BackupCorrupted naming the first damaged file."""
    streams = _find_streams(directories)
    listed: list[tuple[Path, int, int, Path]] = []
    bases: list[BaseFile] = []
    stream_of: dict[Path, Path] = {}
    for stream in streams:
        segments, stream_bases = _stream_files(stream)
        for first, last, path in segments:
            if first < 1 or last < first:
                raise BackupCorrupted(path, 0, "its name holds an impossible index range")
            listed.append((stream, first, last, path))
            stream_of[path] = stream
        for index, term, path in stream_bases:
            bases.append(_read_base(path, index, term))
            stream_of[path] = stream
    lo = min((first for _, first, _, _ in listed), default=1)
    hi = max((last for _, _, last, _ in listed), default=0)
    size = max(0, hi - lo + 1)
    terms: array[int] = array("Q", bytes(8 * size))
    crcs: array[int] = array("I", bytes(4 * size))
    times: array[float] = array("d", [math.inf]) * size
    owner: array[int] = array("i", bytes(4 * size))
    segments_found: list[SegmentFile] = []
    for number, (_, first, last, path) in enumerate(sorted(listed, key=lambda item: (item[1], item[2]))):
        header, records = open_segment(path, first, last)
        for offset, index, term, stamp, payload in records:
            position = index - lo
            payload_crc = crc32c(payload)
            if terms[position] == 0:
                terms[position], crcs[position], owner[position] = term, payload_crc, number
            elif (terms[position], crcs[position]) != (term, payload_crc):
                other = segments_found[owner[position]].path
                raise BackupError(f"the streams disagree at index {index}: {path} (offset {offset}) holds term "
                                  f"{term}, {other} holds term {terms[position]} or other data; two clusters "
                                  "backed up into one folder?")
            times[position] = min(times[position], stamp)
        segments_found.append(SegmentFile(path, first, last, float(header["oldest"]), float(header["sealed"])))
    return BackupIndex(streams, segments_found, sorted(bases, key=lambda base: base.index), lo, terms, crcs, times,
                       owner, stream_of)

