"""The Cython DNS engine without sockets: queries built and answers read by dnspython, and hand-made malformed
messages for the strict parser."""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest

from spina_fast import _dns
from spina_fast._dns import DNSEngine, MalformedQuery, parse_query
from tests.dns.conftest import BrokenRegistry, Registry


def ask(engine: DNSEngine, name: str, rdtype: str = "A", *, tcp: bool = False,
        **options: object) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **options)  # type: ignore[arg-type]
    wire = engine.answer(query.to_wire(), tcp)
    assert wire is not None, "the engine dropped a valid query"
    response = dns.message.from_wire(wire, ignore_trailing=False, raise_on_truncation=False)
    assert response.id == query.id and response.flags & dns.flags.QR
    assert response.question == query.question
    return response


def answer_values(response: dns.message.Message) -> list[str]:
    return sorted(rdata.to_text() for rrset in response.answer for rdata in rrset)


def header(flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0, query_id: int = 0x1234) -> bytes:
    return struct.pack("!HHHHHH", query_id, flags, qd, an, ns, ar)


QUESTION = b"\x03web\x07service\x05spina\x00" + struct.pack("!HH", 1, 1)
OPT = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)


def test_extension_is_compiled() -> None:
    assert _dns.__file__ is not None and _dns.__file__.endswith(".so")


def test_a_aaaa_and_any_list_healthy_instances_case_insensitively(registry: Registry) -> None:
    engine = DNSEngine(registry.store)
    assert answer_values(ask(engine, "WEB.Service.SPINA", "A")) == ["10.0.0.1", "10.0.0.2"]
    assert answer_values(ask(engine, "web.service.spina", "AAAA")) == ["2001:db8::3"]
    assert answer_values(ask(engine, "web.service.spina", "ANY")) == ["10.0.0.1", "10.0.0.2", "2001:db8::3"]
    response = ask(engine, "web.service.spina", "A")
    assert response.flags & dns.flags.AA and response.rcode() == dns.rcode.NOERROR
    assert all(rrset.ttl == 0 for rrset in response.answer)


def test_question_letter_case_is_echoed_as_asked_even_from_the_cache(registry: Registry) -> None:
    engine = DNSEngine(registry.store)
    for name in ("web.service.spina", "WeB.sErViCe.SpInA", "WEB.SERVICE.SPINA"):
        wire = engine.answer(dns.message.make_query(name, "A").to_wire(), False)
        assert wire is not None
        assert dns.message.from_wire(wire).question[0].name.to_text() == name + "."
    assert engine.stats()["cache_hits"] == 2


def test_srv_carries_ports_and_targets_with_addresses_in_additional(registry: Registry) -> None:
    engine = DNSEngine(registry.store)
    for name in ("_web._tcp.service.spina", "web.service.spina"):
        response = ask(engine, name, "SRV")
        srv = sorted((rdata.port, rdata.target.to_text()) for rdata in response.answer[0])
        assert srv == [(8080, "0a000001.addr.spina."), (8081, "0a000002.addr.spina."),
                       (8082, "20010db8000000000000000000000003.addr.spina.")]
        glue = {rrset.name.to_text(): [rdata.to_text() for rdata in rrset] for rrset in response.additional}
        assert glue == {"0a000001.addr.spina.": ["10.0.0.1"], "0a000002.addr.spina.": ["10.0.0.2"],
                        "20010db8000000000000000000000003.addr.spina.": ["2001:db8::3"]}
    # The targets resolve on their own, too.
    assert answer_values(ask(engine, "0a000002.addr.spina", "A")) == ["10.0.0.2"]
    assert answer_values(ask(engine, "20010db8000000000000000000000003.addr.spina", "AAAA")) == ["2001:db8::3"]


def test_txt_carries_version_and_instance(registry: Registry) -> None:
    engine = DNSEngine(registry.store)
    assert answer_values(ask(engine, "db.service.spina", "TXT")) == ['"version=15.2" "instance=db-1"']


