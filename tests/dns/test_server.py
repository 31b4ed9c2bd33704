"""The DNS server over real sockets, asked by clients nobody here wrote: dnspython (queries and its stub
resolver, which falls back to TCP on TC) and BIND's ``dig``."""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
from collections.abc import AsyncIterator

import dns.asyncquery
import dns.asyncresolver
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from spina_fast.config import HostPort
from spina_fast.dns import DNSServer
from tests.dns.conftest import BrokenRegistry, Registry

TIMEOUT = 10.0
DIG = shutil.which("dig")
needs_dig = pytest.mark.skipif(DIG is None, reason="dig (dnsutils) is not installed")


UDP_MODES = ["thread", "batch", "protocol"]


@pytest.fixture(params=UDP_MODES)
async def server(registry: Registry, request: pytest.FixtureRequest) -> AsyncIterator[DNSServer]:
    dns_server = registry.serve(request.param, max_udp_payload=4096)
    await dns_server.start("127.0.0.1", 0)
    yield dns_server
    await dns_server.close()


def where(server: DNSServer) -> HostPort:
    assert server.address is not None
    return server.address


async def udp(server: DNSServer, name: str, rdtype: str = "A", **options: object) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **options)  # type: ignore[arg-type]
    address = where(server)
    return await dns.asyncquery.udp(query, address.host, port=address.port, timeout=TIMEOUT)


async def tcp(server: DNSServer, name: str, rdtype: str = "A") -> dns.message.Message:
    address = where(server)
    return await dns.asyncquery.tcp(dns.message.make_query(name, rdtype), address.host, port=address.port,
                                    timeout=TIMEOUT)


def values(response: dns.message.Message) -> list[str]:
    return sorted(rdata.to_text() for rrset in response.answer for rdata in rrset)


