# Declarations of the HTTP/1.1 request parser, the response encoder and the fast lane for repeated reads
# (definitions in _http.pyx).

from libc.stdint cimport int64_t, uint64_t


cdef class RequestHead:
    # One parsed request line + header section. ``delegate`` is set when the request is valid HTTP but
    # outside the strict subset the fast front end serves itself (other versions, Transfer-Encoding,
    # Upgrade, a target it does not decode the way aiohttp would): such a request goes to aiohttp whole.
    cdef readonly str method
    cdef readonly str path
    cdef readonly str query
    cdef readonly bint http11
    cdef readonly bint keep_alive
    cdef readonly bint expect_continue
    cdef readonly bint delegate
    cdef readonly Py_ssize_t escape_offset
    cdef readonly Py_ssize_t content_length
    cdef readonly Py_ssize_t end


cdef enum HeaderName:
    HEADER_OTHER = 0
    HEADER_CONTENT_LENGTH = 1
    HEADER_TRANSFER_ENCODING = 2
    HEADER_CONNECTION = 3
    HEADER_EXPECT = 4
    HEADER_UPGRADE = 5
    HEADER_SPINA = 6


cdef enum:
    # Route slots the fast lane counts metrics for (the caller numbers its routes 0..7).
    LANE_SLOTS = 8
    # Latency bucket bounds the lane can count with (the agent's histogram has 18).
    LANE_BUCKETS = 32


cdef class _Answer:
    # One remembered answer: the body read at ``index`` of ``source`` (its ``service_index(name)``, or its
    # ``index`` when ``name`` is None), the response fields that follow from it, and the last full response
    # with the per-request header values it was built for.
    cdef object source
    cdef str name
    cdef uint64_t index
    cdef int slot
    cdef bytes body
    cdef bytes fixed  # "\r\nX-Consul-Index: ..\r\nContent-Type: ..\r\nContent-Length: ..\r\nDate: "
    cdef bytes response
    cdef int64_t stamp_second
    cdef bint stamp_known
    cdef int64_t stamp_contact


cdef class FastLane:
    cdef dict _answers  # raw request target (bytes) -> _Answer
    cdef Py_ssize_t _limit
    cdef Py_ssize_t _byte_limit
    cdef Py_ssize_t _bytes  # of the bodies remembered
    cdef object _node
    cdef object _core
    cdef int64_t _date_second
    cdef bytes _date
    cdef double _bounds[LANE_BUCKETS]
    cdef Py_ssize_t _bound_count
    cdef uint64_t _counts[LANE_SLOTS]
    cdef uint64_t _bucket_counts[LANE_SLOTS][LANE_BUCKETS + 1]
    cdef double _seconds[LANE_SLOTS]

    cdef bytes _current_date(self)
    cdef void _observe(self, int slot, double seconds)
    cdef void _forget(self, bytes target, _Answer answer)
