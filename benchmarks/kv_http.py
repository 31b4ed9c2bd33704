"""The agent's HTTP front end: Spina's fast path beside plain aiohttp and raw uvloop, same run, same bytes.

1. Reads with wrk (-t1 -c32): ``GET /v1/kv/<key>?raw`` and ``GET /v1/status/leader`` on a ``spina agent --dev``
   process, served (a) by the fast front end and (b) by the agent's aiohttp application on the same port
   (requests carrying an ``X-Spina-*`` header are handed to aiohttp), beside two peer processes that return
   exactly the bytes the agent returned: a plain aiohttp + uvloop server and a raw uvloop protocol that
   answers without parsing (the ceiling of one Python process).
2. Writes with wrk and a Lua script: ``PUT /v1/kv/bench/put/<n>`` to the single-node dev agent (Raft + fsync),
   fast path vs aiohttp path.
3. The request-head parser on its own: spina_fast._http (Cython) vs httptools (llhttp), if installed.

Every timed run is checked: the response bodies are compared with the expected bytes before timing, wrk
must report no errors and no non-2xx answers, and the PUT keys are read back afterwards. The servers compared
in a table take turns within each round (the machine's load changes by the minute), ratios are medians of the
per-round ratios, and each server's CPU time per request is measured beside its req/s.

    python benchmarks/kv_http.py [--duration 5] [--connections 32] [--runs 3] [--json]
Needs: wrk (Debian: apt-get install wrk); optional: pip install httptools for part 3.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_ports, machine, median, print_table, stop_processes

READY = re.compile(r"spina agent ready http=(\S+)")
VIA_AIOHTTP = "X-Spina-Bench: via-aiohttp"  # any X-Spina-* header sends a request to the aiohttp application
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


class WrongAnswer(AssertionError):
    """A timed run answered wrong bytes or errors: its timing is worthless."""


# --- peers ------------------------------------------------------------------------------------------------------

def serve_peer(kind: str, port: int, answers_file: str) -> None:
    """Run one peer server until SIGTERM: ``answers_file`` maps path+query to (status, headers, body hex)."""
    import uvloop

    answers = {path: (status, headers, bytes.fromhex(body))
               for path, (status, headers, body) in orjson.loads(Path(answers_file).read_bytes()).items()}

    async def aiohttp_peer() -> None:
        from aiohttp import web

        async def handle(request: web.Request) -> web.Response:
            status, headers, body = answers[request.path_qs]
            return web.Response(status=status, headers=headers, body=body)

        app = web.Application()
        app.router.add_get("/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        await asyncio.Event().wait()

    async def raw_peer() -> None:
        # Answers the first path it was given to every request: the cost of the event loop and sockets alone.
        status, headers, body = next(iter(answers.values()))
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items() if name.lower() != "content-length")
        response = f"HTTP/1.1 {status} OK\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode() + body

        class Canned(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport: Any = transport

            def data_received(self, data: bytes) -> None:
                self.transport.write(response * data.count(b"\r\n\r\n"))

        await asyncio.get_running_loop().create_server(Canned, "127.0.0.1", port, backlog=1024)
        await asyncio.Event().wait()

    uvloop.run(aiohttp_peer() if kind == "aiohttp" else raw_peer())


def start_peer(kind: str, port: int, answers: dict[str, tuple[int, dict[str, str], bytes]],
               workdir: Path) -> subprocess.Popen[bytes]:
    answers_file = workdir / f"answers-{kind}.json"
    answers_file.write_bytes(orjson.dumps({path: (status, headers, body.hex())
                                           for path, (status, headers, body) in answers.items()}))
    process = subprocess.Popen([sys.executable, __file__, "--serve-peer", kind, "--peer-port", str(port),
                                "--answers", str(answers_file)])
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError(f"peer {kind} did not start on port {port}") from None
            time.sleep(0.05)


# --- the agent --------------------------------------------------------------------------------------------------

def start_agent(workdir: Path) -> tuple[subprocess.Popen[str], str]:
    http_port, raft_port, dns_port = free_ports(3)
    process = subprocess.Popen(
        [sys.executable, "-m", "spina_fast", "agent", "--dev", "--http-addr", f"127.0.0.1:{http_port}",
         "--raft-addr", f"127.0.0.1:{raft_port}", "--dns-addr", f"127.0.0.1:{dns_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=workdir)
    assert process.stdout is not None
    for line in process.stdout:
        match = READY.search(line)
        if match:
            return process, f"http://{match.group(1)}"
    process.wait(10)
    raise RuntimeError(f"spina agent exited with {process.returncode} before it was ready")


def fetch(url: str, method: str = "GET", body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, dict(response.headers), response.read()


def seed_agent(base: str, rng: random.Random, keys: int, size: int) -> dict[str, bytes]:
    values = {f"bench/read/{i:05d}": rng.randbytes(size) for i in range(keys)}
    for key, value in values.items():
        if fetch(f"{base}/v1/kv/{key}", "PUT", value)[2] != b"true":
            raise WrongAnswer(f"seeding {key} failed")
    return values


# --- wrk ----------------------------------------------------------------------------------------------------------

def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(f"wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(url: str, args: argparse.Namespace, duration: int, header: str | None = None,
        script: Path | None = None) -> dict[str, float]:
    command = ["wrk", "-t", str(args.threads), "-c", str(args.connections), "-d", f"{duration}s", "--latency"]
    if header:
        command += ["-H", header]
    if script:
        command += ["-s", str(script)]
    output = subprocess.run([*command, url], capture_output=True, text=True, timeout=duration + 60).stdout
    if "Socket errors" in output or "Non-2xx or 3xx responses" in output:
        raise WrongAnswer(f"wrk saw errors on {url}:\n{output}")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if not (rate and p50 and p99):
        raise RuntimeError(f"cannot read wrk's output:\n{output}")
    return {"requests_per_s": float(rate.group(1)), "p50_ms": _ms(p50.group(1)), "p99_ms": _ms(p99.group(1))}


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) the process ``pid`` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Target:
    """One server for wrk: its URL, an extra header or a Lua script, and its process (for CPU time)."""

    url: str
    pid: int
    header: str | None = None
    script: Path | None = None


def timed_together(targets: dict[str, Target], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``args.runs`` rounds, each timing every target once in turn (after a warm-up of each), so that the load of
    a shared machine, which changes by the minute, weighs on all of them alike. Per target: the runs and the
    medians of req/s, p50, p99 and the server's CPU µs per request, which is steadier than req/s there (a
    server waiting for its turn on a core is slower, not costlier)."""
    for target in targets.values():
        wrk(target.url, args, args.warmup, target.header, target.script)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
    for _ in range(args.runs):
        for name, target in targets.items():
            used = cpu_seconds(target.pid)
            run = wrk(target.url, args, args.duration, target.header, target.script)
            run["cpu_us_per_request"] = ((cpu_seconds(target.pid) - used)
                                         / (run["requests_per_s"] * args.duration) * 1e6)
            runs[name].append(run)
    return {name: {"runs": runs[name], **{metric: median([run[metric] for run in runs[name]])
                                          for metric in ("requests_per_s", "p50_ms", "p99_ms", "cpu_us_per_request")}}
            for name in targets}


