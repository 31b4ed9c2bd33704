"""RaftCore, one rule at a time: hand-built message sequences against a few cores."""

from __future__ import annotations

import pytest

from spina_fast import _raft
from spina_fast._raft import (
    ENTRY_CONFIG,
    ENTRY_NOOP,
    ENTRY_NORMAL,
    MSG_APPEND,
    MSG_APPEND_RESPONSE,
    MSG_HEARTBEAT,
    MSG_HEARTBEAT_RESPONSE,
    MSG_PRE_VOTE,
    MSG_PRE_VOTE_RESPONSE,
    MSG_READ_INDEX,
    MSG_READ_INDEX_RESPONSE,
    MSG_SNAPSHOT,
    MSG_SNAPSHOT_RESPONSE,
    MSG_TIMEOUT_NOW,
    MSG_VOTE,
    MSG_VOTE_RESPONSE,
    ConfigChangePending,
    Message,
    NotLeader,
    RaftCore,
    Ready,
    entry_kind,
)

VOTERS = ["a", "b", "c"]


def take(core: RaftCore) -> Ready:
    """One Ready, acknowledged at once (as a driver with an instant disk would)."""
    ready = core.ready()
    core.advance(ready)
    return ready


def sent(core: RaftCore) -> list[Message]:
    """Every message the core wants sent, draining its Ready queue."""
    messages: list[Message] = []
    while core.has_ready():
        messages.extend(take(core).messages)
    return messages


class Net:
    """Cores wired together with instant, lossless delivery; ``cut`` nodes are unreachable."""

    def __init__(self, voters: list[str] = VOTERS, **options: object) -> None:
        self.cores = {node_id: RaftCore(node_id, voters, seed=7, **options) for node_id in voters}  # type: ignore[arg-type]
        self.cut: set[str] = set()
        self.read_states: dict[str, list[tuple[bytes, int]]] = {node_id: [] for node_id in voters}
        self.applied: dict[str, list[tuple[int, int, bytes]]] = {node_id: [] for node_id in voters}

    def settle(self, limit: int = 10_000) -> None:
        for _ in range(limit):
            moved = False
            for node_id, core in self.cores.items():
                while core.has_ready():
                    moved = True
                    ready = take(core)
                    self.read_states[node_id].extend(ready.read_states)
                    self.applied[node_id].extend(ready.committed)
                    for msg in ready.messages:
                        if msg.src not in self.cut and msg.dst not in self.cut:
                            self.cores[msg.dst].step(msg)
            if not moved:
                return
        raise AssertionError("the cluster never went quiet")

    def tick(self, node_ids: list[str] | None = None, times: int = 1) -> None:
        for _ in range(times):
            for node_id in node_ids or list(self.cores):
                self.cores[node_id].tick()
            self.settle()

    def elect(self, node_id: str) -> RaftCore:
        core = self.cores[node_id]
        for _ in range(100):
            core.tick()
            self.settle()
            if core.role == "leader":
                return core
        raise AssertionError(f"{node_id} was never elected")


def leader_with_followers(**options: object) -> tuple[Net, RaftCore]:
    net = Net(VOTERS, **options)
    return net, net.elect("a")


# -- Construction ---------------------------------------------------------------------------------


def test_compiled_extension_is_loaded() -> None:
    assert _raft.__file__ is not None and _raft.__file__.endswith(".so")


