"""The fast HTTP front end: the wire protocol with raw sockets, behaviour with real clients (curl, aiohttp,
py-consul), and that the hot routes answer exactly what the aiohttp application answers."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
import consul
import pytest
from aiohttp.web_urldispatcher import _unquote_path_safe
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from spina_fast import _http
from spina_fast._http import encode_response, parse_head, parse_query
from spina_fast.api import fast_http, kv
from spina_fast.api.fast_http import MAX_PIPELINE, FastHTTPProtocol, FastHTTPServer
from spina_fast.api.http import ROUTE_STATUS_LEADER, ROUTE_STATUS_PEERS, build_app
from spina_fast.errors import MalformedRequest
from tests.agents import AgentProcess, start_agent

SEED = 20261127


@pytest.fixture(scope="module")
def agent() -> AgentProcess:
    process = start_agent("--dev")
    yield process
    process.kill()
    # Resets, garbage and half-closes are routine for a server: none may leave a traceback in the log.
    assert not [line for line in process.stderr_lines if "Traceback" in line or "ERROR" in line]


class Wire:
    """One raw TCP connection to the agent, with a reader that splits responses by Content-Length."""

    def __init__(self, agent: AgentProcess, timeout: float = 10.0) -> None:
        host, port = agent.http.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.pending = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.pending += chunk
        return bool(chunk)

    def response(self) -> tuple[int, dict[str, str], bytes, str]:
        """(status, headers with lowercase names, body, status line) of the next response."""
        while b"\r\n\r\n" not in self.pending:
            if not self._fill():
                raise ConnectionError(f"closed before a full response head; got {self.pending!r}")
        head, self.pending = self.pending.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
        length = int(headers.get("content-length", "0"))
        while len(self.pending) < length:
            if not self._fill():
                raise ConnectionError("closed inside a response body")
        body, self.pending = self.pending[:length], self.pending[length:]
        return int(status_line.split()[1]), headers, body, status_line

    def closed_by_peer(self) -> bool:
        """True once the agent closed the connection (nothing more comes)."""
        try:
            return not self.pending and not self._fill()
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def request(method: str, target: str, body: bytes = b"", headers: str = "") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body or method == "PUT" else ""
    return f"{method} {target} HTTP/1.1\r\nHost: spina\r\n{length}{headers}\r\n".encode() + body


def put(agent: AgentProcess, key: str, value: bytes) -> None:
    wire = Wire(agent)
    wire.send(request("PUT", f"/v1/kv/{key}", value))
    status, _, body, _ = wire.response()
    wire.close()
    assert status == 200 and body == b"true"


# --- the parser and encoder on their own ---------------------------------------------------------------

def test_http_extension_is_compiled() -> None:
    assert _http.__file__ is not None and _http.__file__.endswith(".so")


def test_parser_reads_method_path_query_and_framing() -> None:
    head = parse_head(b"\r\nPUT /v1/kv/a%2Fb%20c?flags=3&cas HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                      b"Expect: 100-continue\r\nConnection: keep-alive, Foo\r\n\r\nhello")
    assert head is not None and not head.delegate
    assert (head.method, head.path, head.query, head.content_length) == ("PUT", "/v1/kv/a/b c", "flags=3&cas", 5)
    assert head.http11 and head.keep_alive and head.expect_continue and head.escape_offset == 8
    assert head.end == len(b"\r\nPUT /v1/kv/a%2Fb%20c?flags=3&cas HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                           b"Expect: 100-continue\r\nConnection: keep-alive, Foo\r\n\r\n")


@pytest.mark.parametrize(("raw", "keep_alive"), [
    (b"GET / HTTP/1.1\r\n\r\n", True),
    (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", False),
    (b"GET / HTTP/1.0\r\n\r\n", False),
    (b"GET / HTTP/1.0\r\nconnection: Keep-Alive\r\n\r\n", True),
    (b"GET / HTTP/1.0\nConnection: keep-alive\n\n", True),
])
def test_parser_keep_alive_follows_version_and_connection_header(raw: bytes, keep_alive: bool) -> None:
    head = parse_head(raw)
    assert head is not None and head.keep_alive is keep_alive


def test_parser_waits_for_an_incomplete_head_at_every_split() -> None:
    raw = b"GET /v1/kv/key?raw HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n"
    for cut in range(len(raw)):
        assert parse_head(raw[:cut]) is None, cut
        assert parse_head(bytearray(b"xx" + raw[:cut]), 2) is None, cut
    assert parse_head(raw) is not None


@pytest.mark.parametrize(("raw", "status"), [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /x\r\n\r\n", 400),
    (b"GET  /x HTTP/1.1\r\n\r\n", 400),
    (b"GET /x HTTP/1.1 \r\n\r\n", 400),
    (b"GET /x HTTP/11\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
    (b"GET /caf\xc3\xa9 HTTP/1.1\r\n\r\n", 400),
    (b"GET /x HTTP/1.1\r\nNo Colon\r\n\r\n", 400),
    (b"GET /x HTTP/1.1\r\nName : value\r\n\r\n", 400),
    (b"GET /x HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", 400),
    (b"GET /x HTTP/1.1\r\nA: b\x00c\r\n\r\n", 400),
    (b"PUT /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"PUT /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"PUT /x HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET /" + b"a" * 9000, 414),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\n" + b"X-Many: a\r\n" * 129 + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\n" + b"X-Long: " + b"a" * 8000 + b"\r\n" + b"X-Also: " + b"b" * 8000 + b"\r\n" * 1, 431),
])
def test_parser_refuses_malformed_and_oversized_heads(raw: bytes, status: int) -> None:
    with pytest.raises(MalformedRequest) as caught:
        parse_head(raw, max_head=12000)
    assert caught.value.http_status == status and caught.value.code


@pytest.mark.parametrize("raw", [
    b"GET /x HTTP/2.0\r\n\r\n",
    b"GET http://host/x HTTP/1.1\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\n\r\n",
    b"GET /x#frag HTTP/1.1\r\n\r\n",
    b"GET /x%zz HTTP/1.1\r\n\r\n",
    b"GET /x%FF HTTP/1.1\r\n\r\n",
    b"GET /x%0A HTTP/1.1\r\n\r\n",
    b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET /x HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"PUT /x HTTP/1.1\r\nExpect: something-else\r\n\r\n",
    b"PUT /v1/kv/config/a HTTP/1.1\r\nX-Spina-Author: ana\r\n\r\n",
])
def test_parser_delegates_valid_http_outside_its_subset(raw: bytes) -> None:
    head = parse_head(raw)
    assert head is not None and head.delegate


_PATH_PIECES = st.sampled_from([*"ab/%+.-~_!$&()*,;=:@", "%2F", "%2f", "%25", "%C3%A9", "%FF", "%00", "%20", "%zz",
                                "%e2%82%ac", "%41", "%7F", "%0A", "%252F"])


@settings(max_examples=500, derandomize=True)
@given(st.lists(_PATH_PIECES, max_size=12))
def test_decoded_key_equals_aiohttps_match_info(pieces: list[str]) -> None:
    raw = "/v1/kv/" + "".join(pieces)
    head = parse_head(f"GET {raw} HTTP/1.1\r\n\r\n".encode())
    assert head is not None
    if head.delegate:
        return  # aiohttp decides, so equal by construction
    # aiohttp matches routes on path_safe and unquotes the matched value (web_urldispatcher).
    assert head.path[len("/v1/kv/"):] == _unquote_path_safe(URL.build(path=raw, encoded=True).path_safe[7:])


_QUERY_PIECES = st.sampled_from(["a", "b", "=", "&", "+", "%2F", "%zz", "%FF", "%C3%A9", "raw", "1", "", ";", "%26"])


@settings(max_examples=500, derandomize=True)
@given(st.lists(_QUERY_PIECES, max_size=10))
def test_parse_query_equals_aiohttps_first_values(pieces: list[str]) -> None:
    raw = "".join(pieces)
    query = URL.build(path="/", query_string=raw, encoded=True).query
    assert parse_query(raw) == {name: query[name] for name in query}


def test_encode_response_frames_the_body_and_the_connection() -> None:
    data = encode_response(404, b"", None, {"X-Consul-Index": "7"}, b"Thu, 01 Jan 2026 00:00:00 GMT", True, True)
    assert data == (b"HTTP/1.1 404 Not Found\r\nX-Consul-Index: 7\r\nContent-Length: 0\r\n"
                    b"Date: Thu, 01 Jan 2026 00:00:00 GMT\r\n\r\n")
    closing = encode_response(200, b"{}", "application/json", None, b"D", False, False)
    assert closing == b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nDate: D\r\n" \
                      b"Connection: close\r\n\r\n{}"


def test_http_metrics_expose_what_prometheus_clients_own_histogram_would() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from spina_fast.observability.metrics import LATENCY_BUCKETS, AgentMetrics

    ours = AgentMetrics()
    registry = CollectorRegistry()
    reference = Histogram("spina_http_request_duration_seconds", "Time from request parsed to response written.",
                          ["method", "route"], buckets=LATENCY_BUCKETS, registry=registry)
    rng = random.Random(SEED)
    for _ in range(500):
        method, seconds = rng.choice(["GET", "PUT"]), rng.choice([*LATENCY_BUCKETS, rng.expovariate(1000), 99.0])
        ours.observe_http(method, kv.ROUTE, 200, seconds)
        reference.labels(method, kv.ROUTE).observe(seconds)

    def lines(text: bytes) -> list[str]:
        return [line for line in text.decode().splitlines()
                if line.startswith("spina_http_request_duration_seconds") and "_created" not in line]

    assert lines(ours.render()) == lines(generate_latest(registry)), f"seed {SEED}"


def test_fast_route_templates_are_the_aiohttp_canonical_routes() -> None:
    app = build_app(None)  # type: ignore[arg-type]
    canonical = {route.resource.canonical for route in app.router.routes() if route.resource is not None}
    assert {kv.ROUTE, ROUTE_STATUS_LEADER, ROUTE_STATUS_PEERS} <= canonical


# --- the protocol in process, with a transport that records what it is told ----------------------------------

class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.reading = True
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class StatusOnlyAgent:
    """What the status routes read from an agent."""

    def __init__(self) -> None:
        from spina_fast.observability.metrics import AgentMetrics

        self.metrics = AgentMetrics()

    def leader_address(self) -> str:
        return "127.0.0.1:8701"

    def voter_addresses(self) -> list[str]:
        return ["127.0.0.1:8701"]


async def _protocol() -> tuple[FastHTTPProtocol, RecordingTransport]:
    server = FastHTTPServer(StatusOnlyAgent(), delegate_factory=asyncio.Protocol)  # type: ignore[arg-type]
    protocol = FastHTTPProtocol(server)
    transport = RecordingTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport


async def test_pipelined_batch_is_answered_with_one_write() -> None:
    protocol, transport = await _protocol()
    protocol.data_received(request("GET", "/v1/status/leader") * 3 + request("GET", "/v1/status/peers")[:10])
    assert len(transport.writes) == 1 and transport.writes[0].count(b"HTTP/1.1 200 OK") == 3
    protocol.data_received(request("GET", "/v1/status/peers")[10:])
    assert len(transport.writes) == 2 and b'["127.0.0.1:8701"]' in transport.writes[1]
    protocol.connection_lost(None)


async def test_write_pressure_pauses_reading_until_the_peer_drains() -> None:
    protocol, transport = await _protocol()
    protocol.pause_writing()
    assert not transport.reading
    protocol.resume_writing()
    assert transport.reading
    protocol.connection_lost(None)


async def test_idle_keep_alive_connection_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_http, "KEEPALIVE_SECONDS", 0.05)
    protocol, transport = await _protocol()
    protocol.data_received(request("GET", "/v1/status/leader"))
    deadline = time.monotonic() + 5
    while not transport.closed and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert transport.closed
    protocol.connection_lost(None)


# --- the wire protocol against a running agent ---------------------------------------------------------------

def test_keep_alive_connection_serves_many_requests(agent: AgentProcess) -> None:
    put(agent, "wire/keep", b"v")
    wire = Wire(agent)
    for _ in range(5):
        wire.send(request("GET", "/v1/kv/wire/keep?raw"))
        status, headers, body, status_line = wire.response()
        assert (status, body) == (200, b"v") and status_line.startswith("HTTP/1.1")
        assert "connection" not in headers and "aiohttp" not in headers.get("server", "")
    wire.close()


def test_pipelined_responses_keep_request_order_when_a_later_one_finishes_first(agent: AgentProcess) -> None:
    put(agent, "wire/slow", b"before")
    wire = Wire(agent)
    wire.send(request("GET", "/v1/kv/wire/slow?raw"))
    index = wire.response()[1]["x-consul-index"]
    # A blocking query (waits for a change), then two requests that are answered at once.
    wire.send(request("GET", f"/v1/kv/wire/slow?raw&index={index}&wait=20s") + request("GET", "/v1/status/leader")
              + request("PUT", "/v1/kv/wire/other", b"x"))
    time.sleep(0.3)
    wire.sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        wire.sock.recv(1)  # nothing may overtake the blocked first answer
    wire.sock.setblocking(True)
    put(agent, "wire/slow", b"after")
    first, second, third = wire.response(), wire.response(), wire.response()
    assert (first[0], first[2]) == (200, b"after") and int(first[1]["x-consul-index"]) > int(index)
    assert (second[0], json.loads(second[2])) == (200, agent.raft)
    assert (third[0], third[2]) == (200, b"true")
    wire.close()


def test_deep_pipeline_beyond_the_in_flight_limit_is_answered_in_order(agent: AgentProcess) -> None:
    rng = random.Random(SEED)
    keys = [f"wire/deep/{rng.randrange(10**9)}" for _ in range(MAX_PIPELINE * 3)]
    wire = Wire(agent)
    wire.send(b"".join(request("PUT", f"/v1/kv/{key}", key.encode()) for key in keys))
    assert all(wire.response()[2] == b"true" for _ in keys)
    wire.send(b"".join(request("GET", f"/v1/kv/{key}?raw") for key in keys))
    assert [wire.response()[2] for _ in keys] == [key.encode() for key in keys], f"seed {SEED}"
    wire.close()


def test_http_1_0_closes_unless_keep_alive_is_asked(agent: AgentProcess) -> None:
    wire = Wire(agent)
    wire.send(b"GET /v1/status/leader HTTP/1.0\r\n\r\n")
    status, headers, _, status_line = wire.response()
    assert status == 200 and status_line.startswith("HTTP/1.0") and headers["connection"] == "close"
    assert wire.closed_by_peer()
    wire.close()
    wire = Wire(agent)
    for _ in range(2):
        wire.send(b"GET /v1/status/leader HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, _, _ = wire.response()
        assert status == 200 and headers["connection"] == "keep-alive"
    wire.close()


def test_connection_close_request_gets_its_answer_then_the_connection_closes(agent: AgentProcess) -> None:
    wire = Wire(agent)
    wire.send(request("GET", "/v1/status/peers", headers="Connection: close\r\n"))
    status, headers, body, _ = wire.response()
    assert status == 200 and headers["connection"] == "close" and json.loads(body) == [agent.raft]
    assert wire.closed_by_peer()
    wire.close()


@pytest.mark.parametrize(("raw", "status", "code"), [
    (b"GARBAGE\r\n\r\n", 400, "invalid_request"),
    (b"GET /v1/kv/x HTTP/1.1\r\nBroken header\r\n\r\n", 400, "invalid_request"),
    (bytes(random.Random(SEED).randrange(256) for _ in range(64)) + b"\r\n\r\n", 400, "invalid_request"),
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", 400, "invalid_request"),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414, "uri_too_long"),
    (b"GET /v1/status/leader HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, "headers_too_large"),
])
def test_malformed_or_oversized_requests_get_a_json_error_and_a_close(agent: AgentProcess, raw: bytes, status: int,
                                                                      code: str) -> None:
    wire = Wire(agent)
    wire.send(raw)
    got, headers, body, _ = wire.response()
    assert got == status and headers["connection"] == "close" and json.loads(body)["code"] == code
    assert wire.closed_by_peer()
    wire.close()


def test_requests_before_a_malformed_one_are_still_answered(agent: AgentProcess) -> None:
    wire = Wire(agent)
    wire.send(request("GET", "/v1/status/leader") + b"NOT HTTP AT ALL\r\n\r\n")
    assert wire.response()[0] == 200
    assert wire.response()[0] == 400
    assert wire.closed_by_peer()
    wire.close()


def test_half_closed_connection_gets_every_answer_then_eof(agent: AgentProcess) -> None:
    wire = Wire(agent)
    wire.send(request("GET", "/v1/status/leader") + request("PUT", "/v1/kv/wire/half", b"h"))
    wire.sock.shutdown(socket.SHUT_WR)
    assert wire.response()[0] == 200
    assert wire.response()[2] == b"true"
    assert wire.closed_by_peer()
    wire.close()


def test_reset_connection_with_a_blocked_query_leaves_the_agent_serving(agent: AgentProcess) -> None:
    put(agent, "wire/reset", b"r")
    wire = Wire(agent)
    wire.send(request("GET", "/v1/kv/wire/reset?index=999999999&wait=30s") + b"PUT /v1/kv/wire/reset HTTP/1.1\r\n")
    wire.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    wire.close()  # RST
    other = Wire(agent)
    other.send(request("GET", "/v1/kv/wire/reset?raw"))
    assert other.response()[2] == b"r"
    other.close()


def test_non_hot_then_hot_request_on_one_connection_are_both_answered(agent: AgentProcess) -> None:
    put(agent, "wire/mixed", b"m")
    wire = Wire(agent)
    wire.send(request("GET", "/v1/agent/self"))
    status, headers, body, _ = wire.response()
    assert status == 200 and json.loads(body)["Config"]["NodeName"] == "dev"
    wire.send(request("GET", "/v1/kv/wire/mixed?raw"))
    status, headers, body, _ = wire.response()
    assert (status, body) == (200, b"m") and "aiohttp" in headers["server"]  # the connection stayed on aiohttp
    wire.close()


def test_hot_then_non_hot_pipelined_are_answered_in_order(agent: AgentProcess) -> None:
    wire = Wire(agent)
    wire.send(request("PUT", "/v1/kv/wire/order", b"o") + request("GET", "/v1/agent/self")
              + request("GET", "/v1/kv/wire/order?raw"))
    assert wire.response()[2] == b"true"
    assert json.loads(wire.response()[2])["Config"]["NodeName"] == "dev"
    assert wire.response()[2] == b"o"
    wire.close()


def test_chunked_put_is_served_through_aiohttp(agent: AgentProcess) -> None:
    wire = Wire(agent)
    wire.send(b"PUT /v1/kv/wire/chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    assert wire.response()[2] == b"true"
    wire.send(request("GET", "/v1/kv/wire/chunked?raw"))
    assert wire.response()[2] == b"hello world"
    wire.close()


def test_expect_100_continue_is_answered_before_the_body(agent: AgentProcess) -> None:
    wire = Wire(agent)
    value = b"c" * 3000
    wire.send(b"PUT /v1/kv/wire/continue HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
              b"Content-Length: 3000\r\n\r\n")
    assert wire.response()[0] == 100
    wire.send(value)
    assert wire.response()[2] == b"true"
    wire.send(request("GET", "/v1/kv/wire/continue?raw"))
    assert wire.response()[2] == value
    wire.close()


def test_oversized_put_is_413_before_the_body_and_never_gets_100_continue(agent: AgentProcess) -> None:
    wire = Wire(agent)
    wire.send(b"PUT /v1/kv/wire/huge HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
              b"Content-Length: 600000\r\n\r\n")
    status, headers, body, _ = wire.response()
    assert status == 413 and json.loads(body) == {
        "error": "value is 600000 bytes; the limit is 524288", "code": "too_large"}
    assert headers["connection"] == "close" and wire.closed_by_peer()
    wire.close()
    # Without Expect the body follows the head: it is read and dropped, and the connection stays usable.
    wire = Wire(agent)
    wire.send(request("PUT", "/v1/kv/wire/huge", b"x" * 600000) + request("GET", "/v1/kv/wire/huge"))
    assert wire.response()[0] == 413
    assert wire.response()[0] == 404
    wire.close()


def test_put_body_arriving_in_small_pieces_is_stored_whole(agent: AgentProcess) -> None:
    value = bytes(random.Random(SEED).randrange(256) for _ in range(200_000))
    wire = Wire(agent)
    data = request("PUT", "/v1/kv/wire/pieces", value)
    for start in range(0, len(data), 7919):
        wire.send(data[start:start + 7919])
    assert wire.response()[2] == b"true"
    wire.send(request("GET", "/v1/kv/wire/pieces?raw"))
    assert wire.response()[2] == value, f"seed {SEED}"
    wire.close()


# --- real clients ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_upload_over_1_kib_uses_100_continue(agent: AgentProcess, tmp_path: Path) -> None:
    payload = bytes(random.Random(SEED).randrange(256) for _ in range(5000))
    (tmp_path / "value.bin").write_bytes(payload)
    upload = subprocess.run(["curl", "-sS", "-v", "-T", str(tmp_path / "value.bin"),
                             f"{agent.base_url}/v1/kv/curl/upload"], capture_output=True, timeout=30)
    assert upload.returncode == 0 and upload.stdout == b"true"
    assert b"Expect: 100-continue" in upload.stderr and b"HTTP/1.1 100 Continue" in upload.stderr
    download = subprocess.run(["curl", "-sS", f"{agent.base_url}/v1/kv/curl/upload?raw"], capture_output=True,
                              timeout=30)
    assert download.stdout == payload


def test_py_consul_round_trips_keys_that_need_percent_encoding(agent: AgentProcess) -> None:
    host, port = agent.http.rsplit(":", 1)
    client = consul.Consul(host=host, port=int(port))
    names = ["enc/with space", "enc/café", "enc/a+b", "enc/percent%25", "enc/q?mark", "enc/hash#tag"]
    for name in names:
        assert client.kv.put(name, name) is True
    for name in names:
        assert client.kv.get(name)[1]["Value"] == name.encode(), name
    _, keys = client.kv.get("enc/", keys=True)
    assert keys == sorted(names)


def test_aiohttp_client_with_concurrent_keep_alive_requests(agent: AgentProcess) -> None:
    rng = random.Random(SEED)
    values = {f"aio/{i}": rng.randbytes(rng.randrange(1, 2000)) for i in range(200)}

    async def run() -> dict[str, bytes]:
        connector = aiohttp.TCPConnector(limit=16)
        async with aiohttp.ClientSession(agent.base_url, connector=connector) as session:
            async def write(key: str, value: bytes) -> None:
                async with session.put(f"/v1/kv/{key}", data=value) as response:
                    assert response.status == 200 and await response.json() is True

            async def read(key: str) -> bytes:
                async with session.get(f"/v1/kv/{key}", params={"raw": ""}) as response:
                    return await response.read()

            await asyncio.gather(*(write(key, value) for key, value in values.items()))
            results = await asyncio.gather(*(read(key) for key in values))
            return dict(zip(values, results, strict=True))

    assert asyncio.run(run()) == values, f"seed {SEED}"


# --- the same answers as aiohttp --------------------------------------------------------------------------------

_EQUIVALENT_REQUESTS = [
    ("GET", "/v1/kv/same/a"), ("GET", "/v1/kv/same/a?raw"), ("GET", "/v1/kv/same/?recurse"),
    ("GET", "/v1/kv/same/?keys&separator=%2F"), ("GET", "/v1/kv/same/?keys=true&separator=/"),
    ("GET", "/v1/kv/same/missing"), ("GET", "/v1/kv/same/?recurse=1&raw"), ("GET", "/v1/kv/same%2Fa?raw"),
    ("GET", "/v1/kv/same/a?stale"), ("GET", "/v1/kv/same/a?consistent&raw"), ("GET", "/v1/kv/same/a?index=1"),
    ("GET", "/v1/kv/same/a?index=&wait=1s"), ("GET", "/v1/kv/same/a?index=1&wait=soon"),
    ("GET", "/v1/kv/same/a?consistent&stale"), ("GET", "/v1/kv/"), ("GET", "/v1/kv//lead"),
    ("PUT", "/v1/kv/"), ("PUT", "/v1/kv/same/b?flags=abc"), ("PUT", "/v1/kv/same/b?cas=-1"),
    ("PUT", "/v1/kv/same/b?acquire=x"), ("PUT", "/v1/kv/same/b?cas=1"), ("DELETE", "/v1/kv/same/none?cas=1"),
    ("DELETE", "/v1/kv/"), ("GET", "/v1/status/leader"), ("GET", "/v1/status/peers"),
]


@pytest.mark.parametrize(("method", "target"), _EQUIVALENT_REQUESTS)
def test_hot_routes_answer_what_aiohttp_answers(agent: AgentProcess, method: str, target: str) -> None:
    put(agent, "same/a", b"alpha")
    put(agent, "same/b/c", b"gamma")
    body = b"value" if method == "PUT" else b""
    fast = Wire(agent)
    fast.send(request(method, target, body))
    fast_status, fast_headers, fast_body, _ = fast.response()
    fast.close()
    slow = Wire(agent)  # a non-hot request first: the connection then belongs to aiohttp
    slow.send(request("GET", "/v1/agent/self") + request(method, target, body))
    slow.response()
    slow_status, slow_headers, slow_body, _ = slow.response()
    slow.close()
    assert "aiohttp" in slow_headers["server"] and "server" not in fast_headers
    assert (fast_status, fast_body) == (slow_status, slow_body)
    ignored = {"date", "server", "x-consul-lastcontact"}
    assert {k: v for k, v in fast_headers.items() if k not in ignored} == \
           {k: v for k, v in slow_headers.items() if k not in ignored}


def test_fast_requests_are_counted_by_route_template(agent: AgentProcess) -> None:
    put(agent, "metrics/one", b"1")
    wire = Wire(agent)
    wire.send(request("GET", "/v1/kv/metrics/one?raw") + request("GET", "/v1/kv/metrics/none"))
    wire.response()
    wire.response()
    wire.send(request("GET", "/metrics"))
    families = {family.name: family for family in text_string_to_metric_families(wire.response()[2].decode())}
    wire.close()
    counts = {(s.labels["method"], s.labels["route"], s.labels["status"]): s.value
              for s in families["spina_http_requests"].samples if s.name == "spina_http_requests_total"}
    assert counts[("GET", "/v1/kv/{key}", "200")] >= 1 and counts[("GET", "/v1/kv/{key}", "404")] >= 1
    assert counts[("PUT", "/v1/kv/{key}", "200")] >= 1
    latency = [s for s in families["spina_http_request_duration_seconds"].samples
               if s.name.endswith("_count") and s.labels["route"] == "/v1/kv/{key}"]
    assert latency and all(s.value >= 1 for s in latency)
