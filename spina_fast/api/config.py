"""Configuration management over HTTP: ``/v1/spina/config/...`` (layers, history, diff, rollback, schemas).

Endpoints (``<key>`` is a full key such as ``config/service/api/env/prod/timeout``):

- ``GET  resolve?service=S&env=E``  effective configuration of one service in one environment, every
  name with its value, layer, version and key; blocking with ``?index=N&wait=D`` like Consul (the index
  is that of the last change, deletions included, that can affect this view).
- ``GET  history/<key>[?limit=N]``  versions newest first, deletions included.
- ``GET  diff/<key>?from=V1[&to=V2]``  unified text diff (default ``to``: the latest version); with
  ``?format=json`` (or ``Accept: application/json``) a JSON document that adds, for JSON values, the
  structural changes as RFC 6902 operations.
- ``POST rollback/<key>?to=V``  writes the content of version V as a new version.
- ``POST rollback-tree/<prefix>?time=T | ?index=I [&dry-run]``  restores every key under ``prefix`` to
  its state at time T (RFC 3339 with a zone, or unix seconds) or right after Raft index I, in one
  atomic Raft command; keys that did not exist then are deleted, keys already right are left alone.
- ``GET|PUT|DELETE key/<key>``  native read / write (``?flags=``, ``?cas=``, ``DELETE ?recurse``);
  a PUT answers the version it created, a failed check-and-set is 409.
- ``GET schemas``, ``GET|PUT|DELETE schema/<prefix>``  JSON Schemas by key prefix.
- ``GET|PUT retention``  ``{"max_versions": N, "max_age_seconds": S}`` (0: no age limit).

Every write takes ``X-Spina-Author`` and ``X-Spina-Description``; the time is this node's clock.
Reads are local like the KV's (``?consistent`` for linearizable); a history or diff miss is retried once
after a ReadIndex barrier, so a version just written through another node is found.
"""

from __future__ import annotations

import asyncio
import base64
import difflib
import random
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web

from spina_fast.api.kv import apply_consistency, parse_uint, parse_wait, read_headers
from spina_fast.api.responses import AGENT_KEY, error_response, json_response
from spina_fast.errors import InvalidRequest, NotFound
from spina_fast.kv.config import (
    ConfigStore,
    Retention,
    Schema,
    Version,
    encode_retention,
    encode_rollback,
    encode_rollback_tree,
    encode_schema_delete,
    encode_schema_put,
    encode_write,
    format_time,
    layer_prefixes,
    parse_config_key,
    validate_config_prefix,
    validate_scope_name,
)
from spina_fast.kv.store import MAX_VALUE_BYTES, ChangeMeta, encode_delete, encode_put
from spina_fast.state import MODULE_CONFIG

AUTHOR_HEADER = "X-Spina-Author"
DESCRIPTION_HEADER = "X-Spina-Description"
BASE = "/v1/spina/config"
DEFAULT_WAIT_SECONDS = 300.0


def _config(request: web.Request) -> ConfigStore:
    return request.app[AGENT_KEY].state.config


def _meta(request: web.Request) -> ChangeMeta:
    return ChangeMeta.create(request.headers.get(AUTHOR_HEADER, ""), request.headers.get(DESCRIPTION_HEADER, ""))


async def _propose(request: web.Request, command: bytes) -> dict[str, Any]:
    result = await request.app[AGENT_KEY].node.propose(MODULE_CONFIG + command)
    if not result.get("ok", True) and result.get("code") == "not_found":
        raise NotFound(result["error"])
    return dict(result)


def parse_time(text: str) -> int:
    """Unix seconds (``1767225600``, ``1767225600.5``) or RFC 3339 with a zone -> unix milliseconds."""
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise InvalidRequest(f"time {text!r} is neither RFC 3339 (2026-01-31T12:00:00Z) nor unix seconds",
                                 field="time") from None
        if moment.tzinfo is None:
            raise InvalidRequest(f"time {text!r} has no time zone; add Z or an offset like +02:00",
                                 field="time") from None
        seconds = moment.timestamp()
    if not 0 <= seconds < 1 << 40:
        raise InvalidRequest(f"time {text!r} is out of range", field="time")
    return int(seconds * 1000)


