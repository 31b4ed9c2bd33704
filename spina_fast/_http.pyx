# cython: language_level=3
"""A strict, minimal HTTP/1.1 request-head parser and response encoder for the fast front end.

``parse_head`` reads one request line and header section (RFC 9112 §2-§5) out of a receive buffer
without copying it, and keeps only what the front end acts on: method, the percent-decoded path, the
raw query, version, keep-alive, Content-Length, Expect. Anything that is valid HTTP but outside that
subset is flagged ``delegate`` so the caller hands the request to aiohttp unchanged; anything that
is not valid HTTP raises ``MalformedRequest`` carrying the status to answer (400, 414 or 431).

``FastLane`` replays the fully encoded answers of repeated plain GETs (registry lookups, KV reads) straight
from the receive buffer while the index they were read at holds; everything else takes the general path.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_CheckExact, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint64_t
from libc.stdio cimport snprintf
from libc.string cimport memchr, memcmp, memcpy
from libc.time cimport time as c_time, time_t, tm
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec


cdef extern from "<time.h>" nogil:
    tm* gmtime_r(const time_t* timer, tm* result)

from http import HTTPStatus
from urllib.parse import unquote_plus

from spina_fast.errors import MalformedRequest

# Content-Length beyond this is only ever compared against limits, so it is clamped, not overflowed.
cdef Py_ssize_t _LENGTH_CAP = 1 << 40

# RFC 9110 §5.6.2 tchar: the characters of methods and header names.
cdef bint _TCHAR[256]
for _c in range(256):
    _TCHAR[_c] = (chr(_c).isascii() and chr(_c).isalnum()) or chr(_c) in "!#$%&'*+-.^_`|~"

cdef signed char _HEX[256]
for _c in range(256):
    _HEX[_c] = int(chr(_c), 16) if chr(_c) in "0123456789abcdefABCDEF" else -1


cdef class RequestHead:
    """Attributes: ``method``; ``path`` percent-decoded ("" when ``delegate``); ``query`` raw, without
    the ``?``; ``escape_offset`` where the first ``%`` of the raw path is (-1: none); ``http11``;
    ``keep_alive``; ``content_length`` (0 when absent); ``expect_continue``; ``end``, the buffer offset
    just past the header section."""

    def __repr__(self) -> str:
        return (f"RequestHead({self.method} {self.path!r}?{self.query!r} http11={self.http11} "
                f"keep_alive={self.keep_alive} content_length={self.content_length} "
                f"expect_continue={self.expect_continue} delegate={self.delegate} end={self.end})")


cdef inline bint _name_is(const unsigned char* name, Py_ssize_t length, const char* lower, Py_ssize_t lower_length):
    # Header names are tchars, and no non-letter tchar becomes a lowercase letter when OR-ed with 0x20.
    cdef Py_ssize_t i
    if length != lower_length:
        return False
    for i in range(length):
        if (name[i] | 0x20) != <unsigned char>lower[i]:
            return False
    return True


cdef inline HeaderName _classify(const unsigned char* name, Py_ssize_t length):
    if _name_is(name, length, b"content-length", 14):
        return HEADER_CONTENT_LENGTH
    if _name_is(name, length, b"transfer-encoding", 17):
        return HEADER_TRANSFER_ENCODING
    if _name_is(name, length, b"connection", 10):
        return HEADER_CONNECTION
    if _name_is(name, length, b"expect", 6):
        return HEADER_EXPECT
    if _name_is(name, length, b"upgrade", 7):
        return HEADER_UPGRADE
    if length > 8 and _name_is(name, 8, b"x-spina-", 8):
        return HEADER_SPINA
    return HEADER_OTHER


cdef inline bint _token_is(const unsigned char* value, Py_ssize_t start, Py_ssize_t end, const char* lower,
                           Py_ssize_t lower_length):
    # Trim the optional whitespace around one element of a comma-separated list, then compare.
    while start < end and (value[start] == 32 or value[start] == 9):
        start += 1
    while end > start and (value[end - 1] == 32 or value[end - 1] == 9):
        end -= 1
    return _name_is(value + start, end - start, lower, lower_length)


cdef object _decode_path(const unsigned char* raw, Py_ssize_t length):
    """The percent-decoded path, or None where aiohttp's decoding could differ from a plain one
    (a ``%`` not followed by two hex digits, bytes that are not UTF-8, decoded control characters)."""
    cdef Py_ssize_t i = 0, written = 0
    cdef signed char high, low
    cdef unsigned char byte
    cdef bytes decoded
    cdef char* out
    if memchr(raw, 37, length) == NULL:  # no '%': the bytes were checked to be printable ASCII
        return PyUnicode_DecodeASCII(<const char*>raw, length, NULL)
    decoded = PyBytes_FromStringAndSize(NULL, length)
    out = PyBytes_AS_STRING(decoded)
    while i < length:
        byte = raw[i]
        if byte == 37:
            if i + 2 >= length:
                return None
            high = _HEX[raw[i + 1]]
            low = _HEX[raw[i + 2]]
            if high < 0 or low < 0:
                return None
            byte = <unsigned char>((high << 4) | low)
            if byte < 32 or byte == 127:
                return None
            i += 3
        else:
            i += 1
        out[written] = <char>byte
        written += 1
    try:
        return PyUnicode_DecodeUTF8(out, written, NULL)
    except UnicodeDecodeError:
        return None


cdef inline Py_ssize_t _token_end(const unsigned char* buf, Py_ssize_t i, Py_ssize_t end):
    while i < end and _TCHAR[buf[i]]:
        i += 1
    return i


cdef inline Py_ssize_t _line_end(const unsigned char* buf, Py_ssize_t pos, Py_ssize_t size):
    """Offset of the next LF at or after ``pos``, or -1."""
    cdef const void* found = memchr(buf + pos, 10, size - pos)
    return -1 if found == NULL else <const unsigned char*>found - buf


cdef inline Py_ssize_t _content_end(const unsigned char* buf, Py_ssize_t line_start, Py_ssize_t lf):
    # RFC 9112 §2.2: CRLF ends a line; a bare LF is accepted as well.
    return lf - 1 if lf > line_start and buf[lf - 1] == 13 else lf


def parse_head(object data, Py_ssize_t start=0, Py_ssize_t max_line=8190, Py_ssize_t max_field=8190,
               Py_ssize_t max_head=65536, Py_ssize_t max_headers=128):
    """Parse the request head that begins at ``data[start]`` (bytes or bytearray).

    Returns a ``RequestHead``, or None while the head is incomplete. Raises ``MalformedRequest``
    (400; 414 for a request line over ``max_line``; 431 for a field over ``max_field``, more than
    ``max_headers`` fields or a head over ``max_head`` bytes)."""
    cdef const unsigned char* buf
    cdef Py_ssize_t size, pos, lf, line_end, method_end, target_start, target_end, question, count = 0
    cdef Py_ssize_t name_start, name_end, value_start, value_end, element_start, i, length
    cdef Py_ssize_t content_length = -1
    cdef bint saw_transfer_encoding = False, connection_close = False, connection_keep_alive = False
    cdef unsigned char c
    cdef const void* found
    cdef HeaderName header
    cdef RequestHead head
    if PyBytes_CheckExact(data):
        buf = <const unsigned char*>PyBytes_AS_STRING(data)
        size = PyBytes_GET_SIZE(data)
    elif PyByteArray_CheckExact(data):
        buf = <const unsigned char*>PyByteArray_AS_STRING(data)
        size = PyByteArray_GET_SIZE(data)
    else:
        raise TypeError(f"parse_head needs bytes or bytearray, not {type(data).__name__}")
    if start < 0 or start > size:
        raise ValueError(f"start {start} is outside the buffer of {size} bytes")

    # RFC 9112 §2.2: ignore empty lines before the request line (left over after a previous body).
    pos = start
    while pos < size and (buf[pos] == 10 or (buf[pos] == 13 and pos + 1 < size and buf[pos + 1] == 10)):
        pos += 1 if buf[pos] == 10 else 2
    lf = _line_end(buf, pos, size)
    if lf < 0:
        # Refuse what can never become a request line (a TLS hello, binary noise) without waiting for more.
        i = _token_end(buf, pos, size)
        if i < size and buf[i] != 32 and not (buf[i] == 13 and i + 1 == size):
            raise MalformedRequest("malformed request line: expected 'METHOD /path HTTP/1.1'")
        if size - start > max_line:
            raise MalformedRequest(f"request line is longer than {max_line} bytes", status=414)
        return None
    line_end = _content_end(buf, pos, lf)
    if line_end - start > max_line:
        raise MalformedRequest(f"request line is longer than {max_line} bytes", status=414)

    head = RequestHead.__new__(RequestHead)
    # Request line: method SP request-target SP HTTP-version (RFC 9112 §3), single spaces only.
    method_end = _token_end(buf, pos, line_end)
    if method_end == pos or method_end >= line_end or buf[method_end] != 32:
        raise MalformedRequest("malformed request line: expected 'METHOD /path HTTP/1.1'")
    target_start = method_end + 1
    i = target_start
    while i < line_end and 32 < buf[i] < 127:
        i += 1
    target_end = i
    if target_end == target_start or i >= line_end or buf[i] != 32:
        raise MalformedRequest("malformed request line: the target must be printable ASCII without spaces")
    i += 1
    if (line_end - i != 8 or memcmp(buf + i, b"HTTP/", 5) != 0 or not 48 <= buf[i + 5] <= 57
            or buf[i + 6] != 46 or not 48 <= buf[i + 7] <= 57):
        raise MalformedRequest("malformed request line: the version must be HTTP/<digit>.<digit>")
    head.http11 = buf[i + 5] == 49 and buf[i + 7] == 49
    head.delegate = buf[i + 5] != 49 or buf[i + 7] > 49

    length = method_end - pos
    if length == 3 and memcmp(buf + pos, b"GET", 3) == 0:
        head.method = "GET"
    elif length == 3 and memcmp(buf + pos, b"PUT", 3) == 0:
        head.method = "PUT"
    elif length == 6 and memcmp(buf + pos, b"DELETE", 6) == 0:
        head.method = "DELETE"
    else:
        head.method = PyUnicode_DecodeASCII(<const char*>buf + pos, length, NULL)

    # Origin form only; a fragment is not part of a request target (aiohttp drops it: let it).
    question = target_end
    head.escape_offset = -1
    head.path = ""
    if buf[target_start] != 47 or memchr(buf + target_start, 35, target_end - target_start) != NULL:
        head.delegate = True
    else:
        found = memchr(buf + target_start, 63, target_end - target_start)
        if found != NULL:
            question = <const unsigned char*>found - buf
        found = memchr(buf + target_start, 37, question - target_start)
        if found != NULL:
            head.escape_offset = <const unsigned char*>found - buf - target_start
        path = _decode_path(buf + target_start, question - target_start)
        if path is None:
            head.delegate = True
        else:
            head.path = path
    head.query = (PyUnicode_DecodeASCII(<const char*>buf + question + 1, target_end - question - 1, NULL)
                  if question < target_end else "")

    # Header fields (RFC 9112 §5): token ":" OWS value OWS; no whitespace before the colon, no obs-fold.
    pos = lf + 1
    while True:
        lf = _line_end(buf, pos, size)
        if lf < 0:
            if size - start > max_head:
                raise MalformedRequest(f"request header section is larger than {max_head} bytes", status=431)
            if size - pos > max_field:
                raise MalformedRequest(f"a request header field is longer than {max_field} bytes", status=431)
            return None
        line_end = _content_end(buf, pos, lf)
        if line_end == pos:
            break
        if line_end - pos > max_field:
            raise MalformedRequest(f"a request header field is longer than {max_field} bytes", status=431)
        count += 1
        if count > max_headers:
            raise MalformedRequest(f"more than {max_headers} request header fields", status=431)
        if lf + 1 - start > max_head:
            raise MalformedRequest(f"request header section is larger than {max_head} bytes", status=431)
        name_start = pos
        name_end = _token_end(buf, pos, line_end)
        if name_end == name_start or name_end >= line_end or buf[name_end] != 58:
            raise MalformedRequest("malformed header line: expected 'Name: value'")
        i = name_end + 1
        while i < line_end and (buf[i] == 32 or buf[i] == 9):
            i += 1
        value_start = i
        value_end = line_end
        while value_end > value_start and (buf[value_end - 1] == 32 or buf[value_end - 1] == 9):
            value_end -= 1
        for i in range(value_start, value_end):
            c = buf[i]
            if (c < 32 and c != 9) or c == 127:
                raise MalformedRequest("malformed header line: control character in a header value")
        header = _classify(buf + name_start, name_end - name_start)
        if header == HEADER_CONTENT_LENGTH:
            if value_end == value_start:
                raise MalformedRequest("Content-Length is empty")
            length = 0
            for i in range(value_start, value_end):
                c = buf[i]
                if not 48 <= c <= 57:
                    raise MalformedRequest("Content-Length must be a decimal number of bytes")
                if length < _LENGTH_CAP:
                    length = length * 10 + (c - 48)
            if content_length >= 0 and content_length != length:
                raise MalformedRequest("conflicting Content-Length headers")
            content_length = length
        elif header == HEADER_TRANSFER_ENCODING:
            saw_transfer_encoding = True
        elif header == HEADER_CONNECTION:
            element_start = value_start
            for i in range(value_start, value_end + 1):
                if i == value_end or buf[i] == 44:
                    if _token_is(buf, element_start, i, b"close", 5):
                        connection_close = True
                    elif _token_is(buf, element_start, i, b"keep-alive", 10):
                        connection_keep_alive = True
                    element_start = i + 1
        elif header == HEADER_EXPECT:
            if _token_is(buf, value_start, value_end, b"100-continue", 12):
                head.expect_continue = True
            else:
                head.delegate = True  # aiohttp answers any other expectation (417)
        elif header == HEADER_UPGRADE or header == HEADER_SPINA:
            # Spina's own request headers (X-Spina-Author, ...) carry meaning the aiohttp handlers read.
            head.delegate = True
        pos = lf + 1

    if saw_transfer_encoding:
        # RFC 9112 §6.1: both framings at once is how requests get smuggled; chunked alone goes to aiohttp.
        if content_length >= 0:
            raise MalformedRequest("Transfer-Encoding and Content-Length cannot both be sent")
        head.delegate = True
    head.content_length = content_length if content_length > 0 else 0
    head.keep_alive = (not connection_close) if head.http11 else (connection_keep_alive and not connection_close)
    head.end = lf + 1
    return head


def parse_query(str raw not None) -> dict:
    """``a=1&b&c=%2F`` -> ``{"a": "1", "b": "", "c": "/"}``: the first value of each name, decoded the way
    aiohttp's ``request.query`` decodes it (``+`` is a space, bad escapes kept, bad UTF-8 replaced)."""
    cdef dict result = {}
    cdef str part, name, value
    if not raw:
        return result
    for part in raw.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        if "%" in part or "+" in part:
            name = unquote_plus(name)
            value = unquote_plus(value)
        if name not in result:
            result[name] = value
    return result


