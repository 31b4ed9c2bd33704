"""Pieces every HTTP handler shares: how to reach the agent, and replies.

Endpoint logic returns a ``Reply`` (status, body bytes, content type, headers) so that the aiohttp
application and the fast front end (``api/fast_http.py``) serve the same bytes from one implementation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import orjson
from aiohttp import web

from spina_fast.errors import NotLeader, SpinaError

if TYPE_CHECKING:
    from spina_fast.agent import Agent

AGENT_KEY: web.AppKey[Agent] = web.AppKey("agent")

JSON = "application/json"


class Reply(NamedTuple):
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: dict[str, str] | None = None


def json_reply(data: object, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, orjson.dumps(data), JSON, headers)


def error_reply(status: int, message: str, code: str) -> Reply:
    return Reply(status, orjson.dumps({"error": message, "code": code}), JSON)


def spina_error_reply(exc: SpinaError) -> Reply:
    reply = error_reply(exc.http_status, exc.message, exc.code)
    if isinstance(exc, NotLeader) and exc.leader:
        return reply._replace(headers={"X-Spina-Leader": exc.leader})
    return reply


def web_response(reply: Reply) -> web.Response:
    # An empty body is sent without a Content-Type, as aiohttp does for a Response without a body.
    return web.Response(body=reply.body or None, status=reply.status, content_type=reply.content_type,
                        headers=reply.headers)


def json_response(data: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web_response(json_reply(data, status, headers))


def error_response(status: int, message: str, code: str) -> web.Response:
    return web_response(error_reply(status, message, code))
