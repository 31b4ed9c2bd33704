"""10,000 blocking queries on 1,000 services: a change wakes exactly the watchers of the service it touched."""

from __future__ import annotations

import asyncio
import json
import resource
import urllib.request
from collections.abc import Iterator

import pytest

from tests.agents import AgentProcess, start_agent

SERVICES = 1_000
WATCHERS_PER_SERVICE = 10


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    process = start_agent("--dev", "--log-level", "warning")
    yield process
    process.kill()


def put(agent: AgentProcess, path: str, body: object) -> dict[str, object]:
    request = urllib.request.Request(agent.base_url + path, data=json.dumps(body).encode(), method="PUT")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"null")


class Watcher:
    """One blocking query on its own connection, read with a minimal HTTP/1.1 client."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.index: int | None = None
        self.instances: list[str] = []

    async def open(self, host: str, port: int, index: int) -> asyncio.Task[None]:
        """Connect and send the blocking query; the task returned reads the answer."""
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET /v1/health/service/{self.service}?index={index}&wait=120s HTTP/1.1\r\n"
                     f"Host: {host}\r\n\r\n".encode())
        await writer.drain()
        return asyncio.create_task(self._read(reader, writer))

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line)
            body = await reader.readexactly(int(headers["Content-Length"]))
            self.index = int(headers["X-Consul-Index"])
            self.instances = [entry["Service"]["ID"] for entry in json.loads(body)]
        finally:
            writer.close()


@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 12_000, reason="needs 12,000 open files")
async def test_a_change_wakes_only_the_watchers_of_its_service(agent: AgentProcess) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    registered = put(agent, "/v1/spina/services/register", [
        {"service": f"w{number:04d}", "instance_id": f"w{number:04d}-a", "address": "10.9.0.1", "port": 80,
         "ttl": "1h"} for number in range(SERVICES)])
    index = int(registered["index"])  # type: ignore[call-overload]
    host, port = agent.http.rsplit(":", 1)
    watchers = [Watcher(f"w{number:04d}") for number in range(SERVICES) for _ in range(WATCHERS_PER_SERVICE)]
    tasks: list[asyncio.Task[None]] = []
    try:
        # Open in waves so the listen backlog is never the bottleneck.
        for start in range(0, len(watchers), 500):
            tasks += await asyncio.wait_for(asyncio.gather(
                *(watcher.open(host, int(port), index) for watcher in watchers[start:start + 500])), 60)
        assert all(not task.done() for task in tasks), "a watcher returned before any change"

        changed = "w0421"
        await asyncio.to_thread(put, agent, "/v1/spina/services/register",
                                {"service": changed, "instance_id": f"{changed}-b", "address": "10.9.0.2",
                                 "port": 80, "ttl": "1h"})
        woken = [task for task, watcher in zip(tasks, watchers, strict=True) if watcher.service == changed]
        await asyncio.wait_for(asyncio.gather(*woken), 30)
        for watcher in watchers:
            if watcher.service == changed:
                assert watcher.index is not None and watcher.index > index
                assert watcher.instances == [f"{changed}-a", f"{changed}-b"]
        # Give the others every chance to (wrongly) return: a request on the same agent round-trips first.
        await asyncio.to_thread(urllib.request.urlopen, agent.base_url + "/v1/status/leader", None, 30)
        still_waiting = [task for task, watcher in zip(tasks, watchers, strict=True) if watcher.service != changed]
        assert len(still_waiting) == (SERVICES - 1) * WATCHERS_PER_SERVICE
        assert not any(task.done() for task in still_waiting)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 12_000, reason="needs 12,000 open files")
async def test_ten_thousand_idle_connections_do_not_stop_the_agent_serving() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # An agent of its own: the watchers test's 10,000 connections may still be closing on the shared one.
    agent = await asyncio.to_thread(start_agent, "--dev", "--log-level", "warning")
    host, port = agent.http.rsplit(":", 1)
    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(20):
            opened = await asyncio.wait_for(asyncio.gather(
                *(asyncio.open_connection(host, int(port)) for _ in range(500))), 60)
            writers += [writer for _, writer in opened]
        # Connected, never a byte sent: the agent must still answer everyone else, on both front ends.
        for path in ("/v1/status/leader", "/v1/catalog/services", "/v1/agent/self"):
            answer = await asyncio.to_thread(urllib.request.urlopen, agent.base_url + path, None, 30)
            assert answer.status == 200
        # A half-closed idle connection is closed by the agent, not kept forever.
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 30) == b""
        writer.close()
    finally:
        for writer in writers:
            writer.close()
        agent.kill()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
