"""What every benchmark script shares: percentiles, the machine description, the table printer."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from spina_fast.testing import free_ports

__all__ = ["free_ports", "machine", "median", "percentile", "print_table", "spawn_spina_cluster", "stop_processes"]


def percentile(samples: list[float], fraction: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine() -> dict[str, object]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()}


def spawn_spina_cluster(base: Path, seed: int, size: int = 3, extra_args: tuple[str, ...] = ()
                        ) -> tuple[list[subprocess.Popen[bytes]], list[int], list[int]]:
    """Start ``size`` `spina agent` processes forming one cluster (``extra_args`` added to each command line);
    returns (processes, raft ports, http ports)."""
    raft_ports = free_ports(size, seed=seed)
    http_ports = free_ports(size, seed=seed + 1000)
    ids = [f"n{i + 1}" for i in range(size)]
    processes = []
    base.mkdir(parents=True, exist_ok=True)
    for i, node_id in enumerate(ids):
        peers = ",".join(f"{other}=127.0.0.1:{raft_ports[j]}" for j, other in enumerate(ids) if j != i)
        # Warnings and errors go to <base>/<node>.log, to read when a run fails.
        with open(base / f"{node_id}.log", "ab") as log_file:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "spina_fast", "agent", "--node-id", node_id, "--data-dir", str(base / node_id),
                 "--http-addr", f"127.0.0.1:{http_ports[i]}", "--raft-addr", f"127.0.0.1:{raft_ports[i]}",
                 "--dns-addr", "127.0.0.1:0", "--peers", peers, "--log-level", "warning", *extra_args],
                stdout=subprocess.DEVNULL, stderr=log_file))
    return processes, raft_ports, http_ports


def stop_processes(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        process.wait(10)


def print_table(title: str, headers: list[str], rows: list[list[object]]) -> None:
    cells = [[f"{c:,.2f}" if isinstance(c, float) else f"{c:,}" if isinstance(c, int) else str(c) for c in row]
             for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