@pytest.mark.parametrize(
    ("voters", "options", "message"),
    [
        (["b", "c", "b"], {}, "twice"),
        (["a", "a", "b"], {}, "twice"),
        (["a", ""], {}, "non-empty strings"),
        (VOTERS, {"election_ticks": 1, "heartbeat_ticks": 1}, "must exceed heartbeat_ticks"),
        (VOTERS, {"heartbeat_ticks": 0}, "at least 1"),
        (VOTERS, {"max_inflight": 0}, "max_inflight"),
    ],
)
def test_invalid_configuration_raises_value_error(voters: list[str], options: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RaftCore("a", voters, **options)  # type: ignore[arg-type]


def test_new_core_is_a_follower_without_leader() -> None:
    core = RaftCore("a", VOTERS)
    assert (core.node_id, core.role, core.term, core.leader_id) == ("a", "follower", 0, None)
    assert (core.commit_index, core.applied_index, core.last_index, core.voters) == (0, 0, 0, VOTERS)
    assert not core.has_ready()


# -- Elections -------------------------------------------------------------------------------------


def ticks_until_campaign(seed: int, election_ticks: int = 10) -> int:
    core = RaftCore("a", VOTERS, seed=seed, election_ticks=election_ticks)
    for tick in range(1, 10 * election_ticks):
        core.tick()
        if core.role != "follower":
            return tick
    raise AssertionError("never campaigned")


def test_election_timeout_is_randomized_per_seed_and_deterministic() -> None:
    timeouts = [ticks_until_campaign(seed) for seed in range(40)]
    assert all(10 <= timeout < 20 for timeout in timeouts)
    assert len(set(timeouts)) > 3
    assert timeouts == [ticks_until_campaign(seed) for seed in range(40)]


def test_pre_vote_does_not_bump_term() -> None:
    net = Net()
    a = net.cores["a"]
    while a.role == "follower":
        a.tick()
    assert (a.role, a.term) == ("pre_candidate", 0)
    requests = sent(a)
    assert {(m.type, m.dst, m.term) for m in requests} == {(MSG_PRE_VOTE, "b", 1), (MSG_PRE_VOTE, "c", 1)}
    b = net.cores["b"]
    b.step(requests[0] if requests[0].dst == "b" else requests[1])
    [response] = sent(b)
    assert (response.type, response.reject, response.term) == (MSG_PRE_VOTE_RESPONSE, False, 1)
    assert (b.term, b.voted_for) == (0, None)


def test_pre_candidate_becomes_candidate_then_leader_with_quorum() -> None:
    net = Net()
    a = net.elect("a")
    assert (a.role, a.term, a.leader_id) == ("leader", 1, "a")
    assert net.cores["b"].leader_id == "a" and net.cores["c"].leader_id == "a"
    # The leader's first entry is its no-op, committed through the followers.
    assert entry_kind(a.log.entry(1)) == ENTRY_NOOP and a.commit_index == 1


def test_vote_rejected_for_candidate_with_older_log() -> None:
    voter = RaftCore("b", VOTERS, check_quorum=False)
    voter.restore(2, None, 0, [(1, 1, b"\x00x"), (2, 2, b"\x00y")])
    voter.step(Message(type=MSG_VOTE, src="a", dst="b", term=3, index=5, log_term=1))
    [response] = sent(voter)
    assert (response.type, response.reject, response.term) == (MSG_VOTE_RESPONSE, True, 3)
    assert voter.voted_for is None


def test_node_votes_for_one_candidate_per_term() -> None:
    voter = RaftCore("b", VOTERS)
    voter.step(Message(type=MSG_VOTE, src="a", dst="b", term=1))
    voter.step(Message(type=MSG_VOTE, src="c", dst="b", term=1))
    voter.step(Message(type=MSG_VOTE, src="a", dst="b", term=1))  # a repeat for the same candidate
    responses = sent(voter)
    assert [(m.dst, m.reject) for m in responses] == [("a", False), ("c", True), ("a", False)]
    assert voter.voted_for == "a"


def test_restored_vote_is_honoured_after_restart() -> None:
    voter = RaftCore("b", VOTERS)
    voter.restore(4, "a", 0, [])
    voter.step(Message(type=MSG_VOTE, src="c", dst="b", term=4))
    [response] = sent(voter)
    assert response.reject and voter.voted_for == "a"


def test_leader_lease_ignores_vote_with_higher_term() -> None:
    net, leader = leader_with_followers()
    follower = net.cores["b"]
    follower.step(Message(type=MSG_VOTE, src="c", dst="b", term=leader.term + 5, index=99, log_term=99))
    assert sent(follower) == []
    assert (follower.term, follower.leader_id) == (leader.term, "a")


def test_transfer_vote_bypasses_leader_lease() -> None:
    net, leader = leader_with_followers()
    follower = net.cores["b"]
    follower.step(Message(type=MSG_VOTE, src="c", dst="b", term=leader.term + 1, index=leader.last_index,
                          log_term=leader.term, context=b"transfer"))
    [response] = sent(follower)
    assert (response.type, response.reject) == (MSG_VOTE_RESPONSE, False)
    assert (follower.term, follower.voted_for) == (leader.term + 1, "c")


def test_partitioned_node_rejoining_does_not_depose_leader() -> None:
    net, leader = leader_with_followers()
    term = leader.term
    net.cut = {"c"}
    net.tick(["c"], times=100)  # c keeps timing out alone
    net.tick(["a", "b"], times=3)
    c = net.cores["c"]
    assert c.term == term and c.role == "pre_candidate"  # pre-vote never bumped its term
    net.cut = set()
    net.tick(times=3)
    assert (leader.role, leader.term) == ("leader", term)
    assert (c.role, c.term, c.leader_id) == ("follower", term, "a")


def test_partitioned_node_without_pre_vote_cannot_win_while_others_hear_the_leader() -> None:
    net, leader = leader_with_followers(pre_vote=False)
    net.cut = {"c"}
    net.tick(["c"], times=100)
    c = net.cores["c"]
    assert c.term > leader.term and c.role == "candidate"
    net.cut = set()
    c.tick()  # its vote requests arrive while a and b are in the leader's lease: ignored
    assert net.cores["b"].voted_for != "c"
    net.settle()
    # Its higher term still reaches the leader through its append responses, so the cluster
    # moves to a new term, and c (whose log is no longer behind) can be elected there.
    net.tick(times=60)
    leaders = [core for core in net.cores.values() if core.role == "leader"]
    assert len(leaders) == 1 and leaders[0].term >= c.term


def test_leader_without_quorum_steps_down() -> None:
    net, leader = leader_with_followers()
    net.cut = {"b", "c"}
    net.tick(["a"], times=2 * 10)
    assert (leader.role, leader.leader_id) == ("follower", None)


def test_leader_with_quorum_keeps_leading() -> None:
    net, leader = leader_with_followers()
    net.cut = {"c"}
    net.tick(["a", "b"], times=50)
    assert leader.role == "leader"


def test_stale_leader_learns_newer_term_from_append_response() -> None:
    follower = RaftCore("b", VOTERS)
    follower.restore(5, None, 0, [])
    follower.step(Message(type=MSG_APPEND, src="a", dst="b", term=3))
    [response] = sent(follower)
    assert (response.type, response.term) == (MSG_APPEND_RESPONSE, 5)
    stale = RaftCore("a", VOTERS)
    stale.restore(3, "a", 0, [])
    stale.step(response)
    assert (stale.term, stale.role) == (5, "follower")


def test_single_node_cluster_elects_itself_and_commits_after_advance() -> None:
    core = RaftCore("solo", ["solo"], seed=1)
    for _ in range(20):
        core.tick()
    assert core.role == "leader"
    first = core.ready()
    assert first.entries == [(1, 1, bytes([ENTRY_NOOP]))] and core.commit_index == 0
    core.advance(first)
    assert core.commit_index == 1
    assert take(core).committed == [(1, 1, bytes([ENTRY_NOOP]))]


# -- Log replication ---------------------------------------------------------------------------------


def test_follower_rejects_append_with_stale_term() -> None:
    follower = RaftCore("b", VOTERS)
    follower.restore(3, None, 0, [(1, 1, b"\x00x")])
    follower.step(Message(type=MSG_APPEND, src="a", dst="b", term=2, index=1, log_term=1,
                          entries=[(2, b"\x00y")], commit=2))
    [response] = sent(follower)
    assert (response.type, response.term) == (MSG_APPEND_RESPONSE, 3)
    assert (follower.last_index, follower.commit_index, follower.term) == (1, 0, 3)


def test_follower_rejection_hints_last_index_of_an_older_term() -> None:
    follower = RaftCore("b", VOTERS)
    follower.restore(2, None, 0, [(i, term, b"\x00") for i, term in enumerate([1, 1, 2, 2, 2], 1)])
    follower.step(Message(type=MSG_APPEND, src="a", dst="b", term=3, index=6, log_term=3))
    [response] = sent(follower)
    assert response.reject and response.index == 6
    assert (response.reject_hint, response.conflict_term) == (5, 2)


def elect_alone(core: RaftCore) -> None:
    """Make ``core`` leader by answering its (pre-)vote requests with grants."""
    while core.role != "leader":
        core.tick()
        for msg in sent(core):
            kind = MSG_PRE_VOTE_RESPONSE if msg.type == MSG_PRE_VOTE else MSG_VOTE_RESPONSE
            core.step(Message(type=kind, src=msg.dst, dst=core.node_id, term=msg.term))


def test_fast_backtracking_uses_conflict_term() -> None:
    # Leader terms 1 1 3 3 3 3 (+ its no-op), follower terms 1 1 2 2 2. The follower's hint (index 5,
    # term 2) names a term the leader lacks, so the leader jumps to its last entry of term <= 2
    # (index 2) and the next append repairs everything: one rejection instead of four.
    leader = RaftCore("a", VOTERS)
    leader.restore(3, None, 0, [(i, term, b"\x00") for i, term in enumerate([1, 1, 3, 3, 3, 3], 1)])
    follower = RaftCore("b", VOTERS)
    follower.restore(2, None, 0, [(i, term, b"\x00") for i, term in enumerate([1, 1, 2, 2, 2], 1)])
    elect_alone(leader)
    [probe] = [m for m in sent(leader) if m.dst == "b"]
    assert (probe.index, probe.log_term) == (6, 3)
    follower.step(probe)
    [rejection] = sent(follower)
    assert rejection.reject and (rejection.reject_hint, rejection.conflict_term) == (5, 2)
    leader.step(rejection)
    [repair] = [m for m in sent(leader) if m.dst == "b"]
    assert (repair.type, repair.index, repair.log_term) == (MSG_APPEND, 2, 1)
    assert [term for term, _ in repair.entries] == [3, 3, 3, 3, 4]
    follower.step(repair)
    [accepted] = sent(follower)
    assert (accepted.reject, accepted.index) == (False, 7)
    assert [follower.log.term_at(i) for i in range(1, 8)] == [1, 1, 3, 3, 3, 3, 4]


def test_follower_truncates_conflicting_suffix_and_ready_says_so() -> None:
    follower = RaftCore("b", VOTERS)
    follower.restore(2, None, 1, [(1, 1, b"\x00a"), (2, 2, b"\x00stale"), (3, 2, b"\x00stale")])
    follower.step(Message(type=MSG_APPEND, src="a", dst="b", term=3, index=1, log_term=1,
                          entries=[(3, b"\x00new")], commit=1))
    ready = follower.ready()
    # Index 2 <= the last index storage holds (3): storage truncates from 2 before appending.
    assert ready.entries == [(2, 3, b"\x00new")]
    assert [(m.type, m.reject, m.index) for m in ready.messages] == [(MSG_APPEND_RESPONSE, False, 2)]
    assert follower.last_index == 2


def test_follower_acknowledges_the_last_new_entry_not_its_whole_log() -> None:
    # The follower's entry 3 is stale; an append covering only 1..2 must not vouch for it.
    follower = RaftCore("b", VOTERS)
    follower.restore(2, None, 0, [(1, 1, b"\x00a"), (2, 2, b"\x00b"), (3, 2, b"\x00stale")])
    follower.step(Message(type=MSG_APPEND, src="a", dst="b", term=3, index=1, log_term=1,
                          entries=[(2, b"\x00b")], commit=9))
    [response] = sent(follower)
    assert (response.reject, response.index) == (False, 2)
    assert follower.commit_index == 2  # min(leader commit, last new entry)


def test_append_below_commit_index_answers_with_commit_index() -> None:
    follower = RaftCore("b", VOTERS)
    follower.restore(2, None, 3, [(1, 1, b"\x00"), (2, 1, b"\x00"), (3, 2, b"\x00")])
    follower.step(Message(type=MSG_APPEND, src="a", dst="b", term=2, index=1, log_term=1))
    [response] = sent(follower)
    assert (response.reject, response.index) == (False, 3)


def test_leader_commits_only_current_term_entries_by_counting() -> None:
    # Raft figure 8: a leader of term 4 holding an entry of term 2 that a majority stores must still
    # not commit it by counting; only once an entry of term 4 is on a majority.
    leader = RaftCore("a", VOTERS)
    leader.restore(3, None, 1, [(1, 1, b"\x00one"), (2, 2, b"\x00two")])
    elect_alone(leader)
    assert leader.term == 4
    sent(leader)  # the no-op at index 3 is handed out and advanced: the leader stores 1..3
    leader.step(Message(type=MSG_APPEND_RESPONSE, src="b", dst="a", term=4, index=2))
    assert leader.commit_index == 1
    leader.step(Message(type=MSG_APPEND_RESPONSE, src="b", dst="a", term=4, index=3))
    assert leader.commit_index == 3


def test_leader_acknowledges_its_own_entries_only_after_advance() -> None:
    _, leader = leader_with_followers()
    index = leader.propose([b"x"])
    ready = leader.ready()  # handed out for persistence, not yet advanced
    assert ready.entries == [(index, leader.term, b"\x00x")]
    leader.step(Message(type=MSG_APPEND_RESPONSE, src="b", dst="a", term=leader.term, index=index))
    # b stores it, but the leader has not fsynced it: 1 of 3 is not a quorum.
    assert leader.commit_index < index
    leader.advance(ready)
    assert leader.commit_index == index


def test_an_acknowledgement_that_commits_nothing_draws_no_empty_append() -> None:
    _, leader = leader_with_followers()
    index = leader.propose([b"x"])
    sent(leader)  # the append to b and c; the leader's own copy is durable
    leader.step(Message(type=MSG_APPEND_RESPONSE, src="b", dst="a", term=leader.term, index=index))
    news = sent(leader)  # b's ack made a quorum: both followers hear of the commit
    assert leader.commit_index == index
    assert sorted((m.dst, m.commit, len(m.entries)) for m in news if m.type == MSG_APPEND) == [
        ("b", index, 0), ("c", index, 0)]
    # c's late ack commits nothing new and nothing waits for it: no message at all (was an empty append,
    # which only drew another ack).
    leader.step(Message(type=MSG_APPEND_RESPONSE, src="c", dst="a", term=leader.term, index=index))
    assert sent(leader) == []


def test_commit_news_rides_on_the_appends_of_writes_proposed_before_the_next_ready() -> None:
    _, leader = leader_with_followers()
    first = leader.propose([b"x"])
    sent(leader)
    leader.step(Message(type=MSG_APPEND_RESPONSE, src="b", dst="a", term=leader.term, index=first))
    second = leader.propose([b"y"])  # before the driver takes the next Ready
    appends = [m for m in sent(leader) if m.type == MSG_APPEND]
    # One append per follower, carrying the new entry and the commit index it learned meanwhile.
    assert sorted((m.dst, m.commit, m.index + 1, len(m.entries)) for m in appends) == [
        ("b", first, second, 1), ("c", first, second, 1)]


def test_followers_learn_every_commit_and_apply_the_same_entries() -> None:
    net, leader = leader_with_followers()
    for i in range(5):
        leader.propose([f"w{i}".encode()])
        net.settle()
    assert {net.cores[node].commit_index for node in VOTERS} == {leader.last_index}
    assert net.applied["b"] == net.applied["c"] == net.applied["a"]


def test_propose_on_follower_raises_not_leader() -> None:
    net, _ = leader_with_followers()
    with pytest.raises(NotLeader) as raised:
        net.cores["b"].propose([b"x"])
    assert raised.value.leader == "a"
    with pytest.raises(NotLeader) as raised:
        RaftCore("a", VOTERS).propose([b"x"])
    assert raised.value.leader is None


def test_propose_appends_one_batch_of_normal_entries() -> None:
    net, leader = leader_with_followers()
    last = leader.propose([b"one", b"two", b"three"])
    assert last == leader.last_index == 4
    assert [entry_kind(leader.log.entry(i)) for i in (2, 3, 4)] == [ENTRY_NORMAL] * 3
    assert leader.log.entry(3) == b"\x00two"
    net.settle()
    assert leader.commit_index == 4
    for node_id in VOTERS:
        assert [payload for _, _, payload in net.applied[node_id]][-3:] == [b"\x00one", b"\x00two", b"\x00three"]
    with pytest.raises(ValueError, match="at least one"):
        leader.propose([])


def test_pipelining_sends_without_waiting_up_to_max_inflight() -> None:
    _, leader = leader_with_followers(max_inflight=3)
    for i in range(6):
        leader.propose([f"x{i}".encode()])
    appends = [m for m in sent(leader) if m.type == MSG_APPEND and m.dst == "b"]
    assert len(appends) == 3  # the rest wait for acknowledgements
    assert [m.index for m in appends] == [1, 2, 3]
    assert leader.progress("b").inflight == 3 and leader.progress("b").state == "replicate"


def test_appends_are_split_by_max_append_bytes() -> None:
    _, leader = leader_with_followers(max_append_bytes=10)
    leader.propose([b"12345678", b"12345678", b"12345678"])  # 9 bytes each with the kind byte
    appends = [m for m in sent(leader) if m.type == MSG_APPEND and m.dst == "b"]
    assert [len(m.entries) for m in appends] == [1, 1, 1]


def test_lost_appends_are_resent_after_heartbeat_response() -> None:
    net, leader = leader_with_followers()
    net.cut = {"b", "c"}
    leader.propose([b"lost"])
    net.settle()  # the appends are dropped
    net.cut = set()
    net.tick(["a"])
    assert leader.commit_index == leader.last_index
    assert net.cores["b"].log.entry(leader.last_index) == b"\x00lost"


def test_heartbeat_commit_never_exceeds_follower_match() -> None:
    net, leader = leader_with_followers()
    net.cut = {"c"}
    leader.propose([b"x"])
    net.settle()
    leader.tick()
    by_peer = {m.dst: m.commit for m in sent(leader) if m.type == MSG_HEARTBEAT}
    assert by_peer["b"] == leader.commit_index
    assert by_peer["c"] == leader.progress("c").match_index < leader.commit_index


# -- The Ready contract ------------------------------------------------------------------------------


def test_ready_hands_out_hard_state_soft_state_and_messages_once() -> None:
    core = RaftCore("a", VOTERS, pre_vote=False)
    while core.role == "follower":
        core.tick()
    assert core.has_ready()
    ready = core.ready()
    assert ready.hard_state == (1, "a", 0)
    assert ready.soft_state == ("candidate", None)
    assert sorted(m.dst for m in ready.messages) == ["b", "c"]
    assert not core.has_ready()  # nothing more can be taken before advance
    with pytest.raises(RuntimeError, match="advance"):
        core.ready()
    core.advance(ready)
    assert not core.has_ready()
    with pytest.raises(ValueError, match="last ready"):
        core.advance(ready)


def test_step_between_ready_and_advance_lands_in_the_next_ready() -> None:
    core = RaftCore("b", VOTERS)
    core.step(Message(type=MSG_APPEND, src="a", dst="b", term=1, entries=[(1, b"\x01")]))
    first = core.ready()
    core.step(Message(type=MSG_APPEND, src="a", dst="b", term=1, index=1, log_term=1,
                      entries=[(1, b"\x00x")], commit=2))
    core.advance(first)
    second = core.ready()
    assert first.entries == [(1, 1, b"\x01")] and second.entries == [(2, 1, b"\x00x")]
    assert second.hard_state == (1, "", 2)
    assert second.committed == [(1, 1, b"\x01"), (2, 1, b"\x00x")]
    core.advance(second)
    assert core.applied_index == 2


def test_committed_entries_come_once_in_order_and_move_applied_index() -> None:
    net, leader = leader_with_followers()
    for value in (b"p", b"q"):
        leader.propose([value])
        net.settle()
    applied = [index for index, _, _ in net.applied["b"]]
    assert applied == list(range(1, leader.commit_index + 1))
    assert net.cores["b"].applied_index == leader.commit_index


# -- Restore -----------------------------------------------------------------------------------------


def test_restore_reloads_durable_state_and_replays_committed_entries() -> None:
    core = RaftCore("b", VOTERS)
    core.restore(3, "a", 2, [(1, 1, b"\x01"), (2, 3, b"\x00x"), (3, 3, b"\x00y")])
    assert (core.term, core.voted_for, core.commit_index, core.applied_index, core.last_index) == (3, "a", 2, 0, 3)
    ready = take(core)
    assert ready.hard_state is None and ready.entries == []
    assert ready.committed == [(1, 1, b"\x01"), (2, 3, b"\x00x")]


def test_restore_accepts_a_raft_log_and_an_applied_index() -> None:
    log = _raft.RaftLog(4, 2)
    log.append(2, b"\x00x")
    core = RaftCore("b", VOTERS)
    core.restore(2, None, 5, log, applied_index=5)
    assert (core.log is log, core.commit_index, core.applied_index) == (True, 5, 5)
    assert not core.has_ready()


def test_restore_adopts_a_log_term_newer_than_the_hard_state() -> None:
    # A crash between writing entries and the hard state: the vote of the old term does not carry over.
    core = RaftCore("b", VOTERS)
    core.restore(2, "a", 0, [(1, 3, b"\x00x")])
    assert (core.term, core.voted_for) == (3, None)
    assert take(core).hard_state == (3, "", 0)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((1, None, 2, [(1, 1, b"\x00")]), "beyond the restored log"),
        ((1, None, 0, [(2, 1, b"\x00")]), "contiguous"),
        ((1, None, 0, [(1, 1, b"\x00")], 0, 0, 1), "applied_index"),
    ],
)
def test_restore_rejects_inconsistent_durable_state(arguments: tuple[object, ...], message: str) -> None:
    core = RaftCore("b", VOTERS)
    with pytest.raises(ValueError, match=message):
        core.restore(*arguments)  # type: ignore[arg-type]
    assert (core.term, core.voted_for, core.commit_index, core.last_index) == (0, None, 0, 0)


