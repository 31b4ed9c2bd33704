# cython: language_level=3, boundscheck=False, wraparound=False
"""Per-event hot paths of the event bus: envelope encoding and decoding (the produce loop and delivery counting
are in _kafka_native).

Python (spina_fast/events/) owns the sockets, the awaiting and the error messages; this module owns the
bytes. Profiling the all-Python pipeline showed building the envelope cost more than producing it
(benchmarks/README.md, events), so the envelope is written straight into one bytes object here: only the
payload goes through orjson, the rest are fixed parts and ASCII checks.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcmp, memcpy

cimport cython

import os
import re

import orjson

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object text, Py_ssize_t* size) except NULL
    object PyUnicode_DecodeUTF8(const char* data, Py_ssize_t size, const char* errors)

cdef object _dumps = orjson.dumps
cdef object _loads = orjson.loads
cdef str TRACEPARENT = "traceparent"
# an event id EnvelopeWriter writes, usable as a W3C trace id (32 lower-case hex digits, not all zero)
cdef object _TRACE_ID = re.compile(r"^(?!0{32})[0-9a-f]{16}(?!0{16})[0-9a-f]{16}$")
cdef const char* HEX = b"0123456789abcdef"
NO_VALUE = "message has no value (a tombstone?), not a Spina event envelope"
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


@cython.no_gc
cdef class Event:
    """One received event. ``traceparent`` is read from the Kafka headers on first use (most handlers never
    look at it, and building the header list costs about as much as decoding the envelope); ``payload`` is
    decoded from the message value on first use.

    Not tracked by the cycle collector: a consumed Event refers to its Message, its strings and a payload
    decoded from JSON, none of which can refer back to it, and the collector's passes over batches of tracked
    Events were a visible share of the consumer's CPU (benchmarks/README.md, events). An Event built by hand
    with a payload that refers back to the Event would never be freed."""

    def __init__(self, str id, str type, str source, str aggregate_id, str time, schema_version,
                 correlation_id, payload, str topic="", int partition=-1, long long offset=-1, message=None):
        self.id = id
        self.type = type
        self.source = source
        self.aggregate_id = aggregate_id
        self.time = time
        self.schema_version = schema_version
        self.correlation_id = correlation_id
        self._payload = payload
        self._payload_end = -1
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self._message = message

    @property
    def payload(self):
        """The decoded payload. Raises orjson.JSONDecodeError (a ValueError) if the payload is not JSON: only
        the envelope's head is checked when the batch is decoded, so a handler that touches such a payload
        fails, and the event ends in the dead-letter topic after its retries."""
        if self._payload_end >= 0:
            self._payload = _loads(memoryview(self._value)[self._payload_start:self._payload_end])
            self._payload_end = -1
            if not self._native:  # the native consumer keeps the value to dead-letter the event as received
                self._value = None
        return self._payload

    @property
    def traceparent(self):
        """The ``traceparent`` header; without one, the trace a Spina producer starts for an event without a
        caller's trace context (``00-<id>-<second half of id>-01``: ProducerConfig.trace_headers="caller"
        does not send it, it carries nothing the id does not)."""
        if self._traceparent is None and (self._message is not None or self._native):
            # The native consumer already read a traceparent header that is not the derived one.
            if not self._native:
                for name, value in self._message.headers() or ():
                    if name == TRACEPARENT and value is not None:
                        self._traceparent = value.decode("ascii", "replace")
                        break
            if self._traceparent is None and self.id is not None and _TRACE_ID.match(self.id):
                self._traceparent = f"00-{self.id}-{self.id[16:]}-01"
        return self._traceparent

    @property
    def message(self):
        """The Kafka message this event came from, with confluent-kafka's Message accessors (``topic()``,
        ``partition()``, ``offset()``, ``key()``, ``value()``, ``headers()``): the confluent_kafka Message it
        was decoded from, a ConsumedMessage rebuilt on first use for the native consumer's events (they
        keep no per-message object), None for events built by hand."""
        if self._message is None and self._native:
            key, headers = self._extra if self._extra is not None else (self.aggregate_id.encode(), None)
            if headers is None and self._tp_header:
                headers = [(TRACEPARENT, f"00-{self.id}-{self.id[16:]}-01".encode())]
            self._message = ConsumedMessage(self.topic, self.partition, self.offset, key, self._value, headers)
        return self._message

    def __repr__(self):
        return (f"Event(type={self.type!r}, aggregate_id={self.aggregate_id!r}, id={self.id!r}, "
                f"topic={self.topic!r}, partition={self.partition}, offset={self.offset})")


@cython.no_gc
cdef class ConsumedMessage:
    """A consumed Kafka message as the native consumer hands over those that are not (yet) Events: read with
    confluent-kafka's Message accessors. ``headers()`` is None without headers, like Message.headers()."""

    def __init__(self, str topic, int partition, long long offset, key, value, headers):
        self._topic = topic
        self._partition = partition
        self._offset = offset
        self._key = key
        self._value = value
        self._headers = headers

    def topic(self):
        return self._topic

    def partition(self):
        return self._partition

    def offset(self):
        return self._offset

    def key(self):
        return self._key

    def value(self):
        return self._value

    def headers(self):
        return self._headers

    def error(self):
        return None

    def __repr__(self):
        return f"ConsumedMessage({self._topic}[{self._partition}]@{self._offset})"