def paired_ratio(result: dict[str, Any], baseline: dict[str, Any]) -> float:
    """The median over rounds of ``result``'s req/s over ``baseline``'s in the same round."""
    return median([run["requests_per_s"] / base["requests_per_s"]
                   for run, base in zip(result["runs"], baseline["runs"], strict=True)])


PUT_SCRIPT = """
counter = 0
wrk.method = "PUT"
wrk.body = string.rep("v", {size})
request = function()
  counter = counter + 1
  return wrk.format("PUT", "/v1/kv/bench/put/" .. (counter % {keys}), nil, nil)
end
"""


# --- the parser alone ------------------------------------------------------------------------------------------------

_PARSE_REQUEST = (b"GET /v1/kv/bench/read/00042?raw HTTP/1.1\r\nHost: 127.0.0.1:8700\r\n"
                  b"User-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n")


def bench_parsers(runs: int, count: int = 100_000) -> dict[str, Any]:
    """ns per request to get what the front end routes on: method, decoded path, query dict, keep-alive."""
    from urllib.parse import unquote

    from spina_fast._http import parse_head, parse_query

    def spina() -> None:
        for _ in range(count):
            head = parse_head(_PARSE_REQUEST)
            parse_query(head.query)  # type: ignore[union-attr]

    contenders = {"spina_fast._http (Cython)": spina}
    try:
        import httptools
    except ImportError:
        httptools = None
    if httptools is not None:
        class Collector:
            url = b""
            length = 0

            def on_url(self, url: bytes) -> None:
                self.url = url

            def on_header(self, name: bytes, value: bytes) -> None:
                if name.lower() == b"content-length":
                    self.length = int(value)

        def with_httptools() -> None:
            collector = Collector()
            parser = httptools.HttpRequestParser(collector)
            for _ in range(count):
                parser.feed_data(_PARSE_REQUEST)
                url = httptools.parse_url(collector.url)
                unquote(url.path.decode())
                parse_query(url.query.decode() if url.query else "")
                parser.get_method()
                parser.should_keep_alive()

        contenders["httptools (llhttp)"] = with_httptools
    results = {}
    for name, function in contenders.items():
        function()  # warm-up
        samples = []
        for _ in range(runs):
            started = time.perf_counter()
            function()
            samples.append((time.perf_counter() - started) / count * 1e9)
        results[name] = median(samples)
    return results