def _value_fields(value: bytes | None) -> dict[str, object]:
    if value is None:
        return {"value": None}
    try:
        return {"value": value.decode()}
    except UnicodeDecodeError:
        return {"value": base64.b64encode(value).decode(), "encoding": "base64"}


def version_json(version: Version) -> dict[str, object]:
    return {"version": version.version, "index": version.modify_index, "time": format_time(version.time_ms),
            "author": version.author, "description": version.description, **_value_fields(version.value),
            "deleted": version.deleted, "flags": version.flags}


def _schema_json(schema: Schema) -> dict[str, object]:
    return {"prefix": schema.prefix, "schema": orjson.loads(schema.document), "index": schema.index,
            "time": format_time(schema.time_ms), "author": schema.author, "description": schema.description}


async def _read_headers(request: web.Request) -> dict[str, str]:
    """Apply ``?consistent`` / ``?stale`` like the KV API, and return the Consul read headers."""
    node = request.app[AGENT_KEY].node
    await apply_consistency(node, request.query)
    return read_headers(node)


def _index_headers(headers: dict[str, str], index: int) -> dict[str, str]:
    headers["X-Consul-Index"] = str(max(index, 1))
    return headers


async def _block(request: web.Request, prefixes: list[str], current_index: Callable[[], int]) -> None:
    """A Consul blocking query: with ``?index=N``, wait (up to ``?wait``) while ``current_index()`` <= N.

    Every change a view depends on is a KV change under one of ``prefixes``; watching only those keeps a
    write to another service from waking every watcher."""
    wanted = parse_uint(request.query, "index")
    if not wanted:
        return
    wait = parse_wait(request.query["wait"]) if "wait" in request.query else DEFAULT_WAIT_SECONDS
    deadline = time.monotonic() + wait + random.random() * wait / 16  # Consul's jitter
    while current_index() <= wanted:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        store = request.app[AGENT_KEY].state.kv
        waits = [asyncio.ensure_future(store.wait_for_change(prefix, remaining)) for prefix in prefixes]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()


async def _barrier_unless_stale(request: web.Request) -> bool:
    """After a local miss: catch up with the leader (ReadIndex) and say whether a retry is worth it."""
    if "stale" in request.query or "consistent" in request.query:
        return False
    await request.app[AGENT_KEY].node.read_barrier()
    return True