cdef dict _STATUS_LINES_11 = {}
cdef dict _STATUS_LINES_10 = {}
for _status in HTTPStatus:
    _STATUS_LINES_11[_status.value] = f"HTTP/1.1 {_status.value} {_status.phrase}\r\n".encode()
    _STATUS_LINES_10[_status.value] = f"HTTP/1.0 {_status.value} {_status.phrase}\r\n".encode()


cdef inline Py_ssize_t _put(char* out, Py_ssize_t at, bytes piece):
    cdef Py_ssize_t length = PyBytes_GET_SIZE(piece)
    memcpy(out + at, PyBytes_AS_STRING(piece), length)
    return at + length


def encode_response(int status, bytes body not None, str content_type, dict headers, bytes date not None,
                    bint http11, bint keep_alive) -> bytes:
    """One complete response: status line, ``headers`` (str -> str, Latin-1), Content-Type (if not None),
    Content-Length, Date, the Connection header the keep-alive decision needs, then ``body``."""
    cdef list pieces = []
    cdef bytes piece, response
    cdef Py_ssize_t total = 0, at = 0
    cdef char* out
    status_line = (_STATUS_LINES_11 if http11 else _STATUS_LINES_10).get(status)
    if status_line is None:
        status_line = f"HTTP/1.{1 if http11 else 0} {status} Unknown\r\n".encode()
    pieces.append(status_line)
    if headers:
        for name, value in headers.items():
            pieces.append(f"{name}: {value}\r\n".encode("latin-1"))
    if content_type is not None:
        pieces.append(f"Content-Type: {content_type}\r\n".encode("latin-1"))
    pieces.append(f"Content-Length: {PyBytes_GET_SIZE(body)}\r\nDate: ".encode())
    pieces.append(date)
    if not keep_alive:
        pieces.append(b"\r\nConnection: close\r\n\r\n")
    elif not http11:
        pieces.append(b"\r\nConnection: keep-alive\r\n\r\n")
    else:
        pieces.append(b"\r\n\r\n")
    pieces.append(body)
    for piece in pieces:
        total += PyBytes_GET_SIZE(piece)
    response = PyBytes_FromStringAndSize(NULL, total)
    out = PyBytes_AS_STRING(response)
    for piece in pieces:
        at = _put(out, at, piece)
    return response


