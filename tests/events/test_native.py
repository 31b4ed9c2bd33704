"""The producer's native lane (spina_fast._kafka_native: librdkafka's C API called from Cython).

What the broker got is read back with a plain confluent-kafka Consumer (read_all); the timeouts are provoked
with librdkafka's own mock broker (a Kafka server someone else wrote), reached through ctypes.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from confluent_kafka import KafkaError

from spina_fast import _kafka_native
from spina_fast.errors import InvalidRequest, Unavailable
from spina_fast.events import DeliveryFailed, EventProducer, PossiblyPersisted, ProducerConfig

from .conftest import DEADLINE_S, read_all

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_binds_to_the_librdkafka_confluent_kafka_loaded() -> None:
    import confluent_kafka

    path, version = _kafka_native.library()
    assert os.path.exists(path) and "librdkafka" in os.path.basename(path)
    assert version == confluent_kafka.libversion()[0]
    assert confluent_kafka.libversion()[1] >= _kafka_native.MIN_VERSION
    # Our own declarations of librdkafka's enum values agree with the library and with confluent-kafka's.
    assert _kafka_native.ERR_QUEUE_FULL == KafkaError._QUEUE_FULL
    assert _kafka_native.error_name(KafkaError._QUEUE_FULL) == "_QUEUE_FULL"
    assert _kafka_native.error_name(KafkaError.MSG_SIZE_TOO_LARGE) == "MSG_SIZE_TOO_LARGE"


class _Recorder:
    """Stands in for the producer's NativeProducer and records what each produce() call returned."""

    def __init__(self, native: Any) -> None:
        self.native = native
        self.results: list[tuple[int, int]] = []

    def produce(self, *args: Any) -> tuple[int, int]:
        result: tuple[int, int] = self.native.produce(*args)
        self.results.append(result)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.native, name)


async def test_batches_report_per_batch_and_a_plain_consumer_reads_key_headers_value(
        kafka_bootstrap: str, make_topic: Callable[..., str]) -> None:
    topic = make_topic("written", partitions=4)
    sizes = [1, 7, 500, 1200]
    async with EventProducer(ProducerConfig(kafka_bootstrap, source="native-test")) as producer:
        futures = [await producer.submit_batch(topic, [(f"agg-{i % 5}", {"batch": b, "i": i}, "corr-1")
                                                       for i in range(size)])
                   for b, size in enumerate(sizes)]
        with_caller_trace = await producer.publish(topic, "agg-x", {"traced": True}, traceparent=TRACEPARENT)
        results = [await future for future in futures]
        assert len(producer) == 0
    assert [r.count for r in results] == sizes and all(r.ok for r in results)
    assert with_caller_trace.topic == topic and with_caller_trace.offset >= 0
    messages = read_all(kafka_bootstrap, topic, expected=sum(sizes) + 1)
    assert len(messages) == sum(sizes) + 1
    by_id = {}
    for message in messages:
        doc = orjson.loads(message.value())
        assert message.key() == doc["aggregate_id"].encode()
        headers = message.headers()
        assert headers is not None and len(headers) == 1 and headers[0][0] == "traceparent"
        by_id[doc["id"]] = (message, doc)
    message, doc = by_id[with_caller_trace.event_id]
    assert message.headers() == [("traceparent", TRACEPARENT.encode())]
    assert (message.partition(), message.offset()) == (with_caller_trace.partition, with_caller_trace.offset)
    assert doc["payload"] == {"traced": True} and doc["source"] == "native-test"
    for event_id, (message, doc) in by_id.items():
        if event_id != with_caller_trace.event_id:
            assert message.headers() == [("traceparent", f"00-{event_id}-{event_id[16:]}-01".encode())]
            assert doc["correlation_id"] == "corr-1" and doc["type"] == topic
    # Per aggregate, the order of publishing.
    seen: dict[bytes, list[tuple[int, int]]] = {}
    for message in sorted(messages, key=lambda m: (m.partition(), m.offset())):
        payload = orjson.loads(message.value())["payload"]
        if "batch" in payload:
            seen.setdefault(message.key(), []).append((payload["batch"], payload["i"]))
    assert all(order == sorted(order) for order in seen.values())


async def test_a_full_local_queue_is_waited_for_never_dropped(kafka_bootstrap: str,
                                                             make_topic: Callable[..., str]) -> None:
    topic = make_topic("squeezed", partitions=2)
    async with EventProducer(ProducerConfig(kafka_bootstrap, queue_max_messages=20)) as producer:
        recorder = _Recorder(producer._producer)
        producer._producer = recorder  # type: ignore[assignment]
        futures = [await producer.submit_batch(topic, [(f"k{i % 3}", {"b": b, "i": i}) for i in range(300)])
                   for b in range(3)]
        results = [await future for future in futures]
        producer._producer = recorder.native
    assert all(r.ok and r.count == 300 for r in results)
    assert any(code == _kafka_native.ERR_QUEUE_FULL for _position, code in recorder.results), recorder.results
    messages = read_all(kafka_bootstrap, topic, expected=900)
    assert len(messages) == 900
    for key in (b"k0", b"k1", b"k2"):
        order = [(p["b"], p["i"]) for p in (orjson.loads(m.value())["payload"]
                                            for m in sorted(messages, key=lambda m: m.offset()) if m.key() == key)]
        assert order == sorted(order) and len(order) == 300


