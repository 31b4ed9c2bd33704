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
from spina_fast.api import kv
from spina_fast.api.responses import AGENT_KEY, error_response, json_response
from spina_fast.errors import NotLeader, SpinaError

if TYPE_CHECKING:
    from spina_fast.agent import Agent

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_ERROR_CODES = {
    400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
    414: "uri_too_long", 415: "unsupported_media_type", 431: "headers_too_large",
}


@web.middleware
async def _observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time every request, and turn every failure into a JSON error."""
    started = time.perf_counter()
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    try:
        response = await handler(request)
    except SpinaError as exc:
        response = error_response(exc.http_status, exc.message, exc.code)
        if isinstance(exc, NotLeader) and exc.leader:
            response.headers["X-Spina-Leader"] = exc.leader
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_ERROR_CODES.get(exc.status, "http_error")
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 404:
            message = f"no such endpoint: {request.method} {request.path}"
        elif exc.status == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        response = error_response(exc.status, message, code)
    except Exception:
        log.exception("request failed", extra={"path": request.path})
        response = error_response(500, "internal error; see the agent's log", "internal")
    metrics = request.app[AGENT_KEY].metrics
    metrics.http_requests.labels(request.method, route, str(response.status)).inc()
    metrics.http_latency.labels(request.method, route).observe(time.perf_counter() - started)
    return response


async def _status_leader(request: web.Request) -> web.Response:
    # Consul answers a JSON string, "" while there is no leader.
    return json_response(request.app[AGENT_KEY].leader_address())


async def _status_peers(request: web.Request) -> web.Response:
    return json_response(request.app[AGENT_KEY].voter_addresses())


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
    app.router.add_get("/v1/status/leader", _status_leader)
    app.router.add_get("/v1/status/peers", _status_peers)
    app.router.add_get("/v1/agent/self", _agent_self)
    app.router.add_get("/metrics", _metrics)
    kv.add_routes(app)
    return app
