"""Errors of the event bus, on top of Spina's own (``spina_fast.errors``)."""

from __future__ import annotations

from spina_fast.errors import Unavailable


class DeliveryFailed(Unavailable):
    """Kafka did not acknowledge an event: it was not written (retrying later may work)."""

    code = "delivery_failed"

    def __init__(self, message: str, *, topic: str, aggregate_id: str | None, event_id: str | None,
                 kafka_error: str) -> None:
        super().__init__(message)
        self.topic = topic
        self.aggregate_id = aggregate_id
        self.event_id = event_id
        self.kafka_error = kafka_error


class PossiblyPersisted(DeliveryFailed):
    """The event timed out in flight: the broker may have written it, or not. Resending may duplicate it
    (consumers are at-least-once anyway), dropping it may lose it."""

    code = "possibly_persisted"


class DeadLetterFailed(Unavailable):
    """A poison event could not be written to its dead-letter topic, so its offset was not stored."""

    code = "dead_letter_failed"
