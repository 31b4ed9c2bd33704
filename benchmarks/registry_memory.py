"""How many bytes does one registration take in the compact registry store, next to plain Python dicts?

Typical registrations (``sample_registrations``: 4 tags of ~50, 4 meta pairs with keys of 10 and values of
200, a version, 2 API versions, 3 zones in 2 regions, weight and capacity, pod-like ids, 1 in 10 on IPv6),
over size/10 services of uneven size, seeded. Each (peer, size, run) is built in a fresh child process from
JSON bodies (written by the parent, so the child frees nothing big before it measures), decoded one by one
as the HTTP layer will receive them, and measured twice:

- traced: tracemalloc's traced bytes after ``gc.collect()``, minus before. The store allocates its C
  buffers with PyMem, so this is every byte it holds; ``memory_bytes()`` gives the C part of it.
- RSS: the resident set's growth over a build run without tracemalloc (whose bookkeeping would show up in
  RSS), after a small warm-up build and ``gc.collect()``. Coarse at 1k (pages, allocator arenas).

The peer in the same run holds the same decoded bodies as dicts: ``catalog[service][instance_id] = body``
plus status, load and modify index. After every build, 300 sampled registrations are read back from the
structure and compared with what was registered: a wrong answer aborts the run.

    python benchmarks/registry_memory.py [--json] [--runs 3] [--sizes 1000,10000,100000] [--seed 1]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import subprocess
import sys
import tempfile
import tracemalloc
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, print_table

from spina_fast._registry import RegistryStore, pack_address
from spina_fast.registry.model import Registration, sample_registrations

PEERS = ("store", "dicts")
CHECKED = 300


class WrongAnswer(AssertionError):
    """A structure did not give back what was registered: its size is worthless."""


@dataclass
class Row:
    instances: int
    services: int
    store_traced_bytes: float
    store_c_bytes: float
    store_rss_bytes: float
    dicts_traced_bytes: float
    dicts_rss_bytes: float
    dicts_over_store: float


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(peer: str, bodies: list[bytes]) -> Any:
    if peer == "store":
        store = RegistryStore()
        for index, body in enumerate(bodies, 1):
            document = orjson.loads(body)
            store.register(index, document.pop("service"), document.pop("instance_id"), document.pop("address"),
                           document.pop("port"), **document)
        return store
    catalog: dict[str, dict[str, dict[str, Any]]] = {}
    for index, body in enumerate(bodies, 1):
        document = orjson.loads(body)
        document["load"] = 0
        document["modify_index"] = index
        catalog.setdefault(document["service"], {})[document["instance_id"]] = document
    return catalog


def check(peer: str, held: Any, sample: list[Registration]) -> None:
    for registration in sample:
        if peer == "dicts":
            document = held[registration.service][registration.instance_id]
            expected = orjson.loads(orjson.dumps(registration.document()))
            if {key: document[key] for key in expected} != expected:
                raise WrongAnswer(f"dicts: {registration.instance_id} reads back as {document}")
            continue
        view = held.get(registration.service, registration.instance_id)
        answer = None if view is None else (
            view.packed_address, view.version, view.api_versions, view.weight, view.max_load, view.zone,
            view.region, view.tags, view.meta, view.status)
        expected = (pack_address(registration.address, registration.port), registration.version,
                    tuple(sorted(set(registration.api_versions))), registration.weight, registration.max_load,
                    registration.zone, registration.region, tuple(dict.fromkeys(registration.tags)),
                    dict(registration.meta), registration.status)
        if answer != expected:
            raise WrongAnswer(f"store: {registration.instance_id} reads back as {answer}, not {expected}")


def write_bodies(path: Path, size: int, seed: int) -> int:
    """The JSON body of every registration, one a line; returns the number of services."""
    services = set()
    with path.open("wb") as out:
        for registration in sample_registrations(size, seed=seed, skewed=True):
            out.write(orjson.dumps(registration.document()) + b"\n")
            services.add(registration.service)
    return len(services)


def measure(peer: str, path: Path, seed: int) -> dict[str, float]:
    """One child's measurement (run in a fresh process, so earlier builds leave nothing behind)."""
    bodies = path.read_bytes().splitlines()
    size = len(bodies)
    sample = [Registration(**{**document, "api_versions": tuple(document["api_versions"]),
                              "tags": tuple(document["tags"])})
              for document in map(orjson.loads, random.Random(seed).sample(bodies, min(CHECKED, size)))]
    build(peer, bodies[:100])                     # warm-up: first-use allocations, caches
    gc.collect()
    before = resident_bytes()
    held = build(peer, bodies)
    gc.collect()
    rss = resident_bytes() - before
    check(peer, held, sample)
    del held
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        held = build(peer, bodies)
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    check(peer, held, sample)
    c_bytes = held.memory_bytes() if peer == "store" else 0
    return {"traced": traced / size, "rss": rss / size, "c": c_bytes / size}


def run_child(peer: str, path: Path, seed: int) -> dict[str, float]:
    output = subprocess.run([sys.executable, __file__, "--child", peer, str(path), str(seed)], check=True,
                            capture_output=True)
    return orjson.loads(output.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--runs", type=int, default=3, help="fresh-process builds per peer and size (median)")
    parser.add_argument("--sizes", default="1000,10000,100000", help="instance counts, comma-separated")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--child", nargs=3, metavar=("PEER", "BODIES", "SEED"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        peer, path, seed = arguments.child
        sys.stdout.buffer.write(orjson.dumps(measure(peer, Path(path), int(seed))))
        return
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="registry-memory-"))
    for size in (int(size) for size in arguments.sizes.split(",")):
        results: dict[str, list[dict[str, float]]] = {peer: [] for peer in PEERS}
        for run in range(arguments.runs):
            path = scratch / f"bodies-{size}-{run}.jsonl"
            services = write_bodies(path, size, arguments.seed + run)
            for peer in PEERS:
                results[peer].append(run_child(peer, path, arguments.seed + run))
            path.unlink()

        def middle(peer: str, key: str, results: dict[str, list[dict[str, float]]] = results) -> float:
            return median([result[key] for result in results[peer]])

        rows.append(Row(
            instances=size, services=services,
            store_traced_bytes=middle("store", "traced"), store_c_bytes=middle("store", "c"),
            store_rss_bytes=middle("store", "rss"), dicts_traced_bytes=middle("dicts", "traced"),
            dicts_rss_bytes=middle("dicts", "rss"),
            dicts_over_store=middle("dicts", "traced") / middle("store", "traced"),
        ))
    scratch.rmdir()
    if arguments.json:
        print(orjson.dumps({"machine": machine(), "runs": arguments.runs, "seed": arguments.seed,
                            "rows": [asdict(row) for row in rows]}, option=orjson.OPT_INDENT_2).decode())
        return
    print_table(
        f"Bytes per registration (median of {arguments.runs} fresh processes; store C buffers are part of traced)",
        ["instances", "services", "store traced", "of which C", "store RSS", "dicts traced", "dicts RSS",
         "dicts/store"],
        [[row.instances, row.services, row.store_traced_bytes, row.store_c_bytes, row.store_rss_bytes,
          row.dicts_traced_bytes, row.dicts_rss_bytes, row.dicts_over_store] for row in rows],
    )
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
