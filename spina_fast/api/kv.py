"""Consul-compatible KV endpoints: ``GET|PUT|DELETE /v1/kv/<key>``.

Supported: ``?recurse``, ``?keys`` (+ ``separator``), ``?raw``, ``?flags=``, ``?cas=``, blocking
queries (``?index=&wait=``), ``?consistent`` (ReadIndex) and ``?stale``. Writes on a follower are
forwarded to the leader by the Raft node.
"""

from __future__ import annotations

import random
import re
import time

from aiohttp import web

from spina_fast.api.responses import AGENT_KEY, json_response
from spina_fast.errors import InvalidRequest
from spina_fast.kv.store import MAX_VALUE_BYTES, encode_delete, encode_put, validate_key
from spina_fast.state import MODULE_KV

MAX_WAIT_SECONDS = 600.0
DEFAULT_WAIT_SECONDS = 300.0
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_wait(text: str) -> float:
    match = _DURATION.match(text)
    if not match:
        raise InvalidRequest(f"wait {text!r} is not a duration like 10s, 500ms or 5m", field="wait")
    return min(float(match.group(1)) * _UNITS[match.group(2)], MAX_WAIT_SECONDS)


def parse_uint(request: web.Request, name: str) -> int | None:
    text = request.query.get(name)
    if text is None:
        return None
    if not text.isdigit() or int(text) >= 1 << 64:
        raise InvalidRequest(f"{name} {text!r} is not an unsigned 64-bit integer", field=name)
    return int(text)


async def read_consistency(request: web.Request) -> dict[str, str]:
    """Apply ``?consistent`` / ``?stale`` / default, and return the Consul read headers."""
    node = request.app[AGENT_KEY].node
    if "consistent" in request.query and "stale" in request.query:
        raise InvalidRequest("?consistent and ?stale cannot be combined", field="consistent")
    if "consistent" in request.query:
        await node.read_barrier()
    return {
        "X-Consul-KnownLeader": "true" if node.leader_id else "false",
        "X-Consul-LastContact": str(max(node.last_contact_ms(), 0)),
    }


async def block_until_changed(request: web.Request, prefix: str) -> None:
    """Consul blocking query: with ``?index=N`` wait (up to ``?wait``) while the KV index is still <= N."""
    wanted = parse_uint(request, "index")
    if not wanted:
        return
    store = request.app[AGENT_KEY].state.kv
    wait = parse_wait(request.query["wait"]) if "wait" in request.query else DEFAULT_WAIT_SECONDS
    # Jitter like Consul (up to wait/16) so that many watchers do not return in lockstep.
    deadline = time.monotonic() + wait + random.random() * wait / 16
    while store.index <= wanted:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        await store.wait_for_change(prefix, remaining)


async def kv_get(request: web.Request) -> web.StreamResponse:
    key = request.match_info["key"]
    recurse = "recurse" in request.query
    keys_only = "keys" in request.query
    if not (recurse or keys_only):
        validate_key(key)
    await block_until_changed(request, key)
    headers = await read_consistency(request)
    store = request.app[AGENT_KEY].state.kv
    headers["X-Consul-Index"] = str(max(store.index, 1))
    if keys_only:
        names = store.keys(key, request.query.get("separator", ""))
        return json_response(names, status=200 if names else 404, headers=headers)
    entries = store.scan(key) if recurse else [entry] if (entry := store.get(key)) else []
    if not entries:
        return web.Response(status=404, headers=headers)
    if "raw" in request.query and not recurse:
        return web.Response(body=entries[0].value, headers=headers, content_type="application/octet-stream")
    return json_response([entry.to_consul() for entry in entries], headers=headers)


async def kv_put(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    for unsupported in ("acquire", "release"):
        if unsupported in request.query:
            raise InvalidRequest(f"?{unsupported} (sessions and locks) is not supported", field=unsupported)
    if request.content_length is not None and request.content_length > MAX_VALUE_BYTES:
        return json_response({"error": f"value is {request.content_length} bytes; the limit is "
                                       f"{MAX_VALUE_BYTES}", "code": "too_large"}, status=413)
    value = await request.read()
    if len(value) > MAX_VALUE_BYTES:
        return json_response({"error": f"value is {len(value)} bytes; the limit is {MAX_VALUE_BYTES}",
                              "code": "too_large"}, status=413)
    command = encode_put(key, value, flags=parse_uint(request, "flags") or 0, cas=parse_uint(request, "cas"))
    result = await request.app[AGENT_KEY].node.propose(MODULE_KV + command)
    return json_response(result)


async def kv_delete(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    recurse = "recurse" in request.query
    command = encode_delete(key, recurse=recurse, cas=parse_uint(request, "cas"))
    result = await request.app[AGENT_KEY].node.propose(MODULE_KV + command)
    return json_response(result)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/kv/{key:.*}", kv_get)
    app.router.add_put("/v1/kv/{key:.*}", kv_put)
    app.router.add_delete("/v1/kv/{key:.*}", kv_delete)


__all__ = ["add_routes"]
