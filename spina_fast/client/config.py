"""Keep one service's resolved configuration up to date by long polling, and reload without restarting.

    async def reload(old: dict[str, str], new: dict[str, str]) -> None:
        pool.resize(int(new["db/pool_size"]))

    async with ConfigWatcher(["10.0.0.1:8700", "10.0.0.2:8700"], service="api", env="prod",
                             on_change=reload) as watcher:
        pool = make_pool(int(watcher.values["db/pool_size"]))   # the view is loaded once start() returns
        ...

The watcher sends Consul-style blocking queries to ``GET /v1/spina/config/resolve`` (``?index=N&wait=``):
each returns as soon as anything that can change this service's view is written (or after ``wait``), so a
change reaches the application within one round trip. Several writes in quick succession may arrive as
one update: the callback always gets the latest view, never a stale one. ``on_change(old, new)`` gets
``{name: value}`` of the previous and the new view (binary values base64, as the agent sends them); it
may be a plain function or a coroutine function, runs one call at a time, and an exception it raises is
logged without stopping the watcher. It is not called for the first view: read ``values`` after start.

If an agent cannot be reached, the watcher moves on to the next one given, with exponential backoff and
jitter; if the index an agent reports goes backwards (another node, a restore), it starts over from 0,
as Consul's watch rules say.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp

from spina_fast.errors import InvalidRequest, Unavailable

log = logging.getLogger(__name__)

ReloadCallback = Callable[[dict[str, str], dict[str, str]], Awaitable[None] | None]


class ConfigWatcher:
    def __init__(self, agents: str | Sequence[str], *, service: str | None = None, env: str | None = None,
                 on_change: ReloadCallback | None = None, wait_seconds: float = 60.0, consistent: bool = False,
                 min_backoff: float = 0.05, max_backoff: float = 5.0, session: aiohttp.ClientSession | None = None,
                 rng: random.Random | None = None) -> None:
        addresses = [agents] if isinstance(agents, str) else list(agents)
        if not addresses:
            raise ValueError("give at least one agent address (HOST:PORT)")
        if not 1 <= wait_seconds <= 600:
            raise ValueError(f"wait_seconds {wait_seconds} is outside 1..600")
        if not 0 < min_backoff <= max_backoff:
            raise ValueError("backoff must satisfy 0 < min_backoff <= max_backoff")
        self._urls = [address if address.startswith("http") else f"http://{address}" for address in addresses]
        self._current = 0
        self.service = service
        self.env = env
        self.on_change = on_change
        self.wait_seconds = wait_seconds
        self.consistent = consistent
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self._session = session
        self._own_session = session is None
        self._rng = rng or random.Random()
        self.values: dict[str, str] = {}
        self.resolved: dict[str, dict[str, Any]] = {}  # the full view: value, layer, version, key per name
        self.index = 0
        self.updates = 0  # views applied so far (the first one included)
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ConfigWatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self, timeout: float = 30.0) -> None:
        """Load the first view (trying every agent until ``timeout``), then keep it current in the background."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        backoff = self.min_backoff
        while True:
            try:
                document, index = await self._fetch(0, wait=False)
                break
            except (aiohttp.ClientError, TimeoutError, Unavailable) as exc:
                if loop.time() + backoff > deadline:
                    await self.stop()
                    raise Unavailable(f"no agent answered within {timeout:g}s: {exc}") from None
                self._next_agent()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
            except InvalidRequest:
                await self.stop()
                raise
        self._apply(document, index)
        self._task = loop.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def wait_for(self, predicate: Callable[[dict[str, str]], bool], timeout: float) -> dict[str, str]:
        """Wait until the view satisfies ``predicate``; raises ``TimeoutError`` after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while not predicate(self.values):
                await self._changed.wait()
        return self.values

    # --- the loop --------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = self.min_backoff
        while True:
            try:
                document, index = await self._fetch(self.index, wait=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Any failure (agent down, leader election, a bad answer) is retried on the next agent.
                delay = backoff * (0.5 + self._rng.random())
                log.warning("config watch failed; retrying", extra={"agent": self._urls[self._current],
                                                                     "error": str(exc), "retry_in": delay})
                self._next_agent()
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = self.min_backoff
            if index < self.index:
                # Consul's rule: an index that goes backwards means "start over".
                self.index = 0
            await self._apply_and_notify(document, index)

    def _apply(self, document: dict[str, dict[str, Any]], index: int) -> dict[str, str]:
        """Install a new view, wake ``wait_for``, and return the previous values."""
        old = self.values
        self.resolved = document
        self.values = {name: item["value"] for name, item in document.items()}
        self.index = max(index, 1)
        self.updates += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return old

    async def _apply_and_notify(self, document: dict[str, dict[str, Any]], index: int) -> None:
        old_values = self.values
        new_values = {name: item["value"] for name, item in document.items()}
        if new_values == old_values:
            self.index = max(index, 1)
            self.resolved = document
            return
        old = self._apply(document, index)
        if self.on_change is None:
            return
        try:
            result = self.on_change(old, self.values)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("the configuration reload callback failed")

    def _next_agent(self) -> None:
        self._current = (self._current + 1) % len(self._urls)

    async def _fetch(self, index: int, *, wait: bool) -> tuple[dict[str, dict[str, Any]], int]:
        assert self._session is not None
        query: dict[str, str] = {}
        if self.service is not None:
            query["service"] = self.service
        if self.env is not None:
            query["env"] = self.env
        if wait and index:
            query["index"] = str(index)
            query["wait"] = f"{self.wait_seconds:g}s"
        if self.consistent:
            query["consistent"] = ""
        # The agent adds up to wait/16 of jitter; allow for it and for a slow answer.
        timeout = aiohttp.ClientTimeout(total=self.wait_seconds * 17 / 16 + 10 if wait else 10)
        url = f"{self._urls[self._current]}/v1/spina/config/resolve"
        async with self._session.get(url, params=query, timeout=timeout) as response:
            body = await response.read()
            if response.status == 400:
                raise InvalidRequest(f"{url}: {body.decode(errors='replace')}")
            if response.status != 200:
                raise Unavailable(f"{url} answered {response.status}: {body.decode(errors='replace')[:200]}")
            document = await response.json(content_type=None)
            header = response.headers.get("X-Consul-Index", "0")
        if not isinstance(document, dict) or not header.isdigit():
            raise Unavailable(f"{url} answered something that is not a resolved view")
        return document, int(header)


__all__ = ["ConfigWatcher", "ReloadCallback"]
