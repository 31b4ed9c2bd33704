"""Hierarchical configuration on the replicated KV: layers, versioned history, rollback and JSON Schemas.

Keys under ``config/`` follow four layers, later ones winning for the same name::

    config/global/<name>                       global
    config/env/<env>/<name>                    env
    config/service/<svc>/<name>                service      (<name> may not start with "env/")
    config/service/<svc>/env/<env>/<name>      service+env

Every change to a key under ``config/`` -- a Consul ``/v1/kv`` write or a native one -- becomes a new
*version* of that key: version number (per key, counting from 1), Raft index, time, author, description,
value and flags, or a tombstone for a deletion. The history is part of the Raft state machine, so it is
the same on every replica, survives failover and travels in snapshots. Its clock is the proposer's,
carried in each command (``ChangeMeta``) and kept monotonic here, never this replica's clock at apply.

Retention (replicated, so every replica prunes identically) keeps at most ``max_versions`` per key and,
if ``max_age_ms`` is set, drops versions older than that -- except a live key's current version, which is
always kept. A deleted key whose tombstone ages out is forgotten entirely (its versions restart at 1 if
it is written again); ``forgotten_index`` records the newest such tombstone so that a rollback to a point
before it can be refused instead of silently missing the key.

JSON Schemas are registered per key prefix (under ``config/``). A write under a prefix must validate
against *every* schema whose prefix it starts with; a write that does not is refused in ``apply`` with
``InvalidRequest`` -- deterministically on every replica, so nothing is written anywhere.

Native commands (module byte ``MODULE_CONFIG`` in ``spina_fast.state``) are one op byte and a payload: a
wrapped KV command for ``OP_WRITE``, an orjson document for everything else. Their results are plain
JSON-able dicts, since a follower receives the leader's result as JSON.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson
from jsonschema import exceptions as schema_exceptions
from jsonschema.validators import validator_for
from jsonschema_specifications import REGISTRY as SPECIFICATION_REGISTRY
from sortedcontainers import SortedList

from spina_fast.errors import InvalidRequest
from spina_fast.kv.store import (
    HISTORY_PREFIX,
    MAX_VALUE_BYTES,
    OP_DELETE,
    OP_DELETE_TREE,
    OP_PUT,
    ChangeMeta,
    KVCommand,
    KVStore,
    command_key,
    decode_command,
    encode_delete,
    encode_put,
    may_touch,
    validate_key,
)

CONFIG_PREFIX = HISTORY_PREFIX  # "config/": the KV encoders stamp every command under it with a ChangeMeta
_CONFIG_PREFIX_BYTES = CONFIG_PREFIX.encode()

LAYER_GLOBAL = "global"
LAYER_ENV = "env"
LAYER_SERVICE = "service"
LAYER_SERVICE_ENV = "service+env"
LAYERS = (LAYER_GLOBAL, LAYER_ENV, LAYER_SERVICE, LAYER_SERVICE_ENV)

_SCOPE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

OP_WRITE = 1
OP_ROLLBACK = 2
OP_ROLLBACK_TREE = 3
OP_SCHEMA_PUT = 4
OP_SCHEMA_DELETE = 5
OP_RETENTION = 6

DEFAULT_MAX_VERSIONS = 1000
MAX_MAX_VERSIONS = 1_000_000
MAX_SCHEMAS = 1000
# How much of a schema error (which quotes the offending value) reaches the client.
_MAX_ERROR_CHARS = 300


# --- keys and layers ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ConfigKey:
    key: str
    layer: str
    name: str
    service: str | None = None
    env: str | None = None


def validate_scope_name(name: str, what: str) -> str:
    if not _SCOPE_NAME.match(name):
        raise InvalidRequest(
            f"{what} {name!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
            field=what)
    return name


def _check_name(key: str, name: str, layer_prefix: str) -> str:
    if not name:
        raise InvalidRequest(f"config key {key!r} has no name after {layer_prefix!r}", field="key")
    if name.endswith("/") or "//" in name:
        raise InvalidRequest(f"config key {key!r}: a name may not end with '/' or contain '//'", field="key")
    return name


def parse_config_key(key: str) -> ConfigKey:
    """Split a key under ``config/`` into its layer, scope and name; refuse keys that fit no layer."""
    if not key:
        raise InvalidRequest("missing key: give a full key such as config/global/<name>", field="key")
    validate_key(key)
    if not key.startswith(CONFIG_PREFIX):
        raise InvalidRequest(f"key {key!r} is not under {CONFIG_PREFIX!r}", field="key")
    rest = key[len(CONFIG_PREFIX):]
    kind, _, rest = rest.partition("/")
    if kind == "global":
        return ConfigKey(key, LAYER_GLOBAL, _check_name(key, rest, "config/global/"))
    if kind == "env":
        env, _, name = rest.partition("/")
        validate_scope_name(env, "env")
        return ConfigKey(key, LAYER_ENV, _check_name(key, name, f"config/env/{env}/"), env=env)
    if kind == "service":
        service, _, name = rest.partition("/")
        validate_scope_name(service, "service")
        if name == "env":
            raise InvalidRequest(f"config key {key!r}: config/service/{service}/env/ is reserved for the "
                                 "service+env layer (config/service/<service>/env/<env>/<name>)", field="key")
        if name.startswith("env/"):
            env, _, name = name[len("env/"):].partition("/")
            validate_scope_name(env, "env")
            layer_prefix = f"config/service/{service}/env/{env}/"
            return ConfigKey(key, LAYER_SERVICE_ENV, _check_name(key, name, layer_prefix), service, env)
        return ConfigKey(key, LAYER_SERVICE, _check_name(key, name, f"config/service/{service}/"), service)
    raise InvalidRequest(
        f"config key {key!r} fits no layer: use config/global/<name>, config/env/<env>/<name>, "
        "config/service/<service>/<name> or config/service/<service>/env/<env>/<name>", field="key")


def validate_config_prefix(prefix: str) -> str:
    """A prefix for a subtree operation or a schema: ``config/`` or anything below it."""
    if not prefix:
        raise InvalidRequest("missing prefix: give config/ or a prefix below it", field="prefix")
    if not prefix.startswith(CONFIG_PREFIX):
        raise InvalidRequest(f"prefix {prefix!r} is not under {CONFIG_PREFIX!r}", field="prefix")
    validate_key(prefix)
    return prefix


def layer_prefixes(service: str | None, env: str | None) -> list[tuple[str, str]]:
    """(layer, key prefix) for one service / environment, lowest precedence first."""
    prefixes = [(LAYER_GLOBAL, "config/global/")]
    if env is not None:
        prefixes.append((LAYER_ENV, f"config/env/{validate_scope_name(env, 'env')}/"))
    if service is not None:
        prefixes.append((LAYER_SERVICE, f"config/service/{validate_scope_name(service, 'service')}/"))
        if env is not None:
            prefixes.append((LAYER_SERVICE_ENV, f"config/service/{service}/env/{env}/"))
    return prefixes


# --- the model ---------------------------------------------------------------------------------------------

class Version(NamedTuple):
    """One version of a key; ``value`` None is a deletion (tombstone)."""

    version: int
    modify_index: int  # the Raft index of the change
    time_ms: int
    author: str
    description: str
    value: bytes | None
    flags: int

    @property
    def deleted(self) -> bool:
        return self.value is None


@dataclass(frozen=True, slots=True)
class Retention:
    max_versions: int = DEFAULT_MAX_VERSIONS
    max_age_ms: int = 0  # 0: no age limit

    def __post_init__(self) -> None:
        if not isinstance(self.max_versions, int) or not 1 <= self.max_versions <= MAX_MAX_VERSIONS:
            raise InvalidRequest(f"max_versions {self.max_versions!r} is not an integer in 1..{MAX_MAX_VERSIONS}",
                                 field="max_versions")
        if not isinstance(self.max_age_ms, int) or not 0 <= self.max_age_ms < 1 << 62:
            raise InvalidRequest(f"max_age {self.max_age_ms!r} ms is not a non-negative integer",
                                 field="max_age_seconds")

    def to_json(self) -> dict[str, int]:
        return {"max_versions": self.max_versions, "max_age_seconds": self.max_age_ms // 1000}


@dataclass(frozen=True, slots=True)
class Resolved:
    name: str
    key: str
    layer: str
    value: bytes
    flags: int
    version: int
    index: int


@dataclass(frozen=True, slots=True)
class TreeChange:
    """One key a subtree rollback changes: back to ``restored`` (None: the key did not exist then)."""

    key: str
    restored: Version | None
    current_version: int | None

    @property
    def action(self) -> str:
        return "delete" if self.restored is None or self.restored.deleted else "put"


@dataclass(frozen=True, slots=True)
class Schema:
    prefix: str
    document: bytes  # canonical JSON (sorted keys)
    index: int
    time_ms: int
    author: str
    description: str


# --- schemas -----------------------------------------------------------------------------------------------

def _local_references_only(node: object, path: str = "") -> None:
    if isinstance(node, dict):
        for name, child in node.items():
            if name in ("$ref", "$dynamicRef", "$recursiveRef") and isinstance(child, str) \
                    and not child.startswith("#"):
                raise InvalidRequest(f"schema {name} {child!r} at {path or '/'} is not local: replicas never "
                                     "fetch documents, so only '#...' references are allowed", field="schema")
            _local_references_only(child, f"{path}/{name}")
    elif isinstance(node, list):
        for position, child in enumerate(node):
            _local_references_only(child, f"{path}/{position}")


def _validator_class(schema: object) -> Any:
    if isinstance(schema, dict) and "$schema" in schema:
        cls = validator_for(schema, default=None)
        if cls is None:
            raise InvalidRequest(f"schema dialect {schema['$schema']!r} is unknown", field="schema")
        return cls
    from jsonschema import Draft202012Validator

    return Draft202012Validator


def parse_schema(document: bytes) -> bytes:
    """Check a JSON Schema document; return it canonical (sorted keys) for storage."""
    if len(document) > MAX_VALUE_BYTES:
        raise InvalidRequest(f"schema is {len(document)} bytes; the limit is {MAX_VALUE_BYTES}", field="schema")
    try:
        schema = orjson.loads(document)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"schema is not JSON: {exc}", field="schema") from None
    if not isinstance(schema, dict | bool):
        raise InvalidRequest("a JSON Schema is an object (or true / false)", field="schema")
    _local_references_only(schema)
    cls = _validator_class(schema)
    try:
        cls.check_schema(schema)
    except schema_exceptions.SchemaError as exc:
        raise InvalidRequest(f"invalid JSON Schema at {_pointer(exc.absolute_path)}: {_clip(exc.message)}",
                             field="schema") from None
    return orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)


def format_time(time_ms: int) -> str:
    """RFC 3339 in UTC with milliseconds, the form the API shows and ``?time=`` accepts."""
    return datetime.fromtimestamp(time_ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + "..."


def _pointer(parts: Iterable[object]) -> str:
    return "/" + "/".join(str(part).replace("~", "~0").replace("/", "~1") for part in parts)


# --- commands ----------------------------------------------------------------------------------------------

def _meta_json(meta: ChangeMeta) -> dict[str, object]:
    return {"time_ms": meta.time_ms, "author": meta.author, "description": meta.description}


def _meta_from(document: dict[str, Any]) -> ChangeMeta:
    return ChangeMeta(document["time_ms"], document["author"], document["description"])


def _command(op: int, document: dict[str, object]) -> bytes:
    return bytes((op,)) + orjson.dumps(document)


def encode_write(kv_command: bytes) -> bytes:
    """A native write: the same KV command, but the result names the version it created."""
    return bytes((OP_WRITE,)) + kv_command


def encode_rollback(key: str, to_version: int, meta: ChangeMeta) -> bytes:
    parse_config_key(key)
    if not 1 <= to_version < 1 << 63:
        raise InvalidRequest(f"version {to_version} is not a positive integer", field="to")
    return _command(OP_ROLLBACK, {"key": key, "to": to_version, "meta": _meta_json(meta)})


def encode_rollback_tree(prefix: str, meta: ChangeMeta, *, time_ms: int | None = None,
                         index: int | None = None) -> bytes:
    validate_config_prefix(prefix)
    if (time_ms is None) == (index is None):
        raise InvalidRequest("give exactly one of ?time= and ?index= to say which state to restore", field="time")
    return _command(OP_ROLLBACK_TREE, {"prefix": prefix, "time_ms": time_ms, "index": index,
                                       "meta": _meta_json(meta)})


def encode_schema_put(prefix: str, document: bytes, meta: ChangeMeta) -> bytes:
    validate_config_prefix(prefix)
    return _command(OP_SCHEMA_PUT, {"prefix": prefix, "schema": parse_schema(document).decode(),
                                    "meta": _meta_json(meta)})


def encode_schema_delete(prefix: str, meta: ChangeMeta) -> bytes:
    validate_config_prefix(prefix)
    return _command(OP_SCHEMA_DELETE, {"prefix": prefix, "meta": _meta_json(meta)})


def encode_retention(retention: Retention, meta: ChangeMeta) -> bytes:
    return _command(OP_RETENTION, {"max_versions": retention.max_versions, "max_age_ms": retention.max_age_ms,
                                   "meta": _meta_json(meta)})


def touches_config(op: int, key: str) -> bool:
    return key.startswith(CONFIG_PREFIX) or (op == OP_DELETE_TREE and CONFIG_PREFIX.startswith(key))


# --- the state machine module ------------------------------------------------------------------------------

def _not_found(message: str) -> dict[str, object]:
    return {"ok": False, "code": "not_found", "error": message}


class ConfigStore:
    """Versions of every key under ``config/`` plus schemas and retention, beside the KV it watches."""

    def __init__(self, kv: KVStore) -> None:
        self.kv = kv
        self._history: dict[str, list[Version]] = {}  # key -> versions, oldest first
        self._history_keys: SortedList = SortedList()
        # Keys whose oldest version may expire by age, by that version's time: (time_ms, key).
        self._expiry: SortedList = SortedList()
        self._expiry_time: dict[str, int] = {}
        self._schemas: dict[str, Schema] = {}
        self._validators: dict[str, tuple[bytes, Any]] = {}  # prefix -> (schema document, compiled)
        self.retention = Retention()
        self.clock_ms = 0  # the newest proposer time seen: history times never go backwards
        self.index = 0  # Raft index of the last change to anything here
        self.forgotten_index = 0  # the newest tombstone dropped by age retention

    # --- applying ----------------------------------------------------------------------------------------

    def apply_kv(self, index: int, command: bytes) -> bool:
        """A Consul KV command: applied to the KV, and recorded if it touches ``config/``."""
        if not may_touch(command, _CONFIG_PREFIX_BYTES):
            return self.kv.apply(index, command)
        op, key = command_key(command)
        if not touches_config(op, key):
            return self.kv.apply(index, command)
        ok, _ = self._apply_kv_change(index, decode_command(command), command)
        return ok

    def apply(self, index: int, command: bytes) -> dict[str, object]:
        """A native configuration command (see the ``encode_*`` functions)."""
        op = command[0]
        if op == OP_WRITE:
            kv_command = command[1:]
            decoded = decode_command(kv_command)
            if not touches_config(decoded.op, decoded.key):
                raise InvalidRequest(f"key {decoded.key!r} is not under {CONFIG_PREFIX!r}", field="key")
            ok, versions = self._apply_kv_change(index, decoded, kv_command)
            return {"ok": ok, "index": index,
                    "versions": {version.key: version.version for version in versions}}
        document = orjson.loads(command[1:])
        meta = _meta_from(document["meta"])
        if op == OP_ROLLBACK:
            return self._rollback(index, document["key"], document["to"], meta)
        if op == OP_ROLLBACK_TREE:
            return self._rollback_tree(index, document["prefix"], meta, time_ms=document["time_ms"],
                                       target_index=document["index"])
        if op == OP_SCHEMA_PUT:
            return self._put_schema(index, document["prefix"], document["schema"].encode(), meta)
        if op == OP_SCHEMA_DELETE:
            self._advance_clock(meta)
            removed = self._schemas.pop(document["prefix"], None)
            self._validators.pop(document["prefix"], None)
            if removed is not None:
                self.index = index
            return {"ok": removed is not None, "index": index}
        if op == OP_RETENTION:
            self._advance_clock(meta)
            self.retention = Retention(document["max_versions"], document["max_age_ms"])
            for key in list(self._history):
                self._prune(key)
            self._expire()
            self.index = index
            return {"ok": True, "index": index, "retention": self.retention.to_json()}
        raise ValueError(f"unknown config op {op} at index {index}")

    def _apply_kv_change(self, index: int, command: KVCommand, raw: bytes) -> tuple[bool, list[_Recorded]]:
        recorded: list[_Recorded] = []
        if command.op == OP_PUT:
            parse_config_key(command.key)
            self._validate_value(command.key, command.value)
            if self.kv.apply(index, raw):
                stored = self.kv.get(command.key)
                assert stored is not None
                # The history shares the KV's bytes object: the current value is held once, not twice.
                recorded.append(self._record(index, command.key, stored.value, command.flags, command.meta))
                self._expire()
                return True, recorded
            return False, recorded
        if command.op == OP_DELETE:
            existed = self.kv.get(command.key) is not None
            ok = self.kv.apply(index, raw)
            if ok and existed:
                recorded.append(self._record(index, command.key, None, 0, command.meta))
        else:
            doomed = [key for key in self.kv.keys(command.key) if key.startswith(CONFIG_PREFIX)]
            ok = self.kv.apply(index, raw)
            recorded.extend(self._record(index, key, None, 0, command.meta) for key in doomed)
        self._expire()
        return ok, recorded

    def _advance_clock(self, meta: ChangeMeta | None) -> int:
        # Leaders' clocks differ a little; history time must still grow with the log, or "state at time T"
        # would not be a prefix of the history.
        if meta is not None and meta.time_ms > self.clock_ms:
            self.clock_ms = meta.time_ms
        return self.clock_ms

    def _record(self, index: int, key: str, value: bytes | None, flags: int, meta: ChangeMeta | None) -> _Recorded:
        time_ms = self._advance_clock(meta)
        versions = self._history.get(key)
        if versions is None:
            versions = self._history[key] = []
            self._history_keys.add(key)
        number = versions[-1].version + 1 if versions else 1
        versions.append(Version(number, index, time_ms, meta.author if meta else "",
                                meta.description if meta else "", value, flags))
        self.index = index
        self._prune(key)
        return _Recorded(key, number)

    # --- retention ----------------------------------------------------------------------------------------

    def _prune(self, key: str) -> None:
        versions = self._history[key]
        excess = len(versions) - self.retention.max_versions
        if excess > 0:
            del versions[:excess]
        if self.retention.max_age_ms:
            horizon = self.clock_ms - self.retention.max_age_ms
            expired = 0
            while expired < len(versions) - 1 and versions[expired].time_ms < horizon:
                expired += 1
            if expired:
                del versions[:expired]
            if len(versions) == 1 and versions[0].deleted and versions[0].time_ms < horizon:
                self._forget(key)
                return
        self._update_expiry(key)

    def _update_expiry(self, key: str) -> None:
        old = self._expiry_time.pop(key, None)
        if old is not None:
            self._expiry.remove((old, key))
        versions = self._history.get(key)
        # A live key's only version never expires: it is the current value.
        if versions and (len(versions) > 1 or versions[0].deleted):
            self._expiry_time[key] = versions[0].time_ms
            self._expiry.add((versions[0].time_ms, key))

    def _forget(self, key: str) -> None:
        versions = self._history.pop(key)
        self._history_keys.remove(key)
        self.forgotten_index = max(self.forgotten_index, versions[-1].modify_index)
        old = self._expiry_time.pop(key, None)
        if old is not None:
            self._expiry.remove((old, key))

    def _expire(self) -> None:
        if not self.retention.max_age_ms:
            return
        horizon = self.clock_ms - self.retention.max_age_ms
        while self._expiry and self._expiry[0][0] < horizon:
            # Each pass either drops the key or moves its expiry time to >= horizon (or removes it).
            self._prune(self._expiry[0][1])

    # --- schemas --------------------------------------------------------------------------------------------

    def _validator(self, schema: Schema) -> Any:
        cached = self._validators.get(schema.prefix)
        if cached is not None and cached[0] == schema.document:
            return cached[1]
        document = orjson.loads(schema.document)
        # Only the dialects' own meta-schemas are resolvable: a replica must never fetch anything.
        validator = _validator_class(document)(document, registry=SPECIFICATION_REGISTRY)
        self._validators[schema.prefix] = (schema.document, validator)
        return validator

    def schemas_for(self, key: str) -> list[Schema]:
        return [schema for prefix, schema in sorted(self._schemas.items()) if key.startswith(prefix)]

    def _validate_value(self, key: str, value: bytes, schemas: list[Schema] | None = None) -> None:
        for schema in self.schemas_for(key) if schemas is None else schemas:
            try:
                instance = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                raise InvalidRequest(f"{key}: the value is not JSON ({exc}), but schema {schema.prefix!r} "
                                     "applies to it", field="value") from None
            try:
                error = schema_exceptions.best_match(self._validator(schema).iter_errors(instance))
            except Exception as exc:
                # An unresolvable reference or a value nested too deep fails the same way on every replica:
                # refuse the write rather than let the exception stop the node's apply loop.
                raise InvalidRequest(f"{key}: cannot be checked against schema {schema.prefix!r}: {exc}",
                                     field="value") from None
            if error is not None:
                raise InvalidRequest(
                    f"{key}: value at {_pointer(error.absolute_path)} violates schema {schema.prefix!r} at "
                    f"{_pointer(error.absolute_schema_path)}: {_clip(error.message)}", field="value")

    def _put_schema(self, index: int, prefix: str, document: bytes, meta: ChangeMeta) -> dict[str, object]:
        if prefix not in self._schemas and len(self._schemas) >= MAX_SCHEMAS:
            raise InvalidRequest(f"there are already {MAX_SCHEMAS} schemas; delete one first", field="prefix")
        schema = Schema(prefix, document, index, meta.time_ms, meta.author, meta.description)
        # Existing values must satisfy the new schema, or the store would hold data its own rules refuse.
        violations: list[str] = []
        for entry in self.kv.scan(prefix):
            try:
                self._validate_value(entry.key, entry.value, [schema])
            except InvalidRequest as exc:
                violations.append(exc.message)
                if len(violations) == 3:
                    break
        if violations:
            raise InvalidRequest(f"existing values under {prefix!r} do not match the schema: "
                                 + "; ".join(violations), field="schema")
        self._advance_clock(meta)
        self._schemas[prefix] = schema
        self.index = index
        return {"ok": True, "index": index, "prefix": prefix}

    def schema(self, prefix: str) -> Schema | None:
        return self._schemas.get(prefix)

    def schemas(self) -> list[Schema]:
        return [self._schemas[prefix] for prefix in sorted(self._schemas)]

    # --- rollback -----------------------------------------------------------------------------------------

    def _write_back(self, index: int, key: str, restored: Version | None, meta: ChangeMeta) -> _Recorded | None:
        if restored is None or restored.deleted:
            if self.kv.get(key) is None:
                return None
            self.kv.apply(index, encode_delete(key, author=meta.author, description=meta.description,
                                               time_ms=meta.time_ms))
            return self._record(index, key, None, 0, meta)
        assert restored.value is not None
        self.kv.apply(index, encode_put(key, restored.value, flags=restored.flags, author=meta.author,
                                        description=meta.description, time_ms=meta.time_ms))
        return self._record(index, key, restored.value, restored.flags, meta)

    def _rollback(self, index: int, key: str, to_version: int, meta: ChangeMeta) -> dict[str, object]:
        target = self.version(key, to_version)
        if target is None:
            return _not_found(self.missing_version_message(key, to_version))
        if not target.deleted:
            assert target.value is not None
            self._validate_value(key, target.value)
        meta = ChangeMeta(meta.time_ms, meta.author, meta.description or f"rollback to version {to_version}")
        recorded = self._write_back(index, key, target, meta)
        self._expire()
        return {"ok": True, "index": index, "key": key, "restored": to_version, "changed": recorded is not None,
                "version": recorded.version if recorded else self._history[key][-1].version}

    def plan_tree_rollback(self, prefix: str, *, time_ms: int | None = None,
                           target_index: int | None = None) -> list[TreeChange]:
        """What restoring ``prefix`` to its state at ``time_ms`` (or after Raft index ``target_index``) changes."""
        if time_ms is not None and self.retention.max_age_ms \
                and time_ms < self.clock_ms - self.retention.max_age_ms:
            raise InvalidRequest("that time is older than the history retention window "
                                 f"({self.retention.max_age_ms // 1000} s)", field="time")
        if target_index is not None and target_index < self.forgotten_index:
            raise InvalidRequest(f"history before index {self.forgotten_index} has been forgotten by the "
                                 "retention policy", field="index")
        changes: list[TreeChange] = []
        incomplete: list[str] = []
        for key in self.history_keys(prefix):
            versions = self._history[key]
            if time_ms is not None:
                restored = next((v for v in reversed(versions) if v.time_ms <= time_ms), None)
            else:
                restored = next((v for v in reversed(versions) if v.modify_index <= (target_index or 0)), None)
            if restored is None and versions[0].version != 1:
                incomplete.append(key)
                continue
            current = self.kv.get(key)
            if restored is None or restored.deleted:
                if current is None:
                    continue
            elif current is not None and current.value == restored.value and current.flags == restored.flags:
                continue
            changes.append(TreeChange(key, restored, versions[-1].version))
        if incomplete:
            raise InvalidRequest(f"the versions needed to restore {', '.join(incomplete[:5])} have been "
                                 "dropped by the retention policy", field="time")
        return changes

    def _rollback_tree(self, index: int, prefix: str, meta: ChangeMeta, *, time_ms: int | None,
                       target_index: int | None) -> dict[str, object]:
        changes = self.plan_tree_rollback(prefix, time_ms=time_ms, target_index=target_index)
        for change in changes:  # all or nothing: check every value before writing any
            if change.action == "put":
                assert change.restored is not None and change.restored.value is not None
                self._validate_value(change.key, change.restored.value)
        target = f"index {target_index}" if time_ms is None else format_time(time_ms)
        meta = ChangeMeta(meta.time_ms, meta.author, meta.description or f"rollback of {prefix} to {target}")
        results = []
        for change in changes:
            recorded = self._write_back(index, change.key, change.restored, meta)
            results.append({"key": change.key, "action": change.action,
                            "restored": change.restored.version if change.restored else None,
                            "version": recorded.version if recorded else None})
        self._expire()
        return {"ok": True, "index": index, "prefix": prefix, "changes": results}

    # --- reads ----------------------------------------------------------------------------------------------

    def history(self, key: str) -> list[Version]:
        """A key's versions, oldest first (empty if it has none)."""
        return list(self._history.get(key, ()))

    def history_keys(self, prefix: str) -> Iterator[str]:
        for key in self._history_keys.irange(minimum=prefix):
            if not key.startswith(prefix):
                return
            yield key

    def version(self, key: str, number: int) -> Version | None:
        versions = self._history.get(key)
        if not versions:
            return None
        position = number - versions[0].version
        if 0 <= position < len(versions):
            return versions[position]
        return None

    def missing_version_message(self, key: str, number: int) -> str:
        versions = self._history.get(key)
        if not versions:
            return f"{key} has no history"
        if number < versions[0].version:
            return (f"version {number} of {key} has been dropped by the retention policy "
                    f"(oldest kept: {versions[0].version})")
        return f"{key} has no version {number} (latest: {versions[-1].version})"

    def resolve(self, service: str | None, env: str | None) -> dict[str, Resolved]:
        resolved: dict[str, Resolved] = {}
        for layer, prefix in layer_prefixes(service, env):
            for entry in self.kv.scan(prefix):
                name = entry.key[len(prefix):]
                if layer == LAYER_SERVICE and name.startswith("env/"):
                    continue  # the service+env layer's keys
                versions = self._history.get(entry.key)
                resolved[name] = Resolved(name, entry.key, layer, entry.value, entry.flags,
                                          versions[-1].version if versions else 0, entry.modify_index)
        return dict(sorted(resolved.items()))

    def view_index(self, service: str | None, env: str | None) -> int:
        """The Raft index of the last change (deletions included) that can affect ``resolve(service, env)``."""
        newest = self.forgotten_index
        for _, prefix in layer_prefixes(service, env):
            for key in self.history_keys(prefix):
                newest = max(newest, self._history[key][-1].modify_index)
        return newest

    # --- snapshot -------------------------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        return orjson.dumps({
            "clock_ms": self.clock_ms, "index": self.index, "forgotten_index": self.forgotten_index,
            "retention": [self.retention.max_versions, self.retention.max_age_ms],
            "schemas": [[s.prefix, s.document.decode(), s.index, s.time_ms, s.author, s.description]
                        for s in self.schemas()],
            "history": [[key, [[v.version, v.modify_index, v.time_ms, v.author, v.description,
                                None if v.value is None else v.value.hex(), v.flags]
                               for v in self._history[key]]]
                        for key in self._history_keys],
        })

    def restore(self, data: bytes) -> None:
        document = orjson.loads(data)
        self.clock_ms = document["clock_ms"]
        self.index = document["index"]
        self.forgotten_index = document["forgotten_index"]
        self.retention = Retention(*document["retention"])
        self._schemas = {prefix: Schema(prefix, text.encode(), index, time_ms, author, description)
                         for prefix, text, index, time_ms, author, description in document["schemas"]}
        self._validators = {}
        self._history = {
            key: [Version(number, index, time_ms, author, description,
                          None if value is None else bytes.fromhex(value), flags)
                  for number, index, time_ms, author, description, value, flags in versions]
            for key, versions in document["history"]}
        self._history_keys = SortedList(self._history)
        self._expiry = SortedList()
        self._expiry_time = {}
        for key in self._history:
            self._update_expiry(key)

    def state_hash(self) -> str:
        return hashlib.sha256(self.snapshot()).hexdigest()


class _Recorded(NamedTuple):
    key: str
    version: int
