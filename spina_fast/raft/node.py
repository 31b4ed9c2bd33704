"""A Raft node: drives the Cython ``RaftCore`` with real timers, sockets and fsync.

The loop follows the core's Ready contract: persist (one group-committed fsync for everything the Ready
carries), then send, then apply, then ``advance``. Client commands arriving meanwhile are batched into
one ``propose`` call per event-loop turn, so one AppendEntries and one fsync cover many of them.

Writes sent to a follower are forwarded to the leader over the Raft transport (FORWARD frames); the
follower answers its client with the leader's result. Reads: ``read_barrier`` is Raft §6.4 ReadIndex
(linearizable, on any node); plain reads are served locally.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import orjson

from spina_fast import _raft
from spina_fast._raft import FrameError, RaftCore, decode_message, encode_frame, encode_message
from spina_fast.config import HostPort
from spina_fast.errors import InvalidRequest, NotLeader, Timeout, Unavailable
from spina_fast.raft.storage import RaftStorage
from spina_fast.raft.transport import RaftTransport

log = logging.getLogger(__name__)

KIND_FORWARD = 201
KIND_FORWARD_RESULT = 202
_FORWARD = struct.Struct(">Q")
_FORWARD_RESULT = struct.Struct(">QB")
_FORWARD_OK, _FORWARD_NOT_LEADER, _FORWARD_FAILED = 0, 1, 2
FORWARD_CONNECT_SECONDS = 2.0


def _expire(future: asyncio.Future[Any], timeout: float) -> None:
    if not future.done():
        future.set_exception(Timeout(f"the write was not confirmed within {timeout:g}s; it may still commit"))


class StateMachine(Protocol):
    def apply(self, index: int, command: bytes) -> Any: ...
    def snapshot(self) -> bytes: ...
    def restore(self, data: bytes) -> None: ...


class RaftNode:
    def __init__(self, node_id: str, raft_addr: HostPort, peers: dict[str, HostPort], data_dir: Path,
                 state_machine: StateMachine, *, tick_seconds: float = 0.05, election_ticks: int = 10,
                 heartbeat_ticks: int = 2, fsync: bool = True, seed: int | None = None) -> None:
        self.node_id = node_id
        self.state_machine = state_machine
        self.tick_seconds = tick_seconds
        self.storage = RaftStorage.open(data_dir / "raft", fsync=fsync)
        self.core = RaftCore(node_id, [node_id, *peers], election_ticks=election_ticks,
                             heartbeat_ticks=heartbeat_ticks,
                             seed=seed if seed is not None else int.from_bytes(node_id.encode()[:8], "big"))
        term, voted_for, commit_index = self.storage.hard_state
        self._persisted_term_vote = (term, voted_for)
        self.core.restore(term, voted_for, commit_index, self.storage.entries(),
                          self.storage.snapshot_index, self.storage.snapshot_term)
        self.transport = RaftTransport(node_id, raft_addr, peers, self._on_frame)
        self.addresses: dict[str, HostPort] = {node_id: raft_addr, **peers}
        self.applied_index = self.storage.snapshot_index
        self._ready = asyncio.Event()
        self._proposals: list[tuple[bytes, asyncio.Future[Any]]] = []
        self._flush_scheduled = False
        self._pending: dict[int, tuple[int, asyncio.Future[Any]]] = {}
        self._reads: dict[bytes, asyncio.Future[int]] = {}
        self._applied_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._forwards: dict[int, asyncio.Future[Any]] = {}
        self._request_ids = itertools.count(1)
        self._last_leader_contact = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False
        self.on_role_change: Callable[[str, str | None], None] | None = None

    # --- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> HostPort:
        bound = await self.transport.start()
        self.addresses[self.node_id] = bound
        self._running = True
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run_ready()), loop.create_task(self._run_ticks())]
        self._ready.set()
        return bound

    async def stop(self) -> None:
        self._running = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.transport.close()
        self._fail_all(Unavailable("the node is shutting down"))
        self.storage.close()

    def _fail_all(self, error: Exception) -> None:
        for _, future in self._proposals:
            if not future.done():
                future.set_exception(error)
        self._proposals.clear()
        for future in itertools.chain((f for _, f in self._pending.values()), self._reads.values(),
                                      self._forwards.values(), (f for _, f in self._applied_waiters)):
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        self._reads.clear()
        self._forwards.clear()
        self._applied_waiters.clear()

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

    def leader_address(self) -> str:
        leader = self.leader_id
        return str(self.addresses[leader]) if leader in self.addresses else ""

    def last_contact_ms(self) -> int:
        """Milliseconds since this node last heard from the leader (0 on the leader itself)."""
        if self.is_leader:
            return 0
        if not self._last_leader_contact:
            return -1
        return int((time.monotonic() - self._last_leader_contact) * 1000)

    # --- the Ready loop ----------------------------------------------------------------------------------

    async def _run_ticks(self) -> None:
        while self._running:
            await asyncio.sleep(self.tick_seconds)
            self.core.tick()
            self._ready.set()

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
        for context, index in ready.read_states:
            future = self._reads.pop(bytes(context), None)
            if future is not None and not future.done():
                future.set_result(index)
        if ready.soft_state is not None:
            role, leader = ready.soft_state
            log.info("raft role changed", extra={"role": role, "leader": leader, "term": self.core.term})
            if role != "leader":
                self._reroute_queued_proposals()
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

    def _send(self, messages: list[Any]) -> None:
        for message in messages:
            self.transport.send(message.dst, encode_message(message))

    def _apply(self, index: int, term: int, payload: bytes) -> None:
        result: Any = None
        error: Exception | None = None
        if payload[:1] == bytes((_raft.ENTRY_NORMAL,)):
            try:
                result = self.state_machine.apply(index, payload[1:])
            except InvalidRequest as exc:
                error = exc
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

    # --- proposals ----------------------------------------------------------------------------------------

    async def propose(self, command: bytes, timeout: float = 10.0) -> Any:
        """Replicate ``command`` and return the state machine's result once it is applied here."""
        if not self._running:
            raise Unavailable("the node is not running")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.is_leader:
            self._proposals.append((command, future))
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush_proposals)
        else:
            self._forward(command, future)
        # A timer handle instead of asyncio.wait_for: this is the per-write hot path, and wait_for costs
        # an extra task switch per call.
        expiry = asyncio.get_running_loop().call_later(timeout, _expire, future, timeout)
        try:
            return await future
        finally:
            expiry.cancel()

    def _flush_proposals(self) -> None:
        self._flush_scheduled = False
        batch, self._proposals = self._proposals, []
        if not batch:
            return
        try:
            last_index = self.core.propose([command for command, _ in batch])
        except _raft.NotLeader:
            for command, future in batch:
                self._forward(command, future)
            return
        term = self.core.term
        for offset, (_, future) in enumerate(batch):
            self._pending[last_index - len(batch) + 1 + offset] = (term, future)
        self._ready.set()

    def _reroute_queued_proposals(self) -> None:
        batch, self._proposals = self._proposals, []
        for command, future in batch:
            self._forward(command, future)

    def _forward(self, command: bytes, future: asyncio.Future[Any]) -> None:
        if future.done():
            return
        leader = self.leader_id
        if leader is None or leader == self.node_id:
            future.set_exception(Unavailable("no leader is known; the cluster may be electing one"))
            return
        if not self.transport.is_connected(leader):
            # We may learn of a leader (from its appends) before our own connection to it is up.
            asyncio.get_running_loop().create_task(self._forward_when_connected(leader, command, future))
            return
        request_id = next(self._request_ids)
        self._forwards[request_id] = future
        future.add_done_callback(lambda _: self._forwards.pop(request_id, None))
        if not self.transport.send(leader, encode_frame(KIND_FORWARD, _FORWARD.pack(request_id) + command)):
            future.set_exception(Unavailable(f"the leader {leader} is not reachable from this node"))

    async def _forward_when_connected(self, leader: str, command: bytes, future: asyncio.Future[Any]) -> None:
        if await self.transport.wait_connected(leader, FORWARD_CONNECT_SECONDS):
            self._forward(command, future)
        elif not future.done():
            future.set_exception(Unavailable(f"the leader {leader} is not reachable from this node"))

    async def _serve_forward(self, src: str, request_id: int, command: bytes) -> None:
        status, body = _FORWARD_NOT_LEADER, b""
        if self.is_leader:
            try:
                status, body = _FORWARD_OK, orjson.dumps(await self.propose(command))
            except NotLeader:
                status, body = _FORWARD_NOT_LEADER, b""
            except (InvalidRequest, Unavailable, Timeout) as exc:
                status, body = _FORWARD_FAILED, orjson.dumps({"error": exc.message, "code": exc.code})
        self.transport.send(src, encode_frame(KIND_FORWARD_RESULT, _FORWARD_RESULT.pack(request_id, status) + body))

    def _finish_forward(self, payload: bytes) -> None:
        request_id, status = _FORWARD_RESULT.unpack_from(payload)
        future = self._forwards.pop(request_id, None)
        if future is None or future.done():
            return
        body = payload[_FORWARD_RESULT.size:]
        if status == _FORWARD_OK:
            future.set_result(orjson.loads(body))
        elif status == _FORWARD_NOT_LEADER:
            future.set_exception(Unavailable("the forwarded write reached a node that is no longer leader"))
        else:
            error = orjson.loads(body)
            exc_type = InvalidRequest if error.get("code") == "invalid_request" else Unavailable
            future.set_exception(exc_type(error["error"]))

    # --- reads --------------------------------------------------------------------------------------------

    async def read_barrier(self, timeout: float = 5.0) -> int:
        """Raft §6.4 ReadIndex: wait until this node has applied everything committed when called."""
        context = next(self._request_ids).to_bytes(8, "big") + self.node_id.encode()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._reads[context] = future
        try:
            self.core.read_index(context)
        except _raft.NotLeader:
            self._reads.pop(context, None)
            raise Unavailable("no leader is known; a consistent read needs one") from None
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

    # --- peer traffic ---------------------------------------------------------------------------------------

    def _on_frame(self, src: str, kind: int, payload: bytes) -> None:
        if kind == KIND_FORWARD:
            if len(payload) < _FORWARD.size:
                raise FrameError("forward frame too short")
            (request_id,) = _FORWARD.unpack_from(payload)
            asyncio.get_running_loop().create_task(
                self._serve_forward(src, request_id, payload[_FORWARD.size:]))
            return
        if kind == KIND_FORWARD_RESULT:
            if len(payload) < _FORWARD_RESULT.size:
                raise FrameError("forward result frame too short")
            self._finish_forward(payload)
            return
        message = decode_message(kind, payload)
        if message.src != src:
            raise FrameError(f"message claims to come from {message.src!r} on {src!r}'s connection")
        self.core.step(message)
        if src == self.core.leader_id:
            self._last_leader_contact = time.monotonic()
        self._ready.set()
