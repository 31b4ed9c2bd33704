# Declarations of the HTTP/1.1 request parser and response encoder (definitions in _http.pyx).


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
