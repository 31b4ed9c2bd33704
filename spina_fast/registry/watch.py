"""Blocking queries on the registry: a watcher waits on one service and only that service's changes wake it.

Consul's single global index woke every watcher on every change (a thundering herd at scale); here each
service has its own waiters, so a change wakes exactly the watchers of the services it touched, plus the
watchers of the whole catalog.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

CATALOG = ""  # the waiters of the whole catalog (``/v1/catalog/services``), woken by every change


def _wake(waiters: set[asyncio.Future[bool]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(True)


class RegistryWatches:
    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Future[bool]]] = {}

    def notify(self, services: Iterable[str]) -> None:
        """Wake the watchers of every service in ``services`` and of the catalog (called after apply)."""
        for service in services:
            waiters = self._waiters.pop(service, None)
            if waiters:
                _wake(waiters)
        catalog = self._waiters.pop(CATALOG, None)
        if catalog:
            _wake(catalog)

    async def wait(self, service: str, timeout: float) -> bool:
        """Wait until ``service`` (or, with CATALOG, anything) changes or ``timeout`` passes; True on a change."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        waiters = self._waiters.setdefault(service, set())
        waiters.add(waiter)
        # A timer handle, not asyncio.wait_for: thousands of watchers each save a task.
        timer = loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
            return waiter.result()
        finally:
            timer.cancel()
            held = self._waiters.get(service)
            if held is not None:
                held.discard(waiter)
                if not held:
                    del self._waiters[service]

    def watcher_count(self) -> int:
        return sum(len(waiters) for waiters in self._waiters.values())


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)
