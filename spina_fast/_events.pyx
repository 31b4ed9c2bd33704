# cython: language_level=3, boundscheck=False, wraparound=False
"""Per-event hot paths of the event bus: envelope encoding, the produce loop, delivery counting, decoding.

Python (spina_fast/events/) owns the sockets, the awaiting and the error messages; this module owns the
bytes. Profiling the all-Python pipeline showed building the envelope cost more than producing it
(benchmarks/README.md, events), so the envelope is written straight into one bytes object here: only the
payload goes through orjson, the rest are fixed parts and ASCII checks.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcpy

import os

import orjson

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object text, Py_ssize_t* size) except NULL

cdef object _dumps = orjson.dumps
cdef object _loads = orjson.loads
cdef str TRACEPARENT = "traceparent"
cdef const char* HEX = b"0123456789abcdef"
cdef tuple _FIELDS = ("id", "type", "source", "aggregate_id", "time", "schema_version", "correlation_id", "payload")


class EncodeError(ValueError):
    """Item ``index`` of a batch could not be encoded: ``reason`` is 'item', 'aggregate_id', 'correlation_id',
    'traceparent', 'payload' (with ``cause``) or 'size' (with ``size``)."""

    def __init__(self, index, reason, cause=None, size=0):
        super().__init__(f"event {index}: bad {reason}")
        self.index = index
        self.reason = reason
        self.cause = cause
        self.size = size


class ProduceFailed(Exception):
    """Producer.produce raised ``cause`` (not BufferError) for ``encoded[index]``."""

    def __init__(self, index, cause):
        super().__init__(f"produce failed at event {index}: {cause}")
        self.index = index
        self.cause = cause


cdef inline bint _plain_json(const char* text, Py_ssize_t size) noexcept:
    """True if the UTF-8 text needs no JSON escaping (no control characters, quotes or backslashes)."""
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(size):
        c = <unsigned char>text[i]
        if c < 0x20 or c == 34 or c == 92:
            return False
    return True


cdef bytes _json_string(str text):
    cdef Py_ssize_t size
    cdef const char* utf8 = PyUnicode_AsUTF8AndSize(text, &size)
    if not _plain_json(utf8, size):
        return _dumps(text)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size + 2)
    cdef char* buf = PyBytes_AS_STRING(out)
    buf[0] = 34
    memcpy(buf + 1, utf8, size)
    buf[size + 1] = 34
    return out


cdef inline char* _put(char* buf, bytes part) noexcept:
    cdef Py_ssize_t size = PyBytes_GET_SIZE(part)
    memcpy(buf, PyBytes_AS_STRING(part), size)
    return buf + size


cdef class Event:
    """One received event. ``traceparent`` is read from the Kafka headers on first use (most handlers never
    look at it, and building the header list costs about as much as decoding the envelope)."""

    def __init__(self, str id, str type, str source, str aggregate_id, str time, schema_version,
                 correlation_id, payload, str topic="", int partition=-1, long long offset=-1, message=None):
        self.id = id
        self.type = type
        self.source = source
        self.aggregate_id = aggregate_id
        self.time = time
        self.schema_version = schema_version
        self.correlation_id = correlation_id
        self.payload = payload
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self._message = message

    @property
    def traceparent(self):
        if self._traceparent is None and self._message is not None:
            for name, value in self._message.headers() or ():
                if name == TRACEPARENT and value is not None:
                    self._traceparent = value.decode("ascii", "replace")
                    break
        return self._traceparent

    @property
    def message(self):
        """The confluent_kafka Message this event came from (None for events built by hand)."""
        return self._message

    def __repr__(self):
        return (f"Event(type={self.type!r}, aggregate_id={self.aggregate_id!r}, id={self.id!r}, "
                f"topic={self.topic!r}, partition={self.partition}, offset={self.offset})")


cdef class EnvelopeWriter:
    """Writes envelopes for one producer. Event ids: a random 64-bit producer prefix and a counter, 32 hex
    digits; an event without a caller's traceparent starts a trace whose id is the event id."""

    def __init__(self, str source):
        self.source = source
        self._source_json = _json_string(source)
        memcpy(self._prefix, PyBytes_AS_STRING(os.urandom(8).hex().encode()), 16)
        self._counter = 0

    def next_id(self):
        cdef char buf[32]
        self._write_id(buf)
        return PyBytes_FromStringAndSize(buf, 32).decode()

    cdef inline void _write_id(self, char* buf) noexcept:
        cdef unsigned long long n
        cdef int i
        self._counter += 1
        n = self._counter
        memcpy(buf, self._prefix, 16)
        for i in range(15, -1, -1):
            buf[16 + i] = HEX[n & 15]
            n >>= 4

    def encode_batch(self, str event_type, list items, long long schema_version, str time_text,
                     Py_ssize_t max_bytes, traceparent_ok):
        """[(key, value, headers)] for ``(aggregate_id, payload[, correlation_id[, traceparent]])`` items;
        raises EncodeError for the first bad item, before anything is returned."""
        cdef bytes head = (b'","type":' + _json_string(event_type) + b',"source":' + self._source_json
                           + b',"aggregate_id":')
        cdef bytes middle = (b',"time":' + _json_string(time_text) + b',"schema_version":'
                             + str(schema_version).encode() + b',"correlation_id":')
        cdef bytes null = b"null"
        cdef list out = []
        cdef Py_ssize_t index, size, length
        cdef object item, aggregate_id, correlation_id, traceparent
        cdef bytes key, aggregate_json, correlation_json, payload_json, value, header
        cdef char* buf
        cdef char* tp
        for index in range(len(items)):
            item = items[index]
            try:
                length = len(item)
            except TypeError:
                raise EncodeError(index, "item") from None
            if length < 2:
                raise EncodeError(index, "item")
            aggregate_id = item[0]
            if type(aggregate_id) is not str or not aggregate_id:
                raise EncodeError(index, "aggregate_id")
            correlation_id = item[2] if length > 2 else None
            traceparent = item[3] if length > 3 else None
            if correlation_id is None:
                correlation_json = null
            elif type(correlation_id) is str:
                correlation_json = _json_string(correlation_id)
            else:
                raise EncodeError(index, "correlation_id")
            try:
                payload_json = _dumps(item[1])
            except TypeError as exc:
                raise EncodeError(index, "payload", exc) from None
            key = (<str>aggregate_id).encode()
            aggregate_json = _json_string(aggregate_id)
            size = (7 + 32 + PyBytes_GET_SIZE(head) + PyBytes_GET_SIZE(aggregate_json) + PyBytes_GET_SIZE(middle)
                    + PyBytes_GET_SIZE(correlation_json) + 11 + PyBytes_GET_SIZE(payload_json) + 1)
            if 0 < max_bytes < size:
                raise EncodeError(index, "size", size=size)
            value = PyBytes_FromStringAndSize(NULL, size)
            buf = PyBytes_AS_STRING(value)
            memcpy(buf, b'{"id":"', 7)
            self._write_id(buf + 7)
            if traceparent is None:
                # 00-<trace id = event id>-<parent id = the id's counter half>-01 (sampled)
                header = PyBytes_FromStringAndSize(NULL, 55)
                tp = PyBytes_AS_STRING(header)
                memcpy(tp, b"00-", 3)
                memcpy(tp + 3, buf + 7, 32)
                tp[35] = 45
                memcpy(tp + 36, buf + 7 + 16, 16)
                memcpy(tp + 52, b"-01", 3)
            elif type(traceparent) is str and traceparent_ok(traceparent):
                header = (<str>traceparent).encode()
            else:
                raise EncodeError(index, "traceparent")
            buf = _put(buf + 39, head)
            buf = _put(buf, aggregate_json)
            buf = _put(buf, middle)
            buf = _put(buf, correlation_json)
            memcpy(buf, b',"payload":', 11)
            buf = _put(buf + 11, payload_json)
            buf[0] = 125  # }
            out.append((key, value, [(TRACEPARENT, header)]))
        return out


