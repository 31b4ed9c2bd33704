"""The producer pipeline: envelopes encoded in batches, idempotent acks=all delivery, backpressure.

Three ways to publish, from safest to cheapest:

- ``await publish(...)`` / ``await publish_batch(...)``: returns once Kafka acknowledged the events
  (a ``Delivery`` / ``BatchResult``);
- ``await submit_batch(...)``: returns once the batch is in the local queue, with a future for its
  ``BatchResult``, so many batches can be in flight (the throughput path);
- ``await stream(...)`` / ``await stream_batch(...)``: fire-and-forget. No delivery report is requested
  at all, which makes it the cheapest path, and also means a failed event is *not reported* to the
  caller (librdkafka still retries it until ``delivery_timeout_ms``). For events whose loss is tolerable.

Every path awaits (never drops) while the local queue is full. A delivery callback runs on the producer's
poll thread and touches the event loop once per batch, not once per event.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Producer

from spina_fast._events import DeliveryCounter, ProduceFailed, produce_all
from spina_fast.errors import InvalidRequest, NotFound, SpinaError, Unavailable
from spina_fast.events._kafka import kafka_error, wait_for_cluster
from spina_fast.events.config import ProducerConfig
from spina_fast.events.envelope import EncodedBatch, EnvelopeEncoder
from spina_fast.events.errors import DeliveryFailed, PossiblyPersisted
from spina_fast.events.topics import validate_topic

log = logging.getLogger("spina_fast.events")

# Errors after which the broker may or may not have written the event (librdkafka cannot tell a message
# that timed out in its queue from one that timed out in flight; both are reported possibly persisted).
_POSSIBLY_PERSISTED = frozenset({KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT, KafkaError.REQUEST_TIMED_OUT,
                                 KafkaError._PURGE_INFLIGHT})
_POLL_INTERVAL_S = 0.05
_ROOM_BACKOFF_S = (0.0005, 0.02)


@dataclass(frozen=True, slots=True)
class Delivery:
    topic: str
    partition: int
    offset: int
    event_id: str


@dataclass(frozen=True, slots=True)
class BatchResult:
    topic: str
    count: int
    failed: tuple[DeliveryFailed, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def delivered(self) -> int:
        return self.count - len(self.failed)

    def raise_for_failures(self) -> BatchResult:
        if self.failed:
            first = self.failed[0]
            raise type(first)(f"{len(self.failed)} of {self.count} events to {self.topic} failed; first: "
                              f"{first.message}", topic=self.topic, aggregate_id=first.aggregate_id,
                              event_id=first.event_id, kafka_error=first.kafka_error)
        return self


def _delivery_error(topic: str, key: bytes | None, value: bytes | None, error: KafkaError) -> DeliveryFailed:
    event_id = None
    if value:
        try:
            event_id = orjson.loads(value).get("id")
        except (orjson.JSONDecodeError, AttributeError):
            event_id = None
    aggregate_id = key.decode(errors="replace") if key is not None else None
    if error.code() in _POSSIBLY_PERSISTED:
        return PossiblyPersisted(f"event {event_id} (aggregate {aggregate_id!r}) to {topic} timed out in flight and "
                                 f"was possibly persisted: {error.str()}", topic=topic, aggregate_id=aggregate_id,
                                 event_id=event_id, kafka_error=error.name())
    return DeliveryFailed(f"event {event_id} (aggregate {aggregate_id!r}) to {topic} was not written: {error.str()}",
                          topic=topic, aggregate_id=aggregate_id, event_id=event_id, kafka_error=error.name())


class _BatchTracker:
    """One batch's future, resolved on the loop once its DeliveryCounter (on the poll thread) saw every report."""

    __slots__ = ("counter", "future", "loop", "topic")

    def __init__(self, loop: asyncio.AbstractEventLoop, topic: str, count: int) -> None:
        self.loop = loop
        self.topic = topic
        self.future: asyncio.Future[BatchResult] = loop.create_future()
        self.counter = DeliveryCounter(count, self._done)

    def _done(self) -> None:
        self.loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if self.future.done():
            return
        failed = tuple(_delivery_error(self.topic, key, value, error)
                       for error, key, value in self.counter.failures)
        self.future.set_result(BatchResult(self.topic, self.counter.count, failed))


