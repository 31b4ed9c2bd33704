"""Faults the chaos runs inject, and the schedule that injects them one step at a time.

A fault is injected into a healthy cluster, held for a while, then healed; a step may combine a process
fault with a network fault ("mixed"). ``FAULTS`` is the registry the schedules draw from: a new kind of
fault is one ``Fault`` subclass (``inject`` returns a description, ``heal`` undoes it) and one entry there;
every schedule, the recovery measurement and the summary pick it up.

A fault that needs an agent feature names the flag that feature brings (``requires_flag``) and the flags
it runs the agents with (``agent_args``); it joins the default schedules only when ``spina agent --help``
lists that flag, so the suite runs against an agent without it, and says so in its summary (the fault
count is missing) instead of simulating the fault with something weaker.

Partitions are real only while every node dials every other through the relay. A node announces the
address it binds, so the configuration a membership change commits, or a snapshot a follower installs,
carries the proposing node's own address, and the nodes that adopt it dial that node directly. Hence the
faults that cause that (``join-remove``, ``snapshot-lagging-follower``) are not in the default schedules
(``default = False``), and before any partition the schedule checks the nodes' configured addresses
(``ChaosCluster.bypassed_relay``): once one bypasses the relay, the run goes on with process faults only
and its summary says so. Mixing them with partitions needs an agent flag to announce an address other than
the one it binds (the relay port).
"""

from __future__ import annotations

import functools
import json
import random
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from tests.chaos.cluster import ChaosCluster, ClusterUnhealthy, http_call, wait_for


@dataclass
class FaultContext:
    cluster: ChaosCluster
    rng: random.Random
    leader: str

    def followers(self) -> list[str]:
        return [node_id for node_id in self.cluster.ids if node_id != self.leader]

    def partition_mode(self) -> str:
        # Half the partitions black-hole the traffic, half reset the connections and refuse new ones.
        return self.rng.choice(["drop", "cut"])


class Fault(ABC):
    name: ClassVar[str]
    # "process" faults act on one node's process, "network" faults on the relay; a mixed step may take one of
    # each (other categories only run alone).
    category: ClassVar[str]
    # Bounds of how long the fault is held before it is healed, in seconds.
    hold: ClassVar[tuple[float, float]] = (1.5, 3.5)
    # The agent flag the fault depends on ("": none), and the flags it needs every agent started with.
    requires_flag: ClassVar[str] = ""
    agent_args: ClassVar[tuple[str, ...]] = ()
    # Whether schedules that do not name their faults include this one.
    default: ClassVar[bool] = True

    def hold_until(self, context: FaultContext, seconds: float) -> None:
        """Keep the fault in place; the default is for ``seconds`` (drawn from ``hold``)."""
        # The fault's duration, not a wait for something to settle: the workload runs against the faulty cluster.
        time.sleep(seconds)

    @abstractmethod
    def inject(self, context: FaultContext) -> str:
        """Inject the fault; a description naming its targets."""

    @abstractmethod
    def heal(self, context: FaultContext) -> None:
        """Undo the fault (restart, resume, heal the network)."""


class _NodeFault(Fault):
    category = "process"
    target: ClassVar[str]  # "leader" or "follower"

    def __init__(self) -> None:
        self.node = ""

    def pick(self, context: FaultContext) -> str:
        self.node = context.leader if self.target == "leader" else context.rng.choice(context.followers())
        return self.node


class KillLeader(_NodeFault):
    """kill -9 of the leader; healing restarts it from the same data dir."""

    name = "kill-leader"
    target = "leader"

    def inject(self, context: FaultContext) -> str:
        context.cluster.kill(self.pick(context))
        return f"kill -9 {self.node} ({self.target})"

    def heal(self, context: FaultContext) -> None:
        context.cluster.start(self.node)


class KillFollower(KillLeader):
    name = "kill-follower"
    target = "follower"


