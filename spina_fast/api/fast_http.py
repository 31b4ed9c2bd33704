"""The agent's HTTP front end: a raw asyncio protocol serving the hot routes, aiohttp for the rest.

Hot routes (``GET|PUT|DELETE /v1/kv/<key>``, ``GET /v1/status/leader``, ``GET /v1/status/peers``, and
the discovery lookups ``GET /v1/health/service/<name>``, ``/v1/catalog/service/<name>``,
``/v1/catalog/services``, ``/v1/agent/services``, ``/v1/spina/services/<name>``) are parsed by the Cython
``_http`` module and answered here, with the endpoint logic of ``api/kv.py``, ``api/registry.py`` (whose
lookups come from a cache of encoded answers) and ``api/http.py`` (one implementation, two servers).
The first request on a connection that is not a hot route (or that uses HTTP the strict parser leaves to
aiohttp: chunked bodies, Upgrade, other versions, targets aiohttp decodes its own way) hands the
connection over to aiohttp's ``RequestHandler`` for the rest of its life: the transport is switched to
it and fed the bytes not yet consumed. So one listening port serves both, and aiohttp keeps every
behaviour it had.

Before any of that, a connection with nothing owed and nothing half-read offers each chunk to the fast lane
(``FastLane`` in ``_http.pyx``): a plain keep-alive ``GET`` whose exact target was answered before (a registry
lookup or a KV read that neither blocks nor needs a barrier) is answered from the fully encoded response while
the index it was read at holds, with the read headers and Date of the moment, and counted in the same metrics.
The first request the lane does not vouch for, and everything after it, takes the general path below.

KV writes (``PUT``/``DELETE /v1/kv/<key>``) are proposed to Raft as they are parsed, in request order, and
answered from their future's done callback (no task or coroutine per write); a ``true``/``false`` answer is a
prebuilt response. Any other request behind unanswered writes on the connection waits until they are answered,
so it sees them, as it would from a server that serves a connection one request at a time.

HTTP/1.1 as RFC 9112 wants it: keep-alive by default (HTTP/1.0 only on request), pipelined requests
answered in order even when a later one finishes first (a queue of response slots, written in one
``transport.write`` per batch), Content-Length bodies, ``Expect: 100-continue``, size limits answered
414 / 431 / 413 before the body is read, malformed input answered 400 and closed, reading paused while
the peer does not drain its responses, lingering close so that an error reply is not lost to a reset.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import orjson

from spina_fast._http import FastLane, RequestHead, encode_response, parse_head, parse_query
from spina_fast.api import kv, registry
from spina_fast.api.http import INTERNAL_ERROR, ROUTE_STATUS_LEADER, ROUTE_STATUS_PEERS, status_leader, status_peers
from spina_fast.api.responses import JSON, Reply, json_reply, spina_error_reply
from spina_fast.config import HostPort
from spina_fast.errors import MalformedRequest, SpinaError
from spina_fast.observability.metrics import LATENCY_BUCKETS, SourceSample

if TYPE_CHECKING:
    from spina_fast.agent import Agent

log = logging.getLogger(__name__)

# aiohttp's own limits (web_protocol.RequestHandler), so a request is refused by both or by neither.
MAX_LINE_BYTES = 8190
MAX_FIELD_BYTES = 8190
MAX_HEADERS = 128
MAX_HEAD_BYTES = 64 * 1024
# A GET or DELETE carrying a body larger than this is left to aiohttp (which streams it to /dev/null).
MAX_IGNORED_BODY_BYTES = 1024 * 1024
# After a rejected PUT, a body up to this size is read and dropped to keep the connection; beyond, close.
MAX_DISCARD_BYTES = 4 * 1024 * 1024
# Responses owed on one connection before it stops reading (pipelining depth).
MAX_PIPELINE = 64
KEEPALIVE_SECONDS = 75.0  # aiohttp's keepalive_timeout
LINGER_SECONDS = 2.0

_KV_PREFIX = "/v1/kv/"
_KV_PREFIX_LENGTH = len(_KV_PREFIX)
_ROUTE_KV, _ROUTE_LEADER, _ROUTE_PEERS = 1, 2, 3
# Discovery lookups: route = _ROUTE_DISCOVERY + the registry endpoint kind.
_ROUTE_DISCOVERY = 16
_ROUTE_NAMES = {_ROUTE_KV: kv.ROUTE, _ROUTE_LEADER: ROUTE_STATUS_LEADER, _ROUTE_PEERS: ROUTE_STATUS_PEERS,
                **{_ROUTE_DISCOVERY + kind: route for kind, route in registry.ROUTES.items()}}
_EXACT_GET_PATHS = {ROUTE_STATUS_LEADER: _ROUTE_LEADER, ROUTE_STATUS_PEERS: _ROUTE_PEERS,
                    "/v1/catalog/services": _ROUTE_DISCOVERY + registry.CATALOG_SERVICES,
                    "/v1/agent/services": _ROUTE_DISCOVERY + registry.AGENT_SERVICES}
# (prefix, kind): the rest of the path is the service name.
_NAMED_LOOKUPS = (("/v1/health/service/", registry.HEALTH), ("/v1/catalog/service/", registry.CATALOG_SERVICE),
                  ("/v1/spina/services/", registry.NATIVE))
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_TRUE, _FALSE = orjson.dumps(True), orjson.dumps(False)
_WRITE_METHODS = frozenset(("PUT", "DELETE"))
# Lookups whose answer is a function of the registry's index alone, which the fast lane may replay
# (the native query is not: it carries the leader-local load), and those whose index is the catalog's.
_LANE_KINDS = frozenset((registry.HEALTH, registry.CATALOG_SERVICE, registry.CATALOG_SERVICES,
                         registry.AGENT_SERVICES))
_CATALOG_KINDS = frozenset((registry.CATALOG_SERVICES, registry.AGENT_SERVICES))
# The lane counts metrics per slot: a registry lookup's slot is its endpoint kind, a KV read's this one.
_LANE_KV_SLOT = 7
_LANE_ROUTES = {**{kind: registry.ROUTES[kind] for kind in _LANE_KINDS}, _LANE_KV_SLOT: kv.ROUTE}
# The read headers, in the order the lane writes them (kv.read_headers, then the index).
_LANE_HEADERS = ["X-Consul-KnownLeader", "X-Consul-LastContact", "X-Consul-Index"]


class _Slot:
    """The place of a response that is still being computed, in the connection's response queue."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data: bytes | None = None


