"""The replicated state of a node: every committed Raft command is routed to its module by its first byte."""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from spina_fast.errors import InvalidRequest
from spina_fast.kv.config import ConfigStore
from spina_fast.kv.store import KVStore
from spina_fast.registry import InvalidRegistration, RegistryStore
from spina_fast.registry.watch import RegistryWatches

MODULE_KV = b"K"
MODULE_CONFIG = b"C"
MODULE_REGISTRY = b"R"  # followed by registry commands, each with a 4-byte length (one Raft entry, many changes)

_LENGTH = struct.Struct(">I")


def encode_registry_batch(commands: Iterable[bytes]) -> bytes:
    """One Raft command carrying many registry commands (registrations, status changes, deregistrations)."""
    parts = [MODULE_REGISTRY]
    for command in commands:
        parts.append(_LENGTH.pack(len(command)))
        parts.append(command)
    return b"".join(parts)


def _split_batch(payload: bytes) -> list[memoryview]:
    view = memoryview(payload)
    commands, position = [], 0
    while position < len(view):
        if position + 4 > len(view):
            raise InvalidRequest("registry batch: truncated command length")
        (size,) = _LENGTH.unpack_from(view, position)
        position += 4
        if position + size > len(view):
            raise InvalidRequest("registry batch: truncated command")
        commands.append(view[position:position + size])
        position += size
    return commands


class ReplicatedState:
    def __init__(self) -> None:
        self.kv = KVStore()
        # Watches every KV command: changes under config/ are versioned and checked against schemas.
        self.config = ConfigStore(self.kv)
        self.registry = RegistryStore()
        self.registry_watches = RegistryWatches()
        # Told the changed service names synchronously, before the apply returns (the DNS thread's answer cache).
        self.registry_listeners: list[Callable[[list[str]], None]] = []

    def apply(self, index: int, command: bytes) -> Any:
        module = command[:1]
        if module == MODULE_KV:
            return self.config.apply_kv(index, command[1:])
        if module == MODULE_REGISTRY:
            return self._apply_registry(index, command[1:])
        if module == MODULE_CONFIG:
            return self.config.apply(index, command[1:])
        raise ValueError(f"command for unknown module {module!r} at index {index}")

    def _apply_registry(self, index: int, payload: bytes) -> list[bool]:
        """Apply a batch in order; the result says which commands changed the registry."""
        registry = self.registry
        try:
            return [registry.apply(index, command) for command in _split_batch(payload)]
        except InvalidRegistration as exc:
            # Every replica refuses the same command the same way, so the state stays identical.
            raise InvalidRequest(str(exc), field=exc.field) from None
        finally:
            changed = registry.take_changed()
            if changed:
                for listener in self.registry_listeners:
                    listener(changed)
                self.registry_watches.notify(changed)

    def snapshot(self) -> bytes:
        return orjson.dumps({"kv": self.kv.snapshot().decode(), "config": self.config.snapshot().decode(),
                             "registry": base64.b64encode(self.registry.snapshot()).decode()})

    def restore(self, data: bytes) -> None:
        document = orjson.loads(data)
        self.kv.restore(document["kv"].encode())
        # Snapshots from before configuration history have no "config" part: restore an empty one.
        config = document["config"].encode() if "config" in document else ConfigStore(self.kv).snapshot()
        self.config.restore(config)
        registry = document.get("registry")
        self.registry.restore(base64.b64decode(registry) if registry else RegistryStore().snapshot())
        changed = self.registry.take_changed()
        for listener in self.registry_listeners:
            listener(changed)
        self.registry_watches.notify(changed)

    def state_hash(self) -> str:
        parts = f"{self.kv.state_hash()}:{self.config.state_hash()}:{self.registry.state_hash()}"
        return hashlib.sha256(parts.encode()).hexdigest()
