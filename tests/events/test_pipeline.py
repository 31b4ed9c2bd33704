"""The producer and consumer pipelines against the real single broker of scripts/services.sh."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from prometheus_client import CollectorRegistry

from spina_fast.errors import InvalidRequest, NotFound, Unavailable
from spina_fast.events import (
    ConsumerConfig,
    Event,
    EventConsumer,
    EventProducer,
    PossiblyPersisted,
    ProducerConfig,
    RetentionClass,
    TopicAdmin,
    TopicSpec,
)
from spina_fast.events.consumer import ATTEMPTS_HEADER, ERROR_HEADER, ERROR_TYPE_HEADER
from spina_fast.events.producer import _delivery_error

from .conftest import DEADLINE_S, read_all, unique_topic


async def wait_until(condition: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_s}s waiting for {what}")
        await asyncio.sleep(0.02)


def consumer_config(bootstrap: str, **overrides: Any) -> ConsumerConfig:
    settings: dict[str, Any] = {"group_id": f"g-{uuid.uuid4().hex[:10]}", "retry_backoff_s": 0.01,
                                "retry_backoff_max_s": 0.05, "poll_timeout_s": 0.1, **overrides}
    return ConsumerConfig(bootstrap, **settings)


async def test_events_of_one_aggregate_arrive_in_order_across_partitions(kafka_bootstrap: str,
                                                                        make_topic: Callable[..., str]) -> None:
    seed = 7
    rng = random.Random(seed)
    topic = make_topic("created", partitions=16)
    aggregates = [f"order-{i}" for i in range(300)]
    sequence: dict[str, int] = defaultdict(int)
    batches = []
    for _ in range(20):
        batch = []
        for _ in range(500):
            aggregate = rng.choice(aggregates)
            batch.append((aggregate, {"seq": sequence[aggregate]}))
            sequence[aggregate] += 1
        batches.append(batch)
    total = sum(map(len, batches))

    seen: dict[str, list[int]] = defaultdict(list)
    partitions: dict[str, set[int]] = defaultdict(set)
    count = 0

    async def handle(events: list[Event]) -> None:
        nonlocal count
        for event in events:
            seen[event.aggregate_id].append(event.payload["seq"])
            partitions[event.aggregate_id].add(event.partition)
        count += len(events)

    consumer = EventConsumer(consumer_config(kafka_bootstrap, max_batch=700), [topic], handle,
                             registry=CollectorRegistry())
    task = asyncio.create_task(consumer.run())
    async with EventProducer(ProducerConfig(kafka_bootstrap, source="test")) as producer:
        # Many batches in flight at once: the order per aggregate must still hold.
        futures = [await producer.submit_batch(topic, batch) for batch in batches]
        results = await asyncio.gather(*futures)
    assert all(r.ok for r in results) and sum(r.count for r in results) == total
    await wait_until(lambda: count >= total, f"{total} events (seed {seed})")
    consumer.stop()
    await task
    assert count == total, f"seed {seed}: {count - total} duplicates without any failure"
    for aggregate, seqs in seen.items():
        assert seqs == list(range(sequence[aggregate])), f"seed {seed}: {aggregate} out of order"
        assert len(partitions[aggregate]) == 1
    assert len({p for ps in partitions.values() for p in ps}) > 8  # the aggregates really spread out

    # Stopping committed everything handled: the group's offsets are at the end of every partition.
    check = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": consumer.config.group_id})
    try:
        committed = check.committed([TopicPartition(topic, p) for p in range(16)], timeout=30)
        ends = [check.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] for p in range(16)]
    finally:
        check.close()
    assert [tp.offset for tp in committed] == ends


async def test_single_publish_returns_its_offset_and_stream_delivers(kafka_bootstrap: str,
                                                                     make_topic: Callable[..., str]) -> None:
    topic = make_topic("shipped", partitions=2)
    async with EventProducer(ProducerConfig(kafka_bootstrap, source="shipping")) as producer:
        delivery = await producer.publish(topic, "parcel-1", {"n": 1}, correlation_id="req-9")
        await producer.stream(topic, "parcel-1", {"n": 2})
        await producer.stream_batch(topic, [("parcel-1", {"n": 3}), ("parcel-2", {"n": 4})])
    # close() flushed the fire-and-forget events.
    messages = read_all(kafka_bootstrap, topic, expected=4)
    docs = [orjson.loads(m.value()) for m in messages]
    assert sorted(d["payload"]["n"] for d in docs) == [1, 2, 3, 4]
    first = next(m for m in messages if orjson.loads(m.value())["payload"]["n"] == 1)
    assert (first.partition(), first.offset()) == (delivery.partition, delivery.offset)
    assert orjson.loads(first.value())["id"] == delivery.event_id
    assert dict(first.headers())["traceparent"].startswith(b"00-" + delivery.event_id.encode())


async def test_lean_trace_headers_reach_kafka_only_for_callers_traces(kafka_bootstrap: str,
                                                                      make_topic: Callable[..., str]) -> None:
    topic = make_topic("traced", partitions=1)
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    config = ProducerConfig(kafka_bootstrap, trace_headers="caller")
    async with EventProducer(config) as producer:
        (await producer.publish_batch(topic, [("a", {"n": 0}), ("a", {"n": 1}, None, parent)])).raise_for_failures()
    # What a plain confluent-kafka reader (e.g. tracing middleware) sees:
    headers = [m.headers() for m in read_all(kafka_bootstrap, topic, expected=2)]
    assert headers == [None, [("traceparent", parent.encode())]]
    received: list[Event] = []
    consumer = EventConsumer(consumer_config(kafka_bootstrap), [topic], received.extend, registry=CollectorRegistry())
    task = asyncio.create_task(consumer.run())
    await wait_until(lambda: len(received) == 2, "both events")
    consumer.stop()
    await task
    assert received[0].traceparent == f"00-{received[0].id}-{received[0].id[16:]}-01"
    assert received[1].traceparent == parent


async def test_a_full_local_queue_makes_publishing_wait_and_drops_nothing(kafka_bootstrap: str,
                                                                         make_topic: Callable[..., str]) -> None:
    topic = make_topic("queued", partitions=4)
    # A 50-event local queue and batches of 2,000: every batch has to wait for room many times.
    config = ProducerConfig(kafka_bootstrap, queue_max_messages=50)
    async with EventProducer(config) as producer:
        futures = [await producer.submit_batch(topic, [(f"k{i % 9}", {"n": b * 2000 + i}) for i in range(2000)])
                   for b in range(3)]
        await producer.stream_batch(topic, [("k0", {"n": 6000 + i}) for i in range(500)])
        results = await asyncio.gather(*futures)
    assert all(r.ok and r.count == 2000 for r in results)
    numbers = sorted(orjson.loads(m.value())["payload"]["n"] for m in read_all(kafka_bootstrap, topic, expected=6500))
    assert numbers == list(range(6500))


async def test_poison_event_goes_to_the_dlq_with_its_error_and_the_pipeline_continues(
        kafka_bootstrap: str, make_topic: Callable[..., str]) -> None:
    topic = make_topic("paid", partitions=3)
    handled: list[int] = []
    calls = 0

    def handle(events: list[Event]) -> None:  # a synchronous handler
        nonlocal calls
        calls += 1
        for event in events:
            if event.payload.get("poison"):
                raise ValueError(f"cannot bill {event.aggregate_id}")
        handled.extend(e.payload["n"] for e in events)

    async with EventProducer(ProducerConfig(kafka_bootstrap)) as producer:
        items = [(f"inv-{n % 5}", {"n": n, "poison": n == 13}) for n in range(40)]
        (await producer.publish_batch(topic, items)).raise_for_failures()
    # Also a message that is not an envelope at all, from a plain producer.
    raw = Producer({"bootstrap.servers": kafka_bootstrap})
    raw.produce(topic, b"{not json", b"inv-1")
    raw.flush(30)

    consumer = EventConsumer(consumer_config(kafka_bootstrap, max_attempts=2), [topic], handle,
                             registry=CollectorRegistry())
    task = asyncio.create_task(consumer.run())
    await wait_until(lambda: len(set(handled)) == 39 and consumer.dead_lettered == 2, "39 events and 2 dead letters")
    consumer.stop()
    await task
    assert sorted(set(handled)) == [n for n in range(40) if n != 13]

    dead = read_all(kafka_bootstrap, f"{topic}.dlq", expected=2)
    by_kind = {dict(m.headers())[ERROR_TYPE_HEADER].decode(): m for m in dead}
    assert set(by_kind) == {"ValueError", "EnvelopeError"}
    poison = by_kind["ValueError"]
    headers = dict(poison.headers())
    assert headers[ERROR_HEADER] == b"ValueError: cannot bill inv-3"
    assert headers[ATTEMPTS_HEADER] == b"2"
    assert headers["spina-original-topic"] == topic.encode()
    assert headers["traceparent"].startswith(b"00-")  # the event's own headers are kept
    assert orjson.loads(poison.value())["payload"]["n"] == 13 and poison.key() == b"inv-3"
    undecodable = dict(by_kind["EnvelopeError"].headers())
    assert undecodable[ERROR_HEADER].startswith(b"message value is not JSON")
    assert undecodable[ATTEMPTS_HEADER] == b"0"


async def test_async_handler_is_retried_with_backoff_until_it_succeeds(kafka_bootstrap: str,
                                                                      make_topic: Callable[..., str]) -> None:
    topic = make_topic("retried")
    attempts = 0
    handled: list[Event] = []

    async def flaky(events: list[Event]) -> None:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise ConnectionError("downstream not ready")
        handled.extend(events)

    async with EventProducer(ProducerConfig(kafka_bootstrap)) as producer:
        await producer.publish(topic, "a-1", {"x": 1})
    consumer = EventConsumer(consumer_config(kafka_bootstrap, max_attempts=3), [topic], flaky,
                             registry=CollectorRegistry())
    task = asyncio.create_task(consumer.run())
    await wait_until(lambda: len(handled) == 1, "the event after two failed attempts")
    consumer.stop()
    await task
    assert attempts == 3 and consumer.dead_lettered == 0


async def test_consumer_lag_is_exported_per_partition_and_reaches_zero(kafka_bootstrap: str,
                                                                      make_topic: Callable[..., str]) -> None:
    topic = make_topic("counted", partitions=2)
    registry = CollectorRegistry()
    async with EventProducer(ProducerConfig(kafka_bootstrap)) as producer:
        (await producer.publish_batch(topic, [(f"k{i % 7}", {"i": i}) for i in range(300)])).raise_for_failures()
    config = consumer_config(kafka_bootstrap, max_batch=10, lag_interval_s=0.01)
    lags_seen: list[float] = []

    def sample() -> float:
        return sum(registry.get_sample_value("spina_events_consumer_lag",
                                             {"topic": topic, "partition": str(p), "group": config.group_id}) or 0
                   for p in range(2))

    def handle(events: list[Event]) -> None:
        lags_seen.append(sample())

    consumer = EventConsumer(config, [topic], handle, registry=registry)
    task = asyncio.create_task(consumer.run())
    await wait_until(lambda: consumer.handled == 300, "300 events")
    # Each partition's sample exists (it has events) and drops to 0 once its last batch is stored.
    await wait_until(lambda: all(registry.get_sample_value(
        "spina_events_consumer_lag", {"topic": topic, "partition": str(p), "group": config.group_id}) == 0
        for p in range(2)), "lag 0 on both partitions")
    assert max(lags_seen) > 0
    consumer.stop()
    await task
    # A stopped consumer no longer reports partitions it does not own.
    assert registry.get_sample_value("spina_events_consumer_lag",
                                     {"topic": topic, "partition": "0", "group": config.group_id}) is None


async def test_priority_lane_delivers_through_its_own_producer_and_consumer(kafka_bootstrap: str,
                                                                           make_topic: Callable[..., str]) -> None:
    topic = make_topic("alerted", partitions=1)
    received: list[Event] = []
    # A fresh, empty topic: "earliest" cannot replay anything old, and unlike "latest" it cannot skip an
    # event published before the consumer looked up its starting offset.
    consumer = EventConsumer(consumer_config(kafka_bootstrap, lane="priority"), [topic], received.extend,
                             registry=CollectorRegistry())
    task = asyncio.create_task(consumer.run())
    await wait_until(lambda: bool(consumer.assigned), "the priority consumer's assignment")
    async with EventProducer(ProducerConfig(kafka_bootstrap, lane="priority")) as producer:
        for i in range(20):
            await producer.publish(topic, "fraud-1", {"i": i})
            await wait_until(lambda i=i: len(received) == i + 1, f"priority event {i}")  # type: ignore[misc]
    consumer.stop()
    await task
    assert [e.payload["i"] for e in received] == list(range(20))


async def test_unknown_topics_are_refused_by_producer_and_consumer(kafka_bootstrap: str) -> None:
    missing = unique_topic("missing")
    async with EventProducer(ProducerConfig(kafka_bootstrap)) as producer:
        with pytest.raises(NotFound, match=rf"topic '{missing}' does not exist.*provision it first"):
            await producer.publish(missing, "a", {})
        with pytest.raises(InvalidRequest, match="does not follow"):
            await producer.publish("NotAConvention", "a", {})
    consumer = EventConsumer(consumer_config(kafka_bootstrap), [missing], list, registry=CollectorRegistry())
    with pytest.raises(NotFound, match=f"{missing}, {missing}.dlq do not exist"):
        await consumer.run()
    # Nothing was auto-created on the broker by asking.
    assert missing not in TopicAdmin(kafka_bootstrap).list_topics()


async def test_bad_events_are_refused_before_anything_is_sent(kafka_bootstrap: str,
                                                              make_topic: Callable[..., str]) -> None:
    topic = make_topic("refused")
    async with EventProducer(ProducerConfig(kafka_bootstrap, message_max_bytes=100_000)) as producer:
        with pytest.raises(InvalidRequest, match=r"event 1 .*payload is not JSON-serializable"):
            await producer.publish_batch(topic, [("a", {}), ("b", object()), ("c", {})])
        with pytest.raises(InvalidRequest, match=r"more than message\.max\.bytes = 100,000"):
            await producer.publish(topic, "a", {"blob": "x" * 200_000})
        await producer.publish(topic, "a", {"ok": True})
    assert [orjson.loads(m.value())["payload"] for m in read_all(kafka_bootstrap, topic, expected=1)] == [{"ok": True}]


async def test_broker_down_at_start_is_a_clear_error_after_retrying(kafka_bootstrap: str) -> None:
    dead = "127.0.0.1:1"  # nothing listens on port 1
    producer = EventProducer(ProducerConfig(dead, connect_timeout_s=1.5))
    with pytest.raises(Unavailable, match=r"no Kafka broker answered at 127\.0\.0\.1:1 within 1\.5s \(\d+ attempts"):
        await producer.start()
    consumer = EventConsumer(ConsumerConfig(dead, "g", connect_timeout_s=1.0), ["a.b.c"], list,
                             registry=CollectorRegistry())
    with pytest.raises(Unavailable, match="no Kafka broker answered"):
        await consumer.run()


async def test_producer_waits_for_a_broker_that_comes_up_during_start(
        kafka_bootstrap: str, make_topic: Callable[..., str], caplog: pytest.LogCaptureFixture) -> None:
    """The bootstrap address answers only after a while (a TCP relay to the broker, started late)."""
    caplog.set_level(logging.WARNING, "spina_fast.events")
    topic = make_topic("late")
    host, port = kafka_bootstrap.split(":")
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    relay_port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            return
        finally:
            writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    producer = EventProducer(ProducerConfig(f"127.0.0.1:{relay_port}", connect_timeout_s=60))
    starting = asyncio.create_task(producer.start())
    await wait_until(lambda: any("not reachable yet, retrying" in r.getMessage() for r in caplog.records),
                     "start()'s first attempt to fail")
    assert not starting.done()
    server = await asyncio.start_server(relay, "127.0.0.1", relay_port)
    try:
        await asyncio.wait_for(starting, DEADLINE_S)
        delivery = await producer.publish(topic, "late-1", {"ok": True})
        assert delivery.offset == 0
        await producer.close()
    finally:
        server.close()


def test_timeouts_in_flight_are_reported_possibly_persisted() -> None:
    timed_out = _delivery_error("a.b.c", b"agg", b'{"id":"e1"}', KafkaError._MSG_TIMED_OUT, True)
    assert isinstance(timed_out, PossiblyPersisted) and timed_out.event_id == "e1"
    assert "possibly persisted" in timed_out.message and timed_out.kafka_error == "_MSG_TIMED_OUT"
    # Timed out before it left the local queue: librdkafka knows it was not written.
    queued = _delivery_error("a.b.c", b"agg", b'{"id":"e3"}', KafkaError._MSG_TIMED_OUT, False)
    assert not isinstance(queued, PossiblyPersisted) and "was not written" in queued.message
    refused = _delivery_error("a.b.c", b"agg", b'{"id":"e2"}', KafkaError.MSG_SIZE_TOO_LARGE, False)
    assert not isinstance(refused, PossiblyPersisted) and refused.kafka_error == "MSG_SIZE_TOO_LARGE"


def test_retention_classes_land_on_the_broker_and_mismatches_are_only_reported(kafka_bootstrap: str) -> None:
    admin = TopicAdmin(kafka_bootstrap)
    specs = [TopicSpec(unique_topic("default")), TopicSpec(unique_topic("state"), RetentionClass.COMPACTED),
             TopicSpec(unique_topic("audited"), RetentionClass.AUDIT, expected_events_per_s=30_000)]
    report = admin.ensure(specs)
    try:
        names = [s.name for s in specs]
        assert report.ok and sorted(report.created) == sorted(names + [f"{name}.dlq" for name in names])
        configs = admin.describe([s.name for s in specs])
        default, compacted, audit = (configs[s.name] for s in specs)
        assert (default["cleanup.policy"], default["retention.ms"]) == ("delete", str(7 * 24 * 3600 * 1000))
        assert compacted["cleanup.policy"] == "compact"
        assert (audit["cleanup.policy"], audit["retention.ms"], audit["retention.bytes"]) == ("delete", "-1", "-1")
        assert admin.list_topics()[specs[2].name] == 3  # 30k events/s -> 3 partitions
        # Asking again changes nothing; asking for something else reports, and still changes nothing.
        again = admin.ensure(specs)
        assert again.ok and not again.created
        wrong = TopicSpec(specs[0].name, RetentionClass.AUDIT, partitions=4)
        mismatches = {(m.setting, m.expected, m.actual) for m in admin.ensure([wrong], with_dlq=False).mismatches}
        assert mismatches == {("partitions", "4", "6"), ("retention.ms", "-1", str(7 * 24 * 3600 * 1000))}
        assert admin.describe([specs[0].name])[specs[0].name]["retention.ms"] == str(7 * 24 * 3600 * 1000)
    finally:
        admin.delete(report.created)


def test_compacted_topic_keeps_the_last_value_per_key(kafka_bootstrap: str) -> None:
    admin = TopicAdmin(kafka_bootstrap)
    # Small segments that roll quickly and a cleaner that takes any dirty segment; the broker's cleaner
    # still only looks every log.cleaner.backoff.ms (15 s by default), hence the generous deadline.
    spec = TopicSpec(unique_topic("state"), RetentionClass.COMPACTED, partitions=1,
                     config={"segment.ms": "100", "min.cleanable.dirty.ratio": "0.01", "delete.retention.ms": "100",
                             "min.compaction.lag.ms": "0", "max.compaction.lag.ms": "100"})
    admin.ensure([spec], with_dlq=False)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    keys = [f"account-{i}".encode() for i in range(5)]
    try:
        for version in range(20):
            for key in keys:
                producer.produce(spec.name, b"v%d" % version, key)
            producer.flush(30)
        deadline = time.monotonic() + 150
        while True:
            # Each round also rolls the active segment (segment.ms has passed), making the last one cleanable.
            producer.produce(spec.name, b"roll", b"roller")
            producer.flush(30)
            messages = read_all(kafka_bootstrap, spec.name)
            latest = {m.key(): m.value() for m in messages}
            per_key = defaultdict(int)
            for m in messages:
                per_key[m.key()] += 1
            if all(per_key[k] == 1 for k in keys):
                break
            assert time.monotonic() < deadline, f"not compacted yet: {dict(per_key)}"
            time.sleep(1)  # the broker's cleaner runs on its own schedule; nothing to wait on but time
        assert {k: latest[k] for k in keys} == {k: b"v19" for k in keys}
    finally:
        admin.delete([spec.name])