def produce_all(produce, str topic, list encoded, Py_ssize_t start, on_delivery):
    """Calls ``produce`` for ``encoded[start:]``; returns the index reached (len(encoded) when done, less when
    the local queue filled up: BufferError). Positional arguments: confluent-kafka would otherwise build a
    keyword dict per event. Any other error is raised as ProduceFailed(index, cause)."""
    cdef Py_ssize_t index
    cdef tuple item
    for index in range(start, len(encoded)):
        item = <tuple>encoded[index]
        try:
            produce(topic, item[1], item[0], -1, on_delivery, None, 0, item[2])
        except BufferError:
            return index
        except Exception as exc:
            raise ProduceFailed(index, exc) from exc
    return len(encoded)


cdef class DeliveryCounter:
    """The on_delivery callback of one batch: counts reports (on the producer's poll thread, without a lock:
    the count and the check happen without releasing the GIL) and calls ``on_done()`` after the last one.
    ``failures`` holds (KafkaError, key, value) per failed event."""

    def __init__(self, Py_ssize_t count, on_done):
        self.count = count
        self._remaining = count
        self.failures = []
        self._on_done = on_done

    def __call__(self, error, message):
        if error is not None:
            self.failures.append((error, message.key(), message.value()))
        self._settle(1)

    def not_sent(self, Py_ssize_t count, error, bytes key, bytes value):
        """``count`` events never reached the queue (they fail with ``error``)."""
        self.failures.extend([(error, key, value)] * count)
        self._settle(count)

    cdef inline void _settle(self, Py_ssize_t done):
        self._remaining -= done
        if self._remaining == 0:
            self._on_done()


