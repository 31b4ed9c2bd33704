"""Discovery lookups over HTTP: Spina's fast path beside a plain aiohttp handler returning the same bytes.

Same run, same machine: a ``spina agent --dev`` with 500 services x 3 instances registered (native batch
API, seeded), then wrk (-t1 -c32) cycling ``GET /v1/health/service/<name>?passing`` over every service name
(a Lua script) against (a) the agent's fast front end, (b) the agent's aiohttp application (same port,
requests with an ``X-Spina-*`` header go there), (c) a plain aiohttp + uvloop handler and (d) a raw uvloop
protocol, both peers answering exactly the bytes the agent answered for each path. Then the registry
grows to 10,000 services / 100,000 instances and the same lookups are timed again (scale check).

Every answer is checked before timing (the agent's fast and aiohttp answers equal, the peers' equal to them,
the instances the ones registered); wrk must report no errors and no non-2xx answers. The servers take turns
within each round (``--runs``) and ratios are medians of the per-round ratios, so that the load of a shared
machine weighs on all of them alike. Beside req/s and latency each server's CPU time per request is measured
(/proc/<pid>/stat): on a loaded machine req/s mostly says how often a process got a core, CPU µs per request
what answering costs.

    python benchmarks/discovery_http.py [--duration 5] [--runs 3] [--json]
Needs: wrk (Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_ports, machine, print_table, stop_processes
from kv_http import VIA_AIOHTTP, Target, WrongAnswer, fetch, paired_ratio, start_agent, start_peer, timed_together

CYCLE_SCRIPT = """
paths = {{{paths}}}
counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, paths[(counter % #paths) + 1]{header})
end
"""


def registrations(services: int, per_service: int, rng: random.Random, offset: int = 0) -> list[dict[str, Any]]:
    zones = ("eu-1a", "eu-1b", "us-1a")
    return [{"service": f"svc-{number:05d}", "instance_id": f"svc-{number:05d}-{replica}",
             "address": f"10.{(number >> 8) & 255}.{number & 255}.{replica + 1}", "port": rng.choice((80, 8080, 9090)),
             "version": f"1.{rng.randrange(10)}.{rng.randrange(10)}", "api_versions": ["v1", "v2"],
             "zone": zones[replica % 3], "region": zones[replica % 3][:2], "weight": 1, "max_load": 100,
             "tags": ["http", rng.choice(("blue", "green")), f"t{rng.randrange(20)}", "primary"],
             "meta": {"team": f"team-{rng.randrange(40)}", "git": f"{rng.getrandbits(32):08x}"},
             "ttl": "1h", "deregister_after": "2h"}
            for number in range(offset, offset + services) for replica in range(per_service)]


def register(base: str, items: list[dict[str, Any]], batch: int = 2_000) -> None:
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        status, _, body = fetch(f"{base}/v1/spina/services/register", "PUT", orjson.dumps(chunk))
        if status != 200 or orjson.loads(body)["registered"] != len(chunk):
            raise WrongAnswer(f"registering {len(chunk)} instances failed: {status} {body[:200]!r}")
    # Heartbeat every instance so that ?passing answers carry them all.
    for item in items:
        if fetch(f"{base}/v1/spina/services/heartbeat/{item['instance_id']}", "PUT")[0] != 200:
            raise WrongAnswer(f"heartbeat of {item['instance_id']} failed")


def lua_cycle(paths: list[str], header: str | None) -> str:
    quoted = ", ".join(f'"{path}"' for path in paths)
    extra = ""
    if header:
        name, value = header.split(": ", 1)
        extra = f', {{["{name}"] = "{value}"}}'
    return CYCLE_SCRIPT.format(paths=quoted, header=extra)


def capture(base: str, paths: list[str], expected: dict[str, list[str]]) -> dict[str, tuple[int, dict[str, str],
                                                                                               bytes]]:
    """The agent's answer per path, checked against the registration and the aiohttp path's answer."""
    answers = {}
    for path in paths:
        status, headers, body = fetch(base + path)
        via_aiohttp = fetch(base + path, headers=dict([VIA_AIOHTTP.split(": ")]))
        ids = [entry["Service"]["ID"] for entry in orjson.loads(body)]
        if status != 200 or via_aiohttp[2] != body or ids != expected[path]:
            raise WrongAnswer(f"{path}: {ids} (expected {expected[path]}), aiohttp path agrees: "
                              f"{via_aiohttp[2] == body}")
        kept = {k: v for k, v in headers.items() if k.lower() not in ("date", "server", "content-length",
                                                                     "connection", "x-consul-lastcontact")}
        answers[path] = (status, kept, body)
    return answers


def measure(base: str, paths: list[str], answers: dict[str, Any], args: argparse.Namespace, workdir: Path,
            with_peers: bool, agent_pid: int) -> dict[str, Any]:
    fast_script, slow_script = workdir / "cycle-fast.lua", workdir / "cycle-aiohttp.lua"
    fast_script.write_text(lua_cycle(paths, None))
    slow_script.write_text(lua_cycle(paths, VIA_AIOHTTP))
    targets = {"spina_fast": Target(base + "/", agent_pid, script=fast_script),
               "spina_via_aiohttp": Target(base + "/", agent_pid, script=slow_script)}
    if not with_peers:
        return timed_together(targets, args)
    ports = free_ports(2, seed=args.seed)
    peers = {kind: start_peer(kind, port, answers, workdir)
             for kind, port in zip(("aiohttp", "raw"), ports, strict=True)}
    try:
        for path in paths[:20]:
            if fetch(f"http://127.0.0.1:{ports[0]}{path}")[2] != answers[path][2]:
                raise WrongAnswer(f"the aiohttp peer answers other bytes on {path}")
        targets["aiohttp_peer"] = Target(f"http://127.0.0.1:{ports[0]}/", peers["aiohttp"].pid, script=fast_script)
        targets["raw_uvloop_peer"] = Target(f"http://127.0.0.1:{ports[1]}/", peers["raw"].pid, script=fast_script)
        return timed_together(targets, args)
    finally:
        stop_processes(list(peers.values()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per timed wrk run (default 5)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--services", type=int, default=500)
    parser.add_argument("--scale-services", type=int, default=10_000, help="services for the scale check")
    parser.add_argument("--per-service", type=int, default=3)
    parser.add_argument("--scale-per-service", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("discovery_http.py needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="spina-bench-discovery-"))
    processes: list[subprocess.Popen[Any]] = []
    try:
        agent, base = start_agent(workdir)
        processes.append(agent)
        items = registrations(args.services, args.per_service, rng)
        register(base, items)
        paths = [f"/v1/health/service/svc-{number:05d}?passing" for number in range(args.services)]
        expected = {path: [f"svc-{number:05d}-{replica}" for replica in range(args.per_service)]
                    for number, path in enumerate(paths)}
        answers = capture(base, paths, expected)
        report: dict[str, Any] = {
            "machine": machine(), "connections": args.connections, "duration_s": args.duration, "runs": args.runs,
            "instances": len(items), "services": args.services,
            "small": measure(base, paths, answers, args, workdir, with_peers=True, agent_pid=agent.pid)}
        # Scale: grow the registry around the same services (10x more instances each for the new ones).
        extra = registrations(args.scale_services - args.services, args.scale_per_service, rng, offset=args.services)
        register(base, extra)
        capture(base, paths, expected)
        report["scale"] = {"instances": len(items) + len(extra), "services": args.scale_services,
                           **measure(base, paths, answers, args, workdir, with_peers=False, agent_pid=agent.pid)}
    finally:
        stop_processes(processes)
        shutil.rmtree(workdir, ignore_errors=True)

    small, scale = report["small"], report["scale"]
    report["ratio_vs_aiohttp"] = paired_ratio(small["spina_fast"], small["aiohttp_peer"])
    report["cpu_ratio_vs_aiohttp"] = (small["aiohttp_peer"]["cpu_us_per_request"]
                                      / small["spina_fast"]["cpu_us_per_request"])
    report["scale_p99_ratio"] = scale["spina_fast"]["p99_ms"] / small["spina_fast"]["p99_ms"]
    report["scale_throughput_ratio"] = small["spina_fast"]["requests_per_s"] / scale["spina_fast"]["requests_per_s"]
    report["scale_cpu_ratio"] = scale["spina_fast"]["cpu_us_per_request"] / small["spina_fast"]["cpu_us_per_request"]
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return 0
    print(f"machine: {report['machine']}; wrk -t{args.threads} -c{args.connections} -d{args.duration}s, medians of "
          f"{args.runs} runs; GET /v1/health/service/<name>?passing cycling over {args.services} services")
    rows = [[label, small[kind]["requests_per_s"], f"{small[kind]['p50_ms']:.3f}", f"{small[kind]['p99_ms']:.3f}",
             f"{paired_ratio(small[kind], small['aiohttp_peer']):.2f}x", f"{small[kind]['cpu_us_per_request']:.1f}"]
            for label, kind in (("spina agent, fast path", "spina_fast"),
                                ("spina agent, aiohttp path", "spina_via_aiohttp"),
                                ("plain aiohttp + uvloop (peer)", "aiohttp_peer"),
                                ("raw uvloop protocol (ceiling)", "raw_uvloop_peer"))]
    print_table(f"{report['instances']:,} instances in {args.services} services",
                ["server", "req/s", "p50 ms", "p99 ms", "vs aiohttp peer", "server CPU µs/req"], rows)
    print_table(f"scale: {scale['instances']:,} instances in {args.scale_services:,} services (same lookups)",
                ["server", "req/s", "p50 ms", "p99 ms", "vs small registry", "server CPU µs/req"],
                [[label, scale[kind]["requests_per_s"], f"{scale[kind]['p50_ms']:.3f}",
                  f"{scale[kind]['p99_ms']:.3f}",
                  f"{scale[kind]['requests_per_s'] / small[kind]['requests_per_s']:.2f}x",
                  f"{scale[kind]['cpu_us_per_request']:.1f}"]
                 for label, kind in (("spina agent, fast path", "spina_fast"),
                                     ("spina agent, aiohttp path", "spina_via_aiohttp"))])
    print(f"\nfast path vs aiohttp peer: {report['ratio_vs_aiohttp']:.2f}x req/s, "
          f"{report['cpu_ratio_vs_aiohttp']:.2f}x less CPU per request; scale vs small registry: "
          f"{report['scale_throughput_ratio']:.2f}x fewer req/s, {report['scale_p99_ratio']:.2f}x p99, "
          f"{report['scale_cpu_ratio']:.2f}x CPU per request")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