class RestartLeader(_NodeFault):
    """SIGTERM of the leader (a graceful stop hands leadership over first), then a restart from its data dir."""

    name = "restart-leader"
    target = "leader"
    hold = (0.5, 2.0)

    def inject(self, context: FaultContext) -> str:
        context.cluster.terminate(self.pick(context))
        return f"SIGTERM {self.node} ({self.target})"

    def heal(self, context: FaultContext) -> None:
        context.cluster.start(self.node)


class TransferLeader(Fault):
    """Leadership transfer (TimeoutNow) to a random follower, through the cluster API, during traffic."""

    name = "transfer-leader"
    category = "process"
    # The cluster API (join, remove, transfer-leader) arrived with --join.
    requires_flag = "--join"
    hold = (1.0, 2.0)

    def inject(self, context: FaultContext) -> str:
        target = context.rng.choice(context.followers())
        try:
            status, body = http_call(context.cluster.http_ports[context.leader], "POST",
                                     f"/v1/spina/cluster/transfer-leader?to={target}", b"", timeout=15)
        except OSError as exc:
            return f"transfer {context.leader} -> {target}: no answer ({exc})"
        answer = "done" if status == 200 else f"refused {status} {body[:200]!r}"
        return f"transfer {context.leader} -> {target}: {answer}"

    def heal(self, context: FaultContext) -> None:
        """Nothing to undo: the new leader leads until the next fault."""


class PauseLeader(_NodeFault):
    """SIGSTOP of the leader for longer than the election timeout (0.5-1 s), then SIGCONT."""

    name = "pause-leader"
    target = "leader"
    hold = (2.0, 4.0)

    def inject(self, context: FaultContext) -> str:
        context.cluster.pause(self.pick(context))
        return f"SIGSTOP {self.node} ({self.target})"

    def heal(self, context: FaultContext) -> None:
        context.cluster.resume(self.node)


class _NetworkFault(Fault):
    category = "network"

    def heal(self, context: FaultContext) -> None:
        context.cluster.network.heal()


class IsolateLeader(_NetworkFault):
    name = "isolate-leader"

    def inject(self, context: FaultContext) -> str:
        mode = context.partition_mode()
        context.cluster.network.partition([context.leader], context.followers(), mode=mode)
        return f"{mode}: {context.leader} (leader) | {' '.join(context.followers())}"


class SplitMajority(_NetworkFault):
    """A minority (1 of 3, 2 of 5) against a majority; the leader lands on either side."""

    name = "split"

    def inject(self, context: FaultContext) -> str:
        mode = context.partition_mode()
        nodes = list(context.cluster.ids)
        context.rng.shuffle(nodes)
        minority_size = (len(nodes) - 1) // 2
        minority, majority = nodes[:minority_size], nodes[minority_size:]
        context.cluster.network.partition(minority, majority, mode=mode)
        return f"{mode}: {' '.join(sorted(minority))} | {' '.join(sorted(majority))} (leader {context.leader})"