# --- the fast lane ------------------------------------------------------------------------------------------------
#
# A keep-alive HTTP/1.1 client repeating reads (registry lookups, KV gets) spends most of the general path's
# ~30 µs per request in generic Python (head object, route, dispatch, reply, encode, metrics, queue). The lane
# answers the plain repeats entirely here: it recognises a bare ``GET <target> HTTP/1.1`` head, finds the fully
# encoded response for the exact target, checks it against the index it was read at (the service's, the
# catalog's, the KV store's) and against the per-request header values, and writes every answer of a chunk with
# one ``transport.write``. Whatever it does not recognise (a first read, a stale answer, any other request or
# header it does not vouch for) it leaves, with all that follows it, to the general path, which parses it
# strictly and answers (or rejects) it as before.

cdef bytes _LANE_PREFIX = b"HTTP/1.1 200 OK\r\nX-Consul-KnownLeader: "
cdef bytes _LANE_CONTACT = b"\r\nX-Consul-LastContact: "
cdef bytes _LANE_END = b"\r\n\r\n"
cdef const char* _WEEKDAYS = b"SunMonTueWedThuFriSat"
cdef const char* _MONTHS = b"JanFebMarAprMayJunJulAugSepOctNovDec"
# aiohttp's limits, which parse_head enforces on the general path (a head beyond them is never the lane's).
cdef Py_ssize_t _LANE_MAX_LINE = 8190
cdef Py_ssize_t _LANE_MAX_HEADERS = 128
cdef Py_ssize_t _LANE_MAX_HEAD = 65536