def test_tag_filters_by_dns_label_and_rfc2782_name(registry: Registry) -> None:
    engine = DNSEngine(registry.store)
    assert answer_values(ask(engine, "primary.web.service.spina")) == ["10.0.0.1"]
    # Tags compare case-insensitively: "EU" and "eu" are the same DNS label.
    assert answer_values(ask(engine, "eu.web.service.spina")) == ["10.0.0.1", "10.0.0.2"]
    srv = ask(engine, "_web._primary.service.spina", "SRV")
    assert [rdata.port for rdata in srv.answer[0]] == [8080]
    missing = ask(engine, "canary.web.service.spina")
    assert missing.rcode() == dns.rcode.NXDOMAIN


def test_unknown_names_are_nxdomain_with_the_zone_soa(registry: Registry) -> None:
    engine = DNSEngine(registry.store, ttl=30)
    for name in ("nope.service.spina", "a.b.c.d.service.spina", "web.node.spina", "zz.addr.spina"):
        response = ask(engine, name)
        assert response.rcode() == dns.rcode.NXDOMAIN, name
        soa = response.authority[0]
        assert soa.name.to_text() == "spina." and soa.rdtype == dns.rdatatype.SOA and soa.ttl == 30
        assert soa[0].mname.to_text() == "ns.spina." and soa[0].minimum == 30


def test_known_name_without_records_of_the_type_is_nodata_with_soa(registry: Registry) -> None:
    engine = DNSEngine(registry.store)
    response = ask(engine, "db.service.spina", "AAAA")
    assert response.rcode() == dns.rcode.NOERROR and not response.answer
    assert response.authority[0].rdtype == dns.rdatatype.SOA
    apex = ask(engine, "spina", "SOA")
    assert apex.answer[0].rdtype == dns.rdatatype.SOA and apex.answer[0][0].serial == registry.index


def test_names_outside_the_zone_and_other_classes_are_refused(registry: Registry) -> None:
    engine = DNSEngine(registry.store)
    assert ask(engine, "example.com").rcode() == dns.rcode.REFUSED
    assert ask(engine, "version.bind", "TXT", rdclass="CH").rcode() == dns.rcode.REFUSED
    assert ask(engine, "spina", "AXFR").rcode() == dns.rcode.REFUSED
    # A label that merely ends in the domain's bytes is not inside the zone.
    assert ask(engine, "web.service.xspina").rcode() == dns.rcode.REFUSED


def test_custom_domain_and_ttl(registry: Registry) -> None:
    engine = DNSEngine(registry.store, domain="Discovery.Internal.", ttl=15)
    response = ask(engine, "web.service.discovery.internal")
    assert answer_values(response) == ["10.0.0.1", "10.0.0.2"] and response.answer[0].ttl == 15
    assert ask(engine, "web.service.spina").rcode() == dns.rcode.REFUSED