def test_restore_after_the_first_tick_is_refused() -> None:
    core = RaftCore("b", VOTERS)
    core.tick()
    with pytest.raises(RuntimeError, match="before the first tick"):
        core.restore(1, None, 0, [])


# -- Linearizable reads ------------------------------------------------------------------------------


def test_read_index_waits_for_heartbeat_quorum() -> None:
    voters = ["a", "b", "c", "d", "e"]
    net = Net(voters)
    leader = net.elect("a")
    leader.read_index(b"r1")
    ready = take(leader)
    assert ready.read_states == []
    heartbeats = [m for m in ready.messages if m.type == MSG_HEARTBEAT]
    assert {m.dst for m in heartbeats} == {"b", "c", "d", "e"} and {m.context for m in heartbeats} == {b"r1"}
    for peer in ("b", "c"):
        leader.step(Message(type=MSG_HEARTBEAT_RESPONSE, src=peer, dst="a", term=leader.term, context=b"r1"))
        if peer == "b":
            assert take(leader).read_states == []  # leader + b is 2 of 5
    assert take(leader).read_states == [(b"r1", leader.commit_index)]


def test_read_index_waits_for_the_first_commit_of_the_leaders_term() -> None:
    # Raft §6.4: until its no-op commits, a new leader's commit index may trail the cluster's.
    leader = RaftCore("a", VOTERS)
    leader.restore(1, None, 0, [(1, 1, b"\x00old")])
    elect_alone(leader)
    leader.read_index(b"early")
    assert not [m for m in sent(leader) if m.context == b"early"]
    leader.step(Message(type=MSG_APPEND_RESPONSE, src="b", dst="a", term=leader.term, index=2))
    assert leader.commit_index == 2
    assert [m.dst for m in sent(leader) if m.type == MSG_HEARTBEAT and m.context == b"early"] == ["b", "c"]
    leader.step(Message(type=MSG_HEARTBEAT_RESPONSE, src="b", dst="a", term=leader.term, context=b"early"))
    assert take(leader).read_states == [(b"early", 2)]


