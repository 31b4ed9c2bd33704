"""Cluster operations over HTTP: Raft status, membership, leadership transfer, snapshot backups.

- ``GET  /v1/spina/raft/status`` (alias ``/v1/spina/cluster/status``): this node's view - id, role, term,
  leader, commit/applied/first/last index, snapshot index, voters and learners with their Raft addresses;
  on the leader also each peer's replication progress. ``?hash`` adds the state machine's hash (it reads the
  whole state, so it is opt-in).
- ``POST /v1/spina/cluster/join`` ``{"node_id", "raft_addr"}``: add a node as a non-voting learner (the
  leader promotes it once it has caught up). Answers the configuration once the change is applied.
- ``POST /v1/spina/cluster/remove`` ``{"node_id"}``: remove a voter or learner; removing the leader hands
  leadership over first.
- ``POST /v1/spina/cluster/transfer-leader[?to=ID]``: hand leadership to ``ID`` (default: the most
  up-to-date voter); answers the new leader.
- ``GET  /v1/spina/snapshot``: a linearizable snapshot of the replicated state, streamed as a snapshot file
  (``spina_fast/raft/snapshots.py``: index, term, CRC-32C); headers ``X-Spina-Snapshot-Index``/``-Term``.

Any node answers: operations are forwarded to the leader over the Raft transport.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from spina_fast.api.responses import AGENT_KEY, json_response
from spina_fast.errors import InvalidRequest

ROUTE_STATUS = "/v1/spina/raft/status"


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        return {}
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidRequest("request body must be a JSON object")
    return document


def _node_id(document: dict[str, Any], request: web.Request) -> str:
    node_id = document.get("node_id", request.query.get("node_id"))
    if not isinstance(node_id, str) or not node_id:
        raise InvalidRequest("give the node's id as node_id", field="node_id")
    return node_id


async def _status(request: web.Request) -> web.Response:
    return json_response(request.app[AGENT_KEY].node.status(with_hash="hash" in request.query))


async def _join(request: web.Request) -> web.Response:
    document = await _body(request)
    raft_addr = document.get("raft_addr", request.query.get("raft_addr"))
    if not isinstance(raft_addr, str) or not raft_addr:
        raise InvalidRequest("give the node's Raft address as raft_addr (HOST:PORT)", field="raft_addr")
    node = request.app[AGENT_KEY].node
    return json_response(await node.admin("add_learner", {"node_id": _node_id(document, request),
                                                          "raft_addr": raft_addr}))


async def _remove(request: web.Request) -> web.Response:
    document = await _body(request)
    return json_response(await request.app[AGENT_KEY].node.admin("remove", {"node_id": _node_id(document,
                                                                                                request)}))


async def _transfer(request: web.Request) -> web.Response:
    document = await _body(request)
    target = document.get("to", request.query.get("to"))
    if target is not None and (not isinstance(target, str) or not target):
        raise InvalidRequest("to must be a node id", field="to")
    return json_response(await request.app[AGENT_KEY].node.admin("transfer", {"to": target}))


async def _snapshot(request: web.Request) -> web.StreamResponse:
    node = request.app[AGENT_KEY].node
    index, term, pieces = await node.backup()
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                           "Content-Disposition": 'attachment; filename="spina.snap"',
                                           "X-Spina-Snapshot-Index": str(index),
                                           "X-Spina-Snapshot-Term": str(term)})
    await response.prepare(request)
    for piece in pieces:
        await response.write(piece)
    await response.write_eof()
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get(ROUTE_STATUS, _status)
    app.router.add_get("/v1/spina/cluster/status", _status)
    app.router.add_post("/v1/spina/cluster/join", _join)
    app.router.add_post("/v1/spina/cluster/remove", _remove)
    app.router.add_post("/v1/spina/cluster/transfer-leader", _transfer)
    app.router.add_get("/v1/spina/snapshot", _snapshot)
