"""Producer and consumer settings: frozen, validated, turned into librdkafka configuration in one place."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Lane = Literal["bulk", "priority"]
COMPRESSION_TYPES = ("none", "gzip", "snappy", "lz4", "zstd")

kafka_log = logging.getLogger("spina_fast.events.kafka")


def _check_lane(lane: str) -> None:
    if lane not in ("bulk", "priority"):
        raise ValueError(f"lane must be 'bulk' or 'priority', got {lane!r}")


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


@dataclass(frozen=True, slots=True)
class ProducerConfig:
    """``lane='priority'`` sends every event at once (``linger.ms=0``) instead of batching for throughput."""

    bootstrap_servers: str
    source: str = "spina"
    lane: Lane = "bulk"
    # None: 25 ms on the bulk lane, 0 on priority. The broker's CPU goes per record batch (one per partition
    # per request), not per event: at 100k events/s over 16 partitions 5 ms made ~30-event batches and cost
    # the broker 8.4 µs per event, 25 ms 3.9 µs (benchmarks/README.md, events). A lone event waits at most this.
    linger_ms: float | None = None
    batch_size: int = 1_000_000
    # benchmarks/events.py on loopback: lz4 and none within noise of each other end to end, zstd slower. lz4
    # because the envelope's repeated field names compress well: fewer bytes on the wire and on disk.
    compression: str = "lz4"
    # The local queue; when it is full, publishing awaits (never drops).
    queue_max_messages: int = 500_000
    message_max_bytes: int = 1_000_000
    # After this an unacknowledged event is reported failed, or PossiblyPersisted if it was in flight.
    delivery_timeout_ms: int = 120_000
    connect_timeout_s: float = 10.0
    # "always": every event carries a W3C traceparent header. "caller": only the events published with a
    # caller's traceparent; the others' is 00-<event id>-<id[16:]>-01, derived from the envelope by
    # Event.traceparent, so the header carries nothing new, but a Kafka header costs the producer process
    # ~2.5 µs per event (a third of its CPU, benchmarks/README.md, events). Tracing middleware other than
    # Spina's consumer sees no header on those events (to it they start no trace).
    trace_headers: Literal["always", "caller"] = "always"
    # Raw librdkafka settings, applied last (they win).
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.bootstrap_servers:
            raise ValueError("bootstrap_servers is empty; expected host:port[,host:port...]")
        _check_lane(self.lane)
        if self.trace_headers not in ("always", "caller"):
            raise ValueError(f"trace_headers must be 'always' or 'caller', got {self.trace_headers!r}")
        if self.compression not in COMPRESSION_TYPES:
            raise ValueError(f"compression must be one of {', '.join(COMPRESSION_TYPES)}, got {self.compression!r}")
        if self.linger_ms is not None and self.linger_ms < 0:
            raise ValueError(f"linger_ms must be >= 0, got {self.linger_ms}")
        _check_positive(batch_size=self.batch_size, queue_max_messages=self.queue_max_messages,
                        message_max_bytes=self.message_max_bytes, delivery_timeout_ms=self.delivery_timeout_ms,
                        connect_timeout_s=self.connect_timeout_s)
        if not self.source:
            raise ValueError("source is empty; it names the service publishing the events")

    def librdkafka(self) -> dict[str, Any]:
        linger = self.linger_ms if self.linger_ms is not None else (0 if self.lane == "priority" else 25)
        return {
            "bootstrap.servers": self.bootstrap_servers,
            # Idempotence: retries after a lost ack write nothing twice and keep per-partition order.
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": linger,
            "batch.size": self.batch_size,
            "compression.type": self.compression,
            "queue.buffering.max.messages": self.queue_max_messages,
            "queue.buffering.max.kbytes": 1_048_576,
            "message.max.bytes": self.message_max_bytes,
            "delivery.timeout.ms": self.delivery_timeout_ms,
            # Java clients hash keys with murmur2: the same aggregate lands on the same partition whichever
            # client published it.
            "partitioner": "murmur2_random",
            # Publishing to a topic nobody provisioned is an error, not a new topic with broker defaults.
            "allow.auto.create.topics": False,
            "logger": kafka_log,
            # A lone priority event must not wait for the previous packet's ACK (Nagle).
            **({"socket.nagle.disable": True} if self.lane == "priority" else {}),
            **self.extra,
        }


@dataclass(frozen=True, slots=True)
class ConsumerConfig:
    """At-least-once: an event's offset is stored only after its handler returned (or it went to the DLQ)."""

    bootstrap_servers: str
    group_id: str
    lane: Lane = "bulk"
    max_batch: int = 5_000
    # How long one fetch waits for a first event before looping (also bounds how fast stop() is seen).
    poll_timeout_s: float = 0.25
    # After the first event, how long to wait for the batch to fill. Every batch ends with a synchronous
    # commit, which costs this broker 1-2.5 ms of CPU whatever the batch's size (benchmarks/README.md,
    # events): 50 ms of waiting keep the bulk lane at 20 commits a second (the commit itself overlaps the next
    # fetch, see EventConsumer). None: 50 ms on bulk, 0 on priority (never waits).
    batch_wait_s: float | None = None
    # Attempts per batch, then per event, before an event goes to the dead-letter topic.
    max_attempts: int = 3
    retry_backoff_s: float = 0.1
    retry_backoff_max_s: float = 5.0
    dead_letter: bool = True
    # "batch": commit synchronously after every batch, so a crash redelivers at most the batch in hand.
    # "async": commit after every batch without waiting, so no commit round trip sits between two batches
    # (a crash may also redeliver the few batches whose commits were in flight).
    # "interval": stored offsets are committed in the background every auto_commit_interval_ms.
    # None: "batch" on the bulk lane, "async" on the priority lane.
    commit_mode: Literal["batch", "async", "interval"] | None = None
    auto_commit_interval_ms: int = 5_000
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    session_timeout_ms: int = 10_000
    # Static membership: a restarted consumer with the same id takes its partitions back at once.
    group_instance_id: str | None = None
    connect_timeout_s: float = 10.0
    lag_interval_s: float = 1.0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.bootstrap_servers:
            raise ValueError("bootstrap_servers is empty; expected host:port[,host:port...]")
        if not self.group_id:
            raise ValueError("group_id is empty; consumers of one group share the partitions")
        _check_lane(self.lane)
        _check_positive(max_batch=self.max_batch, poll_timeout_s=self.poll_timeout_s, max_attempts=self.max_attempts,
                        retry_backoff_s=self.retry_backoff_s, retry_backoff_max_s=self.retry_backoff_max_s,
                        auto_commit_interval_ms=self.auto_commit_interval_ms,
                        session_timeout_ms=self.session_timeout_ms, connect_timeout_s=self.connect_timeout_s,
                        lag_interval_s=self.lag_interval_s)
        if self.batch_wait_s is not None and self.batch_wait_s < 0:
            raise ValueError(f"batch_wait_s must be >= 0, got {self.batch_wait_s}")
        if self.commit_mode not in (None, "batch", "async", "interval"):
            raise ValueError(f"commit_mode must be 'batch', 'async' or 'interval', got {self.commit_mode!r}")
        if self.auto_offset_reset not in ("earliest", "latest"):
            raise ValueError(f"auto_offset_reset must be 'earliest' or 'latest', got {self.auto_offset_reset!r}")

    @property
    def commit(self) -> str:
        if self.commit_mode is not None:
            return self.commit_mode
        return "async" if self.lane == "priority" else "batch"

    @property
    def batch_wait(self) -> float:
        if self.batch_wait_s is not None:
            return self.batch_wait_s
        return 0.0 if self.lane == "priority" else 0.05

    def librdkafka(self) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "group.id": self.group_id,
            "enable.auto.offset.store": False,
            "enable.auto.commit": True,
            "auto.commit.interval.ms": self.auto_commit_interval_ms,
            "auto.offset.reset": self.auto_offset_reset,
            "session.timeout.ms": self.session_timeout_ms,
            "allow.auto.create.topics": False,
            "logger": kafka_log,
        }
        if self.group_instance_id:
            conf["group.instance.id"] = self.group_instance_id
        if self.lane == "priority":
            # The broker answers a waiting fetch as soon as one byte is appended (fetch.min.bytes=1), so the
            # wait bound matters after errors and leader moves; 10 ms rather than 1, which would send a
            # thousand empty fetches a second per broker while the lane is idle. No Nagle delay on the socket.
            conf.update({"fetch.wait.max.ms": 10, "fetch.min.bytes": 1, "fetch.error.backoff.ms": 10,
                         "socket.nagle.disable": True})
        else:
            conf.update({"fetch.wait.max.ms": 100})
        conf.update(self.extra)
        return conf
