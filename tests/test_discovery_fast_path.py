"""The fast lane of the HTTP front end (``FastLane`` in ``_http.pyx``): repeated registry lookups and KV reads
answered from fully encoded responses, checked against the index they were read at and the read headers of the
moment.

In process (an agent in the test's event loop, a transport that records writes): what the lane answers is what
the general path answers, changes are seen by the very next request, pipelines keep their order, metrics count
everything. On the wire (a ``spina agent`` process): the same with raw sockets and py-consul."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import urllib.request
from collections.abc import AsyncIterator, Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import consul
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import MultiDict
from prometheus_client.parser import text_string_to_metric_families

from spina_fast._http import FastLane, encode_response, parse_head
from spina_fast.agent import Agent
from spina_fast.api import kv as kv_api
from spina_fast.api import registry as registry_api
from spina_fast.api.fast_http import FastHTTPProtocol
from spina_fast.config import AgentConfig, parse_host_port
from spina_fast.errors import MalformedRequest
from spina_fast.observability.metrics import LATENCY_BUCKETS, AgentMetrics
from spina_fast.registry import encode_deregister, encode_register
from spina_fast.state import encode_registry_batch
from tests.agents import AgentProcess, start_agent

SEED = 20261127
HEALTH_ROUTE = registry_api.ROUTES[registry_api.HEALTH]


def get(target: str, headers: str = "", version: str = "HTTP/1.1") -> bytes:
    return f"GET {target} {version}\r\nHost: spina\r\n{headers}\r\n".encode()


def split_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """(status, headers with lowercase names, body) of every response in ``data``, in order."""
    responses = []
    while data:
        head, data = data.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
        length = int(headers.get("content-length", "0"))
        responses.append((int(status_line.split()[1]), headers, data[:length]))
        data = data[length:]
    return responses


def without_date(response: bytes) -> bytes:
    head, body = response.split(b"\r\n\r\n", 1)
    return b"\r\n".join(line for line in head.split(b"\r\n") if not line.startswith(b"Date: ")) + b"\r\n\r\n" + body


# --- the lane on its own ---------------------------------------------------------------------------------------

class StubCore:
    def __init__(self, role: str, leader_id: str | None) -> None:
        self.role = role
        self.leader_id = leader_id


class StubNode:
    """What the lane reads of a Raft node: its core's role and leader, and the age of the leader's contact."""

    def __init__(self, role: str = "leader", leader_id: str | None = "n1", contact_ms: int = 0) -> None:
        self.core = StubCore(role, leader_id)
        self.contact_ms = contact_ms

    def last_contact_ms(self) -> int:
        return self.contact_ms


class StubRegistry:
    def __init__(self) -> None:
        self.index = 7
        self.indexes: dict[str, int] = {}

    def service_index(self, service: str) -> int:
        return self.indexes.get(service, 0)


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def pause_reading(self) -> None:
        """Reading is never paused by these tests' peers."""

    def resume_reading(self) -> None:
        """See pause_reading."""

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Half-closing is what the protocol decides; nothing to record."""

    def close(self) -> None:
        """The tests read what was written, not whether the connection closed."""

    def abort(self) -> None:
        """See close."""


def _stub_lane(node: StubNode | None = None) -> tuple[FastLane, StubRegistry, RecordingTransport]:
    lane = FastLane(LATENCY_BUCKETS)
    store = StubRegistry()
    store.indexes["web"] = 5
    lane.remember(b"/v1/health/service/web?passing", store, "web", 5, "5", registry_api.HEALTH, b'[{"a":1}]',
                  "application/json", node or StubNode())
    return lane, store, RecordingTransport()


def test_lane_response_is_what_encode_response_writes() -> None:
    for node, known, contact in ((StubNode(), "true", "0"), (StubNode("follower", "n2", 1234), "true", "1234"),
                                 (StubNode("candidate", None, -1), "false", "0")):
        lane, _, transport = _stub_lane(node)
        request = get("/v1/health/service/web?passing")
        assert lane.serve(request, transport) == len(request)
        headers = {"X-Consul-KnownLeader": known, "X-Consul-LastContact": contact, "X-Consul-Index": "5"}
        expected = encode_response(200, b'[{"a":1}]', "application/json", headers, lane.date(), True, True)
        assert without_date(transport.writes[0]) == without_date(expected)


def test_lane_date_is_the_imf_fixdate_of_now() -> None:
    lane = FastLane()
    # Retry around a second boundary: the lane reads time(), whose coarse clock may turn a few ms after time.time().
    for _ in range(50):
        before = formatdate(usegmt=True).encode()
        ours = lane.date()
        if formatdate(usegmt=True).encode() == before == ours:
            break
    assert ours == before


def test_lane_follows_a_followers_last_contact_and_a_lost_leader() -> None:
    node = StubNode("follower", "n2", 10)
    lane, _, transport = _stub_lane(node)
    request = get("/v1/health/service/web?passing")
    lane.serve(request, transport)
    node.contact_ms = 250
    lane.serve(request, transport)
    node.core.leader_id = None
    lane.serve(request, transport)
    seen = [(headers["x-consul-knownleader"], headers["x-consul-lastcontact"])
            for _, headers, _ in split_responses(b"".join(transport.writes))]
    assert seen == [("true", "10"), ("true", "250"), ("false", "250")]


def test_lane_drops_an_answer_once_its_service_index_moves() -> None:
    lane, store, transport = _stub_lane()
    request = get("/v1/health/service/web?passing")
    assert lane.serve(request, transport) == len(request)
    store.indexes["web"] = 6
    assert lane.serve(request, transport) == 0 and len(lane) == 0
    assert len(transport.writes) == 1


def test_lane_checks_a_whole_store_answer_against_the_stores_index() -> None:
    lane, store, transport = _stub_lane()
    lane.remember(b"/v1/catalog/services", store, None, 7, "7", registry_api.CATALOG_SERVICES, b"{}",
                  "application/json", StubNode())
    request = get("/v1/catalog/services")
    assert lane.serve(request, transport) == len(request)
    store.index = 8
    assert lane.serve(request, transport) == 0 and len(lane) == 1


def test_lane_stays_within_its_answer_and_byte_limits() -> None:
    store, node = StubRegistry(), StubNode()
    lane = FastLane(limit=4, byte_limit=4000)
    for number in range(10):
        lane.remember(f"/v1/health/service/s{number}".encode(), store, f"s{number}", 0, "1", 0, b"x" * 100,
                      "application/json", node)
        assert len(lane) <= 4
    transport = RecordingTransport()
    assert lane.serve(get("/v1/health/service/s9"), transport) > 0  # the newest answers stay
    lane.remember(b"/big", store, "big", 0, "1", 0, b"x" * 1001, "application/json", node)
    assert lane.serve(get("/big"), transport) == 0  # over a quarter of the budget: never kept
    for number in range(10, 50):
        lane.remember(f"/v1/health/service/s{number}".encode(), store, f"s{number}", 0, "1", 0, b"x" * 900,
                      "application/json", node)
        assert len(lane) * 900 <= 4000


def test_lane_answers_the_known_lookups_at_the_start_of_a_chunk_with_one_write() -> None:
    lane, _, transport = _stub_lane()
    known = get("/v1/health/service/web?passing")
    unknown = get("/v1/health/service/other")
    assert lane.serve(known * 3 + unknown + known, transport) == 3 * len(known)
    assert len(transport.writes) == 1 and len(split_responses(transport.writes[0])) == 3


@pytest.mark.parametrize("request_bytes", [
    get("/v1/health/service/web?passing", version="HTTP/1.0"),
    get("/v1/health/service/web?passing", "Connection: close\r\n"),
    get("/v1/health/service/web?passing", "Connection: keep-alive, Close\r\n"),
    get("/v1/health/service/web?passing", "X-Spina-Author: me\r\n"),
    get("/v1/health/service/web?passing", "Content-Length: 3\r\n") + b"abc",
    get("/v1/health/service/web?passing", "Transfer-Encoding: chunked\r\n") + b"0\r\n\r\n",
    get("/v1/health/service/web?passing", "Expect: 100-continue\r\n"),
    get("/v1/health/service/web?passing", "Upgrade: websocket\r\n"),
    get("/v1/health/service/web?passing", "Bad Header: x\r\n"),
    get("/v1/health/service/web?passing", "X-Ctl: a\x01b\r\n"),
    get("/v1/health/service/web?passing", "NoColon\r\n"),
    b"GET /v1/health/service/web?passing HTTP/1.1\nHost: spina\n\n",
    b"GET  /v1/health/service/web?passing HTTP/1.1\r\n\r\n",
    b"HEAD /v1/health/service/web?passing HTTP/1.1\r\n\r\n",
    b"GET /v1/health/service/web?passing#frag HTTP/1.1\r\n\r\n",
    get("/v1/health/service/web?passing")[:-1],  # incomplete head
])
def test_lane_leaves_what_it_does_not_vouch_for(request_bytes: bytes) -> None:
    lane, _, transport = _stub_lane()
    assert lane.serve(request_bytes, transport) == 0 and not transport.writes


@pytest.mark.parametrize("headers", ["Connection: keep-alive\r\n", "Content-Length: 0\r\n", "Content-Length:  00 \r\n",
                                     "Accept: */*\r\nUser-Agent: x\ty\r\n", ""])
def test_lane_answers_plain_heads_with_harmless_headers(headers: str) -> None:
    lane, _, transport = _stub_lane()
    request = get("/v1/health/service/web?passing", headers)
    assert lane.serve(request, transport) == len(request)


_HEADER_LINES = st.sampled_from([
    "Host: spina", "Accept: */*", "Connection: keep-alive", "Connection: close", "Connection: upgrade, close",
    "Content-Length: 0", "Content-Length: 1", "Content-Length: 0, 0", "Transfer-Encoding: chunked", "X-Spina-A: b",
    "Expect: 100-continue", "Upgrade: h2c", "Bad Name: x", "X: \x7f", ": empty", "X:", "X-Long: " + "v" * 9000,
    " Leading: space", "Tab:\tvalue\t"])


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(_HEADER_LINES, max_size=6), version=st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0"]),
       line_end=st.sampled_from(["\r\n", "\n"]))
def test_every_head_the_lane_answers_is_one_the_strict_parser_reads_alike(lines: list[str], version: str,
                                                                            line_end: str) -> None:
    lane, _, transport = _stub_lane()
    target = "/v1/health/service/web?passing"
    data = f"GET {target} {version}{line_end}{line_end.join([*lines, ''])}{line_end}".encode("latin-1")
    if not lane.serve(data, transport):
        return  # left to the general path, which is always allowed to be the slow way
    try:
        head = parse_head(data)
    except MalformedRequest as exc:
        raise AssertionError(f"the lane answered {data!r}, which the strict parser refuses: {exc}") from None
    assert head is not None and head.end == len(data)
    assert (head.method, f"{head.path}?{head.query}") == ("GET", target)
    assert head.http11 and head.keep_alive and not head.delegate and head.content_length == 0


def test_lane_metrics_are_merged_into_the_scrape() -> None:
    metrics = AgentMetrics()
    metrics.observe_http("GET", HEALTH_ROUTE, 200, 0.002)
    buckets = [0] * (len(LATENCY_BUCKETS) + 1)
    buckets[0] = 4
    metrics.http.add_source(lambda: [("GET", HEALTH_ROUTE, 200, 4, buckets, 0.0001)])
    families = {family.name: family for family in text_string_to_metric_families(metrics.render().decode())}
    counts = {(s.labels["route"], s.labels["status"]): s.value for s in families["spina_http_requests"].samples
              if s.name == "spina_http_requests_total"}
    assert counts[(HEALTH_ROUTE, "200")] == 5
    histogram = {s.labels.get("le"): s.value for s in families["spina_http_request_duration_seconds"].samples
                 if s.name.endswith("_bucket")}
    assert histogram["5e-05"] == 4 and histogram["+Inf"] == 5


# --- the lane in the agent, in process ------------------------------------------------------------------------------

@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    config = AgentConfig(node_id="lane", data_dir=tmp_path, http_addr=parse_host_port("127.0.0.1:0", what="http"),
                         dns_addr=parse_host_port("127.0.0.1:0", what="dns"),
                         raft_addr=parse_host_port("127.0.0.1:0", what="raft"), dev=True, fsync=False)
    agent = Agent(config)
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop()


async def _register(agent: Agent, *instances: tuple[str, str], status: str = "passing") -> None:
    await agent.node.propose(encode_registry_batch([
        encode_register(service, instance_id, f"10.0.0.{number + 1}", 8080, tags=("http",), status=status)
        for number, (service, instance_id) in enumerate(instances)]))


def _connect(agent: Agent) -> tuple[FastHTTPProtocol, RecordingTransport]:
    server = agent._http
    assert server is not None
    protocol = FastHTTPProtocol(server)
    transport = RecordingTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport


def _ids(body: bytes) -> list[str]:
    return [entry["Service"]["ID"] for entry in json.loads(body)]


def _lane_requests(agent: Agent) -> int:
    assert agent._http is not None
    return sum(count for _, count, _, _ in agent._http.lane.metrics())


async def test_lane_answers_repeats_with_the_general_paths_bytes(agent: Agent) -> None:
    await _register(agent, ("web", "web-1"), ("web", "web-2"))
    protocol, transport = _connect(agent)
    for target in ("/v1/health/service/web?passing", "/v1/health/service/web", "/v1/catalog/service/web?tag=http",
                   "/v1/catalog/services", "/v1/agent/services", "/v1/health/service/nobody"):
        protocol.data_received(get(target))
        served_before = _lane_requests(agent)
        protocol.data_received(get(target))
        assert _lane_requests(agent) == served_before + 1, target
        first, repeat = transport.writes[-2:]
        assert without_date(first) == without_date(repeat), target
    protocol.connection_lost(None)


async def test_kv_reads_are_replayed_until_the_kv_changes(agent: Agent) -> None:
    protocol, transport = _connect(agent)
    protocol.data_received(b"PUT /v1/kv/lane/a HTTP/1.1\r\nContent-Length: 3\r\n\r\none")
    deadline = asyncio.get_running_loop().time() + 10
    while not transport.writes:
        assert asyncio.get_running_loop().time() < deadline, "the PUT was not answered"
        await asyncio.sleep(0.01)
    for target in ("/v1/kv/lane/a?raw", "/v1/kv/lane/a", "/v1/kv/lane?keys", "/v1/kv/lane?recurse"):
        protocol.data_received(get(target))
        served_before = _lane_requests(agent)
        protocol.data_received(get(target))
        assert _lane_requests(agent) == served_before + 1, target
        assert without_date(transport.writes[-2]) == without_date(transport.writes[-1]), target
    await kv_api.put(agent, "lane/a", MultiDict(), b"two")
    protocol.data_received(get("/v1/kv/lane/a?raw"))
    assert split_responses(transport.writes[-1])[0][2] == b"two"
    await kv_api.delete(agent, "lane/a", MultiDict())
    protocol.data_received(get("/v1/kv/lane/a?raw"))
    assert split_responses(transport.writes[-1])[0][0] == 404
    protocol.connection_lost(None)


async def test_native_lookups_are_never_replayed(agent: Agent) -> None:
    await _register(agent, ("web", "web-1"))
    protocol, transport = _connect(agent)
    for _ in range(3):
        protocol.data_received(get("/v1/spina/services/web"))
    assert _lane_requests(agent) == 0 and len(transport.writes) == 3
    protocol.connection_lost(None)


async def test_a_registry_change_is_visible_on_the_very_next_request(agent: Agent) -> None:
    await _register(agent, ("web", "web-1"))
    protocol, transport = _connect(agent)
    health, services = get("/v1/health/service/web?passing"), get("/v1/catalog/services")
    protocol.data_received(health + health + services + services)
    assert [_ids(body) for _, _, body in split_responses(b"".join(transport.writes))[:2]] == [["web-1"]] * 2
    await _register(agent, ("web", "web-2"))
    protocol.data_received(health)
    assert _ids(split_responses(transport.writes[-1])[0][2]) == ["web-1", "web-2"]
    await agent.node.propose(encode_registry_batch([encode_register("web", "web-1", "10.0.0.1", 8080,
                                                                    status="critical")]))
    protocol.data_received(health)
    assert _ids(split_responses(transport.writes[-1])[0][2]) == ["web-2"]
    await agent.node.propose(encode_registry_batch([encode_deregister("web", "web-2")]))
    protocol.data_received(health)
    assert _ids(split_responses(transport.writes[-1])[0][2]) == []
    await _register(agent, ("api", "api-1"))
    protocol.data_received(services)
    assert "api" in json.loads(split_responses(transport.writes[-1])[0][2])
    protocol.connection_lost(None)


async def test_two_pipelined_lookups_in_one_packet_get_one_write(agent: Agent) -> None:
    await _register(agent, ("web", "web-1"), ("api", "api-1"))
    protocol, transport = _connect(agent)
    web, api = get("/v1/health/service/web"), get("/v1/health/service/api")
    protocol.data_received(web)
    protocol.data_received(api)
    served_before, writes_before = _lane_requests(agent), len(transport.writes)
    protocol.data_received(web + api)
    assert _lane_requests(agent) == served_before + 2 and len(transport.writes) == writes_before + 1
    assert [_ids(body) for _, _, body in split_responses(transport.writes[-1])] == [["web-1"], ["api-1"]]
    protocol.connection_lost(None)


async def test_lookups_around_requests_the_lane_leaves_keep_their_order(agent: Agent) -> None:
    await _register(agent, ("web", "web-1"), ("api", "api-1"))
    protocol, transport = _connect(agent)
    web, api = get("/v1/health/service/web"), get("/v1/health/service/api")
    protocol.data_received(web + api)
    transport.writes.clear()
    protocol.data_received(web + get("/v1/status/leader") + api + get("/v1/kv/missing") + web)
    answers = split_responses(b"".join(transport.writes))
    assert [status for status, _, _ in answers] == [200, 200, 200, 404, 200]
    assert _ids(answers[0][2]) == ["web-1"] and _ids(answers[2][2]) == ["api-1"] and _ids(answers[4][2]) == ["web-1"]
    assert json.loads(answers[1][2]) == agent.leader_address()
    protocol.connection_lost(None)


async def test_a_lookup_behind_a_blocking_query_waits_its_turn(agent: Agent) -> None:
    await _register(agent, ("web", "web-1"), ("api", "api-1"))
    protocol, transport = _connect(agent)
    api = get("/v1/health/service/api")
    protocol.data_received(api)
    transport.writes.clear()
    index = agent.state.registry.service_index("web")
    protocol.data_received(get(f"/v1/health/service/web?index={index}&wait=30s") + api)
    await asyncio.sleep(0)  # the blocking query's task starts waiting
    assert not transport.writes
    await _register(agent, ("web", "web-2"))
    deadline = asyncio.get_running_loop().time() + 10
    while len(split_responses(b"".join(transport.writes))) < 2:
        assert asyncio.get_running_loop().time() < deadline, "the blocking query was not answered"
        await asyncio.sleep(0.01)
    answers = split_responses(b"".join(transport.writes))
    assert [_ids(body) for _, _, body in answers] == [["web-1", "web-2"], ["api-1"]]
    protocol.connection_lost(None)


async def test_metrics_count_every_lookup_the_lane_or_the_general_path_answers(agent: Agent) -> None:
    await _register(agent, *((f"svc-{number}", f"svc-{number}-0") for number in range(5)))
    protocol, transport = _connect(agent)
    rng = random.Random(SEED)
    lookups = [get(f"/v1/health/service/svc-{rng.randrange(5)}") for _ in range(200)]
    sent = 0
    while sent < len(lookups):
        batch = rng.randint(1, 5)
        protocol.data_received(b"".join(lookups[sent:sent + batch]))
        sent += batch
    assert len(split_responses(b"".join(transport.writes))) == len(lookups), f"seed {SEED}"
    # The first lookup of each service is the general path's, and so is the rest of a packet from there on.
    assert 0 < _lane_requests(agent) <= len(lookups) - 5, f"seed {SEED}"
    families = {family.name: family for family in text_string_to_metric_families(agent.metrics.render().decode())}
    counts = {(s.labels["method"], s.labels["route"], s.labels["status"]): s.value
              for s in families["spina_http_requests"].samples if s.name == "spina_http_requests_total"}
    assert counts[("GET", HEALTH_ROUTE, "200")] == len(lookups)
    durations = {s.labels["route"]: s.value for s in families["spina_http_request_duration_seconds"].samples
                 if s.name.endswith("_count")}
    assert durations[HEALTH_ROUTE] == len(lookups)
    protocol.connection_lost(None)


async def test_a_connection_with_a_half_read_request_is_not_the_lanes(agent: Agent) -> None:
    await _register(agent, ("web", "web-1"))
    protocol, transport = _connect(agent)
    web = get("/v1/health/service/web")
    protocol.data_received(web)
    put = b"PUT /v1/kv/k HTTP/1.1\r\nContent-Length: 4\r\n\r\n"
    # The next chunk is the PUT's body, not a request: even bytes that look like a lookup must not be answered.
    protocol.data_received(put)
    protocol.data_received(b"GET ")
    protocol.data_received(web)
    deadline = asyncio.get_running_loop().time() + 10
    while len(split_responses(b"".join(transport.writes))) < 3:
        assert asyncio.get_running_loop().time() < deadline, "the PUT was not answered"
        await asyncio.sleep(0.01)
    answers = split_responses(b"".join(transport.writes))
    assert [status for status, _, _ in answers] == [200, 200, 200] and answers[1][2] == b"true"
    assert _ids(answers[2][2]) == ["web-1"]
    entry = agent.state.kv.get("k")
    assert entry is not None and entry.value == b"GET "
    protocol.connection_lost(None)


# --- on the wire ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def agent_process() -> Iterator[AgentProcess]:
    process = start_agent("--dev")
    yield process
    process.kill()
    assert not [line for line in process.stderr_lines if "Traceback" in line or "ERROR" in line]


def _native_register(agent: AgentProcess, items: list[dict[str, Any]]) -> None:
    request = urllib.request.Request(f"{agent.base_url}/v1/spina/services/register", method="PUT",
                                     data=json.dumps(items).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200


class Wire:
    def __init__(self, agent: AgentProcess) -> None:
        host, port = agent.http.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.pending = b""

    def exchange(self, data: bytes, responses: int) -> list[tuple[int, dict[str, str], bytes]]:
        self.sock.sendall(data)
        while True:
            try:
                answers = split_responses(self.pending)
            except ValueError:
                answers = []
            if len(answers) >= responses and all(len(body) == int(headers.get("content-length", 0))
                                                 for _, headers, body in answers):
                self.pending = b""
                return answers
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed after {self.pending!r}")
            self.pending += chunk

    def close(self) -> None:
        self.sock.close()


def test_on_the_wire_changes_show_at_once_and_pipelines_keep_order(agent_process: AgentProcess) -> None:
    _native_register(agent_process, [{"service": "wire", "instance_id": "wire-1", "address": "10.9.0.1",
                                      "port": 80}])
    wire = Wire(agent_process)
    lookup = get("/v1/health/service/wire?passing")
    assert [_ids(body) for _, _, body in wire.exchange(lookup + lookup, 2)] == [["wire-1"], ["wire-1"]]
    _native_register(agent_process, [{"service": "wire", "instance_id": "wire-2", "address": "10.9.0.2",
                                      "port": 80}])
    answers = wire.exchange(lookup + get("/v1/kv/wire-missing") + lookup, 3)
    assert [status for status, _, _ in answers] == [200, 404, 200]
    assert _ids(answers[0][2]) == _ids(answers[2][2]) == ["wire-1", "wire-2"]
    # A malformed head behind a remembered target is refused as before, never answered from the lane.
    answers = wire.exchange(get("/v1/health/service/wire?passing", "Bad Header: x\r\n"), 1)
    assert answers[0][0] == 400
    wire.close()


def test_py_consul_sees_a_registration_on_its_next_lookup(agent_process: AgentProcess) -> None:
    host, port = agent_process.http.rsplit(":", 1)
    client = consul.Consul(host=host, port=int(port))
    client.agent.service.register("pc", service_id="pc-1", address="10.7.0.1", port=81)
    for _ in range(3):
        index, entries = client.health.service("pc", passing=True)
        assert [entry["Service"]["ID"] for entry in entries] == ["pc-1"]
    client.agent.service.register("pc", service_id="pc-2", address="10.7.0.2", port=82)
    new_index, entries = client.health.service("pc", passing=True)
    assert [entry["Service"]["ID"] for entry in entries] == ["pc-1", "pc-2"] and int(new_index) > int(index)
