"""The consumer's native lane (spina_fast._kafka_native.NativeConsumer: librdkafka's consumer C API from Cython).

What it reads is written by a plain confluent-kafka Producer (a client Spina did not write), and what it
dead-letters is read back with a plain confluent-kafka Consumer (read_all).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from confluent_kafka import KafkaError, Producer
from prometheus_client import CollectorRegistry

from spina_fast import _kafka_native
from spina_fast.errors import InvalidRequest
from spina_fast.events import ConsumerConfig, Event, EventConsumer, EventProducer, ProducerConfig
from spina_fast.events.consumer import ATTEMPTS_HEADER, ERROR_HEADER, ERROR_TYPE_HEADER
from spina_fast.events.envelope import EnvelopeEncoder

from .conftest import read_all
from .test_pipeline import consumer_config, wait_until

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_error_codes_agree_with_confluent_kafka() -> None:
    assert _kafka_native.ERR_ASSIGN_PARTITIONS == KafkaError._ASSIGN_PARTITIONS
    assert _kafka_native.ERR_REVOKE_PARTITIONS == KafkaError._REVOKE_PARTITIONS
    assert _kafka_native.ERR_PARTITION_EOF == KafkaError._PARTITION_EOF
    assert _kafka_native.ERR_NO_OFFSET == KafkaError._NO_OFFSET
    assert _kafka_native.ERR_FATAL == KafkaError._FATAL


def test_bad_settings_are_refused_naming_the_key() -> None:
    base = {"bootstrap.servers": "127.0.0.1:1", "group.id": "g"}
    with pytest.raises(InvalidRequest, match=r"librdkafka setting 'no.such.setting' = 1: .*No such configuration"):
        _kafka_native.NativeConsumer({**base, "no.such.setting": 1})
    with pytest.raises(InvalidRequest, match=r"librdkafka setting 'fetch.wait.max.ms' = 'soon'"):
        _kafka_native.NativeConsumer({**base, "fetch.wait.max.ms": "soon"})
    with pytest.raises(InvalidRequest, match=r"'error_cb': callbacks are not supported"):
        _kafka_native.NativeConsumer({**base, "error_cb": print})


async def test_bad_consumer_config_extra_fails_run_with_the_key() -> None:
    config = ConsumerConfig("127.0.0.1:1", "g", extra={"auto.offset.reset": "sometime"})
    consumer = EventConsumer(config, ["a.b.c"], lambda events: None, registry=CollectorRegistry())
    with pytest.raises(InvalidRequest, match=r"'auto.offset.reset' = 'sometime'"):
        await consumer.run()


async def test_plain_producer_messages_become_events_with_their_key_and_headers(
        kafka_bootstrap: str, make_topic: Callable[..., str]) -> None:
    """Spina's own layout, another writer's layout, another key than the aggregate id, extra headers and none:
    each Event reads the same, and its message (rebuilt on use) has exactly what the producer sent."""
    topic = make_topic("mixed", partitions=1)
    encoder = EnvelopeEncoder("elsewhere")
    spina_key, spina_value, spina_headers = encoder.encode("a.b.c", "agg-1", {"n": 1})
    _key, lean_value, _headers = EnvelopeEncoder("elsewhere", trace_headers=False).encode("a.b.c", "agg-2", {"n": 2})
    other_layout = orjson.dumps({"payload": {"n": 3}, "correlation_id": "c-3", "schema_version": 2,
                                 "time": "2026-01-01T00:00:00.000Z", "aggregate_id": "agg-3", "source": "java",
                                 "type": "a.b.c", "id": uuid.uuid4().hex}, option=orjson.OPT_INDENT_2)
    sent: list[tuple[bytes, bytes, Any]] = [
        (spina_key, spina_value, spina_headers),                       # as Spina's producer sends it
        (b"agg-2", lean_value, None),                                  # trace_headers="caller": no header
        (b"not-the-aggregate", other_layout, [("traceparent", TRACEPARENT.encode()), ("tenant", b"acme"),
                                              ("tenant", b"second"), ("empty", None)]),
    ]
    raw = Producer({"bootstrap.servers": kafka_bootstrap})
    for key, value, headers in sent:
        raw.produce(topic, value, key, headers=headers)
    assert raw.flush(30) == 0

    received: list[Event] = []
    consumer = EventConsumer(consumer_config(kafka_bootstrap), [topic], received.extend,
                             registry=CollectorRegistry())
    task = asyncio.create_task(consumer.run())
    await wait_until(lambda: len(received) == 3, "3 events")
    consumer.stop()
    await task
    spina, lean, other = received
    assert [e.aggregate_id for e in received] == ["agg-1", "agg-2", "agg-3"]
    assert [e.payload for e in received] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert (other.source, other.schema_version, other.correlation_id) == ("java", 2, "c-3")
    assert [e.offset for e in received] == [0, 1, 2] and {e.topic for e in received} == {topic}
    assert spina.traceparent == f"00-{spina.id}-{spina.id[16:]}-01" == spina_headers[0][1].decode()
    assert lean.traceparent == f"00-{lean.id}-{lean.id[16:]}-01"
    assert other.traceparent == TRACEPARENT
    for event, (key, value, headers) in zip(received, sent, strict=True):
        message = event.message
        assert (message.topic(), message.partition(), message.offset()) == (topic, 0, event.offset)
        assert (message.key(), message.value(), message.headers()) == (key, value, headers)


async def test_dead_letters_keep_the_original_headers_key_and_value(kafka_bootstrap: str,
                                                                    make_topic: Callable[..., str]) -> None:
    topic = make_topic("refused", partitions=2)
    _key, value, _headers = EnvelopeEncoder("elsewhere").encode("a.b.c", "agg-1", {"poison": True})
    headers: list[tuple[str, str | bytes | None]] = [("traceparent", TRACEPARENT.encode()), ("tenant", b"acme"),
                                                     ("tenant", b"second")]
    raw = Producer({"bootstrap.servers": kafka_bootstrap})
    raw.produce(topic, value, b"key-1", headers=headers)            # an envelope the handler refuses
    raw.produce(topic, b"\x00binary", b"key-2", headers=headers)     # not an envelope at all
    assert raw.flush(30) == 0

    def handle(events: list[Event]) -> None:
        if any(e.payload.get("poison") for e in events):
            raise LookupError("no such tenant")

    consumer = EventConsumer(consumer_config(kafka_bootstrap, max_attempts=2), [topic], handle,
                             registry=CollectorRegistry())
    task = asyncio.create_task(consumer.run())
    await wait_until(lambda: consumer.dead_lettered == 2, "2 dead letters")
    consumer.stop()
    await task

    dead = {m.key(): m for m in read_all(kafka_bootstrap, f"{topic}.dlq", expected=2)}
    assert set(dead) == {b"key-1", b"key-2"}
    assert dead[b"key-1"].value() == value and dead[b"key-2"].value() == b"\x00binary"
    for key, message in dead.items():
        got = message.headers()
        assert got[:3] == headers, f"{key!r}: original headers first, in order"
        added = dict(got[3:])
        assert added["spina-original-topic"] == topic.encode()
        assert ERROR_HEADER in added and ATTEMPTS_HEADER in added
    assert dict(dead[b"key-1"].headers())[ERROR_TYPE_HEADER] == b"LookupError"
    assert dict(dead[b"key-2"].headers())[ERROR_TYPE_HEADER] == b"EnvelopeError"


@pytest.mark.parametrize("strategy", ["range", "cooperative-sticky"])
async def test_two_consumers_rebalancing_lose_nothing_and_duplicate_at_most_a_batch(
        kafka_bootstrap: str, make_topic: Callable[..., str], strategy: str) -> None:
    """A second consumer joins mid-stream (the first gives partitions up: commit on revoke), then the first
    leaves (the second takes everything). Eager ("range") and cooperative ("cooperative-sticky") protocols."""
    topic = make_topic("shared", partitions=6)
    rng = random.Random(7)
    max_batch = 50
    config = consumer_config(kafka_bootstrap, max_batch=max_batch, batch_wait_s=0.005,
                             extra={"partition.assignment.strategy": strategy})
    seen: list[int] = []
    by_consumer: dict[str, list[int]] = {"a": [], "b": []}

    def handler(name: str) -> Callable[[list[Event]], Any]:
        async def handle(events: list[Event]) -> None:
            numbers = [e.payload["n"] for e in events]
            seen.extend(numbers)
            by_consumer[name].extend(numbers)
            await asyncio.sleep(0)  # let the producer and the other consumer run between batches
        return handle

    first = EventConsumer(config, [topic], handler("a"), registry=CollectorRegistry())
    second = EventConsumer(config, [topic], handler("b"), registry=CollectorRegistry())
    published = 0

    async def publish(producer: EventProducer, count: int) -> None:
        nonlocal published
        items = [(f"agg-{rng.randrange(40)}", {"n": published + i}) for i in range(count)]
        (await producer.publish_batch(topic, items)).raise_for_failures()
        published += count

    async with EventProducer(ProducerConfig(kafka_bootstrap, linger_ms=1)) as producer:
        first_task = asyncio.create_task(first.run())
        await wait_until(lambda: len(first.assigned) == 6, "the first consumer owning all 6 partitions")
        await publish(producer, 600)
        await wait_until(lambda: len(seen) >= 200, "the first consumer under way")
        second_task = asyncio.create_task(second.run())
        for _ in range(8):  # publishing on while the group rebalances
            await publish(producer, 150)
        await wait_until(lambda: bool(first.assigned) and bool(second.assigned)
                         and len(first.assigned | second.assigned) == 6, "the partitions shared by both")
        await wait_until(lambda: set(seen) >= set(range(published)), "every event so far")
        first.stop()
        await first_task
        await wait_until(lambda: len(second.assigned) == 6, "the second consumer owning all 6 partitions")
        await publish(producer, 600)
        await wait_until(lambda: set(seen) >= set(range(published)), "every event")
        second.stop()
        await second_task

    assert set(seen) == set(range(published)), "no event lost"
    duplicates = sum(count - 1 for count in Counter(seen).values())
    assert duplicates <= max_batch, f"{duplicates} duplicates, more than a batch ({max_batch})"
    assert by_consumer["a"] and by_consumer["b"]
