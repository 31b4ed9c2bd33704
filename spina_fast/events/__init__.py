"""Spina's event bus on Apache Kafka (confluent-kafka): topics by convention, envelopes, pipelines.

    admin = TopicAdmin("127.0.0.1:9092")
    admin.ensure([TopicSpec("orders.order.created", expected_events_per_s=50_000)])
    async with EventProducer(ProducerConfig("127.0.0.1:9092", source="orders")) as producer:
        await producer.publish("orders.order.created", "order-17", {"total": 12})
    consumer = EventConsumer(ConsumerConfig("127.0.0.1:9092", group_id="billing"),
                             ["orders.order.created"], handle_batch)
    await consumer.run()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spina_fast.events.config import ConsumerConfig, ProducerConfig
    from spina_fast.events.consumer import EventConsumer, HandlerFailed
    from spina_fast.events.envelope import EnvelopeEncoder, EnvelopeError, Event
    from spina_fast.events.errors import DeadLetterFailed, DeliveryFailed, PossiblyPersisted
    from spina_fast.events.producer import BatchResult, Delivery, EventProducer
    from spina_fast.events.topics import RetentionClass, TopicAdmin, TopicSpec, dlq_topic, validate_topic

# Loaded on first use: `spina` registers the events subcommand on every start, and confluent-kafka's import
# would cost every other command ~40 ms.
_MODULES = {
    "ConsumerConfig": "config", "ProducerConfig": "config", "EventConsumer": "consumer", "HandlerFailed": "consumer",
    "EnvelopeEncoder": "envelope", "EnvelopeError": "envelope", "Event": "envelope", "DeadLetterFailed": "errors",
    "DeliveryFailed": "errors", "PossiblyPersisted": "errors", "BatchResult": "producer", "Delivery": "producer",
    "EventProducer": "producer", "RetentionClass": "topics", "TopicAdmin": "topics", "TopicSpec": "topics",
    "dlq_topic": "topics", "validate_topic": "topics",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'spina_fast.events' has no attribute {name!r}")
    return getattr(importlib.import_module(f"spina_fast.events.{module}"), name)


__all__ = [
    "BatchResult",
    "ConsumerConfig",
    "DeadLetterFailed",
    "Delivery",
    "DeliveryFailed",
    "EnvelopeEncoder",
    "EnvelopeError",
    "Event",
    "EventConsumer",
    "EventProducer",
    "HandlerFailed",
    "PossiblyPersisted",
    "ProducerConfig",
    "RetentionClass",
    "TopicAdmin",
    "TopicSpec",
    "dlq_topic",
    "validate_topic",
]
