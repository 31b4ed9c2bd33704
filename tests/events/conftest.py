"""Fixtures for the event bus tests: the real brokers of scripts/services.sh and throwaway topics."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition

from spina_fast.events import TopicAdmin, TopicSpec
from tests.services.conftest import kafka3_bootstrap, kafka_bootstrap

__all__ = ["kafka3_bootstrap", "kafka_bootstrap"]

DEADLINE_S = 90.0


def unique_topic(event: str = "happened") -> str:
    return f"test.t{uuid.uuid4().hex[:12]}.{event}"


@pytest.fixture
def make_topic(kafka_bootstrap: str) -> Iterator[Callable[..., str]]:
    """Creates a uniquely named topic (and its .dlq) on the single broker; deletes them after the test."""
    admin = TopicAdmin(kafka_bootstrap)
    created: list[str] = []

    def make(event: str = "happened", **spec: Any) -> str:
        name = unique_topic(event)
        report = admin.ensure([TopicSpec(name, **spec)])
        assert report.ok, report.mismatches
        created.extend(report.created)
        return name

    yield make
    admin.delete(created)


def read_all(bootstrap: str, topic: str, *, expected: int | None = None, deadline_s: float = DEADLINE_S,
             ) -> list[Any]:
    """Every message of ``topic`` from the beginning, read with a plain confluent-kafka consumer (not Spina's
    pipeline), until the end of every partition (and at least ``expected`` messages)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "enable.partition.eof": True})
    try:
        metadata = consumer.list_topics(topic, timeout=30)
        partitions = list(metadata.topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        ends: dict[int, int] = {}
        for p in partitions:
            _low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
            ends[p] = high
        messages: list[Any] = []
        done: set[int] = {p for p, high in ends.items() if high == 0}
        deadline = time.monotonic() + deadline_s
        while (len(done) < len(partitions) or (expected is not None and len(messages) < expected)):
            if time.monotonic() > deadline:
                raise AssertionError(f"read {len(messages)} messages of {topic} in {deadline_s}s "
                                     f"(expected {expected}), partitions at end: {sorted(done)}")
            for message in consumer.consume(1000, 0.5):
                if message.error() is None:
                    messages.append(message)
                    if message.offset() + 1 >= ends[message.partition()]:
                        done.add(message.partition())
                elif message.error().code() == KafkaError._PARTITION_EOF:
                    done.add(message.partition())
        return messages
    finally:
        consumer.close()
