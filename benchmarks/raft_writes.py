"""Durable replicated writes: Spina's Raft beside PySyncObj (in-process) and etcd (over HTTP), same run.

1. In-process, 3 nodes on loopback TCP, ~200-byte values, C concurrent writers:
   Spina (three RaftNodes on one uvloop loop, fsync on) vs PySyncObj (three SyncObj + ReplDict, its
   defaults; it does not fsync). Committed writes/s and commit latency p50/p99, then p50/p99 of Spina
   under an open-loop load at half of its measured peak.
2. Over HTTP, 3 separate server processes each, fsync on: Spina's `PUT /v1/kv/<key>` vs etcd's JSON gateway
   `POST /v3/kv/put`, both driven by the same C load generator (wrk -t1, C connections, a Lua script per
   system) at the leader, the two clusters taking turns within each round. Then each at half its own peak
   rate under an open-loop generator (open_loop.c: pipelined raw sockets; latency counted from when a write
   was due).

Every run is checked: the keys written are read back from a follower (Spina, etcd) or every replica
(PySyncObj) and must hold the values written.

    python benchmarks/raft_writes.py [--writes 20000] [--http-duration 8] [--concurrency 64] [--runs 3]
                                     [--skip-inprocess | --skip-http] [--json]
Needs: pip install pysyncobj; etcd, wrk and a C compiler (Debian: apt-get install etcd-server wrk gcc) for part 2.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import gc
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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


VALUE_STEM_BYTES = 18  # "value-%011d-": a multiple of 3, see _LUA_VALUE


def value_for(index: int, size: int) -> bytes:
    return f"value-{index:011d}-".encode() + b"x" * (size - VALUE_STEM_BYTES)


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


# --- over HTTP: Spina agents vs etcd, both driven by wrk ---------------------------------------------------------

# wrk (C, one thread) drives both systems with the same logic: request n of a run writes <prefix>/<n> with
# value_for(n). etcd's gateway wants key and value in base64: the value's stem is 18 bytes, a multiple of 3, so
# its base64 is the stem's followed by the padding's, which is computed once per run.
_LUA_VALUE = """
local counter = 0
local prefix = "@PREFIX@"
local pad = string.rep("x", @SIZE@ - @STEM@)
local function stem(n) return string.format("value-%011d-", n) end
"""
_LUA_SPINA = _LUA_VALUE + """
request = function()
  local n = counter
  counter = counter + 1
  return wrk.format("PUT", "/v1/kv/" .. prefix .. "/" .. n, nil, stem(n) .. pad)
