"""How much does a running agent grow per registration once its Raft log has been compacted? (target < 1 KB)

A ``spina agent --dev`` with a low snapshot threshold, so the log is compacted behind the registrations,
takes N typical registrations (``sample_registrations``: 4 tags, 4 meta pairs, version, 2 API versions,
zone, region, weight, capacity) through the native batch API, then waits until a snapshot covers them.
The agent's RSS growth over that, divided by N, is everything the registrations cost in the process:
the compact store, the instance-id table, the string table, the Raft log left after compaction, and
allocator slack. Every registration is checked afterwards by a lookup of a sample.

    python benchmarks/agent_memory.py [--instances 100000] [--batch 500] [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, print_table, stop_processes
from kv_http import WrongAnswer, fetch

from spina_fast.registry.model import sample_registrations


def start_agent(workdir: Path) -> tuple[subprocess.Popen[str], str]:
    # A low snapshot threshold and no catch-up tail: the log is compacted right behind the registrations.
    process = subprocess.Popen(
        [sys.executable, "-m", "spina_fast", "agent", "--dev", "--http-addr", "127.0.0.1:0", "--raft-addr",
         "127.0.0.1:0", "--dns-addr", "127.0.0.1:0", "--log-level", "warning", "--snapshot-entries", "20",
         "--snapshot-catch-up", "0"], stdout=subprocess.PIPE, text=True, cwd=workdir)
    assert process.stdout is not None
    ready = re.match(r"spina agent ready http=(\S+)", process.stdout.readline())
    if ready is None:
        process.kill()
        raise RuntimeError("spina agent did not start")
    return process, f"http://{ready.group(1)}"


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) * 1024


def native(document: dict[str, Any]) -> dict[str, Any]:
    body = {key: value for key, value in document.items() if key not in ("check_ttl_ms", "deregister_after_ms")}
    body["ttl"], body["deregister_after"] = "1h", "2h"
    return body


def raft_status(base: str) -> dict[str, Any]:
    status: dict[str, Any] = orjson.loads(fetch(base + "/v1/spina/raft/status")[2])
    return status


def one_run(instances: int, batch: int, seed: int, workdir: Path) -> dict[str, float]:
    registrations = list(sample_registrations(instances, seed=seed, skewed=True))
    bodies = [orjson.dumps([native(item.document()) for item in registrations[start:start + batch]])
              for start in range(0, len(registrations), batch)]
    process, base = start_agent(workdir)
    try:
        time.sleep(2.0)  # self-registration, first snapshot, allocator warm-up
        before = rss_bytes(process.pid)
        for body in bodies:
            status, _, answer = fetch(base + "/v1/spina/services/register", "PUT", body)
            if status != 200:
                raise WrongAnswer(f"registration failed: {answer[:200]!r}")
        last = raft_status(base)["commit_index"]
        deadline = time.monotonic() + 60
        while (state := raft_status(base))["snapshot_index"] < last - 20:
            if time.monotonic() > deadline:
                raise WrongAnswer(f"no snapshot covered the registrations: {state}")
            time.sleep(0.2)
        time.sleep(1.0)
        after = rss_bytes(process.pid)
        for item in random.Random(seed).sample(registrations, 200):
            found = orjson.loads(fetch(f"{base}/v1/spina/services/{item.service}")[2])
            if not any(entry["instance_id"] == item.instance_id and entry["port"] == item.port for entry in found):
                raise WrongAnswer(f"{item.instance_id} is not answered after registration")
        return {"rss_growth_per_registration": (after - before) / instances, "log_entries": state["log_entries"],
                "log_bytes": state["log_bytes"], "snapshot_index": state["snapshot_index"]}
    finally:
        stop_processes([process])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs = []
    for number in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="spina-bench-memory-") as workdir:
            runs.append(one_run(args.instances, args.batch, args.seed + number, Path(workdir)))
    report = {"machine": machine(), "instances": args.instances, "runs": runs,
              "rss_growth_per_registration": median([run["rss_growth_per_registration"] for run in runs])}
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return 0
    print_table(f"agent RSS growth per registration after {args.instances:,} registrations and log compaction "
                f"(target < 1,024 bytes)", ["run", "bytes / registration", "log entries left", "log bytes left"],
                [[number + 1, run["rss_growth_per_registration"], run["log_entries"], run["log_bytes"]]
                 for number, run in enumerate(runs)])
    print(f"median: {report['rss_growth_per_registration']:,.0f} bytes per registration; machine: {machine()}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
