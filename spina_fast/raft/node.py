"""A Raft node: drives the Cython ``RaftCore`` with real timers, sockets and fsync.

The loop follows the core's Ready contract: install a received snapshot, persist (one group-committed fsync
for everything the Ready carries), then send, then apply, then ``advance``. Client commands arriving
meanwhile are batched into one ``propose`` call per event-loop turn, so one AppendEntries and one fsync
cover many of them.

Writes sent to a follower are forwarded to the leader over the Raft transport (FORWARD frames); the
follower answers its client with the leader's result. Cluster operations (join, remove, promote, transfer)
travel the same way as ADMIN frames. Reads: ``read_barrier`` is Raft §6.4 ReadIndex (linearizable, on any
node); plain reads are served locally.

Snapshots: once ``snapshot_entries`` entries (give or take half of that, so the nodes of a cluster take
theirs at different indexes: ``_next_snapshot_index``) or ``snapshot_bytes`` bytes were applied since the last
one, the state machine's ``snapshot()`` is written to a CRC'd file beside the WAL (``snapshots.py``); the WAL
and the in-memory log are then compacted up to ``catch_up_entries`` behind it, so a follower a little
behind still catches up from the log. A follower further behind gets the newest snapshot file streamed in
chunks (MSG_SNAPSHOT frames, each CRC'd by the framing, at most ``SNAPSHOT_WINDOW`` unacknowledged),
verifies the whole file's checksum, and only then lets its core install it. A restart loads the newest
snapshot and replays the WAL after it.

Membership: single-server changes (Raft §4.1), each an ENTRY_CONFIG entry carrying the whole configuration
with every member's Raft address (``membership.py``), applied when committed. A joining node is added as a
learner and promoted by the leader once it has caught up. Removing the leader hands leadership over first.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import itertools
import logging
import os
import signal
import struct
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, Protocol

import orjson

from spina_fast import _raft
from spina_fast._raft import (
    MSG_SNAPSHOT,
    MSG_SNAPSHOT_RESPONSE,
    ConfigChangePending,
    FrameError,
    Message,
    RaftCore,
    decode_message,
    encode_frame,
    encode_message,
)
from spina_fast.config import HostPort, parse_host_port
from spina_fast.errors import InvalidRequest, NotLeader, SpinaError, Timeout, Unavailable
from spina_fast.raft.membership import ClusterConfig
from spina_fast.raft.snapshots import (
    SnapshotCorrupted,
    SnapshotStore,
    encode_snapshot,
    snapshot_name,
    verify_snapshot_file,
)
from spina_fast.raft.storage import RaftStorage, StorageCorrupted, StorageError
from spina_fast.raft.transport import RaftTransport

if TYPE_CHECKING:
    from spina_fast.config import AgentConfig

log = logging.getLogger(__name__)

KIND_FORWARD = 201
KIND_FORWARD_RESULT = 202
KIND_ADMIN = 203
_FORWARD = struct.Struct(">Q")
_FORWARD_RESULT = struct.Struct(">QB")
_FORWARD_OK, _FORWARD_NOT_LEADER, _FORWARD_FAILED = 0, 1, 2
FORWARD_CONNECT_SECONDS = 2.0
PROPOSE_TIMEOUT_SECONDS = 10.0  # a write not applied by then fails with Timeout (it may still commit)

DEFAULT_SNAPSHOT_ENTRIES = 10_000
DEFAULT_SNAPSHOT_BYTES = 64 << 20
DEFAULT_CATCH_UP_ENTRIES = 1_000
SNAPSHOT_CHUNK_BYTES = 256 << 10
SNAPSHOT_WINDOW = 8
SNAPSHOT_STALL_SECONDS = 10.0
# A snapshot costs time in proportion to the whole state (0.3-0.4 s at 100k KV keys), not to the entries
# since the last one. Taken on the event loop (where the OS cannot fork, below), the next one waits at least
# this many times as long as the last one stopped the loop: snapshots then take at most 1/SNAPSHOT_PACING of
# the loop's time, however large the state (the Raft thesis, §5.1.3, likewise spaces snapshots by their
# cost). The log may then hold more than snapshot_entries entries; snapshot_bytes still caps it.
SNAPSHOT_PACING = 20
# The state machine's snapshot() must see one applied index, so run on the event loop it would stop it for
# that long (heartbeats too: long enough, and the followers elect another leader). Where the OS can fork, a
# child process serializes and writes the snapshot instead, from its copy-on-write image of the state as
# applied at the fork (as Redis's BGSAVE does), while the node goes on serving. Its CPU time is paced too,
# by this factor: at most 1/SNAPSHOT_CHILD_PACING of a core goes to snapshots (with the in-loop rate, 10k
# entries between snapshots of 100k+ keys cost more CPU than the writes themselves: benchmarks/raft_writes.py).
SNAPSHOT_IN_CHILD = hasattr(os, "fork") and hasattr(os, "wait4")
SNAPSHOT_CHILD_PACING = 4
try:  # Linux: have the kernel kill a snapshot child whose node died (a kill -9 must not leave it writing)
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None
_PR_SET_PDEATHSIG = 1
# ioprio_set(2) has no wrapper in glibc or Python: the raw syscall (x86-64 and arm64 numbers), where known.
_SYS_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}.get(os.uname().machine, 0)
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_BEST_EFFORT_LOWEST = (2 << 13) | 7  # IOPRIO_CLASS_BE, level 7
try:
    _syscall: Any = ctypes.CDLL(None, use_errno=True).syscall if _SYS_IOPRIO_SET and sys.platform == "linux" else None
except (OSError, AttributeError):
    _syscall = None
# A learner this close to the commit index is promoted: one more round of appends brings it level.
PROMOTE_LAG = 64
REMOVED_PEER_GRACE_SECONDS = 5.0
_CHUNK_ACK = b"chunk"
_CONFIG_KIND = bytes((_raft.ENTRY_CONFIG,))
_NORMAL_KIND = bytes((_raft.ENTRY_NORMAL,))


def _write_snapshot_in_child(state_machine: StateMachine, snapshots: SnapshotStore, index: int, term: int,
                             config: ClusterConfig) -> NoReturn:
    """The forked child's whole life: serialize, write, fsync, publish, exit. It must never return into its
    copy of the parent's event loop, and touches no lock another thread of the parent may have held at the
    fork (no logging, no buffered stderr, no imports)."""
    status = 1
    try:
        parent = os.getppid()
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the node died before the line above took effect
            os._exit(1)
        # The parent's signal wake-up pipe and handlers are not ours; nor is its garbage (finalizers could
        # close or write to the parent's sockets).
        signal.set_wakeup_fd(-1)
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, signal.SIG_DFL)
        gc.disable()
        # A burst of writes at a large state: the WAL fsyncs of the nodes, whose delays clients see, go first.
        # (Not a lower CPU priority too: on a saturated machine that starved the child for many seconds, and the
        # log grows until a snapshot completes.)
        if _syscall is not None:
            _syscall(_SYS_IOPRIO_SET, _IOPRIO_WHO_PROCESS, 0, _IOPRIO_BEST_EFFORT_LOWEST)
        # In pieces where the state machine offers them (ReplicatedState): one buffer would copy the state again.
        pieces = getattr(state_machine, "snapshot_pieces", None)
        snapshots.write(index, term, config, pieces() if pieces is not None else state_machine.snapshot())
        status = 0
    except BaseException:  # reported through the exit status; the trace goes to the agent's stderr
        os.write(2, f"snapshot child for index {index} failed:\n{traceback.format_exc()}".encode())
    finally:
        os._exit(status)


def _expire(future: asyncio.Future[Any], timeout: float) -> None:
    if not future.done():
        future.set_exception(Timeout(f"the write was not confirmed within {timeout:g}s; it may still commit"))


class StateMachine(Protocol):
    def apply(self, index: int, command: bytes) -> Any: ...
    def snapshot(self) -> bytes: ...
    def restore(self, data: bytes) -> None: ...


@dataclass
class _OutgoingSnapshot:
    """A snapshot being streamed to one follower: acknowledged bytes wake the sender."""

    index: int
    acked: int = 0
    progress: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _IncomingSnapshot:
    leader: str
    index: int
    term: int
    path: Path
    file: BinaryIO
    received: int = 0


class RaftNode:
    def __init__(self, node_id: str, raft_addr: HostPort, peers: dict[str, HostPort], data_dir: Path,
                 state_machine: StateMachine, *, tick_seconds: float = 0.05, election_ticks: int = 10,
                 heartbeat_ticks: int = 2, fsync: bool = True, seed: int | None = None,
                 snapshot_entries: int = DEFAULT_SNAPSHOT_ENTRIES, snapshot_bytes: int = DEFAULT_SNAPSHOT_BYTES,
                 catch_up_entries: int = DEFAULT_CATCH_UP_ENTRIES, join: str | None = None,
                 transfer_on_stop: bool = True) -> None:
        if snapshot_entries < 1 or snapshot_bytes < 1 or catch_up_entries < 0:
            raise ValueError("snapshot thresholds must be positive and catch_up_entries not negative")
        self.node_id = node_id
        self.state_machine = state_machine
        self.tick_seconds = tick_seconds
        self.election_ticks = election_ticks
        self.snapshot_entries = snapshot_entries
        self.snapshot_bytes = snapshot_bytes
        self.catch_up_entries = catch_up_entries
        self.transfer_on_stop = transfer_on_stop
        raft_dir = data_dir / "raft"
        self.storage = RaftStorage.open(raft_dir, fsync=fsync)
        try:
            self.snapshots = SnapshotStore(raft_dir, fsync=fsync)
            snapshot = self.snapshots.load_latest()
        except BaseException:
            self.storage.close()
            raise
        term, voted_for, commit_index = self.storage.hard_state
        fresh = snapshot is None and term == 0 and self.storage.last_index == 0
        # --join: a node with nothing on disk knows no configuration until the cluster adds it.
        self._join = join if fresh else None
        bootstrap = ClusterConfig() if self._join else ClusterConfig({node_id: raft_addr, **peers})
        snapshot_index = snapshot_term = 0
        config = bootstrap
        if snapshot is not None:
            meta, data = snapshot
            state_machine.restore(data)
            snapshot_index, snapshot_term = meta.index, meta.term
            # A snapshot restored from a backup carries no configuration: the flags give it.
            config = meta.config if meta.config is not None else bootstrap
        entries = self._log_after_snapshot(snapshot_index, snapshot_term)
        self.config = config
        self._snapshot_phase = self._phase_in(config)
        self.core = RaftCore(node_id, list(config.voters), learners=list(config.learners),
                             election_ticks=election_ticks, heartbeat_ticks=heartbeat_ticks,
                             seed=seed if seed is not None else int.from_bytes(node_id.encode()[:8], "big"))
        self._persisted_term_vote = (term, voted_for)
        last_index = entries[-1][0] if entries else snapshot_index
        self.core.restore(term, voted_for, min(commit_index, last_index), entries, snapshot_index, snapshot_term)
        self.transport = RaftTransport(node_id, raft_addr, {member: address for member, address
                                                            in config.members.items() if member != node_id},
                                       self._on_frame)
        self.raft_addr = raft_addr
        self.applied_index = snapshot_index
        self.snapshot_index = snapshot_index
        self._bytes_since_snapshot = 0
        self._snapshot_task: asyncio.Task[None] | None = None
        self._next_snapshot_at = 0.0  # time.monotonic() before which no snapshot starts (SNAPSHOT_PACING)
        self._outgoing: dict[str, _OutgoingSnapshot] = {}
        self._incoming: _IncomingSnapshot | None = None
        self._received: dict[tuple[int, int], Path] = {}  # verified, stepped into the core, not installed
        self._ready = asyncio.Event()
        self._proposals: list[tuple[bytes, asyncio.Future[Any]]] = []
        self._held: list[tuple[bytes, asyncio.Future[Any]]] = []
        self._flush_scheduled = False
        self._pending: dict[int, tuple[int, asyncio.Future[Any]]] = {}
        self._reads: dict[bytes, asyncio.Future[int]] = {}
        self._applied_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._forwards: dict[int, tuple[asyncio.Future[Any], int, bytes]] = {}
        # Forwards waiting for a leader or a connection to it, in submission order (_drain_forward_backlog).
        self._forward_backlog: deque[tuple[int, bytes, asyncio.Future[Any]]] | None = None
        self._request_ids = itertools.count(1)
        self._expiries: deque[tuple[float, asyncio.Future[Any]]] = deque()  # submit(): see _expire_submitted
        self._last_leader_contact = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._serving: set[asyncio.Future[Any]] = set()  # forwarded requests being answered
        self._frames_out: dict[str, list[tuple[bytes, asyncio.Future[Any] | None]]] = {}  # see _queue_frame
        self._frames_out_scheduled = False
        self._last_forward_received = 0.0
        self._promoting: str | None = None
        self._running = False
        self.on_role_change: Callable[[str, str | None], None] | None = None
        # Sees every batch of committed entries right after it is applied (continuous backup, raft/backup.py).
        self.on_commit: Callable[[list[tuple[int, int, bytes]]], None] | None = None

    @classmethod
    def from_config(cls, config: AgentConfig, state_machine: StateMachine) -> RaftNode:
        """The node an agent with ``config`` runs."""
        return cls(config.node_id, config.raft_addr, config.peers, config.data_dir, state_machine,
                   tick_seconds=config.tick_seconds, election_ticks=config.election_ticks,
                   heartbeat_ticks=config.heartbeat_ticks, fsync=config.fsync,
                   snapshot_entries=config.snapshot_entries, snapshot_bytes=config.snapshot_bytes,
                   catch_up_entries=config.snapshot_catch_up_entries,
                   join=str(config.join) if config.join is not None else None)

    def _log_after_snapshot(self, snapshot_index: int, snapshot_term: int) -> list[tuple[int, int, bytes]]:
        """The WAL's entries after the snapshot point, checked against the snapshot."""
        storage = self.storage
        if storage.snapshot_index > snapshot_index:
            self.storage.close()
            raise StorageCorrupted(storage.directory, 0,
                                   f"the log is compacted up to {storage.snapshot_index} but the newest "
                                   f"snapshot file is at {snapshot_index}: the snapshot is missing")
        entries = storage.entries()
        start = next((position for position, entry in enumerate(entries) if entry[0] > snapshot_index),
                     len(entries))
        at_snapshot = entries[start - 1] if start > 0 else None
        if snapshot_index and (storage.last_index < snapshot_index
                               or (at_snapshot is not None and at_snapshot[1] != snapshot_term)):
            # A snapshot installed from the leader, the crash came before the log was reset: what the log
            # holds after it belonged to a diverged history.
            storage.compact(snapshot_index, snapshot_term, discard_log=True)
            return []
        return entries[start:]

    # --- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> HostPort:
        bound = await self.transport.start()
        self.raft_addr = bound
        self._running = True
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run_ready()), loop.create_task(self._run_ticks())]
        self._ready.set()
        if self._join is not None:
            try:
                await self._join_cluster(self._join)
            except BaseException:
                await self.stop()
                raise
        return bound

    async def _join_cluster(self, http_addr: str, timeout: float = 60.0) -> None:
        """Ask a member (any node; it forwards to the leader) to add this node as a learner."""
        import aiohttp

        url = f"http://{http_addr}/v1/spina/cluster/join"
        body = {"node_id": self.node_id, "raft_addr": str(self.raft_addr)}
        deadline = time.monotonic() + timeout
        delay = 0.1
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            while True:
                try:
                    async with session.post(url, json=body) as response:
                        document = await response.json(content_type=None)
                        if response.status == 200:
                            break
                        if response.status == 400:
                            raise InvalidRequest(f"{http_addr} refused the join: {document.get('error')}")
                        reason = str(document.get("error"))
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    reason = str(exc) or type(exc).__name__
                if time.monotonic() + delay > deadline:
                    raise Unavailable(f"could not join the cluster through {http_addr} within {timeout:g}s: "
                                      f"{reason}")
                log.info("join attempt failed; retrying", extra={"via": http_addr, "reason": reason})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        config = ClusterConfig.from_json(document["config"])
        # Until the log catches up, the configuration the cluster just committed is the best knowledge.
        if self.applied_index == 0:
            self._adopt_config(config)
        log.info("joined the cluster as a learner", extra={"via": http_addr, "voters": sorted(config.voters)})

    async def stop(self) -> None:
        if self._running and self.transfer_on_stop and self.is_leader and len(self.core.voters) > 1:
            # A graceful stop of the leader hands over first: writes pause for one election round trip
            # instead of an election timeout.
            try:
                await self.transfer_leadership(None, timeout=self.election_ticks * self.tick_seconds * 2)
                await self._drain_forwards(timeout=3.0)
            except SpinaError as exc:
                log.warning("leadership transfer on shutdown failed", extra={"reason": exc.message})
        self._running = False
        for task in [*self._tasks, *self._background]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        await self.transport.close()
        self._fail_all(Unavailable("the node is shutting down"))
        self._close_incoming()
        self.storage.close()

    async def _drain_forwards(self, timeout: float) -> None:
        """After handing over: stay reachable until the followers know the new leader (they send here until
        its first heartbeat reaches them, and get "not leader" answers they retry elsewhere), and until every
        write that went through this node has its answer."""
        deadline = time.monotonic() + timeout
        await asyncio.sleep(self.tick_seconds * self.election_ticks / 2)
        quiet = self.tick_seconds * 4  # no forwarded request for this long: the followers have moved on
        while time.monotonic() < deadline and (self._forwards or self._held or self._proposals or self._serving
                                               or time.monotonic() - self._last_forward_received < quiet):
            await asyncio.sleep(self.tick_seconds / 5)

    def _fail_all(self, error: Exception) -> None:
        for _, future in itertools.chain(self._proposals, self._held):
            if not future.done():
                future.set_exception(error)
        self._proposals.clear()
        self._held.clear()
        for future in itertools.chain((f for _, f in self._pending.values()), self._reads.values(),
                                      (f for f, _, _ in self._forwards.values()),
                                      (f for _, f in self._applied_waiters)):
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        self._expiries.clear()
        self._reads.clear()
        self._forwards.clear()
        self._applied_waiters.clear()

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # --- status ---------------------------------------------------------------------------------------

    @property
    def role(self) -> str:
        return str(self.core.role)

    @property
    def is_leader(self) -> bool:
        return self.core.role == "leader"

    @property
    def leader_id(self) -> str | None:
        leader = self.core.leader_id
        return str(leader) if leader else None

    @property
    def addresses(self) -> dict[str, HostPort]:
        """The voters' Raft addresses (what Consul's /v1/status/peers lists)."""
        return {member: (self.raft_addr if member == self.node_id else self._address_of(member) or address)
                for member, address in self.config.voters.items()} or {self.node_id: self.raft_addr}

    def _address_of(self, node_id: str) -> HostPort | None:
        if node_id == self.node_id:
            return self.raft_addr
        return self.transport.peers.get(node_id) or self.config.address_of(node_id)

    def leader_address(self) -> str:
        leader = self.leader_id
        address = self._address_of(leader) if leader else None
        return str(address) if address is not None else ""

    def last_contact_ms(self) -> int:
        """Milliseconds since this node last heard from the leader (0 on the leader itself)."""
        if self.is_leader:
            return 0
        if not self._last_leader_contact:
            return -1
        return int((time.monotonic() - self._last_leader_contact) * 1000)

    def status(self, with_hash: bool = False) -> dict[str, Any]:
        """What ``GET /v1/spina/raft/status`` answers. ``with_hash`` (``?hash``) adds the state machine's hash,
        which reads the whole state on the loop (about 0.4 s per 100k keys): a monitor polling the leader must
        not stop it past the election timeout."""
        core = self.core
        document: dict[str, Any] = {
            "node_id": self.node_id, "role": self.role, "term": core.term, "leader": self.leader_id,
            "leader_address": self.leader_address() or None, "commit_index": core.commit_index,
            "applied_index": self.applied_index, "last_index": core.last_index,
            "first_index": core.log.first_index, "snapshot_index": self.snapshot_index,
            "log_entries": len(core.log), "log_bytes": core.log.payload_bytes,
            "voters": {member: str(self._address_of(member) or "") for member in core.voters},
            "learners": {member: str(self._address_of(member) or "") for member in core.learners},
            "wal_segments": self.storage.segment_count,
            # Group commit's batching: entries per fsync is (last_index delta) / (wal_fsyncs delta).
            "wal_fsyncs": self.storage.fsync_count, "wal_inline_fsyncs": self.storage.inline_fsync_count,
        }
        state_hash = getattr(self.state_machine, "state_hash", None)
        if with_hash and callable(state_hash):
            document["state_hash"] = state_hash()
        if self.is_leader:
            document["progress"] = {}
            for peer in [*core.voters, *core.learners]:
                if peer != self.node_id:
                    progress = core.progress(peer)
                    document["progress"][peer] = {"match_index": progress.match_index,
                                                  "next_index": progress.next_index, "state": progress.state}
        return document

    # --- the Ready loop ----------------------------------------------------------------------------------

    async def _run_ticks(self) -> None:
        while self._running:
            await asyncio.sleep(self.tick_seconds)
            self.core.tick()
            if self._expiries:
                self._expire_submitted()
            if self.is_leader:
                self._leader_housekeeping()
            self._maybe_snapshot()  # one deferred by pacing, with no Ready since to look again
            self._ready.set()

    def _leader_housekeeping(self) -> None:
        core = self.core
        if self._held and core.transfer_target is None:
            # The transfer was abandoned and we still lead: what waited for it goes in now.
            held, self._held = self._held, []
            self._proposals[:0] = held
            self._flush_proposals()
        if self._promoting is None and core.pending_config_index <= core.applied_index:
            for learner in core.learners:
                progress = core.progress(learner)
                if progress.state == "replicate" and progress.match_index + PROMOTE_LAG >= core.commit_index:
                    self._promoting = learner
                    self._spawn(self._promote(learner))
                    break

    async def _promote(self, learner: str) -> None:
        try:
            await self._change_config(lambda config: config.with_promoted(learner), timeout=10.0)
            log.info("learner promoted to voter", extra={"peer": learner})
        except SpinaError as exc:
            log.info("learner promotion postponed", extra={"peer": learner, "reason": exc.message})
        finally:
            self._promoting = None

    async def _run_ready(self) -> None:
        while self._running:
            await self._ready.wait()
            self._ready.clear()
            while self.core.has_ready():
                try:
                    await self._handle_ready()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # A failed fsync or apply leaves state we cannot trust: stop serving rather than diverge.
                    log.critical("raft ready loop failed; node stops serving", exc_info=True)
                    self._running = False
                    self._fail_all(Unavailable("the node hit a storage error and stopped serving"))
                    return

    async def _handle_ready(self) -> None:
        ready = self.core.ready()
        hard_state = ready.hard_state
        if ready.snapshot is not None:
            self._install_received_snapshot(*ready.snapshot)
        # Raft §10.2.1: a leader may send AppendEntries before its own fsync, since its own copy counts
        # towards a quorum only after ``advance``. Anything else a node says (votes, append acks) promises
        # durable state, so it waits for the fsync; so does a leader whose term or vote just changed.
        send_first = self.core.role == "leader" and (
            hard_state is None or (hard_state[0], hard_state[1]) == self._persisted_term_vote)
        if send_first:
            self._send(ready.messages)
        if hard_state is not None or ready.entries:
            self.storage.write(hard_state, ready.entries)
            # A commit index alone need not be durable (it is re-learned from the leader after a restart),
            # so it rides along with the next fsync instead of costing one of its own.
            term_or_vote_changed = (hard_state is not None
                                    and (hard_state[0], hard_state[1]) != self._persisted_term_vote)
            if ready.entries or term_or_vote_changed:
                await self.storage.sync()
            if hard_state is not None:
                self._persisted_term_vote = (hard_state[0], hard_state[1])
        if not send_first:
            self._send(ready.messages)
        for index, term, payload in ready.committed:
            self._apply(index, term, payload)
        if self.on_commit is not None and ready.committed:
            self.on_commit(ready.committed)
        for context, index in ready.read_states:
            future = self._reads.pop(bytes(context), None)
            if future is not None and not future.done():
                future.set_result(index)
        if ready.soft_state is not None:
            role, leader = ready.soft_state
            log.info("raft role changed", extra={"role": role, "leader": leader, "term": self.core.term})
            if role != "leader":
                self._reroute_queued_proposals()
                self._outgoing.clear()
            if self.on_role_change is not None:
                self.on_role_change(role, leader)
        self.core.advance(ready)
        if self._applied_waiters:
            still_waiting = []
            for index, waiter in self._applied_waiters:
                if index <= self.applied_index:
                    if not waiter.done():
                        waiter.set_result(None)
                else:
                    still_waiting.append((index, waiter))
            self._applied_waiters = still_waiting
        self._maybe_snapshot()

    def _send(self, messages: list[Any]) -> None:
        # One write per peer per Ready, however many messages it carries (appends proposed while the last
        # fsync ran, their acks): on loopback each write also runs the receiver's TCP path and wakes it.
        frames: dict[str, list[bytes]] = {}
        for message in messages:
            if message.type == MSG_SNAPSHOT:
                self._start_snapshot_stream(message.dst)
                continue
            frames.setdefault(message.dst, []).append(encode_message(message))
        for peer, batch in frames.items():
            self.transport.send_batch(peer, batch)

    def _apply(self, index: int, term: int, payload: bytes) -> None:
        result: Any = None
        error: Exception | None = None
        kind = payload[:1]
        if kind == _NORMAL_KIND:
            try:
                result = self.state_machine.apply(index, payload[1:])
            except InvalidRequest as exc:
                error = exc
            self._bytes_since_snapshot += len(payload)
        elif kind == _CONFIG_KIND:
            config = ClusterConfig.decode(payload[1:])
            self._adopt_config(config)
            result = config.to_json()
            log.info("cluster configuration applied", extra={"index": index, "voters": sorted(config.voters),
                                                              "learners": sorted(config.learners)})
        self.applied_index = index
        pending = self._pending.pop(index, None)
        if pending is not None:
            proposed_term, future = pending
            if future.done():
                return
            if proposed_term != term:
                # Another leader's entry took this index: ours definitely did not commit.
                future.set_exception(NotLeader("leadership changed before the write committed",
                                               leader=self.leader_address() or None))
            elif error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

    def _adopt_config(self, config: ClusterConfig) -> None:
        previous = self.config
        self.config = config
        self._snapshot_phase = self._phase_in(config)
        self.core.apply_config(list(config.voters), list(config.learners))
        for member, address in config.members.items():
            if member != self.node_id:
                self.transport.add_peer(member, address)
        for member in previous.members:
            if member not in config.members and member != self.node_id:
                self._outgoing.pop(member, None)
                if self._running:
                    # Not at once: answers to requests it forwarded here (its own removal, say) are in flight.
                    asyncio.get_running_loop().call_later(REMOVED_PEER_GRACE_SECONDS, self._forget_peer, member)

    def _phase_in(self, config: ClusterConfig) -> int:
        members = sorted(config.members) if self.node_id in config.members else [self.node_id]
        return members.index(self.node_id) * self.snapshot_entries // (2 * len(members))

    def _forget_peer(self, member: str) -> None:
        if member not in self.config.members and self._running:
            self.transport.remove_peer(member)

    # --- snapshots: taking one ------------------------------------------------------------------------

    def _maybe_snapshot(self) -> None:
        if self._snapshot_due():
            self._snapshot_task = self._spawn(self._take_snapshot())

    def _snapshot_due(self) -> bool:
        if self._snapshot_task is not None and not self._snapshot_task.done():
            return False
        if self._bytes_since_snapshot >= self.snapshot_bytes:
            return True
        return self.applied_index >= self._next_snapshot_index() and time.monotonic() >= self._next_snapshot_at

    def _next_snapshot_index(self) -> int:
        """Where this node's next snapshot is due: ``snapshot_entries`` after the last one, moved (by less than
        half of that) to this node's phase. Every node applies the same indexes, so with one threshold all of
        them would fork at the same moment, on the same cores and disk (benchmarks/README.md, "Snapshots and
        the half-load tail"); the i-th of n members in name order snapshots at indexes k * snapshot_entries + i *
        snapshot_entries / (2n) instead, and comes back to that phase after a late snapshot or one installed
        from the leader."""
        every = self.snapshot_entries
        nominal = self.snapshot_index + every
        skew = (self._snapshot_phase - nominal) % every
        return nominal + (skew - every if skew >= every - every // 2 else skew)

    def current_config(self) -> ClusterConfig:
        """The configuration with this node's own address as bound (port 0 resolved)."""
        config = self.config
        if self.node_id in config.voters:
            return ClusterConfig({**config.voters, self.node_id: self.raft_addr}, dict(config.learners))
        if self.node_id in config.learners:
            return ClusterConfig(dict(config.voters), {**config.learners, self.node_id: self.raft_addr})
        return config

    def _snapshot_point(self) -> tuple[int, int, ClusterConfig]:
        index = self.applied_index
        if index < self.core.log.snapshot_index:
            # The core took in a snapshot from the leader that the Ready loop has not installed yet.
            raise Unavailable("a snapshot from the leader is being installed; try again")
        return index, self.core.log.term_at(index), self.current_config()

    def snapshot_now(self) -> tuple[int, int, ClusterConfig, bytes]:
        """The state machine as of the applied index, with that index's term and configuration."""
        return *self._snapshot_point(), self.state_machine.snapshot()

    def _pace_snapshots(self, seconds: float, factor: float = SNAPSHOT_PACING) -> None:
        self._next_snapshot_at = time.monotonic() + factor * seconds

    async def _take_snapshot(self) -> None:
        started = time.perf_counter()
        try:
            index, term, config = self._snapshot_point()
        except Unavailable:
            return  # the next Ready (the installed snapshot) makes this one unnecessary
        self._bytes_since_snapshot = 0
        compact_to = index - self.catch_up_entries
        compact_term = self.core.log.term_at(compact_to) if compact_to > self.core.log.snapshot_index else 0
        self.storage.inline_fsync_allowed = False
        costs: dict[str, float] = {}
        try:
            if SNAPSHOT_IN_CHILD:
                size = await self._snapshot_in_child(index, term, config, costs)
            else:
                data = self.state_machine.snapshot()
                self._pace_snapshots(time.perf_counter() - started)
                size = len(data)
                await asyncio.to_thread(self.snapshots.write, index, term, config, data)
        except OSError as exc:
            log.error("writing a snapshot failed; the log keeps growing until one succeeds",
                      extra={"index": index, "reason": str(exc)})
            return
        finally:
            self.storage.inline_fsync_allowed = True
        self.snapshot_index = max(self.snapshot_index, index)
        compacting = time.perf_counter()
        deletions = False
        if compact_term and compact_to > self.core.log.snapshot_index:
            deletions = self.storage.compact(compact_to, compact_term, defer_deletion=True)
            self.core.log.compact_to(compact_to, compact_term)
        costs["compact_ms"] = (time.perf_counter() - compacting) * 1000
        if deletions:
            try:
                await asyncio.to_thread(self.storage.delete_detached_segments)
            except (OSError, StorageError) as exc:
                # The log is intact (the files are only what it no longer needs): the next compaction retries.
                log.error("deleting compacted log segments failed", extra={"reason": str(exc)})
        # What each part cost (the loop stops only for the fork and the compaction): benchmarks read these.
        log.info("snapshot taken", extra={"index": index, "bytes": size, "compacted_to": compact_to,
                                          "seconds": round(time.perf_counter() - started, 3),
                                          **{name: round(value, 1) for name, value in costs.items()}})

    async def _snapshot_in_child(self, index: int, term: int, config: ClusterConfig, costs: dict[str, float]
                                 ) -> int:
        """Have a forked child write (and publish) the snapshot of the state as applied now; returns the
        file's size and adds what it cost to ``costs``. Nothing runs between the caller's reading of the
        applied index and the fork, so the child's state is exactly the state at ``index``."""
        forking = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            _write_snapshot_in_child(self.state_machine, self.snapshots, index, term, config)
        forked = time.perf_counter()
        _, status, usage = await asyncio.to_thread(os.wait4, pid, 0)
        costs.update(fork_ms=(forked - forking) * 1000, child_ms=(time.perf_counter() - forked) * 1000,
                     child_user_ms=usage.ru_utime * 1000, child_system_ms=usage.ru_stime * 1000,
                     child_page_faults=usage.ru_minflt)
        # Its user time is the serializing; its system time is mostly copy-on-write faults and the fsync.
        self._pace_snapshots(usage.ru_utime, SNAPSHOT_CHILD_PACING)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            self.snapshots.temp_path(f"local-{index}").unlink(missing_ok=True)
            raise OSError(f"the snapshot child process exited with status {code}")
        return (self.snapshots.directory / snapshot_name(index, term)).stat().st_size

    # --- snapshots: streaming one to a follower (InstallSnapshot) -------------------------------------

    def _start_snapshot_stream(self, peer: str) -> None:
        if peer in self._outgoing:
            return  # the core asks again while a stream runs; the stream answers
        latest = self.snapshots.latest()
        if latest is None:
            log.error("a follower needs a snapshot but none is on disk", extra={"peer": peer})
            return
        stream = _OutgoingSnapshot(latest[0])
        self._outgoing[peer] = stream
        self._spawn(self._stream_snapshot(peer, stream, *latest))

    async def _stream_snapshot(self, peer: str, stream: _OutgoingSnapshot, index: int, term: int,
                               path: Path) -> None:
        started = time.perf_counter()
        leader_term = self.core.term
        try:
            size = path.stat().st_size
            with path.open("rb") as file:
                offset = 0
                while offset < size:
                    while offset - stream.acked >= SNAPSHOT_WINDOW * SNAPSHOT_CHUNK_BYTES:
                        stream.progress.clear()
                        await asyncio.wait_for(stream.progress.wait(), SNAPSHOT_STALL_SECONDS)
                    if not self.is_leader or self.core.term != leader_term or self._outgoing.get(peer) is not stream:
                        return
                    chunk = file.read(SNAPSHOT_CHUNK_BYTES)
                    done = offset + len(chunk) >= size
                    message = Message(type=MSG_SNAPSHOT, src=self.node_id, dst=peer, term=leader_term,
                                      snapshot_index=index, snapshot_term=term, offset=offset, data=chunk,
                                      done=done)
                    if not self.transport.send(peer, encode_message(message)):
                        return
                    offset += len(chunk)
            log.info("snapshot sent", extra={"peer": peer, "index": index, "bytes": size,
                                             "seconds": round(time.perf_counter() - started, 3)})
        except TimeoutError:
            log.warning("snapshot stream stalled; the follower will be offered it again", extra={"peer": peer})
        except OSError as exc:
            log.error("snapshot stream failed", extra={"peer": peer, "reason": str(exc)})
        finally:
            if self._outgoing.get(peer) is stream:
                # Leave the entry until the core hears the follower's verdict or times the attempt out.
                self._spawn(self._forget_stream_later(peer, stream))

    async def _forget_stream_later(self, peer: str, stream: _OutgoingSnapshot) -> None:
        await asyncio.sleep(self.election_ticks * self.tick_seconds)
        if self._outgoing.get(peer) is stream:
            del self._outgoing[peer]

    def _on_chunk_ack(self, src: str, message: Message) -> None:
        stream = self._outgoing.get(src)
        if stream is not None and message.snapshot_index == stream.index and not message.reject:
            stream.acked = max(stream.acked, message.offset)
            stream.progress.set()

    # --- snapshots: receiving one ---------------------------------------------------------------------

    def _close_incoming(self) -> None:
        incoming, self._incoming = self._incoming, None
        if incoming is not None:
            incoming.file.close()
            incoming.path.unlink(missing_ok=True)

    def _reply(self, to: str, *, reject: bool = False, offset: int = 0, index: int = 0,
               context: bytes = b"") -> None:
        self.transport.send(to, encode_message(Message(
            type=MSG_SNAPSHOT_RESPONSE, src=self.node_id, dst=to, term=self.core.term, reject=reject,
            offset=offset, snapshot_index=index, index=index, context=context)))

    def _receive_chunk(self, src: str, message: Message) -> None:
        if message.term < self.core.term:
            return  # from a deposed leader
        incoming = self._incoming
        if message.offset == 0:
            self._close_incoming()
            path = self.snapshots.temp_path(f"from-{src}-{message.snapshot_index}")
            incoming = self._incoming = _IncomingSnapshot(src, message.snapshot_index, message.snapshot_term,
                                                          path, path.open("wb"))
        if (incoming is None or incoming.leader != src or incoming.index != message.snapshot_index
                or incoming.received != message.offset):
            # A chunk out of order (a lost frame, a restarted stream): start over.
            self._close_incoming()
            self._reply(src, reject=True, index=message.snapshot_index)
            return
        incoming.file.write(message.data)
        incoming.received += len(message.data)
        # The core keeps the leader known and the election timer quiet; it ignores the data.
        self.core.step(Message(type=MSG_SNAPSHOT, src=src, dst=self.node_id, term=message.term,
                               snapshot_index=message.snapshot_index, snapshot_term=message.snapshot_term))
        self._ready.set()
        if not message.done:
            self._reply(src, offset=incoming.received, index=incoming.index, context=_CHUNK_ACK)
            return
        self._incoming = None
        self._spawn(self._finish_incoming(incoming, message))

    async def _finish_incoming(self, incoming: _IncomingSnapshot, message: Message) -> None:
        def seal() -> None:
            incoming.file.flush()
            if self.snapshots.fsync:
                os.fdatasync(incoming.file.fileno())
            incoming.file.close()
        try:
            await asyncio.to_thread(seal)
            meta = await asyncio.to_thread(verify_snapshot_file, incoming.path)
            if (meta.index, meta.term) != (incoming.index, incoming.term):
                raise SnapshotCorrupted(str(incoming.path), f"holds {meta.index}@{meta.term}, the leader "
                                                            f"announced {incoming.index}@{incoming.term}")
        except (SnapshotCorrupted, OSError) as exc:
            log.error("received snapshot refused", extra={"leader": incoming.leader, "reason": str(exc)})
            incoming.path.unlink(missing_ok=True)
            self._reply(incoming.leader, reject=True, index=incoming.index)
            return
        self._received[(incoming.index, incoming.term)] = incoming.path
        self.core.step(Message(type=MSG_SNAPSHOT, src=incoming.leader, dst=self.node_id, term=message.term,
                               snapshot_index=incoming.index, snapshot_term=incoming.term, done=True))
        self._ready.set()

    def _install_received_snapshot(self, index: int, term: int) -> None:
        # Several may have been stepped in before this Ready; the core names the one it took.
        received = self._received
        # A newer one may already be in the core, for a later Ready: keep those.
        self._received = {key: path for key, path in received.items() if key[0] > index}
        if (index, term) not in received:
            raise RuntimeError(f"the core installed snapshot {index}@{term} that this node never received")
        for key, other in received.items():
            if key[0] < index or (key[0] == index and key != (index, term)):
                other.unlink(missing_ok=True)
        path = self.snapshots.publish(received[(index, term)], index, term)
        # The snapshot is durable under its final name before the log forgets what it replaces.
        self.storage.compact(index, term, discard_log=True)
        loaded = self.snapshots.load_latest()
        if loaded is None or loaded[0].index != index:
            raise SnapshotCorrupted(str(path), "vanished right after it was installed")
        meta, data = loaded
        self.state_machine.restore(data)
        if meta.config is not None:
            self._adopt_config(meta.config)
        self.applied_index = index
        self.snapshot_index = index
        self._bytes_since_snapshot = 0
        log.info("snapshot installed", extra={"index": index, "term": term, "bytes": len(data)})

    # --- proposals ----------------------------------------------------------------------------------------

    async def propose(self, command: bytes, timeout: float = PROPOSE_TIMEOUT_SECONDS) -> Any:
        """Replicate ``command`` and return the state machine's result once it is applied here."""
        if timeout == PROPOSE_TIMEOUT_SECONDS:
            return await self.submit(command)
        future = self._submit(command)
        expiry = asyncio.get_running_loop().call_later(timeout, _expire, future, timeout)
        try:
            return await future
        finally:
            expiry.cancel()

    def submit(self, command: bytes) -> asyncio.Future[Any]:
        """``propose`` without a coroutine, for callers that answer from a done callback (the HTTP PUT path):
        the future gets the state machine's result once the command is applied here, or the error
        (``Timeout`` after ``PROPOSE_TIMEOUT_SECONDS``)."""
        future = self._submit(command)
        # Not a timer per write: the futures queue up in submission order with their deadline, and the tick
        # drops the answered ones from the front and fails the expired ones (a timeout up to a tick late).
        self._expiries.append((time.monotonic() + PROPOSE_TIMEOUT_SECONDS, future))
        return future

    def _submit(self, command: bytes) -> asyncio.Future[Any]:
        if not self._running:
            raise Unavailable("the node is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self.is_leader:
            self._proposals.append((command, future))
            if not self._flush_scheduled:
                self._flush_scheduled = True
                loop.call_soon(self._flush_proposals)
        else:
            self._forward(KIND_FORWARD, command, future)
        return future

    def _expire_submitted(self) -> None:
        expiries = self._expiries
        now = time.monotonic()
        while expiries:
            deadline, future = expiries[0]
            if not future.done():
                if deadline > now:
                    return
                _expire(future, PROPOSE_TIMEOUT_SECONDS)
            expiries.popleft()

    def _flush_proposals(self) -> None:
        self._flush_scheduled = False
        batch, self._proposals = self._proposals, []
        if not batch:
            return
        try:
            last_index = self.core.propose([command for command, _ in batch])
        except _raft.NotLeader:
            if self.is_leader and self.core.transfer_target is not None:
                # Handing over: hold the writes for the new leader (or for us again if the transfer fails).
                self._held.extend(batch)
                return
            for command, future in batch:
                self._forward(KIND_FORWARD, command, future)
            return
        term = self.core.term
        for offset, (_, future) in enumerate(batch):
            self._pending[last_index - len(batch) + 1 + offset] = (term, future)
        self._ready.set()

    def _reroute_queued_proposals(self) -> None:
        batch, self._proposals = [*self._held, *self._proposals], []
        self._held = []
        for command, future in batch:
            self._forward(KIND_FORWARD, command, future)

    def _forward(self, kind: int, body: bytes, future: asyncio.Future[Any]) -> None:
        """Send a write (or admin request) to the leader. While no leader is known, or the connection to it is
        not up yet, it waits in one backlog with the others, so a client's pipelined writes reach the leader in
        the order sent: a later one must not overtake an earlier one that is still waiting."""
        if future.done():
            return
        if self._forward_backlog is not None:
            self._forward_backlog.append((kind, body, future))
            return
        leader = self.leader_id
        if leader is None or leader == self.node_id or not self.transport.is_connected(leader):
            # Mid-election, or we learnt of a leader (from its appends) before our own connection to it is
            # up: wait briefly rather than fail a write that can still go through.
            self._forward_backlog = deque([(kind, body, future)])
            self._spawn(self._drain_forward_backlog())
            return
        self._send_forward(leader, kind, body, future)

    def _send_forward(self, leader: str, kind: int, body: bytes, future: asyncio.Future[Any]) -> None:
        request_id = next(self._request_ids)
        self._forwards[request_id] = (future, kind, body)
        future.add_done_callback(lambda _: self._forwards.pop(request_id, None))
        self._queue_frame(leader, encode_frame(kind, _FORWARD.pack(request_id) + body), future)

    async def _drain_forward_backlog(self) -> None:
        """Sends the backlog, in order, as soon as a leader is known and connected (or proposes it here if this
        node leads by then); fails what is left after ``FORWARD_CONNECT_SECONDS``."""
        backlog = self._forward_backlog
        assert backlog is not None
        deadline = time.monotonic() + FORWARD_CONNECT_SECONDS
        try:
            while self._running:
                leader = self.leader_id
                if self.is_leader and self.core.transfer_target is None:
                    for kind, body, future in backlog:
                        if future.done():
                            continue
                        if kind == KIND_FORWARD:
                            self._proposals.append((body, future))
                        else:
                            request = orjson.loads(body)
                            self._spawn(self._admin_into(future, request["op"], request["args"]))
                    self._flush_proposals()
                    return
                if leader is not None and leader != self.node_id and self.transport.is_connected(leader):
                    for kind, body, future in backlog:
                        if not future.done():
                            self._send_forward(leader, kind, body, future)
                    return
                if time.monotonic() > deadline:
                    error = (Unavailable("no leader is known; the cluster may be electing one") if leader is None
                             else Unavailable(f"the leader {leader} is not reachable from this node"))
                    for _, _, future in backlog:
                        if not future.done():
                            future.set_exception(error)
                    return
                await asyncio.sleep(self.tick_seconds / 5)
        finally:
            self._forward_backlog = None

    def _serve_forward(self, src: str, request_id: int, command: bytes) -> None:
        """A write a follower forwarded: proposed at once, so one follower's writes reach the log in the order
        it sent them; the answer goes back from the done callback."""
        if not self.is_leader:
            self._queue_frame(src, encode_frame(KIND_FORWARD_RESULT, _FORWARD_RESULT.pack(request_id,
                                                                                         _FORWARD_NOT_LEADER)))
            return
        future: asyncio.Future[Any]
        try:
            future = self.submit(command)
        except Unavailable as exc:
            future = asyncio.get_running_loop().create_future()
            future.set_exception(exc)
        self._serving.add(future)
        future.add_done_callback(partial(self._answer_forward, src, request_id))

    def _answer_forward(self, src: str, request_id: int, future: asyncio.Future[Any]) -> None:
        self._serving.discard(future)
        error = future.exception() if not future.cancelled() else Unavailable("the write was cancelled")
        if error is None:
            status, body = _FORWARD_OK, orjson.dumps(future.result())
        elif isinstance(error, NotLeader):
            status, body = _FORWARD_NOT_LEADER, b""  # the follower sends it again to whoever leads now
        elif isinstance(error, SpinaError):
            status, body = _FORWARD_FAILED, orjson.dumps({"error": error.message, "code": error.code})
        else:
            log.error("a forwarded write failed", exc_info=error)
            status, body = _FORWARD_FAILED, orjson.dumps({"error": "internal error", "code": Unavailable.code})
        self._queue_frame(src, encode_frame(KIND_FORWARD_RESULT, _FORWARD_RESULT.pack(request_id, status) + body))

    def _queue_frame(self, peer: str, frame: bytes, future: asyncio.Future[Any] | None = None) -> None:
        """Send ``frame`` to ``peer`` at the end of this loop turn, in one write with the others queued meanwhile
        (the writes a follower forwards, their answers): one syscall for many writes instead of one each.
        ``future`` (a forwarded write's) fails if the frame cannot be sent."""
        queued = self._frames_out.get(peer)
        if queued is None:
            queued = self._frames_out[peer] = []
        queued.append((frame, future))
        if not self._frames_out_scheduled:
            self._frames_out_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_queued_frames)

    def _send_queued_frames(self) -> None:
        self._frames_out_scheduled = False
        batches, self._frames_out = self._frames_out, {}
        for peer, queued in batches.items():
            if not self.transport.send_batch(peer, [frame for frame, _ in queued]):
                for _, future in queued:
                    if future is not None and not future.done():
                        future.set_exception(Unavailable(f"the leader {peer} is not reachable from this node"))

    async def _serve_admin(self, src: str, request_id: int, body: bytes) -> None:
        status, answer = _FORWARD_NOT_LEADER, b""
        if self.is_leader:
            try:
                request = orjson.loads(body)
                status, answer = _FORWARD_OK, orjson.dumps(await self.admin(request["op"], request["args"]))
            except (InvalidRequest, Unavailable, Timeout, NotLeader) as exc:
                status, answer = _FORWARD_FAILED, orjson.dumps({"error": exc.message, "code": exc.code})
            except (ValueError, KeyError, TypeError) as exc:
                status, answer = _FORWARD_FAILED, orjson.dumps({"error": f"bad admin request: {exc}",
                                                                "code": InvalidRequest.code})
        self.transport.send(src, encode_frame(KIND_FORWARD_RESULT, _FORWARD_RESULT.pack(request_id, status) + answer))

    def _finish_forward(self, payload: bytes) -> None:
        request_id, status = _FORWARD_RESULT.unpack_from(payload)
        entry = self._forwards.pop(request_id, None)
        if entry is None or entry[0].done():
            return
        future, kind, request = entry
        body = payload[_FORWARD_RESULT.size:]
        if status == _FORWARD_OK:
            future.set_result(orjson.loads(body))
        elif status == _FORWARD_NOT_LEADER:
            # It never reached a leader's log: send it again to whoever leads now.
            self._forward(kind, request, future)
        else:
            error = orjson.loads(body)
            exc_type = InvalidRequest if error.get("code") == InvalidRequest.code else Unavailable
            future.set_exception(exc_type(error["error"]))

    # --- cluster operations -----------------------------------------------------------------------------

    async def admin(self, op: str, args: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """Run a cluster operation on the leader (forwarding it there if this node does not lead).

        ``add_learner`` {node_id, raft_addr}, ``promote`` {node_id}, ``remove`` {node_id},
        ``transfer`` {to: node id or null}. Answers a JSON-able document.
        """
        if not self._running:
            raise Unavailable("the node is not running")
        if not self.is_leader:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._forward(KIND_ADMIN, orjson.dumps({"op": op, "args": args}), future)
            result: dict[str, Any] = await asyncio.wait_for(future, timeout)
            return result
        if op == "add_learner":
            node_id = str(args["node_id"])
            address = parse_host_port(str(args["raft_addr"]), what="raft_addr")
            if address.port == 0:
                raise InvalidRequest("raft_addr needs a real port, not 0")
            if self.config.address_of(node_id) == address:
                return {"config": self.current_config().to_json(), "changed": False}
            config = await self._change_config(lambda config: config.with_learner(node_id, address), timeout)
        elif op == "promote":
            node_id = str(args["node_id"])
            if node_id in self.config.voters:
                return {"config": self.current_config().to_json(), "changed": False}
            config = await self._change_config(lambda config: config.with_promoted(node_id), timeout)
        elif op == "remove":
            node_id = str(args["node_id"])
            if node_id not in self.config.members:
                raise InvalidRequest(f"{node_id!r} is not a member of the cluster")
            if node_id == self.node_id:
                # Raft §4.2.2 lets a leader remove itself, but handing over first avoids an election timeout.
                await self.transfer_leadership(None, timeout=min(timeout, 10.0))
                return await self.admin(op, args, timeout)
            config = await self._change_config(lambda config: config.without(node_id), timeout)
        elif op == "transfer":
            target = args.get("to")
            leader = await self.transfer_leadership(str(target) if target else None, timeout=min(timeout, 10.0))
            return {"leader": leader, "leader_address": self.leader_address()}
        else:
            raise InvalidRequest(f"unknown cluster operation {op!r}")
        return {"config": config, "changed": True}

    async def _admin_into(self, future: asyncio.Future[Any], op: str, args: dict[str, Any]) -> None:
        try:
            result = await self.admin(op, args)
        except SpinaError as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(result)

    async def _change_config(self, change: Callable[[ClusterConfig], ClusterConfig],
                             timeout: float) -> dict[str, Any]:
        """Propose one configuration change (retrying while another is in flight) and wait until applied."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_leader:
                raise Unavailable("leadership moved while changing the configuration; try again")
            new_config = change(self.current_config())
            try:
                index = self.core.propose_config(new_config.encode())
                break
            except ConfigChangePending as exc:
                if time.monotonic() > deadline:
                    raise Unavailable(f"configuration change not started within {timeout:g}s: {exc}") from None
            except _raft.NotLeader:
                raise Unavailable("this node is handing over leadership; try again") from None
            await asyncio.sleep(self.tick_seconds)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[index] = (self.core.term, future)
        self._ready.set()
        try:
            result: dict[str, Any] = await asyncio.wait_for(future, max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            raise Timeout(f"the configuration change at index {index} was not applied within {timeout:g}s; "
                          "it may still be") from None
        return result

    def _best_transfer_target(self) -> str | None:
        peers = [voter for voter in self.core.voters if voter != self.node_id]
        if not peers:
            return None
        return max(peers, key=lambda peer: (self.transport.is_connected(peer),
                                             self.core.progress(peer).match_index))

    async def transfer_leadership(self, to: str | None, timeout: float = 5.0) -> str:
        """Hand leadership to ``to`` (default: the most up-to-date voter) and wait until someone else leads;
        returns the new leader's id. Forwarded to the leader when called on a follower."""
        if not self.is_leader:
            result = await self.admin("transfer", {"to": to}, timeout)
            return str(result["leader"])
        target = to or self._best_transfer_target()
        if target is None:
            raise InvalidRequest("there is no other voter to hand leadership to")
        if target != self.node_id:
            try:
                self.core.transfer_leadership(target)
            except ValueError as exc:
                raise InvalidRequest(str(exc)) from None
            self._ready.set()
        if target == self.node_id:
            return target
        deadline = time.monotonic() + timeout
        while True:
            leader = self.leader_id
            if not self.is_leader and leader is not None:
                return leader
            if self.is_leader and self.core.transfer_target is None:
                raise Timeout(f"{target} did not take over leadership within an election timeout")
            if time.monotonic() > deadline:
                raise Timeout(f"leadership did not move to {target} within {timeout:g}s")
            await asyncio.sleep(self.tick_seconds / 5)

    # --- reads --------------------------------------------------------------------------------------------

    async def read_barrier(self, timeout: float = 5.0) -> int:
        """Raft §6.4 ReadIndex: wait until this node has applied everything committed when called."""
        context = next(self._request_ids).to_bytes(8, "big") + self.node_id.encode()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._reads[context] = future
        # Mid-election (or just restarted) no leader is known: wait a little for one, as writes do.
        deadline = time.monotonic() + min(timeout, FORWARD_CONNECT_SECONDS)
        while True:
            try:
                self.core.read_index(context)
                break
            except _raft.NotLeader:
                if time.monotonic() > deadline or not self._running:
                    self._reads.pop(context, None)
                    raise Unavailable("no leader is known; a consistent read needs one") from None
            await asyncio.sleep(self.tick_seconds / 2)
        self._ready.set()
        try:
            index = await asyncio.wait_for(future, timeout)
            await self.wait_applied(index, timeout)
        except TimeoutError:
            raise Timeout(f"no read index confirmed by a quorum within {timeout:g}s") from None
        finally:
            self._reads.pop(context, None)
        return index

    async def wait_applied(self, index: int, timeout: float) -> None:
        if index <= self.applied_index:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._applied_waiters.append((index, future))
        await asyncio.wait_for(future, timeout)

    async def backup(self, timeout: float = 10.0) -> tuple[int, int, Iterator[bytes]]:
        """A consistent snapshot of the cluster's state for ``spina snapshot save``: linearizable (everything
        committed before the call is in it), as (index, term, snapshot-file bytes with their CRC)."""
        await self.read_barrier(timeout)
        index, term, config, data = self.snapshot_now()
        return index, term, encode_snapshot(index, term, config, data)

    # --- peer traffic ---------------------------------------------------------------------------------------

    def _on_frame(self, src: str, kind: int, payload: bytes) -> None:
        if kind == KIND_FORWARD or kind == KIND_ADMIN:
            if len(payload) < _FORWARD.size:
                raise FrameError("forward frame too short")
            (request_id,) = _FORWARD.unpack_from(payload)
            self._last_forward_received = time.monotonic()
            if kind == KIND_FORWARD:
                self._serve_forward(src, request_id, payload[_FORWARD.size:])
                return
            task = self._spawn(self._serve_admin(src, request_id, payload[_FORWARD.size:]))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)
            return
        if kind == KIND_FORWARD_RESULT:
            if len(payload) < _FORWARD_RESULT.size:
                raise FrameError("forward result frame too short")
            self._finish_forward(payload)
            return
        message = decode_message(kind, payload)
        if message.src != src:
            raise FrameError(f"message claims to come from {message.src!r} on {src!r}'s connection")
        if kind == MSG_SNAPSHOT and (message.data or message.done):
            self._receive_chunk(src, message)
        elif kind == MSG_SNAPSHOT_RESPONSE and message.context == _CHUNK_ACK:
            self._on_chunk_ack(src, message)
            return
        else:
            if kind == MSG_SNAPSHOT_RESPONSE:
                # The follower's verdict on the whole snapshot: the stream (if any) is over.
                self._outgoing.pop(src, None)
            self.core.step(message)
        if src == self.core.leader_id:
            self._last_leader_contact = time.monotonic()
        self._ready.set()
