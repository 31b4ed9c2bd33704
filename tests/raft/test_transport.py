"""The Raft transport's reconnect behaviour against a peer that accepts and drops every connection."""

from __future__ import annotations

import asyncio

from spina_fast.config import HostPort
from spina_fast.raft.transport import RaftTransport


async def test_a_peer_that_drops_every_connection_is_redialled_with_backoff() -> None:
    accepted = 0

    def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = RaftTransport("n1", HostPort("127.0.0.1", 0), {"n2": HostPort("127.0.0.1", port)},
                              lambda *_: None, backoff_min=0.02, backoff_max=0.5)
    await transport.start()
    try:
        # Without backoff this loop redials about a thousand times a second; with it, a handful.
        deadline = asyncio.get_running_loop().time() + 2.0
        while asyncio.get_running_loop().time() < deadline and accepted < 200:
            await asyncio.sleep(0.05)
        assert 2 <= accepted < 50, accepted
    finally:
        await transport.close()
        server.close()
        await server.wait_closed()