class EventProducer:
    """Publishes events to provisioned topics. One per lane: a priority producer never waits behind bulk
    batches (``ProducerConfig(lane="priority")`` sends with ``linger.ms=0``)."""

    def __init__(self, config: ProducerConfig) -> None:
        self.config = config
        self._encoder = EnvelopeEncoder(config.source, trace_headers=config.trace_headers == "always")
        self._producer: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._known_topics: set[str] = set()
        self._stop_polling = threading.Event()
        self._poll_thread: threading.Thread | None = None

    async def start(self) -> EventProducer:
        """Connects (retrying until ``connect_timeout_s``, then Unavailable) and starts the poll thread."""
        if self._producer is not None:
            return self
        self._loop = asyncio.get_running_loop()
        producer = Producer(self.config.librdkafka())
        try:
            metadata = await wait_for_cluster(producer, self.config.bootstrap_servers, self.config.connect_timeout_s)
        except BaseException:
            producer.purge()
            raise
        self._known_topics = set(metadata.topics)
        self._producer = producer
        self._stop_polling.clear()
        self._poll_thread = threading.Thread(target=self._poll_forever, name="spina-events-poll", daemon=True)
        self._poll_thread.start()
        return self

    async def __aenter__(self) -> EventProducer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _poll_forever(self) -> None:
        producer = self._producer
        while not self._stop_polling.is_set():
            producer.poll(_POLL_INTERVAL_S)

    def __len__(self) -> int:
        """Events queued or in flight."""
        return len(self._producer) if self._producer is not None else 0

    async def close(self, timeout_s: float = 30.0) -> int:
        """Flushes (waits for every queued event's outcome up to ``timeout_s``); what is still queued then is
        purged and reported failed to its waiters. Returns the number of events purged."""
        producer = self._producer
        if producer is None:
            return 0
        loop = asyncio.get_running_loop()
        left = await loop.run_in_executor(None, producer.flush, timeout_s)
        if left:
            log.warning("producer closed with %d events still undelivered after %.0fs: purged", left, timeout_s)
            producer.purge()
            await loop.run_in_executor(None, producer.flush, 1.0)
        self._stop_polling.set()
        if self._poll_thread is not None:
            await loop.run_in_executor(None, self._poll_thread.join)
        self._producer = None
        return int(left)

    def _require_started(self) -> Any:
        if self._producer is None:
            raise Unavailable("the producer is not started (await producer.start() first) or already closed")
        return self._producer

    async def _check_topic(self, topic: str) -> None:
        if topic in self._known_topics:
            return
        validate_topic(topic, allow_dlq=True)
        producer = self._require_started()
        loop = asyncio.get_running_loop()
        try:
            metadata = await loop.run_in_executor(None, functools.partial(producer.list_topics, timeout=10))
        except KafkaException as exc:
            raise Unavailable(f"could not read topic metadata from {self.config.bootstrap_servers}: {exc}") from exc
        self._known_topics = set(metadata.topics)
        if topic not in self._known_topics:
            raise NotFound(f"topic {topic!r} does not exist on {self.config.bootstrap_servers}; provision it first "
                           f"(spina events topics create {topic})")

    async def publish(self, topic: str, aggregate_id: str, payload: Any, *, correlation_id: str | None = None,
                      traceparent: str | None = None, event_type: str | None = None,
                      schema_version: int = 1) -> Delivery:
        """Publishes one event and returns once Kafka acknowledged it (DeliveryFailed / PossiblyPersisted if not)."""
        await self._check_topic(topic)
        item = (aggregate_id, payload, correlation_id, traceparent)
        encoded = self._encoder.encode_batch(event_type or topic, [item], schema_version=schema_version,
                                             max_bytes=self.config.message_max_bytes)
        key, value = encoded.keys[0], encoded.values[0]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Delivery] = loop.create_future()
        event_id: str = orjson.loads(value)["id"]

        def on_delivery(error: KafkaError | None, message: Any) -> None:
            outcome: Delivery | SpinaError
            if error is None:
                outcome = Delivery(topic, message.partition(), message.offset(), event_id)
            else:
                outcome = _delivery_error(topic, key, value, error)
            loop.call_soon_threadsafe(_settle, future, outcome)

        await self._enqueue(topic, encoded, on_delivery, None)
        return await future

    async def publish_batch(self, topic: str, items: Iterable[Sequence[Any]], *, event_type: str | None = None,
                            schema_version: int = 1) -> BatchResult:
        """Publishes ``(aggregate_id, payload[, correlation_id[, traceparent]])`` items and returns once every
        one has an outcome. A bad item refuses the whole batch before anything is sent."""
        return await (await self.submit_batch(topic, items, event_type=event_type, schema_version=schema_version))

    async def submit_batch(self, topic: str, items: Iterable[Sequence[Any]], *, event_type: str | None = None,
                           schema_version: int = 1) -> asyncio.Future[BatchResult]:
        """Like publish_batch, but returns as soon as the batch is queued: await the future for the outcome."""
        await self._check_topic(topic)
        encoded = self._encoder.encode_batch(event_type or topic, items, schema_version=schema_version,
                                             max_bytes=self.config.message_max_bytes)
        loop = asyncio.get_running_loop()
        tracker = _BatchTracker(loop, topic, len(encoded))
        if not encoded:
            tracker.future.set_result(BatchResult(topic, 0))
            return tracker.future
        await self._enqueue(topic, encoded, tracker.counter, tracker)
        return tracker.future

    async def stream(self, topic: str, aggregate_id: str, payload: Any, *, correlation_id: str | None = None,
                     traceparent: str | None = None, event_type: str | None = None, schema_version: int = 1) -> None:
        """Fire-and-forget: returns once the event is queued; its outcome is never reported (see module doc)."""
        await self.stream_batch(topic, ((aggregate_id, payload, correlation_id, traceparent),),
                                event_type=event_type, schema_version=schema_version)

    async def stream_batch(self, topic: str, items: Iterable[Sequence[Any]], *, event_type: str | None = None,
                           schema_version: int = 1) -> None:
        """Fire-and-forget for a batch: no delivery reports, so also no per-event cost for them."""
        await self._check_topic(topic)
        encoded = self._encoder.encode_batch(event_type or topic, items, schema_version=schema_version,
                                             max_bytes=self.config.message_max_bytes)
        await self._enqueue(topic, encoded, None, None)

    async def _enqueue(self, topic: str, encoded: EncodedBatch, on_delivery: Any,
                       tracker: _BatchTracker | None) -> None:
        producer = self._require_started()
        position = 0
        total = len(encoded)
        backoff = _ROOM_BACKOFF_S[0]
        while True:
            try:
                position = produce_all(producer.produce, topic, encoded, position, on_delivery)
            except ProduceFailed as exc:
                self._refused(topic, encoded, exc.index, exc.cause, tracker)
                return
            if position == total:
                return
            # The local queue is full: wait for the poll thread to drain delivery reports, never drop.
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _ROOM_BACKOFF_S[1])

    def _refused(self, topic: str, encoded: EncodedBatch, position: int, cause: BaseException,
                 tracker: _BatchTracker | None) -> None:
        """produce() refused encoded[position]: raise if nothing of the batch is queued, else report the rest
        failed (the queued part will report by itself)."""
        error = kafka_error(cause)
        key, value = encoded.keys[position], encoded.values[position]
        if tracker is not None and position > 0:
            tracker.counter.not_sent(len(encoded) - position, error or KafkaError(KafkaError._FAIL, str(cause)),
                                     key, value)
            return
        if error is not None and error.code() == KafkaError.MSG_SIZE_TOO_LARGE:
            raise InvalidRequest(f"event for aggregate {key.decode()!r} is larger than message.max.bytes = "
                                 f"{self.config.message_max_bytes:,}", field="payload") from cause
        if error is not None and error.code() in (KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART):
            self._known_topics.discard(topic)
            raise NotFound(f"topic {topic!r} does not exist on {self.config.bootstrap_servers}") from cause
        raise Unavailable(f"could not queue events for {topic}: {cause}") from cause


def _settle(future: asyncio.Future[Delivery], outcome: Delivery | SpinaError) -> None:
    if future.done():
        return
    if isinstance(outcome, SpinaError):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
