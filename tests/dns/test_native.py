"""The native UDP serving thread (``udp="thread"``): cache hits answered without the event loop, invalidated by
push before a change is acknowledged, stopped promptly, counted like every other answer. dnspython is the client."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator

import dns.message
import dns.query
import dns.rcode
import pytest

from spina_fast._dns import DNSEngine, UDPThread
from tests.dns.conftest import Registry, StaleAnswerWatch, ThreadedDNSServer

TIMEOUT = 10.0
SEED = 2026


@pytest.fixture
def native_server(registry: Registry) -> Iterator[ThreadedDNSServer]:
    server = ThreadedDNSServer(registry, udp="thread")
    yield server
    server.stop()


def lookup(server: ThreadedDNSServer, name: str, rdtype: str = "A") -> dns.message.Message:
    return dns.query.udp(dns.message.make_query(name, rdtype), server.address.host, port=server.address.port,
                         timeout=TIMEOUT)


def addresses(response: dns.message.Message) -> list[str]:
    return sorted(rdata.to_text() for rrset in response.answer for rdata in rrset)


def on_loop(server: ThreadedDNSServer, change: object) -> None:
    """Run a registry change on the server's loop, as the state machine applies it, and wait until it returned
    (the moment a write is acknowledged)."""
    async def apply() -> None:
        change()  # type: ignore[operator]
    asyncio.run_coroutine_threadsafe(apply(), server.loop).result(TIMEOUT)


def test_cache_hits_are_answered_while_the_event_loop_is_blocked(native_server: ThreadedDNSServer) -> None:
    assert addresses(lookup(native_server, "web.service.spina")) == ["10.0.0.1", "10.0.0.2"]  # taught by the loop
    blocked, release = threading.Event(), threading.Event()

    def block() -> None:
        blocked.set()
        release.wait(60)

    native_server.loop.call_soon_threadsafe(block)
    assert blocked.wait(TIMEOUT)
    try:
        answer = lookup(native_server, "WEB.Service.spina")
        # Answered by the thread alone: the loop is stuck in block(). The question is echoed as asked.
        assert addresses(answer) == ["10.0.0.1", "10.0.0.2"]
        assert answer.question[0].name.to_text() == "WEB.Service.spina."
    finally:
        release.set()


def test_misses_are_answered_by_the_loop_and_then_served_by_the_thread(native_server: ThreadedDNSServer) -> None:
    for _ in range(5):
        assert addresses(lookup(native_server, "db.service.spina")) == ["10.0.1.1"]
        assert lookup(native_server, "nope.service.spina").rcode() == dns.rcode.NXDOMAIN
    stats = native_server.server.stats
    # One miss per question, the rest hits; every one counted once over UDP.
    assert (stats.cache_misses, stats.cache_hits, stats.udp_queries) == (2, 8, 10)
    assert (stats.noerror, stats.nxdomain) == (5, 5)


def test_every_change_is_seen_by_the_next_query_after_it_returns(registry: Registry,
                                                                  native_server: ThreadedDNSServer) -> None:
    rng = random.Random(SEED)
    live = {"10.0.1.1"}
    for number in range(60):
        address = f"10.50.{number // 200}.{number % 200 + 1}"
        instance = f"db-x{number}"
        on_loop(native_server, lambda: registry.register("db", instance, address, 5432))  # noqa: B023
        live.add(address)
        assert addresses(lookup(native_server, "db.service.spina")) == sorted(live)
        if rng.random() < 0.5:
            on_loop(native_server, lambda: registry.set_status("db", instance, "critical"))  # noqa: B023
            live.discard(address)
            assert addresses(lookup(native_server, "db.service.spina")) == sorted(live)
        on_loop(native_server, lambda: registry.deregister("db", instance))  # noqa: B023
        live.discard(address)
        assert addresses(lookup(native_server, "db.service.spina")) == sorted(live)


def test_concurrent_lookups_never_see_an_instance_after_its_deregistration_returned(
        registry: Registry, native_server: ThreadedDNSServer) -> None:
    with StaleAnswerWatch(lambda: addresses(lookup(native_server, "db.service.spina")), clients=4) as watch:
        for number in range(150):
            address = f"10.60.{number // 200}.{number % 200 + 1}"
            on_loop(native_server, lambda: registry.register("db", f"churn-{number}", address, 5432))  # noqa: B023
            # Seen once: the thread's table now holds an answer with it, which the deregistration must drop.
            assert address in addresses(lookup(native_server, "db.service.spina"))
            on_loop(native_server, lambda: registry.deregister("db", f"churn-{number}"))  # noqa: B023
            watch.removed(address)
    assert not watch.stale, watch.stale[:5]
    assert all(watch.answered), watch.answered


def test_answer_limit_rotates_through_every_instance_from_the_thread(registry: Registry) -> None:
    for number in range(5):
        registry.register("wide", f"wide-{number}", f"10.9.0.{number + 1}", 7000)
    server = ThreadedDNSServer(registry, udp="thread", answer_limit=2)
    try:
        leaders = [[rdata.to_text() for rdata in lookup(server, "wide.service.spina").answer[0]] for _ in range(10)]
        stats = server.server.stats
    finally:
        server.stop()
    assert all(len(answer) == 2 for answer in leaders)
    # Ten queries over five rotations: every instance leads twice, the loop's first answer included.
    assert sorted(answer[0] for answer in leaders) == sorted(f"10.9.0.{n}" for n in range(1, 6) for _ in range(2))
    assert stats.cache_hits == 9


def test_malformed_datagrams_are_answered_by_the_loop_and_the_thread_keeps_serving(
        native_server: ThreadedDNSServer) -> None:
    rng = random.Random(SEED)
    good = dns.message.make_query("web.service.spina", "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(TIMEOUT)
        client.connect((native_server.address.host, native_server.address.port))
        # Two questions: FORMERR from the loop. A response: dropped by the thread. Then a cache hit.
        two = bytearray(good.to_wire())
        two[5] = 2
        client.send(bytes(two))
        assert dns.message.from_wire(client.recv(65535)).rcode() == dns.rcode.FORMERR
        client.send(bytes([0, 1, 0x80, 0]) + bytes(8))
        for _ in range(200):
            client.send(rng.randbytes(rng.randrange(0, 40)))
        good.id = 0xBEEF
        client.send(good.to_wire())
        while True:
            received = client.recv(65535)
            if received[:2] == b"\xbe\xef":
                break
    assert addresses(dns.message.from_wire(received)) == ["10.0.0.1", "10.0.0.2"]
    assert native_server.server.stats.dropped >= 1


def test_stop_returns_while_the_thread_waits_for_a_datagram(registry: Registry) -> None:
    engine = DNSEngine(registry.store)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp_socket:
        udp_socket.bind(("127.0.0.1", 0))
        udp_socket.setblocking(False)
        thread = UDPThread(engine, udp_socket.fileno())
        thread.start()
        assert thread.alive
        with pytest.raises(RuntimeError, match="already served"):
            UDPThread(engine, udp_socket.fileno())
        stopper = threading.Thread(target=thread.stop)
        stopper.start()
        stopper.join(TIMEOUT * 3)
        assert not stopper.is_alive() and not thread.alive
        thread.stop()  # twice is harmless
        # The engine is free again for another thread.
        again = UDPThread(engine, udp_socket.fileno())
        again.start()
        again.stop()


def test_bad_batch_size_is_refused_by_name(registry: Registry) -> None:
    with pytest.raises(ValueError, match="UDP batch 0"):
        UDPThread(DNSEngine(registry.store), 0, batch=0)


def test_counts_survive_close(registry: Registry) -> None:
    server = ThreadedDNSServer(registry, udp="thread")
    try:
        for _ in range(4):
            lookup(server, "web.service.spina")
    finally:
        server.stop()
    stats = server.server.stats
    assert (stats.udp_queries, stats.cache_hits, stats.noerror) == (4, 3, 4)


def ask_driving_the_loop(thread: UDPThread, client: socket.socket, name: str) -> dns.message.Message:
    """One query, with this test standing in for the event loop: misses are answered when they are pending."""
    query = dns.message.make_query(name, "A")
    client.send(query.to_wire())
    while True:
        readable, _, _ = select.select([client, thread.pending_fd], [], [], TIMEOUT)
        assert readable, f"no answer for {name}"
        if client in readable:
            response = dns.message.from_wire(client.recv(65535))
            assert response.id == query.id
            return response
        thread.answer_pending()


def test_the_threads_table_stays_bounded_and_keeps_answering(registry: Registry) -> None:
    names = ["web.service.spina", "db.service.spina", "nope.service.spina", "tag.web.service.spina", "spina"]
    engine = DNSEngine(registry.store, max_cache_entries=2)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server_socket, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        server_socket.bind(("127.0.0.1", 0))
        server_socket.setblocking(False)
        client.connect(server_socket.getsockname())
        thread = UDPThread(engine, server_socket.fileno())
        thread.start()
        try:
            expected = {name: ask_driving_the_loop(thread, client, name).to_text().split("\n", 1)[1]
                        for name in names}
            for _ in range(3):
                for name in names:
                    assert ask_driving_the_loop(thread, client, name).to_text().split("\n", 1)[1] == expected[name]
        finally:
            thread.stop()
    assert engine.stats()["udp_queries"] == 20


def test_a_forked_child_leaves_the_thread_and_its_lock_alone(registry: Registry,
                                                             native_server: ThreadedDNSServer) -> None:
    assert addresses(lookup(native_server, "web.service.spina")) == ["10.0.0.1", "10.0.0.2"]
    thread = native_server.server._thread
    assert thread is not None
    pid = os.fork()
    if pid == 0:
        # The snapshot child's situation: no serving thread here, the parent's eventfds inherited.
        code = 1
        try:
            thread.stop()
            del thread
            gc.collect()
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while (reaped := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung in the DNS thread's stop")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(reaped[1]) == 0
    # The parent's thread was not told to stop by the child.
    assert thread.alive
    assert addresses(lookup(native_server, "WEB.service.spina")) == ["10.0.0.1", "10.0.0.2"]
