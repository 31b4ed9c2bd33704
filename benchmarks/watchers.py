"""Blocking queries at scale: how fast a change reaches its watchers, and what 10,000 watchers cost.

A ``spina agent --dev`` holds 1,000 services; 10,000 blocking ``GET /v1/health/service/<name>?index=&wait=``
queries (10 per service, one connection each) wait on it. Then, one service at a time, an instance is
registered and the time from sending the registration to each of that service's watchers receiving its
answer is recorded (the watchers are woken when the change is applied, before the registration is answered)
(and every answer checked: the new index, the new instance). The other 9,990 must stay asleep (checked after
every change). Beside it: the agent's RSS before and after the watchers connected (bytes per watcher).

    python benchmarks/watchers.py [--services 1000] [--per-service 10] [--changes 20] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, percentile, print_table, stop_processes
from kv_http import WrongAnswer, fetch, start_agent


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


async def open_watcher(host: str, port: int, service: str, index: int) -> tuple[asyncio.StreamReader,
                                                                             asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET /v1/health/service/{service}?index={index}&wait=600s HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def read_answer(reader: asyncio.StreamReader) -> tuple[float, int, list[str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    arrived = time.perf_counter()
    headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line)
    body = await reader.readexactly(int(headers["Content-Length"]))
    return arrived, int(headers["X-Consul-Index"]), [entry["Service"]["ID"] for entry in orjson.loads(body)]


async def run(base: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    names = [f"svc-{number:04d}" for number in range(args.services)]
    status, _, body = await asyncio.to_thread(fetch, f"{base}/v1/spina/services/register", "PUT", orjson.dumps([
        {"service": name, "instance_id": f"{name}-a", "address": "10.0.0.1", "port": 80, "ttl": "1h"}
        for name in names]))
    if status != 200:
        raise WrongAnswer(f"registration failed: {body!r}")
    index = orjson.loads(body)["index"]
    rss_before = rss_bytes(pid)
    connections: dict[str, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {name: [] for name in names}
    started = time.perf_counter()
    for start in range(0, len(names), 50):
        batch = [(name, open_watcher(host, int(port), name, index)) for name in names[start:start + 50]
                 for _ in range(args.per_service)]
        opened = await asyncio.gather(*(coroutine for _, coroutine in batch))
        for (name, _), connection in zip(batch, opened, strict=True):
            connections[name].append(connection)
    open_seconds = time.perf_counter() - started
    await asyncio.sleep(1.0)  # let the agent read every query before its memory is measured
    rss_after = rss_bytes(pid)
    pending = {name: [asyncio.create_task(read_answer(reader)) for reader, _ in connections[name]]
               for name in names}
    latencies_ms: list[float] = []
    try:
        for number in range(args.changes):
            name = names[(number * 397) % len(names)]
            sent = time.perf_counter()
            status, _, body = await asyncio.to_thread(
                fetch, f"{base}/v1/spina/services/register", "PUT",
                orjson.dumps({"service": name, "instance_id": f"{name}-b", "address": "10.0.0.2", "port": 80,
                              "ttl": "1h"}))
            new_index = orjson.loads(body)["index"]
            for arrived, answer_index, instances in await asyncio.wait_for(asyncio.gather(*pending.pop(name)), 60):
                if answer_index != new_index or instances != [f"{name}-a", f"{name}-b"]:
                    raise WrongAnswer(f"{name}: index {answer_index} (expected {new_index}), {instances}")
                # From the registration's request: Raft commit + apply + wake-up + the answer's trip.
                latencies_ms.append((arrived - sent) * 1000)
            woken_early = [other for other, tasks in pending.items() if any(task.done() for task in tasks)]
            if woken_early:
                raise WrongAnswer(f"a change to {name} woke watchers of {woken_early[:5]}")
    finally:
        for tasks in pending.values():
            for task in tasks:
                task.cancel()
        for pairs in connections.values():
            for _, writer in pairs:
                writer.close()
    watchers = args.services * args.per_service
    return {"watchers": watchers, "services": args.services, "changes": args.changes,
            "open_seconds": open_seconds, "rss_per_watcher_bytes": (rss_after - rss_before) / watchers,
            "wake_ms": {"p50": median(latencies_ms), "p99": percentile(latencies_ms, 0.99),
                        "max": max(latencies_ms)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=1_000)
    parser.add_argument("--per-service", type=int, default=10)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workdir = Path(tempfile.mkdtemp(prefix="spina-bench-watchers-"))
    agent, base = start_agent(workdir)
    try:
        report = {"machine": machine(), **asyncio.run(run(base, agent.pid, args))}
    finally:
        stop_processes([agent])
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return 0
    wake = report["wake_ms"]
    print(f"machine: {report['machine']}")
    print_table(f"{report['watchers']:,} blocking queries on {report['services']:,} services, "
                f"{report['changes']} changes (each wakes {args.per_service})",
                ["metric", "value"],
                [["wake latency p50 (ms)", wake["p50"]], ["wake latency p99 (ms)", wake["p99"]],
                 ["wake latency max (ms)", wake["max"]],
                 ["agent RSS per watcher (bytes)", report["rss_per_watcher_bytes"]],
                 ["time to open all watchers (s)", report["open_seconds"]]])
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
