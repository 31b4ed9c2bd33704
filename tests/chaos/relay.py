"""A fault-injecting TCP relay for Raft peer traffic, run as its own process (``python -m tests.chaos.relay``).

Every node gets one relay port, the address every other node knows it by (``--peers``), which is also what
a replicated cluster configuration holds (one address per node, the same on every node). The relay reads
the first frame of each connection, Spina's HELLO carrying the dialling node's id, to learn the connection's
source, then forwards it to the node's real Raft port. Spina's transport sends on its own outbound
connections only (answers travel on the answering node's outbound connection), so a connection from src to
dst carries src -> dst messages. The relay still forwards bytes both ways and governs each direction of
bytes by the mode of that direction, so partitions stay real in both directions even if the transport
starts answering on a shared connection.

Modes of a direction (a, b), i.e. the bytes a sends to b on any connection:

- ``pass``: forward them.
- ``drop``: a black hole: read and discard them, keep every connection open (the sender notices nothing).
  When the direction passes again, every connection that discarded bytes is reset, so that no byte stream
  resumes in the middle of a frame; the sender dials again.
- ``cut``: reset the connections a opened to b, and refuse new ones (accepted, held a moment, then reset, so
  a dialling node backs off instead of spinning); a's bytes on b's connections are discarded as with drop.

Connections to a node that is down are held the same way, then reset: the relay's own port always accepts,
so a refused upstream must not turn into a tight reconnect loop. A connection whose first frame is not a
HELLO has no known source and is forwarded in every mode.

Control: one JSON object per line on stdin, one answer per line on stdout (``{"error": ...}`` on bad input):
``{"op": "node", "node": "n2", "target": 21001}`` -> ``{"port": 40123}``;
``{"op": "mode", "changes": [["n1", "n2", "drop"], ...]}`` -> ``{"ok": true}``;
``{"op": "stats"}`` -> ``{"links": {"n1>n2": {...}}}``. The relay exits when stdin closes, so it never
outlives the test process that started it.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from spina_fast._raft import FrameDecoder, FrameError

MODES = ("pass", "drop", "cut")
KIND_HELLO = 200  # spina_fast.raft.transport.KIND_HELLO: the first frame of every peer connection
UNKNOWN_SOURCE = "?"
# How long a refused connection (cut link, or target down) is held open before it is reset: it bounds how
# fast a node that treats "connected, then reset" as a fresh start can spin through reconnects.
REFUSED_HOLD_SECONDS = 0.25
UPSTREAM_CONNECT_SECONDS = 2.0
HELLO_SECONDS = 5.0
MAX_HELLO_BYTES = 64 * 1024
READ_CHUNK = 64 * 1024

Direction = tuple[str, str]


@dataclass
class LinkStats:
    accepted: int = 0
    refused: int = 0
    resets: int = 0
    bytes_passed: int = 0
    bytes_dropped: int = 0


@dataclass(eq=False)
class _Pipe:
    """One accepted connection from ``src`` to ``dst`` and its upstream connection to the target node."""

    src: str
    dst: str
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    dropped: set[Direction] = field(default_factory=set)

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()


@dataclass(eq=False)
class _Node:
    node_id: str
    target_port: int
    server: asyncio.Server | None = None
    port: int = 0


async def _read_hello(reader: asyncio.StreamReader) -> tuple[str, bytes]:
    """The source named by the connection's first frame, and every byte read so far (to be forwarded)."""
    decoder = FrameDecoder(MAX_HELLO_BYTES)
    raw = bytearray()
    while True:
        data = await reader.read(READ_CHUNK)
        if not data:
            raise ConnectionResetError("closed before its first frame")
        raw.extend(data)
        # Byte by byte: the bytes after the first frame (the sender writes on at once) are the start of a
        # frame the decoder may reject as incomplete garbage, and they are not ours to decode anyway.
        for offset in range(len(data)):
            try:
                frames = decoder.feed(data[offset:offset + 1])
            except FrameError:
                return UNKNOWN_SOURCE, bytes(raw)
            if frames:
                kind, payload = frames[0]
                if kind != KIND_HELLO:
                    return UNKNOWN_SOURCE, bytes(raw)
                # HELLO is "ID" or "ID HOST:PORT".
                return payload.split(b" ", 1)[0].decode("utf-8", "replace"), bytes(raw)
        if len(raw) > MAX_HELLO_BYTES:
            return UNKNOWN_SOURCE, bytes(raw)