cdef class EncodedBatch:
    """Encoded events as three lists of bytes (Kafka keys, values, traceparent header values) rather than a
    tuple, a header list and a header tuple per event: bytes are not tracked by the cycle collector, and
    three tracked containers per queued event had made its full passes a noticeable share of the producer's
    CPU. Item ``i`` reads as ``(key, value, [("traceparent", header)])``, as Producer.produce takes them."""

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, Py_ssize_t index):
        cdef Py_ssize_t size = len(self.keys)
        if index < 0:
            index += size
        if not 0 <= index < size:  # bounds checks are off in this module; iteration ends on IndexError
            raise IndexError(f"event index {index} out of range for a batch of {size}")
        header = self.headers[index]
        return (self.keys[index], self.values[index], [(TRACEPARENT, header)] if header is not None else [])


cdef class EnvelopeWriter:
    """Writes envelopes for one producer. Event ids: a random 64-bit producer prefix and a counter, 32 hex
    digits; an event without a caller's traceparent starts a trace whose id is the event id."""

    def __init__(self, str source, bint trace_headers=True):
        self.source = source
        self.trace_headers = trace_headers
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
        """An EncodedBatch for ``(aggregate_id, payload[, correlation_id[, traceparent]])`` items; raises
        EncodeError for the first bad item, before anything is returned."""
        cdef bytes head = (b'","type":' + _json_string(event_type) + b',"source":' + self._source_json
                           + b',"aggregate_id":')
        cdef bytes middle = (b',"time":' + _json_string(time_text) + b',"schema_version":'
                             + str(schema_version).encode() + b',"correlation_id":')
        cdef bytes null = b"null"
        cdef EncodedBatch out = EncodedBatch.__new__(EncodedBatch)
        cdef list keys = []
        cdef list values = []
        cdef list headers = []
        out.keys, out.values, out.headers = keys, values, headers
        cdef Py_ssize_t index, size, length
        cdef object item, aggregate_id, correlation_id, traceparent
        cdef bytes key, aggregate_json, correlation_json, payload_json, value
        cdef object header
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
            if traceparent is None and not self.trace_headers:
                header = None  # the consumer derives it from the id (Event.traceparent)
            elif traceparent is None:
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
            keys.append(key)
            values.append(value)
            headers.append(header)
        return out


