"""The Raft core under a simulated hostile network, crashes and restarts: safety after every step,
liveness once the faults stop. See simulation.py for what is checked and how a seed replays."""

from __future__ import annotations

import pytest

from tests.raft.simulation import Faults, SafetyViolation, SimNode, Simulation


def test_cluster_stays_safe_under_faults_and_recovers_after_healing(raft_seed: int) -> None:
    simulation = Simulation(raft_seed, fault_ticks=300)
    simulation.run()
    assert simulation.committed, f"seed {raft_seed}: nothing committed at all"


def test_same_seed_replays_the_same_history() -> None:
    first, second = Simulation(11, fault_ticks=150), Simulation(11, fault_ticks=150)
    first.run()
    second.run()
    assert first.events == second.events
    assert first.committed == second.committed
    assert [str(event) for event in first.trace] == [str(event) for event in second.trace]


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_fault_free_cluster_commits_every_proposal(seed: int) -> None:
    quiet = Faults(drop=0, duplicate=0, max_delay=1, crash=0, restart=0, partition=0, heal_partition=0,
                   crash_mid_persist=0, hold_ready=0, transfer=0, bounce=0, bounce_after_hard_state=0, pause=0,
                   compact=0, config_change=0)
    simulation = Simulation(seed, fault_ticks=100, faults=quiet)
    simulation.run()
    assert simulation.elections == 1 and simulation.events["truncate"] == 0
    assert simulation.events["propose"] > 30 and len(simulation.committed) > 30
    # Everything but the last few ticks' proposals (still in flight when run() returns) is everywhere.
    assert all(simulation.nodes[node_id].applied_index >= max(simulation.committed) - 15
               for node_id in simulation.initial_voters)


def test_faulty_runs_exercise_every_kind_of_fault() -> None:
    totals: dict[str, int] = {}
    for seed in range(20):
        simulation = Simulation(seed, fault_ticks=300)
        simulation.run()
        for event, count in simulation.events.items():
            totals[event] = totals.get(event, 0) + count
    for event in ("crash", "crash-mid", "bounce", "restart", "partition", "pause", "transfer", "truncate", "read",
                  "compact", "install", "config"):
        assert totals.get(event, 0) > 0, f"no {event} in 20 seeds: {totals}"


# The checker itself must be able to fail: feed it each kind of violation directly.

def test_checker_reports_two_nodes_applying_different_entries() -> None:
    simulation = Simulation(5, fault_ticks=0)
    first, second = simulation.nodes["n1"], simulation.nodes["n2"]
    simulation._apply(first, 1, 1, b"\x00x")
    with pytest.raises(SafetyViolation, match="state machine safety"):
        simulation._apply(second, 1, 1, b"\x00y")


def test_checker_reports_entries_that_break_log_matching() -> None:
    simulation = Simulation(5, fault_ticks=0)
    simulation._write_entries(simulation.nodes["n1"], [(1, 1, b"\x00x")])
    with pytest.raises(SafetyViolation, match="log matching"):
        simulation._write_entries(simulation.nodes["n2"], [(1, 1, b"\x00other")])


def test_checker_reports_a_stale_read() -> None:
    simulation = Simulation(5, fault_ticks=0)
    simulation.pending_reads[b"r"] = ("n1", 10)
    with pytest.raises(SafetyViolation, match="linearizability"):
        simulation._serve_read(simulation.nodes["n1"], b"r", 9)


def test_failure_message_names_the_seed_and_a_trace() -> None:
    simulation = Simulation(42, fault_ticks=20)
    simulation.run()
    text = simulation.describe()
    assert "seed=42" in text and "SPINA_RAFT_SEED=42" in text and "deliver" in text


def settled_leader(simulation: Simulation) -> SimNode:
    for _ in range(100):
        simulation._tick_round()
        leaders = [node for node in simulation.nodes.values() if node.core is not None and node.core.role == "leader"]
        if leaders and leaders[0].core is not None and leaders[0].core.commit_index > 0:
            return leaders[0]
    raise AssertionError("no leader")


def test_checker_reports_two_leaders_in_one_term() -> None:
    simulation = Simulation(5, fault_ticks=0)
    simulation.faulty = False
    leader = settled_leader(simulation)
    assert leader.core is not None
    simulation.leaders[leader.core.term] = "someone-else"
    with pytest.raises(SafetyViolation, match="election safety"):
        simulation._check_node(leader)


def test_checker_reports_a_leader_missing_a_committed_entry() -> None:
    simulation = Simulation(5, fault_ticks=0)
    simulation.faulty = False
    leader = settled_leader(simulation)
    assert leader.core is not None
    simulation.commit_terms[0] = 0  # as if index 1 had been committed before this leader's term
    simulation.committed[1] = (1, b"\x00not what the leader holds")
    with pytest.raises(SafetyViolation, match="leader completeness"):
        simulation._check_leader_completeness(leader)


def test_membership_changes_cover_add_promote_and_remove() -> None:
    totals: dict[str, int] = {}
    for seed in range(20):
        simulation = Simulation(seed, fault_ticks=300, faults=Faults(config_change=0.08))
        simulation.run()
        for event, count in simulation.events.items():
            totals[event] = totals.get(event, 0) + count
    for kind in ("add", "promote", "remove"):
        assert totals.get(f"config-{kind}", 0) > 0, totals


def test_checker_reports_a_snapshot_of_uncommitted_entries() -> None:
    simulation = Simulation(5, fault_ticks=0)
    simulation.faulty = False
    leader = settled_leader(simulation)
    follower = next(node for node in simulation.nodes.values() if node is not leader)
    assert follower.core is not None
    follower.received_snapshots[(10_000, 1)] = b"n1,n2,n3|"
    with pytest.raises(SafetyViolation, match="installs snapshot"):
        simulation._install_snapshot(follower, 10_000, 1)
