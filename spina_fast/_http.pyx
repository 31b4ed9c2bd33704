# cython: language_level=3
"""A strict, minimal HTTP/1.1 request-head parser and response encoder for the fast front end.

``parse_head`` reads one request line and header section (RFC 9112 §2-§5) out of a receive buffer
without copying it, and keeps only what the front end acts on: method, the percent-decoded path, the
raw query, version, keep-alive, Content-Length, Expect. Anything that is valid HTTP but outside that
subset is flagged ``delegate`` so the caller hands the request to aiohttp unchanged; anything that
is not valid HTTP raises ``MalformedRequest`` carrying the status to answer (400, 414 or 431).
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_CheckExact, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from libc.string cimport memchr, memcmp, memcpy

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
