"""The envelope and topic naming, without a broker."""

from __future__ import annotations

import re

import orjson
import pytest
from confluent_kafka import Message

from spina_fast import _events
from spina_fast.errors import InvalidRequest
from spina_fast.events import EnvelopeEncoder, RetentionClass, TopicSpec, validate_topic
from spina_fast.events.config import ConsumerConfig, ProducerConfig
from spina_fast.events.topics import partitions_for_rate

TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-01$")


def test_extension_is_compiled() -> None:
    assert _events.__file__ is not None and _events.__file__.endswith(".so")


@pytest.mark.parametrize("name", ["orders.order.created", "billing.invoice-line.item_added", "a.b.c"])
def test_topic_names_following_the_convention_are_accepted(name: str) -> None:
    assert validate_topic(name) == name


@pytest.mark.parametrize("name", ["Orders.order.created", "orders.created", "orders.order.created.v2", "",
                                  "orders..created", "1orders.order.created", "orders.order.créé",
                                  "orders.order.created.dlq"])
def test_bad_topic_names_are_refused_with_the_expected_form(name: str) -> None:
    with pytest.raises(InvalidRequest, match=r"<context>\.<aggregate>\.<event>") as info:
        validate_topic(name)
    assert repr(name) in info.value.message


def test_dead_letter_topics_are_accepted_where_allowed() -> None:
    assert validate_topic("orders.order.created.dlq", allow_dlq=True) == "orders.order.created.dlq"


def test_topic_spec_derives_partitions_from_expected_throughput() -> None:
    assert TopicSpec("a.b.c", expected_events_per_s=250_000).partition_count == partitions_for_rate(250_000) == 25
    assert TopicSpec("a.b.c", expected_events_per_s=10).partition_count == 1
    assert TopicSpec("a.b.c", partitions=16, expected_events_per_s=10).partition_count == 16
    with pytest.raises(ValueError, match="unknown retention class 'forever'"):
        TopicSpec("a.b.c", retention="forever")  # type: ignore[arg-type]
    audit = TopicSpec("a.b.c", retention=RetentionClass.AUDIT)
    assert audit.topic_config(2) == {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1",
                                     "min.insync.replicas": "2"}
    assert audit.dead_letter().name == "a.b.c.dlq" and audit.dead_letter().retention is RetentionClass.AUDIT


def test_envelope_carries_every_field_and_a_w3c_traceparent() -> None:
    encoder = EnvelopeEncoder("orders-svc")
    key, value, headers = encoder.encode("orders.order.created", "order-17", {"total": 12, "note": 'quote " é'},
                                         correlation_id="req-1")
    doc = orjson.loads(value)
    assert key == b"order-17"
    assert doc["type"] == "orders.order.created" and doc["source"] == "orders-svc"
    assert doc["aggregate_id"] == "order-17" and doc["correlation_id"] == "req-1"
    assert doc["schema_version"] == 1 and doc["payload"] == {"total": 12, "note": 'quote " é'}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["time"])
    assert re.fullmatch(r"[0-9a-f]{32}", doc["id"])
    [(name, traceparent)] = headers
    assert name == "traceparent" and TRACEPARENT.match(traceparent.decode())
    assert traceparent.decode().split("-")[1] == doc["id"]  # a new trace per event, named after it


def test_batch_ids_are_unique_and_strings_needing_escapes_survive() -> None:
    encoder = EnvelopeEncoder('svc "quoted"\n')
    tricky = ['agg\\1', 'agg"2', "agg\n3", "agg\x01", "ünï", "plain"]
    encoded = encoder.encode_batch("a.b.c", [(agg, [i], f"corr\t{i}") for i, agg in enumerate(tricky)])
    docs = [orjson.loads(value) for _key, value, _headers in encoded]
    assert [d["aggregate_id"] for d in docs] == tricky
    assert [key for key, _v, _h in encoded] == [agg.encode() for agg in tricky]
    assert {d["source"] for d in docs} == {'svc "quoted"\n'}
    assert [d["correlation_id"] for d in docs] == [f"corr\t{i}" for i in range(len(tricky))]
    assert len({d["id"] for d in docs}) == len(tricky)


def test_caller_traceparent_is_kept_and_a_malformed_one_refused() -> None:
    encoder = EnvelopeEncoder("svc")
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    _key, _value, [(_name, header)] = encoder.encode("a.b.c", "agg", {}, traceparent=parent)
    assert header.decode() == parent
    with pytest.raises(InvalidRequest, match="event 0: traceparent 'abc' is not a W3C trace context"):
        encoder.encode("a.b.c", "agg", {}, traceparent="abc")


def test_unserializable_payload_is_refused_naming_the_event() -> None:
    encoder = EnvelopeEncoder("svc")
    with pytest.raises(InvalidRequest, match=r"event 1 \(aggregate 'b'\): payload is not JSON-serializable") as info:
        encoder.encode_batch("a.b.c", [("a", {}), ("b", {"tags": {1, 2}}), ("c", {})])
    assert info.value.field == "payload"


