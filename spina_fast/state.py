"""The replicated state of a node: every committed Raft command is routed to its module by its first byte."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from spina_fast.kv.config import ConfigStore
from spina_fast.kv.store import KVStore

MODULE_KV = b"K"
MODULE_CONFIG = b"C"


class ReplicatedState:
    def __init__(self) -> None:
        self.kv = KVStore()
        # Watches every KV command: changes under config/ are versioned and checked against schemas.
        self.config = ConfigStore(self.kv)

    def apply(self, index: int, command: bytes) -> Any:
        module = command[:1]
        if module == MODULE_KV:
            return self.config.apply_kv(index, command[1:])
        if module == MODULE_CONFIG:
            return self.config.apply(index, command[1:])
        raise ValueError(f"command for unknown module {module!r} at index {index}")

    def snapshot(self) -> bytes:
        return orjson.dumps({"kv": self.kv.snapshot().decode(), "config": self.config.snapshot().decode()})

    def restore(self, data: bytes) -> None:
        document = orjson.loads(data)
        self.kv.restore(document["kv"].encode())
        # Snapshots from before configuration history have no "config" part: restore an empty one.
        config = document["config"].encode() if "config" in document else ConfigStore(self.kv).snapshot()
        self.config.restore(config)

    def state_hash(self) -> str:
        return hashlib.sha256(f"{self.kv.state_hash()}:{self.config.state_hash()}".encode()).hexdigest()
