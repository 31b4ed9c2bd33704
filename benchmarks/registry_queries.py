"""How fast does the registry store answer each kind of query at 1k, 10k and 100k instances, next to the
plain-Python reference model holding the same data?

Both hold the same typical registrations (``sample_registrations``), every service with 10 instances so
that a query does the same work at every size and only the structures' scaling shows (the goal: the
store's p99 at 100k within 1.2x of its p99 at 1k), and a load reported for every instance. After building,
the process tunes its GC as ``spina agent`` does (``tune_gc``: freeze what was built, larger thresholds).

For each size and query kind, a seeded list of queries over random services; each run times every query
singly with ``perf_counter_ns`` after a warm-up pass, back to back, one peer's kinds after the other's, and
visits every size in turn (so a burst of other load on this shared machine lands on all sizes alike); p50
and p99 in microseconds, medians over runs. Beside every timing, after its loop, each answer is reduced to
a digest of its content, and every store digest must equal the reference's for the same query: a mismatch
aborts the run. The catalog (every service with its tags) is O(services): it is timed with fewer
queries and not expected to stay flat.

    python benchmarks/registry_queries.py [--json] [--runs 5] [--queries 2000] [--sizes 1000,10000,100000]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, percentile, print_table

from spina_fast._registry import RegistryStore
from spina_fast.registry.model import ZONES, describe, sample_registrations
from spina_fast.registry.reference import ReferenceRegistry
from spina_fast.runtime import tune_gc

Query = tuple[str, dict[str, Any]]          # (service or instance id, keyword arguments)
KINDS = ("all", "passing", "tags", "version", "api_version", "proximity", "load", "combined", "get",
         "service_index", "catalog")


class WrongAnswer(AssertionError):
    """The store answered a timed query differently from the reference: its timing is worthless."""


@dataclass
class Row:
    kind: str
    instances: int
    store_p50_us: float
    store_p99_us: float
    reference_p50_us: float
    reference_p99_us: float
    reference_over_store_p50: float
    store_p99_over_smallest: float


def call(registry: Any, kind: str, query: Query) -> Any:
    target, options = query
    if kind == "get":
        return registry.get(options["service"], target)
    if kind == "service_index":
        return registry.service_index(target)
    if kind == "catalog":
        return registry.services()
    return registry.instances(target, **options)


def digest(kind: str, answer: Any) -> int:
    """The content of an answer as one number (so nothing of the answer outlives the query)."""
    if kind in ("service_index", "catalog"):
        return hash(orjson.dumps(answer))
    if kind == "get":
        return hash(describe(answer)) if answer is not None else 0
    return hash(tuple(describe(view) for view in answer))


def make_queries(reference: ReferenceRegistry, kind: str, count: int, seed: int) -> list[Query]:
    rng = random.Random(f"{seed}-{kind}")
    services = sorted(reference.services())
    queries: list[Query] = []
    for _ in range(count):
        service = rng.choice(services)
        instances = reference.instances(service)
        zone, region = rng.choice(ZONES)
        if kind in ("all", "service_index", "catalog"):
            queries.append((service, {}))
        elif kind == "passing":
            queries.append((service, {"health": "passing"}))
        elif kind == "tags":   # two tags of a live instance, so the answer is not trivially empty
            queries.append((service, {"tags": rng.sample(rng.choice(instances).tags, 2)}))
        elif kind == "version":   # around a live instance's version, so the answer is not trivially empty
            major, minor = (int(part) for part in rng.choice(instances).version.split(".")[:2])
            queries.append((service, {"version": f">={major}.{minor},<{major + 1}"}))
        elif kind == "api_version":
            queries.append((service, {"api_version": rng.choice(["v1", "v2", "v3"])}))
        elif kind == "proximity":
            queries.append((service, {"near_zone": zone, "near_region": region}))
        elif kind == "load":
            queries.append((service, {"by_load": True}))
        elif kind == "combined":
            queries.append((service, {"health": "healthy", "tags": [rng.choice(rng.choice(instances).tags)],
                                      "near_zone": zone, "near_region": region, "by_load": True, "limit": 3}))
        else:
            queries.append((rng.choice(instances).instance_id, {"service": service}))
    return queries


def timed(registry: Any, kind: str, queries: list[Query]) -> tuple[list[float], list[int]]:
    """Latency of each query back to back, then the digest of each answer (checking in between would
    time the check's cache footprint too)."""
    samples, answers = [], []
    clock = time.perf_counter_ns
    for query in queries:
        started = clock()
        answer = call(registry, kind, query)
        samples.append((clock() - started) / 1000)
        answers.append(answer)
    return samples, [digest(kind, answer) for answer in answers]


def build(size: int, seed: int) -> tuple[RegistryStore, ReferenceRegistry]:
    store, reference = RegistryStore(), ReferenceRegistry()
    rng = random.Random(seed)
    registrations = list(sample_registrations(size, seed=seed, per_service=10))
    loads = [rng.randrange(registration.max_load + 50) for registration in registrations]
    # One peer after the other: interleaved, each one's memory would be scattered among the other's.
    for registry in (store, reference):
        for index, registration in enumerate(registrations, 1):
            registration.register_into(registry, index)
        for registration, load in zip(registrations, loads, strict=True):
            registry.report_load(registration.service, registration.instance_id, load)
    return store, reference


def measure(sizes: list[int], arguments: argparse.Namespace) -> dict[int, dict[str, dict[str, list[float]]]]:
    """Timings by size, kind and statistic, one value per run. Every run visits every size in turn, so a
    burst of other load on the machine spreads over all sizes instead of landing on one."""
    built = {size: build(size, arguments.seed) for size in sizes}
    tune_gc()
    queries = {(size, kind): make_queries(built[size][1], kind,
                                          max(5, arguments.queries // 100) if kind == "catalog" else arguments.queries,
                                          arguments.seed)
               for size in sizes for kind in KINDS}
    for (size, kind), batch in queries.items():           # warm-up
        for registry in built[size]:
            timed(registry, kind, batch[:200])
    results: dict[int, dict[str, dict[str, list[float]]]] = {
        size: {kind: {"store_p50": [], "store_p99": [], "reference_p50": [], "reference_p99": []}
                      for kind in KINDS} for size in sizes}
    for _ in range(arguments.runs):
        for size in sizes:
            store, reference = built[size]
            # One peer's kinds back to back, then the other's: neither runs on a cache the other just churned.
            timings = {(name, kind): timed(registry, kind, queries[size, kind])
                       for name, registry in (("store", store), ("reference", reference)) for kind in KINDS}
            for kind in KINDS:
                store_digests, reference_digests = timings["store", kind][1], timings["reference", kind][1]
                for position, (mine, theirs) in enumerate(zip(store_digests, reference_digests, strict=True)):
                    if mine != theirs:
                        query = queries[size, kind][position]
                        raise WrongAnswer(f"{kind} {query} at {size}: store {call(store, kind, query)!r} "
                                          f"!= reference {call(reference, kind, query)!r}")
                for name in ("store", "reference"):
                    samples = timings[name, kind][0]
                    results[size][kind][f"{name}_p50"].append(percentile(samples, 0.50))
                    results[size][kind][f"{name}_p99"].append(percentile(samples, 0.99))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--runs", type=int, default=5, help="timed passes over the queries (median)")
    parser.add_argument("--queries", type=int, default=2000, help="queries per kind and run")
    parser.add_argument("--sizes", default="1000,10000,100000", help="instance counts, comma-separated")
    parser.add_argument("--seed", type=int, default=1)
    arguments = parser.parse_args()
    sizes = [int(size) for size in arguments.sizes.split(",")]
    by_size = measure(sizes, arguments)
    rows = []
    for kind in KINDS:
        smallest_p99 = median(by_size[sizes[0]][kind]["store_p99"])
        for size in sizes:
            result = {name: median(values) for name, values in by_size[size][kind].items()}
            rows.append(Row(kind=kind, instances=size, store_p50_us=result["store_p50"],
                            store_p99_us=result["store_p99"], reference_p50_us=result["reference_p50"],
                            reference_p99_us=result["reference_p99"],
                            reference_over_store_p50=result["reference_p50"] / result["store_p50"],
                            store_p99_over_smallest=result["store_p99"] / smallest_p99))
    if arguments.json:
        print(orjson.dumps({"machine": machine(), "runs": arguments.runs, "queries": arguments.queries,
                            "seed": arguments.seed, "rows": [asdict(row) for row in rows]},
                           option=orjson.OPT_INDENT_2).decode())
        return
    print_table(
        f"Query latency in µs (median of {arguments.runs} runs of {arguments.queries} queries per kind; "
        f"10 instances per service; every answer checked against the reference)",
        ["query", "instances", "store p50", "store p99", "ref p50", "ref p99", "ref/store p50",
         f"p99 / p99@{sizes[0]:,}"],
        [[row.kind, row.instances, row.store_p50_us, row.store_p99_us, row.reference_p50_us, row.reference_p99_us,
          row.reference_over_store_p50, row.store_p99_over_smallest] for row in rows],
    )
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