class Relay:
    def __init__(self) -> None:
        self.nodes: dict[str, _Node] = {}
        self.modes: dict[Direction, str] = {}
        self.pipes: set[_Pipe] = set()
        self.link_stats: dict[Direction, LinkStats] = defaultdict(LinkStats)

    def mode(self, direction: Direction) -> str:
        return self.modes.get(direction, "pass")

    async def add_node(self, node_id: str, target_port: int) -> int:
        if node_id in self.nodes:
            raise ValueError(f"node {node_id} has a relay port already")
        node = _Node(node_id, target_port)
        node.server = await asyncio.start_server(lambda r, w: self._serve(node, r, w), "127.0.0.1", 0)
        node.port = node.server.sockets[0].getsockname()[1]
        self.nodes[node_id] = node
        return node.port

    def set_mode(self, src: str, dst: str, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        direction = (src, dst)
        before = self.mode(direction)
        self.modes[direction] = mode
        if mode == "cut":
            self._reset_all(lambda pipe: (pipe.src, pipe.dst) == direction)
        if mode == "pass" and before != "pass":
            self._reset_all(lambda pipe: direction in pipe.dropped)

    def _reset_all(self, which: Callable[[_Pipe], bool]) -> None:
        for pipe in [pipe for pipe in self.pipes if which(pipe)]:
            self.link_stats[(pipe.src, pipe.dst)].resets += 1
            pipe.reset()

    async def _serve(self, node: _Node, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            src, first_bytes = await asyncio.wait_for(_read_hello(reader), HELLO_SECONDS)
        except (OSError, TimeoutError):
            writer.transport.abort()
            return
        pipe = _Pipe(src, node.node_id, writer)
        stats = self.link_stats[(src, node.node_id)]
        stats.accepted += 1
        if self.mode((src, node.node_id)) == "cut":
            await self._refuse(stats, reader, pipe)
            return
        try:
            upstream_reader, upstream = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", node.target_port), UPSTREAM_CONNECT_SECONDS)
        except (OSError, TimeoutError):
            await self._refuse(stats, reader, pipe)
            return
        pipe.upstream = upstream
        self.pipes.add(pipe)
        self._forward(pipe, stats, (src, node.node_id), first_bytes, upstream)
        try:
            await asyncio.gather(
                self._pump(pipe, stats, (src, node.node_id), reader, upstream),
                self._pump(pipe, stats, (node.node_id, src), upstream_reader, writer),
            )
        finally:
            self.pipes.discard(pipe)
            pipe.reset()

    async def _refuse(self, stats: LinkStats, reader: asyncio.StreamReader, pipe: _Pipe) -> None:
        stats.refused += 1
        try:
            await asyncio.wait_for(self._discard(stats, reader), REFUSED_HOLD_SECONDS)
        except (TimeoutError, OSError):
            # Held long enough (or the peer gave up first): now the reset the sender will see.
            stats.resets += 1
        pipe.reset()

    @staticmethod
    async def _discard(stats: LinkStats, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(READ_CHUNK):
            stats.bytes_dropped += len(data)

    def _forward(self, pipe: _Pipe, stats: LinkStats, direction: Direction, data: bytes,
                 writer: asyncio.StreamWriter) -> bool:
        """Write ``data`` on if ``direction`` passes; False if it was discarded."""
        if UNKNOWN_SOURCE in direction or self.mode(direction) == "pass":
            stats.bytes_passed += len(data)
            writer.write(data)
            return True
        stats.bytes_dropped += len(data)
        pipe.dropped.add(direction)
        return False

    async def _pump(self, pipe: _Pipe, stats: LinkStats, direction: Direction, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(READ_CHUNK):
                if self._forward(pipe, stats, direction, data, writer):
                    await writer.drain()
        except OSError:
            # A reset on either side ends the whole pipe (the finally in _serve resets the other side).
            stats.resets += 1
        finally:
            pipe.reset()

    def stats(self) -> dict[str, dict[str, int]]:
        return {f"{src}>{dst}": vars(stats) for (src, dst), stats in sorted(self.link_stats.items())}

    async def close(self) -> None:
        for node in self.nodes.values():
            if node.server is not None:
                node.server.close()
        self._reset_all(lambda pipe: True)


async def _handle(relay: Relay, request: dict[str, Any]) -> dict[str, Any]:
    op = request.get("op")
    if op == "node":
        return {"port": await relay.add_node(str(request["node"]), int(request["target"]))}
    if op == "mode":
        for src, dst, mode in request["changes"]:
            relay.set_mode(str(src), str(dst), str(mode))
        return {"ok": True}
    if op == "stats":
        return {"links": relay.stats()}
    raise ValueError(f"unknown op {op!r}; expected node, mode or stats")


async def serve_stdio() -> None:
    relay = Relay()
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    try:
        while line := await stdin.readline():
            try:
                answer = await _handle(relay, json.loads(line))
            except (ValueError, KeyError, TypeError, OSError) as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        await relay.close()


class RelayProcess:
    """The test side: starts the relay process and sends it commands (thread-safe)."""

    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.chaos.relay"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._answers: queue.Queue[str] = queue.Queue()
        self._stderr: list[str] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, args=(self._process.stdout, self._answers.put), daemon=True).start()
        threading.Thread(target=self._read, args=(self._process.stderr, self._stderr.append), daemon=True).start()

    @staticmethod
    def _read(stream: Any, sink: Any) -> None:
        for line in stream:
            sink(line)

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if self._process.poll() is not None:
                raise RuntimeError(f"the relay exited with {self._process.returncode}: {''.join(self._stderr)}")
            assert self._process.stdin is not None
            self._process.stdin.write(json.dumps(request) + "\n")
            self._process.stdin.flush()
            try:
                answer: dict[str, Any] = json.loads(self._answers.get(timeout=self.timeout))
            except queue.Empty:
                raise RuntimeError(f"the relay did not answer {request} within {self.timeout}s; "
                                   f"stderr: {''.join(self._stderr)[-2000:]}") from None
        if "error" in answer:
            raise ValueError(f"the relay refused {request}: {answer['error']}")
        return answer

    def add_node(self, node_id: str, target_port: int) -> int:
        """A relay port in front of ``node_id``'s real Raft port: the address the other nodes dial."""
        return int(self.call({"op": "node", "node": node_id, "target": target_port})["port"])

    def set_modes(self, changes: Iterable[tuple[str, str, str]]) -> None:
        changes = list(changes)
        if changes:
            self.call({"op": "mode", "changes": changes})

    def stats(self) -> dict[str, dict[str, int]]:
        return dict(self.call({"op": "stats"})["links"])

    def close(self) -> None:
        if self._process.poll() is None:
            assert self._process.stdin is not None
            self._process.stdin.close()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)


class ModeSetter(Protocol):
    def set_modes(self, changes: Iterable[tuple[str, str, str]]) -> None: ...


class Network:
    """Partitions of a set of nodes, expressed as relay modes per ordered pair."""

    def __init__(self, relay: ModeSetter, nodes: list[str]) -> None:
        self.relay = relay
        self.nodes = list(nodes)
        self.blocked: dict[Direction, str] = {}

    def _apply(self, wanted: dict[Direction, str]) -> None:
        pairs = [(a, b) for a in self.nodes for b in self.nodes if a != b]
        changes = [(a, b, wanted.get((a, b), "pass")) for a, b in pairs
                   if wanted.get((a, b), "pass") != self.blocked.get((a, b), "pass")]
        self.relay.set_modes(changes)
        self.blocked = {pair: mode for pair, mode in wanted.items() if mode != "pass"}

    def block(self, pairs: Iterable[Direction], mode: str = "drop") -> None:
        """Block these directions (on top of what is blocked already)."""
        if mode not in ("drop", "cut"):
            raise ValueError(f"a partition drops or cuts, not {mode!r}")
        wanted = dict(self.blocked)
        for a, b in pairs:
            if a not in self.nodes or b not in self.nodes:
                raise ValueError(f"unknown node in {a}>{b}; the nodes are {self.nodes}")
            wanted[(a, b)] = mode
        self._apply(wanted)

    def partition(self, *groups: Iterable[str], mode: str = "drop") -> None:
        """No traffic between nodes of different groups, in either direction."""
        sets = [set(group) for group in groups]
        self.block([(a, b) for i, left in enumerate(sets) for j, right in enumerate(sets) if i != j
                    for a in left for b in right], mode)

    def bridge(self, left: Iterable[str], bridge: str, right: Iterable[str], mode: str = "drop") -> None:
        """``left`` and ``right`` cannot talk to each other; ``bridge`` talks to both."""
        left_set, right_set = set(left), set(right)
        if bridge in left_set | right_set:
            raise ValueError(f"the bridge node {bridge} must be on neither side")
        self.partition(left_set, right_set, mode=mode)

    def heal(self) -> None:
        self._apply({})


if __name__ == "__main__":
    import uvloop

    uvloop.run(serve_stdio())