@pytest.mark.parametrize(("options", "message"), [
    ({"domain": "bad_domain"}, "must be dot-separated labels"),
    ({"ttl": -1}, "outside 0.."),
    ({"answer_limit": -2}, "negative"),
    ({"max_udp_payload": 100}, "outside 512.."),
])
def test_bad_options_are_refused_by_name(registry: Registry, options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DNSEngine(registry.store, **options)  # type: ignore[arg-type]


def test_critical_instances_are_excluded_and_warning_ones_kept(registry: Registry) -> None:
    engine = DNSEngine(registry.store)
    registry.set_status("web", "web-1", "critical")
    registry.set_status("web", "web-2", "warning")
    assert answer_values(ask(engine, "web.service.spina")) == ["10.0.0.2"]
    registry.set_status("db", "db-1", "critical")
    assert ask(engine, "db.service.spina").rcode() == dns.rcode.NXDOMAIN


def test_every_registry_change_is_seen_by_the_next_query(registry: Registry) -> None:
    engine = DNSEngine(registry.store)
    assert answer_values(ask(engine, "db.service.spina")) == ["10.0.1.1"]
    assert ask(engine, "cache.service.spina").rcode() == dns.rcode.NXDOMAIN
    registry.register("db", "db-2", "10.0.1.2", 5432)
    registry.register("cache", "cache-1", "10.0.2.1", 6379)
    assert answer_values(ask(engine, "db.service.spina")) == ["10.0.1.1", "10.0.1.2"]
    assert answer_values(ask(engine, "cache.service.spina")) == ["10.0.2.1"]
    registry.register("db", "db-2", "10.0.1.9", 5432)  # re-registration moves the address
    assert answer_values(ask(engine, "db.service.spina")) == ["10.0.1.1", "10.0.1.9"]
    registry.deregister("db", "db-1")
    registry.deregister("db", "db-2")
    assert ask(engine, "db.service.spina").rcode() == dns.rcode.NXDOMAIN
    stats = engine.stats()
    assert stats["cache_misses"] == 6 and stats["cache_hits"] == 0


def test_unchanged_answers_come_from_the_cache(registry: Registry) -> None:
    engine = DNSEngine(registry.store)
    for _ in range(3):
        ask(engine, "web.service.spina")
    registry.register("db", "db-2", "10.0.1.2", 5432)  # another service changed: web's answer still holds
    ask(engine, "web.service.spina")
    assert (engine.stats()["cache_hits"], engine.stats()["cache_misses"]) == (3, 1)


def test_service_names_match_regardless_of_letter_case(registry: Registry) -> None:
    engine = DNSEngine(registry.store)
    registry.register("Billing", "billing-1", "10.0.3.1", 9000)
    assert answer_values(ask(engine, "billing.service.spina")) == ["10.0.3.1"]
    # A service named exactly as asked (lowercase) takes precedence as soon as it exists.
    registry.register("billing", "billing-2", "10.0.3.2", 9000)
    assert answer_values(ask(engine, "billing.service.spina")) == ["10.0.3.2"]
    registry.deregister("billing", "billing-2")
    assert answer_values(ask(engine, "BILLING.service.spina")) == ["10.0.3.1"]


def many_instances(registry: Registry, count: int, service: str = "wide") -> None:
    for number in range(count):
        registry.register(service, f"{service}-{number:03d}", f"10.9.{number // 200}.{number % 200 + 1}", 7000 + number)


def test_udp_answers_are_cut_to_512_bytes_or_the_edns_buffer_with_tc(registry: Registry) -> None:
    many_instances(registry, 60)  # 60 A records: about 1 KB
    engine = DNSEngine(registry.store, max_udp_payload=4096)
    plain = ask(engine, "wide.service.spina")
    assert plain.flags & dns.flags.TC and 0 < len(answer_values(plain)) < 60
    assert len(engine.answer(dns.message.make_query("wide.service.spina", "A").to_wire(), False) or b"") <= 512
    small = ask(engine, "wide.service.spina", use_edns=0, payload=700)
    assert small.flags & dns.flags.TC and len(answer_values(small)) < 60 and small.edns == 0
    large = ask(engine, "wide.service.spina", use_edns=0, payload=4096)
    assert not large.flags & dns.flags.TC and len(answer_values(large)) == 60 and large.payload == 4096
    over_tcp = ask(engine, "wide.service.spina", tcp=True)
    assert not over_tcp.flags & dns.flags.TC and len(answer_values(over_tcp)) == 60
    assert engine.stats()["truncated"] == 3


def test_our_udp_payload_caps_the_clients(registry: Registry) -> None:
    many_instances(registry, 100)
    engine = DNSEngine(registry.store)  # 1232 by default
    response = ask(engine, "wide.service.spina", use_edns=0, payload=65000)
    assert response.flags & dns.flags.TC and response.payload == 1232


def test_srv_answer_that_fits_without_its_additional_records_is_not_truncated(registry: Registry) -> None:
    many_instances(registry, 12)
    engine = DNSEngine(registry.store)
    response = ask(engine, "_wide._tcp.service.spina", "SRV")
    # 12 SRV records fit in 512 bytes with compressed targets, their 12 A records do not all fit.
    assert not response.flags & dns.flags.TC and len(response.answer[0]) == 12
    assert 0 < sum(len(rrset) for rrset in response.additional) < 12
    full = ask(engine, "_wide._tcp.service.spina", "SRV", tcp=True)
    assert sum(len(rrset) for rrset in full.additional) == 12


def test_answer_limit_rotates_through_every_instance(registry: Registry) -> None:
    many_instances(registry, 5)
    engine = DNSEngine(registry.store, answer_limit=2)
    seen: list[list[str]] = [answer_values(ask(engine, "wide.service.spina")) for _ in range(5)]
    assert all(len(answer) == 2 for answer in seen)
    assert {address for answer in seen for address in answer} == {f"10.9.0.{n}" for n in range(1, 6)}
    assert seen[0] != seen[1]
    srv = ask(engine, "wide.service.spina", "SRV")
    assert len(srv.answer[0]) == 2 and sum(len(rrset) for rrset in srv.additional) == 2


def test_edns_is_echoed_with_the_do_bit_and_unknown_options_ignored(registry: Registry) -> None:
    engine = DNSEngine(registry.store)
    cookie = dns.edns.GenericOption(10, b"\x01" * 8)
    response = ask(engine, "web.service.spina", use_edns=0, payload=1400, options=[cookie], want_dnssec=True)
    assert response.edns == 0 and response.ednsflags & dns.flags.DO and not response.options
    plain = ask(engine, "web.service.spina", use_edns=0)
    assert not plain.ednsflags & dns.flags.DO


def test_edns_version_above_zero_is_badvers(registry: Registry) -> None:
    engine = DNSEngine(registry.store)
    response = ask(engine, "web.service.spina", use_edns=1)
    assert response.rcode() == dns.rcode.BADVERS and response.edns == 0
    assert engine.stats()["badvers"] == 1


def raw_rcode(engine: DNSEngine, wire: bytes) -> int | None:
    response = engine.answer(wire, False)
    if response is None:
        return None
    assert response[:2] == wire[:2] and response[2] & 0x80
    return response[3] & 0x0F


@pytest.mark.parametrize(("wire", "rcode", "reason"), [
    (b"", None, "shorter than a DNS header"),
    (b"\x12\x34\x01", None, "shorter than a DNS header"),
    (header(flags=0x8100) + QUESTION, None, "a response, not a query"),
    (header(flags=0x2800) + QUESTION, 4, "opcode is not QUERY"),  # UPDATE
    (header(qd=0), 1, "exactly one question"),
    (header(qd=2) + QUESTION + QUESTION, 1, "exactly one question"),
    (header(an=1) + QUESTION, 1, "no answer or authority"),
    (header() + QUESTION[:-2], 1, "question cut short"),
    (header() + b"\x03web\x07service", 1, "malformed question name"),
    (header() + b"\xc0\x0c" + QUESTION[-4:], 1, "malformed question name"),  # points at itself
    (header() + b"\x01a\xc0\x0c" + QUESTION[-4:], 1, "malformed question name"),  # loops back to its start
    (header() + b"\x41a\x00" + QUESTION[-4:], 1, "malformed question name"),  # extended label type
    (header() + b"\x3f" + b"a" * 63 + b"\x3f" + b"b" * 63 + b"\x3f" + b"c" * 63 + b"\x3f" + b"d" * 63 + b"\x00"
     + QUESTION[-4:], 1, "malformed question name"),  # 257 bytes
    (header(ar=1) + QUESTION, 1, "malformed name in the additional section"),
    (header(ar=1) + QUESTION + OPT[:-3], 1, "additional record cut short"),
    (header(ar=2) + QUESTION + OPT + OPT, 1, "more than one OPT"),
    (header(ar=1) + QUESTION + b"\x01x\x00" + OPT[1:], 1, "owner is not the root"),
    (header(ar=1) + QUESTION + b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 3) + b"\x00\x0a\x00", 1,
     "option header cut short"),
    (header(ar=1) + QUESTION + b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 4) + b"\x00\x0a\x00\x08", 1,
     "option runs past its record"),
    (header(ar=1) + QUESTION + b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 9), 1, "record data cut short"),
    (header() + QUESTION + b"\x00", 1, "bytes after the last record"),
])
def test_malformed_messages_get_formerr_notimp_or_are_dropped(registry: Registry, wire: bytes, rcode: int | None,
                                                               reason: str) -> None:
    engine = DNSEngine(registry.store)
    with pytest.raises(MalformedQuery, match=reason) as raised:
        parse_query(wire)
    assert raised.value.rcode == rcode
    assert raw_rcode(engine, wire) == rcode


