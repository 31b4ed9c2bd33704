"""A deterministic, seeded simulation of a Raft cluster built from ``RaftCore``.

Everything - the network (drops, delays, reordering, duplicates, partitions that often cut the
leader off with a minority), crashes (also halfway through writing a Ready), quick restarts right
after a write ("bounces"), process pauses, leadership transfers, snapshots with log compaction (a
follower behind the compaction point gets the leader's snapshot installed), single-server membership
changes (a spare node added as a learner, promoted, voters removed - the leader too), client proposals
and reads - is
drawn from one ``random.Random(seed)``, so a seed replays exactly. The configuration (3 or 5 nodes,
pre-vote, check-quorum, max_inflight, max_append_bytes, heartbeat interval) varies per seed too.
Each node has a driver that follows the Ready contract (persist, send, apply, advance), sometimes
holding a Ready "in flight" while further messages are stepped in, and a simulated disk that keeps
exactly what the driver persisted: a crash loses everything else, including a Ready that was only
partly written.

The checker runs after every simulation step (every tick and every delivered message) and raises
``SafetyViolation`` for a breach of:
  * election safety - at most one leader per term, over the whole history;
  * leader append-only - a leader never removes or rewrites its log during its term;
  * log matching - an (index, term) always names the same payload and the same previous term
    (checked on every entry any node writes, which gives the prefix property by induction);
  * leader completeness - a new leader's log holds every entry committed in an earlier term;
  * state machine safety - every node applies the same entry at an index, in index order;
  * linearizable reads - a read index is >= every commit index any node knew when the read was asked.
After the faults stop (links become FIFO, nothing is lost) it checks liveness: within a bound a
leader is elected and stays for an election timeout, and every proposal made after that commits and
is applied on every node within a bound that grows with how far the followers lag.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import heapq
import random

from spina_fast._raft import (
    ENTRY_CONFIG,
    ENTRY_NORMAL,
    MSG_SNAPSHOT,
    ConfigChangePending,
    Message,
    NotLeader,
    RaftCore,
    Ready,
    decode_message,
    encode_message,
)

ELECTION_TICKS = 10
# Liveness bounds once the network is healed, in ticks. An election needs a randomized timeout
# (< 2 * ELECTION_TICKS) plus a few message delays; allow several split votes on top.
ELECTION_BOUND = 12 * ELECTION_TICKS
COMMIT_BOUND = 3 * ELECTION_TICKS
MAX_DELIVERIES_PER_TICK = 5000


class SafetyViolation(AssertionError):
    """A Raft safety or liveness property failed; the message carries the seed and a trace."""


@dataclasses.dataclass(frozen=True)
class Faults:
    """Per-tick (or per-message, per-Ready) probabilities of each fault during the faulty phase."""

    drop: float = 0.05
    duplicate: float = 0.03
    max_delay: int = 3
    crash: float = 0.005
    restart: float = 0.08
    partition: float = 0.02
    heal_partition: float = 0.04
    crash_mid_persist: float = 0.01
    bounce: float = 0.002
    bounce_after_hard_state: float = 0.15
    pause: float = 0.004
    hold_ready: float = 0.25
    transfer: float = 0.01
    compact: float = 0.03
    config_change: float = 0.01


@dataclasses.dataclass
class Disk:
    """Exactly what a driver persisted: the hard state, the snapshot (index, term and the configuration
    as of it; the state machine is just its applied index here) and the log after it (entries[i] is
    index snapshot_index + 1 + i)."""

    term: int = 0
    voted_for: str = ""
    commit_index: int = 0
    snapshot_index: int = 0
    snapshot_term: int = 0
    snapshot_config: tuple[list[str], list[str]] | None = None
    entries: list[tuple[int, bytes]] = dataclasses.field(default_factory=list)

    @property
    def last_index(self) -> int:
        return self.snapshot_index + len(self.entries)

    def term_at(self, index: int) -> int:
        if index == self.snapshot_index:
            return self.snapshot_term
        if index < self.snapshot_index or index > self.last_index:
            return 0
        return self.entries[index - self.snapshot_index - 1][0]


def encode_config(voters: list[str], learners: list[str]) -> bytes:
    return f"{','.join(voters)}|{','.join(learners)}".encode()


def decode_config(data: bytes) -> tuple[list[str], list[str]]:
    voters, learners = data.decode().split("|")
    return (voters.split(",") if voters else []), (learners.split(",") if learners else [])


class SimNode:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.disk = Disk()
        self.core: RaftCore | None = None
        self.incarnation = 0
        self.held: Ready | None = None   # a Ready taken but not yet persisted/advanced
        self.applied_index = 0           # the (volatile) state machine's position
        self.paused_until = 0            # a frozen process (GC pause, stalled VM): no ticks, no messages
        self.leader_term = 0             # the term in which the checker last saw it lead
        self.leader_last = (0, 0)        # (last index, its term) seen while leading that term
        self.received_snapshots: dict[tuple[int, int], bytes] = {}  # delivered, not yet installed


class Simulation:
    def __init__(self, seed: int, *, fault_ticks: int = 200, faults: Faults | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        rng = self.rng
        self.node_count = rng.choice((3, 5))
        # The initial voters, plus one spare node outside the configuration that membership changes add.
        self.initial_voters = [f"n{i}" for i in range(1, self.node_count + 1)]
        self.ids = [*self.initial_voters, f"n{self.node_count + 1}"]
        self.nodes = {node_id: SimNode(node_id) for node_id in self.ids}
        # Vary the configuration per seed so every mode meets faults, favouring the default one.
        defaults = rng.random() < 0.6
        self.pre_vote = True if defaults else rng.random() < 0.5
        self.check_quorum = True if defaults else rng.random() < 0.5
        self.max_inflight = rng.choice((2, 4, 256))
        self.max_append_bytes = rng.choice((16, 64, 1 << 20))
        self.heartbeat_ticks = rng.choice((1, 1, 2))
        self.fault_ticks = fault_ticks
        self.faults = faults or Faults()
        self.faulty = True
        self.now = 0
        self.queue: list[tuple[int, float, str, str, bytes]] = []
        self.link_clock: dict[tuple[str, str], int] = {}
        self.sequence = 0
        self.group = dict.fromkeys(self.ids, 0)
        self.trace: collections.deque[tuple[int, str, object]] = collections.deque(maxlen=300)
        self.events: collections.Counter[str] = collections.Counter()
        self.proposal_counter = 0
        self.read_counter = 0
        # Checker state.
        self.leaders: dict[int, str] = {}
        self.entry_identity: dict[tuple[int, int], tuple[bytes, int]] = {}
        self.committed: dict[int, tuple[int, bytes]] = {}
        self.max_commit_seen = 0
        self.commit_terms: list[int] = []  # commit_terms[i - 1]: the term in which index i was committed
        self.pending_reads: dict[bytes, tuple[str, int]] = {}
        self.reads_served = 0
        self.elections = 0
        for node in self.nodes.values():
            self._start(node)

    # -- Running ------------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            for _ in range(self.fault_ticks):
                self._tick_round()
            self._heal()
            self._check_liveness()
        except SafetyViolation as failure:
            raise SafetyViolation(f"{failure}\n{self.describe()}") from None
        except Exception as failure:
            raise SafetyViolation(f"{type(failure).__name__}: {failure}\n{self.describe()}") from failure

    def describe(self) -> str:
        lines = [
            f"seed={self.seed} nodes={self.node_count} pre_vote={self.pre_vote} check_quorum={self.check_quorum} "
            f"max_inflight={self.max_inflight} max_append_bytes={self.max_append_bytes} "
            f"heartbeat_ticks={self.heartbeat_ticks} now={self.now}",
            f"replay: SPINA_RAFT_SEED={self.seed} pytest tests/raft/test_simulation.py",
            "last events (tick, event, detail):",
        ]
        lines.extend(f"  {tick:4d} {event:<10} {detail}" for tick, event, detail in self.trace)
        for node in self.nodes.values():
            core = node.core
            state = (f"{core.role} term={core.term} leader={core.leader_id} commit={core.commit_index} "
                     f"last={core.last_index}" if core is not None else "down")
            lines.append(f"  {node.node_id}: {state} disk_last={node.disk.last_index} "
                         f"disk_term={node.disk.term}")
        return "\n".join(lines)

    def _note(self, event: tuple[str, object]) -> None:
        self.trace.append((self.now, *event))
        self.events[event[0]] += 1

    def _tick_round(self) -> None:
        self.now += 1
        rng = self.rng
        if self.faulty:
            self._inject_faults()
        for node in self.nodes.values():
            if node.paused_until == self.now and node.core is not None:
                # Clients kept talking to the frozen node; their requests run first when it wakes.
                self._read(node.node_id)
                self._propose(node.node_id)
        if rng.random() < 0.5:
            self._propose(rng.choice(self.ids))
        if rng.random() < 0.4:
            # Stale leaders in a minority too: their entries are the ones a later leader overwrites.
            for node_id in self._believed_leaders():
                self._propose(node_id)
        if rng.random() < 0.15:
            self._read(rng.choice(self.ids))
        if rng.random() < 0.2:
            for node_id in self._believed_leaders():
                self._read(node_id)
        order = self.ids[:]
        rng.shuffle(order)
        for node_id in order:
            node = self.nodes[node_id]
            if node.core is None or node.paused_until > self.now:
                continue
            self._maybe_finish_held(node)
            if node.core is None:
                continue  # crashed while writing the held Ready
            node.core.tick()
            self._after_input(node)
        self._deliver_due()

    # -- Faults -------------------------------------------------------------------------------------

    def _believed_leaders(self) -> list[str]:
        """Nodes up and acting as leader, stale ones included."""
        return [node.node_id for node in self.nodes.values()
                if node.core is not None and node.core.role == "leader" and node.paused_until <= self.now]

    def _inject_faults(self) -> None:
        rng = self.rng
        faults = self.faults
        for node in self.nodes.values():
            if node.core is not None and rng.random() < faults.pause:
                node.paused_until = self.now + rng.randint(5, 3 * ELECTION_TICKS)
                self._note(("pause", f"{node.node_id} until {node.paused_until}"))
            if node.core is not None and rng.random() < faults.crash:
                self._crash(node, "crash")
            elif node.core is None and rng.random() < faults.restart:
                self._start(node)
        if rng.random() < faults.partition:
            order = self.ids[:]
            rng.shuffle(order)
            leaders = self._believed_leaders()
            if leaders and rng.random() < 0.5:
                # Cut a leader off with a minority: the old leader keeps believing while a new one rises.
                order.remove(leaders[0])
                order.insert(0, leaders[0])
                cut = rng.randint(1, (len(order) - 1) // 2)
            else:
                cut = rng.randint(1, len(order) - 1)
            self.group = {node_id: (0 if position < cut else 1) for position, node_id in enumerate(order)}
            self._note(("partition", sorted(order[:cut])))
        elif rng.random() < faults.heal_partition and len(set(self.group.values())) > 1:
            self.group = dict.fromkeys(self.ids, 0)
            self._note(("heal", ""))
        if rng.random() < faults.transfer:
            for node_id in self._believed_leaders():
                node = self.nodes[node_id]
                assert node.core is not None
                voters = [peer for peer in node.core.voters if peer != node_id]
                if not voters:
                    continue
                target = rng.choice(voters)
                node.core.transfer_leadership(target)
                self._note(("transfer", f"{node_id}->{target}"))
                self._after_input(node)
        if rng.random() < faults.config_change:
            for node_id in self._believed_leaders()[:1]:
                self._change_config(self.nodes[node_id])

    def _change_config(self, node: SimNode) -> None:
        """One single-server change: add a non-member as learner, promote a learner, or remove a voter
        (never below three; the leader itself included)."""
        core = node.core
        assert core is not None
        voters, learners = core.voters, core.learners
        outsiders = [node_id for node_id in self.ids if node_id not in voters and node_id not in learners]
        choices: list[tuple[str, list[str], list[str]]] = []
        if outsiders:
            newcomer = self.rng.choice(outsiders)
            choices.append((f"add {newcomer}", voters, [*learners, newcomer]))
        if learners:
            promoted = self.rng.choice(learners)
            choices.append((f"promote {promoted}", [*voters, promoted], [m for m in learners if m != promoted]))
        if len(voters) > 3:
            removed = self.rng.choice(voters)
            choices.append((f"remove {removed}", [m for m in voters if m != removed], learners))
        if not choices:
            return
        what, new_voters, new_learners = self.rng.choice(choices)
        try:
            index = core.propose_config(encode_config(new_voters, new_learners))
        except (ConfigChangePending, NotLeader):
            return
        self._note(("config", f"{node.node_id} proposes {what} at {index}"))
        self.events[f"config-{what.split()[0]}"] += 1
        self._after_input(node)

    def _crash(self, node: SimNode, why: str) -> None:
        node.core = None
        node.held = None
        self._note((why, node.node_id))

    def _start(self, node: SimNode) -> None:
        node.incarnation += 1
        disk = node.disk
        # The configuration as of the snapshot; the log's committed config entries are applied on top.
        if disk.snapshot_config is not None:
            voters, learners = disk.snapshot_config
        else:
            voters, learners = (self.initial_voters if node.node_id in self.initial_voters else []), []
        core = RaftCore(
            node.node_id, voters, learners=learners, election_ticks=ELECTION_TICKS,
            heartbeat_ticks=self.heartbeat_ticks, pre_vote=self.pre_vote, check_quorum=self.check_quorum,
            seed=self.seed * 7919 + node.incarnation, max_append_bytes=self.max_append_bytes,
            max_inflight=self.max_inflight,
        )
        core.restore(disk.term, disk.voted_for, disk.commit_index,
                     [(index, term, payload) for index, (term, payload) in enumerate(disk.entries,
                                                                                      disk.snapshot_index + 1)],
                     disk.snapshot_index, disk.snapshot_term)
        if core.term < disk.term:
            raise SafetyViolation(f"{node.node_id} restarted at term {core.term} below its durable {disk.term}")
        node.core = core
        node.applied_index = disk.snapshot_index
        node.received_snapshots = {}
        node.leader_term = 0
        if node.incarnation > 1:
            self._note(("restart", node.node_id))

    def _heal(self) -> None:
        self.faulty = False
        for node in self.nodes.values():
            node.paused_until = 0
        self.group = dict.fromkeys(self.ids, 0)
        self._note(("heal-all", ""))
        for node in self.nodes.values():
            if node.core is None:
                self._start(node)
            else:
                self._maybe_finish_held(node, force=True)
                self._drive(node)

    # -- Clients ------------------------------------------------------------------------------------

    def _propose(self, node_id: str) -> int | None:
        node = self.nodes[node_id]
        if node.core is None or node.paused_until > self.now:
            return None
        self.proposal_counter += 1
        count = self.rng.choice((1, 1, 1, 2, 5))
        payloads = [f"{self.seed}:{self.proposal_counter}:{i}".encode() for i in range(count)]
        try:
            last = node.core.propose(payloads)
        except NotLeader:
            return None
        self._note(("propose", f"{node_id} {count}@{last - count + 1}..{last}"))
        self._after_input(node)
        return last

    def _read(self, node_id: str) -> None:
        node = self.nodes[node_id]
        if node.core is None or node.paused_until > self.now:
            return
        self.read_counter += 1
        context = f"read-{self.read_counter}".encode()
        floor = self.max_commit_seen
        try:
            node.core.read_index(context)
        except NotLeader:
            return
        self.pending_reads[context] = (node_id, floor)
        self._note(("read", f"{node_id} {context!r} floor={floor}"))
        self._after_input(node)

    # -- Network ------------------------------------------------------------------------------------

    def _send(self, msg: Message) -> None:
        rng = self.rng
        if msg.type == MSG_SNAPSHOT and not msg.done:
            # The driver streams its snapshot; here it travels whole, with the configuration as its data.
            disk = self.nodes[msg.src].disk
            # (A later compaction may have replaced the snapshot the core asked for: the newest one goes.)
            if disk.snapshot_config is None or disk.snapshot_index < msg.snapshot_index:
                raise SafetyViolation(f"{msg.src} asks to send snapshot {msg.snapshot_index}@{msg.snapshot_term} "
                                      f"but holds {disk.snapshot_index}@{disk.snapshot_term}")
            msg = Message(type=MSG_SNAPSHOT, src=msg.src, dst=msg.dst, term=msg.term,
                          snapshot_index=disk.snapshot_index, snapshot_term=disk.snapshot_term,
                          data=encode_config(*disk.snapshot_config), done=True)
        frame = encode_message(msg)
        if self.faulty:
            delay = 0 if rng.random() < 0.5 else rng.randint(1, self.faults.max_delay)
            copies = 2 if rng.random() < self.faults.duplicate else 1
        else:
            # Healed: every link is FIFO (a TCP connection), messages take 0 or 1 tick.
            link = (msg.src, msg.dst)
            deliver_at = max(self.now + rng.randint(0, 1), self.link_clock.get(link, 0))
            self.link_clock[link] = deliver_at
            self.sequence += 1
            heapq.heappush(self.queue, (deliver_at, float(self.sequence), msg.src, msg.dst, frame))
            return
        for copy in range(copies):
            heapq.heappush(self.queue, (self.now + delay + copy, rng.random(), msg.src, msg.dst, frame))

    def _deliver_due(self) -> None:
        delivered = 0
        queue = self.queue
        rng = self.rng
        while queue and queue[0][0] <= self.now:
            _, _, src, dst, frame = heapq.heappop(queue)
            delivered += 1
            if delivered > MAX_DELIVERIES_PER_TICK:
                raise SafetyViolation(f"more than {MAX_DELIVERIES_PER_TICK} messages in one tick: a message storm")
            if self.group[src] != self.group[dst] or (self.faulty and rng.random() < self.faults.drop):
                continue
            node = self.nodes[dst]
            if node.core is None:
                continue
            if node.paused_until > self.now:
                heapq.heappush(queue, (node.paused_until, rng.random(), src, dst, frame))
                continue
            msg = decode_message(frame[4], frame[5:-4])
            self._note(("deliver", msg))
            self._maybe_finish_held(node)
            if node.core is None:
                continue
            if msg.type == MSG_SNAPSHOT:
                node.received_snapshots[(msg.snapshot_index, msg.snapshot_term)] = msg.data
            node.core.step(msg)
            self._after_input(node)

    # -- The driver: the Ready contract ------------------------------------------------------------

    def _after_input(self, node: SimNode) -> None:
        self._check_node(node)
        self._drive(node)

    def _maybe_finish_held(self, node: SimNode, force: bool = False) -> None:
        if node.held is not None and (force or self.rng.random() < 0.5):
            ready = node.held
            node.held = None
            self._complete(node, ready)

    def _drive(self, node: SimNode) -> None:
        while node.core is not None and node.held is None and node.core.has_ready():
            ready = node.core.ready()
            if self.faulty and self.rng.random() < self.faults.hold_ready:
                node.held = ready  # persistence "in progress": more messages may be stepped meanwhile
                return
            self._complete(node, ready)

    def _complete(self, node: SimNode, ready: Ready) -> None:
        core = node.core
        assert core is not None
        disk = node.disk
        if ready.snapshot is not None:
            self._install_snapshot(node, *ready.snapshot)
        if ready.entries:
            first = ready.entries[0][0]
            if first <= disk.snapshot_index:
                raise SafetyViolation(f"{node.node_id} rewrites entry {first}, covered by its snapshot at "
                                      f"{disk.snapshot_index}")
            if first <= disk.last_index:
                if node.leader_term and core.role == "leader" and core.term == node.leader_term:
                    raise SafetyViolation(f"leader {node.node_id} truncates its log from {first}")
                self.events["truncate"] += 1
                del disk.entries[first - disk.snapshot_index - 1:]
            elif first != disk.last_index + 1:
                raise SafetyViolation(f"{node.node_id} hands out entries from {first} but its disk ends "
                                      f"at {disk.last_index}")
            entries = ready.entries
            if self.faulty and self.rng.random() < self.faults.crash_mid_persist:
                # Crash while writing: a prefix of the entries reached the disk, the hard state did not.
                entries = entries[:self.rng.randint(0, len(entries))]
                self._write_entries(node, entries)
                self._crash(node, "crash-mid")
                return
            self._write_entries(node, entries)
        if ready.hard_state is not None:
            disk.term, disk.voted_for, disk.commit_index = ready.hard_state
        for msg in ready.messages:
            self._send(msg)
        for index, term, payload in ready.committed:
            self._apply(node, index, term, payload)
        for context, index in ready.read_states:
            self._serve_read(node, context, index)
        core.advance(ready)
        self._check_node(node)
        # (Not while a snapshot the core already took in waits in a held Ready: the log is the snapshot's.)
        if (self.faulty and node.applied_index > disk.snapshot_index and node.applied_index >= core.log.snapshot_index
                and self.rng.random() < self.faults.compact):
            self._compact(node)
        bounce = self.faults.bounce_after_hard_state if ready.hard_state is not None else self.faults.bounce
        if self.faulty and self.rng.random() < bounce:
            # A process restart right after a write: only what is on disk survives (a vote, say).
            self._crash(node, "bounce")
            self._start(node)

    def _compact(self, node: SimNode) -> None:
        """Snapshot the state machine at its applied index and drop the log up to it, on disk and in memory."""
        core = node.core
        assert core is not None
        disk = node.disk
        index = node.applied_index
        term = core.log.term_at(index)
        if disk.term_at(index) != term:
            raise SafetyViolation(f"{node.node_id} applied {index}@{term}, its disk holds term {disk.term_at(index)}")
        del disk.entries[:index - disk.snapshot_index]
        disk.snapshot_index, disk.snapshot_term = index, term
        disk.snapshot_config = (core.voters, core.learners)
        core.log.compact_to(index, term)
        self._note(("compact", f"{node.node_id} to {index}"))

    def _install_snapshot(self, node: SimNode, index: int, term: int) -> None:
        core = node.core
        assert core is not None
        # Several may have arrived before the driver got to this Ready; the core names the one it took.
        received = node.received_snapshots
        # A newer one may already be in the core, for a later Ready: keep those.
        node.received_snapshots = {key: data for key, data in received.items() if key[0] > index}
        if (index, term) not in received:
            raise SafetyViolation(f"{node.node_id} installs snapshot {index}@{term}, it received {sorted(received)}")
        # State machine safety: a snapshot only ever covers committed entries, and the same ones everywhere.
        known = self.committed.get(index)
        if known is None or known[0] != term:
            raise SafetyViolation(f"{node.node_id} installs snapshot {index}@{term}; committed there: {known}")
        voters, learners = decode_config(received[(index, term)])
        disk = node.disk
        disk.entries.clear()
        disk.snapshot_index, disk.snapshot_term = index, term
        disk.snapshot_config = (voters, learners)
        core.apply_config(voters, learners)
        node.applied_index = index
        self._note(("install", f"{node.node_id} at {index}"))

    def _write_entries(self, node: SimNode, entries: list[tuple[int, int, bytes]]) -> None:
        disk = node.disk
        identity = self.entry_identity
        for index, term, payload in entries:
            previous_term = disk.term_at(index - 1)
            known = identity.setdefault((index, term), (payload, previous_term))
            if known != (payload, previous_term):
                raise SafetyViolation(
                    f"log matching: {node.node_id} writes ({index}, {term}) = {(payload, previous_term)}, "
                    f"another log holds {known}")
            disk.entries.append((term, payload))

    def _apply(self, node: SimNode, index: int, term: int, payload: bytes) -> None:
        if index != node.applied_index + 1:
            raise SafetyViolation(f"{node.node_id} applies {index} after {node.applied_index}")
        known = self.committed.setdefault(index, (term, payload))
        if known != (term, payload):
            raise SafetyViolation(f"state machine safety: {node.node_id} applies {(term, payload)} at {index}, "
                                  f"another node applied {known}")
        node.applied_index = index
        if payload[0] == ENTRY_CONFIG and node.core is not None:
            node.core.apply_config(*decode_config(payload[1:]))

    def _serve_read(self, node: SimNode, context: bytes, index: int) -> None:
        requested = self.pending_reads.get(context)
        if requested is None:
            raise SafetyViolation(f"{node.node_id} got read state {context!r} nobody asked for")
        # A duplicated request or response may answer the same read twice: the driver keeps the
        # first, but every answer must still be a valid read point.
        asked_at, floor = requested
        if asked_at != node.node_id:
            raise SafetyViolation(f"read {context!r} asked at {asked_at} answered at {node.node_id}")
        if index < floor:
            raise SafetyViolation(f"linearizability: read {context!r} got index {index} but {floor} was "
                                  "committed before it was asked")
        self.reads_served += 1

    # -- Safety checks after every step -------------------------------------------------------------

    def _check_node(self, node: SimNode) -> None:
        core = node.core
        if core is None:
            return
        commit_index = core.commit_index
        if commit_index > self.max_commit_seen:
            # The first node to show a commit index is the leader that just decided it: remember in
            # which term each index was committed (leader completeness is about earlier terms only).
            self.commit_terms.extend([core.term] * (commit_index - self.max_commit_seen))
            self.max_commit_seen = commit_index
        if core.role != "leader":
            return
        term = core.term
        holder = self.leaders.setdefault(term, node.node_id)
        if holder != node.node_id:
            raise SafetyViolation(f"election safety: {holder} and {node.node_id} both lead term {term}")
        log = core.log
        last = log.last_index
        if node.leader_term != term:
            node.leader_term = term
            self.elections += 1
            self._note(("elected", f"{node.node_id} term={term}"))
            self._check_leader_completeness(node)
        else:
            previous_last, previous_term = node.leader_last
            if last < previous_last or log.term_at(previous_last) != previous_term:
                raise SafetyViolation(f"leader append-only: {node.node_id} had ({previous_last}, {previous_term}) "
                                      f"in term {term}, now last={last}")
        node.leader_last = (last, log.term_at(last))

    def _check_leader_completeness(self, node: SimNode) -> None:
        # Raft §5.4: an entry committed in a term before this leader's is in this leader's log. (A
        # delayed vote can still crown a leader of an older term, which need not hold later commits.)
        assert node.core is not None
        log = node.core.log
        highest = bisect.bisect_left(self.commit_terms, node.core.term)
        if highest == 0:
            return
        if log.last_index < highest:
            raise SafetyViolation(f"leader completeness: {node.node_id} leads term {node.core.term} with last "
                                  f"index {log.last_index}, but {highest} was committed in an earlier term")
        first = log.first_index
        for index, entry in zip(range(first, highest + 1), log.entries(first, highest), strict=True):
            known = self.committed.get(index)
            if known is not None and entry != known:
                raise SafetyViolation(f"leader completeness: {node.node_id} holds {entry} at {index}, "
                                      f"committed was {known}")

    # -- Liveness after healing ---------------------------------------------------------------------

    def _members(self, leader: SimNode) -> list[SimNode]:
        assert leader.core is not None
        return [self.nodes[node_id] for node_id in (*leader.core.voters, *leader.core.learners)]

    def _stable_leader(self) -> SimNode | None:
        # A node removed while cut off may still believe it leads an old term (with check-quorum and
        # pre-vote off nobody tells it otherwise); only members of the newest leader's configuration count.
        leaders = sorted((self.nodes[node_id] for node_id in self._believed_leaders()),
                         key=lambda node: node.core.term if node.core is not None else 0)
        if not leaders:
            return None
        leader = leaders[-1]
        core = leader.core
        assert core is not None
        members = self._members(leader)
        if any(other is not leader and other in members for other in leaders):
            return None
        if core.log.term_at(core.commit_index) != core.term or core.transfer_target is not None:
            return None
        for node in members:
            if node.core is None or node.core.term != core.term or node.core.leader_id != leader.node_id:
                return None
        return leader

    def _check_liveness(self) -> None:
        # Stable for a whole election timeout: a leader whose check-quorum window still covers the
        # partition may rightly step down once more right after the heal.
        deadline = self.now + ELECTION_BOUND
        settled: tuple[str, int] | None = None
        settled_at = self.now
        while True:
            leader = self._stable_leader()
            current = (leader.node_id, leader.core.term) if leader is not None and leader.core is not None else None
            if current != settled:
                settled, settled_at = current, self.now
            if leader is not None and self.now - settled_at > ELECTION_TICKS:
                break
            if self.now >= deadline:
                raise SafetyViolation(f"liveness: no leader stable for {ELECTION_TICKS} ticks within "
                                      f"{ELECTION_BOUND} ticks of healing")
            self._tick_round()
        # Catching up a lagging follower takes about one round trip (<= 2 healed ticks) per append,
        # and with a small max_append_bytes an append may carry a single entry.
        assert leader.core is not None
        members = self._members(leader)
        backlog = leader.core.last_index - min(node.core.commit_index for node in members
                                               if node.core is not None)
        deadline = self.now + COMMIT_BOUND + 2 * backlog
        proposed: list[tuple[int, int]] = []
        for _ in range(5):
            last = self._propose(leader.node_id)
            if last is None:
                raise SafetyViolation(f"liveness: stable leader {leader.node_id} refused a proposal")
            proposed.append((last, leader.core.term))
            self._tick_round()
        highest = max(index for index, _ in proposed)
        while any(node.applied_index < highest for node in members):
            if self.now >= deadline:
                raise SafetyViolation(f"liveness: proposals up to {highest} not applied everywhere by tick "
                                      f"{deadline} (backlog {backlog} entries when the leader was stable)")
            self._tick_round()
        for index, term in proposed:
            if self.committed[index][0] != term:
                raise SafetyViolation(f"liveness: proposal at {index} (term {term}) was replaced by "
                                      f"{self.committed[index]}")
            kind = self.committed[index][1][0]
            if kind != ENTRY_NORMAL:
                raise SafetyViolation(f"entry {index} has kind {kind}, expected a client command")
