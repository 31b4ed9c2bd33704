"""The event envelope: what every event on Spina's bus carries, and its byte form.

The Kafka value is one JSON object with ``id``, ``type``, ``source``, ``aggregate_id``, ``time`` (RFC 3339,
UTC, milliseconds), ``schema_version``, ``correlation_id`` and ``payload`` (encoded with orjson). The Kafka
key is the aggregate id, so one aggregate's events share one partition and keep their order. The W3C Trace
Context ``traceparent`` travels in the Kafka headers (W3C Trace Context §3.2), where tracing middleware
expects it; an event published without one starts a trace named after it, ``00-<id>-<id[16:]>-01``, and
with ``ProducerConfig(trace_headers="caller")`` that derived header is left out (Event.traceparent derives
it). The per-event work is in ``spina_fast._events`` (Cython); this module checks and explains.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

from spina_fast._events import EncodedBatch, EncodeError, EnvelopeWriter, Event, decode_batch
from spina_fast.errors import InvalidRequest

__all__ = ["TRACEPARENT_HEADER", "Encoded", "EncodedBatch", "EnvelopeEncoder", "EnvelopeError", "Event", "decode_batch",
           "validate_traceparent"]

TRACEPARENT_HEADER = "traceparent"
# version 00: 32 hex trace id (not all zero), 16 hex parent id (not all zero), 2 hex flags
_TRACEPARENT_RE = re.compile(r"^00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")

# (key, value, headers) as Producer.produce takes them
Encoded = tuple[bytes, bytes, list[tuple[str, bytes]]]


class EnvelopeError(ValueError):
    """A Kafka message that is not a Spina event envelope."""


def validate_traceparent(value: str) -> str:
    if not isinstance(value, str) or not _TRACEPARENT_RE.match(value):
        raise InvalidRequest(f"traceparent {value!r} is not a W3C trace context "
                             "(00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>)", field="traceparent")
    return value


class EnvelopeEncoder:
    """Builds envelopes for one producer (see EnvelopeWriter for ids and trace ids). ``trace_headers=False``
    sends a ``traceparent`` header only with the events whose caller gave one (see ProducerConfig)."""

    def __init__(self, source: str, trace_headers: bool = True) -> None:
        self.source = source
        self._writer = EnvelopeWriter(source, trace_headers)
        self._time_ms = -1
        self._time_text = ""

    def now(self) -> str:
        """RFC 3339 UTC with milliseconds, formatted at most once per millisecond."""
        now_ms = time.time_ns() // 1_000_000
        if now_ms != self._time_ms:
            seconds, millis = divmod(now_ms, 1000)
            self._time_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"
            self._time_ms = now_ms
        return self._time_text

    def next_id(self) -> str:
        return self._writer.next_id()

    def encode(self, event_type: str, aggregate_id: str, payload: Any, *, correlation_id: str | None = None,
               traceparent: str | None = None, schema_version: int = 1, max_bytes: int = 0) -> Encoded:
        """One event; bad input raises InvalidRequest naming the problem."""
        return self.encode_batch(event_type, [(aggregate_id, payload, correlation_id, traceparent)],
                                 schema_version=schema_version, max_bytes=max_bytes)[0]

    def encode_batch(self, event_type: str, items: Iterable[Sequence[Any]], *, schema_version: int = 1,
                     max_bytes: int = 0) -> EncodedBatch:
        """Encodes ``(aggregate_id, payload[, correlation_id[, traceparent]])`` items in one pass; every event
        of the batch gets the same ``time``. Nothing is returned unless every item encodes; ``max_bytes`` > 0
        refuses larger events (Kafka's message.max.bytes). The result is a sequence of ``Encoded``."""
        if type(schema_version) is not int or schema_version < 1:
            raise InvalidRequest(f"schema_version must be a positive integer, got {schema_version!r}",
                                 field="schema_version")
        batch = items if isinstance(items, list) else list(items)
        try:
            return self._writer.encode_batch(event_type, batch, schema_version, self.now(), max_bytes,
                                             _TRACEPARENT_RE.match)
        except EncodeError as exc:
            raise _explain(exc, batch[exc.index], max_bytes) from None


def _explain(error: EncodeError, item: Any, max_bytes: int) -> InvalidRequest:
    index = error.index
    if error.reason == "item":
        return InvalidRequest(f"event {index}: expected (aggregate_id, payload[, correlation_id[, traceparent]]), "
                              f"got {item!r}", field="items")
    aggregate_id = item[0]
    if error.reason == "aggregate_id":
        return InvalidRequest(f"event {index}: aggregate_id must be a non-empty string (it is the Kafka key), "
                              f"got {aggregate_id!r}", field="aggregate_id")
    if error.reason == "correlation_id":
        return InvalidRequest(f"event {index}: correlation_id must be a string, got {item[2]!r}",
                              field="correlation_id")
    if error.reason == "traceparent":
        try:
            validate_traceparent(item[3])
        except InvalidRequest as exc:
            return InvalidRequest(f"event {index}: {exc.message}", field="traceparent")
    if error.reason == "size":
        return InvalidRequest(
            f"event {index} (aggregate {aggregate_id!r}) is {error.size:,} bytes encoded, more than "
            f"message.max.bytes = {max_bytes:,}; store large data elsewhere and send a reference", field="payload")
    return InvalidRequest(f"event {index} (aggregate {aggregate_id!r}): payload is not JSON-serializable: "
                          f"{error.cause}", field="payload")


def decode(message: Any) -> Event:
    """The Event in one consumed confluent_kafka Message; EnvelopeError if it is not one."""
    events, undecodable, errored, _offsets = decode_batch([message])
    if events:
        return events[0]
    if errored:
        raise EnvelopeError(f"message carries a consumer error: {message.error()}")
    raise EnvelopeError(undecodable[0][1])
