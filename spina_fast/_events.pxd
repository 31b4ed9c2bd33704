# Declarations of spina_fast._events (the event bus's per-event hot paths).

cdef class Event:
    cdef readonly str id
    cdef readonly str type
    cdef readonly str source
    cdef readonly str aggregate_id
    cdef readonly str time
    cdef readonly object schema_version
    cdef readonly object correlation_id
    cdef object _payload
    # While _payload_end >= 0 the payload is still undecoded: _value[_payload_start:_payload_end].
    cdef bytes _value
    cdef Py_ssize_t _payload_start
    cdef Py_ssize_t _payload_end
    cdef readonly str topic
    cdef readonly int partition
    cdef readonly long long offset
    cdef object _message
    cdef object _traceparent
    # Read by _kafka_native's consumer (no Message object behind it): _value is kept for dead-lettering;
    # _extra is None when the key is the aggregate id's UTF-8 and the headers are at most the derived
    # traceparent (_tp_header: it was sent), else (key, headers).
    cdef bint _native
    cdef bint _tp_header
    cdef object _extra


cdef class ConsumedMessage:
    cdef readonly str _topic
    cdef readonly int _partition
    cdef readonly long long _offset
    cdef readonly object _key
    cdef readonly object _value
    cdef readonly object _headers


cdef class _HeadReader:
    cdef const char* buf
    cdef Py_ssize_t pos
    cdef Py_ssize_t end
    cdef bytes _last_type
    cdef str _type
    cdef bytes _last_source
    cdef str _source
    cdef bytes _last_time
    cdef str _time
    cdef inline bint _literal(self, const char* text, Py_ssize_t size) noexcept
    cdef inline Py_ssize_t _string_end(self) noexcept
    cdef object _string(self)
    cdef object _cached(self, int which)
    cdef object _field(self, const char* name, Py_ssize_t size, int cached)
    cdef bint read(self, Event event, bytes value)


cdef str read_envelope(_HeadReader reader, Event event, bytes value)


cdef class EncodedBatch:
    cdef readonly list keys
    cdef readonly list values
    cdef readonly list headers


cdef class EnvelopeWriter:
    cdef readonly str source
    cdef readonly bint trace_headers
    cdef bytes _source_json
    cdef char _prefix[16]
    cdef unsigned long long _counter
    cdef inline void _write_id(self, char* buf) noexcept

