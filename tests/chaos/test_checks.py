"""The post-run checks must catch what they are there to catch: lost writes, two leaders, slow recovery."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from tests.chaos import faults
from tests.chaos.checks import (
    LostWrites,
    RunSummary,
    leaders_by_term,
    lost_acknowledged_writes,
    recovery_times,
    split_brain_terms,
)
from tests.chaos.faults import FAULTS, FaultRecord, Schedule
from tests.chaos.workload import WorkloadConfig, write_outcome
from tests.linearizability import CheckResult, Operation


def write(value: str, call: float, ret: float, outcome: str = "ok", key: str = "k") -> Operation:
    return Operation(0, key, "write", value, None, call, ret, outcome)


def cas(old: str | None, new: str, output: bool | None, call: float, ret: float, outcome: str = "ok") -> Operation:
    return Operation(0, "k", "cas", (old, new), output, call, ret, outcome)


def role_changed(role: str, term: int) -> dict[str, Any]:
    return {"msg": "raft role changed", "role": role, "leader": None, "term": term}


def test_two_leaders_in_one_term_are_reported() -> None:
    entries = [("n1", role_changed("leader", 2)), ("n2", role_changed("follower", 2)),
               ("n2", role_changed("leader", 3)), ("n3", role_changed("leader", 3)),
               ("n1", {"msg": "agent started"}), ("n1", role_changed("leader", 2))]
    leaders = leaders_by_term(entries)
    assert leaders == {2: {"n1"}, 3: {"n2", "n3"}}
    assert split_brain_terms(leaders) == {3: {"n2", "n3"}}


def test_write_overwritten_by_an_earlier_acknowledged_value_is_lost() -> None:
    history = [write("a", 0, 1), write("b", 2, 3)]
    result = lost_acknowledged_writes(history, {"k": "a"})
    assert [op.value for op in result.lost] == ["b"]


def test_concurrent_or_unknown_producers_do_not_make_a_write_lost() -> None:
    concurrent = [write("a", 0, 5), write("b", 2, 3)]
    unknown = [write("a", 0, 1, outcome="info"), write("b", 2, 3)]  # "a" may have committed after "b"
    assert lost_acknowledged_writes(concurrent, {"k": "a"}).lost == []
    assert lost_acknowledged_writes(unknown, {"k": "a"}).lost == []


def test_refused_cas_and_failed_writes_do_not_count_as_producers() -> None:
    history = [write("a", 0, 1), cas("a", "x", False, 2, 3), write("y", 4, 5, outcome="fail")]
    for final in ("x", "y"):
        assert lost_acknowledged_writes(history, {"k": final}).unknown_final == {"k": final}


def test_absent_key_after_acknowledged_writes_loses_them_all() -> None:
    history = [write("a", 0, 1), cas("a", "b", True, 2, 3), write("c", 4, 5, outcome="info")]
    result = lost_acknowledged_writes(history, {"k": None})
    assert [op.kind for op in result.lost] == ["write", "cas"]


def test_recovery_counts_from_injection_and_from_heal_to_the_first_successful_write() -> None:
    history = [write("a", 0.5, 0.6), write("b", 1.2, 4.0, outcome="info"), write("c", 1.5, 2.5),
               cas("c", "d", False, 3.0, 3.1), write("e", 3.5, 3.6)]
    fault = FaultRecord(["kill-leader"], ["kill -9 n1 (leader)"], injected=1.0, healed=3.0)
    from_injection, from_heal = recovery_times(history, [fault])
    assert from_injection == [pytest.approx(1.5)] and from_heal == [pytest.approx(0.6)]


def test_write_outcomes_follow_what_the_client_knows() -> None:
    assert write_outcome(None, sent=False) == "fail"  # never connected
    assert write_outcome(None, sent=True) == "info"  # timeout or lost connection
    assert write_outcome(503, sent=True) == "info"  # may have been proposed before the error
    assert write_outcome(400, sent=True) == "fail"
    assert write_outcome(200, sent=True) == "ok"


def summary(**changes: object) -> RunSummary:
    fields: dict[str, object] = dict(
        name="t", seed=1, nodes=3, fault_seconds=1.0, operations=Counter({"write ok": 1}),
        faults=Counter({"kill-leader": 1}), violations=[], checked_keys=1, lost=LostWrites(),
        leaders={2: {"n1"}}, converged=True, convergence_detail="1 keys equal on 3 nodes",
        recovery_from_injection=[1.0], recovery_from_heal=[0.5])
    fields.update(changes)
    return RunSummary(**fields)  # type: ignore[arg-type]


def test_summary_passes_only_when_every_check_is_clean() -> None:
    assert summary().passed
    failing = [summary(violations=[CheckResult(False, True, "k")]), summary(lost=LostWrites([write("a", 0, 1)])),
               summary(lost=LostWrites(unknown_final={"k": "?"})), summary(leaders={2: {"n1", "n2"}}),
               summary(leaders={}), summary(converged=False), summary(problems=["no recovery"])]
    assert not any(run.passed for run in failing)
    table = summary(violations=[CheckResult(False, True, "k")]).table()
    assert "1 of 1 keys (1 timed out)" in table and "median 1.00 s, max 1.00 s" in table


def test_schedule_and_workload_refuse_bad_settings() -> None:
    with pytest.raises(ValueError, match="unknown faults"):
        Schedule(fault_names=["kill-everything"])
    with pytest.raises(ValueError, match="at least one client"):
        WorkloadConfig(clients=0)
    assert {"kill-leader", "kill-follower", "pause-leader", "isolate-leader", "split", "bridge"} <= set(FAULTS)


def test_faults_needing_an_agent_flag_run_only_where_the_agent_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faults, "agent_help", lambda: "--peers ID=HOST:PORT,...")
    assert "snapshot-lagging-follower" not in faults.available_faults(include_optional=True)
    assert faults.agent_args_for(faults.available_faults(include_optional=True)) == ()
    monkeypatch.setattr(faults, "agent_help", lambda: "--peers ... --snapshot-entries N")
    assert "snapshot-lagging-follower" in faults.available_faults(include_optional=True)
    assert "--snapshot-entries" in faults.agent_args_for(["snapshot-lagging-follower"])
    # Faults after which partitions may stop being real stay out of the default (mixing) schedules.
    assert "snapshot-lagging-follower" not in faults.available_faults()
    assert faults.process_faults_only(["snapshot-lagging-follower", "kill-leader", "split"]) == ["kill-leader"]
