"""How long from `kill -9` of the leader until the cluster accepts a write again (3 agent processes).

Each trial: start a fresh 3-node cluster of `spina agent` processes on loopback, write, SIGKILL the leader,
then have a client write to a survivor in a tight loop (each attempt bounded by a short timeout) until one
succeeds; the time from the kill to that acknowledged write is the failover time. The value written after
failover is read back with ?consistent from the other survivor (correctness check).

    python benchmarks/failover.py [--trials 5] [--json]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, print_table, spawn_spina_cluster, stop_processes


def request(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 0.5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                                           method=method), timeout=timeout) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def wait_for(condition, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise RuntimeError(f"timed out waiting for {what}")


def trial(base: Path, seed: int) -> float:
    processes, raft_ports, http_ports = spawn_spina_cluster(base, seed)
    try:
        def leader_index() -> int | None:
            status, body = request(http_ports[0], "GET", "/v1/status/leader")
            if status != 200 or not orjson.loads(body):
                return None
            port = int(orjson.loads(body).rsplit(":", 1)[1])
            return raft_ports.index(port) + 1  # +1: never falsy

        leader = wait_for(leader_index, 30, "a leader") - 1
        wait_for(lambda: request(http_ports[leader], "PUT", "/v1/kv/failover/before", b"1")[0] == 200, 10, "a write")
        survivor, other = [i for i in range(3) if i != leader]
        processes[leader].send_signal(signal.SIGKILL)
        killed = time.perf_counter()
        while request(http_ports[survivor], "PUT", "/v1/kv/failover/after", b"2")[0] != 200:
            if time.perf_counter() - killed > 30:
                raise RuntimeError("no write accepted within 30 s of the kill")
        elapsed = time.perf_counter() - killed
        status, body = request(http_ports[other], "GET", "/v1/kv/failover/after?raw&consistent", timeout=5)
        if (status, body) != (200, b"2"):
            raise AssertionError(f"the write acknowledged after failover is not readable: {status} {body!r}")
        return elapsed
    finally:
        stop_processes(processes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    times = []
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as base:
        for number in range(args.trials):
            times.append(trial(Path(base) / f"t{number}", seed=number + 1))
    report = {"machine": machine(), "trials": args.trials, "failover_s": times,
              "median_s": median(times), "max_s": max(times)}
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        print(f"machine: {report['machine']}")
        print_table("Leader kill -9 -> first acknowledged write (3 agent processes, default timing)",
                    ["trials", "median s", "max s", "all s"],
                    [[args.trials, report["median_s"], report["max_s"], " ".join(f"{t:.2f}" for t in times)]])
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
