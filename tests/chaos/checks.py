"""The checks after a chaos run, and its summary table. Pure functions of what the run recorded."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.chaos.faults import FaultRecord
from tests.linearizability import CheckResult, Operation


def leaders_by_term(log_entries: Iterable[tuple[str, dict[str, Any]]]) -> dict[int, set[str]]:
    """Which nodes logged becoming leader in which term ("raft role changed", role leader)."""
    leaders: dict[int, set[str]] = defaultdict(set)
    for node_id, entry in log_entries:
        if entry.get("msg") == "raft role changed" and entry.get("role") == "leader":
            leaders[int(entry["term"])].add(node_id)
    return dict(leaders)


def split_brain_terms(leaders: dict[int, set[str]]) -> dict[int, set[str]]:
    """Terms with more than one leader: Raft's election safety says there are none."""
    return {term: nodes for term, nodes in leaders.items() if len(nodes) > 1}


def _writes(ops: list[Operation]) -> list[Operation]:
    """Operations that may have set a value: writes and CAS that did not definitely fail or get refused."""
    return [op for op in ops if op.outcome != "fail" and (op.kind == "write" or (op.kind == "cas" and op.output
                                                                                  is not False))]


def _written_value(op: Operation) -> Any:
    return op.value if op.kind == "write" else op.value[1]


@dataclass
class LostWrites:
    lost: list[Operation] = field(default_factory=list)  # acknowledged writes the final state lost
    unknown_final: dict[str, Any] = field(default_factory=dict)  # final values no write produced


def lost_acknowledged_writes(history: list[Operation], final: dict[str, Any]) -> LostWrites:
    """Acknowledged writes the final state contradicts, independently of the linearizability search.

    Values are unique, so the final value of a key names the operation that produced it. An acknowledged
    write W is lost if that producer was acknowledged before W was even invoked: then it precedes W in
    every linearization, and nothing after W can have written the producer's value again. A final value no
    operation wrote (or an absent key after an acknowledged write) is reported as well."""
    by_key: dict[str, list[Operation]] = defaultdict(list)
    for op in history:
        by_key[op.key].append(op)
    result = LostWrites()
    for key, value in final.items():
        candidates = _writes(by_key[key])
        acknowledged = [op for op in candidates if op.outcome == "ok"]
        if value is None:
            result.lost.extend(acknowledged)
            continue
        producers = [op for op in candidates if _written_value(op) == value]
        if not producers:
            result.unknown_final[key] = value
            continue
        producer = producers[0]
        # A producer whose outcome is unknown may have taken effect long after its client gave up.
        if producer.outcome == "ok":
            result.lost.extend(op for op in acknowledged if op is not producer and producer.ret < op.call)
    return result


def recovery_times(history: list[Operation], faults: list[FaultRecord]) -> tuple[list[float], list[float]]:
    """For every fault, seconds from injection and from heal to the first successful write invoked after it.

    A fault after which no write succeeded (the run ended) is left out: the run fails separately on that."""
    successes = sorted((op.call, op.ret) for op in history
                       if op.outcome == "ok" and (op.kind == "write" or (op.kind == "cas" and op.output)))
    from_injection, from_heal = [], []
    for fault in faults:
        after_injection = [ret for call, ret in successes if call >= fault.injected]
        after_heal = [ret for call, ret in successes if call >= fault.healed]
        if after_injection:
            from_injection.append(min(after_injection) - fault.injected)
        if after_heal:
            from_heal.append(min(after_heal) - fault.healed)
    return from_injection, from_heal


@dataclass
class RunSummary:
    name: str
    seed: int
    nodes: int
    fault_seconds: float
    operations: Counter[str]
    faults: Counter[str]
    violations: list[CheckResult]
    checked_keys: int
    lost: LostWrites
    leaders: dict[int, set[str]]
    converged: bool
    convergence_detail: str
    recovery_from_injection: list[float]
    recovery_from_heal: list[float]
    problems: list[str] = field(default_factory=list)
    # What the run could not do as planned without that being a failure of the cluster (shown, not failed).
    notes: list[str] = field(default_factory=list)

    @property
    def split_brain(self) -> dict[int, set[str]]:
        return split_brain_terms(self.leaders)

    @property
    def passed(self) -> bool:
        # No leader in the logs at all means the log check saw nothing, which must not pass as "no split brain".
        return (not self.violations and not self.lost.lost and not self.lost.unknown_final and bool(self.leaders)
                and not self.split_brain and self.converged and not self.problems)

    def table(self) -> str:
        def seconds(values: list[float]) -> str:
            if not values:
                return "-"
            return f"median {statistics.median(values):.2f} s, max {max(values):.2f} s (n={len(values)})"

        timed_out = sum(1 for result in self.violations if result.timed_out)
        rows = [
            ("run", f"{self.name}: {self.nodes} nodes, seed {self.seed}, {self.fault_seconds:.0f} s of faults"),
            ("operations", ", ".join(f"{kind} {count}" for kind, count in sorted(self.operations.items()))),
            ("faults", ", ".join(f"{name} {count}" for name, count in sorted(self.faults.items())) or "none"),
            ("linearizability violations", f"{len(self.violations)} of {self.checked_keys} keys"
                                           + (f" ({timed_out} timed out)" if timed_out else "")),
            ("lost acknowledged writes", str(len(self.lost.lost))),
            ("final values nobody wrote", str(len(self.lost.unknown_final))),
            ("terms with two leaders", f"{len(self.split_brain)} (of {len(self.leaders)} terms with a leader)"),
            ("converged after heal", f"{'yes' if self.converged else 'NO'} ({self.convergence_detail})"),
            ("recovery: fault -> first ok write", seconds(self.recovery_from_injection)),
            ("recovery: heal -> first ok write", seconds(self.recovery_from_heal)),
        ]
        rows.extend(("problem", problem) for problem in self.problems)
        rows.extend(("note", note) for note in self.notes)
        width = max(len(label) for label, _ in rows)
        return "\n".join(f"{label.ljust(width)} | {value}" for label, value in rows)
