"""The producer pipeline: envelopes encoded in batches, idempotent acks=all delivery, backpressure.

Three ways to publish, from safest to cheapest:

- ``await publish(...)`` / ``await publish_batch(...)``: returns once Kafka acknowledged the events
  (a ``Delivery`` / ``BatchResult``);
- ``await submit_batch(...)``: returns once the batch is in the local queue, with a future for its
  ``BatchResult``, so many batches can be in flight (the throughput path);
- ``await stream(...)`` / ``await stream_batch(...)``: fire-and-forget. No delivery report is requested
  at all, which makes it the cheapest path, and also means a failed event is *not reported* to the
  caller (librdkafka still retries it until ``delivery_timeout_ms``). For events whose loss is tolerable.

Every path awaits (never drops) while the local queue is full. Events go to librdkafka through its C API
(``spina_fast._kafka_native``): one call per batch with the GIL released, delivery reports counted per batch in
C on the producer's poll thread, which touches the event loop once per poll that completed batches, not once
per event. Settings are ``ProducerConfig.librdkafka()``, the same as with confluent-kafka's Producer.
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
from confluent_kafka import KafkaError, KafkaException

from spina_fast._kafka_native import (
    ERR_QUEUE_FULL,
    MSG_STATUS_POSSIBLY_PERSISTED,
    DeliveryBatch,
    NativeProducer,
    error_name,
    error_text,
)
from spina_fast.errors import InvalidRequest, NotFound, Unavailable
from spina_fast.events._kafka import wait_for_cluster
from spina_fast.events.config import ProducerConfig
from spina_fast.events.envelope import EncodedBatch, EnvelopeEncoder
from spina_fast.events.errors import DeliveryFailed, PossiblyPersisted
from spina_fast.events.topics import validate_topic

log = logging.getLogger("spina_fast.events")

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


def _delivery_error(topic: str, key: bytes | None, value: bytes | None, code: int,
                    possibly_persisted: bool) -> DeliveryFailed:
    """The error for one event that failed with librdkafka error ``code``. ``possibly_persisted``: librdkafka's
    rd_kafka_message_status said the broker may have written it (it timed out or was purged in flight); an
    event that never left the local queue is not written, whatever the error."""
    event_id = None
    if value:
        try:
            event_id = orjson.loads(value).get("id")
        except (orjson.JSONDecodeError, AttributeError):
            event_id = None
    aggregate_id = key.decode(errors="replace") if key is not None else None
    name, text = error_name(code), error_text(code)
    if possibly_persisted:
        return PossiblyPersisted(f"event {event_id} (aggregate {aggregate_id!r}) to {topic} timed out in flight and "
                                 f"was possibly persisted: {text}", topic=topic, aggregate_id=aggregate_id,
                                 event_id=event_id, kafka_error=name)
    return DeliveryFailed(f"event {event_id} (aggregate {aggregate_id!r}) to {topic} was not written: {text}",
                          topic=topic, aggregate_id=aggregate_id, event_id=event_id, kafka_error=name)


class _BatchTracker:
    """One batch in flight: its DeliveryBatch (counted in C on the poll thread) and its future. ``single``: a
    publish() of one event, resolved with a Delivery or its error instead of a BatchResult."""

    __slots__ = ("batch", "encoded", "future", "not_sent", "single", "topic")

    def __init__(self, loop: asyncio.AbstractEventLoop, topic: str, encoded: EncodedBatch, single: bool) -> None:
        self.topic = topic
        self.encoded = encoded  # keeps the bytes alive until done, and names failed events
        self.single = single
        self.future: asyncio.Future[Any] = loop.create_future()
        self.batch = DeliveryBatch(len(encoded))
        self.not_sent: tuple[int, int, int] | None = None  # (first index, count, error code) never queued

    def resolve(self) -> None:
        if self.future.done():  # the caller went away (cancelled); the outcome has nobody to go to
            return
        keys, values = self.encoded.keys, self.encoded.values
        failed = [_delivery_error(self.topic, keys[index], values[index], code,
                                  status == MSG_STATUS_POSSIBLY_PERSISTED) if index >= 0
                  else _delivery_error(self.topic, None, None, code, False)
                  for index, code, status in self.batch.failures()]
        if self.not_sent is not None:
            first, count, code = self.not_sent
            failed += [_delivery_error(self.topic, keys[i], values[i], code, False)
                       for i in range(first, first + count)]
        if not self.single:
            self.future.set_result(BatchResult(self.topic, self.batch.count, tuple(failed)))
        elif failed:
            self.future.set_exception(failed[0])
        else:
            event_id = orjson.loads(values[0])["id"]
            self.future.set_result(Delivery(self.topic, self.batch.partition, self.batch.offset, event_id))


class EventProducer:
    """Publishes events to provisioned topics. One per lane: a priority producer never waits behind bulk
    batches (``ProducerConfig(lane="priority")`` sends with ``linger.ms=0``)."""

    def __init__(self, config: ProducerConfig) -> None:
        self.config = config
        self._encoder = EnvelopeEncoder(config.source, trace_headers=config.trace_headers == "always")
        self._producer: NativeProducer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._known_topics: set[str] = set()
        self._poll_thread: threading.Thread | None = None
        # Batches queued and not yet complete, by DeliveryBatch.address: what the poll thread hands back.
        self._in_flight: dict[int, _BatchTracker] = {}

    async def start(self) -> EventProducer:
        """Connects (retrying until ``connect_timeout_s``, then Unavailable) and starts the poll thread.
        A librdkafka setting it refuses raises InvalidRequest naming the setting."""
        if self._producer is not None:
            return self
        loop = self._loop = asyncio.get_running_loop()
        producer = NativeProducer(self.config.librdkafka())
        try:
            metadata = await wait_for_cluster(producer, self.config.bootstrap_servers, self.config.connect_timeout_s)
        except BaseException:
            producer.destroy()
            raise
        self._known_topics = set(metadata.topics)
        self._producer = producer

        def on_done(addresses: list[int]) -> None:
            try:
                loop.call_soon_threadsafe(self._completed, addresses)
            except RuntimeError:  # the loop is closed: nobody is left to tell
                log.warning("event loop closed with %d event batches in flight", len(addresses))

        self._poll_thread = threading.Thread(target=producer.serve, args=(on_done,), name="spina-events-poll",
                                             daemon=True)
        self._poll_thread.start()
        return self

    async def __aenter__(self) -> EventProducer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _completed(self, addresses: list[int]) -> None:
        for address in addresses:
            tracker = self._in_flight.pop(address, None)
            if tracker is not None:
                tracker.resolve()

    def __len__(self) -> int:
        """Events queued or in flight."""
        return len(self._producer) if self._producer is not None else 0

    async def close(self, timeout_s: float = 30.0) -> int:
        """Flushes (waits for every queued event's outcome up to ``timeout_s``); what is still queued then is
        purged and reported failed to its waiters. Returns the number of events purged."""
        producer = self._producer
        if producer is None:
            return 0
        # From here on nothing new is queued: a batch waiting for room sees this and gives up (Unavailable)
        # instead of queueing behind a poll thread that is about to stop.
        self._producer = None
        loop = asyncio.get_running_loop()
        producer.stop(timeout_s)
        if self._poll_thread is not None:
            # serve() flushes, purges and hands the last batches over (call_soon_threadsafe) before it
            # returns, so they are resolved before this await resumes.
            await loop.run_in_executor(None, self._poll_thread.join)
            self._poll_thread = None
        left = producer.left_after_close
        if left:
            log.warning("producer closed with %d events still undelivered after %.0fs: purged", left, timeout_s)
        await loop.run_in_executor(None, producer.destroy)
        return int(left)

    def _require_started(self) -> NativeProducer:
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
        tracker = _BatchTracker(asyncio.get_running_loop(), topic, encoded, single=True)
        await self._enqueue(topic, encoded, tracker)
        delivery: Delivery = await tracker.future
        return delivery

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
        tracker = _BatchTracker(asyncio.get_running_loop(), topic, encoded, single=False)
        if not encoded:
            tracker.future.set_result(BatchResult(topic, 0))
            return tracker.future
        await self._enqueue(topic, encoded, tracker)
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
        await self._enqueue(topic, encoded, None)

    async def _enqueue(self, topic: str, encoded: EncodedBatch, tracker: _BatchTracker | None) -> None:
        """Queues the batch, awaiting (never dropping) while the local queue is full. A refusal of the first
        event raises; a refusal later reports the rest of the batch failed (the queued part reports itself)."""
        producer = self._require_started()
        batch = tracker.batch if tracker is not None else None
        total = len(encoded)
        position = 0
        backoff = _ROOM_BACKOFF_S[0]
        if tracker is not None:
            self._in_flight[tracker.batch.address] = tracker
        try:
            while True:
                position, code = producer.produce(topic, encoded, position, batch)
                if position == total:
                    break
                if code != ERR_QUEUE_FULL:
                    if position == 0 or tracker is None:
                        raise self._refused(topic, encoded, position, code)
                    tracker.not_sent = (position, total - position, code)
                    break
                # The local queue is full: wait for the poll thread to drain delivery reports, never drop.
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _ROOM_BACKOFF_S[1])
                if self._producer is not producer:
                    raise Unavailable(f"the producer was closed while {total - position} events for {topic} "
                                      "waited for room in its queue; they were not sent")
        except BaseException:
            if tracker is not None:
                self._give_up(tracker, position, total)
            raise
        if tracker is not None and producer.submitted(tracker.batch, total - position):
            self._completed([tracker.batch.address])

    def _give_up(self, tracker: _BatchTracker, position: int, total: int) -> None:
        """The submitter stops (cancelled, or the first event refused): events from ``position`` on are never
        queued. What was queued still reports; the caller has an exception instead of the future."""
        producer = self._producer
        if position == 0 or producer is None:
            self._in_flight.pop(tracker.batch.address, None)
            return
        tracker.not_sent = (position, total - position, KafkaError._FAIL)
        if producer.submitted(tracker.batch, total - position):
            self._completed([tracker.batch.address])

    def _refused(self, topic: str, encoded: EncodedBatch, position: int, code: int) -> Exception:
        key = encoded.keys[position]
        if code == KafkaError.MSG_SIZE_TOO_LARGE:
            return InvalidRequest(f"event for aggregate {key.decode()!r} is larger than message.max.bytes = "
                                  f"{self.config.message_max_bytes:,}", field="payload")
        if code in (KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART):
            self._known_topics.discard(topic)
            return NotFound(f"topic {topic!r} does not exist on {self.config.bootstrap_servers}")
        return Unavailable(f"could not queue events for {topic}: {error_text(code)} ({error_name(code)})")