async def dig(server: DNSServer, *args: str) -> str:
    assert DIG is not None
    address = where(server)
    process = await asyncio.create_subprocess_exec(
        DIG, f"@{address.host}", "-p", str(address.port), "+time=5", "+tries=2", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


def many_instances(registry: Registry, count: int) -> None:
    for number in range(count):
        registry.register("wide", f"wide-{number:03d}", f"10.9.{number // 200}.{number % 200 + 1}", 7000 + number)


async def test_udp_and_tcp_share_one_port(server: DNSServer) -> None:
    address = where(server)
    assert address.port != 0
    assert values(await udp(server, "web.service.spina")) == ["10.0.0.1", "10.0.0.2"]
    assert values(await tcp(server, "web.service.spina", "AAAA")) == ["2001:db8::3"]


async def test_dnspython_resolves_a_srv_txt_and_nxdomain(server: DNSServer) -> None:
    srv = await udp(server, "_web._tcp.service.spina", "SRV")
    assert sorted(rdata.port for rdata in srv.answer[0]) == [8080, 8081, 8082]
    assert {rrset.rdtype for rrset in srv.additional} == {dns.rdatatype.A, dns.rdatatype.AAAA}
    txt = await udp(server, "db.service.spina", "TXT")
    assert values(txt) == ['"version=15.2" "instance=db-1"']
    missing = await udp(server, "nope.service.spina")
    assert missing.rcode() == dns.rcode.NXDOMAIN and missing.authority[0].rdtype == dns.rdatatype.SOA


async def test_dnspython_stub_resolver_falls_back_to_tcp_for_large_answers(server: DNSServer,
                                                                           registry: Registry) -> None:
    many_instances(registry, 300)
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [where(server).host]
    resolver.port = where(server).port
    resolver.timeout = resolver.lifetime = TIMEOUT
    resolver.use_edns(0, 0, 1232)
    answer = await resolver.resolve("wide.service.spina", "A")
    assert len(answer.rrset) == 300
    truncated = await udp(server, "wide.service.spina")
    assert truncated.flags & dns.flags.TC and len(values(truncated)) < 300
    response, used_tcp = await dns.asyncquery.udp_with_fallback(
        dns.message.make_query("wide.service.spina", "A"), where(server).host, port=where(server).port,
        timeout=TIMEOUT)
    assert used_tcp and len(values(response)) == 300


async def test_edns_buffer_size_is_honoured_over_udp(server: DNSServer, registry: Registry) -> None:
    many_instances(registry, 100)  # 100 A records: about 1.7 KB
    no_edns = await udp(server, "wide.service.spina")
    small = await udp(server, "wide.service.spina", use_edns=0, payload=1232)
    large = await udp(server, "wide.service.spina", use_edns=0, payload=4096)
    assert no_edns.flags & dns.flags.TC and small.flags & dns.flags.TC and not large.flags & dns.flags.TC
    assert len(values(no_edns)) < len(values(small)) < len(values(large)) == 100


async def test_a_registry_change_is_visible_on_the_next_query(server: DNSServer, registry: Registry) -> None:
    assert values(await udp(server, "db.service.spina")) == ["10.0.1.1"]
    registry.register("db", "db-2", "10.0.1.2", 5432)
    assert values(await udp(server, "db.service.spina")) == ["10.0.1.1", "10.0.1.2"]
    registry.set_status("db", "db-1", "critical")
    assert values(await tcp(server, "db.service.spina")) == ["10.0.1.2"]
    registry.set_status("db", "db-2", "critical")
    assert (await udp(server, "db.service.spina")).rcode() == dns.rcode.NXDOMAIN


@pytest.mark.parametrize("udp_mode", UDP_MODES)
async def test_answer_limit_rotates_across_queries(registry: Registry, udp_mode: str) -> None:
    many_instances(registry, 6)
    server = registry.serve(udp_mode, answer_limit=2)
    await server.start("127.0.0.1", 0)
    try:
        answers = [[rdata.to_text() for rdata in (await udp(server, "wide.service.spina")).answer[0]]
                   for _ in range(6)]
    finally:
        await server.close()
    # Each query starts one instance further on: over a full cycle every instance leads once.
    assert all(len(answer) == 2 for answer in answers)
    assert sorted(answer[0] for answer in answers) == [f"10.9.0.{n}" for n in range(1, 7)]
    assert sorted(address for answer in answers for address in answer) == sorted(
        [f"10.9.0.{n}" for n in range(1, 7)] * 2)


async def test_tcp_answers_pipelined_queries_in_order(server: DNSServer) -> None:
    address = where(server)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    names = ["web.service.spina", "db.service.spina", "nope.service.spina"] * 5
    queries = [dns.message.make_query(name, "A") for name in names]
    wire = b"".join(len(data).to_bytes(2, "big") + data for data in (query.to_wire() for query in queries))
    writer.write(wire[:7])  # a query split across segments is reassembled
    await writer.drain()
    writer.write(wire[7:])
    await writer.drain()
    for query in queries:
        length = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), TIMEOUT), "big")
        response = dns.message.from_wire(await reader.readexactly(length))
        assert response.id == query.id and response.question == query.question
    writer.close()
    await writer.wait_closed()


async def test_tcp_connection_with_an_undecodable_message_is_closed_and_server_keeps_serving(
        server: DNSServer) -> None:
    address = where(server)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(b"\x00\x03abc")  # shorter than a header: nothing to answer
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    writer.close()
    await writer.wait_closed()
    assert values(await tcp(server, "web.service.spina")) == ["10.0.0.1", "10.0.0.2"]


async def test_idle_tcp_connections_are_closed(registry: Registry) -> None:
    server = DNSServer(registry.store, tcp_idle_seconds=0.2)
    address = await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(address.host, address.port)
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()
        await writer.wait_closed()
    finally:
        await server.close()


async def test_tcp_connections_beyond_the_limit_are_refused(registry: Registry) -> None:
    server = DNSServer(registry.store, max_tcp_connections=2)
    address = await server.start("127.0.0.1", 0)
    try:
        held = [await asyncio.open_connection(address.host, address.port) for _ in range(2)]
        query = dns.message.make_query("web.service.spina", "A").to_wire()
        for _, writer in held:  # both are served before the third one arrives
            writer.write(len(query).to_bytes(2, "big") + query)
        for reader, _ in held:
            length = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), TIMEOUT), "big")
            await reader.readexactly(length)
        assert server.stats.tcp_connections == 2
        reader, writer = await asyncio.open_connection(address.host, address.port)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(2), TIMEOUT)
        writer.close()
        for _, held_writer in held:
            held_writer.close()
    finally:
        await server.close()


