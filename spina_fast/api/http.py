"""The agent's HTTP control plane (aiohttp): status, agent info, metrics.

Errors are always JSON ``{"error": "...", "code": "..."}`` with the matching status code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from spina_fast import __version__
from spina_fast.api import cluster, config, kv, prometheus, registry
from spina_fast.api.responses import (
    AGENT_KEY,
    Reply,
    error_reply,
    error_response,
    json_reply,
    json_response,
    spina_error_reply,
    web_response,
)
from spina_fast.errors import HTTP_ERROR_CODES, SpinaError

if TYPE_CHECKING:
    from spina_fast.agent import Agent

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ROUTE_STATUS_LEADER = "/v1/status/leader"
ROUTE_STATUS_PEERS = "/v1/status/peers"
INTERNAL_ERROR = error_reply(500, "internal error; see the agent's log", "internal")


@web.middleware
async def _observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time every request, and turn every failure into a JSON error."""
    started = time.perf_counter()
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    try:
        response = await handler(request)
    except SpinaError as exc:
        response = web_response(spina_error_reply(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_ERROR_CODES.get(exc.status, "http_error")
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 404:
            message = f"no such endpoint: {request.method} {request.path}"
        elif exc.status == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        response = error_response(exc.status, message, code)
    except Exception:
        log.exception("request failed", extra={"path": request.path})
        response = web_response(INTERNAL_ERROR)
    request.app[AGENT_KEY].metrics.observe_http(request.method, route, response.status,
                                                time.perf_counter() - started)
    return response


def status_leader(agent: Agent) -> Reply:
    # Consul answers a JSON string, "" while there is no leader.
    return json_reply(agent.leader_address())


def status_peers(agent: Agent) -> Reply:
    return json_reply(agent.voter_addresses())


async def _status_leader(request: web.Request) -> web.Response:
    return web_response(status_leader(request.app[AGENT_KEY]))


async def _status_peers(request: web.Request) -> web.Response:
    return web_response(status_peers(request.app[AGENT_KEY]))


async def _agent_self(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    config = agent.config
    raft = agent.bound_raft_addr
    return json_response({
        "Config": {
            "Datacenter": config.datacenter,
            "NodeName": config.node_id,
            "NodeID": agent.node_uuid,
            "Server": True,
            "Version": __version__,
            "Revision": "",
        },
        "Member": {"Name": config.node_id, "Addr": raft.host, "Port": raft.port, "Status": 1,
                   "Tags": {"dc": config.datacenter, "role": "spina"}},
        "Meta": {},
        "Stats": {"raft": {"state": agent.raft_state(), "num_peers": str(len(config.peers))}},
    })


async def _metrics(request: web.Request) -> web.Response:
    metrics = request.app[AGENT_KEY].metrics
    return web.Response(body=metrics.render(), headers={"Content-Type": metrics.content_type})


def build_app(agent: Agent) -> web.Application:
    # 1 MiB covers the largest KV value (512 KiB) base64-encoded in JSON.
    app = web.Application(middlewares=[_observe], client_max_size=1024 * 1024)
    app[AGENT_KEY] = agent
    app.router.add_get(ROUTE_STATUS_LEADER, _status_leader)
    app.router.add_get(ROUTE_STATUS_PEERS, _status_peers)
    app.router.add_get("/v1/agent/self", _agent_self)
    app.router.add_get("/metrics", _metrics)
    kv.add_routes(app)
    config.add_routes(app)
    cluster.add_routes(app)
    registry.add_routes(app)
    prometheus.add_routes(app)
    return app