class Bridge(_NetworkFault):
    """Two halves that cannot talk to each other, and one node that talks to both."""

    name = "bridge"

    def inject(self, context: FaultContext) -> str:
        mode = context.partition_mode()
        nodes = list(context.cluster.ids)
        context.rng.shuffle(nodes)
        bridge, rest = nodes[0], nodes[1:]
        left, right = rest[:len(rest) // 2], rest[len(rest) // 2:]
        context.cluster.network.bridge(left, bridge, right, mode=mode)
        return f"{mode}: {' '.join(sorted(left))} | {bridge} (bridge) | {' '.join(sorted(right))} " \
               f"(leader {context.leader})"


class LaggingFollowerSnapshot(_NetworkFault):
    """A follower cut off until the leader has compacted its log past it: healed, it must install a snapshot.

    The agents snapshot every few hundred entries (``agent_args``), so snapshots and restarts from snapshot +
    WAL happen throughout every run that includes this fault. While the follower is away, filler writes (keys
    outside the workload's) push the leader's log on until its first index is beyond the follower's last."""

    name = "snapshot-lagging-follower"
    # Its own category: paired with a process fault on the leader, the leader could not compact anything.
    category = "snapshot"
    requires_flag = "--snapshot-entries"
    default = False
    agent_args = ("--snapshot-entries", "200", "--snapshot-catch-up", "20")
    filler_writes = 3000
    hold_seconds = 90.0
    install_seconds = 90.0

    def __init__(self) -> None:
        self.follower = ""
        self.compacted_to = 0

    def inject(self, context: FaultContext) -> str:
        mode = context.partition_mode()
        self.follower = context.rng.choice(context.followers())
        others = [node_id for node_id in context.cluster.ids if node_id != self.follower]
        context.cluster.network.partition([self.follower], others, mode=mode)
        return f"{mode}: {self.follower} (lagging follower) | {' '.join(others)} (leader {context.leader})"

    def _compacted_past_follower(self, context: FaultContext) -> bool:
        leader = context.cluster.get_json(context.leader, "/v1/spina/raft/status")
        follower = context.cluster.get_json(self.follower, "/v1/spina/raft/status")
        if leader is None or follower is None:
            return False
        self.compacted_to = int(leader["first_index"]) - 1
        return self.compacted_to > int(follower["last_index"])

    def hold_until(self, context: FaultContext, seconds: float) -> None:
        deadline = time.monotonic() + self.hold_seconds
        port = context.cluster.http_ports[context.leader]
        for number in range(self.filler_writes):
            if number % 20 == 0 and self._compacted_past_follower(context):
                return
            if time.monotonic() > deadline:
                break
            try:
                http_call(port, "PUT", f"/v1/kv/chaos-filler/{number % 50}", b"x" * 100, timeout=5)
            except OSError:
                continue
        raise ClusterUnhealthy(f"the leader {context.leader} did not compact its log past {self.follower} "
                               f"(compacted to {self.compacted_to}) within {self.filler_writes} writes "
                               f"and {self.hold_seconds:g}s")

    def heal(self, context: FaultContext) -> None:
        context.cluster.network.heal()
        wait_for(lambda: self._installed(context), self.install_seconds,
                 f"{self.follower} to install a snapshot covering index {self.compacted_to}")

    def _installed(self, context: FaultContext) -> bool:
        # The index was compacted away after the follower was cut off, so an install covering it is this one.
        return any(node_id == self.follower and entry.get("msg") == "snapshot installed"
                   and int(entry["index"]) >= self.compacted_to for node_id, entry in context.cluster.log_entries())


class JoinThenRemove(Fault):
    """A fresh node joins during traffic (a learner, promoted to voter once caught up), then is removed."""

    name = "join-remove"
    category = "membership"
    requires_flag = "--join"
    default = False
    hold = (1.0, 3.0)
    change_seconds = 90.0

    def __init__(self) -> None:
        self.node = ""

    def _members(self, context: FaultContext, group: str) -> set[str]:
        status = context.cluster.leader_status()
        return set(status[group]) if status else set()

    def inject(self, context: FaultContext) -> str:
        self.node = context.cluster.start_extra(join_via=context.rng.choice(context.cluster.ids))
        wait_for(lambda: self.node in self._members(context, "voters"), self.change_seconds,
                 f"{self.node} to be promoted to voter")
        return f"join {self.node} (learner, promoted to voter)"

    def heal(self, context: FaultContext) -> None:
        via = context.rng.choice(context.cluster.up())
        status, body = http_call(context.cluster.http_ports[via], "POST", "/v1/spina/cluster/remove",
                                 json.dumps({"node_id": self.node}).encode(), timeout=self.change_seconds)
        if status != 200:
            raise ClusterUnhealthy(f"removing {self.node} through {via} failed: {status} {body[:300]!r}")
        wait_for(lambda: context.cluster.leader_status() is not None
                 and self.node not in self._members(context, "voters") | self._members(context, "learners"),
                 self.change_seconds, f"{self.node} to leave the configuration")
        context.cluster.stop_extra(self.node)


FAULTS: dict[str, type[Fault]] = {
    fault.name: fault for fault in (KillLeader, KillFollower, RestartLeader, TransferLeader, PauseLeader,
                                    IsolateLeader, SplitMajority, Bridge, LaggingFollowerSnapshot, JoinThenRemove)
}


@functools.cache
def agent_help() -> str:
    """``spina agent --help``: which flags (and so which faults) the agent under test supports."""
    return subprocess.run([sys.executable, "-m", "spina_fast", "agent", "--help"], capture_output=True,
                          text=True, timeout=120, check=True).stdout


def available_faults(include_optional: bool = False) -> list[str]:
    """The faults the agent under test supports (by default only those that mix with every other)."""
    return [name for name, fault in FAULTS.items() if (fault.default or include_optional)
            and (not fault.requires_flag or fault.requires_flag in agent_help())]


def agent_args_for(names: list[str]) -> tuple[str, ...]:
    args: list[str] = []
    for name in names:
        args.extend(FAULTS[name].agent_args)
    return tuple(args)


@dataclass
class FaultRecord:
    names: list[str]
    descriptions: list[str]
    injected: float  # run time (seconds since the workload's start)
    healed: float
    recovered: float | None = None  # run time of the first ok write invoked after the heal


@dataclass
class Schedule:
    """Which steps to run: every fault alone once (seeded order), then mixed steps until ``mixed_seconds``."""

    each_alone: bool = True
    mixed_seconds: float = 0.0
    shuffle: bool = True
    max_steps: int = 10_000
    fault_names: list[str] = field(default_factory=available_faults)

    def __post_init__(self) -> None:
        unknown = [name for name in self.fault_names if name not in FAULTS]
        if unknown:
            raise ValueError(f"unknown faults {unknown}; known: {', '.join(FAULTS)}")

    def steps(self, rng: random.Random) -> list[list[str]]:
        """The fixed steps (each fault alone, in a seeded order unless ``shuffle`` is off); mixed steps are
        drawn one at a time by ``mixed_step``."""
        alone = [[name] for name in self.fault_names] if self.each_alone else []
        if self.shuffle:
            rng.shuffle(alone)
        return alone

    def mixed_step(self, rng: random.Random) -> list[str]:
        if rng.random() < 0.5:
            return [rng.choice(self.fault_names)]
        process = [name for name in self.fault_names if FAULTS[name].category == "process"]
        network = [name for name in self.fault_names if FAULTS[name].category == "network"]
        if not process or not network:
            return [rng.choice(self.fault_names)]
        return [rng.choice(process), rng.choice(network)]


def uses_network(names: list[str]) -> bool:
    return any(FAULTS[name].category in ("network", "snapshot") for name in names)


def process_faults_only(names: list[str]) -> list[str]:
    return [name for name in names if not uses_network([name])]


def run_step(cluster: ChaosCluster, rng: random.Random, names: list[str], now: Callable[[], float],
             health_timeout: float) -> FaultRecord:
    """Inject ``names`` together into the healthy cluster, hold, heal; the caller waits for recovery."""
    leader = cluster.wait_healthy(health_timeout)
    context = FaultContext(cluster, rng, leader)
    faults = [FAULTS[name]() for name in names]
    injected = now()
    descriptions = [fault.inject(context) for fault in faults]
    low = max(fault.hold[0] for fault in faults)
    high = max(fault.hold[1] for fault in faults)
    seconds = rng.uniform(low, high)
    try:
        for fault in faults:
            fault.hold_until(context, seconds)
            seconds = 0.0  # the first fault held the step; the others only add their own conditions
    finally:
        for fault in reversed(faults):
            fault.heal(context)
    return FaultRecord(names, descriptions, injected, now())
