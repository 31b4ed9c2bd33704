"""How many DNS A lookups per second does Spina answer, next to dnsmasq serving the same names, and does it
stay flat at 10,000 services / 100,000 instances?

Spina is a real ``spina agent --dev`` (Raft, HTTP and DNS in one process) holding S services x I IPv4
instances registered through its HTTP API; its UDP cache hits are answered by a native thread off the event loop
(``udp="thread"``). Beside it, two bare ``DNSServer`` processes (the registry built in-process, nothing else on
their loop): one with the same serving thread, so that agent / bare shows what the agent's other work costs DNS,
and one answering from the event loop (``udp="batch"``: ``recvmmsg`` / ``sendmmsg`` in the loop's reader
callback, the agent's previous path). dnsmasq (foreground, on another loopback port) serves the same names from a
hosts file, every name with the same I addresses, TTL 0 on both.
Before any timing every server is asked every name once with dnspython and must give the registered address
sets (a fast wrong answer scores zero); dnsperf's own per-rcode counts must show only NOERROR.

Each run, in alternating order: dnsperf at full load (``-c 4 -q 200``, as many queries as it can keep in
flight) against each server: qps, lost queries and the server's CPU time (user + system, from /proc) per answered
query; then at half of dnsmasq's median full-load qps, the same fixed rate for the agent, the bare threaded
server and dnsmasq, with per-query latencies (``-v``): p50 / p99. The scale check is a second agent
holding the same S x I registrations plus enough services of 10 instances to make 10,000 services (96,500
instances by default, as in discovery_http.py), asked the same lookups (the S names) at full load next to the
small one in the same run; and, for completeness, asked over all its 10,000 names (answers of 10 records
there, so more bytes per answer for both sides). Medians over runs; the machine's 2 cores are shared by
dnsperf, the server under test and whatever else runs, so quote the ratios.

    python benchmarks/dns.py [--json] [--runs 3] [--duration 10] [--services 500] [--instances 3]
                             [--scale-services 10000] [--scale-instances 10] [--no-scale] [--rate QPS]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

# This file is named dns.py: with its folder first on sys.path, "import dns" would find this script instead of
# dnspython. Import dnspython with the folder left out, then put the folder back for _common.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
import dns.exception  # noqa: E402
import dns.message  # noqa: E402
import dns.query  # noqa: E402

sys.path.insert(0, str(_HERE))
from _common import free_ports, machine, median, percentile, print_table  # noqa: E402

SEED = 53
DNSMASQ_VERSION = re.compile(r"Dnsmasq version (\S+)")


def service_name(number: int) -> str:
    return f"svc-{number:05d}"


def address(service: int, instance: int) -> str:
    # 10.<service / 250>.<service % 250>.<instance + 1>: unique per instance for up to 64,000 services.
    return f"10.{service // 250}.{service % 250}.{instance + 1}"


# --- the Spina server process --------------------------------------------------------------------------------

def serve(services: int, instances: int, udp: str) -> None:
    """Child process: build the registry, serve DNS on a free port, print ``ready <port>``, run until SIGTERM."""
    import uvloop

    from spina_fast._registry import RegistryStore
    from spina_fast.dns import DNSServer
    from spina_fast.runtime import tune_gc

    async def main() -> None:
        store = RegistryStore()
        index = 0
        for service in range(services):
            for instance in range(instances):
                index += 1
                store.register(index, service_name(service), f"{service_name(service)}-{instance}",
                               address(service, instance), 8000 + instance)
        tune_gc()
        # The registry does not change while it serves: the thread's cache needs no registry_changed calls.
        server = DNSServer(store, udp=udp)  # type: ignore[arg-type]
        bound = await server.start("127.0.0.1", 0)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print(f"ready {bound.port}", flush=True)
        await stop.wait()
        await server.close()
        print(f"stats {orjson.dumps(server.stats.rcodes()).decode()}", flush=True)

    uvloop.run(main())


def start_spina(services: int, instances: int, udp: str) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen([sys.executable, __file__, "--serve", str(services), str(instances), udp],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("ready "):
        process.kill()
        raise RuntimeError(f"spina DNS server did not start: {line!r}")
    return process, int(line.split()[1])


def start_dnsmasq(workdir: Path, services: int, instances: int) -> tuple[subprocess.Popen[bytes], int, str]:
    binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    if not Path(binary).exists():
        raise SystemExit("dnsmasq is not installed: apt-get install -y dnsmasq (or scripts/install-services.sh)")
    hosts = workdir / "hosts"
    hosts.write_text("".join(f"{address(service, instance)} {service_name(service)}.service.spina\n"
                             for service in range(services) for instance in range(instances)))
    version = DNSMASQ_VERSION.search(subprocess.run([binary, "--version"], capture_output=True, text=True).stdout)
    (port,) = free_ports(1, seed=SEED)
    # Foreground, no system resolv.conf or /etc/hosts, loopback only, never port 53; a cache large enough
    # to hold every hosts entry, and local-ttl 0 like Spina's default.
    process = subprocess.Popen([binary, "--keep-in-foreground", "--no-resolv", "--no-hosts", f"--addn-hosts={hosts}",
                                f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces", "--user=root",
                                "--pid-file=", "--cache-size=10000", "--local-ttl=0", "--log-facility=-"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, port, version.group(1) if version else "unknown"


def wait_answering(port: int, name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=0.5)
            return
        except (dns.exception.Timeout, OSError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no DNS answer on port {port} within {timeout} s") from None


def answers(port: int, names: list[str]) -> dict[str, list[str]]:
    found = {}
    for name in names:
        response = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=5)
        found[name] = sorted(rdata.to_text() for rrset in response.answer for rdata in rrset)
    return found


# --- dnsperf -----------------------------------------------------------------------------------------------

@dataclass
class Perf:
    qps: float
    sent: int
    lost: int
    not_noerror: int
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    cpu_us_per_query: float = float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its threads so far (fields 14 and 15 of /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dnsperf(port: int, queries: Path, duration: int, rate: int | None = None, pid: int | None = None) -> Perf:
    command = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-l", str(duration),
               "-c", "4", "-q", "200", "-t", "2"]
    if rate:
        command += ["-Q", str(rate), "-v"]
    cpu_before = cpu_seconds(pid) if pid is not None else 0.0
    output = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60).stdout
    cpu = cpu_seconds(pid) - cpu_before if pid is not None else float("nan")

    def number(label: str) -> float:
        found = re.search(rf"{label}:\s+([\d.]+)", output)
        if found is None:
            raise RuntimeError(f"dnsperf printed no {label!r}:\n{output[-2000:]}")
        return float(found.group(1))

    codes = dict(re.findall(r"(\w+) (\d+) \([\d.]+%\)", output.split("Response codes:", 1)[-1].split("\n", 1)[0]))
    perf = Perf(qps=number("Queries per second"), sent=int(number("Queries sent")), lost=int(number("Queries lost")),
                not_noerror=sum(int(count) for code, count in codes.items() if code != "NOERROR"))
    perf.cpu_us_per_query = cpu * 1e6 / max(1, perf.sent - perf.lost)
    if rate:
        # "> NOERROR name A 0.000123" per answered query ("> T name A" for a timeout, counted as lost).
        latencies = [float(seconds) * 1000 for seconds in re.findall(r"^> [A-Z]+ \S+ \S+ ([\d.]+)$", output, re.M)]
        perf.p50_ms, perf.p99_ms = percentile(latencies, 0.50), percentile(latencies, 0.99)
    return perf


# --- main --------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds per dnsperf run (default 10)")
    parser.add_argument("--services", type=int, default=500)
    parser.add_argument("--instances", type=int, default=3, help="instances per service")
    parser.add_argument("--scale-services", type=int, default=10000)
    parser.add_argument("--scale-instances", type=int, default=10, help="instances per service at scale")
    parser.add_argument("--no-scale", action="store_true", help="skip the 10,000-service check")
    parser.add_argument("--rate", type=int, help="the fixed rate of the latency phase (default: half of dnsmasq's "
                                                 "median full-load qps)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--serve", nargs=3, metavar=("SERVICES", "INSTANCES", "UDP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(int(args.serve[0]), int(args.serve[1]), args.serve[2])
        return
    if shutil.which("dnsperf") is None:
        raise SystemExit("dnsperf is not installed: apt-get install -y dnsperf (or scripts/install-services.sh)")
    rng = random.Random(SEED)
    processes: list[subprocess.Popen[str] | subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="spina-dns-bench-") as tmp:
        workdir = Path(tmp)
        try:
            report = run(args, workdir, rng, processes)
        finally:
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        print_report(report)


def instances_of(service: int, args: argparse.Namespace) -> int:
    """The instances of service number ``service``: the small registry's count for the first S services."""
    return args.instances if service < args.services else args.scale_instances


