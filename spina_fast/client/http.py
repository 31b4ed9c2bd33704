"""A small synchronous HTTP client of one agent, used by the ``spina`` command line."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from spina_fast.errors import InvalidRequest, NotFound, SpinaError, Unavailable


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


class AgentClient:
    def __init__(self, http_addr: str = "127.0.0.1:8700", timeout: float = 30.0) -> None:
        self.base_url = http_addr if http_addr.startswith("http") else f"http://{http_addr}"
        self.timeout = timeout

    def request(self, method: str, path: str, *, query: dict[str, str] | None = None,
                body: bytes | None = None, headers: dict[str, str] | None = None,
                allow_404: bool = False) -> Response:
        url = self.base_url + urllib.parse.quote(path)
        if query:
            url += "?" + urllib.parse.urlencode(query)
        request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return Response(response.status, dict(response.headers), response.read())
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            if exc.code == 404 and allow_404:
                return Response(404, dict(exc.headers), payload)
            try:
                message = json.loads(payload)["error"]
            except (ValueError, KeyError, TypeError):
                message = payload.decode(errors="replace") or exc.reason
            error_type = {400: InvalidRequest, 404: NotFound, 413: InvalidRequest}.get(exc.code, Unavailable)
            raise error_type(f"{method} {path}: {exc.code} {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise Unavailable(f"cannot reach the agent at {self.base_url}: {exc}") from None


__all__ = ["AgentClient", "Response", "SpinaError"]