def test_quorum_for_a_later_read_releases_earlier_ones() -> None:
    _, leader = leader_with_followers()
    leader.read_index(b"first")
    leader.read_index(b"second")
    sent(leader)
    leader.step(Message(type=MSG_HEARTBEAT_RESPONSE, src="b", dst="a", term=leader.term, context=b"second"))
    assert take(leader).read_states == [(b"first", leader.commit_index), (b"second", leader.commit_index)]


def test_follower_read_index_goes_through_the_leader() -> None:
    net, leader = leader_with_followers()
    follower = net.cores["b"]
    follower.read_index(b"via-b")
    [request] = [m for m in sent(follower) if m.type == MSG_READ_INDEX]
    assert (request.dst, request.context) == ("a", b"via-b")
    leader.step(request)
    net.settle()
    assert net.read_states["b"] == [(b"via-b", leader.commit_index)]
    assert net.read_states["a"] == []


def test_read_index_without_known_leader_raises_not_leader() -> None:
    with pytest.raises(NotLeader) as raised:
        RaftCore("a", VOTERS).read_index(b"x")
    assert raised.value.leader is None


def test_reads_pending_when_leadership_is_lost_are_dropped() -> None:
    _, leader = leader_with_followers()
    leader.read_index(b"doomed")
    sent(leader)
    leader.step(Message(type=MSG_APPEND, src="b", dst="a", term=leader.term + 1))
    assert leader.role == "follower"
    # A late acknowledgement cannot resurrect it: the driver times the read out.
    leader.step(Message(type=MSG_HEARTBEAT_RESPONSE, src="c", dst="a", term=leader.term, context=b"doomed"))
    assert take(leader).read_states == []


