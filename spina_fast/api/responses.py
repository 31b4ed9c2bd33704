"""Pieces every HTTP handler shares: how to reach the agent, and JSON bodies."""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from spina_fast.agent import Agent

AGENT_KEY: web.AppKey[Agent] = web.AppKey("agent")


def json_response(data: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json",
                        headers=headers)


def error_response(status: int, message: str, code: str) -> web.Response:
    return json_response({"error": message, "code": code}, status=status)
