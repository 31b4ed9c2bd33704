"""Raft peer traffic over asyncio TCP.

Each node keeps one outbound connection per peer (reconnecting with capped exponential backoff) and
accepts inbound connections from peers; answers travel on the answering node's own outbound connection.
The first frame on a connection is HELLO carrying the sender's node id and its Raft address ("ID HOST:PORT");
every frame after it is handed to ``on_frame(src, kind, payload)``. A HELLO from a node this one does not know
yet teaches its address, so a node whose configuration is behind (it missed the change that added the
current leader) can still answer that leader. Sending never blocks: a message to a peer that is unreachable or
not draining its buffer is dropped, which Raft tolerates (it retries from its own state).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Callable
from typing import cast

from spina_fast._raft import FrameDecoder, FrameError, encode_frame
from spina_fast.config import HostPort, parse_host_port, validate_node_id

log = logging.getLogger(__name__)

KIND_HELLO = 200
# A peer that does not drain this much is treated as gone for the purpose of sending.
MAX_BUFFERED_BYTES = 32 * 1024 * 1024
MAX_FRAME_BYTES = 64 * 1024 * 1024

FrameHandler = Callable[[str, int, bytes], None]


def _no_delay(transport: asyncio.BaseTransport) -> None:
    # Raft messages are small and latency-bound: Nagle plus delayed ACKs would add up to 40 ms per round.
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Inbound(asyncio.Protocol):
    def __init__(self, transport_owner: RaftTransport) -> None:
        self._owner = transport_owner
        self._decoder = FrameDecoder(MAX_FRAME_BYTES)
        self._peer: str | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check here.
        self._transport = cast(asyncio.Transport, transport)
        _no_delay(self._transport)
        self._owner._inbound.add(self._transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._owner._inbound.discard(self._transport)

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        try:
            frames = self._decoder.feed(data)
        except FrameError as exc:
            log.warning("dropping connection with malformed frame",
                        extra={"peer": self._peer or "unknown", "reason": str(exc)})
            self._transport.abort()
            return
        for kind, payload in frames:
            if self._peer is None:
                if kind != KIND_HELLO:
                    log.warning("dropping connection that did not start with HELLO", extra={"kind": kind})
                    self._transport.abort()
                    return
                peer, _, address_text = payload.decode("utf-8", "replace").partition(" ")
                if peer not in self._owner.peers and not self._owner.learn_from_hello(peer, address_text):
                    log.warning("dropping connection from unknown node", extra={"peer": peer})
                    self._transport.abort()
                    return
                self._peer = peer
                continue
            try:
                self._owner.on_frame(self._peer, kind, payload)
            except FrameError as exc:
                log.warning("dropping connection with malformed message",
                            extra={"peer": self._peer, "kind": kind, "reason": str(exc)})
                self._transport.abort()
                return


class _Outbound(asyncio.Protocol):
    def __init__(self, on_lost: Callable[[], None]) -> None:
        self._on_lost = on_lost

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost()


SHORT_LIVED_SECONDS = 1.0


class RaftTransport:
    def __init__(self, node_id: str, listen: HostPort, peers: dict[str, HostPort], on_frame: FrameHandler,
                 *, backoff_min: float = 0.02, backoff_max: float = 1.0) -> None:
        self.node_id = node_id
        self.listen = listen
        self.peers = dict(peers)
        self.on_frame = on_frame
        self.bound: HostPort | None = None
        self.dropped = 0
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._server: asyncio.Server | None = None
        self._outbound: dict[str, asyncio.Transport] = {}
        self._inbound: set[asyncio.Transport] = set()
        self._dialers: dict[str, asyncio.Task[None]] = {}
        self._connected: dict[str, asyncio.Event] = {}
        # A peer that accepts and then drops us at once (it does not know us yet, or is shutting down) is
        # redialled with growing delays too, not in a tight loop.
        self._connected_at: dict[str, float] = {}
        self._redial_delay: dict[str, float] = {}
        self._closing = False

    async def start(self) -> HostPort:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Inbound(self), self.listen.host, self.listen.port,
                                                reuse_address=True, backlog=256)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.bound = HostPort(host, port)
        for peer in self.peers:
            self._dial(peer)
        return self.bound

    def _dial(self, peer: str, after: float = 0.0) -> None:
        if not self._closing and (peer not in self._dialers or self._dialers[peer].done()):
            self._dialers[peer] = asyncio.get_running_loop().create_task(self._connect(peer, after))

    async def _connect(self, peer: str, after: float = 0.0) -> None:
        loop = asyncio.get_running_loop()
        delay = self._backoff_min
        if after:
            await asyncio.sleep(after * (0.5 + random.random()))
        while not self._closing and peer in self.peers:
            address = self.peers[peer]
            try:
                transport, _ = await loop.create_connection(lambda: _Outbound(lambda: self._lost(peer)),
                                                            address.host, address.port)
            except OSError:
                # Jittered so that a restarted cluster's nodes do not dial each other in lockstep.
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self._backoff_max)
                continue
            _no_delay(transport)
            hello = self.node_id if self.bound is None else f"{self.node_id} {self.bound}"
            transport.write(encode_frame(KIND_HELLO, hello.encode()))
            self._outbound[peer] = transport
            self._connected_at[peer] = loop.time()
            self._connected.setdefault(peer, asyncio.Event()).set()
            log.debug("connected to peer", extra={"peer": peer, "address": str(address)})
            return

    def _lost(self, peer: str) -> None:
        self._outbound.pop(peer, None)
        if peer in self._connected:
            self._connected[peer].clear()
        if not self._closing and peer in self.peers:
            lived = asyncio.get_running_loop().time() - self._connected_at.get(peer, 0.0)
            if lived < SHORT_LIVED_SECONDS:
                delay = min(max(self._redial_delay.get(peer, 0.0) * 2, self._backoff_min), self._backoff_max)
            else:
                delay = 0.0
            self._redial_delay[peer] = delay
            self._dial(peer, after=delay)

    def learn_from_hello(self, peer: str, address_text: str) -> bool:
        """Add a node that introduced itself with its address; False if the HELLO is not a valid one."""
        try:
            validate_node_id(peer)
            address = parse_host_port(address_text, what=f"address of {peer}")
        except ValueError:
            return False
        if peer == self.node_id or address.port == 0:
            return False
        log.info("learned a peer from its hello", extra={"peer": peer, "address": str(address)})
        self.add_peer(peer, address)
        return True

    def add_peer(self, peer: str, address: HostPort) -> None:
        """Talk to ``peer`` at ``address`` from now on (redialling if the address changed)."""
        if peer == self.node_id:
            return
        previous = self.peers.get(peer)
        self.peers[peer] = address
        if previous != address:
            if previous is not None:
                self.disconnect(peer)
            if self.bound is not None:
                self._dial(peer)

    def remove_peer(self, peer: str) -> None:
        """Stop talking to ``peer`` (it left the cluster)."""
        if self.peers.pop(peer, None) is not None:
            self.disconnect(peer)
            dialer = self._dialers.pop(peer, None)
            if dialer is not None:
                dialer.cancel()

    def send(self, peer: str, frame: bytes) -> bool:
        """Queue one encoded frame for ``peer``; False if it was dropped."""
        return self.send_batch(peer, [frame])

    def send_batch(self, peer: str, frames: list[bytes]) -> bool:
        """Queue encoded frames for ``peer`` in one write (writev); False if they were dropped."""
        transport = self._outbound.get(peer)
        if transport is None or transport.is_closing() or transport.get_write_buffer_size() > MAX_BUFFERED_BYTES:
            self.dropped += len(frames)
            return False
        if len(frames) == 1:
            transport.write(frames[0])
        else:
            transport.writelines(frames)
        return True

    def is_connected(self, peer: str) -> bool:
        transport = self._outbound.get(peer)
        return transport is not None and not transport.is_closing()

    async def wait_connected(self, peer: str, timeout: float) -> bool:
        """Wait until the outbound connection to ``peer`` is up; False after ``timeout``."""
        if self.is_connected(peer):
            return True
        if peer not in self.peers:
            return False
        event = self._connected.setdefault(peer, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return self.is_connected(peer)

    def connected_peers(self) -> list[str]:
        return sorted(peer for peer, transport in self._outbound.items() if not transport.is_closing())

    def disconnect(self, peer: str) -> None:
        """Drop the outbound connection to ``peer`` (it is dialled again)."""
        transport = self._outbound.pop(peer, None)
        if peer in self._connected:
            self._connected[peer].clear()
        if transport is not None:
            transport.abort()

    async def close(self) -> None:
        self._closing = True
        for task in self._dialers.values():
            task.cancel()
        for transport in [*self._outbound.values(), *self._inbound]:
            transport.abort()
        self._outbound.clear()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
