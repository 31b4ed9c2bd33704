"""The replicated state of a node: every committed Raft command is routed to its module by its first byte."""

from __future__ import annotations

from typing import Any

import orjson

from spina_fast.kv.store import KVStore

MODULE_KV = b"K"


class ReplicatedState:
    def __init__(self) -> None:
        self.kv = KVStore()

    def apply(self, index: int, command: bytes) -> Any:
        module = command[:1]
        if module == MODULE_KV:
            return self.kv.apply(index, command[1:])
        raise ValueError(f"command for unknown module {module!r} at index {index}")

    def snapshot(self) -> bytes:
        return orjson.dumps({"kv": self.kv.snapshot().decode()})

    def restore(self, data: bytes) -> None:
        document = orjson.loads(data)
        self.kv.restore(document["kv"].encode())

    def state_hash(self) -> str:
        return self.kv.state_hash()
