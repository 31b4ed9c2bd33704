"""Consul-compatible KV endpoints: ``GET|PUT|DELETE /v1/kv/<key>``.

Supported: ``?recurse``, ``?keys`` (+ ``separator``), ``?raw``, ``?flags=``, ``?cas=``, blocking
queries (``?index=&wait=``), ``?consistent`` (ReadIndex) and ``?stale``. Writes on a follower are
forwarded to the leader by the Raft node.

The semantics live in the functions taking ``(agent, key, query, ...)`` and returning a ``Reply``; the
query is a mapping from each parameter name to its first value (aiohttp's ``request.query.get``). The
aiohttp routes at the bottom and the fast front end (``api/fast_http.py``) both call them.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from aiohttp import web

from spina_fast.api.responses import AGENT_KEY, Reply, json_reply, web_response
from spina_fast.errors import InvalidRequest
from spina_fast.kv.store import MAX_VALUE_BYTES, encode_delete, encode_put, validate_key
from spina_fast.state import MODULE_KV

if TYPE_CHECKING:
    from spina_fast.agent import Agent
    from spina_fast.raft.node import RaftNode

Query = Mapping[str, str]

ROUTE = "/v1/kv/{key}"
MAX_WAIT_SECONDS = 600.0
DEFAULT_WAIT_SECONDS = 300.0
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_wait(text: str) -> float:
    match = _DURATION.match(text)
    if not match:
        raise InvalidRequest(f"wait {text!r} is not a duration like 10s, 500ms or 5m", field="wait")
    return min(float(match.group(1)) * _UNITS[match.group(2)], MAX_WAIT_SECONDS)


def parse_uint(query: Query, name: str) -> int | None:
    text = query.get(name)
    if text is None:
        return None
    if not text.isdigit() or int(text) >= 1 << 64:
        raise InvalidRequest(f"{name} {text!r} is not an unsigned 64-bit integer", field=name)
    return int(text)


def read_headers(node: RaftNode) -> dict[str, str]:
    """The Consul read headers (the caller adds ``X-Consul-Index``)."""
    return {
        "X-Consul-KnownLeader": "true" if node.leader_id else "false",
        "X-Consul-LastContact": str(max(node.last_contact_ms(), 0)),
    }


async def apply_consistency(node: RaftNode, query: Query) -> None:
    """``?consistent`` waits for a ReadIndex barrier; ``?stale`` and the default read locally."""
    if "consistent" in query and "stale" in query:
        raise InvalidRequest("?consistent and ?stale cannot be combined", field="consistent")
    if "consistent" in query:
        await node.read_barrier()


async def block_until_changed(agent: Agent, query: Query, prefix: str) -> None:
    """Consul blocking query: with ``?index=N`` wait (up to ``?wait``) while the KV index is still <= N."""
    wanted = parse_uint(query, "index")
    if not wanted:
        return
    store = agent.state.kv
    wait = parse_wait(query["wait"]) if "wait" in query else DEFAULT_WAIT_SECONDS
    # Jitter like Consul (up to wait/16) so that many watchers do not return in lockstep.
    deadline = time.monotonic() + wait + random.random() * wait / 16
    while store.index <= wanted:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        await store.wait_for_change(prefix, remaining)


def answers_at_once(query: Query) -> bool:
    """Whether a GET with this query neither blocks nor needs a read barrier (then ``read`` serves it)."""
    return "index" not in query and "consistent" not in query


def _check_get(key: str, query: Query) -> None:
    if "recurse" not in query and "keys" not in query:
        validate_key(key)


def _lookup(agent: Agent, key: str, query: Query) -> Reply:
    headers = read_headers(agent.node)
    store = agent.state.kv
    headers["X-Consul-Index"] = str(max(store.index, 1))
    if "keys" in query:
        names = store.keys(key, query.get("separator", ""))
        return json_reply(names, status=200 if names else 404, headers=headers)
    recurse = "recurse" in query
    entries = store.scan(key) if recurse else [entry] if (entry := store.get(key)) else []
    if not entries:
        return Reply(404, headers=headers)
    if "raw" in query and not recurse:
        return Reply(200, entries[0].value, "application/octet-stream", headers)
    return json_reply([entry.to_consul() for entry in entries], headers=headers)


def read(agent: Agent, key: str, query: Query) -> Reply:
    """A GET for which ``answers_at_once(query)`` holds, answered without awaiting anything."""
    _check_get(key, query)
    return _lookup(agent, key, query)


async def get(agent: Agent, key: str, query: Query) -> Reply:
    _check_get(key, query)
    await block_until_changed(agent, query, key)
    await apply_consistency(agent.node, query)
    return _lookup(agent, key, query)


def _too_large(size: int) -> Reply:
    return json_reply({"error": f"value is {size} bytes; the limit is {MAX_VALUE_BYTES}", "code": "too_large"},
                      status=413)


def check_put(query: Query, content_length: int | None) -> Reply | None:
    """What can be said about a PUT before its body is read: an error reply, or None to go on."""
    for unsupported in ("acquire", "release"):
        if unsupported in query:
            raise InvalidRequest(f"?{unsupported} (sessions and locks) is not supported", field=unsupported)
    if content_length is not None and content_length > MAX_VALUE_BYTES:
        return _too_large(content_length)
    return None


async def put(agent: Agent, key: str, query: Query, value: bytes, *, author: str = "",
              description: str = "") -> Reply:
    """The PUT once ``check_put`` let it through and its body is read. ``author`` and ``description``
    (X-Spina-Author / X-Spina-Description) go into the configuration history for keys under config/."""
    command = put_command(key, query, value, author=author, description=description)
    if isinstance(command, Reply):
        return command
    return json_reply(await agent.node.propose(command))


def put_command(key: str, query: Query, value: bytes, *, author: str = "", description: str = "") -> bytes | Reply:
    """The Raft command of a PUT once ``check_put`` let it through and its body is read, or its error reply
    (413); a bad key or query raises ``InvalidRequest``."""
    if len(value) > MAX_VALUE_BYTES:
        return _too_large(len(value))
    return MODULE_KV + encode_put(key, value, flags=parse_uint(query, "flags") or 0, cas=parse_uint(query, "cas"),
                                  author=author, description=description)


async def delete(agent: Agent, key: str, query: Query, *, author: str = "", description: str = "") -> Reply:
    return json_reply(await agent.node.propose(delete_command(key, query, author=author, description=description)))


def delete_command(key: str, query: Query, *, author: str = "", description: str = "") -> bytes:
    """The Raft command of a DELETE; a bad key or query raises ``InvalidRequest``."""
    return MODULE_KV + encode_delete(key, recurse="recurse" in query, cas=parse_uint(query, "cas"), author=author,
                                     description=description)


# --- the aiohttp routes --------------------------------------------------------------------------------------

async def _kv_get(request: web.Request) -> web.StreamResponse:
    return web_response(await get(request.app[AGENT_KEY], request.match_info["key"], request.query))


async def _kv_put(request: web.Request) -> web.Response:
    rejected = check_put(request.query, request.content_length)
    if rejected is not None:
        return web_response(rejected)
    value = await request.read()
    return web_response(await put(request.app[AGENT_KEY], request.match_info["key"], request.query, value,
                                  **_change_record(request)))


async def _kv_delete(request: web.Request) -> web.Response:
    return web_response(await delete(request.app[AGENT_KEY], request.match_info["key"], request.query,
                                     **_change_record(request)))


def _change_record(request: web.Request) -> dict[str, str]:
    # The fast front end hands every request with an X-Spina-* header to aiohttp, so these arrive here.
    return {"author": request.headers.get("X-Spina-Author", ""),
            "description": request.headers.get("X-Spina-Description", "")}


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/kv/{key:.*}", _kv_get)
    app.router.add_put("/v1/kv/{key:.*}", _kv_put)
    app.router.add_delete("/v1/kv/{key:.*}", _kv_delete)


__all__ = ["ROUTE", "add_routes", "answers_at_once", "check_put", "delete", "delete_command", "get", "put",
           "put_command", "read"]