cdef class _HeadReader:
    """Reads the head of an envelope in the exact layout EnvelopeWriter writes (fields in order, no
    whitespace, payload last) without building a dict, and leaves the payload as a slice to decode on use.
    Anything else (another writer's field order, escapes it cannot copy, a non-string field) returns False and
    the caller decodes the whole value with orjson. Strings repeated between events (type, source, time) are
    reused instead of decoded again (attributes declared in _events.pxd: the native consumer shares it)."""

    cdef inline bint _literal(self, const char* text, Py_ssize_t size) noexcept:
        if self.end - self.pos < size or memcmp(self.buf + self.pos, text, size) != 0:
            return False
        self.pos += size
        return True

    cdef inline Py_ssize_t _string_end(self) noexcept:
        """Index of the closing quote of the plain string starting at pos (after its opening quote), or -1 if
        it has escapes or control characters or does not end."""
        cdef Py_ssize_t i
        cdef unsigned char c
        for i in range(self.pos, self.end):
            c = <unsigned char>self.buf[i]
            if c == 34:
                return i
            if c == 92 or c < 0x20:
                return -1
        return -1

    cdef object _string(self):
        """The string value at pos (a plain JSON string) or None if it is not one."""
        cdef Py_ssize_t stop
        if not self._literal(b'"', 1):
            return None
        stop = self._string_end()
        if stop < 0:
            return None
        try:
            text = PyUnicode_DecodeUTF8(self.buf + self.pos, stop - self.pos, NULL)
        except UnicodeDecodeError:
            return None
        self.pos = stop + 1
        return text

    cdef object _cached(self, int which):
        """Like _string, reusing the previous event's str when the bytes are the same."""
        cdef Py_ssize_t stop, size
        cdef bytes last
        if not self._literal(b'"', 1):
            return None
        stop = self._string_end()
        if stop < 0:
            return None
        size = stop - self.pos
        last = self._last_type if which == 0 else (self._last_source if which == 1 else self._last_time)
        if (last is not None and PyBytes_GET_SIZE(last) == size
                and memcmp(PyBytes_AS_STRING(last), self.buf + self.pos, size) == 0):
            self.pos = stop + 1
            return self._type if which == 0 else (self._source if which == 1 else self._time)
        try:
            text = PyUnicode_DecodeUTF8(self.buf + self.pos, size, NULL)
        except UnicodeDecodeError:
            return None
        last = PyBytes_FromStringAndSize(self.buf + self.pos, size)
        if which == 0:
            self._last_type, self._type = last, text
        elif which == 1:
            self._last_source, self._source = last, text
        else:
            self._last_time, self._time = last, text
        self.pos = stop + 1
        return text

    cdef object _field(self, const char* name, Py_ssize_t size, int cached):
        """The string after the literal ``name`` (``_cached(cached)``, or ``_string`` when ``cached`` < 0), or
        None if either is not there."""
        if not self._literal(name, size):
            return None
        return self._string() if cached < 0 else self._cached(cached)

    cdef bint read(self, Event event, bytes value):
        cdef object text
        cdef long long number = 0
        cdef int digits = 0
        cdef bint negative = False
        self.buf = PyBytes_AS_STRING(value)
        self.pos = 0
        self.end = PyBytes_GET_SIZE(value)
        if self.end < 2 or self.buf[self.end - 1] != 125:  # }
            return False
        self.end -= 1
        # Each field only if the ones before it were there: the first missing one sends the value to orjson.
        ident = self._field(b'{"id":', 6, -1)
        kind = self._field(b',"type":', 8, 0) if ident is not None else None
        source = self._field(b',"source":', 10, 1) if kind is not None else None
        aggregate = self._field(b',"aggregate_id":', 16, -1) if source is not None else None
        when = self._field(b',"time":', 8, 2) if aggregate is not None else None
        if when is None:
            return False
        event.id, event.type, event.source, event.aggregate_id, event.time = ident, kind, source, aggregate, when
        if not self._literal(b',"schema_version":', 18):
            return False
        if self.pos < self.end and self.buf[self.pos] == 45:  # -
            negative = True
            self.pos += 1
        while self.pos < self.end and 48 <= self.buf[self.pos] <= 57 and digits < 18:
            number = number * 10 + (self.buf[self.pos] - 48)
            self.pos += 1
            digits += 1
        if digits == 0 or (self.pos < self.end and 48 <= self.buf[self.pos] <= 57):
            return False
        event.schema_version = -number if negative else number
        if not self._literal(b',"correlation_id":', 18):
            return False
        if self._literal(b"null", 4):
            event.correlation_id = None
        else:
            text = self._string()
            if text is None:
                return False
            event.correlation_id = text
        if not self._literal(b',"payload":', 11) or self.pos >= self.end:
            return False
        event._value = value
        event._payload_start = self.pos
        event._payload_end = self.end
        return True


cdef str read_envelope(_HeadReader reader, Event event, bytes value):
    """Fills ``event``'s envelope fields from ``value``: None, or why it is not an envelope. Spina's own layout
    is read without orjson (payload decoded on first use); any other value is decoded (and checked) whole."""
    cdef object doc
    if reader.read(event, value):
        return None
    try:
        doc = _loads(value)
    except orjson.JSONDecodeError as exc:
        return f"message value is not JSON: {exc}"
    try:
        event.id = doc["id"]
        event.type = doc["type"]
        event.source = doc["source"]
        event.aggregate_id = doc["aggregate_id"]
        event.time = doc["time"]
        event.schema_version = doc["schema_version"]
        event.correlation_id = doc["correlation_id"]
        event._payload = doc["payload"]
    except (KeyError, TypeError):
        return _why_not_envelope(doc)
    if event.id is None or event.aggregate_id is None or event.type is None:
        return _why_not_envelope(doc)
    return None


def decode_batch(list messages):
    """(events, undecodable [(message, reason)], errored messages, {(topic, partition): next offset}) for a
    batch of confluent-kafka Messages; events keep the messages' order (see read_envelope)."""
    cdef list events = []
    cdef list undecodable = []
    cdef list errored = []
    cdef dict offsets = {}
    cdef Event event
    cdef object message, value
    cdef str reason
    cdef _HeadReader reader = _HeadReader()
    cdef str topic = None
    cdef object last_topic = None
    for message in messages:
        if message.error() is not None:
            errored.append(message)
            continue
        event = Event.__new__(Event)
        event._payload_end = -1
        # One str per batch and topic rather than one per event (a batch is mostly one topic).
        value = message.topic()
        if value != last_topic:
            last_topic = topic = value
        event.topic = topic
        event.partition = message.partition()
        event.offset = message.offset()
        offsets[(event.topic, event.partition)] = event.offset + 1
        value = message.value()
        if value is None:
            undecodable.append((message, NO_VALUE))
            continue
        reason = read_envelope(reader, event, <bytes>value)
        if reason is not None:
            undecodable.append((message, reason))
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