def test_compression_pointers_in_the_additional_section_are_followed(registry: Registry) -> None:
    # A TSIG-like record whose owner points back to the question name: well-formed, skipped.
    other = b"\xc0\x0c" + struct.pack("!HHIH", 250, 255, 0, 2) + b"\x00\x00"
    wire = header(ar=2) + QUESTION + other + OPT
    query = parse_query(wire)
    assert (query.name, query.qtype, query.edns, query.udp_payload) == ("web.service.spina", 1, True, 1232)
    assert raw_rcode(DNSEngine(registry.store), wire) == 0
    # ... but not a pointer forward, nor one that loops through an earlier pointer.
    forward = header(ar=1) + QUESTION + b"\xc0\x30" + struct.pack("!HHIH", 250, 255, 0, 0)
    assert raw_rcode(DNSEngine(registry.store), forward) == 1


def test_longest_legal_name_is_accepted(registry: Registry) -> None:
    labels = [b"a" * 63, b"b" * 63, b"c" * 63, b"d" * 61]  # 4 * 1 + 250 + root = 255 bytes
    name = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    assert len(name) == 255
    query = parse_query(header() + name + QUESTION[-4:])
    assert query.name.endswith("d" * 61)
    assert raw_rcode(DNSEngine(registry.store), header() + name + QUESTION[-4:]) == 5  # outside the zone


