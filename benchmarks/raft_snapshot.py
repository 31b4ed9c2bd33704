"""How long do a Raft snapshot's save (serialize + CRC + write + fsync + rename) and load (read + verify CRC +
restore the state machine) take for N keys, next to a raw write + fdatasync / read of the same bytes?

The state is the real replicated state (``ReplicatedState``) with N KV keys of 100-byte values. Every timed
load is checked: the restored state's ``state_hash`` equals the original's.

    python benchmarks/raft_snapshot.py [--json] [--runs 5] [--keys 10000,100000]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from spina_fast.kv.store import encode_put
from spina_fast.raft.snapshots import SnapshotStore, read_snapshot
from spina_fast.state import MODULE_KV, ReplicatedState


class WrongAnswer(AssertionError):
    """A timed run produced the wrong state: its timing is worthless."""


@dataclass
class Row:
    keys: int
    snapshot_bytes: int
    save_ms: float
    raw_write_ms: float
    save_over_raw: float
    load_ms: float
    raw_read_ms: float
    load_over_raw: float


def build_state(keys: int, seed: int) -> ReplicatedState:
    rng = random.Random(seed)
    state = ReplicatedState()
    for index in range(1, keys + 1):
        state.apply(index, MODULE_KV + encode_put(f"bench/{index:08d}", rng.randbytes(50).hex().encode()))
    return state


def measure(keys: int, runs: int, directory: Path) -> Row:
    state = build_state(keys, seed=keys)
    expected = state.state_hash()
    store = SnapshotStore(directory / f"snapshots-{keys}", keep=1)
    saves, raw_writes, loads, raw_reads = [], [], [], []
    size = 0
    for run in range(runs + 1):  # the first run warms up and is not counted
        started = time.perf_counter()
        path = store.write(keys + run, 1, None, state.snapshot())
        save = time.perf_counter() - started
        size = path.stat().st_size
        payload = path.read_bytes()
        raw = directory / "raw.bin"
        started = time.perf_counter()
        with raw.open("wb") as file:
            file.write(payload)
            file.flush()
            os.fdatasync(file.fileno())
        raw_write = time.perf_counter() - started
        started = time.perf_counter()
        _, data = read_snapshot(path)
        restored = ReplicatedState()
        restored.restore(data)
        load = time.perf_counter() - started
        started = time.perf_counter()
        if raw.read_bytes() != payload:
            raise WrongAnswer("the raw file does not hold the bytes written")
        raw_read = time.perf_counter() - started
        if restored.state_hash() != expected:
            raise WrongAnswer(f"restored state differs from the snapshotted one at {keys} keys")
        if run:
            saves.append(save)
            raw_writes.append(raw_write)
            loads.append(load)
            raw_reads.append(raw_read)
    save_ms, raw_write_ms = statistics.median(saves) * 1000, statistics.median(raw_writes) * 1000
    load_ms, raw_read_ms = statistics.median(loads) * 1000, statistics.median(raw_reads) * 1000
    return Row(keys, size, round(save_ms, 1), round(raw_write_ms, 1), round(save_ms / raw_write_ms, 1),
               round(load_ms, 1), round(raw_read_ms, 1), round(load_ms / raw_read_ms, 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keys", default="10000,100000")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as temp:
        rows = [measure(int(keys), args.runs, Path(temp)) for keys in args.keys.split(",")]
    if args.json:
        print(orjson.dumps({"machine": platform.platform(), "python": sys.version.split()[0],
                            "rows": [asdict(row) for row in rows]}).decode())
        return 0
    print(f"{'keys':>8} {'bytes':>11} {'save ms':>8} {'raw write ms':>12} {'ratio':>6} "
          f"{'load ms':>8} {'raw read ms':>11} {'ratio':>6}")
    for row in rows:
        print(f"{row.keys:>8} {row.snapshot_bytes:>11} {row.save_ms:>8} {row.raw_write_ms:>12} {row.save_over_raw:>6} "
              f"{row.load_ms:>8} {row.raw_read_ms:>11} {row.load_over_raw:>6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
