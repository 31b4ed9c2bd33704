"""One chaos run: start a cluster behind the relay, run the workload, inject faults, heal, check, summarize."""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.chaos.checks import (
    RunSummary,
    leaders_by_term,
    lost_acknowledged_writes,
    recovery_times,
)
from tests.chaos.cluster import ChaosCluster, ClusterUnhealthy, make_chaos_cluster
from tests.chaos.faults import FaultRecord, Schedule, agent_args_for, process_faults_only, run_step, uses_network
from tests.chaos.workload import KEY_PREFIX, Workload, WorkloadConfig
from tests.linearizability import Operation, check_keys

# Every summary of this session, printed together at its end (see conftest.py).
SUMMARIES: list[RunSummary] = []


def chaos_seed() -> int:
    """SPINA_CHAOS_SEED replays a run; otherwise a fresh seed (printed in the summary and on failure)."""
    text = os.environ.get("SPINA_CHAOS_SEED", "")
    if text and not text.isdigit():
        raise ValueError(f"SPINA_CHAOS_SEED={text!r} is not a non-negative integer")
    return int(text) if text else random.randrange(1 << 31)


def chaos_minutes() -> float | None:
    """SPINA_CHAOS_MINUTES: how long each mixed run injects faults (None: the short CI default)."""
    text = os.environ.get("SPINA_CHAOS_MINUTES", "")
    if not text:
        return None
    try:
        minutes = float(text)
    except ValueError:
        raise ValueError(f"SPINA_CHAOS_MINUTES={text!r} is not a number of minutes") from None
    if minutes <= 0:
        raise ValueError(f"SPINA_CHAOS_MINUTES={text!r} must be positive")
    return minutes


@dataclass(frozen=True)
class ChaosRun:
    name: str
    nodes: int
    schedule: Schedule
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    # Generous: a 2-core CI machine shared with other jobs can take many seconds to restart a node.
    health_timeout: float = 90.0
    recovery_timeout: float = 90.0
    # Each key's linearizability search is bounded; running out counts as a violation, never as a pass.
    check_steps: int = 2_000_000
    check_seconds: float = 60.0


def _converged_state(cluster: ChaosCluster) -> tuple[bool, str]:
    """Whether every node's local (stale) view of the workload's keys is the same, plus the raft status
    digests (applied index, state hash) where the agent serves ``/v1/spina/raft/status``."""
    views = {node_id: cluster.get_json(node_id, f"/v1/kv/{KEY_PREFIX}?recurse&stale", timeout=5)
             for node_id in cluster.ids}
    if any(view is None for view in views.values()):
        return False, f"no KV answer from {sorted(node for node, view in views.items() if view is None)}"
    distinct = {json.dumps(view, sort_keys=True) for view in views.values()}
    if len(distinct) != 1:
        sizes = {node_id: len(view) for node_id, view in views.items()}
        return False, f"KV views differ between nodes (entries per node: {sizes})"
    digests = {node_id: _raft_digest(cluster, node_id) for node_id in cluster.ids}
    if all(digest is None for digest in digests.values()):
        return True, f"{len(next(iter(views.values())))} keys equal on {len(views)} nodes"
    if len({json.dumps(digest, sort_keys=True) for digest in digests.values()}) != 1:
        return False, f"raft status differs: {digests}"
    return True, f"{len(next(iter(views.values())))} keys and raft status {next(iter(digests.values()))} " \
                 f"equal on {len(views)} nodes"


def _raft_digest(cluster: ChaosCluster, node_id: str) -> dict[str, Any] | None:
    """The applied-index and state-hash fields of the node's raft status, if the agent serves one."""
    status = cluster.get_json(node_id, "/v1/spina/raft/status?hash", timeout=5)
    if not isinstance(status, dict):
        return None
    return {name: value for name, value in status.items()
            if "applied" in name.lower() or "hash" in name.lower()}


def _wait_converged(cluster: ChaosCluster, timeout: float) -> tuple[bool, str]:
    deadline = time.monotonic() + timeout
    converged, detail = _converged_state(cluster)
    while not converged and time.monotonic() < deadline:
        time.sleep(0.2)
        converged, detail = _converged_state(cluster)
    return converged, detail


def _run_faults(run: ChaosRun, cluster: ChaosCluster, workload: Workload, rng: random.Random,
                records: list[FaultRecord], notes: list[str]) -> None:
    schedule = run.schedule
    partitions_real = True

    def step(names: list[str]) -> None:
        nonlocal partitions_real
        if partitions_real and uses_network(names):
            bypassed = cluster.bypassed_relay()
            if bypassed:
                partitions_real = False
                notes.append(f"partitions stopped after step {len(records)}, they would not be real: "
                             f"{'; '.join(bypassed)}")
        if not partitions_real:
            names = process_faults_only(names)
            if not names:
                return
        record = run_step(cluster, rng, names, workload.now, run.health_timeout)
        records.append(record)
        if not workload.wait_ok_write(record.healed, run.recovery_timeout):
            raise ClusterUnhealthy(f"no write succeeded within {run.recovery_timeout:g}s after healing "
                                   f"{'; '.join(record.descriptions)}")

    for names in schedule.steps(rng):
        step(names)
    mixed_until = time.monotonic() + schedule.mixed_seconds
    draws = 0
    while time.monotonic() < mixed_until and len(records) < schedule.max_steps and draws < 100 * schedule.max_steps:
        draws += 1
        step(schedule.mixed_step(rng))