async def test_malformed_udp_gets_formerr_or_silence_and_the_server_answers_after(server: DNSServer) -> None:
    address = where(server)
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.setblocking(False)
        client.connect((address.host, address.port))
        await loop.sock_sendall(client, b"\x00\x01garbage")  # no header: dropped
        await loop.sock_sendall(client, struct.pack("!HHHHHH", 7, 0x0100, 0, 0, 0, 0))  # no question
        probe = dns.message.make_query("web.service.spina", "A")
        await loop.sock_sendall(client, probe.to_wire())
        first = await asyncio.wait_for(loop.sock_recv(client, 4096), TIMEOUT)
        assert first[:2] == b"\x00\x07" and first[3] & 0x0F == dns.rcode.FORMERR
        second = dns.message.from_wire(await asyncio.wait_for(loop.sock_recv(client, 4096), TIMEOUT))
        assert second.id == probe.id and values(second) == ["10.0.0.1", "10.0.0.2"]
    stats = server.stats
    assert (stats.dropped, stats.formerr, stats.noerror, stats.udp_queries) == (1, 1, 1, 3)


async def test_binding_a_taken_port_names_the_address(server: DNSServer, registry: Registry) -> None:
    taken = where(server)
    other = DNSServer(registry.store)
    with pytest.raises(OSError, match=rf"DNS cannot bind UDP 127\.0\.0\.1:{taken.port}"):
        await other.start("127.0.0.1", taken.port)


async def test_ipv6_loopback_is_served(registry: Registry) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    server = DNSServer(registry.store)
    try:
        address = await server.start("::1", 0)
    except OSError as exc:
        pytest.skip(f"::1 cannot be bound here: {exc}")
    try:
        response = await dns.asyncquery.udp(dns.message.make_query("web.service.spina", "A"), "::1",
                                            port=address.port, timeout=TIMEOUT)
        assert values(response) == ["10.0.0.1", "10.0.0.2"]
    finally:
        await server.close()


@needs_dig
async def test_dig_resolves_a_srv_with_additional_txt_and_nxdomain(server: DNSServer) -> None:
    assert sorted((await dig(server, "web.service.spina", "A", "+short")).split()) == ["10.0.0.1", "10.0.0.2"]
    srv = await dig(server, "_web._tcp.service.spina", "SRV", "+noall", "+answer", "+additional")
    assert "1 1 8080 0a000001.addr.spina." in srv
    assert "0a000001.addr.spina.\t0\tIN\tA\t10.0.0.1" in srv
    assert "20010db8000000000000000000000003.addr.spina. 0 IN AAAA 2001:db8::3" in srv
    txt = await dig(server, "web.service.spina", "TXT", "+short")
    assert '"version=1.5.0" "instance=web-2"' in txt
    missing = await dig(server, "nope.service.spina", "A")
    assert "status: NXDOMAIN" in missing and "SOA\tns.spina. hostmaster.spina." in missing


@needs_dig
async def test_dig_retries_truncated_answers_over_tcp(server: DNSServer, registry: Registry) -> None:
    many_instances(registry, 200)
    output = await dig(server, "wide.service.spina", "A", "+noedns")
    assert "Truncated, retrying in TCP mode" in output
    assert output.count("\tIN\tA\t10.9.") == 200
    assert "status: NOERROR" in output
    over_tcp = await dig(server, "wide.service.spina", "A", "+tcp", "+short")
    assert len(over_tcp.split()) == 200


@pytest.mark.parametrize("udp_mode", UDP_MODES)
async def test_a_failing_registry_costs_a_servfail_not_the_server(udp_mode: str,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    server = DNSServer(BrokenRegistry(), udp=udp_mode)  # type: ignore[arg-type]
    await server.start("127.0.0.1", 0)
    try:
        for _ in range(2):
            assert (await udp(server, "web.service.spina")).rcode() == dns.rcode.SERVFAIL
        assert (await tcp(server, "web.service.spina")).rcode() == dns.rcode.SERVFAIL
        assert (await udp(server, "example.com")).rcode() == dns.rcode.REFUSED
    finally:
        await server.close()
    assert server.stats.servfail == 3
    assert "replica unavailable" in caplog.text