cdef inline double _monotonic() noexcept:
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return now.tv_sec + now.tv_nsec * 1e-9


cdef Py_ssize_t _plain_get_end(const unsigned char* buf, Py_ssize_t start, Py_ssize_t size,
                               Py_ssize_t* target_start, Py_ssize_t* target_end) noexcept:
    """The offset just past a complete ``GET <origin-form target> HTTP/1.1`` head at ``start`` that keeps the
    connection open, carries no body and no header the general path acts on; -1 for anything else.

    Every head accepted here is one ``parse_head`` accepts with the same target, ``keep_alive`` and no body,
    and does not delegate: CRLF line ends only, header lines checked as strictly, the limits applied."""
    cdef Py_ssize_t i, pos, name_end, lf, line_end, element_start, count = 0
    cdef const void* found
    cdef unsigned char c
    cdef HeaderName header
    if size - start < 16 or memcmp(buf + start, b"GET /", 5) != 0:
        return -1
    i = start + 4
    target_start[0] = i
    while i < size and 32 < buf[i] < 127:
        i += 1
    if size - i < 11 or memcmp(buf + i, b" HTTP/1.1\r\n", 11) != 0 or i + 9 - start > _LANE_MAX_LINE:
        return -1
    if memchr(buf + target_start[0], 35, i - target_start[0]) != NULL:  # '#': aiohttp's
        return -1
    target_end[0] = i
    pos = i + 11
    while True:
        if size - pos < 2:
            return -1
        if buf[pos] == 13 and buf[pos + 1] == 10:
            pos += 2
            return pos if pos - start <= _LANE_MAX_HEAD else -1
        name_end = _token_end(buf, pos, size)
        if name_end == pos or name_end >= size or buf[name_end] != 58:
            return -1
        found = memchr(buf + name_end, 10, size - name_end)
        if found == NULL:
            return -1
        lf = <const unsigned char*>found - buf
        if buf[lf - 1] != 13:
            return -1
        line_end = lf - 1
        count += 1
        if line_end - pos > _LANE_MAX_LINE or count > _LANE_MAX_HEADERS or lf + 1 - start > _LANE_MAX_HEAD:
            return -1
        for i in range(name_end + 1, line_end):
            c = buf[i]
            if (c < 32 and c != 9) or c == 127:
                return -1
        header = _classify(buf + pos, name_end - pos)
        if header == HEADER_CONTENT_LENGTH:
            # Only an explicit empty body ("0", "00"...) is the lane's.
            i = name_end + 1
            while i < line_end and (buf[i] == 32 or buf[i] == 9):
                i += 1
            if i == line_end:
                return -1
            while i < line_end and buf[i] == 48:
                i += 1
            while i < line_end and (buf[i] == 32 or buf[i] == 9):
                i += 1
            if i != line_end:
                return -1
        elif header == HEADER_CONNECTION:
            element_start = name_end + 1
            for i in range(name_end + 1, line_end + 1):
                if i == line_end or buf[i] == 44:
                    if _token_is(buf, element_start, i, b"close", 5):
                        return -1
                    element_start = i + 1
        elif header != HEADER_OTHER:
            return -1
        pos = lf + 1


