"""Shared pieces of the DNS tests: a registry to serve, and a DNS server running in a thread of its own (for
synchronous tests such as hypothesis runs; async tests start a ``DNSServer`` in their own loop)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

import pytest
import uvloop

from spina_fast._registry import RegistryStore
from spina_fast.config import HostPort
from spina_fast.dns import DNSServer


class Registry:
    """A ``RegistryStore`` with the Raft index kept for the test, as the state machine would keep it, and
    told to ``listeners`` after each change, as the state machine tells the DNS server."""

    def __init__(self) -> None:
        self.store = RegistryStore()
        self.index = 0
        self.listeners: list[Callable[[list[str]], None]] = []

    def _next(self) -> int:
        self.index += 1
        return self.index

    def _changed(self) -> None:
        changed = self.store.take_changed()
        for listener in self.listeners:
            listener(changed)

    def register(self, service: str, instance_id: str, address: str, port: int, **fields: object) -> None:
        assert self.store.register(self._next(), service, instance_id, address, port, **fields)
        self._changed()

    def set_status(self, service: str, instance_id: str, status: str) -> None:
        assert self.store.set_status(self._next(), service, instance_id, status)
        self._changed()

    def deregister(self, service: str, instance_id: str) -> None:
        assert self.store.deregister(self._next(), service, instance_id)
        self._changed()

    def serve(self, udp: str = "thread", **options: object) -> DNSServer:
        """A ``DNSServer`` of this registry, told of every change made here from now on."""
        server = DNSServer(self.store, udp=udp, **options)  # type: ignore[arg-type]
        self.listeners.append(server.registry_changed)
        return server


@pytest.fixture
def registry() -> Registry:
    registry = Registry()
    registry.register("web", "web-1", "10.0.0.1", 8080, version="1.4.2", tags=["primary", "EU"])
    registry.register("web", "web-2", "10.0.0.2", 8081, version="1.5.0", tags=["eu"])
    registry.register("web", "web-3", "2001:db8::3", 8082, version="1.5.0")
    registry.register("db", "db-1", "10.0.1.1", 5432, version="15.2")
    return registry


class StaleAnswerWatch:
    """Client threads calling ``lookup()`` (the addresses of one name) in a loop until the block ends; each
    notes any address it got that was ``removed`` (deregistration acknowledged) before it asked."""

    def __init__(self, lookup: Callable[[], list[str]], clients: int = 3) -> None:
        self._lookup = lookup
        self._gone: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.stale: list[tuple[str, list[str]]] = []
        self.answered = [0] * clients
        self._threads = [threading.Thread(target=self._client, args=(number,), daemon=True)
                         for number in range(clients)]

    def _client(self, number: int) -> None:
        while not self._stop.is_set():
            with self._lock:
                removed = frozenset(self._gone)
            found = self._lookup()
            self.stale.extend((address, found) for address in removed.intersection(found))
            self.answered[number] += 1

    def removed(self, address: str) -> None:
        with self._lock:
            self._gone.add(address)

    def __enter__(self) -> StaleAnswerWatch:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


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

    def __init__(self, registry: Registry, **options: object) -> None:
        self.loop = uvloop.new_event_loop()
        self.server = registry.serve(**options)
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
    server = ThreadedDNSServer(registry)
    yield server
    server.stop()