def start_agent(services: int, instances: Callable[[int], int]) -> tuple[subprocess.Popen[str], int]:
    """A real ``spina agent --dev`` (Raft, HTTP and DNS in one process), filled through its HTTP API."""
    process = subprocess.Popen(
        [sys.executable, "-m", "spina_fast", "agent", "--dev", "--http-addr", "127.0.0.1:0", "--raft-addr",
         "127.0.0.1:0", "--dns-addr", "127.0.0.1:0", "--log-level", "warning"], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    ready = re.match(r"spina agent ready http=(\S+) dns=\S+:(\d+)", process.stdout.readline())
    if ready is None:
        process.kill()
        raise RuntimeError("spina agent did not start")
    items = [{"service": service_name(service), "instance_id": f"{service_name(service)}-{instance}",
              "address": address(service, instance), "port": 8000 + instance, "ttl": "1h"}
             for service in range(services) for instance in range(instances(service))]
    for start in range(0, len(items), 2_000):
        request = urllib.request.Request(f"http://{ready.group(1)}/v1/spina/services/register",
                                         data=orjson.dumps(items[start:start + 2_000]), method="PUT")
        with urllib.request.urlopen(request, timeout=120) as response:
            if response.status != 200:
                raise RuntimeError(f"registration failed: {response.status}")
    return process, int(ready.group(2))


def run(args: argparse.Namespace, workdir: Path, rng: random.Random,
        processes: list[subprocess.Popen[str] | subprocess.Popen[bytes]]) -> dict[str, object]:
    names = [f"{service_name(service)}.service.spina" for service in range(args.services)]
    queries = workdir / "queries"
    order = names[:]
    rng.shuffle(order)
    queries.write_text("".join(f"{name} A\n" for name in order))
    spina, spina_port = start_agent(args.services, lambda service: args.instances)
    processes.append(spina)
    bare, bare_port = start_spina(args.services, args.instances, "thread")
    processes.append(bare)
    loop_served, loop_port = start_spina(args.services, args.instances, "batch")
    processes.append(loop_served)
    dnsmasq, dnsmasq_port, dnsmasq_version = start_dnsmasq(workdir, args.services, args.instances)
    processes.append(dnsmasq)
    servers = {"spina": (spina_port, queries, spina.pid), "spina_bare": (bare_port, queries, bare.pid),
               "spina_loop": (loop_port, queries, loop_served.pid), "dnsmasq": (dnsmasq_port, queries, dnsmasq.pid)}
    for port, _, _ in servers.values():
        wait_answering(port, names[0])
    expected = {name: sorted(address(service, instance) for instance in range(args.instances))
                for service, name in enumerate(names)}
    for label, (port, _, _) in servers.items():
        if answers(port, names) != expected:
            raise SystemExit(f"{label} answers differ from the registered addresses: its timings are worthless")

    scale_port = None
    scale_queries = workdir / "scale-queries"
    if not args.no_scale:
        scale_names = [f"{service_name(service)}.service.spina" for service in range(args.scale_services)]
        rng.shuffle(scale_names)
        scale_queries.write_text("".join(f"{name} A\n" for name in scale_names))
        scale, scale_port = start_agent(args.scale_services, lambda service: instances_of(service, args))
        processes.append(scale)
        servers["spina_scale"] = (scale_port, queries, scale.pid)
        servers["spina_scale_all"] = (scale_port, scale_queries, scale.pid)
        wait_answering(scale_port, scale_names[0])
        sample = rng.sample(range(args.scale_services), 200) + list(range(min(args.services, 100)))
        got = answers(scale_port, [f"{service_name(service)}.service.spina" for service in sample])
        if got != {f"{service_name(service)}.service.spina":
                   sorted(address(service, instance) for instance in range(instances_of(service, args)))
                   for service in sample}:
            raise SystemExit("the 10,000-service server answers wrongly: its timings are worthless")

    full: dict[str, list[Perf]] = {label: [] for label in servers}
    half: dict[str, list[Perf]] = {"spina": [], "spina_bare": [], "dnsmasq": []}
    # Warm-up: every name once through each server's cache.
    for port, file, _ in servers.values():
        dnsperf(port, file, 2)
    for number in range(args.runs):
        labels = list(servers)
        if number % 2:
            labels.reverse()
        for label in labels:
            port, file, pid = servers[label]
            full[label].append(dnsperf(port, file, args.duration, pid=pid))
    rate = args.rate or int(median([perf.qps for perf in full["dnsmasq"]]) / 2)
    for number in range(args.runs):
        labels = list(half)
        if number % 2:
            labels.reverse()
        for label in labels:
            port, file, pid = servers[label]
            half[label].append(dnsperf(port, file, min(args.duration, 5), rate=rate, pid=pid))
    for label, runs in [*full.items(), *half.items()]:
        if any(perf.not_noerror for perf in runs):
            raise SystemExit(f"{label}: dnsperf saw answers other than NOERROR: timings are worthless")

    def summary(runs: list[Perf]) -> dict[str, float]:
        return {"qps": median([perf.qps for perf in runs]), "lost": max((perf.lost for perf in runs), default=0),
                "lost_total": sum(perf.lost for perf in runs), "sent": sum(perf.sent for perf in runs),
                "p50_ms": median([perf.p50_ms for perf in runs]), "p99_ms": median([perf.p99_ms for perf in runs]),
                "cpu_us_per_query": median([perf.cpu_us_per_query for perf in runs])}

    result: dict[str, object] = {
        "machine": machine(), "dnsmasq_version": dnsmasq_version, "runs": args.runs, "duration_s": args.duration,
        "services": args.services, "instances_per_service": args.instances, "half_load_qps": rate,
        "full_load": {label: summary(runs) for label, runs in full.items() if runs},
        "half_load": {label: summary(runs) for label, runs in half.items()},
        "raw": {"full": {label: [asdict(perf) for perf in runs] for label, runs in full.items()},
                "half": {label: [asdict(perf) for perf in runs] for label, runs in half.items()}},
    }
    spina_qps = median([perf.qps for perf in full["spina"]])
    result["spina_over_dnsmasq_qps"] = spina_qps / median([perf.qps for perf in full["dnsmasq"]])
    # Per-run ratios (each pair measured minutes apart at most), then their median: steadier on a shared machine.
    result["spina_over_dnsmasq_qps_per_run"] = median(
        [ours.qps / peer.qps for ours, peer in zip(full["spina"], full["dnsmasq"], strict=True)])
    result["thread_over_loop_qps"] = (median([perf.qps for perf in full["spina_bare"]])
                                      / median([perf.qps for perf in full["spina_loop"]]))
    result["spina_over_bare_qps"] = spina_qps / median([perf.qps for perf in full["spina_bare"]])
    if full.get("spina_scale"):
        result["scale"] = {
            "services": args.scale_services,
            "instances": sum(instances_of(service, args) for service in range(args.scale_services)),
            "small_over_scale_qps": spina_qps / median([perf.qps for perf in full["spina_scale"]]),
            "small_over_scale_qps_per_run": median(
                [small.qps / large.qps for small, large in zip(full["spina"], full["spina_scale"], strict=True)]),
            "small_over_scale_all_names_qps": spina_qps / median([perf.qps for perf in full["spina_scale_all"]])}
    return result


def print_report(report: dict[str, object]) -> None:
    full = report["full_load"]
    half = report["half_load"]
    assert isinstance(full, dict) and isinstance(half, dict)
    rows: list[list[object]] = []
    for label, title in (("spina", "spina agent (native UDP thread)"), ("spina_bare", "bare DNSServer (thread)"),
                         ("spina_loop", "bare DNSServer (event loop, batch)"),
                         ("dnsmasq", f"dnsmasq {report['dnsmasq_version']}"),
                         ("spina_scale", "spina agent at scale, same lookups"),
                         ("spina_scale_all", "spina agent at scale, all 10k names")):
        if label not in full:
            continue
        row: list[object] = [title, round(full[label]["qps"]), full[label]["lost_total"],
                             round(full[label]["cpu_us_per_query"], 1)]
        if label in half:
            row += [half[label]["p50_ms"], half[label]["p99_ms"], half[label]["lost_total"],
                    round(half[label]["cpu_us_per_query"], 1)]
        else:
            row += ["", "", "", ""]
        rows.append(row)
    print_table(f"DNS A lookups, {report['services']} services x {report['instances_per_service']} instances, "
                f"dnsperf -c 4 -q 200, {report['duration_s']} s x {report['runs']} runs (medians); "
                f"fixed rate = {report['half_load_qps']:,} qps for each",
                ["server", "qps (full load)", "lost", "CPU us/query", "p50 ms (fixed)", "p99 ms (fixed)",
                 "lost (fixed)", "CPU us/query (fixed)"], rows)
    print(f"\nspina / dnsmasq qps: {report['spina_over_dnsmasq_qps']:.2f}x (median of per-run ratios "
          f"{report['spina_over_dnsmasq_qps_per_run']:.2f}x; target >= 0.9x, 0 lost, p99 <= 1 ms at half load)")
    print(f"agent / bare threaded server qps: {report['spina_over_bare_qps']:.2f}x; "
          f"bare: thread / event loop qps: {report['thread_over_loop_qps']:.2f}x")
    scale = report.get("scale")
    if isinstance(scale, dict):
        print(f"{report['services']} services / {scale['services']:,} services ({scale['instances']:,} instances), "
              f"same lookups, qps: {scale['small_over_scale_qps']:.2f}x (per-run median "
              f"{scale['small_over_scale_qps_per_run']:.2f}x; target <= 1.2x); over all names: "
              f"{scale['small_over_scale_all_names_qps']:.2f}x")
    print(f"machine: {report['machine']}")


if __name__ == "__main__":
    main()
