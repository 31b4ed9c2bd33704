"""How fast does the Raft write-ahead log take entries, next to raw os.write (+ os.fdatasync) of the same bytes?

For group-commit batches of 1, 16 and 256 entries of 200 B, each run appends the batches through
``RaftStorage.write`` and (with fsync) ``await RaftStorage.sync()`` once per batch; the peer in the same run
writes the very same record bytes with ``os.write`` (+ ``os.fdatasync``) once per batch to a plain file.
A last row has 64 concurrent callers each writing one entry and awaiting ``sync()``: group commit has to form
the batches itself. A third column writes the raw bytes over a file of zeros written and fdatasynced first (what
the log's spare segments give it once a node has filled half a segment: an fdatasync that need not commit a new
file size through the journal); the WAL rows here stay within their first segment, so they append. Every timed
run is checked: the log reopens to exactly the entries written, the raw file holds exactly the bytes written.

    python benchmarks/wal_write.py [--json] [--runs 5] [--dir /path/on/the/disk/to/measure]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from spina_fast.raft.storage import RaftStorage

Entry = tuple[int, int, bytes]
PAYLOAD_BYTES = 200
BATCH_SIZES = (1, 16, 256)
CONCURRENT_CALLERS = 64


class WrongAnswer(AssertionError):
    """A timed run produced the wrong bytes: its timing is worthless."""


@dataclass
class Row:
    scenario: str
    fsync: bool
    batch: int
    entries: int
    wal_entries_per_s: float
    raw_entries_per_s: float
    raw_over_zeros_entries_per_s: float
    wal_over_raw: float
    wal_fsyncs: int


def make_batches(seed: int, total: int, batch: int) -> list[list[Entry]]:
    rng = random.Random(seed)
    entries = [(index, 1, rng.randbytes(PAYLOAD_BYTES)) for index in range(1, total + 1)]
    return [entries[start:start + batch] for start in range(0, total, batch)]


def encoded_batches(scratch: Path, batches: list[list[Entry]]) -> list[bytes]:
    """The exact bytes the log appends for each batch, for the raw peer to write."""
    storage = RaftStorage.open(scratch, segment_bytes=1 << 40, fsync=False)
    sizes = []
    for batch in batches:
        before = storage.bytes_written
        storage.write(None, batch)
        sizes.append(storage.bytes_written - before)
    storage.close()
    (segment,) = scratch.glob("wal-*.log")
    data = segment.read_bytes()
    shutil.rmtree(scratch)
    out, offset = [], len(data) - sum(sizes)  # after the segment header
    for size in sizes:
        out.append(data[offset:offset + size])
        offset += size
    return out


def check_log(directory: Path, batches: list[list[Entry]]) -> None:
    storage = RaftStorage.open(directory, fsync=False)
    expected = [entry for batch in batches for entry in batch]
    if storage.entries() != expected:
        raise WrongAnswer(f"{directory}: the log did not reopen to the {len(expected)} entries written")
    storage.close()


def wal_run(directory: Path, batches: list[list[Entry]], fsync: bool) -> tuple[float, int]:
    storage = RaftStorage.open(directory, fsync=fsync)

    async def append_and_sync() -> float:
        start = time.perf_counter()
        for batch in batches:
            storage.write(None, batch)
            await storage.sync()
        return time.perf_counter() - start

    if fsync:
        elapsed = asyncio.run(append_and_sync())
    else:
        start = time.perf_counter()
        for batch in batches:
            storage.write(None, batch)
        elapsed = time.perf_counter() - start
    fsyncs = storage.fsync_count
    storage.close()
    check_log(directory, batches)
    shutil.rmtree(directory)
    return elapsed, fsyncs


def concurrent_run(directory: Path, entries: list[Entry], callers: int) -> tuple[float, int]:
    storage = RaftStorage.open(directory, fsync=True)
    pending = iter(entries)

    async def caller() -> None:
        # The driver's order: whoever runs next takes the next index, writes, then waits for durability.
        for _, term, payload in pending:
            storage.write(None, [(storage.last_index + 1, term, payload)])
            await storage.sync()

    async def run() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        return time.perf_counter() - start

    elapsed = asyncio.run(run())
    fsyncs = storage.fsync_count
    storage.close()
    check_log(directory, [entries])
    shutil.rmtree(directory)
    return elapsed, fsyncs


def raw_run(path: Path, chunks: list[bytes], fsync: bool, over_zeros: bool = False) -> float:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | (0 if over_zeros else os.O_APPEND), 0o644)
    try:
        if over_zeros:
            os.write(fd, bytes(sum(len(chunk) for chunk in chunks)))
            os.fdatasync(fd)
            os.lseek(fd, 0, os.SEEK_SET)
        start = time.perf_counter()
        for chunk in chunks:
            os.write(fd, chunk)
            if fsync:
                os.fdatasync(fd)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    if path.read_bytes() != b"".join(chunks):
        raise WrongAnswer(f"{path}: the raw file does not hold the bytes written")
    path.unlink()
    return elapsed


def compare(
    work: Path, runs: int, scenario: str, fsync: bool, batch: int, total: int, chunks: list[bytes],
    run_wal: Callable[[Path], tuple[float, int]],
) -> Row:
    """Alternate the log and the raw peer, run 0 being the warm-up; medians of the rest."""
    wal_times, raw_times, zeros_times, fsyncs = [], [], [], 0
    for run in range(runs + 1):
        wal_elapsed, fsyncs = run_wal(work / f"wal-{run}")
        raw_elapsed = raw_run(work / f"raw-{run}", chunks, fsync)
        zeros_elapsed = raw_run(work / f"zeros-{run}", chunks, fsync, over_zeros=True)
        if run:
            wal_times.append(wal_elapsed)
            raw_times.append(raw_elapsed)
            zeros_times.append(zeros_elapsed)
    wal_rate = total / statistics.median(wal_times)
    raw_rate = total / statistics.median(raw_times)
    zeros_rate = total / statistics.median(zeros_times)
    return Row(scenario, fsync, batch, total, wal_rate, raw_rate, zeros_rate, wal_rate / raw_rate, fsyncs)


def measure(work: Path, runs: int, seed: int, total: int, batch: int, fsync: bool) -> Row:
    batches = make_batches(seed, total, batch)
    chunks = encoded_batches(work / "scratch", batches)
    return compare(work, runs, "batches", fsync, batch, total, chunks,
                   lambda directory: wal_run(directory, batches, fsync))


def measure_concurrent(work: Path, runs: int, seed: int, total: int) -> Row:
    (entries,) = make_batches(seed, total, total)
    chunks = encoded_batches(work / "scratch", [[entry] for entry in entries])
    return compare(work, runs, f"{CONCURRENT_CALLERS} callers x 1", True, 1, total, chunks,
                   lambda directory: concurrent_run(directory, entries, CONCURRENT_CALLERS))


def machine(work: Path) -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    filesystem = "unknown"
    try:
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount_point, fs_type, *_ = line.split()
            if str(work.resolve()).startswith(mount_point) and len(mount_point) > len(best):
                best, filesystem = mount_point, f"{fs_type} on {mount_point}"
    except OSError:
        pass
    return {"cpu": cpu, "cpus": str(os.cpu_count()), "python": sys.version.split()[0],
            "platform": platform.platform(), "filesystem": filesystem}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per row (median), after a warm-up")
    parser.add_argument("--entries", type=int, default=8192, help="entries per run (at least 64 batches)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp directory)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="wal-bench-", dir=args.dir))
    rows: list[Row] = []
    try:
        for fsync in (False, True):
            for batch in BATCH_SIZES:
                total = max(args.entries, batch * 64)
                rows.append(measure(work, args.runs, args.seed, total, batch, fsync))
        rows.append(measure_concurrent(work, args.runs, args.seed, args.entries))
        info = machine(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if args.json:
        print(orjson.dumps({
            "benchmark": "wal_write", "payload_bytes": PAYLOAD_BYTES, "runs": args.runs, "seed": args.seed,
            "machine": info, "rows": [asdict(row) for row in rows], "correct": True,
        }, option=orjson.OPT_INDENT_2).decode())
        return
    print(f"WAL writes, {PAYLOAD_BYTES} B entries, median of {args.runs} runs; peer: raw os.write"
          f" (+ os.fdatasync) of the same bytes per batch. {info['cpu']}, {info['filesystem']}")
    print(f"{'scenario':<16} {'fsync':>5} {'batch':>5} {'entries':>7} {'WAL entries/s':>14} "
          f"{'raw entries/s':>14} {'raw over zeros':>14} {'WAL/raw':>8} {'fsyncs':>7}")
    for row in rows:
        print(f"{row.scenario:<16} {'yes' if row.fsync else 'no':>5} {row.batch:>5} {row.entries:>7} "
              f"{row.wal_entries_per_s:>14,.0f} {row.raw_entries_per_s:>14,.0f} "
              f"{row.raw_over_zeros_entries_per_s:>14,.0f} {row.wal_over_raw:>8.2f} "
              f"{row.wal_fsyncs:>7}")


if __name__ == "__main__":
    main()