def test_read_index_response_yields_read_state_on_follower() -> None:
    follower = RaftCore("b", VOTERS)
    follower.step(Message(type=MSG_HEARTBEAT, src="a", dst="b", term=1))
    follower.step(Message(type=MSG_READ_INDEX_RESPONSE, src="a", dst="b", term=1, index=7, context=b"r"))
    assert take(follower).read_states == [(b"r", 7)]


# -- Leadership transfer -----------------------------------------------------------------------------


def test_transfer_leadership_sends_timeout_now() -> None:
    net, leader = leader_with_followers()
    leader.transfer_leadership("b")
    assert leader.transfer_target == "b"
    [timeout_now] = [m for m in sent(leader) if m.type == MSG_TIMEOUT_NOW]
    assert timeout_now.dst == "b"
    with pytest.raises(NotLeader, match="transferring"):
        leader.propose([b"x"])
    net.cores["b"].step(timeout_now)
    net.settle()
    assert net.cores["b"].role == "leader" and leader.role == "follower"
    assert leader.leader_id == "b"


def test_transfer_to_a_lagging_follower_catches_it_up_first() -> None:
    net, leader = leader_with_followers()
    net.cut = {"c"}
    leader.propose([b"x", b"y"])
    net.settle()
    leader.transfer_leadership("c")
    assert not [m for m in sent(leader) if m.type == MSG_TIMEOUT_NOW]
    net.cut = set()
    net.tick(["a"])
    assert net.cores["c"].role == "leader"


