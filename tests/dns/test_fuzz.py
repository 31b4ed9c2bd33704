"""Fuzzing the DNS parser and server with hypothesis: random bytes and mutated valid queries must be answered
FORMERR / NOTIMP / BADVERS, answered normally if they happen to be valid, or dropped; never crash, never
answer with bytes that are not DNS, and the server still answers a valid query afterwards.

Bounded: SPINA_DNS_FUZZ_EXAMPLES (default 300 per test) sets how many inputs each test tries.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import dns.exception
import dns.message
import dns.name
import dns.rcode
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spina_fast._dns import DNSEngine, MalformedQuery, parse_query
from tests.dns.conftest import Registry, ThreadedDNSServer

EXAMPLES = int(os.environ.get("SPINA_DNS_FUZZ_EXAMPLES", "300"))
fuzz_settings = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                         suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

NAMES = ["web.service.spina", "_web._tcp.service.spina", "primary.web.service.spina", "nope.service.spina",
         "spina", "0a000001.addr.spina", "example.com", "a.b.c.d.e.service.spina"]
TYPES = ["A", "AAAA", "SRV", "TXT", "ANY", "SOA", "MX", "AXFR"]


@st.composite
def valid_queries(draw: st.DrawFn) -> bytes:
    query = dns.message.make_query(draw(st.sampled_from(NAMES)), draw(st.sampled_from(TYPES)),
                                   use_edns=draw(st.sampled_from([None, 0])),
                                   payload=draw(st.sampled_from([512, 1232, 4096, 65535])),
                                   want_dnssec=draw(st.booleans()))
    query.id = draw(st.integers(0, 0xFFFF))
    return query.to_wire()


@st.composite
def mutated_queries(draw: st.DrawFn) -> bytes:
    wire = bytearray(draw(valid_queries()))
    for _ in range(draw(st.integers(1, 6))):
        operation = draw(st.sampled_from(["flip", "set", "insert", "delete", "cut"]))
        position = draw(st.integers(0, max(0, len(wire) - 1)))
        if operation == "flip" and wire:
            wire[position] ^= 1 << draw(st.integers(0, 7))
        elif operation == "set" and wire:
            wire[position] = draw(st.sampled_from([0x00, 0xC0, 0xC0 | 0x0C, 0x3F, 0x40, 0xFF]))
        elif operation == "insert":
            wire[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif operation == "delete" and wire:
            del wire[position]
        else:
            del wire[position:]
    return bytes(wire)


messages = st.one_of(st.binary(max_size=600), mutated_queries())


def check_answer(query: bytes, response: bytes | None) -> None:
    """The engine's answer to ``query`` is what the strict parser says it must be."""
    try:
        parsed = parse_query(query)
    except MalformedQuery as error:
        if error.rcode is None:
            assert response is None
            return
        assert response is not None and response[:2] == query[:2] and response[2] & 0x80
        decoded = dns.message.from_wire(response)
        assert decoded.rcode() == error.rcode
        return
    assert response is not None
    decoded = dns.message.from_wire(response, raise_on_truncation=False)
    assert decoded.id == parsed.id and decoded.question[0].name == dns.name.from_wire(query, 12)[0]
    assert (decoded.question[0].rdtype, decoded.question[0].rdclass) == (parsed.qtype, parsed.qclass)
    assert decoded.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.REFUSED)


@fuzz_settings
@given(query=messages)
def test_engine_answers_any_bytes_as_the_parser_decides(registry: Registry, query: bytes) -> None:
    engine = DNSEngine(registry.store)
    check_answer(query, engine.answer(query, False))
    check_answer(query, engine.answer(query, True))


def is_answered(query: bytes) -> bool:
    try:
        parse_query(query)
    except MalformedQuery as error:
        return error.rcode is not None
    return True


@pytest.fixture(params=["thread", "batch"])
def fuzz_target(registry: Registry, request: pytest.FixtureRequest) -> Iterator[ThreadedDNSServer]:
    server = ThreadedDNSServer(registry, udp=request.param)
    yield server
    server.stop()


@fuzz_settings
@given(query=messages, probe_id=st.integers(0, 0xFFFF))
def test_server_survives_fuzzed_datagrams_and_answers_a_valid_query_after(
        fuzz_target: ThreadedDNSServer, query: bytes, probe_id: int) -> None:
    probe = dns.message.make_query("web.service.spina", "A")
    # The probe's id differs from the fuzz's, so that each answer is told apart by its id: the serving thread
    # answers the probe from its cache while a malformed message waits for the event loop, so the two
    # answers may come in either order. A socket per example: no late answer of the last one comes in.
    probe.id = int.from_bytes(query[:2], "big") ^ 0x8000 if len(query) >= 2 else probe_id
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(10)
        client.connect((fuzz_target.address.host, fuzz_target.address.port))
        client.send(query)
        client.send(probe.to_wire())
        probe_answer: dns.message.Message | None = None
        fuzz_answered = not is_answered(query)
        while probe_answer is None or not fuzz_answered:
            received = client.recv(65535)
            if received[:2] == probe.id.to_bytes(2, "big"):
                probe_answer = dns.message.from_wire(received)
            else:
                check_answer(query, received)
                fuzz_answered = True
    assert probe_answer.question == probe.question
    assert sorted(rdata.to_text() for rdata in probe_answer.answer[0]) == ["10.0.0.1", "10.0.0.2"]


def test_server_survives_fuzzed_tcp_streams(fuzz_target: ThreadedDNSServer) -> None:
    server = fuzz_target
    rng_data = st.lists(messages, min_size=1, max_size=5)
    probe = dns.message.make_query("web.service.spina", "A").to_wire()

    @fuzz_settings
    @given(batch=rng_data)
    def one_connection(batch: list[bytes]) -> None:
        with socket.create_connection((server.address.host, server.address.port), timeout=10) as stream:
            stream.sendall(b"".join(len(message).to_bytes(2, "big") + message for message in batch))
            stream.shutdown(socket.SHUT_WR)
            while stream.recv(65536):
                continue  # answers (or a close after an undecodable message); only survival matters here
        with socket.create_connection((server.address.host, server.address.port), timeout=10) as stream:
            stream.sendall(len(probe).to_bytes(2, "big") + probe)
            length = int.from_bytes(stream.recv(2), "big")
            data = b""
            while len(data) < length:
                data += stream.recv(length - len(data))
            assert dns.message.from_wire(data).rcode() == dns.rcode.NOERROR

    one_connection()