cdef Py_ssize_t _format_int(char* out, int64_t value) noexcept:
    # Decimal digits of a non-negative value into ``out`` (at least 20 bytes); returns how many.
    cdef char digits[24]
    cdef Py_ssize_t count = 0, i
    while True:
        digits[count] = <char>(48 + value % 10)
        count += 1
        value //= 10
        if value == 0:
            break
    for i in range(count):
        out[i] = digits[count - 1 - i]
    return count


cdef bytes _lane_response(_Answer answer, bytes date, bint known, int64_t contact):
    """What ``encode_response(200, body, type, {"X-Consul-KnownLeader", "X-Consul-LastContact",
    "X-Consul-Index"}, date, True, True)`` gives, assembled from the answer's stored pieces."""
    cdef char contact_text[24]
    cdef Py_ssize_t contact_length = _format_int(contact_text, contact)
    cdef const char* known_text = b"true" if known else b"false"
    cdef Py_ssize_t known_length = 4 if known else 5
    cdef Py_ssize_t total = (PyBytes_GET_SIZE(_LANE_PREFIX) + known_length + PyBytes_GET_SIZE(_LANE_CONTACT)
                             + contact_length + PyBytes_GET_SIZE(answer.fixed) + PyBytes_GET_SIZE(date)
                             + PyBytes_GET_SIZE(_LANE_END) + PyBytes_GET_SIZE(answer.body))
    cdef bytes response = PyBytes_FromStringAndSize(NULL, total)
    cdef char* out = PyBytes_AS_STRING(response)
    cdef Py_ssize_t at = _put(out, 0, _LANE_PREFIX)
    memcpy(out + at, known_text, known_length)
    at = _put(out, at + known_length, _LANE_CONTACT)
    memcpy(out + at, contact_text, contact_length)
    at = _put(out, at + contact_length, answer.fixed)
    at = _put(out, at, date)
    at = _put(out, at, _LANE_END)
    _put(out, at, answer.body)
    return response


