"""The consumer pipeline: batched fetches, batch handlers, at-least-once offsets, retries, dead letters.

One fetch thread owns the librdkafka consumer (its rebalance callbacks run there too); the event loop runs
the handler. Batches are handled one after the other, so when a rebalance callback runs no batch is in
the handler and every finished batch's offsets are already stored: committing them on revoke hands the
partition over without redelivering anything that was handled. An event's offset is stored only after
its handler returned, or after it was written to ``<topic>.dlq``. With the default ``commit_mode`` "batch"
a batch's synchronous commit runs while the next batch is fetched and has landed before that batch reaches
the handler, so a crash redelivers one batch: the one in the handler, or the last one handled if its commit
was still in flight. With "async" or "interval", everything handled since the last commit that landed.

The consumer is librdkafka's, called directly (``spina_fast._kafka_native.NativeConsumer``, the same binding
as the producer's): a fetch is one GIL-released call into a C array, envelopes are decoded from librdkafka's
buffers into Events, and no per-message Python object is built besides the Event (confluent-kafka's Message
objects and their copied headers were a tenth of the consumer's CPU in the cycle collector alone). Its
rebalance callback runs inside the fetch, on the fetch thread, exactly where confluent-kafka's ran.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition
from prometheus_client import REGISTRY, CollectorRegistry, Gauge

from spina_fast._kafka_native import ERR_FATAL, ERR_PARTITION_EOF, NativeConsumer
from spina_fast.errors import NotFound, SpinaError
from spina_fast.events._kafka import kafka_error, wait_for_cluster
from spina_fast.events.config import ConsumerConfig, kafka_log
from spina_fast.events.envelope import EnvelopeError, Event
from spina_fast.events.errors import DeadLetterFailed
from spina_fast.events.topics import dlq_topic, validate_topic

log = logging.getLogger("spina_fast.events")

BatchHandler = Callable[[list[Event]], Awaitable[None] | None]
# NativeConsumer.fetch(): events, undecodable [(message, reason)], errors [(topic, partition, offset, code, text)],
# {(topic, partition): next offset}
Fetched = tuple[list[Event], list[tuple[Any, str]], list[tuple[str, int, int, int, str]], dict[tuple[str, int], int]]

# Headers added to a dead-lettered message (its own headers, e.g. traceparent, are kept).
ERROR_HEADER = "spina-error"
ERROR_TYPE_HEADER = "spina-error-type"
ATTEMPTS_HEADER = "spina-attempts"
ORIGIN_HEADERS = ("spina-original-topic", "spina-original-partition", "spina-original-offset")

_lag_gauges: dict[int, tuple[CollectorRegistry, Gauge]] = {}
_lag_gauges_lock = threading.Lock()


def lag_gauge(registry: CollectorRegistry) -> Gauge:
    """``spina_events_consumer_lag{topic,partition,group}``, one per registry however many consumers use it."""
    with _lag_gauges_lock:
        entry = _lag_gauges.get(id(registry))
        if entry is None or entry[0] is not registry:
            gauge = Gauge("spina_events_consumer_lag", "Events in a partition not yet handled by the group "
                          "(high watermark minus the next offset to handle).", ["topic", "partition", "group"],
                          registry=registry)
            entry = _lag_gauges[id(registry)] = (registry, gauge)
        return entry[1]


class HandlerFailed(SpinaError):
    """An event kept failing and dead-lettering is off: the consumer stops with its offset unstored."""

    code = "handler_failed"


class EventConsumer:
    """Consumes ``topics`` as ``config.group_id`` and hands batches of Events to ``handler`` (a function or
    coroutine function taking a list). ``await run()`` until ``stop()``; a handler that raises is retried with
    exponential backoff, then event by event, and an event that still fails goes to ``<topic>.dlq``."""

    def __init__(self, config: ConsumerConfig, topics: Sequence[str], handler: BatchHandler, *,
                 registry: CollectorRegistry | None = REGISTRY) -> None:
        if isinstance(topics, str):
            topics = [topics]
        if not topics:
            raise ValueError("no topics to consume")
        for topic in topics:
            validate_topic(topic, allow_dlq=True)
        self.config = config
        self.topics = list(topics)
        self.handler = handler
        self._lag = lag_gauge(registry) if registry is not None else None
        self._stopping = threading.Event()
        self._consumer: NativeConsumer | None = None
        self._dlq_producer: Any = None
        # (topic, partition) -> next offset to handle, as stored; read by the lag update.
        self._positions: dict[tuple[str, int], int] = {}
        self._next_lag_update = 0.0
        self._batch_wait = config.batch_wait
        self._commit_mode = config.commit
        # "batch" mode: the synchronous commit of the last batch runs on its own thread while the next batch
        # is fetched, and is waited for before that batch reaches the handler (see _step).
        self._committer: ThreadPoolExecutor | None = None
        self._commit_in_flight: Future[None] | None = None
        self._rng = random.Random()
        self.assigned: set[tuple[str, int]] = set()
        self.handled = 0
        self.dead_lettered = 0
        self.batches = 0

    def stop(self) -> None:
        """Ends run() after the batch in hand (thread-safe)."""
        self._stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(1, thread_name_prefix="spina-events-consumer")
        consumer = NativeConsumer(self.config.librdkafka())
        self._consumer = consumer
        if self._commit_mode == "batch":
            self._committer = ThreadPoolExecutor(1, thread_name_prefix="spina-events-commit")
        pending: list[TopicPartition] = []
        subscribed = False
        try:
            metadata = await wait_for_cluster(consumer, self.config.bootstrap_servers, self.config.connect_timeout_s)
            wanted = self.topics + ([dlq_topic(t) for t in self.topics if not t.endswith(".dlq")]
                                    if self.config.dead_letter else [])
            missing = [t for t in wanted if t not in metadata.topics]
            if missing:
                raise NotFound(f"topic(s) {', '.join(missing)} do not exist on {self.config.bootstrap_servers}; "
                               f"provision them first (spina events topics create ...; dead-letter topics are "
                               f"created with their topic)")
            await loop.run_in_executor(executor, consumer.subscribe, self.topics, self._on_rebalance)
            subscribed = True
            while not self._stopping.is_set():
                fetched = await loop.run_in_executor(executor, self._step, pending)
                pending = []
                if fetched is not None:
                    pending = await self._process(fetched)
        finally:
            try:
                await asyncio.shield(loop.run_in_executor(executor, self._close, pending if subscribed else []))
            finally:
                executor.shutdown(wait=False)
                if self._committer is not None:
                    self._committer.shutdown(wait=False)
                    self._committer = None
                if self._dlq_producer is not None:
                    self._dlq_producer.flush(10)
                self._consumer = None

    # ---- the fetch thread ----

    def _step(self, offsets: list[TopicPartition]) -> Fetched | None:
        consumer = self._consumer
        assert consumer is not None, "the fetch thread runs only while run() holds a consumer"
        if offsets:
            self._store(consumer, offsets, overlap=True)
        try:
            now = time.monotonic()
            if now >= self._next_lag_update:
                self._next_lag_update = now + self.config.lag_interval_s
                self._update_lag(consumer)
            # Up to poll_timeout for a first message, then up to batch_wait for the rest (0 on the priority lane).
            fetched: Fetched = consumer.fetch(self.config.max_batch, self.config.poll_timeout_s, self._batch_wait)
            events, undecodable, errors, _offsets = fetched
            return fetched if events or undecodable or errors else None
        finally:
            # The previous batch's commit has landed (or failed and was logged) before the next batch can reach
            # the handler: a crash redelivers either that batch (commit in flight) or the one in the handler,
            # never both. The commit's round trip overlapped the fetch instead of preceding it.
            self._settle_commit()

    def _settle_commit(self) -> None:
        if self._commit_in_flight is not None:
            self._commit_in_flight.result()
            self._commit_in_flight = None

    def _store(self, consumer: NativeConsumer, offsets: list[TopicPartition], overlap: bool = False) -> None:
        # A rebalance inside the consume() that completed the batch may have taken some of its partitions:
        # their new owners redeliver from the last commit (at-least-once), and nothing is committed for them.
        offsets = [tp for tp in offsets if (tp.topic, tp.partition) in self.assigned]
        if not offsets:
            return
        try:
            consumer.store_offsets(offsets=offsets)
        except KafkaException as exc:
            log.info("could not store offsets (partition reassigned?): %s", exc)
        for tp in offsets:
            self._positions[tp.topic, tp.partition] = tp.offset
        if overlap and self._committer is not None:
            self._commit_in_flight = self._committer.submit(self._commit, consumer, offsets)
        elif self._commit_mode != "interval":
            self._commit(consumer, offsets, asynchronous=self._commit_mode == "async")

    @staticmethod
    def _commit(consumer: NativeConsumer, offsets: list[TopicPartition] | None = None,
                asynchronous: bool = False) -> None:
        """Commits ``offsets`` (default: every stored offset of the assignment)."""
        try:
            if offsets is None:
                consumer.commit(asynchronous=asynchronous)
            else:
                consumer.commit(offsets=offsets, asynchronous=asynchronous)
        except KafkaException as exc:
            error = kafka_error(exc)
            if error is None or error.code() != KafkaError._NO_OFFSET:
                log.warning("offset commit failed (the background commit retries): %s", exc)

    def _update_lag(self, consumer: NativeConsumer) -> None:
        if self._lag is None:
            return
        for (topic, partition), position in list(self._positions.items()):
            try:
                _low, high = consumer.get_watermark_offsets(topic, partition)
            except KafkaException:
                continue
            if high >= 0:
                self._lag.labels(topic, str(partition), self.config.group_id).set(max(0, high - position))

    def _on_rebalance(self, kind: str, partitions: list[TopicPartition]) -> None:
        """NativeConsumer's rebalance callback (on the fetch thread, inside fetch() or close()); it (un)assigns
        after this returns."""
        consumer = self._consumer
        assert consumer is not None, "rebalances happen only while run() holds a consumer"
        if kind == "assign":
            self._on_assign(consumer, partitions)
        elif kind == "revoke":
            self._on_revoke(consumer, partitions)
        else:
            self._on_lost(consumer, partitions)

    def _on_assign(self, consumer: NativeConsumer, partitions: list[TopicPartition]) -> None:
        self.assigned.update((tp.topic, tp.partition) for tp in partitions)
        log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions))

    def _on_revoke(self, consumer: NativeConsumer, partitions: list[TopicPartition]) -> None:
        # No batch is in the handler now (see the module doc): every handled offset is stored, commit them
        # so the partition's next owner starts right after them.
        self._settle_commit()
        self._commit(consumer)
        self._forget(partitions)

    def _on_lost(self, consumer: NativeConsumer, partitions: list[TopicPartition]) -> None:
        self._forget(partitions)  # the group moved on without us: committing now would be refused

    def _forget(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.assigned.discard((tp.topic, tp.partition))
            self._positions.pop((tp.topic, tp.partition), None)
            if self._lag is not None:
                try:
                    self._lag.remove(tp.topic, str(tp.partition), self.config.group_id)
                except KeyError:
                    log.debug("no lag sample for %s[%d] yet", tp.topic, tp.partition)

    def _close(self, offsets: list[TopicPartition]) -> None:
        consumer = self._consumer
        assert consumer is not None, "closed only by run()"
        self._settle_commit()
        if offsets:
            self._store(consumer, offsets)
        if self._lag is not None:
            self._forget([TopicPartition(t, p) for t, p in list(self._positions)])
        consumer.close()  # commits the stored offsets and leaves the group

    # ---- the event loop ----

    async def _process(self, fetched: Fetched) -> list[TopicPartition]:
        """Handles one fetched batch; returns the offsets to store once it is done."""
        events, undecodable, errors, offsets = fetched
        for topic, partition, _offset, code, text in errors:
            if code == ERR_FATAL:
                raise KafkaException(KafkaError(code, text, fatal=True))
            if code != ERR_PARTITION_EOF:
                log.warning("consumer error on %s [%s]: %s", topic, partition, text)
        for message, reason in undecodable:
            await self._dead_letter(message, EnvelopeError(reason), 0)
        if events:
            await self._handle(events)
        self.batches += 1
        return [TopicPartition(topic, partition, offset) for (topic, partition), offset in offsets.items()]

    async def _handle(self, events: list[Event]) -> None:
        error = await self._attempt(events)
        if error is None:
            self.handled += len(events)
            return
        if len(events) == 1:
            await self._dead_letter(events[0].message, error, self.config.max_attempts)
            return
        log.warning("batch of %d events failed %d times (%s: %s); handling them one by one", len(events),
                    self.config.max_attempts, type(error).__name__, error)
        for event in events:
            failure = await self._attempt([event])
            if failure is None:
                self.handled += 1
            else:
                await self._dead_letter(event.message, failure, self.config.max_attempts)

    async def _attempt(self, events: list[Event]) -> BaseException | None:
        """None once the handler succeeded, else its last error after max_attempts tries."""
        backoff = self.config.retry_backoff_s
        for attempt in range(1, self.config.max_attempts + 1):
            try:
                result = self.handler(events)
                if inspect.isawaitable(result):
                    await result
                return None
            except Exception as exc:  # the handler's own errors: anything it raises is a failed attempt
                if attempt == self.config.max_attempts:
                    return exc
                log.debug("handler attempt %d failed: %r; retrying in %.3fs", attempt, exc, backoff)
                await asyncio.sleep(backoff * self._rng.uniform(0.5, 1.0))
                backoff = min(backoff * 2, self.config.retry_backoff_max_s)
        raise AssertionError("unreachable: max_attempts >= 1")

    async def _dead_letter(self, message: Any, error: BaseException, attempts: int) -> None:
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        if not self.config.dead_letter:
            raise HandlerFailed(f"event at {topic}[{partition}]@{offset} failed {attempts} times: {error!r}")
        if self._dlq_producer is None:
            self._dlq_producer = Producer({
                "bootstrap.servers": self.config.bootstrap_servers, "enable.idempotence": True, "acks": "all",
                "linger.ms": 0, "allow.auto.create.topics": False, "logger": kafka_log,
            })
        reason = str(error) if isinstance(error, EnvelopeError) else f"{type(error).__name__}: {error}"
        headers = [*(message.headers() or ()),
                   (ERROR_HEADER, reason[:8000].encode()), (ERROR_TYPE_HEADER, type(error).__qualname__.encode()),
                   (ATTEMPTS_HEADER, str(attempts).encode()),
                   *zip(ORIGIN_HEADERS, (topic.encode(), str(partition).encode(), str(offset).encode()), strict=True)]
        outcome: list[KafkaError | None] = []
        target = dlq_topic(topic)
        self._dlq_producer.produce(target, message.value(), message.key(), headers=headers,
                                   on_delivery=lambda err, _msg: outcome.append(err))
        loop = asyncio.get_running_loop()
        left = await loop.run_in_executor(None, self._dlq_producer.flush, 30.0)
        if left or not outcome or outcome[0] is not None:
            raise DeadLetterFailed(f"could not write the event at {topic}[{partition}]@{offset} to {target}: "
                                   f"{outcome[0].str() if outcome and outcome[0] else 'timed out'}")
        self.dead_lettered += 1
        log.warning("event at %s[%d]@%d dead-lettered to %s after %d attempt(s): %s", topic, partition, offset,
                    target, attempts, reason)

