"""Heartbeat leases and staged degradation with a controllable clock (the Raft log replaced by direct apply)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from spina_fast.errors import NotFound, NotLeader
from spina_fast.registry import encode_register
from spina_fast.registry.leases import LeaseKeeper
from spina_fast.state import ReplicatedState, encode_registry_batch


class LogStandIn:
    """The part of RaftNode the lease keeper uses; commands apply at once, in order, and are recorded."""

    def __init__(self, state: ReplicatedState) -> None:
        self.state = state
        self.is_leader = True
        self.index = 0
        self.commands: list[bytes] = []

    async def propose(self, command: bytes) -> Any:
        if not self.is_leader:
            raise NotLeader("not the leader")
        self.index += 1
        self.commands.append(command)
        return self.state.apply(self.index, command)

    def leader_address(self) -> str:
        return ""


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


async def settle() -> None:
    # Proposals run as tasks; the stand-in applies them in one step each.
    for _ in range(5):
        await asyncio.sleep(0)


def status(state: ReplicatedState, instance_id: str) -> str | None:
    service = state.registry.owner_of(instance_id)
    view = state.registry.get(service, instance_id) if service else None
    return view.status if view else None


@pytest.fixture
def keeper() -> tuple[LeaseKeeper, LogStandIn, Clock]:
    state = ReplicatedState()
    node = LogStandIn(state)
    clock = Clock()
    return LeaseKeeper(node, state.registry, clock=clock), node, clock  # type: ignore[arg-type]


async def register(node: LogStandIn, instance_id: str, ttl_ms: int = 10_000, deregister_ms: int = 60_000,
                   initial: str = "passing") -> None:
    await node.propose(encode_registry_batch([encode_register(
        "web", instance_id, "10.0.0.1", 80, status=initial, check_ttl_ms=ttl_ms,  # type: ignore[arg-type]
        deregister_after_ms=deregister_ms)]))


async def test_an_instance_without_heartbeats_goes_critical_then_is_removed(keeper: Any) -> None:
    lease_keeper, node, clock = keeper
    await register(node, "w1")
    lease_keeper.sweep()                       # the lease starts at the first sweep after the registration
    clock.now += 9_999
    assert lease_keeper.sweep() == 0
    clock.now += 1
    assert lease_keeper.sweep() == 1
    await settle()
    assert status(node.state, "w1") == "critical"
    clock.now += 59_999
    assert lease_keeper.sweep() == 0
    clock.now += 1
    assert lease_keeper.sweep() == 1
    await settle()
    assert status(node.state, "w1") is None
    assert node.state.registry.owner_of("w1") is None


async def test_heartbeats_keep_an_instance_passing_without_touching_the_log(keeper: Any) -> None:
    lease_keeper, node, clock = keeper
    await register(node, "w1")
    lease_keeper.sweep()
    written = len(node.commands)
    for _ in range(20):
        clock.now += 9_000
        await lease_keeper.heartbeat("w1", "passing", load=7)
        assert lease_keeper.sweep() == 0
    assert len(node.commands) == written      # leases are leader-local: no Raft entry per heartbeat
    assert status(node.state, "w1") == "passing"
    assert node.state.registry.get("web", "w1").load == 7


async def test_a_heartbeat_brings_a_critical_instance_back(keeper: Any) -> None:
    lease_keeper, node, clock = keeper
    await register(node, "w1")
    lease_keeper.sweep()
    clock.now += 10_000
    lease_keeper.sweep()
    await settle()
    assert status(node.state, "w1") == "critical"
    await lease_keeper.heartbeat("w1", "warning")
    assert status(node.state, "w1") == "warning"
    for _ in range(10):                        # the deregistration clock stopped when it left critical
        clock.now += 9_000
        await lease_keeper.heartbeat("w1", "warning")
        assert lease_keeper.sweep() == 0
    assert status(node.state, "w1") == "warning"


async def test_a_failed_check_is_critical_at_once_and_repeated_fails_do_not_postpone_removal(keeper: Any) -> None:
    lease_keeper, node, clock = keeper
    await register(node, "w1")
    lease_keeper.sweep()
    await lease_keeper.heartbeat("w1", "critical")
    assert status(node.state, "w1") == "critical"
    for _ in range(5):
        clock.now += 10_000
        await lease_keeper.heartbeat("w1", "critical")
    clock.now += 10_000                        # 60 s after the first fail
    assert lease_keeper.sweep() == 1
    await settle()
    assert status(node.state, "w1") is None


async def test_a_heartbeat_racing_an_expiry_wins(keeper: Any) -> None:
    lease_keeper, node, clock = keeper
    await register(node, "w1")
    lease_keeper.sweep()
    clock.now += 10_000
    assert lease_keeper.sweep() == 1           # "critical" proposed, not yet applied
    await lease_keeper.heartbeat("w1", "passing")
    await settle()
    assert status(node.state, "w1") == "passing"


async def test_a_new_leader_restarts_every_lease_at_full_ttl(keeper: Any) -> None:
    lease_keeper, node, clock = keeper
    await register(node, "w1")
    await register(node, "w2", initial="critical")
    lease_keeper.sweep()
    node.is_leader = False
    clock.now += 50_000
    assert lease_keeper.sweep() == 0           # a follower proposes nothing
    node.is_leader = True
    assert lease_keeper.sweep() == 0           # leadership regained: leases restart now
    clock.now += 9_999
    assert lease_keeper.sweep() == 0
    clock.now += 1
    assert lease_keeper.sweep() == 1           # w1 expires one full TTL after the leader change
    clock.now += 50_000
    assert lease_keeper.sweep() >= 1           # w2 removed 60 s after the change, not 60 s after it went critical


async def test_unknown_instances_and_followers_are_refused(keeper: Any) -> None:
    lease_keeper, node, _ = keeper
    with pytest.raises(NotFound):
        await lease_keeper.heartbeat("nobody")
    await register(node, "w1")
    node.is_leader = False
    with pytest.raises(NotLeader):
        await lease_keeper.heartbeat("w1")


async def test_instances_without_a_ttl_never_expire(keeper: Any) -> None:
    lease_keeper, node, clock = keeper
    await register(node, "w1", ttl_ms=0, deregister_ms=0)
    lease_keeper.sweep()
    clock.now += 10**9
    assert lease_keeper.sweep() == 0
    assert status(node.state, "w1") == "passing"


async def test_mass_expiry_is_batched_into_few_log_entries(keeper: Any) -> None:
    lease_keeper, node, clock = keeper
    await node.propose(encode_registry_batch([
        encode_register("web", f"w{number}", "10.0.0.1", 80, check_ttl_ms=1_000, deregister_after_ms=0)
        for number in range(2_500)]))
    lease_keeper.sweep()
    clock.now += 1_000
    written = len(node.commands)
    assert lease_keeper.sweep() == 2_500
    await settle()
    assert len(node.commands) - written == 3   # 1,000 transitions per entry
    assert all(view.status == "critical" for view in node.state.registry.instances("web"))