async def test_an_event_librdkafka_finds_too_large_is_refused(kafka_bootstrap: str,
                                                             make_topic: Callable[..., str]) -> None:
    """The envelope fits message.max.bytes, but key + value + header do not: librdkafka refuses it in
    producev. Alone, that is an InvalidRequest; inside a batch, the events before it are written and the
    rest of the batch is reported failed."""
    topic = make_topic("oversized")
    limit = 20_000
    big_key = "k" * 3_000
    filler = {"pad": "x" * (limit - 3_400)}
    async with EventProducer(ProducerConfig(kafka_bootstrap, message_max_bytes=limit)) as producer:
        with pytest.raises(InvalidRequest, match=r"larger than message\.max\.bytes = 20,000"):
            await producer.publish(topic, big_key, filler)
        result = await producer.publish_batch(topic, [("a", {"i": 0}), ("b", {"i": 1}), (big_key, filler),
                                                      ("c", {"i": 3})])
    assert result.count == 4 and result.delivered == 2
    assert [f.kafka_error for f in result.failed] == ["MSG_SIZE_TOO_LARGE", "MSG_SIZE_TOO_LARGE"]
    assert all(type(f) is DeliveryFailed for f in result.failed)
    assert [f.aggregate_id for f in result.failed] == [big_key, "c"]
    written = read_all(kafka_bootstrap, topic, expected=2)
    assert sorted(orjson.loads(m.value())["payload"]["i"] for m in written) == [0, 1]


@pytest.mark.parametrize(("extra", "key"), [({"no.such.setting": 1}, "no.such.setting"),
                                             ({"linger.ms": "soon"}, "linger.ms"),
                                             ({"error_cb": print}, "error_cb")])
async def test_a_bad_librdkafka_setting_is_an_invalid_request_naming_it(extra: dict[str, Any], key: str) -> None:
    producer = EventProducer(ProducerConfig("127.0.0.1:1", extra=extra))
    with pytest.raises(InvalidRequest, match=f"librdkafka setting '{key}'") as caught:
        await producer.start()
    assert caught.value.field == key


async def test_settings_librdkafka_refuses_together_are_an_invalid_request() -> None:
    producer = EventProducer(ProducerConfig("127.0.0.1:1", extra={"acks": 1}))  # idempotence needs acks=all
    with pytest.raises(InvalidRequest, match=r"librdkafka refused the producer settings: .*acks"):
        await producer.start()


class _MockCluster:
    """librdkafka's mock Kafka cluster (rd_kafka_mock_*, in the same library), driven through ctypes: a real
    TCP broker whose round-trip time and liveness the test controls."""

    def __init__(self) -> None:
        lib = self.lib = ctypes.CDLL(_kafka_native.library()[0])
        lib.rd_kafka_conf_new.restype = ctypes.c_void_p
        lib.rd_kafka_conf_set.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                          ctypes.c_size_t]
        lib.rd_kafka_new.restype = ctypes.c_void_p
        lib.rd_kafka_new.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        lib.rd_kafka_destroy.argtypes = [ctypes.c_void_p]
        lib.rd_kafka_mock_cluster_new.restype = ctypes.c_void_p
        lib.rd_kafka_mock_cluster_new.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.rd_kafka_mock_cluster_destroy.argtypes = [ctypes.c_void_p]
        lib.rd_kafka_mock_cluster_bootstraps.restype = ctypes.c_char_p
        lib.rd_kafka_mock_cluster_bootstraps.argtypes = [ctypes.c_void_p]
        lib.rd_kafka_mock_topic_create.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
        lib.rd_kafka_mock_broker_set_rtt.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int]
        lib.rd_kafka_mock_broker_set_down.argtypes = [ctypes.c_void_p, ctypes.c_int32]
        errstr = ctypes.create_string_buffer(512)
        conf = lib.rd_kafka_conf_new()
        lib.rd_kafka_conf_set(conf, b"log_level", b"0", errstr, 512)  # the host handle never connects anywhere
        self.rk = lib.rd_kafka_new(0, conf, errstr, 512)
        assert self.rk, errstr.value
        self.cluster = lib.rd_kafka_mock_cluster_new(self.rk, 1)
        assert self.cluster
        self.bootstrap: str = lib.rd_kafka_mock_cluster_bootstraps(self.cluster).decode()

    def create_topic(self, name: str) -> str:
        assert self.lib.rd_kafka_mock_topic_create(self.cluster, name.encode(), 2, 1) == 0
        return name

    def set_rtt(self, rtt_ms: int) -> None:
        assert self.lib.rd_kafka_mock_broker_set_rtt(self.cluster, 1, rtt_ms) == 0

    def set_down(self) -> None:
        assert self.lib.rd_kafka_mock_broker_set_down(self.cluster, 1) == 0

    def close(self) -> None:
        self.lib.rd_kafka_mock_cluster_destroy(self.cluster)
        self.lib.rd_kafka_destroy(self.rk)