def test_transfer_leadership_aborts_after_election_timeout() -> None:
    net, leader = leader_with_followers()
    net.cut = {"c"}
    leader.transfer_leadership("c")
    net.tick(["a", "b"], times=10)
    assert leader.role == "leader" and leader.transfer_target is None
    assert leader.propose([b"after"]) == leader.last_index


def test_transfer_leadership_validates_its_target() -> None:
    net, leader = leader_with_followers()
    with pytest.raises(ValueError, match="not a voter"):
        leader.transfer_leadership("zz")
    leader.transfer_leadership("a")  # already leads: nothing to do
    assert leader.transfer_target is None
    with pytest.raises(NotLeader):
        net.cores["b"].transfer_leadership("c")


# -- Snapshots (metadata only; the chunk streaming is the driver's) ----------------------------------


def test_leader_asks_for_a_snapshot_when_the_follower_needs_compacted_entries() -> None:
    net, leader = leader_with_followers()
    net.cut = {"c"}
    leader.propose([b"x", b"y", b"z"])
    net.settle()
    leader.log.compact_to(3, leader.log.term_at(3))
    net.cut = set()
    # c is at index 1: its next entry is compacted away.
    leader.step(Message(type=MSG_APPEND_RESPONSE, src="c", dst="a", term=leader.term, index=4, reject=True,
                        reject_hint=1, conflict_term=1))
    leader.step(Message(type=MSG_HEARTBEAT_RESPONSE, src="c", dst="a", term=leader.term))
    [request] = [m for m in sent(leader) if m.type == MSG_SNAPSHOT]
    assert (request.dst, request.snapshot_index, request.snapshot_term, request.done) == ("c", 3, 1, False)
    assert leader.progress("c").state == "snapshot"

    follower = net.cores["c"]
    follower.step(Message(type=MSG_SNAPSHOT, src="a", dst="c", term=leader.term, snapshot_index=3,
                          snapshot_term=1, offset=0, data=b"state", done=True))
    ready = take(follower)
    assert ready.snapshot == (3, 1)
    assert (follower.commit_index, follower.applied_index, follower.last_index) == (3, 3, 3)
    [response] = [m for m in ready.messages if m.type == MSG_SNAPSHOT_RESPONSE]
    assert (response.index, response.reject) == (3, False)
    leader.step(response)
    net.settle()
    assert follower.last_index == leader.last_index and follower.commit_index == leader.commit_index


