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