end
"""
_LUA_ETCD = _LUA_VALUE + """
local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local codes = {}
for i = 1, 64 do codes[i - 1] = alphabet:sub(i, i) end
local function b64(data)
  local out = {}
  for i = 1, #data, 3 do
    local a, b, c = data:byte(i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    out[#out + 1] = codes[math.floor(n / 262144) % 64] .. codes[math.floor(n / 4096) % 64]
      .. (b and codes[math.floor(n / 64) % 64] or "=") .. (c and codes[n % 64] or "=")
  end
  return table.concat(out)
end
local pad64 = b64(pad)
local headers = {["Content-Type"] = "application/json"}
request = function()
  local n = counter
  counter = counter + 1
  local body = '{"key":"' .. b64(prefix .. "/" .. n) .. '","value":"' .. b64(stem(n)) .. pad64 .. '"}'
  return wrk.format("POST", "/v3/kv/put", headers, body)
end
"""
_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


@dataclass
class HttpSystem:
    """A 3-process cluster serving HTTP writes: how to drive it (wrk's Lua, raw requests) and read it back."""

    name: str
    processes: list[subprocess.Popen[bytes]]
    leader_port: int
    lua: str
    raw_request: Callable[[str, int, int], bytes]  # (prefix, index, size) -> one HTTP/1.1 request
    read_back: Callable[[str, int], bytes]  # (prefix, index) -> the value a follower holds
    term: Callable[[], int]  # the cluster's Raft term: a change during a run is a new election

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the cluster's processes have used so far, with their finished children's
        (Spina's snapshot processes) (Linux /proc: utime, stime, cutime, cstime)."""
        total = 0
        for process in self.processes:
            fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(field) for field in fields[11:15])
        return total / os.sysconf("SC_CLK_TCK")


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


def start_spina(base: Path, extra_args: tuple[str, ...] = ()) -> HttpSystem:
    processes, raft_ports, http_ports = spawn_spina_cluster(base, seed=11, extra_args=extra_args)
    try:
        deadline = time.monotonic() + 30
        leader = ""
        while not leader:
            if time.monotonic() > deadline:
                raise RuntimeError("spina: no leader within 30 s")
            leader = orjson.loads(_wait_http(f"http://127.0.0.1:{http_ports[0]}/v1/status/leader"))
            if not leader:
                time.sleep(0.05)
    except BaseException as exc:
        stop_processes(processes)
        logs = "".join(f"\n--- {path.name}:\n{path.read_text(errors='replace')[-2000:]}"
                       for path in sorted(base.glob("*.log")))
        raise RuntimeError(f"spina cluster did not come up: {exc}{logs}") from exc
    leader_port = http_ports[raft_ports.index(int(leader.rsplit(":", 1)[1]))]
    follower_port = next(port for port in http_ports if port != leader_port)

    def raw_request(prefix: str, index: int, size: int) -> bytes:
        value = value_for(index, size)
        return (f"PUT /v1/kv/{prefix}/{index} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(value)}\r\n\r\n"
                .encode() + value)

    def read_back(prefix: str, index: int) -> bytes:
        return _wait_http(f"http://127.0.0.1:{follower_port}/v1/kv/{prefix}/{index}?raw&consistent")

    def term() -> int:
        # From a follower: every election moves the term of a majority, and the status document carries a hash
        # of the whole state, which stops the loop serving it for a while (0.4 s per 100k keys on this machine):
        # on the leader, for longer than an election timeout once the runs have written a few hundred thousand.
        return int(orjson.loads(_wait_http(f"http://127.0.0.1:{follower_port}/v1/spina/raft/status"))["term"])

    return HttpSystem("spina", processes, leader_port, _LUA_SPINA, raw_request, read_back, term)


def start_etcd(base: Path) -> HttpSystem:
    etcd = shutil.which("etcd")
    if etcd is None:
        raise RuntimeError("etcd is not installed (apt-get install etcd-server)")
    client_ports = free_ports(3, seed=21)
    peer_ports = free_ports(3, seed=22)
    names = ["e1", "e2", "e3"]
    cluster = ",".join(f"{name}=http://127.0.0.1:{peer_ports[i]}" for i, name in enumerate(names))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for i, name in enumerate(names):
            # etcd fsyncs its WAL on every Raft Ready by default (there is no switch to turn it off in 3.4).
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
    except BaseException:
        stop_processes(processes)
        raise
    follower_port = next(port for port in client_ports if port != leader_port)

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    def raw_request(prefix: str, index: int, size: int) -> bytes:
        body = orjson.dumps({"key": b64(f"{prefix}/{index}".encode()), "value": b64(value_for(index, size))})
        return (f"POST /v3/kv/put HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

    def read_back(prefix: str, index: int) -> bytes:
        reply = orjson.loads(_wait_http(f"http://127.0.0.1:{follower_port}/v3/kv/range", "POST",
                                        orjson.dumps({"key": b64(f"{prefix}/{index}".encode())})))
        return base64.b64decode(reply["kvs"][0]["value"]) if reply.get("kvs") else b""

    def term() -> int:
        status = orjson.loads(_wait_http(f"http://127.0.0.1:{leader_port}/v3/maintenance/status", "POST", b"{}"))
        return int(status["raftTerm"])

    version = subprocess.run([etcd, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return HttpSystem(version.replace("Version: ", ""), processes, leader_port, _LUA_ETCD, raw_request, read_back,
                      term)


def _wrk_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(f"wrk latency {text!r}")
    return float(match.group(1)) * _WRK_UNITS[match.group(2)]


def run_wrk(system: HttpSystem, prefix: str, args: argparse.Namespace, duration: float,
            workdir: Path) -> dict[str, float]:
    """One closed-loop wrk run (-t1, ``args.concurrency`` connections); returns writes/s, p50/p99 and the
    number of writes wrk saw answered (request n of the run wrote ``prefix/n``)."""
    script = workdir / f"{system.name.split()[0]}-{prefix}.lua"
    script.write_text(system.lua.replace("@PREFIX@", prefix).replace("@SIZE@", str(args.payload))
                      .replace("@STEM@", str(VALUE_STEM_BYTES)))
    command = ["wrk", "-t1", f"-c{args.concurrency}", f"-d{duration:g}s", "--latency", "--timeout", "10s",
               "-s", str(script), f"http://127.0.0.1:{system.leader_port}/"]
    term, used = system.term(), system.cpu_seconds()  # in this order: the status call's CPU is not the run's
    output = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60).stdout
    cpu = system.cpu_seconds() - used
    elections = system.term() - term
    if "Socket errors" in output or "Non-2xx or 3xx responses" in output:
        raise WrongAnswer(f"{system.name}: wrk saw errors:\n{output}")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    count = re.search(r"(\d+) requests in", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if not (rate and count and p50 and p99):
        raise RuntimeError(f"cannot read wrk's output:\n{output}")
    writes = int(count.group(1))
    return {"writes_per_s": float(rate.group(1)), "p50_ms": _wrk_ms(p50.group(1)), "p99_ms": _wrk_ms(p99.group(1)),
            "writes": writes, "cpu_us_per_write": cpu / max(writes, 1) * 1e6, "elections": elections}


def verify_http(system: HttpSystem, prefix: str, answered: int, args: argparse.Namespace) -> None:
    """Read a sample of a run's keys back from a follower. wrk counts answers, not which request each answered:
    the last ``concurrency`` requests sent may be the ones still in flight, so the sample stops short of them.
    wrk builds (and never sends) one request per thread before it starts, so request 0 is not written."""
    checked = max(1, answered - args.concurrency)
    for index in range(1, checked, max(1, checked // 200)):
        got = system.read_back(prefix, index)
        if got != value_for(index, args.payload):
            raise WrongAnswer(f"{system.name}: a follower returned {got[:40]!r} for {prefix}/{index}")


def build_open_loop(workdir: Path) -> Path:
    """Compile the open-loop generator (open_loop.c, beside this script) into ``workdir``."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("the open-loop generator needs a C compiler (apt-get install gcc)")
    binary = workdir / "open_loop"
    subprocess.run([compiler, "-O2", "-o", str(binary), str(Path(__file__).with_name("open_loop.c"))], check=True)
    return binary


def open_loop(system: HttpSystem, generator: Path, prefix: str, rate: float, count: int,
              args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    """``count`` writes at ``rate``/s on ``args.concurrency`` pipelined connections, whether or not earlier ones
    were answered (wrk's closed loop would slow down with the server and hide its stalls). Latency runs from
    the moment a write was due, so a late generator counts against the server, never for it. The generator is
    a small C program (open_loop.c): at these rates a Python one took a good part of a core, on a machine whose
    two cores also run the three servers."""
    requests = workdir / f"{prefix}.requests"
    latencies_file = workdir / f"{prefix}.latencies"
    with requests.open("wb") as file:
        for index in range(count):
            request = system.raw_request(prefix, index, args.payload)
            file.write(struct.pack("<I", len(request)))
            file.write(request)
    term, used = system.term(), system.cpu_seconds()
    command = [str(generator), "127.0.0.1", str(system.leader_port), str(args.concurrency), f"{rate:.3f}",
               str(requests), str(latencies_file)]
    output = subprocess.run(command, capture_output=True, text=True, timeout=count / rate + 60)
    cpu = system.cpu_seconds() - used
    elections = system.term() - term
    if output.returncode != 0:
        raise WrongAnswer(f"{system.name}: the open-loop generator failed ({output.returncode}): {output.stderr}")
    report = orjson.loads(output.stdout)
    if report["failures"]:
        raise WrongAnswer(f"{system.name}: {report['failures']} open-loop writes failed, e.g. "
                          f"{report['first_failure']!r}")
    latencies = array.array("d", latencies_file.read_bytes()).tolist()
    requests.unlink()
    latencies_file.unlink()
    return {**summarize(latencies, report["elapsed"]), "rate": rate, "generator_max_lag_ms": report["max_lag"] * 1000,
            "cpu_us_per_write": cpu / count * 1e6, "elections": elections}


def bench_http(args: argparse.Namespace) -> dict[str, Any]:
    """Both clusters up at once; each round times one, then the other (the order alternating), so the shared
    machine's changing load weighs on both alike. Then each at half its own median peak, open loop."""
    if shutil.which("wrk") is None:
        raise RuntimeError("the HTTP comparison needs wrk (apt-get install wrk)")

    base = Path(tempfile.mkdtemp(prefix="bench-raft-http-"))
    systems: list[HttpSystem] = []
    try:
        systems.append(start_spina(base / "spina", tuple(args.spina_args.split())))
        systems.append(start_etcd(base / "etcd"))
        runs: dict[str, list[dict[str, float]]] = {system.name: [] for system in systems}
        half: dict[str, list[dict[str, float]]] = {system.name: [] for system in systems}
        generator = build_open_loop(base)
        for system in systems:
            run_wrk(system, "warmup", args, 2, base)
        for run in range(args.runs):
            for system in systems if run % 2 == 0 else systems[::-1]:
                result = run_wrk(system, f"r{run}", args, args.http_duration, base)
                verify_http(system, f"r{run}", int(result["writes"]), args)
                runs[system.name].append(result)
        for run in range(args.runs):
            for system in systems if run % 2 == 0 else systems[::-1]:
                rate = median([r["writes_per_s"] for r in runs[system.name]]) / 2
                count = max(1000, int(rate * args.http_duration))
                result = open_loop(system, generator, f"h{run}", rate, count, args, base)
                verify_http(system, f"h{run}", count + args.concurrency, args)
                half[system.name].append(result)
        return {"systems": [system.name for system in systems], "runs": runs, "half_load_runs": half}
    except BaseException:
        for path in sorted((base / "spina").glob("*.log")):
            print(f"--- {path.name} (last lines):\n{path.read_text(errors='replace')[-3000:]}", file=sys.stderr)
        raise
    finally:
        for system in systems:
            stop_processes(system.processes)
        if args.keep_logs:
            # The agents' logs (run them with --spina-args "--log-level info" to see each snapshot's costs).
            Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
            for path in sorted((base / "spina").glob("*.log")):
                shutil.copy(path, Path(args.keep_logs) / path.name)
        shutil.rmtree(base, ignore_errors=True)


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {metric: median([run[metric] for run in runs]) for metric in runs[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=20000, help="writes per in-process run (default 20000)")
    parser.add_argument("--http-duration", type=float, default=8, help="seconds per HTTP run (default 8)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--deep-concurrency", type=int, default=4096,
                        help="a second in-process comparison with this many writes in flight (default 4096)")
    parser.add_argument("--payload", type=int, default=200, help="value size in bytes (default 200)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-http", action="store_true", help="only the in-process comparison")
    parser.add_argument("--skip-inprocess", action="store_true", help="only the HTTP comparison")
    parser.add_argument("--spina-args", default="", metavar="ARGS",
                        help="extra `spina agent` flags for the HTTP cluster, e.g. '--snapshot-entries 100000' "
                             "(etcd's default --snapshot-count); printed with the results")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--keep-logs", default="", metavar="DIR", help="copy the Spina agents' logs into DIR")
    args = parser.parse_args()
    if args.payload < VALUE_STEM_BYTES:
        parser.error(f"--payload must be at least {VALUE_STEM_BYTES} bytes (the value names its index)")
    import uvloop

    report: dict[str, Any] = {"machine": machine(), "concurrency": args.concurrency, "payload_bytes": args.payload,
                              "runs": args.runs}
    if not args.skip_inprocess:
        spina = uvloop.run(bench_spina_inprocess(args))
        pysyncobj = bench_pysyncobj(args)
        report["inprocess"] = {"spina": {**_medians(spina["runs"]), "half_load": _medians(spina["half_load_runs"]),
                                         "fsyncs": spina["fsyncs"], "gc_full_pauses_ms": spina["gc_full_pauses_ms"]},
                               "pysyncobj": _medians(pysyncobj["runs"])}
        report["inprocess"]["ratio"] = (report["inprocess"]["spina"]["writes_per_s"]
                                        / report["inprocess"]["pysyncobj"]["writes_per_s"])
        report["inprocess_deep"] = {"concurrency": args.deep_concurrency, "spina": _medians(spina["deep_runs"]),
                                    "pysyncobj": _medians(pysyncobj["deep_runs"])}
        report["inprocess_deep"]["ratio"] = (report["inprocess_deep"]["spina"]["writes_per_s"]
                                             / report["inprocess_deep"]["pysyncobj"]["writes_per_s"])
    if not args.skip_http:
        http = bench_http(args)
        spina_name, etcd_name = http["systems"]
        spina_runs, etcd_runs = http["runs"][spina_name], http["runs"][etcd_name]
        report["http"] = {
            "driver": f"wrk -t1 -c{args.concurrency}, {args.http_duration:g} s per run",
            "spina_args": args.spina_args,
            "spina": {**_medians(spina_runs), "half_load": _medians(http["half_load_runs"][spina_name]),
                      "runs": spina_runs, "half_load_runs": http["half_load_runs"][spina_name]},
            "etcd": {**_medians(etcd_runs), "half_load": _medians(http["half_load_runs"][etcd_name]),
                     "version": etcd_name, "runs": etcd_runs, "half_load_runs": http["half_load_runs"][etcd_name]},
            # Each round timed both: the median of the per-round ratios is steadier than the ratio of medians.
            "ratio": median([s["writes_per_s"] / e["writes_per_s"] for s, e in zip(spina_runs, etcd_runs,
                                                                                    strict=True)]),
            # Leader elections during the timed runs (the term of the node driven moved): each can make a p99.
            "elections": {key: int(sum(run["elections"] for run in [*http["runs"][name],
                                                                    *http["half_load_runs"][name]]))
                          for key, name in (("spina", spina_name), ("etcd", etcd_name))},
        }
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return 0
    print(f"machine: {report['machine']}; {args.concurrency} concurrent writers, {args.payload}-byte values, "
          f"medians of {args.runs} runs")
    if "inprocess" in report:
        ip = report["inprocess"]
        print_table("In-process, 3 nodes on loopback TCP", ["system", "writes/s", "p50 ms", "p99 ms", "fsync"], [
            ["spina raft", ip["spina"]["writes_per_s"], ip["spina"]["p50_ms"], ip["spina"]["p99_ms"], "yes"],
            ["pysyncobj ReplDict", ip["pysyncobj"]["writes_per_s"], ip["pysyncobj"]["p50_ms"],
             ip["pysyncobj"]["p99_ms"], "no"],
        ])
        deep = report["inprocess_deep"]
        print_table(f"In-process, {args.deep_concurrency} writes in flight",
                    ["system", "writes/s", "p50 ms", "p99 ms"], [
                        ["spina raft", deep["spina"]["writes_per_s"], deep["spina"]["p50_ms"],
                         deep["spina"]["p99_ms"]],
                        ["pysyncobj ReplDict", deep["pysyncobj"]["writes_per_s"], deep["pysyncobj"]["p50_ms"],
                         deep["pysyncobj"]["p99_ms"]],
                    ])
        print(f"ratio spina / pysyncobj: {ip['ratio']:.2f}x at {args.concurrency} in flight, {deep['ratio']:.2f}x "
              f"at {args.deep_concurrency}")
        print(f"spina at half its peak (open loop): p50 "
              f"{ip['spina']['half_load']['p50_ms']:.2f} ms, p99 {ip['spina']['half_load']['p99_ms']:.2f} ms; "
              f"full GC pauses (ms): {ip['spina']['gc_full_pauses_ms']}")
    if "http" in report:
        http_report = report["http"]
        rows = []
        for label, key in (("spina PUT /v1/kv", "spina"), (f"etcd {http_report['etcd']['version']}", "etcd")):
            result = http_report[key]
            half_load = result["half_load"]
            if key == "spina" and http_report["spina_args"]:
                label += f" ({http_report['spina_args']})"
            rows.append([label, result["writes_per_s"], result["p50_ms"], result["p99_ms"],
                         result["cpu_us_per_write"], f"{half_load['rate']:,.0f}/s", half_load["p50_ms"],
                         half_load["p99_ms"]])
        print_table(f"HTTP, 3 server processes each, fsync on, {http_report['driver']}; then open loop at half "
                    "the system's own peak", ["system", "writes/s", "p50 ms", "p99 ms", "server CPU µs/write",
                                              "half load", "p50 ms", "p99 ms"], rows)
        print(f"ratio spina / etcd (median of per-round ratios): {http_report['ratio']:.2f}x; elections during the "
              f"timed runs: spina {http_report['elections']['spina']}, etcd {http_report['elections']['etcd']}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