def decode_batch(list messages):
    """(events, undecodable [(message, reason)], errored messages, {(topic, partition): next offset}) for a
    consumed batch; events keep the messages' order."""
    cdef list events = []
    cdef list undecodable = []
    cdef list errored = []
    cdef dict offsets = {}
    cdef Event event
    cdef object message, doc, value
    for message in messages:
        if message.error() is not None:
            errored.append(message)
            continue
        event = Event.__new__(Event)
        event.topic = message.topic()
        event.partition = message.partition()
        event.offset = message.offset()
        offsets[(event.topic, event.partition)] = event.offset + 1
        value = message.value()
        if value is None:
            undecodable.append((message, "message has no value (a tombstone?), not a Spina event envelope"))
            continue
        try:
            doc = _loads(value)
        except orjson.JSONDecodeError as exc:
            undecodable.append((message, f"message value is not JSON: {exc}"))
            continue
        try:
            event.id = doc["id"]
            event.type = doc["type"]
            event.source = doc["source"]
            event.aggregate_id = doc["aggregate_id"]
            event.time = doc["time"]
            event.schema_version = doc["schema_version"]
            event.correlation_id = doc["correlation_id"]
            event.payload = doc["payload"]
        except (KeyError, TypeError):
            undecodable.append((message, _why_not_envelope(doc)))
            continue
        if event.id is None or event.aggregate_id is None or event.type is None:
            undecodable.append((message, _why_not_envelope(doc)))
            continue
        event._message = message
        events.append(event)
    return events, undecodable, errored, offsets


cdef str _why_not_envelope(doc):
    if type(doc) is not dict:
        return f"not a Spina event envelope: a JSON {type(doc).__name__}, not an object"
    missing = [name for name in _FIELDS if name not in doc]
    if missing:
        return f"not a Spina event envelope: missing {', '.join(missing)}"
    wrong = [name for name in ("id", "type", "source", "aggregate_id", "time") if type(doc[name]) is not str]
    return f"not a Spina event envelope: {', '.join(wrong) or 'a field'} not a string"