def test_snapshot_chunks_before_the_last_are_left_to_the_driver() -> None:
    follower = RaftCore("c", VOTERS)
    follower.step(Message(type=MSG_SNAPSHOT, src="a", dst="c", term=1, snapshot_index=9, snapshot_term=1,
                          data=b"part", done=False))
    ready = take(follower)
    assert ready.snapshot is None and not [m for m in ready.messages if m.type == MSG_SNAPSHOT_RESPONSE]


def test_message_for_another_node_is_refused() -> None:
    with pytest.raises(ValueError, match="stepped into"):
        RaftCore("a", VOTERS).step(Message(type=MSG_HEARTBEAT, src="b", dst="c", term=1))


def test_vote_request_from_a_non_voter_is_ignored() -> None:
    core = RaftCore("a", VOTERS)
    for kind in (MSG_VOTE, MSG_PRE_VOTE):
        core.step(Message(type=kind, src="removed", dst="a", term=9, index=50, log_term=9))
    assert core.term == 0 and not core.has_ready()


# -- Membership (Raft §4.1 single-server changes, applied when committed) ----------------------------


def apply_committed_configs(net: Net) -> None:
    """Apply every committed ENTRY_CONFIG entry the way a driver does: data is 'voters|learners'."""
    for node_id, entries in net.applied.items():
        for _, _, payload in entries:
            if entry_kind(payload) == ENTRY_CONFIG:
                voters, learners = payload[1:].decode().split("|")
                net.cores[node_id].apply_config(voters.split(",") if voters else [],
                                                learners.split(",") if learners else [])
        entries.clear()
    net.settle()


def add_node(net: Net, node_id: str) -> RaftCore:
    core = RaftCore(node_id, [], seed=7)
    net.cores[node_id] = core
    net.read_states[node_id] = []
    net.applied[node_id] = []
    return core