# --- main ------------------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per timed wrk run (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of wrk before the timed runs")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keys", type=int, default=1000, help="keys seeded for reads and written by PUTs")
    parser.add_argument("--value-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--serve-peer", choices=["aiohttp", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--peer-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--answers", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_peer:
        serve_peer(args.serve_peer, args.peer_port, args.answers)
        return 0
    if shutil.which("wrk") is None:
        print("kv_http.py needs wrk: apt-get install wrk", file=sys.stderr)
        return 2

    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="spina-bench-http-"))
    processes: list[subprocess.Popen[Any]] = []
    try:
        agent, base = start_agent(workdir)
        processes.append(agent)
        values = seed_agent(base, rng, args.keys, args.value_size)
        key = rng.choice(sorted(values))
        targets = {"kv_raw": f"/v1/kv/{key}?raw", "status_leader": "/v1/status/leader"}
        expected = {"kv_raw": values[key], "status_leader": orjson.dumps(agent_leader(base))}
        report: dict[str, Any] = {"machine": machine(), "connections": args.connections, "threads": args.threads,
                                  "duration_s": args.duration, "runs": args.runs, "value_bytes": args.value_size,
                                  "reads": {}}
        for name, path in targets.items():
            status, headers, body = fetch(base + path)
            via_aiohttp = fetch(base + path, headers=dict([VIA_AIOHTTP.split(": ")]))
            if body != expected[name] or via_aiohttp[2] != body or "aiohttp" in headers.get("Server", "") \
                    or "aiohttp" not in via_aiohttp[1].get("Server", ""):
                raise WrongAnswer(f"{path}: fast {body!r}, aiohttp {via_aiohttp[2]!r}, expected {expected[name]!r}")
            kept = {k: v for k, v in headers.items()
                    if k.lower() not in ("date", "server", "content-length", "connection")}
            peer_ports = free_ports(2, seed=args.seed + len(report["reads"]))
            peers = {kind: start_peer(kind, port, {path: (status, kept, body)}, workdir)
                     for kind, port in zip(("aiohttp", "raw"), peer_ports, strict=True)}
            processes.extend(peers.values())
            for kind, port in zip(("aiohttp", "raw"), peer_ports, strict=True):
                if fetch(f"http://127.0.0.1:{port}{path}")[2] != body:
                    raise WrongAnswer(f"peer {kind} answers other bytes on {path}")
            report["reads"][name] = {"path": path, **timed_together({
                "spina_fast": Target(base + path, agent.pid),
                "spina_via_aiohttp": Target(base + path, agent.pid, header=VIA_AIOHTTP),
                "aiohttp_peer": Target(f"http://127.0.0.1:{peer_ports[0]}{path}", peers["aiohttp"].pid),
                "raw_uvloop_peer": Target(f"http://127.0.0.1:{peer_ports[1]}{path}", peers["raw"].pid),
            }, args)}
            stop_processes(list(peers.values()))
        script = workdir / "put.lua"
        script.write_text(PUT_SCRIPT.format(size=args.value_size, keys=args.keys))
        report["writes"] = {"path": "/v1/kv/bench/put/<n>", **timed_together({
            "spina_fast": Target(base + "/", agent.pid, script=script),
            "spina_via_aiohttp": Target(base + "/", agent.pid, header=VIA_AIOHTTP, script=script)}, args)}
        for index in rng.sample(range(args.keys), min(50, args.keys)):
            if fetch(f"{base}/v1/kv/bench/put/{index}?raw")[2] != b"v" * args.value_size:
                raise WrongAnswer(f"bench/put/{index} does not hold the value written")
        report["parser_ns_per_request"] = bench_parsers(args.runs)
    finally:
        stop_processes(processes)
        shutil.rmtree(workdir, ignore_errors=True)

    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return 0
    print(f"machine: {report['machine']}; wrk -t{args.threads} -c{args.connections} -d{args.duration}s, "
          f"medians of {args.runs} runs, {args.value_size}-byte values")
    for result in report["reads"].values():
        print_table(f"GET {result['path']}", ["server", "req/s", "p50 ms", "p99 ms", "vs aiohttp peer",
                                              "server CPU µs/req"], [
            [label, result[kind]["requests_per_s"], f"{result[kind]['p50_ms']:.3f}", f"{result[kind]['p99_ms']:.3f}",
             f"{paired_ratio(result[kind], result['aiohttp_peer']):.2f}x",
             f"{result[kind]['cpu_us_per_request']:.1f}"]
            for label, kind in (("spina agent, fast path", "spina_fast"),
                                ("spina agent, aiohttp path", "spina_via_aiohttp"),
                                ("plain aiohttp + uvloop (peer)", "aiohttp_peer"),
                                ("raw uvloop protocol (ceiling)", "raw_uvloop_peer"))])
    writes = report["writes"]
    print_table(f"PUT {writes['path']} (single-node dev agent, Raft + fsync)",
                ["server", "req/s", "p50 ms", "p99 ms", "vs aiohttp path"], [
                    [label, writes[kind]["requests_per_s"], f"{writes[kind]['p50_ms']:.3f}",
                     f"{writes[kind]['p99_ms']:.3f}", f"{paired_ratio(writes[kind], writes['spina_via_aiohttp']):.2f}x"]
                    for label, kind in (("spina agent, fast path", "spina_fast"),
                                        ("spina agent, aiohttp path", "spina_via_aiohttp"))])
    parsers = report["parser_ns_per_request"]
    print_table("Request-head parsing alone (method, decoded path, query, keep-alive)", ["parser", "ns/request"],
                [[name, value] for name, value in parsers.items()])
    return 0


def agent_leader(base: str) -> str:
    leader: str = orjson.loads(fetch(base + "/v1/status/leader")[2])
    return leader


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