class _Close:
    """Queue marker: close the connection once everything before it is written."""


_CLOSE = _Close()


class FastHTTPServer:
    """Listens on the agent's HTTP address; ``delegate_factory`` makes aiohttp's protocol for handed-over
    connections (``web.AppRunner(...).server``)."""

    def __init__(self, agent: Agent, delegate_factory: Callable[[], asyncio.Protocol]) -> None:
        self.agent = agent
        self.delegate_factory = delegate_factory
        self.connections: set[FastHTTPProtocol] = set()
        self._server: asyncio.AbstractServer | None = None
        # Repeated reads are answered from here before the general path sees them (see _http.pyx).
        self.lane = FastLane(LATENCY_BUCKETS)
        self.date: Callable[[], bytes] = self.lane.date
        self._write_answers: dict[tuple[bool, bool, bool], bytes] = {}
        self._write_answers_date = b""
        agent.metrics.http.add_source(self._lane_metrics)

    async def start(self, host: str, port: int, backlog: int = 1024) -> HostPort:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: FastHTTPProtocol(self), host, port, backlog=backlog,
                                                reuse_address=True)
        bound_host, bound_port = self._server.sockets[0].getsockname()[:2]
        return HostPort(bound_host, bound_port)

    async def close(self) -> None:
        """Stop listening and close every connection still served here (handed-over ones are aiohttp's)."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.abort()
        self.connections.clear()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def write_answer(self, result: bool, http11: bool, keep_alive: bool) -> bytes:
        """The whole response to a KV write that answered ``result``: built once per second (its Date) and
        shape."""
        date = self.date()
        if date is not self._write_answers_date:
            self._write_answers_date = date
            self._write_answers.clear()
        key = (result, http11, keep_alive)
        data = self._write_answers.get(key)
        if data is None:
            data = self._write_answers[key] = encode_response(200, _TRUE if result else _FALSE, JSON, None, date,
                                                            http11, keep_alive)
        return data

    def _lane_metrics(self) -> list[SourceSample]:
        return [("GET", _LANE_ROUTES[slot], 200, count, buckets, seconds)
                for slot, count, buckets, seconds in self.lane.metrics()]


class FastHTTPProtocol(asyncio.Protocol):
    def __init__(self, server: FastHTTPServer) -> None:
        self._server = server
        self._agent = server.agent
        self._lane = server.lane
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        # Bytes received and not consumed yet: the start of a request whose head or body is incomplete,
        # pipelined requests beyond MAX_PIPELINE, or what aiohttp will be fed on handover.
        self._buffer = bytearray()
        self._head: RequestHead | None = None  # parsed, its body still arriving
        self._route = 0
        self._discard = 0  # body bytes of a rejected request still to drop
        self._queue: deque[bytes | _Slot | _Close] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False  # no further request is read: a closing response is queued or sent
        self._eof = False
        self._handover = False  # the connection goes to aiohttp once the queued responses are written
        self._write_paused = False
        self._reading_paused = False
        self._backlogged = False  # requests wait in the buffer for the pipeline to drain
        self._flush_scheduled = False
        self._writes_pending = 0  # KV writes proposed on this connection and not answered yet
        self._last_activity = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._server.connections.add(self)
        self._last_activity = self._loop.time()
        self._timer = self._loop.call_later(KEEPALIVE_SECONDS, self._check_idle)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # lingering close: drain what the peer still sends
        self._last_activity = self._loop.time()
        if self._buffer or self._handover or self._backlogged:
            self._buffer += data
            if self._handover or self._backlogged:
                return
            if self._head is not None and len(self._buffer) < self._head.content_length:
                return  # a body still arriving: gather it without re-reading the buffer
            data = bytes(self._buffer)
            self._buffer.clear()
        elif not (self._queue or self._head is not None or self._discard or self._write_paused):
            # Nothing owed and nothing half-read: repeated reads at the start are answered at once, and the
            # general path takes whatever follows the first request the lane leaves.
            served = self._lane.serve(data, self._transport)
            if served:
                if served == len(data):
                    return
                data = data[served:]
        self._consume(data)
        self._flush()

    def eof_received(self) -> bool:
        self._eof = True
        if self._closing:
            return False
        if self._handover:
            return True  # aiohttp is told once it takes over
        # Half-closed: answer what was asked, then close; an incomplete request gets no answer.
        return bool(self._queue or self._backlogged)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._server.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in self._tasks:
            task.cancel()  # a blocking query nobody waits for any more; a write still commits or not
        self._queue.clear()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # --- requests ------------------------------------------------------------------------------------------

    def _consume(self, data: bytes) -> None:
        """Serve the requests in ``data``; keep an incomplete tail in ``self._buffer``."""
        offset = 0
        size = len(data)
        while not self._closing:
            if self._discard:
                dropped = min(self._discard, size - offset)
                self._discard -= dropped
                offset += dropped
                if self._discard:
                    return
            head = self._head
            if head is None:
                if len(self._queue) >= MAX_PIPELINE:
                    self._write_ready()
                    if len(self._queue) >= MAX_PIPELINE:
                        self._backlogged = True
                        self._buffer += memoryview(data)[offset:]
                        self._update_reading()
                        return
                try:
                    head = parse_head(data, offset, MAX_LINE_BYTES, MAX_FIELD_BYTES, MAX_HEAD_BYTES, MAX_HEADERS)
                except MalformedRequest as exc:
                    self._reject(exc)
                    return
                if head is None:
                    break
                route = self._route_of(head)
                if not route:
                    self._hand_over(memoryview(data)[offset:])
                    return
                if self._writes_pending and not (route == _ROUTE_KV and head.method in _WRITE_METHODS):
                    # A request sees the effects of the writes sent before it on the connection (as a server
                    # answering one request at a time would show it): it waits in the buffer until they are
                    # answered. Writes need not wait: they are proposed, so applied, in the order sent.
                    self._backlogged = True
                    self._buffer += memoryview(data)[offset:]
                    self._update_reading()
                    return
                offset = head.end
                if not self._start_body(head, route, size - offset):
                    continue
            length = head.content_length
            if size - offset < length:
                break
            body = data[offset:offset + length] if length else b""
            offset += length
            self._head = None
            self._dispatch(head, self._route, body)
        if offset < size and not self._closing:
            self._buffer += memoryview(data)[offset:]

    def _route_of(self, head: RequestHead) -> int:
        """The hot route ``head`` asks for, or 0 when aiohttp must serve it."""
        if head.delegate:
            return 0
        path = head.path
        method = head.method
        if path.startswith(_KV_PREFIX) and not 0 <= head.escape_offset < _KV_PREFIX_LENGTH:
            if method == "PUT" or (method in ("GET", "DELETE") and head.content_length <= MAX_IGNORED_BODY_BYTES):
                return _ROUTE_KV
            return 0
        if method == "GET" and head.escape_offset < 0 and head.content_length <= MAX_IGNORED_BODY_BYTES:
            route = _EXACT_GET_PATHS.get(path, 0)
            if route:
                return route
            for prefix, kind in _NAMED_LOOKUPS:
                # A name with a "/" is not a route of aiohttp's either: it answers the 404.
                if path.startswith(prefix) and len(path) > len(prefix) and "/" not in path[len(prefix):]:
                    return _ROUTE_DISCOVERY + kind
        return 0

    def _start_body(self, head: RequestHead, route: int, available: int) -> bool:
        """Decide about a request before its body: False if it was answered already (rejected)."""
        self._head = head
        self._route = route
        if head.method == "PUT" and route == _ROUTE_KV:
            started = time.perf_counter()
            try:
                rejected = kv.check_put(parse_query(head.query), head.content_length)
            except SpinaError as exc:
                rejected = spina_error_reply(exc)
            if rejected is not None:
                self._head = None
                # The body may still come: drop it and keep the connection, unless it is large or the client
                # waits for our go-ahead (then it sends nothing, or something we cannot delimit: close).
                keep = head.keep_alive and not head.expect_continue and head.content_length <= MAX_DISCARD_BYTES
                self._discard = head.content_length if keep else 0
                self._respond(head, route, rejected, started, keep_alive=keep)
                return False
        # RFC 9110 §10.1.1: an HTTP/1.0 client's expectation is ignored.
        if head.expect_continue and head.http11 and head.content_length > available:
            self._queue.append(_CONTINUE)
        return True

    def _dispatch(self, head: RequestHead, route: int, body: bytes) -> None:
        started = time.perf_counter()
        agent = self._agent
        try:
            if route == _ROUTE_KV:
                query = parse_query(head.query)
                key = head.path[_KV_PREFIX_LENGTH:]
                method = head.method
                if method == "GET":
                    if kv.answers_at_once(query):
                        reply = kv.read(agent, key, query)
                        if reply.status == 200 and head.escape_offset < 0:
                            self._remember(head, agent.state.kv, None, agent.state.kv.index, _LANE_KV_SLOT, reply)
                    else:
                        self._await(head, route, started, kv.get(agent, key, query))
                        return
                else:
                    command = kv.put_command(key, query, body) if method == "PUT" else kv.delete_command(key, query)
                    if isinstance(command, Reply):
                        reply = command
                    else:
                        # Proposed now, in request order: pipelined writes reach the log in the order sent.
                        self._await_write(head, started, agent.node.submit(command))
                        return
            elif route >= _ROUTE_DISCOVERY:
                kind = route - _ROUTE_DISCOVERY
                name = head.path.rpartition("/")[2]
                if registry.answers_at_once(head.query):
                    reply = registry.read(agent, kind, name, head.query)
                    if kind in _LANE_KINDS and reply.status == 200:
                        store = agent.state.registry
                        if kind in _CATALOG_KINDS:
                            self._remember(head, store, None, store.index, kind, reply)
                        else:
                            self._remember(head, store, name, store.service_index(name), kind, reply)
                else:
                    self._await(head, route, started, registry.get(agent, kind, name, head.query))
                    return
            elif route == _ROUTE_LEADER:
                reply = status_leader(agent)
            else:
                reply = status_peers(agent)
        except SpinaError as exc:
            reply = spina_error_reply(exc)
        except Exception:
            log.exception("request failed", extra={"path": head.path})
            reply = INTERNAL_ERROR
        self._respond(head, route, reply, started, keep_alive=head.keep_alive)

    def _remember(self, head: RequestHead, source: object, name: str | None, index: int, slot: int,
                  reply: Reply) -> None:
        """Hand a read's answer to the fast lane, which replays it while ``source``'s index (for ``name``) holds.

        Called right after the read with nothing awaited in between, so ``index`` is the one the body was read
        at (the answer shows it as at least 1: the lane keeps the raw one to compare). The path has no escapes,
        so the raw target is the path and the raw query as they came."""
        if reply.headers is None or list(reply.headers) != _LANE_HEADERS or reply.content_type is None:
            return  # an answer shaped otherwise than the lane writes it: leave it to the general path
        target = f"{head.path}?{head.query}" if head.query else head.path
        self._lane.remember(target.encode("ascii"), source, name, index, reply.headers["X-Consul-Index"], slot,
                            reply.body, reply.content_type, self._agent.node)

    def _respond(self, head: RequestHead, route: int, reply: Reply, started: float, *, keep_alive: bool) -> None:
        self._queue.append(self._encode(head, route, reply, started, keep_alive))
        if not keep_alive:
            self._queue.append(_CLOSE)
            self._closing = True

    def _await(self, head: RequestHead, route: int, started: float, work: Coroutine[Any, Any, Reply]) -> None:
        slot = _Slot()
        self._queue.append(slot)
        if not head.keep_alive:
            self._queue.append(_CLOSE)
            self._closing = True
        task = self._loop.create_task(self._finish(slot, head, route, started, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _await_write(self, head: RequestHead, started: float, future: asyncio.Future[Any]) -> None:
        """A write's answer comes from a done callback on its Raft future: no task, no coroutine per write."""
        slot = _Slot()
        self._queue.append(slot)
        self._writes_pending += 1
        if not head.keep_alive:
            self._queue.append(_CLOSE)
            self._closing = True
        future.add_done_callback(partial(self._finish_write, slot, head, started))

    def _finish_write(self, slot: _Slot, head: RequestHead, started: float, future: asyncio.Future[Any]) -> None:
        self._writes_pending -= 1
        if self._transport is None:
            return  # the client left; the write commits or not all the same
        try:
            result = future.result()
        except SpinaError as exc:
            reply = spina_error_reply(exc)
        except Exception:
            log.exception("request failed", extra={"path": head.path})
            reply = INTERNAL_ERROR
        else:
            if result is True or result is False:
                slot.data = self._server.write_answer(result, head.http11, head.keep_alive)
                self._agent.metrics.observe_http(head.method, kv.ROUTE, 200, time.perf_counter() - started)
                self._flush_soon()
                return
            reply = json_reply(result)
        slot.data = self._encode(head, _ROUTE_KV, reply, started, head.keep_alive)
        self._flush_soon()

    def _flush_soon(self) -> None:
        # Every write a Ready commits is answered in the same loop turn: one transport write per connection
        # for all of them (pipelined requests), after the last.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush()

    async def _finish(self, slot: _Slot, head: RequestHead, route: int, started: float,
                      work: Coroutine[Any, Any, Reply]) -> None:
        try:
            reply = await work
        except SpinaError as exc:
            reply = spina_error_reply(exc)
        except Exception:
            log.exception("request failed", extra={"path": head.path})
            reply = INTERNAL_ERROR
        slot.data = self._encode(head, route, reply, started, head.keep_alive)
        self._flush()

    def _encode(self, head: RequestHead, route: int, reply: Reply, started: float, keep_alive: bool) -> bytes:
        data = encode_response(reply.status, reply.body, reply.content_type, reply.headers, self._server.date(),
                               head.http11, keep_alive)
        self._agent.metrics.observe_http(head.method, _ROUTE_NAMES[route], reply.status,
                                         time.perf_counter() - started)
        return data

    def _reject(self, exc: MalformedRequest) -> None:
        """Not HTTP we accept: answer the error (JSON, like every other) and close."""
        reply = spina_error_reply(exc)
        self._queue.append(encode_response(reply.status, reply.body, reply.content_type, reply.headers,
                                           self._server.date(), True, False))
        self._queue.append(_CLOSE)
        self._closing = True

    # --- writing -------------------------------------------------------------------------------------------

    def _write_ready(self) -> bool:
        """Write the responses that are ready, in request order, in one ``write``; True if the close marker
        was reached."""
        transport = self._transport
        queue = self._queue
        if transport is None:
            return False
        ready: list[bytes] = []
        close = False
        while queue:
            item = queue[0]
            if item.__class__ is bytes:
                ready.append(item)
            elif item is _CLOSE:
                close = True
                queue.clear()
                break
            else:
                data = item.data  # type: ignore[union-attr]
                if data is None:
                    break
                ready.append(data)
            queue.popleft()
        if ready:
            transport.write(ready[0] if len(ready) == 1 else b"".join(ready))
        return close

    def _flush(self) -> None:
        """Write what is ready, then act on what the connection waited for: close, handover, backlog, EOF."""
        transport = self._transport
        if transport is None:
            return
        if self._write_ready():
            self._close_gracefully()
        elif not self._queue:
            if self._handover:
                self._complete_handover()
            elif self._backlogged:
                self._loop.call_soon(self._resume_backlog)
            elif self._eof:
                transport.close()  # half-closed and answered; a request cut short can never complete

    def _resume_backlog(self) -> None:
        if not self._backlogged or self._transport is None:
            return
        self._backlogged = False
        self._update_reading()
        data = bytes(self._buffer)
        self._buffer.clear()
        self._consume(data)
        self._flush()

    def _close_gracefully(self) -> None:
        """Close after the last response; if the peer may still be sending, half-close first and drop what
        arrives for a moment, so that its unread bytes do not turn our close into a reset that loses the
        response (RFC 9112 §9.6)."""
        transport = self._transport
        self._closing = True
        if transport is None:
            return
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        if self._eof or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(LINGER_SECONDS, transport.close)

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or self._closing:
            return
        pause = self._write_paused or self._backlogged or self._handover
        if pause != self._reading_paused:
            self._reading_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _check_idle(self) -> None:
        transport = self._transport
        if transport is None:
            return
        idle_for = self._loop.time() - self._last_activity
        if idle_for >= KEEPALIVE_SECONDS and not (self._queue or self._tasks):
            transport.close()
            return
        self._timer = self._loop.call_later(max(KEEPALIVE_SECONDS - idle_for, 1.0), self._check_idle)

    # --- handing the connection to aiohttp -------------------------------------------------------------------

    def _hand_over(self, unread: memoryview) -> None:
        self._buffer += unread
        self._handover = True
        self._head = None
        if self._queue:
            self._update_reading()  # earlier responses go first; reading resumes under aiohttp
            return
        self._complete_handover()

    def _complete_handover(self) -> None:
        transport = self._transport
        if transport is None:
            return
        self._transport = None
        self._server.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        data = bytes(self._buffer)
        self._buffer.clear()
        protocol = self._server.delegate_factory()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._write_paused:
            protocol.pause_writing()
        if data:
            protocol.data_received(data)
        if self._eof and not protocol.eof_received():
            transport.close()


__all__ = ["FastHTTPServer"]
