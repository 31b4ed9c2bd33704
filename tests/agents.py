"""Run real `spina agent` processes for tests: ports chosen by the OS, read back from the ready line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import consul

from spina_fast.testing import free_ports

READY = re.compile(r"^spina agent ready http=(\S+) dns=(\S+) raft=(\S+) leader=(\S*)$")


@dataclass
class AgentProcess:
    process: subprocess.Popen[str]
    http: str
    dns: str
    raft: str
    leader: str
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://{self.http}"

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def start_agent(*args: str, timeout: float = 30.0, cwd: Path | None = None) -> AgentProcess:
    """Start `python -m spina_fast agent ARGS` and wait for its ready line (or its early exit)."""
    # Every listener on a free port unless ARGS say otherwise (argparse: the last flag wins).
    command = [sys.executable, "-m", "spina_fast", "agent", "--http-addr", "127.0.0.1:0", "--raft-addr",
               "127.0.0.1:0", "--dns-addr", "127.0.0.1:0", *args]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    stderr_lines: list[str] = []

    def drain_stderr() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            stderr_lines.append(line)

    threading.Thread(target=drain_stderr, daemon=True).start()
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    # readline blocks; a watchdog kills the process if the ready line does not come in time.
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    try:
        for line in process.stdout:
            match = READY.match(line.strip())
            if match:
                threading.Thread(target=process.stdout.read, daemon=True).start()
                return AgentProcess(process, *match.groups(), stderr_lines=stderr_lines)
    finally:
        watchdog.cancel()
    process.wait(max(0.0, deadline - time.monotonic()) + 5)
    raise RuntimeError(
        f"agent exited with {process.returncode} before it was ready:\n{''.join(stderr_lines)[-4000:]}"
    )


@dataclass
class Cluster:
    """Real agent processes forming one Raft cluster on loopback."""

    ids: list[str]
    raft_ports: dict[str, int]
    data_dirs: dict[str, Path]
    extra_args: tuple[str, ...] = ()
    agents: dict[str, AgentProcess] = field(default_factory=dict)

    def args_for(self, node_id: str) -> list[str]:
        peers = ",".join(f"{other}=127.0.0.1:{self.raft_ports[other]}" for other in self.ids if other != node_id)
        return ["--node-id", node_id, "--data-dir", str(self.data_dirs[node_id]),
                "--raft-addr", f"127.0.0.1:{self.raft_ports[node_id]}", "--dns-addr", "127.0.0.1:0",
                "--peers", peers, *self.extra_args]

    def start(self, node_id: str) -> AgentProcess:
        self.agents[node_id] = start_agent(*self.args_for(node_id))
        return self.agents[node_id]

    def start_all(self) -> None:
        for node_id in self.ids:
            self.start(node_id)

    def stop_all(self) -> None:
        for agent in self.agents.values():
            agent.kill()

    def running(self) -> dict[str, AgentProcess]:
        return {node_id: agent for node_id, agent in self.agents.items() if agent.process.poll() is None}


def make_cluster(size: int, base_dir: Path, *extra_args: str) -> Cluster:
    ids = [f"n{i + 1}" for i in range(size)]
    ports = free_ports(size)
    return Cluster(ids, dict(zip(ids, ports, strict=True)), {node_id: base_dir / node_id for node_id in ids},
                   tuple(extra_args))


@contextmanager
def started_cluster(size: int, base_dir: Path, *extra_args: str) -> Iterator[Cluster]:
    """A running cluster with a leader; every process is killed on the way out."""
    cluster = make_cluster(size, base_dir, *extra_args)
    cluster.start_all()
    try:
        wait_until(lambda: leader_of(cluster), 20, "a leader")
        yield cluster
    finally:
        cluster.stop_all()


# --- talking to agents ----------------------------------------------------------------------------------------

def call(agent: AgentProcess, method: str, path: str, body: bytes | None = None,
         timeout: float = 10) -> tuple[int, bytes]:
    request = urllib.request.Request(agent.base_url + path, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(condition: Callable[[], Any], timeout: float, what: str,
               describe: Callable[[], str] | None = None) -> Any:
    """Poll ``condition`` (an OSError counts as not yet) until it is truthy; its value, or AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except OSError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"\n{describe()}" if describe is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(0.05)


def leader_of(cluster: Cluster) -> str | None:
    """The node id every running node agrees is the leader, if they agree."""
    answers = set()
    for agent in cluster.running().values():
        status, body = call(agent, "GET", "/v1/status/leader", timeout=2)
        answers.add(json.loads(body) if status == 200 else "")
    if len(answers) != 1 or "" in answers:
        return None
    address = answers.pop()
    port = int(address.rsplit(":", 1)[1])
    # Nodes added later (a join) are known by the Raft address their ready line reported.
    ports = {**cluster.raft_ports,
             **{node_id: int(agent.raft.rsplit(":", 1)[1]) for node_id, agent in cluster.running().items()}}
    leader = next((node_id for node_id, raft_port in ports.items() if raft_port == port), None)
    # Right after a kill the survivors still name the dead leader until their election timeout.
    return leader if leader in cluster.running() else None


def put(agent: AgentProcess, key: str, value: bytes, query: str = "") -> bytes:
    status, body = call(agent, "PUT", f"/v1/kv/{key}{query}", value)
    assert status == 200, body
    return body


def consistent_get(agent: AgentProcess, key: str) -> bytes | None:
    status, body = call(agent, "GET", f"/v1/kv/{key}?raw&consistent")
    assert status in (200, 404), body
    return body if status == 200 else None


def call_json(agent: AgentProcess, method: str, path: str, body: object = None,
              timeout: float = 30) -> tuple[int, dict[str, str], Any]:
    """A request with a JSON (or raw bytes) body; the answer as (status, headers, decoded JSON or None)."""
    return request_json(method, agent.base_url + path, body, timeout)


def request_json(method: str, url: str, body: object = None, timeout: float = 30) -> tuple[int, dict[str, str], Any]:
    """``call_json`` for any URL (Prometheus's API, a peer...)."""
    data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
            return response.status, dict(response.headers), json.loads(payload) if payload else None
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        return exc.code, dict(exc.headers), json.loads(payload) if payload else None


def consul_client(agent: AgentProcess) -> consul.Consul:
    host, port = agent.http.rsplit(":", 1)
    return consul.Consul(host=host, port=int(port))