def test_a_learner_replicates_but_never_votes_or_counts_towards_commit() -> None:
    net, leader = leader_with_followers()
    learner = add_node(net, "d")
    leader.propose_config(b"a,b,c|d")
    net.settle()
    apply_committed_configs(net)
    assert leader.learners == ["d"] and leader.voters == VOTERS
    learner.apply_config(VOTERS, ["d"])
    leader.propose([b"x"])
    net.settle()
    assert learner.last_index == leader.last_index and learner.commit_index == leader.commit_index
    assert leader.progress("d").match_index == leader.last_index
    # With b and c cut off the learner's copy is not a quorum.
    net.cut = {"b", "c"}
    index = leader.propose([b"y"])
    net.settle()
    assert learner.last_index == index and leader.commit_index < index
    # And it never campaigns, however long it hears nothing.
    net.cut = {"a"}
    net.tick(["d"], times=50)
    assert learner.role == "follower" and learner.term == leader.term


def test_promoted_learner_counts_towards_the_quorum() -> None:
    net, leader = leader_with_followers()
    add_node(net, "d")
    leader.propose_config(b"a,b,c|d")
    net.settle()
    apply_committed_configs(net)
    leader.propose_config(b"a,b,c,d|")
    net.settle()
    apply_committed_configs(net)
    assert leader.voters == ["a", "b", "c", "d"] and net.cores["d"].is_voter
    net.cut = {"c"}
    index = leader.propose([b"x"])
    net.settle()
    assert leader.commit_index == index  # a, b, d: three of four
    net.cut = {"c", "d"}
    index = leader.propose([b"y"])
    net.settle()
    assert leader.commit_index < index  # a, b: two of four is no quorum


def test_only_one_configuration_change_at_a_time() -> None:
    net, leader = leader_with_followers()
    add_node(net, "d")
    index = leader.propose_config(b"a,b,c|d")
    assert leader.pending_config_index == index
    with pytest.raises(ConfigChangePending, match="not applied"):
        leader.propose_config(b"a,b,c|")
    net.settle()
    apply_committed_configs(net)
    leader.propose_config(b"a,b,c|")


def test_a_new_leader_changes_the_configuration_only_after_committing_in_its_term() -> None:
    leader = RaftCore("x", ["x", "y", "z"], pre_vote=False)
    while leader.role != "candidate":
        leader.tick()
    leader.step(Message(type=MSG_VOTE_RESPONSE, src="y", dst="x", term=leader.term))
    assert leader.role == "leader"
    with pytest.raises(ConfigChangePending, match="not committed an entry of its term"):
        leader.propose_config(b"x,y,z|w")
    sent(leader)  # the no-op is durable here
    leader.step(Message(type=MSG_APPEND_RESPONSE, src="y", dst="x", term=leader.term, index=1))
    assert leader.commit_index == 1
    sent(leader)
    assert leader.propose_config(b"x,y,z|w") == 2


def test_removing_a_voter_shrinks_the_quorum_and_stops_replication_to_it() -> None:
    net, leader = leader_with_followers()
    leader.propose_config(b"a,b|")
    net.settle()
    apply_committed_configs(net)
    assert leader.voters == ["a", "b"]
    with pytest.raises(ValueError, match="not a peer"):
        leader.progress("c")
    net.cut = {"c"}
    index = leader.propose([b"x"])
    net.settle()
    assert leader.commit_index == index
    # The removed node's campaigns are ignored by the remaining voters.
    removed = net.cores["c"]
    term = leader.term
    net.cut = set()
    removed.apply_config(["a", "b", "c"], [])  # as if it never learned of its removal
    net.tick(["c"], times=40)
    assert leader.role == "leader" and leader.term == term


def test_a_leader_that_removes_itself_steps_down() -> None:
    net, leader = leader_with_followers()
    leader.propose_config(b"b,c|")
    net.settle()
    apply_committed_configs(net)
    assert leader.role == "follower" and not leader.is_voter
    net.tick(["b", "c"], times=40)
    assert {net.cores["b"].role, net.cores["c"].role} == {"leader", "follower"}
    net.tick(["a"], times=40)
    assert leader.role == "follower"


def test_transfer_to_a_learner_is_refused_and_timeout_now_does_not_make_it_campaign() -> None:
    net, leader = leader_with_followers()
    learner = add_node(net, "d")
    leader.propose_config(b"a,b,c|d")
    net.settle()
    apply_committed_configs(net)
    learner.apply_config(VOTERS, ["d"])
    with pytest.raises(ValueError, match="not a voter"):
        leader.transfer_leadership("d")
    learner.step(Message(type=MSG_TIMEOUT_NOW, src="a", dst="d", term=leader.term))
    assert learner.role == "follower" and not learner.has_ready()


def test_invalid_configurations_are_refused() -> None:
    core = RaftCore("a", VOTERS)
    with pytest.raises(ValueError, match="voter and learner"):
        core.apply_config(["a", "b"], ["b"])
    with pytest.raises(ValueError, match="twice"):
        core.apply_config(["a", "a"], [])
    assert core.voters == VOTERS
