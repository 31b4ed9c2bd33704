"""KV writes on the fast front end: answered from the Raft future's done callback, without a task per request.

Checked against what a server answering one request at a time must say (pipelined writes answered in order, a
read pipelined behind writes sees them), against the aiohttp path's answers for the same requests, and with
py-consul's ``kv.put`` / ``kv.delete`` (a client nobody here wrote).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import consul
import pytest

from tests.agents import AgentProcess, Cluster, consistent_get, leader_of, started_cluster, wait_until
from tests.test_fast_http import Wire, request

SEED = 20261127
# Any X-Spina-* header hands the connection to aiohttp (fast_http.py): the reference answers come from there.
AIOHTTP = "X-Spina-Author: tests\r\n"


@pytest.fixture
def client(agent: AgentProcess) -> consul.Consul:
    host, port = agent.http.rsplit(":", 1)
    return consul.Consul(host=host, port=int(port))


def exchange(agent: AgentProcess, requests: list[bytes]) -> list[tuple[int, dict[str, str], bytes]]:
    """Send every request in one write on one connection; the answers in the order they came."""
    wire = Wire(agent, timeout=30)
    try:
        wire.send(b"".join(requests))
        return [wire.response()[:3] for _ in requests]
    finally:
        wire.close()


def test_pipelined_writes_and_reads_are_answered_in_request_order(agent: AgentProcess) -> None:
    answers = exchange(agent, [
        request("PUT", "/v1/kv/pipe/a?cas=0", b"1"),
        request("PUT", "/v1/kv/pipe/a?cas=0", b"2"),  # a create-only write of a key that exists now
        request("PUT", "/v1/kv/pipe/b?flags=42", b"x"),
        request("DELETE", "/v1/kv/pipe/a?cas=0"),  # stale: the key exists
        request("PUT", "/v1/kv/pipe/a", b"3"),
        request("GET", "/v1/kv/pipe/a?raw"),  # must see every write before it
        request("GET", "/v1/kv/pipe/b"),
        request("DELETE", "/v1/kv/pipe/a"),
        request("GET", "/v1/kv/pipe/a"),
    ])
    assert [(status, body) for status, _, body in answers[:6]] == [
        (200, b"true"), (200, b"false"), (200, b"true"), (200, b"false"), (200, b"true"), (200, b"3")]
    assert answers[6][0] == 200 and json.loads(answers[6][2])[0]["Flags"] == 42
    assert answers[7][:1] == (200,) and answers[7][2] == b"true"
    assert answers[8][0] == 404


def test_many_pipelined_puts_all_commit_in_order(agent: AgentProcess) -> None:
    rng = random.Random(SEED)
    values = [rng.randbytes(rng.randrange(1, 300)) for _ in range(200)]
    # The same key written 200 times, then read: the last value wins only if the log kept the sending order.
    answers = exchange(agent, [request("PUT", "/v1/kv/order/same", value) for value in values]
                       + [request("GET", "/v1/kv/order/same?raw")])
    assert [body for _, _, body in answers[:-1]] == [b"true"] * len(values)
    assert answers[-1][0] == 200 and answers[-1][2] == values[-1]


@pytest.mark.parametrize(("name", "method", "path", "body"), [
    ("create-only", "PUT", "/v1/kv/same/{key}?cas=0", b"v"),
    ("stale-cas", "PUT", "/v1/kv/same/{key}?cas=1", b"v"),
    ("flags", "PUT", "/v1/kv/same/{key}?flags=7", b"v"),
    ("bad-flags", "PUT", "/v1/kv/same/{key}?flags=abc", b"v"),
    ("bad-cas", "PUT", "/v1/kv/same/{key}?cas=-1", b"v"),
    ("acquire", "PUT", "/v1/kv/same/{key}?acquire=abc", b"v"),
    ("oversize", "PUT", "/v1/kv/same/{key}", b"x" * (512 * 1024 + 1)),
    ("delete", "DELETE", "/v1/kv/same/{key}", b""),
    ("delete-stale-cas", "DELETE", "/v1/kv/same/{key}?cas=1", b""),
    ("delete-tree", "DELETE", "/v1/kv/same/{key}?recurse", b""),
])
def test_write_answers_equal_the_aiohttp_paths(agent: AgentProcess, name: str, method: str, path: str,
                                               body: bytes) -> None:
    answers = []
    for route, headers in (("fast", ""), ("aiohttp", AIOHTTP)):
        key = f"{name}-{route}"
        # The same state before each: the key exists, written once.
        assert exchange(agent, [request("PUT", f"/v1/kv/same/{key}", b"before")])[0][2] == b"true"
        status, response_headers, answer = exchange(agent, [request(method, path.format(key=key), body,
                                                                    headers)])[0]
        stored = exchange(agent, [request("GET", f"/v1/kv/same/{key}")])[0]
        document = json.loads(stored[2])[0] if stored[0] == 200 else None
        state = (document["Value"], document["Flags"]) if document else None
        answers.append((status, response_headers.get("content-type", "").split(";")[0], json.loads(answer), state))
    assert answers[0] == answers[1]


def test_oversize_put_is_413_and_the_connection_keeps_serving(agent: AgentProcess) -> None:
    answers = exchange(agent, [request("PUT", "/v1/kv/big/one", b"x" * (512 * 1024 + 1)),
                               request("PUT", "/v1/kv/big/two", b"small"),
                               request("GET", "/v1/kv/big/one")])
    assert answers[0][0] == 413 and json.loads(answers[0][2])["code"] == "too_large"
    assert answers[1][:1] == (200,) and answers[1][2] == b"true"
    assert answers[2][0] == 404


def test_malformed_put_is_400_and_closed(agent: AgentProcess) -> None:
    wire = Wire(agent)
    try:
        wire.send(b"PUT /v1/kv/bad HTTP/1.1\r\nHost: spina\r\nContent-Length: 12x\r\n\r\nvalue")
        status, _, body, _ = wire.response()
        assert status == 400 and json.loads(body)["code"] == "invalid_request"
        assert wire.closed_by_peer()
    finally:
        wire.close()


def test_py_consul_put_with_flags_and_cas(client: consul.Consul) -> None:
    assert client.kv.put("consul/key", "one", flags=5) is True
    _, entry = client.kv.get("consul/key")
    assert entry["Value"] == b"one" and entry["Flags"] == 5
    assert client.kv.put("consul/key", "two", cas=0) is False
    assert client.kv.put("consul/key", "two", cas=entry["ModifyIndex"] + 1000) is False
    assert client.kv.put("consul/key", "two", cas=entry["ModifyIndex"]) is True
    _, entry = client.kv.get("consul/key")
    assert entry["Value"] == b"two" and entry["Flags"] == 0
    assert client.kv.delete("consul/key", cas=entry["ModifyIndex"] - 1) is False
    assert client.kv.delete("consul/key", cas=entry["ModifyIndex"]) is True
    assert client.kv.get("consul/key")[1] is None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base: Path = tmp_path_factory.mktemp("write-fast-path")
    with started_cluster(3, base) as nodes:
        yield nodes


def test_pipelined_puts_to_a_follower_are_forwarded_and_answered_in_order(cluster: Cluster) -> None:
    leader = wait_until(lambda: leader_of(cluster), 20, "a leader")
    follower = next(agent for node_id, agent in cluster.agents.items() if node_id != leader)
    answers = exchange(follower, [request("PUT", "/v1/kv/fwd/a?cas=0", b"1"),
                                  request("PUT", "/v1/kv/fwd/a?cas=0", b"2"),
                                  *(request("PUT", f"/v1/kv/fwd/n{i}", str(i).encode()) for i in range(50)),
                                  request("PUT", "/v1/kv/fwd/a", b"last")])
    assert [body for _, _, body in answers] == [b"true", b"false", *[b"true"] * 50, b"true"]
    assert consistent_get(cluster.agents[leader], "fwd/a") == b"last"
    assert consistent_get(follower, "fwd/n49") == b"49"
