"""Consul-style KV as a Raft state machine.

Commands are small binary records (see ``encode_put`` and friends) applied in log order; every entry
carries CreateIndex / ModifyIndex (the Raft index of the command that created / last changed it).
The store is deterministic: every node applying the same commands holds the same state and hash.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
from sortedcontainers import SortedList

from spina_fast._kv import apply_plain, decode_entries, encode_entries, is_encoded
from spina_fast.errors import InvalidRequest

MAX_VALUE_BYTES = 512 * 1024
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
MAX_KEY_BYTES = 512

OP_PUT = 1
OP_DELETE = 2
OP_DELETE_TREE = 3
# Set in the op byte when a change record (time, author, description) follows the header.
OP_HAS_META = 0x80

# Keys whose every change is kept as a version (spina_fast.kv.config): their commands always carry the
# proposer's clock, since a replica's own clock at apply time would make the replicas diverge.
HISTORY_PREFIX = "config/"
MAX_AUTHOR_BYTES = 256
MAX_DESCRIPTION_BYTES = 4096

# op u8 | flags u64 | cas u64 (0 = unconditional, else ModifyIndex required; Consul: cas=0 means "only if absent")
# | has_cas u8 | key length u16 | [meta] | key | value
_HEADER = struct.Struct(">BQQBH")
# meta: time in unix milliseconds u64 | author length u16 | description length u16 | author | description
_META = struct.Struct(">QHH")


@dataclass(slots=True)
class Entry:
    key: str
    value: bytes
    flags: int
    create_index: int
    modify_index: int

    def to_consul(self) -> dict[str, object]:
        return {
            "LockIndex": 0, "Key": self.key, "Flags": self.flags,
            "Value": base64.b64encode(self.value).decode() if self.value else None,
            "CreateIndex": self.create_index, "ModifyIndex": self.modify_index,
        }


def validate_key(key: str) -> str:
    if not key:
        raise InvalidRequest("missing key: the path after /v1/kv/ names the key", field="key")
    if key.startswith("/"):
        raise InvalidRequest(f"key {key!r} must not start with '/'", field="key")
    encoded = key.encode()
    if len(encoded) > MAX_KEY_BYTES:
        raise InvalidRequest(f"key is {len(encoded)} bytes; the limit is {MAX_KEY_BYTES}", field="key")
    if _CONTROL_CHARACTERS.search(key):
        raise InvalidRequest("key contains control characters", field="key")
    return key


@dataclass(frozen=True, slots=True)
class ChangeMeta:
    """Who changed a key, when (the proposer's clock, unix milliseconds) and why."""

    time_ms: int
    author: str = ""
    description: str = ""

    @classmethod
    def create(cls, author: str = "", description: str = "", time_ms: int | None = None) -> ChangeMeta:
        """A change record stamped with this (the proposing) node's clock unless ``time_ms`` is given."""
        _check_text(author, MAX_AUTHOR_BYTES, "author")
        _check_text(description, MAX_DESCRIPTION_BYTES, "description")
        if time_ms is None:
            time_ms = int(time.time() * 1000)
        elif not 0 <= time_ms < 1 << 63:
            raise InvalidRequest(f"time {time_ms} ms is out of range", field="time")
        return cls(time_ms, author, description)


@dataclass(frozen=True, slots=True)
class KVCommand:
    op: int
    key: str
    value: bytes
    flags: int
    cas: int | None
    meta: ChangeMeta | None


def _check_text(text: str, limit: int, field: str) -> None:
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        raise InvalidRequest(f"{field} is not valid UTF-8", field=field) from None
    if size > limit:
        raise InvalidRequest(f"{field} is {size} bytes; the limit is {limit}", field=field)
    # Newlines and tabs are fine in a description; other control characters would garble logs and terminals.
    if _CONTROL_CHARACTERS.search(text.replace("\n", "").replace("\t", "")):
        raise InvalidRequest(f"{field} contains control characters", field=field)


def _encode(op: int, key: str, value: bytes, flags: int, cas: int | None, meta: ChangeMeta | None) -> bytes:
    encoded_key = key.encode()
    if cas is not None and not 0 <= cas < 1 << 64:
        raise InvalidRequest(f"cas {cas} is not an unsigned 64-bit integer", field="cas")
    if meta is None:
        return _HEADER.pack(op, flags, cas or 0, cas is not None, len(encoded_key)) + encoded_key + value
    author = meta.author.encode()
    description = meta.description.encode()
    return (_HEADER.pack(op | OP_HAS_META, flags, cas or 0, cas is not None, len(encoded_key))
            + _META.pack(meta.time_ms, len(author), len(description)) + author + description + encoded_key + value)


def _change_meta(touches_history: bool, author: str, description: str, time_ms: int | None) -> ChangeMeta | None:
    if not (touches_history or author or description or time_ms is not None):
        return None
    return ChangeMeta.create(author, description, time_ms)


def encode_put(key: str, value: bytes, *, flags: int = 0, cas: int | None = None, author: str = "",
               description: str = "", time_ms: int | None = None) -> bytes:
    """A PUT command. Changes under ``HISTORY_PREFIX`` carry the caller's clock (or ``time_ms``), author and
    description, which the configuration history records."""
    validate_key(key)
    if len(value) > MAX_VALUE_BYTES:
        raise InvalidRequest(f"value is {len(value)} bytes; the limit is {MAX_VALUE_BYTES}", field="value")
    if not 0 <= flags < 1 << 64:
        raise InvalidRequest(f"flags {flags} is not an unsigned 64-bit integer", field="flags")
    meta = _change_meta(key.startswith(HISTORY_PREFIX), author, description, time_ms)
    return _encode(OP_PUT, key, value, flags, cas, meta)


def encode_delete(key: str, *, recurse: bool = False, cas: int | None = None, author: str = "",
                  description: str = "", time_ms: int | None = None) -> bytes:
    if not recurse:
        validate_key(key)
    touches_history = key.startswith(HISTORY_PREFIX) or (recurse and HISTORY_PREFIX.startswith(key))
    meta = _change_meta(touches_history, author, description, time_ms)
    return _encode(OP_DELETE_TREE if recurse else OP_DELETE, key, b"", 0, cas, meta)


def _key_offset(command: bytes, op: int) -> int:
    if not op & OP_HAS_META:
        return _HEADER.size
    _, author_length, description_length = _META.unpack_from(command, _HEADER.size)
    return _HEADER.size + _META.size + author_length + description_length


def may_touch(command: bytes, prefix: bytes) -> bool:
    """A cheap test for the apply hot path: False only if ``command`` certainly touches no key under ``prefix``."""
    op = command[0]
    if op & OP_HAS_META or op == OP_DELETE_TREE:
        return True
    return command.startswith(prefix, _HEADER.size)


def command_key(command: bytes) -> tuple[int, str]:
    """The op (without the meta bit) and key of a command, without decoding the rest."""
    op, _, _, _, key_length = _HEADER.unpack_from(command)
    start = _key_offset(command, op)
    return op & ~OP_HAS_META, command[start:start + key_length].decode()


def decode_command(command: bytes) -> KVCommand:
    op, flags, cas, has_cas, key_length = _HEADER.unpack_from(command)
    meta = None
    if op & OP_HAS_META:
        time_ms, author_length, description_length = _META.unpack_from(command, _HEADER.size)
        start = _HEADER.size + _META.size
        author = command[start:start + author_length].decode()
        description = command[start + author_length:start + author_length + description_length].decode()
        meta = ChangeMeta(time_ms, author, description)
    start = _key_offset(command, op)
    return KVCommand(op & ~OP_HAS_META, command[start:start + key_length].decode(),
                     command[start + key_length:], flags, cas if has_cas else None, meta)


class KVStore:
    """The state: entries by key, keys kept sorted for prefix scans, and watch notification."""

    def __init__(self) -> None:
        # key -> (value, flags, create_index, modify_index): plain tuples of atoms, which the garbage
        # collector stops tracking, so a store of a million keys adds nothing to GC pauses.
        self._entries: dict[str, tuple[bytes, int, int, int]] = {}
        # O(log n) inserts and deletes; a plain sorted list costs a memmove of the whole tail per insert.
        self._sorted_keys: SortedList = SortedList()
        # Raft index of the last change to the KV (never 0 once anything applied; never goes backwards).
        self.index = 0
        self._waiters: list[tuple[str, asyncio.Future[None]]] = []

    # --- applying commands (called by the Raft driver, in log order) ---------------------------------

    def apply(self, index: int, command: bytes) -> bool:
        """Apply one command committed at ``index``; returns its result (False = CAS failed)."""
        result = apply_plain(self, index, command, 0, b"")  # plain puts and deletes, in Cython
        if result is not None:
            return result
        return self._apply_general(index, command)

    def _apply_general(self, index: int, command: bytes) -> bool:
        """``apply`` for every command, including those ``apply_plain`` takes (tests compare the two)."""
        op, flags, cas, has_cas, key_length = _HEADER.unpack_from(command)
        start = _HEADER.size
        if op & OP_HAS_META:
            start = _key_offset(command, op)
            op &= ~OP_HAS_META
        key = command[start:start + key_length].decode()
        existing = self._entries.get(key)
        if op == OP_PUT:
            if has_cas and (existing[3] if existing else 0) != cas:
                return False
            value = command[start + key_length:]
            if existing is None:
                self._entries[key] = (value, flags, index, index)
                self._sorted_keys.add(key)
            else:
                self._entries[key] = (value, flags, existing[2], index)
            self._touch(index, key)
            return True
        if op == OP_DELETE:
            if has_cas and (existing is None or existing[3] != cas):
                return False
            if existing is not None:
                del self._entries[key]
                self._sorted_keys.remove(key)
                self._touch(index, key)
            return True
        if op == OP_DELETE_TREE:
            keys = list(self._prefix_keys(key))
            for name in keys:
                del self._entries[name]
            if keys:
                start = self._sorted_keys.bisect_left(key)
                del self._sorted_keys[start:start + len(keys)]
                self._touch(index, key)
            return True
        raise ValueError(f"unknown KV op {op}")

    def _touch(self, index: int, key: str) -> None:
        self.index = index
        if not self._waiters:
            return
        remaining = []
        for prefix, future in self._waiters:
            if key.startswith(prefix) or prefix.startswith(key):
                if not future.done():
                    future.set_result(None)
            else:
                remaining.append((prefix, future))
        self._waiters = remaining

    # --- reads -----------------------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        found = self._entries.get(key)
        return Entry(key, *found) if found else None

    def _prefix_keys(self, prefix: str) -> Iterator[str]:
        for name in self._sorted_keys.irange(minimum=prefix):
            if not name.startswith(prefix):
                return
            yield name

    def scan(self, prefix: str) -> list[Entry]:
        return [Entry(name, *self._entries[name]) for name in self._prefix_keys(prefix)]

    def keys(self, prefix: str, separator: str = "") -> list[str]:
        names: list[str] = []
        for name in self._prefix_keys(prefix):
            if separator:
                cut = name.find(separator, len(prefix))
                if cut >= 0:
                    name = name[:cut + len(separator)]
                    if names and names[-1] == name:
                        continue
            names.append(name)
        return names

    async def wait_for_change(self, prefix: str, timeout: float) -> None:
        """Return when a key under ``prefix`` (or ``prefix`` itself) changes, or after ``timeout``."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((prefix, future))
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            pass
        finally:
            if not future.done():
                future.cancel()
                self._waiters = [(p, f) for p, f in self._waiters if f is not future]

    # --- snapshot ----------------------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        return orjson.dumps({
            "index": self.index,
            "entries": [[name, value.hex(), flags, created, modified]
                        for name, (value, flags, created, modified) in
                        ((name, self._entries[name]) for name in self._sorted_keys)],
        })

    def snapshot_binary(self) -> bytes:
        """The same state in the binary layout of ``_kv.pyx`` (an order of magnitude cheaper to write and read);
        ``restore`` takes either."""
        # The sorted index's own sublists, not an iterator over it: the encoder then reads the keys without
        # taking references (see encode_entries: it runs in a copy-on-write snapshot child).
        return encode_entries(self.index, self._sorted_keys._lists, self._entries)

    def restore(self, data: bytes) -> None:
        if is_encoded(data):
            self.index, self._entries = decode_entries(data)
            self._sorted_keys = SortedList(self._entries)
            return
        document = orjson.loads(data)
        self._entries = {key: (bytes.fromhex(value), flags, created, modified)
                         for key, value, flags, created, modified in document["entries"]}
        self._sorted_keys = SortedList(self._entries)
        self.index = document["index"]

    def state_hash(self) -> str:
        """A digest of the whole state, equal on every node that applied the same log."""
        digest = hashlib.sha256()
        for name in self._sorted_keys:
            value, flags, created, modified = self._entries[name]
            digest.update(orjson.dumps([name, value.hex(), flags, created, modified]))
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self._entries)
