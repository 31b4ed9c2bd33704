"""Heartbeat leases and staged degradation, kept by the leader (etcd-style leases: not in the Raft log).

A heartbeat renews an instance's lease in the leader's memory only; the Raft log sees just the status
transitions the leases cause, batched: passing -> critical when a lease runs out, critical -> removed
after ``DeregisterCriticalServiceAfter``, and back to passing/warning when a heartbeat says so.
A new leader starts every lease afresh at full TTL (leases are leader-local, so a failover can delay an
expiry by up to one TTL, and never expires an instance by itself).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from spina_fast.errors import NotFound, NotLeader, SpinaError
from spina_fast.registry import encode_deregister, encode_set_status
from spina_fast.state import encode_registry_batch

if TYPE_CHECKING:
    from spina_fast._registry import RegistryStore, Status
    from spina_fast.raft.node import RaftNode

log = logging.getLogger(__name__)

SWEEP_SECONDS = 0.2
MAX_BATCH = 1000  # status changes per Raft entry


def monotonic_ms() -> int:
    return int(time.monotonic() * 1000)


class LeaseKeeper:
    """Runs beside the Raft node; acts only while the node leads."""

    def __init__(self, node: RaftNode, registry: RegistryStore, *, clock: Callable[[], int] = monotonic_ms,
                 sweep_seconds: float = SWEEP_SECONDS) -> None:
        self.node = node
        self.registry = registry
        self.clock = clock
        self.sweep_seconds = sweep_seconds
        # Instances with a transition proposed and not yet applied, by the proposal: not proposed twice,
        # and a heartbeat racing with an expiry waits for it and then proposes its own status.
        self._in_flight: dict[str, asyncio.Task[Any]] = {}
        self._was_leader = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_seconds)
            try:
                self.sweep()
            except Exception:
                log.exception("lease sweep failed")

    def _check_leadership(self) -> bool:
        leading = self.node.is_leader
        if leading and not self._was_leader:
            self.registry.reset_leases(self.clock())
            log.info("leases restarted at full TTL on the new leader", extra={"instances": len(self.registry)})
        if not leading:
            self._in_flight.clear()
        self._was_leader = leading
        return leading

    def sweep(self) -> int:
        """Propose the transitions that are due; returns how many were proposed."""
        if not self._check_leadership():
            return 0
        due = [(service, instance_id, action) for service, instance_id, action in self.registry.expired(self.clock())
               if instance_id not in self._in_flight]
        for start in range(0, len(due), MAX_BATCH):
            batch = due[start:start + MAX_BATCH]
            commands = [encode_deregister(service, instance_id) if action == "deregister"
                        else encode_set_status(service, instance_id, "critical")
                        for service, instance_id, action in batch]
            ids = [instance_id for _, instance_id, _ in batch]
            task = asyncio.get_running_loop().create_task(self._propose(encode_registry_batch(commands), ids))
            self._in_flight.update(dict.fromkeys(ids, task))
            log.info("lease transitions proposed", extra={
                "critical": sum(action == "critical" for *_, action in batch),
                "deregister": sum(action == "deregister" for *_, action in batch)})
        return len(due)

    async def _propose(self, command: bytes, ids: list[str]) -> Any:
        try:
            return await self.node.propose(command)
        except SpinaError as exc:
            # The next sweep proposes again if the transition is still due (and we still lead).
            log.warning("lease transition not committed", extra={"error": exc.message})
            return None
        finally:
            for instance_id in ids:
                self._in_flight.pop(instance_id, None)

    async def heartbeat(self, instance_id: str, status: Status = "passing", load: int | None = None) -> str:
        """A heartbeat on the leader: renew the lease, and replicate the status if it changes.

        Returns the instance's service. NotFound for an unknown instance, NotLeader when not leading.
        """
        if not self._check_leadership():
            raise NotLeader("heartbeats are kept by the leader", leader=self.node.leader_address() or None)
        service = self.registry.owner_of(instance_id)
        if service is None:
            raise NotFound(f"no instance {instance_id!r} is registered")
        held = self.registry.touch(service, instance_id, self.clock(), status, load)
        if held is None:
            raise NotFound(f"no instance {instance_id!r} is registered")
        racing = self._in_flight.get(instance_id)
        if racing is not None:
            # An expiry is on its way into the log: let it land, then say what this heartbeat says.
            await asyncio.wait([racing])
            held = self._applied_status(service, instance_id)
            if held is None:
                raise NotFound(f"instance {instance_id!r} was deregistered (critical for too long)")
        if held != status:
            await self.node.propose(encode_registry_batch([encode_set_status(service, instance_id, status)]))
        return service

    def _applied_status(self, service: str, instance_id: str) -> Status | None:
        view = self.registry.get(service, instance_id)
        return view.status if view is not None else None