def _scope(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    return None if value is None else validate_scope_name(value, name)


# --- resolve -----------------------------------------------------------------------------------------------

async def resolve(request: web.Request) -> web.Response:
    service, env = _scope(request, "service"), _scope(request, "env")
    prefixes = [prefix for _, prefix in layer_prefixes(service, env)]
    await _block(request, prefixes, lambda: _config(request).view_index(service, env))
    headers = await _read_headers(request)
    config = _config(request)
    view = {name: {**_value_fields(item.value), "layer": item.layer, "version": item.version, "key": item.key,
                   "index": item.index, "flags": item.flags}
            for name, item in config.resolve(service, env).items()}
    return json_response(view, headers=_index_headers(headers, config.view_index(service, env)))


# --- history and diff ----------------------------------------------------------------------------------------

async def history(request: web.Request) -> web.Response:
    key = parse_config_key(request.match_info["key"]).key
    limit = parse_uint(request.query, "limit")
    headers = await _read_headers(request)
    versions = _config(request).history(key)
    if not versions and await _barrier_unless_stale(request):
        versions = _config(request).history(key)
    if not versions:
        raise NotFound(f"{key} has no history")
    newest_first = [version_json(version) for version in reversed(versions)]
    return json_response(newest_first[:limit] if limit else newest_first,
                         headers=_index_headers(headers, versions[-1].modify_index))


def _version_number(request: web.Request, name: str) -> int | None:
    number = parse_uint(request.query, name)
    if number == 0:
        raise InvalidRequest(f"{name}=0: versions count from 1", field=name)
    return number


async def _find_version(request: web.Request, key: str, number: int) -> Version:
    found = _config(request).version(key, number)
    if found is None and await _barrier_unless_stale(request):
        found = _config(request).version(key, number)
    if found is None:
        raise NotFound(_config(request).missing_version_message(key, number))
    return found


def _json_value(value: bytes | None) -> tuple[bool, Any]:
    if value is None:
        return True, None
    try:
        return True, orjson.loads(value)
    except orjson.JSONDecodeError:
        return False, None


def _same(old: Any, new: Any) -> bool:
    # In Python True == 1 == 1.0; in JSON they are different values.
    return type(old) is type(new) and old == new


def json_changes(old: Any, new: Any, path: str = "") -> list[dict[str, Any]]:
    """RFC 6902 operations turning ``old`` into ``new``; ``remove`` and ``replace`` also carry ``old``."""
    if isinstance(old, dict) and isinstance(new, dict):
        changes: list[dict[str, Any]] = []
        for name in sorted(old.keys() | new.keys()):
            child = f"{path}/{name.replace('~', '~0').replace('/', '~1')}"
            if name not in new:
                changes.append({"op": "remove", "path": child, "old": old[name]})
            elif name not in old:
                changes.append({"op": "add", "path": child, "value": new[name]})
            else:
                changes.extend(json_changes(old[name], new[name], child))
        return changes
    if isinstance(old, list) and isinstance(new, list):
        changes = []
        for position in range(min(len(old), len(new))):
            changes.extend(json_changes(old[position], new[position], f"{path}/{position}"))
        changes.extend({"op": "add", "path": f"{path}/{position}", "value": new[position]}
                       for position in range(len(old), len(new)))
        # Highest index first, so that the operations apply in order.
        changes.extend({"op": "remove", "path": f"{path}/{position}", "old": old[position]}
                       for position in reversed(range(len(new), len(old))))
        return changes
    if _same(old, new):
        return []
    if old is None and path == "":
        return [{"op": "add", "path": "", "value": new}]
    return [{"op": "replace", "path": path, "value": new, "old": old}]


def _diff_lines(value: bytes | None, structured: bool) -> list[str] | None:
    if value is None:
        return []
    if structured:
        # One-line JSON documents diff uselessly: compare a canonical, indented form.
        return orjson.dumps(orjson.loads(value), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() \
            .splitlines(keepends=True)
    try:
        return value.decode().splitlines(keepends=True)
    except UnicodeDecodeError:
        return None


def unified_diff(key: str, old: Version, new: Version) -> tuple[str, bool]:
    old_is_json, _ = _json_value(old.value)
    new_is_json, _ = _json_value(new.value)
    structured = old_is_json and new_is_json and not (old.value is None and new.value is None)
    old_lines, new_lines = _diff_lines(old.value, structured), _diff_lines(new.value, structured)
    labels = (f"{key}@{old.version}{' (deleted)' if old.deleted else ''}",
              f"{key}@{new.version}{' (deleted)' if new.deleted else ''}")
    if old_lines is None or new_lines is None:
        if old.value == new.value:
            return "", structured
        return f"Binary values {labels[0]} and {labels[1]} differ\n", structured
    lines = difflib.unified_diff(old_lines, new_lines, *labels, format_time(old.time_ms), format_time(new.time_ms))
    return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of value\n" for line in lines), \
        structured


async def diff(request: web.Request) -> web.Response:
    key = parse_config_key(request.match_info["key"]).key
    from_number, to_number = _version_number(request, "from"), _version_number(request, "to")
    output = request.query.get("format") or (
        "json" if "application/json" in request.headers.get("Accept", "") else "text")
    if output not in ("text", "json"):
        raise InvalidRequest(f"format {output!r} is not text or json", field="format")
    headers = await _read_headers(request)
    if to_number is None:
        versions = _config(request).history(key)
        if not versions and await _barrier_unless_stale(request):
            versions = _config(request).history(key)
        if not versions:
            raise NotFound(f"{key} has no history")
        to_number = versions[-1].version
    if from_number is None:
        if to_number == 1:
            raise InvalidRequest("version 1 has no predecessor: give ?from=", field="from")
        from_number = to_number - 1
    new = await _find_version(request, key, to_number)
    old = await _find_version(request, key, from_number)
    text, structured = unified_diff(key, old, new)
    _index_headers(headers, new.modify_index)
    if output == "text":
        return web.Response(text=text, content_type="text/plain", charset="utf-8", headers=headers)
    document: dict[str, object] = {"key": key, "from": version_json(old), "to": version_json(new), "unified": text,
                                   "structured": structured, "changes": None}
    if structured:
        document["changes"] = json_changes(_json_value(old.value)[1], _json_value(new.value)[1])
        if new.value is None:
            document["changes"] = [{"op": "remove", "path": "", "old": _json_value(old.value)[1]}]
    return json_response(document, headers=headers)


# --- rollback ------------------------------------------------------------------------------------------------

async def rollback(request: web.Request) -> web.Response:
    key = parse_config_key(request.match_info["key"]).key
    to = _version_number(request, "to")
    if to is None:
        raise InvalidRequest("give ?to=<version> to say which version to restore", field="to")
    return json_response(await _propose(request, encode_rollback(key, to, _meta(request))))


async def rollback_tree(request: web.Request) -> web.Response:
    prefix = validate_config_prefix(request.match_info["prefix"])
    time_text = request.query.get("time")
    time_ms = None if time_text is None else parse_time(time_text)
    target_index = parse_uint(request.query, "index")
    if (time_ms is None) == (target_index is None):
        raise InvalidRequest("give exactly one of ?time= (RFC 3339 or unix seconds) and ?index= (a Raft index)",
                             field="time")
    if "dry-run" in request.query:
        headers = await _read_headers(request)
        config = _config(request)
        changes = config.plan_tree_rollback(prefix, time_ms=time_ms, target_index=target_index)
        return json_response({"ok": True, "dry_run": True, "prefix": prefix, "changes": [
            {"key": change.key, "action": change.action,
             "restored": change.restored.version if change.restored else None,
             "current": change.current_version} for change in changes]},
            headers=_index_headers(headers, config.index))
    command = encode_rollback_tree(prefix, _meta(request), time_ms=time_ms, index=target_index)
    return json_response(await _propose(request, command))


# --- native keys -----------------------------------------------------------------------------------------------

async def key_get(request: web.Request) -> web.Response:
    parsed = parse_config_key(request.match_info["key"])
    headers = await _read_headers(request)
    config = _config(request)
    entry = config.kv.get(parsed.key)
    versions = config.history(parsed.key)
    if entry is None:
        raise NotFound(f"{parsed.key} does not exist")
    current = version_json(versions[-1]) if versions else {}
    return json_response({**current, "key": parsed.key, "layer": parsed.layer, "name": parsed.name,
                          "service": parsed.service, "env": parsed.env, **_value_fields(entry.value),
                          "flags": entry.flags, "index": entry.modify_index, "create_index": entry.create_index},
                         headers=_index_headers(headers, entry.modify_index))


async def key_put(request: web.Request) -> web.Response:
    key = parse_config_key(request.match_info["key"]).key
    if request.content_length is not None and request.content_length > MAX_VALUE_BYTES:
        return error_response(413, f"value is {request.content_length} bytes; the limit is {MAX_VALUE_BYTES}",
                              "too_large")
    value = await request.read()
    if len(value) > MAX_VALUE_BYTES:
        return error_response(413, f"value is {len(value)} bytes; the limit is {MAX_VALUE_BYTES}", "too_large")
    meta = _meta(request)
    query = request.query
    command = encode_put(key, value, flags=parse_uint(query, "flags") or 0, cas=parse_uint(query, "cas"),
                         author=meta.author, description=meta.description, time_ms=meta.time_ms)
    result = await _propose(request, encode_write(command))
    if not result["ok"]:
        return error_response(409, f"check-and-set failed: {key} is not at index {request.query['cas']}",
                              "cas_failed")
    return json_response({"ok": True, "key": key, "index": result["index"], "version": result["versions"][key]})


async def key_delete(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    recurse = "recurse" in request.query
    if recurse:
        validate_config_prefix(key)
    else:
        parse_config_key(key)
    meta = _meta(request)
    command = encode_delete(key, recurse=recurse, cas=parse_uint(request.query, "cas"), author=meta.author,
                            description=meta.description, time_ms=meta.time_ms)
    result = await _propose(request, encode_write(command))
    if not result["ok"]:
        return error_response(409, f"check-and-set failed: {key} is not at index {request.query['cas']}",
                              "cas_failed")
    return json_response({"ok": True, "index": result["index"], "deleted": result["versions"]})


# --- schemas and retention ---------------------------------------------------------------------------------

async def schemas_list(request: web.Request) -> web.Response:
    headers = await _read_headers(request)
    config = _config(request)
    return json_response([_schema_json(schema) for schema in config.schemas()],
                         headers=_index_headers(headers, config.index))


async def schema_get(request: web.Request) -> web.Response:
    prefix = validate_config_prefix(request.match_info["prefix"])
    headers = await _read_headers(request)
    schema = _config(request).schema(prefix)
    if schema is None:
        raise NotFound(f"no schema is registered for {prefix!r}")
    return json_response(_schema_json(schema), headers=_index_headers(headers, schema.index))


async def schema_put(request: web.Request) -> web.Response:
    prefix = validate_config_prefix(request.match_info["prefix"])
    command = encode_schema_put(prefix, await request.read(), _meta(request))
    return json_response(await _propose(request, command))


async def schema_delete(request: web.Request) -> web.Response:
    prefix = validate_config_prefix(request.match_info["prefix"])
    result = await _propose(request, encode_schema_delete(prefix, _meta(request)))
    if not result["ok"]:
        raise NotFound(f"no schema is registered for {prefix!r}")
    return json_response(result)


async def retention_get(request: web.Request) -> web.Response:
    headers = await _read_headers(request)
    return json_response(_config(request).retention.to_json(), headers=headers)


def _non_negative_int(document: dict[str, Any], name: str, default: int) -> int:
    value = document.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidRequest(f"{name} must be a non-negative integer, not {value!r}", field=name)
    return value


async def retention_put(request: web.Request) -> web.Response:
    try:
        document = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"body is not JSON: {exc}", field="body") from None
    if not isinstance(document, dict):
        raise InvalidRequest('body must be an object like {"max_versions": 100, "max_age_seconds": 0}',
                             field="body")
    unknown = sorted(document.keys() - {"max_versions", "max_age_seconds"})
    if unknown:
        raise InvalidRequest(f"unknown retention setting {unknown[0]!r}", field=unknown[0])
    current = _config(request).retention
    retention = Retention(_non_negative_int(document, "max_versions", current.max_versions),
                          _non_negative_int(document, "max_age_seconds", current.max_age_ms // 1000) * 1000)
    return json_response(await _propose(request, encode_retention(retention, _meta(request))))


def add_routes(app: web.Application) -> None:
    router = app.router
    router.add_get(f"{BASE}/resolve", resolve)
    router.add_get(f"{BASE}/history/{{key:.*}}", history)
    router.add_get(f"{BASE}/diff/{{key:.*}}", diff)
    router.add_post(f"{BASE}/rollback/{{key:.*}}", rollback)
    router.add_post(f"{BASE}/rollback-tree/{{prefix:.*}}", rollback_tree)
    router.add_get(f"{BASE}/key/{{key:.*}}", key_get)
    router.add_put(f"{BASE}/key/{{key:.*}}", key_put)
    router.add_delete(f"{BASE}/key/{{key:.*}}", key_delete)
    router.add_get(f"{BASE}/schemas", schemas_list)
    router.add_get(f"{BASE}/schema/{{prefix:.*}}", schema_get)
    router.add_put(f"{BASE}/schema/{{prefix:.*}}", schema_put)
    router.add_delete(f"{BASE}/schema/{{prefix:.*}}", schema_delete)
    router.add_get(f"{BASE}/retention", retention_get)
    router.add_put(f"{BASE}/retention", retention_put)


__all__ = ["AUTHOR_HEADER", "DESCRIPTION_HEADER", "add_routes"]
