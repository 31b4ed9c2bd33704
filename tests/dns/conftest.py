"""Shared pieces of the DNS tests: a registry to serve, and a DNS server running in a thread of its own (for
synchronous tests such as hypothesis runs; async tests start a ``DNSServer`` in their own loop)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
import uvloop

from spina_fast._registry import RegistryStore
from spina_fast.config import HostPort
from spina_fast.dns import DNSServer


class Registry:
    """A ``RegistryStore`` with the Raft index kept for the test, as the state machine would keep it."""

    def __init__(self) -> None:
        self.store = RegistryStore()
        self.index = 0

    def _next(self) -> int:
        self.index += 1
        return self.index

    def register(self, service: str, instance_id: str, address: str, port: int, **fields: object) -> None:
        assert self.store.register(self._next(), service, instance_id, address, port, **fields)

    def set_status(self, service: str, instance_id: str, status: str) -> None:
        assert self.store.set_status(self._next(), service, instance_id, status)

    def deregister(self, service: str, instance_id: str) -> None:
        assert self.store.deregister(self._next(), service, instance_id)


@pytest.fixture
def registry() -> Registry:
    registry = Registry()
    registry.register("web", "web-1", "10.0.0.1", 8080, version="1.4.2", tags=["primary", "EU"])
    registry.register("web", "web-2", "10.0.0.2", 8081, version="1.5.0", tags=["eu"])
    registry.register("web", "web-3", "2001:db8::3", 8082, version="1.5.0")
    registry.register("db", "db-1", "10.0.1.1", 5432, version="15.2")
    return registry


class BrokenRegistry:
    """A registry whose reads fail, as a replica being restored might."""

    index = 1

    def service_index(self, service: str) -> int:
        return 1

    def instances(self, service: str, **filters: object) -> list[object]:
        raise RuntimeError("replica unavailable")

    def services(self) -> dict[str, tuple[str, ...]]:
        return {}


class ThreadedDNSServer:
    """A ``DNSServer`` on its own uvloop loop in a daemon thread; ``stop`` closes both."""

    def __init__(self, store: RegistryStore, **options: object) -> None:
        self.loop = uvloop.new_event_loop()
        self.server = DNSServer(store, **options)  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self.loop.run_forever, name="dns-test-server", daemon=True)
        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(self.server.start("127.0.0.1", 0), self.loop)
        self.address: HostPort = future.result(30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture
def threaded_server(registry: Registry) -> Iterator[ThreadedDNSServer]:
    server = ThreadedDNSServer(registry.store)
    yield server
    server.stop()
