"""Durable replicated writes: Spina's Raft beside PySyncObj (in-process) and etcd (over HTTP), same run.

1. In-process, 3 nodes on loopback TCP, ~200-byte values, C concurrent writers:
   Spina (three RaftNodes on one uvloop loop, fsync on) vs PySyncObj (three SyncObj + ReplDict, its
   defaults; it does not fsync). Committed writes/s and commit latency p50/p99, then p50/p99 of Spina
   under an open-loop load at half of its measured peak.
2. Over HTTP, 3 separate server processes each: Spina's `PUT /v1/kv/<key>` vs etcd's JSON gateway
   `POST /v3/kv/put`, both driven by the same aiohttp client at C concurrent requests, sent to the leader.

Every run is checked: the keys written are read back from a follower (Spina, etcd) or every replica
(PySyncObj) and must hold the values written.

    python benchmarks/raft_writes.py [--writes 20000] [--concurrency 64] [--runs 3] [--json]
Needs: pip install pysyncobj; etcd (Debian: apt-get install etcd-server) for part 2.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_ports, machine, median, percentile, print_table, spawn_spina_cluster, stop_processes

from spina_fast.config import HostPort
from spina_fast.kv.store import encode_put
from spina_fast.raft.node import RaftNode
from spina_fast.runtime import tune_gc
from spina_fast.state import MODULE_KV, ReplicatedState


class WrongAnswer(AssertionError):
    """A timed run lost or garbled writes: its timing is worthless."""


def value_for(index: int, size: int) -> bytes:
    stem = f"value-{index}-".encode()
    return stem + b"x" * (size - len(stem))


def summarize(latencies: list[float], elapsed: float) -> dict[str, float]:
    return {"writes_per_s": len(latencies) / elapsed, "p50_ms": percentile(latencies, 0.5) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000}


# --- Spina in-process -----------------------------------------------------------------------------------------

async def _spina_cluster(base: Path) -> list[RaftNode]:
    ports = free_ports(3)
    ids = ["n1", "n2", "n3"]
    addresses = {node_id: HostPort("127.0.0.1", port) for node_id, port in zip(ids, ports, strict=True)}
    nodes = [RaftNode(node_id, addresses[node_id], {p: a for p, a in addresses.items() if p != node_id},
                      base / node_id, ReplicatedState()) for node_id in ids]
    for node in nodes:
        (base / node.node_id).mkdir(parents=True, exist_ok=True)
    for node in nodes:
        await node.start()
    deadline = time.monotonic() + 20
    while not any(node.is_leader for node in nodes):
        if time.monotonic() > deadline:
            raise RuntimeError("spina: no leader within 20 s")
        await asyncio.sleep(0.01)
    return nodes


async def _spina_drive(leader: RaftNode, writes: int, concurrency: int, size: int, prefix: str,
                       rate: float | None = None) -> tuple[list[float], float]:
    """Closed loop (``concurrency`` writers back to back) or, with ``rate``, open loop: write i starts at
    started + i / rate whether or not earlier ones finished."""
    latencies: list[float] = []

    async def write(index: int) -> None:
        begin = time.perf_counter()
        await leader.propose(MODULE_KV + encode_put(f"{prefix}/{index}", value_for(index, size)))
        latencies.append(time.perf_counter() - begin)

    started = time.perf_counter()
    if rate:
        in_flight: set[asyncio.Task[None]] = set()
        for index in range(writes):
            delay = started + index / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.get_running_loop().create_task(write(index))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await asyncio.gather(*in_flight)
        return latencies, time.perf_counter() - started

    next_index = 0

    async def writer() -> None:
        nonlocal next_index
        while next_index < writes:
            next_index += 1
            await write(next_index - 1)

    await asyncio.gather(*(writer() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


async def _spina_verify(nodes: list[RaftNode], writes: int, size: int, prefix: str) -> None:
    leader = next(node for node in nodes if node.is_leader)
    for node in nodes:
        await node.wait_applied(leader.applied_index, 30)
        store = node.state_machine.kv  # type: ignore[attr-defined]
        for index in range(0, writes, max(1, writes // 500)):
            entry = store.get(f"{prefix}/{index}")
            if entry is None or entry.value != value_for(index, size):
                raise WrongAnswer(f"spina: {node.node_id} lacks {prefix}/{index}")


async def bench_spina_inprocess(args: argparse.Namespace) -> dict[str, Any]:
    import uvloop  # noqa: F401 - the loop policy is set by main

    base = Path(tempfile.mkdtemp(prefix="bench-spina-"))
    nodes = await _spina_cluster(base)
    tune_gc()  # as `spina agent` does once it serves
    gc_pauses: list[float] = []

    def time_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            time_gc.started = time.perf_counter()  # type: ignore[attr-defined]
        elif info["generation"] == 2:
            gc_pauses.append(time.perf_counter() - time_gc.started)  # type: ignore[attr-defined]

    gc.callbacks.append(time_gc)
    try:
        leader = next(node for node in nodes if node.is_leader)
        await _spina_drive(leader, min(2000, args.writes), args.concurrency, args.payload, "warmup")
        runs = []
        for run in range(args.runs):
            latencies, elapsed = await _spina_drive(leader, args.writes, args.concurrency, args.payload, f"r{run}")
            await _spina_verify(nodes, args.writes, args.payload, f"r{run}")
            runs.append(summarize(latencies, elapsed))
        deep = []
        for run in range(args.runs):
            latencies, elapsed = await _spina_drive(leader, args.writes, args.deep_concurrency, args.payload,
                                                    f"d{run}")
            await _spina_verify(nodes, args.writes, args.payload, f"d{run}")
            deep.append(summarize(latencies, elapsed))
        peak = median([r["writes_per_s"] for r in runs])
        half = []
        for run in range(args.runs):
            writes = max(1000, int(peak / 2 * 3))  # about 3 s of traffic at half the peak rate
            latencies, elapsed = await _spina_drive(leader, writes, args.concurrency, args.payload, f"h{run}",
                                                    rate=peak / 2)
            await _spina_verify(nodes, writes, args.payload, f"h{run}")
            half.append(summarize(latencies, elapsed))
        fsyncs = sum(node.storage.fsync_count for node in nodes)
        return {"runs": runs, "deep_runs": deep, "half_load_runs": half, "fsync": True, "fsyncs": fsyncs,
                "gc_full_pauses_ms": sorted(round(p * 1000, 1) for p in gc_pauses)}
    finally:
        gc.callbacks.remove(time_gc)
        for node in nodes:
            await node.stop()
        shutil.rmtree(base, ignore_errors=True)


# --- PySyncObj in-process ---------------------------------------------------------------------------------------

def bench_pysyncobj(args: argparse.Namespace) -> dict[str, Any]:
    from pysyncobj import SyncObj, SyncObjConf
    from pysyncobj.batteries import ReplDict

    ports = free_ports(3)
    addresses = [f"127.0.0.1:{port}" for port in ports]
    dicts = [ReplDict() for _ in addresses]
    nodes = [SyncObj(address, [a for a in addresses if a != address], consumers=[replica],
                     conf=SyncObjConf(dynamicMembershipChange=False))
             for address, replica in zip(addresses, dicts, strict=True)]
    try:
        deadline = time.monotonic() + 20
        while not any(node._isLeader() for node in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("pysyncobj: no leader within 20 s")
            time.sleep(0.01)
        leader_dict = dicts[next(i for i, node in enumerate(nodes) if node._isLeader())]

        def drive(writes: int, prefix: str, concurrency: int) -> tuple[list[float], float]:
            window = threading.Semaphore(concurrency)
            done = threading.Event()
            latencies: list[float] = []
            failures: list[object] = []
            remaining = [writes]
            lock = threading.Lock()
            started = time.perf_counter()
            for index in range(writes):
                window.acquire()
                begin = time.perf_counter()

                def callback(result: object, error: object, begin: float = begin) -> None:
                    with lock:
                        if error:
                            failures.append(error)
                        latencies.append(time.perf_counter() - begin)
                        remaining[0] -= 1
                        if not remaining[0]:
                            done.set()
                    window.release()

                leader_dict.set(f"{prefix}/{index}", value_for(index, args.payload), callback=callback)
            if not done.wait(120):
                raise WrongAnswer(f"pysyncobj: {remaining[0]} writes never completed")
            if failures:
                raise WrongAnswer(f"pysyncobj: {len(failures)} writes failed, e.g. {failures[0]}")
            return latencies, time.perf_counter() - started

        drive(min(2000, args.writes), "warmup", args.concurrency)
        results: dict[str, list[dict[str, float]]] = {"runs": [], "deep_runs": []}
        for key, concurrency, run in [(k, c, r) for k, c in (("runs", args.concurrency),
                                                            ("deep_runs", args.deep_concurrency))
                                      for r in range(args.runs)]:
            prefix = f"{key[0]}{run}"
            latencies, elapsed = drive(args.writes, prefix, concurrency)
            deadline = time.monotonic() + 30
            for replica in dicts:
                while replica.get(f"{prefix}/{args.writes - 1}") != value_for(args.writes - 1, args.payload):
                    if time.monotonic() > deadline:
                        raise WrongAnswer("pysyncobj: a replica never received the last write")
                    time.sleep(0.01)
                for index in range(0, args.writes, max(1, args.writes // 500)):
                    if replica.get(f"{prefix}/{index}") != value_for(index, args.payload):
                        raise WrongAnswer(f"pysyncobj: replica lacks {prefix}/{index}")
            results[key].append(summarize(latencies, elapsed))
        return {**results, "fsync": False}
    finally:
        for node in nodes:
            node.destroy()


# --- over HTTP: Spina agents vs etcd ---------------------------------------------------------------------------------

async def _http_drive(url_for: Any, body_for: Any, method: str, writes: int, concurrency: int,
                      prefix: str) -> tuple[list[float], float]:
    import aiohttp

    latencies: list[float] = []
    next_index = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()

        async def writer() -> None:
            nonlocal next_index
            while next_index < writes:
                index = next_index
                next_index += 1
                begin = time.perf_counter()
                async with session.request(method, url_for(prefix, index), data=body_for(prefix, index)) as reply:
                    payload = await reply.read()
                    if reply.status != 200:
                        raise WrongAnswer(f"HTTP {reply.status}: {payload[:200]!r}")
                latencies.append(time.perf_counter() - begin)

        await asyncio.gather(*(writer() for _ in range(concurrency)))
        return latencies, time.perf_counter() - started


def _wait_http(url: str, method: str = "GET", body: bytes | None = None, timeout: float = 30) -> bytes:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data=body, method=method), timeout=2) as reply:
                return reply.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _timed_http_runs(args: argparse.Namespace, url_for: Any, body_for: Any, method: str,
                     check: Any) -> list[dict[str, float]]:
    """A warm-up, then ``args.runs`` timed runs, each checked by reading a sample of its keys back."""
    asyncio.run(_http_drive(url_for, body_for, method, min(2000, args.writes), args.concurrency, "warmup"))
    runs = []
    for run in range(args.runs):
        latencies, elapsed = asyncio.run(_http_drive(url_for, body_for, method, args.writes, args.concurrency,
                                                     f"r{run}"))
        for index in range(0, args.writes, max(1, args.writes // 200)):
            check(f"r{run}", index)
        runs.append(summarize(latencies, elapsed))
    return runs


def bench_spina_http(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="bench-spina-http-"))
    processes, raft_ports, http_ports = spawn_spina_cluster(base, seed=11)
    try:
        deadline = time.monotonic() + 30
        leader = ""
        while not leader:
            if time.monotonic() > deadline:
                raise RuntimeError("spina http: no leader within 30 s")
            leader = orjson.loads(_wait_http(f"http://127.0.0.1:{http_ports[0]}/v1/status/leader"))
            time.sleep(0.05) if not leader else None
        leader_http = http_ports[raft_ports.index(int(leader.rsplit(":", 1)[1]))]
        follower_http = next(port for port in http_ports if port != leader_http)

        def url_for(prefix: str, index: int) -> str:
            return f"http://127.0.0.1:{leader_http}/v1/kv/{prefix}/{index}"

        def body_for(prefix: str, index: int) -> bytes:
            return value_for(index, args.payload)

        def check(prefix: str, index: int) -> None:
            got = _wait_http(f"http://127.0.0.1:{follower_http}/v1/kv/{prefix}/{index}?raw&consistent")
            if got != value_for(index, args.payload):
                raise WrongAnswer(f"spina http: follower returned {got[:40]!r} for {prefix}/{index}")

        runs = _timed_http_runs(args, url_for, body_for, "PUT", check)
        return {"runs": runs}
    finally:
        stop_processes(processes)
        shutil.rmtree(base, ignore_errors=True)


def bench_etcd(args: argparse.Namespace) -> dict[str, Any]:
    etcd = shutil.which("etcd")
    if etcd is None:
        raise RuntimeError("etcd is not installed (apt-get install etcd-server)")
    base = Path(tempfile.mkdtemp(prefix="bench-etcd-"))
    client_ports = free_ports(3, seed=21)
    peer_ports = free_ports(3, seed=22)
    names = ["e1", "e2", "e3"]
    cluster = ",".join(f"{name}=http://127.0.0.1:{peer_ports[i]}" for i, name in enumerate(names))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for i, name in enumerate(names):
            processes.append(subprocess.Popen(
                [etcd, "--name", name, "--data-dir", str(base / name),
                 "--listen-client-urls", f"http://127.0.0.1:{client_ports[i]}",
                 "--advertise-client-urls", f"http://127.0.0.1:{client_ports[i]}",
                 "--listen-peer-urls", f"http://127.0.0.1:{peer_ports[i]}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_ports[i]}",
                 "--initial-cluster", cluster, "--initial-cluster-state", "new",
                 "--initial-cluster-token", "spina-bench", "--log-level", "error"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        leader_port = None
        deadline = time.monotonic() + 30
        while leader_port is None:
            for port in client_ports:
                status = orjson.loads(_wait_http(f"http://127.0.0.1:{port}/v3/maintenance/status", "POST", b"{}"))
                if status.get("leader") and status["leader"] == status["header"]["member_id"]:
                    leader_port = port
            if leader_port is None:
                if time.monotonic() > deadline:
                    raise RuntimeError("etcd: no leader within 30 s")
                time.sleep(0.05)
        follower_port = next(port for port in client_ports if port != leader_port)

        def url_for(prefix: str, index: int) -> str:
            return f"http://127.0.0.1:{leader_port}/v3/kv/put"

        def body_for(prefix: str, index: int) -> bytes:
            return orjson.dumps({"key": base64.b64encode(f"{prefix}/{index}".encode()).decode(),
                                 "value": base64.b64encode(value_for(index, args.payload)).decode()})

        def check(prefix: str, index: int) -> None:
            reply = orjson.loads(_wait_http(
                f"http://127.0.0.1:{follower_port}/v3/kv/range", "POST",
                orjson.dumps({"key": base64.b64encode(f"{prefix}/{index}".encode()).decode()})))
            if base64.b64decode(reply["kvs"][0]["value"]) != value_for(index, args.payload):
                raise WrongAnswer(f"etcd: follower lacks {prefix}/{index}")

        runs = _timed_http_runs(args, url_for, body_for, "POST", check)
        return {"runs": runs, "version": subprocess.run([etcd, "--version"], capture_output=True,
                                                        text=True).stdout.split("\n")[0]}
    finally:
        stop_processes(processes)
        shutil.rmtree(base, ignore_errors=True)


def _medians(result: dict[str, Any], key: str = "runs") -> dict[str, float]:
    return {metric: median([run[metric] for run in result[key]]) for metric in ("writes_per_s", "p50_ms", "p99_ms")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=20000, help="writes per timed run (default 20000)")
    parser.add_argument("--http-writes", type=int, default=10000, help="writes per HTTP run (default 10000)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--deep-concurrency", type=int, default=4096,
                        help="a second in-process comparison with this many writes in flight (default 4096)")
    parser.add_argument("--payload", type=int, default=200, help="value size in bytes")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-http", action="store_true", help="only the in-process comparison")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args()
    import uvloop

    report: dict[str, Any] = {"machine": machine(), "concurrency": args.concurrency, "payload_bytes": args.payload}
    spina = uvloop.run(bench_spina_inprocess(args))
    pysyncobj = bench_pysyncobj(args)
    report["inprocess"] = {"spina": {**_medians(spina), "half_load": _medians(spina, "half_load_runs"),
                                     "fsyncs": spina["fsyncs"], "gc_full_pauses_ms": spina["gc_full_pauses_ms"]},
                           "pysyncobj": _medians(pysyncobj)}
    report["inprocess"]["ratio"] = (report["inprocess"]["spina"]["writes_per_s"]
                                    / report["inprocess"]["pysyncobj"]["writes_per_s"])
    report["inprocess_deep"] = {"concurrency": args.deep_concurrency, "spina": _medians(spina, "deep_runs"),
                                "pysyncobj": _medians(pysyncobj, "deep_runs")}
    report["inprocess_deep"]["ratio"] = (report["inprocess_deep"]["spina"]["writes_per_s"]
                                         / report["inprocess_deep"]["pysyncobj"]["writes_per_s"])
    if not args.skip_http:
        http_args = argparse.Namespace(**{**vars(args), "writes": args.http_writes})
        spina_http = bench_spina_http(http_args)
        etcd = bench_etcd(http_args)
        report["http"] = {"spina": _medians(spina_http), "etcd": {**_medians(etcd), "version": etcd["version"]}}
        report["http"]["ratio"] = report["http"]["spina"]["writes_per_s"] / report["http"]["etcd"]["writes_per_s"]
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return 0
    ip = report["inprocess"]
    print(f"machine: {report['machine']}; {args.concurrency} concurrent writers, {args.payload}-byte values, "
          f"medians of {args.runs} runs")
    print_table("In-process, 3 nodes on loopback TCP", ["system", "writes/s", "p50 ms", "p99 ms", "fsync"], [
        ["spina raft", ip["spina"]["writes_per_s"], ip["spina"]["p50_ms"], ip["spina"]["p99_ms"], "yes"],
        ["pysyncobj ReplDict", ip["pysyncobj"]["writes_per_s"], ip["pysyncobj"]["p50_ms"],
         ip["pysyncobj"]["p99_ms"], "no"],
    ])
    deep = report["inprocess_deep"]
    print_table(f"In-process, {args.deep_concurrency} writes in flight", ["system", "writes/s", "p50 ms", "p99 ms"], [
        ["spina raft", deep["spina"]["writes_per_s"], deep["spina"]["p50_ms"], deep["spina"]["p99_ms"]],
        ["pysyncobj ReplDict", deep["pysyncobj"]["writes_per_s"], deep["pysyncobj"]["p50_ms"],
         deep["pysyncobj"]["p99_ms"]],
    ])
    print(f"ratio spina / pysyncobj: {ip['ratio']:.2f}x at {args.concurrency} in flight, {deep['ratio']:.2f}x at "
          f"{args.deep_concurrency}")
    print(f"spina at half its peak (open loop): p50 "
          f"{ip['spina']['half_load']['p50_ms']:.2f} ms, p99 {ip['spina']['half_load']['p99_ms']:.2f} ms; "
          f"full GC pauses (ms): {ip['spina']['gc_full_pauses_ms']}")
    if "http" in report:
        http = report["http"]
        print_table("HTTP, 3 server processes, same aiohttp client", ["system", "writes/s", "p50 ms", "p99 ms"], [
            ["spina PUT /v1/kv", http["spina"]["writes_per_s"], http["spina"]["p50_ms"], http["spina"]["p99_ms"]],
            [f"etcd {http['etcd']['version']}", http["etcd"]["writes_per_s"], http["etcd"]["p50_ms"],
             http["etcd"]["p99_ms"]],
        ])
        print(f"ratio spina / etcd: {http['ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