cdef class _Answer:
    pass


cdef class FastLane:
    """Fully encoded answers to repeated reads, served straight from the receive buffer.

    ``remember`` stores what the general path answered for a GET target, for answers that depend on nothing
    but the state of one store at one index (not blocking, no barrier, no leader-local load); ``serve``
    answers the plain heads at the start of a chunk whose target it remembers while the store's index is still
    that index, with the Consul read headers of the moment (``X-Consul-KnownLeader`` and
    ``X-Consul-LastContact``, read from the Raft node for every chunk) and the current ``Date``. Requests
    served here are counted per slot and latency bucket in C and read by ``metrics()``. Bounded by the number
    of answers and by the bytes of their bodies: the oldest half goes when either is reached.
    """

    def __init__(self, bounds: tuple = (), Py_ssize_t limit=20_000, Py_ssize_t byte_limit=32 << 20):
        if len(bounds) > LANE_BUCKETS:
            raise ValueError(f"at most {LANE_BUCKETS} latency bucket bounds, got {len(bounds)}")
        if limit < 2:
            raise ValueError(f"limit must be at least 2 answers, got {limit}")
        if byte_limit < 1:
            raise ValueError(f"byte_limit must be positive, got {byte_limit}")
        self._answers = {}
        self._limit = limit
        self._byte_limit = byte_limit
        self._bytes = 0
        self._bound_count = len(bounds)
        for position, bound in enumerate(bounds):
            self._bounds[position] = bound
        self._date_second = -1
        self._date = b""

    def __len__(self) -> int:
        return len(self._answers)

    def clear(self) -> None:
        self._answers.clear()
        self._bytes = 0

    cdef bytes _current_date(self):
        cdef time_t now = c_time(NULL)
        cdef tm parts
        cdef char text[40]
        cdef int length
        if now != self._date_second:
            gmtime_r(&now, &parts)
            # RFC 9110 §5.6.7 IMF-fixdate, as email.utils.formatdate(usegmt=True) writes it.
            length = snprintf(text, sizeof(text), b"%.3s, %02d %.3s %04d %02d:%02d:%02d GMT",
                              _WEEKDAYS + 3 * parts.tm_wday, parts.tm_mday, _MONTHS + 3 * parts.tm_mon,
                              parts.tm_year + 1900, parts.tm_hour, parts.tm_min, parts.tm_sec)
            self._date = PyBytes_FromStringAndSize(text, length)
            self._date_second = now
        return self._date

    def date(self) -> bytes:
        """The ``Date`` header value for now (formatted once per second)."""
        return self._current_date()

    cdef void _observe(self, int slot, double seconds):
        cdef Py_ssize_t bucket = 0
        # Prometheus buckets are "<= le": the first bound not below ``seconds`` (bisect_left).
        while bucket < self._bound_count and self._bounds[bucket] < seconds:
            bucket += 1
        self._counts[slot] += 1
        self._bucket_counts[slot][bucket] += 1
        self._seconds[slot] += seconds

    cdef void _forget(self, bytes target, _Answer answer):
        del self._answers[target]
        self._bytes -= PyBytes_GET_SIZE(answer.body)

    def remember(self, bytes target not None, object source not None, str name, uint64_t index, str shown_index,
                 int slot, bytes body not None, str content_type not None, object node not None) -> None:
        """Keep the answer to GET ``target``: ``body``, read when ``source.service_index(name)`` (``source.index``
        when ``name`` is None) was ``index``, sent with ``X-Consul-Index: shown_index``. ``node`` is the Raft
        node whose ``core`` (``role``, ``leader_id``) and ``last_contact_ms()`` give the read headers."""
        cdef _Answer answer, old
        if not 0 <= slot < LANE_SLOTS:
            raise ValueError(f"slot {slot} is outside 0..{LANE_SLOTS - 1}")
        old = self._answers.get(target)
        if old is not None:
            self._forget(target, old)
        if PyBytes_GET_SIZE(body) > self._byte_limit // 4:
            return  # one huge answer would flush everything else
        if len(self._answers) >= self._limit or self._bytes + PyBytes_GET_SIZE(body) > self._byte_limit:
            for stale in list(self._answers)[:len(self._answers) // 2 + 1]:
                self._forget(stale, self._answers[stale])
        answer = _Answer.__new__(_Answer)
        answer.source = source
        answer.name = name
        answer.index = index
        answer.slot = slot
        answer.body = body
        answer.fixed = (f"\r\nX-Consul-Index: {shown_index}\r\nContent-Type: {content_type}\r\n"
                        f"Content-Length: {PyBytes_GET_SIZE(body)}\r\nDate: ").encode("latin-1")
        answer.response = None
        self._node = node
        self._core = node.core
        self._answers[target] = answer
        self._bytes += PyBytes_GET_SIZE(body)

    def serve(self, bytes data not None, object transport) -> int:
        """Answer the plain lookups at the start of ``data`` with one ``transport.write``; returns how many bytes
        they took (0: none, the general path takes it all from there)."""
        cdef const unsigned char* buf = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data), pos = 0, end, target_start = 0, target_end = 0
        cdef PyObject* found
        cdef _Answer answer
        cdef bytes key, date = None, first = None
        cdef list more = None
        cdef uint64_t current
        cdef bint known = False, headers_read = False
        cdef int64_t contact = 0
        cdef double started, finished
        if not self._answers:
            return 0
        started = _monotonic()
        while pos < size:
            end = _plain_get_end(buf, pos, size, &target_start, &target_end)
            if end < 0:
                break
            key = PyBytes_FromStringAndSize(<const char*>buf + target_start, target_end - target_start)
            found = PyDict_GetItem(self._answers, key)
            if found == NULL:
                break
            answer = <_Answer>found
            current = answer.source.index if answer.name is None else answer.source.service_index(answer.name)
            if current != answer.index:
                self._forget(key, answer)
                break
            if not headers_read:
                # kv.read_headers' values, read from the Raft core's own fields where the node's properties
                # would only wrap them (leader: contact 0); a follower asks the node for its contact age.
                core = self._core
                known = bool(core.leader_id)
                if core.role == "leader":
                    contact = 0
                else:
                    contact = self._node.last_contact_ms()
                    if contact < 0:
                        contact = 0
                date = self._current_date()
                headers_read = True
            if (answer.response is None or answer.stamp_second != self._date_second or answer.stamp_known != known
                    or answer.stamp_contact != contact):
                answer.response = _lane_response(answer, date, known, contact)
                answer.stamp_second = self._date_second
                answer.stamp_known = known
                answer.stamp_contact = contact
            if first is None:
                first = answer.response
            else:
                if more is None:
                    more = [first]
                more.append(answer.response)
            finished = _monotonic()
            self._observe(answer.slot, finished - started)
            started = finished
            pos = end
        if first is not None:
            transport.write(first if more is None else b"".join(more))
        return pos

    def metrics(self) -> list:
        """``[(slot, requests, per-bucket counts (not cumulative, +Inf last), seconds)]`` for every slot served."""
        cdef int slot
        return [(slot, self._counts[slot], [self._bucket_counts[slot][bucket]
                                            for bucket in range(self._bound_count + 1)], self._seconds[slot])
                for slot in range(LANE_SLOTS) if self._counts[slot]]
