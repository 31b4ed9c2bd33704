"""The DNS front end: one UDP endpoint and one TCP listener on the same port, answering from the registry.

Python owns the sockets and the event loop; ``spina_fast._dns.DNSEngine`` owns the bytes (parsing, the answer
cache, encoding). UDP is served one of three ways (``udp=``):

- ``"thread"``: a native thread that never takes the GIL answers cache hits (``UDPThread``: ``recvmmsg`` /
  ``sendmmsg``, a C answer table), so that a busy event loop does not delay them; misses are answered on the loop.
  Its table is invalidated by push, so whoever changes the registry must call ``registry_changed(services)``
  after every change (the agent's state machine does, after each apply);
- ``"batch"`` (the default): ``UDPResponder`` reads batches from the loop's reader callback, no Python frame per
  datagram; answers are checked against the registry's indexes on each use, so no one needs to call anything;
- ``"protocol"``: an asyncio ``DatagramProtocol`` (the portable path, and a baseline the benchmark compares).

If the thread cannot start, the server says so in the log and serves ``"batch"``. TCP follows RFC 7766: 2-byte
length framing, pipelined queries answered in order in one write per read, an idle timeout, reading paused
while the peer does not drain its answers, and a bound on open connections. A message the engine cannot
even read as a query ends a TCP connection (there is no way to resynchronise a stream that lies).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, cast

from spina_fast._dns import DEFAULT_MAX_UDP_PAYLOAD, DNSEngine, UDPResponder, UDPThread
from spina_fast.config import HostPort

log = logging.getLogger(__name__)

# RFC 7766 §6.2.3 suggests timing idle connections out after a few seconds; dig and resolvers reconnect.
TCP_IDLE_SECONDS = 10.0
MAX_TCP_CONNECTIONS = 1024
TCP_BACKLOG = 1024
# Port 0: the UDP port the kernel picks may be taken for TCP; pick again this many times.
BIND_ATTEMPTS = 20
# A burst of queries waits in the socket buffer while the loop is busy; the default (~200 KB) drops
# packets under load generators long before the server is saturated.
UDP_RECEIVE_BUFFER = 4 * 1024 * 1024
UDPMode = Literal["thread", "batch", "protocol"]
UDP_MODES: tuple[str, ...] = ("thread", "batch", "protocol")


@dataclass(frozen=True, slots=True)
class DNSStats:
    """Counters since the server started: answers by rcode, and what happened to the rest."""

    noerror: int
    formerr: int
    servfail: int
    nxdomain: int
    notimp: int
    refused: int
    badvers: int
    dropped: int
    truncated: int
    cache_hits: int
    cache_misses: int
    udp_queries: int
    tcp_queries: int
    tcp_connections: int
    udp_send_failures: int
    udp_overflow: int  # misses the serving thread dropped because the loop had too many waiting already

    def rcodes(self) -> dict[str, int]:
        """Answers by rcode name (the label set of a ``spina_dns_responses_total{rcode=...}`` counter)."""
        return {"noerror": self.noerror, "formerr": self.formerr, "servfail": self.servfail,
                "nxdomain": self.nxdomain, "notimp": self.notimp, "refused": self.refused, "badvers": self.badvers}


class DNSServer:
    """Serves ``registry`` (a ``RegistryStore``) over DNS. ``ttl`` is the TTL of every record (0, like Consul,
    so that a change is seen at once); ``answer_limit`` > 0 caps the records per answer and rotates which
    ones are given on each query."""

    def __init__(self, registry: Any, *, domain: str = "spina", ttl: int = 0, answer_limit: int = 0,
                 max_udp_payload: int = DEFAULT_MAX_UDP_PAYLOAD, tcp_idle_seconds: float = TCP_IDLE_SECONDS,
                 max_tcp_connections: int = MAX_TCP_CONNECTIONS, udp: UDPMode = "batch") -> None:
        if udp not in UDP_MODES:
            raise ValueError(f"DNS UDP mode {udp!r} is not one of {', '.join(UDP_MODES)}")
        if tcp_idle_seconds <= 0:
            raise ValueError(f"DNS TCP idle timeout {tcp_idle_seconds} must be positive")
        if max_tcp_connections < 1:
            raise ValueError(f"DNS TCP connection limit {max_tcp_connections} must be at least 1")
        self.engine = DNSEngine(registry, domain=domain, ttl=ttl, answer_limit=answer_limit,
                                max_udp_payload=max_udp_payload)
        self.tcp_idle_seconds = tcp_idle_seconds
        self.max_tcp_connections = max_tcp_connections
        self.udp: UDPMode = udp
        self.address: HostPort | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._udp_socket: socket.socket | None = None
        self._responder: UDPResponder | None = None
        self._thread: UDPThread | None = None
        self._send_failures = 0
        self._tcp: asyncio.Server | None = None
        self._connections: set[_TCPProtocol] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> HostPort:
        """Bind UDP and TCP on ``host:port`` (port 0: one free port for both) and start serving."""
        if self.address is not None:
            raise RuntimeError("DNS server is already started")
        udp_socket, tcp_socket = _bind_pair(host, port)
        loop = asyncio.get_running_loop()
        try:
            if self.udp == "thread":
                self._udp_socket = udp_socket
                self._start_thread(loop, udp_socket)
            if self.udp == "batch":
                self._responder = UDPResponder(self.engine, udp_socket.fileno(), on_error=_log_answer_error)
                loop.add_reader(udp_socket.fileno(), self._responder.drain)
                self._udp_socket = udp_socket
            elif self.udp == "protocol":
                udp_transport, _ = await loop.create_datagram_endpoint(lambda: _UDPProtocol(self.engine),
                                                                       sock=udp_socket)
                self._udp = udp_transport
            self._tcp = await loop.create_server(lambda: _TCPProtocol(self), sock=tcp_socket, backlog=TCP_BACKLOG)
        except BaseException:
            await self.close()
            udp_socket.close()
            tcp_socket.close()
            raise
        self.address = HostPort(host, udp_socket.getsockname()[1])
        log.info("DNS serving %s (domain %s, ttl %d, answer limit %d)", self.address, self.engine.domain,
                 self.engine.ttl, self.engine.answer_limit)
        return self.address

    def _start_thread(self, loop: asyncio.AbstractEventLoop, udp_socket: socket.socket) -> None:
        thread = UDPThread(self.engine, udp_socket.fileno(), on_error=_log_answer_error)
        try:
            thread.start()
        except OSError as exc:
            log.warning("DNS serves UDP from the event loop: %s", exc)
            self.udp = "batch"
            return
        loop.add_reader(thread.pending_fd, thread.answer_pending)
        self._thread = thread

    def registry_changed(self, services: Iterable[str]) -> None:
        """Call synchronously after every registry change with the names of the services it touched (the
        serving thread's cached answers for them are dropped before this returns; other modes need no call)."""
        self.engine.registry_changed(services)

    async def close(self) -> None:
        self.address = None
        if self._thread is not None:
            # Joined before the socket closes: the thread never sees its descriptor reused.
            self._thread.stop()
            asyncio.get_running_loop().remove_reader(self._thread.pending_fd)
            self._send_failures += self._thread.send_failures
            self._thread = None
        if self._responder is not None:
            self._send_failures += self._responder.send_failures
            self._responder = None
        if self._udp_socket is not None:
            asyncio.get_running_loop().remove_reader(self._udp_socket.fileno())  # the responder's, if any
            self._udp_socket.close()
            self._udp_socket = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for connection in list(self._connections):
                connection.abort()
            await self._tcp.wait_closed()
            self._tcp = None

    @property
    def stats(self) -> DNSStats:
        send_failures = self._send_failures
        if self._thread is not None:
            send_failures += self._thread.send_failures
        if self._responder is not None:
            send_failures += self._responder.send_failures
        return DNSStats(**self.engine.stats(), tcp_connections=len(self._connections), udp_send_failures=send_failures)


def _log_answer_error(error: BaseException) -> None:
    # A registry error must cost one answer (SERVFAIL), not the endpoint.
    log.error("DNS could not answer a UDP query", exc_info=error)


def _bind_pair(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(BIND_ATTEMPTS):
        udp_socket = socket.socket(family, socket.SOCK_DGRAM)
        tcp_socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            try:
                udp_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
            except OSError as exc:
                log.warning("DNS could not raise the UDP receive buffer: %s", exc)
            udp_socket.bind((host, port))
            bound = udp_socket.getsockname()[1]
            tcp_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp_socket.bind((host, bound))
            except OSError as exc:
                if port == 0 and exc.errno == errno.EADDRINUSE:
                    udp_socket.close()
                    tcp_socket.close()
                    continue
                raise OSError(exc.errno, f"DNS cannot bind TCP {HostPort(host, bound)}: {exc.strerror}") from None
        except OSError as exc:
            udp_socket.close()
            tcp_socket.close()
            if exc.strerror and exc.strerror.startswith("DNS "):
                raise
            raise OSError(exc.errno, f"DNS cannot bind UDP {HostPort(host, port)}: {exc.strerror}") from None
        udp_socket.setblocking(False)
        tcp_socket.setblocking(False)
        return udp_socket, tcp_socket
    raise OSError(errno.EADDRINUSE, f"DNS found no port free for both UDP and TCP on {host} "
                                    f"in {BIND_ATTEMPTS} attempts")


class _UDPProtocol(asyncio.DatagramProtocol):
    __slots__ = ("_answer", "_engine", "_sendto")

    def __init__(self, engine: DNSEngine) -> None:
        self._engine = engine
        self._answer = engine.answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._sendto = transport.sendto  # type: ignore[attr-defined]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            response = self._answer(data, False)
        except Exception:
            # A registry error must cost one answer, not the endpoint.
            log.exception("DNS could not answer a UDP query from %s", addr)
            response = self._engine.servfail(data)
        if response is not None:
            self._sendto(response, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a client that left before its answer arrived: nothing to do.
        log.debug("DNS UDP error: %s", exc)


class _TCPProtocol(asyncio.Protocol):
    __slots__ = ("_answer", "_buffer", "_idle_timer", "_last_activity", "_loop", "_server", "_transport")

    def __init__(self, server: DNSServer) -> None:
        self._server = server
        self._answer = server.engine.answer
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._last_activity = self._loop.time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)
        if len(self._server._connections) >= self._server.max_tcp_connections:
            log.warning("DNS refuses a TCP connection: %d are open", len(self._server._connections))
            transport.abort()
            return
        self._server._connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._idle_timer = self._loop.call_later(self._server.tcp_idle_seconds, self._check_idle)

    def _check_idle(self) -> None:
        remaining = self._last_activity + self._server.tcp_idle_seconds - self._loop.time()
        if remaining > 0:
            self._idle_timer = self._loop.call_later(remaining, self._check_idle)
        elif self._transport is not None:
            self._idle_timer = None
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._last_activity = self._loop.time()
        buffer = self._buffer
        buffer += data
        answers: list[bytes] = []
        consumed = 0
        close = False
        available = len(buffer)
        while available - consumed >= 2:
            length = (buffer[consumed] << 8) | buffer[consumed + 1]
            if available - consumed - 2 < length:
                break
            query = bytes(buffer[consumed + 2:consumed + 2 + length])
            consumed += 2 + length
            try:
                response = self._answer(query, True)
            except Exception:
                log.exception("DNS could not answer a TCP query")
                response = self._server.engine.servfail(query)
            if response is None:
                close = True
                break
            answers.append(len(response).to_bytes(2, "big"))
            answers.append(response)
        if consumed:
            del buffer[:consumed]
        if answers:
            transport.write(b"".join(answers))
        if close:
            transport.close()

    def pause_writing(self) -> None:
        # The peer does not read its answers: stop reading its queries until it does.
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # answers already written are flushed, then the connection closes

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._transport = None
