"""The cluster configuration: which nodes vote, which only learn, and where each one listens for Raft.

A configuration travels whole in every ENTRY_CONFIG log entry and in every snapshot, so a node that
applies the latest one (or installs a snapshot) knows every member's address without any side channel.
Changes are single-server (Raft §4.1): add a learner, promote a learner, remove a node - one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from spina_fast.config import HostPort, parse_host_port, validate_node_id
from spina_fast.errors import InvalidRequest

__all__ = ["ClusterConfig"]


@dataclass(frozen=True)
class ClusterConfig:
    voters: dict[str, HostPort] = field(default_factory=dict)
    learners: dict[str, HostPort] = field(default_factory=dict)

    def __post_init__(self) -> None:
        both = set(self.voters) & set(self.learners)
        if both:
            raise InvalidRequest(f"{sorted(both)} cannot be voter and learner at once")

    @property
    def members(self) -> dict[str, HostPort]:
        return {**self.voters, **self.learners}

    def address_of(self, node_id: str) -> HostPort | None:
        return self.voters.get(node_id) or self.learners.get(node_id)

    # --- the single-server changes ------------------------------------------------------------------

    def with_learner(self, node_id: str, address: HostPort) -> ClusterConfig:
        validate_node_id(node_id)
        if node_id in self.voters or node_id in self.learners:
            raise InvalidRequest(f"{node_id!r} is already a member")
        return ClusterConfig(dict(self.voters), {**self.learners, node_id: address})

    def with_promoted(self, node_id: str) -> ClusterConfig:
        if node_id not in self.learners:
            raise InvalidRequest(f"{node_id!r} is not a learner")
        learners = dict(self.learners)
        address = learners.pop(node_id)
        return ClusterConfig({**self.voters, node_id: address}, learners)

    def without(self, node_id: str) -> ClusterConfig:
        if node_id not in self.voters and node_id not in self.learners:
            raise InvalidRequest(f"{node_id!r} is not a member of the cluster")
        voters = {member: address for member, address in self.voters.items() if member != node_id}
        if not voters:
            raise InvalidRequest(f"{node_id!r} is the last voter; a cluster cannot remove all of them")
        return ClusterConfig(voters, {member: address for member, address in self.learners.items()
                                      if member != node_id})

    # --- encoding -------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"voters": {node: str(address) for node, address in self.voters.items()},
                "learners": {node: str(address) for node, address in self.learners.items()}}

    def encode(self) -> bytes:
        return orjson.dumps(self.to_json())

    @classmethod
    def from_json(cls, document: object) -> ClusterConfig:
        if not isinstance(document, dict):
            raise ValueError("a cluster configuration is a JSON object")

        def members(name: str) -> dict[str, HostPort]:
            group = document.get(name, {})
            if not isinstance(group, dict):
                raise ValueError(f"configuration {name!r} must map node ids to HOST:PORT")
            return {validate_node_id(str(node)): parse_host_port(str(address), what=f"address of {node}")
                    for node, address in group.items()}

        return cls(members("voters"), members("learners"))

    @classmethod
    def decode(cls, data: bytes) -> ClusterConfig:
        return cls.from_json(orjson.loads(data))