@pytest.mark.parametrize(("item", "message"), [
    (("", {}), "aggregate_id must be a non-empty string"),
    ((17, {}), "aggregate_id must be a non-empty string"),
    (("agg",), r"expected \(aggregate_id, payload"),
    (("agg", {}, 5), "correlation_id must be a string"),
])
def test_malformed_items_are_refused(item: tuple[object, ...], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        EnvelopeEncoder("svc").encode_batch("a.b.c", [item])


def test_oversize_event_is_refused_with_its_size_and_the_limit() -> None:
    with pytest.raises(InvalidRequest, match=r"is 2,000,\d{3} bytes encoded, more than message.max.bytes = 1,000,000"):
        EnvelopeEncoder("svc").encode("a.b.c", "agg", "x" * 2_000_000, max_bytes=1_000_000)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"compression": "brotli"}, "compression must be one of"),
    ({"lane": "fast"}, "lane must be 'bulk' or 'priority'"),
    ({"bootstrap_servers": ""}, "bootstrap_servers is empty"),
    ({"queue_max_messages": 0}, "queue_max_messages must be positive"),
])
def test_bad_producer_settings_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProducerConfig(**{"bootstrap_servers": "127.0.0.1:9092", **kwargs})  # type: ignore[arg-type]


def test_lanes_are_tuned_differently() -> None:
    assert ProducerConfig("h:1", lane="priority").librdkafka()["linger.ms"] == 0
    assert ProducerConfig("h:1").librdkafka()["linger.ms"] > 0
    assert ConsumerConfig("h:1", "g", lane="priority").librdkafka()["fetch.wait.max.ms"] <= 10
    with pytest.raises(ValueError, match="max_attempts must be positive"):
        ConsumerConfig("h:1", "g", max_attempts=0)


def _message(value: bytes | None, offset: int = 0) -> Message:
    return Message(topic="a.b.c", partition=2, offset=offset, key=b"agg", value=value,
                   headers=[("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")])


def test_envelopes_decode_alike_from_spina_and_from_other_writers() -> None:
    """Spina's own layout is read without orjson (payload decoded on use); an envelope another writer built
    (other field order, whitespace, escapes) goes through orjson: both give the same Events."""
    tricky = ['agg\\1', 'agg"2', "agg\n3", "ünï", "plain"]
    encoded = EnvelopeEncoder('svc "q"').encode_batch("a.b.c", [(agg, {"n": i, "s": agg}, None if i % 2 else f"c{i}")
                                                                for i, agg in enumerate(tricky)], schema_version=3)
    ours = [_message(value, offset) for offset, (_key, value, _headers) in enumerate(encoded)]
    theirs = [_message(orjson.dumps(dict(reversed(list(orjson.loads(m.value()).items()))),
                                    option=orjson.OPT_INDENT_2), m.offset()) for m in ours]
    decoded = [_events.decode_batch(messages) for messages in (ours, theirs)]
    for events, undecodable, errored, offsets in decoded:
        assert not undecodable and not errored and offsets == {("a.b.c", 2): len(tricky)}
        assert [e.aggregate_id for e in events] == tricky
        assert [e.payload for e in events] == [{"n": i, "s": agg} for i, agg in enumerate(tricky)]
        assert [e.correlation_id for e in events] == [None if i % 2 else f"c{i}" for i in range(len(tricky))]
        assert {(e.type, e.source, e.schema_version) for e in events} == {("a.b.c", 'svc "q"', 3)}
        assert events[0].traceparent == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert [e.id for e in decoded[0][0]] == [e.id for e in decoded[1][0]]


def test_values_that_are_not_envelopes_are_undecodable_and_a_bad_payload_fails_on_use() -> None:
    good = EnvelopeEncoder("svc").encode("a.b.c", "agg", {"n": 1})[1]
    broken_payload = good[:-2] + b",}"  # the head is an envelope's, the payload is not JSON
    events, undecodable, _errored, offsets = _events.decode_batch(
        [_message(b"{not json", 0), _message(None, 1), _message(b'{"id":null,"type":"t"}', 2),
         _message(broken_payload, 3)])
    reasons = [reason for _message_, reason in undecodable]
    assert reasons[0].startswith("message value is not JSON") and "tombstone" in reasons[1]
    assert reasons[2].startswith("not a Spina event envelope: missing source")
    assert offsets == {("a.b.c", 2): 4}
    [event] = events
    with pytest.raises(orjson.JSONDecodeError):
        event.payload  # noqa: B018 - the access is what fails


def test_trace_headers_caller_sends_only_callers_traceparents_and_the_reader_derives_the_rest() -> None:
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    sent = EnvelopeEncoder("svc").encode_batch("a.b.c", [("agg", {}), ("agg", {}, None, parent)])
    lean = EnvelopeEncoder("svc", trace_headers=False).encode_batch("a.b.c", [("agg", {}), ("agg", {}, None, parent)])
    assert [headers for _k, _v, headers in lean] == [[], [("traceparent", parent.encode())]]
    for encoded in (sent, lean):
        messages = [Message(topic="a.b.c", partition=0, offset=i, key=key, value=value, headers=headers or None)
                    for i, (key, value, headers) in enumerate(encoded)]
        events = _events.decode_batch(messages)[0]
        assert events[0].traceparent == f"00-{events[0].id}-{events[0].id[16:]}-01"
        assert events[1].traceparent == parent
    assert _events.decode_batch([_message(sent[0][1])])[0][0].traceparent.startswith("00-4bf92f")  # header wins
    with pytest.raises(ValueError, match="trace_headers must be 'always' or 'caller'"):
        ProducerConfig("h:1", trace_headers="never")  # type: ignore[arg-type]