def test_rcodes_are_counted(registry: Registry) -> None:
    engine = DNSEngine(registry.store)
    ask(engine, "web.service.spina")
    ask(engine, "nope.service.spina")
    ask(engine, "example.org")
    engine.answer(header(qd=0), False)
    engine.answer(b"\x00", False)
    stats = engine.stats()
    assert {name: stats[name] for name in ("noerror", "nxdomain", "refused", "formerr", "dropped", "udp_queries")} \
        == {"noerror": 1, "nxdomain": 1, "refused": 1, "formerr": 1, "dropped": 1, "udp_queries": 5}


def test_the_cache_stays_bounded(registry: Registry) -> None:
    engine = DNSEngine(registry.store, max_cache_entries=8)
    for number in range(50):
        ask(engine, f"missing-{number}.service.spina")
    assert engine.cached_answers <= 8
    assert answer_values(ask(engine, "web.service.spina")) == ["10.0.0.1", "10.0.0.2"]


def test_registry_failure_is_answered_servfail() -> None:
    engine = DNSEngine(BrokenRegistry())
    wire = dns.message.make_query("web.service.spina", "A").to_wire()
    with pytest.raises(RuntimeError, match="replica unavailable"):
        engine.answer(wire, False)
    response = dns.message.from_wire(engine.servfail(wire) or b"")
    assert response.rcode() == dns.rcode.SERVFAIL and engine.stats()["servfail"] == 1