def run_chaos(run: ChaosRun, base_dir: Path, seed: int) -> RunSummary:
    rng = random.Random(seed)
    cluster = make_chaos_cluster(run.nodes, base_dir, *agent_args_for(run.schedule.fault_names))
    records: list[FaultRecord] = []
    problems: list[str] = []
    notes: list[str] = []
    final: dict[str, Any] = {}
    converged, convergence_detail = False, "not reached"
    workload: Workload | None = None
    fault_seconds = 0.0
    try:
        cluster.start_all()
        cluster.wait_healthy(run.health_timeout)
        workload = Workload(cluster, run.workload, seed, time.monotonic())
        # The workload's own bound: far beyond the schedule, so stop() is what normally ends it.
        workload.start(max_seconds=run.schedule.mixed_seconds + 60 * len(run.schedule.fault_names) + 600)
        fault_start = time.monotonic()
        try:
            _run_faults(run, cluster, workload, rng, records, notes)
        except ClusterUnhealthy as exc:
            problems.append(f"during faults: {exc}")
        fault_seconds = time.monotonic() - fault_start
        cluster.restore_all()
        leader = cluster.wait_healthy(run.health_timeout)
        # The history ends with the healed cluster serving writes again.
        if not workload.wait_ok_write(workload.now(), run.recovery_timeout):
            problems.append(f"no write succeeded within {run.recovery_timeout:g}s after the final heal")
        workload.stop()
        final = workload.final_reads(leader)
        converged, convergence_detail = _wait_converged(cluster, run.health_timeout)
    except (ClusterUnhealthy, RuntimeError) as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        try:
            if workload is not None:
                workload.stop()
            relay_stats = cluster.relay.stats() if cluster.relay is not None else {}
        finally:
            # Whatever failed above, no process of this run outlives it.
            cluster.shutdown()
    logs = cluster.log_tail()
    log_entries = cluster.log_entries()
    history = workload.history if workload is not None else []
    results = check_keys(history, None, run.check_steps, run.check_seconds)
    violations = [result for result in results if not result.ok]
    lost = lost_acknowledged_writes(history, final)
    from_injection, from_heal = recovery_times(history, records)
    summary = RunSummary(
        name=run.name, seed=seed, nodes=run.nodes, fault_seconds=fault_seconds,
        operations=workload.counts() if workload is not None else Counter(),
        faults=Counter(name for record in records for name in record.names),
        violations=violations, checked_keys=len(results), lost=lost,
        leaders=leaders_by_term(log_entries), converged=converged,
        convergence_detail=convergence_detail, recovery_from_injection=from_injection,
        recovery_from_heal=from_heal, problems=problems, notes=notes,
    )
    _write_artifacts(base_dir, summary, history, records, logs, relay_stats)
    SUMMARIES.append(summary)
    print(summary.table())
    return summary


def _write_artifacts(base_dir: Path, summary: RunSummary, history: list[Operation], records: list[FaultRecord],
                     logs: str, relay_stats: dict[str, dict[str, int]]) -> None:
    """What a failed run needs for a reproduction, beside the nodes' data dirs."""
    out = base_dir / "chaos-artifacts"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.txt").write_text(summary.table() + "\n")
    with (out / "history.jsonl").open("w") as file:
        for op in history:
            file.write(json.dumps(vars(op), default=str) + "\n")
    (out / "faults.json").write_text(json.dumps([vars(record) for record in records], indent=1))
    (out / "node-logs.txt").write_text(logs + "\n")
    (out / "relay-stats.json").write_text(json.dumps(relay_stats, indent=1))


def failure_report(summary: RunSummary, base_dir: Path, history_lines: int = 60) -> str:
    """The summary, each problem, and for the first violating key its operations in invocation order."""
    parts = [f"chaos run failed; replay with SPINA_CHAOS_SEED={summary.seed}", summary.table(),
             f"artifacts (history, fault schedule, node logs, relay stats): {base_dir / 'chaos-artifacts'}"]
    if summary.violations:
        key = summary.violations[0].key
        lines = (base_dir / "chaos-artifacts" / "history.jsonl").read_text().splitlines()
        ops = sorted((op for op in map(json.loads, lines) if op["key"] == key), key=lambda op: op["call"])
        parts.append(f"history of {key} ({len(ops)} operations, the first {history_lines}):")
        parts.extend(json.dumps(op) for op in ops[:history_lines])
    if summary.lost.lost:
        parts.append("lost acknowledged writes: " + "; ".join(str(op) for op in summary.lost.lost[:10]))
    if summary.lost.unknown_final:
        parts.append(f"final values nobody wrote: {summary.lost.unknown_final}")
    if summary.split_brain:
        parts.append(f"terms with two leaders: {summary.split_brain}")
    return "\n".join(parts)