@pytest.fixture
def mock_cluster() -> Iterator[_MockCluster]:
    cluster = _MockCluster()
    yield cluster
    cluster.close()


async def test_a_batch_that_times_out_in_flight_is_possibly_persisted(mock_cluster: _MockCluster) -> None:
    topic = mock_cluster.create_topic("mock.batch.sent")
    config = ProducerConfig(mock_cluster.bootstrap, delivery_timeout_ms=1_500, extra={"log_level": 0})
    async with EventProducer(config) as producer:
        first = await producer.publish(topic, "k", {"n": 0})
        assert first.offset == 0
        # The broker now answers 5 s late: the request is sent, its events time out in flight, and the
        # broker may or may not have written them.
        mock_cluster.set_rtt(5_000)
        result = await producer.publish_batch(topic, [("k", {"n": n}) for n in range(1, 6)])
        with pytest.raises(PossiblyPersisted, match="possibly persisted"):
            result.raise_for_failures()
    assert result.count == 5 and len(result.failed) == 5
    assert all(isinstance(f, PossiblyPersisted) and f.kafka_error == "_MSG_TIMED_OUT" for f in result.failed)
    assert len({f.event_id for f in result.failed}) == 5


async def test_events_that_never_left_the_queue_are_not_written_not_possibly_persisted(
        mock_cluster: _MockCluster) -> None:
    topic = mock_cluster.create_topic("mock.batch.queued")
    config = ProducerConfig(mock_cluster.bootstrap, delivery_timeout_ms=1_500, extra={"log_level": 0})
    async with EventProducer(config) as producer:
        await producer.publish(topic, "k", {"n": 0})
        mock_cluster.set_down()  # nothing is sent any more: the events time out in the local queue
        result = await producer.publish_batch(topic, [("k", {"n": n}) for n in range(1, 4)])
        with pytest.raises(DeliveryFailed, match="was not written") as caught:
            await producer.publish(topic, "k", {"n": 4})
    assert not isinstance(caught.value, PossiblyPersisted)
    assert result.count == 3 and [f.kafka_error for f in result.failed] == ["_MSG_TIMED_OUT"] * 3
    assert not any(isinstance(f, PossiblyPersisted) for f in result.failed)


async def test_close_reports_what_it_purges_and_stream_needs_no_reports(mock_cluster: _MockCluster) -> None:
    topic = mock_cluster.create_topic("mock.batch.purged")
    producer = await EventProducer(ProducerConfig(mock_cluster.bootstrap, extra={"log_level": 0})).start()
    await producer.publish(topic, "k", {"n": 0})
    mock_cluster.set_down()
    future = await producer.submit_batch(topic, [("k", {"n": n}) for n in range(1, 4)])
    await producer.stream(topic, "k", {"n": 4})
    assert len(producer) == 4
    assert await producer.close(timeout_s=0.2) == 4
    result = await future  # resolved by close(), not left hanging
    assert result.count == 3 and [f.kafka_error for f in result.failed] == ["_PURGE_QUEUE"] * 3
    assert len(producer) == 0


async def test_close_while_a_batch_waits_for_room_fails_it_instead_of_hanging(mock_cluster: _MockCluster) -> None:
    topic = mock_cluster.create_topic("mock.batch.stuck")
    config = ProducerConfig(mock_cluster.bootstrap, queue_max_messages=10, extra={"log_level": 0})
    producer = await EventProducer(config).start()
    await producer.publish(topic, "k", {"n": 0})
    mock_cluster.set_down()
    submitting = asyncio.create_task(producer.submit_batch(topic, [("k", {"n": n}) for n in range(50)]))
    deadline = time.monotonic() + DEADLINE_S
    while len(producer) < 10:  # the first 10 are queued, the rest wait for room that never comes
        assert time.monotonic() < deadline and not submitting.done()
        await asyncio.sleep(0.01)
    assert await producer.close(timeout_s=0.2) == 10
    with pytest.raises(Unavailable, match=r"closed while 40 events .* waited for room"):
        await submitting
    with pytest.raises(Unavailable, match=r"not started .* or already closed"):
        await producer.publish(topic, "k", {"n": 99})
