"""Process-wide tuning that `spina agent` applies once it serves (benchmarks apply the same)."""

from __future__ import annotations

import gc
import resource

# CPython's default (700, 10, 10) runs a full collection every 7,000 surviving allocations or so; a full
# collection walks every container (the KV's sorted index alone holds a reference per key), pausing the
# event loop for 10-30 ms at 100k keys (measured in benchmarks/raft_writes.py). Slightly larger young
# collections (still ~1 ms) and rare full ones keep those pauses out of the p99; the store holds
# GC-untracked tuples, so little of what it keeps is cyclic garbage anyway.
GC_THRESHOLDS = (5_000, 50, 1000)


def tune_gc() -> None:
    # Everything allocated so far lives as long as the process: keep it out of every later collection.
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one: every watcher and sidecar holds a connection.

    Returns the limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            return soft
    return soft
