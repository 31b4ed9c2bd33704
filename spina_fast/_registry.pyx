# cython: language_level=3
"""Compact registry structures: the instance store, its queries and its commands; string interning
and packed socket addresses.

The store keeps every service's instances in one C array of 72-byte ``Instance`` structs sorted by
instance id, the variable parts (instance id, IPv6 address, tag / meta / API-version string ids) in a
per-service word arena, and every repeated string once in its own reference-counted string table.
It is a deterministic Raft state machine: ``apply(index, command)`` in log order, ``snapshot`` /
``restore`` / ``state_hash``, and a per-service modify index for blocking queries.

An address is packed into 6 bytes (IPv4) or 18 bytes (IPv6): the raw address followed by the port,
big-endian, which is also exactly what a DNS A/AAAA record and an SRV port field carry.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.list cimport PyList_GET_ITEM
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport qsort
from libc.string cimport memcmp, memcpy, memmove, memset, strlen

import hashlib
import ipaddress
import re


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object text, Py_ssize_t* size) except NULL
    bint PyUnicode_IS_ASCII(object text)

cdef extern from "sys/socket.h":
    ctypedef unsigned int socklen_t
    int AF_INET
    int AF_INET6

cdef extern from "arpa/inet.h" nogil:
    int inet_pton(int family, const char* text, void* packed)
    const char* inet_ntop(int family, const void* packed, char* text, socklen_t size)


# --- limits (the issue's "1,000 tags" and "1 MB meta value" must be refused) ----------------------

MAX_NAME_BYTES = LIMIT_NAME_BYTES
MAX_TAGS = LIMIT_TAGS
MAX_TAG_BYTES = LIMIT_TAG_BYTES
MAX_META_PAIRS = LIMIT_META_PAIRS
MAX_META_KEY_BYTES = LIMIT_META_KEY_BYTES
MAX_META_VALUE_BYTES = LIMIT_META_VALUE_BYTES
MAX_API_VERSIONS = LIMIT_API_VERSIONS
MAX_RANGE_COMPARATORS = LIMIT_RANGE_COMPARATORS
MAX_LOAD = 0xFFFFFFFF
MAX_DURATION_MS = 0xFFFFFFFF
MAX_WEIGHT = 0xFFFF

STATUSES = ("passing", "warning", "critical")
cdef tuple _STATUS_NAMES = STATUSES
cdef dict _STATUS_CODES = {"passing": STATUS_PASSING, "warning": STATUS_WARNING, "critical": STATUS_CRITICAL}
# Accepted statuses of a query, as a bit mask indexed by Status.
cdef dict _HEALTH_MASKS = {"any": 0b111, "healthy": 0b011, "passing": 0b001}

cdef enum:
    OP_REGISTER = 1
    OP_DEREGISTER = 2
    OP_SET_STATUS = 3
    SNAPSHOT_FORMAT = 2
    REGISTER_HEADER_BYTES = 18
    # Load ordering key: proximity tier above bit 48, and below it the complement of the weighted free
    # capacity, which is at most (2**32 - 1) * (2**16 - 1) < 2**48.
    SCORE_BITS = 48

cdef uint64_t _SCORE_MASK = (<uint64_t>1 << SCORE_BITS) - 1
cdef bytes _SNAPSHOT_MAGIC = b"SPRG"


class InvalidRegistration(ValueError):
    """A registration or registry command the store refuses; ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# --- semantic versions -----------------------------------------------------------------------------

# SemVer 2.0 (https://semver.org), with a leading "v" and a missing MINOR / PATCH (= 0) tolerated because
# image tags like "v1.4" are what services report.
_SEMVER = re.compile(
    r"v?(0|[1-9][0-9]*)(?:\.(0|[1-9][0-9]*)(?:\.(0|[1-9][0-9]*))?)?"
    r"(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?",
    re.ASCII,
)
_SEMVER_SHAPE = "MAJOR[.MINOR[.PATCH]][-PRERELEASE][+BUILD]"
cdef dict _VERSION_KEYS = {}   # text -> (key, parts given): versions repeat across thousands of instances


cdef tuple _parse_semver(str text):
    cdef tuple cached = _VERSION_KEYS.get(text)
    if cached is not None:
        return cached
    match = _SEMVER.fullmatch(text)
    if match is None:
        raise ValueError(f"version {text!r} is not a semantic version ({_SEMVER_SHAPE})")
    numbers = []
    for group in match.group(1, 2, 3):
        number = int(group) if group is not None else 0
        if number > 0xFFFFFFFF:
            raise ValueError(f"version {text!r}: {number} does not fit in 32 bits")
        numbers.append(number)
    parts = 3 if match.group(3) is not None else 2 if match.group(2) is not None else 1
    prerelease = match.group(4)
    if prerelease is None:
        key = (numbers[0], numbers[1], numbers[2], 1, ())
    else:
        identifiers = []
        for identifier in prerelease.split("."):
            if identifier.isdigit():
                if len(identifier) > 1 and identifier[0] == "0":
                    raise ValueError(f"version {text!r}: numeric identifier {identifier!r} has a leading zero")
                identifiers.append((0, int(identifier)))
            else:
                identifiers.append((1, identifier))
        # A prerelease orders before its release (SemVer §11): 0 before 1 in the fourth place.
        key = (numbers[0], numbers[1], numbers[2], 0, tuple(identifiers))
    cached = (key, parts)
    if len(_VERSION_KEYS) >= 4096:
        _VERSION_KEYS.clear()
    _VERSION_KEYS[text] = cached
    return cached


def parse_version(str text not None) -> tuple:
    """The comparable key of a semantic version: ``(major, minor, patch, is_release, prerelease)``.

    Keys order by SemVer 2.0 precedence; build metadata is ignored. ValueError names a bad version.
    """
    return _parse_semver(text)[0]


cdef inline void _fill_semver(SemVer* target, tuple key) noexcept:
    target.major = key[0]
    target.minor = key[1]
    target.patch = key[2]
    target.kind = VERSION_RELEASE if key[3] else VERSION_PRERELEASE


cdef inline int _compare_semver(const SemVer* left, const SemVer* right) noexcept nogil:
    """-1, 0 or 1; 2 when both are prereleases of the same MAJOR.MINOR.PATCH (their identifiers decide)."""
    if left.major != right.major:
        return -1 if left.major < right.major else 1
    if left.minor != right.minor:
        return -1 if left.minor < right.minor else 1
    if left.patch != right.patch:
        return -1 if left.patch < right.patch else 1
    if left.kind == right.kind:
        return 0 if left.kind == VERSION_RELEASE else 2
    return 1 if left.kind == VERSION_RELEASE else -1


cdef inline bint _satisfies(int comparison, int order) noexcept nogil:
    if comparison == COMPARE_EQ:
        return order == 0
    if comparison == COMPARE_NE:
        return order != 0
    if comparison == COMPARE_LT:
        return order < 0
    if comparison == COMPARE_LE:
        return order <= 0
    if comparison == COMPARE_GT:
        return order > 0
    return order >= 0


_RANGE_COMPARATOR = re.compile(r"\s*(>=|<=|!=|==|>|<|=|\^|~)?\s*([^\s,<>=!^~]+)\s*,?")
cdef dict _COMPARISONS = {
    "=": COMPARE_EQ, "==": COMPARE_EQ, "!=": COMPARE_NE, "<": COMPARE_LT, "<=": COMPARE_LE,
    ">": COMPARE_GT, ">=": COMPARE_GE,
}
# The lowest prerelease of a version: "<2.0.0-0" excludes 2.0.0's prereleases too.
cdef tuple _LOWEST_PRERELEASE = ((0, 0),)


cdef tuple _below_prereleases(tuple key):
    """The bound of ``<X`` for a release X: below X's prereleases too (PEP 440: "<2.0" must not admit
    "2.0.0-rc.1", which SemVer precedence alone would)."""
    return (key[0], key[1], key[2], 0, _LOWEST_PRERELEASE) if key[3] else key


cdef tuple _upper_bound(str text, str operator, tuple key, int parts):
    cdef uint64_t major = key[0], minor = key[1], patch = key[2]
    if operator == "^" and major == 0 and parts > 1:
        # npm caret on 0.x: ^0.2.3 := <0.3.0, ^0.0.3 := <0.0.4, ^0.0 := <0.1.0
        if minor > 0 or parts == 2:
            upper = (0, minor + 1, 0)
        else:
            upper = (0, 0, patch + 1)
    elif operator == "~" and parts > 1:
        upper = (major, minor + 1, 0)
    else:
        upper = (major + 1, 0, 0)
    if max(upper) > 0xFFFFFFFF:
        raise ValueError(f"version range {text!r}: {operator}{key[0]}.{key[1]}.{key[2]} has no upper bound")
    return _below_prereleases((upper[0], upper[1], upper[2], 1, ()))


cdef list _parse_range(str text):
    if not text.strip():
        raise ValueError(f"version range {text!r} is empty")
    cdef list bounds = []
    cdef Py_ssize_t position = 0
    while position < len(text):
        match = _RANGE_COMPARATOR.match(text, position)
        if match is None:
            raise ValueError(f"version range {text!r}: cannot read a comparator at {text[position:]!r}")
        operator = match.group(1) or "="
        try:
            key, parts = _parse_semver(match.group(2))
        except ValueError as error:
            raise ValueError(f"version range {text!r}: {error}") from None
        if operator == "^" or operator == "~":
            bounds.append((COMPARE_GE, key))
            bounds.append((COMPARE_LT, _upper_bound(text, operator, key, parts)))
        elif operator == "<":
            bounds.append((COMPARE_LT, _below_prereleases(key)))
        else:
            bounds.append((_COMPARISONS[operator], key))
        position = match.end()
    if len(bounds) > LIMIT_RANGE_COMPARATORS:
        raise ValueError(
            f"version range {text!r} has {len(bounds)} comparators; the limit is {LIMIT_RANGE_COMPARATORS}")
    return bounds


cdef dict _RANGES = {}         # text -> VersionRange: a query names the same few ranges over and over


cdef class VersionRange:
    """A parsed version range such as ``>=1.2,<2.0``: every comparator must hold.

    Comparators: ``= == != < <= > >=``, ``^1.2`` (same major; npm rules on 0.x) and ``~1.2`` (same minor),
    separated by commas or spaces. Missing MINOR / PATCH are 0 (``<2`` is ``<2.0.0``, ``=1.2`` is
    ``=1.2.0``). Versions compare by SemVer precedence, except that ``<X`` for a release X also excludes X's
    prereleases (PEP 440's rule: ``<2.0`` does not admit ``2.0.0-rc.1``); ``^`` and ``~`` end the same way.
    A bad range raises ValueError naming it.
    """

    def __cinit__(self, str text not None):
        cdef list bounds = _parse_range(text)
        cdef int position
        self.text = text
        self._count = len(bounds)
        prereleases = []
        for position, (comparison, key) in enumerate(bounds):
            self._bounds[position].comparison = comparison
            _fill_semver(&self._bounds[position].version, key)
            prereleases.append(key[4] if not key[3] else None)
        self._prereleases = tuple(prereleases)
        self._keys = tuple(bounds)

    cdef bint _admits(self, _StringTable table, uint32_t version) except -1:
        if version == 0:
            return False
        cdef const SemVer* held = &table._versions[version]
        cdef int position, order
        for position in range(self._count):
            order = _compare_semver(held, &self._bounds[position].version)
            if order == 2:
                mine = table._prereleases[version]
                theirs = self._prereleases[position]
                order = (mine > theirs) - (mine < theirs)
            if not _satisfies(self._bounds[position].comparison, order):
                return False
        return True

    def __contains__(self, version) -> bool:
        if not isinstance(version, str):
            return False
        key = _parse_semver(version)[0]
        for comparison, bound in self._keys:
            if not _satisfies(comparison, (key > bound) - (key < bound)):
                return False
        return True

    def __repr__(self) -> str:
        return f"VersionRange({self.text!r})"


cdef VersionRange _as_range(object version):
    if isinstance(version, VersionRange):
        return <VersionRange>version
    if not isinstance(version, str):
        raise TypeError(f"version must be a range string or a VersionRange, not {type(version).__name__}")
    cdef VersionRange parsed = _RANGES.get(version)
    if parsed is None:
        parsed = VersionRange(version)
        if len(_RANGES) >= 1024:
            _RANGES.clear()
        _RANGES[version] = parsed
    return parsed


# --- byte buffers and cursors ------------------------------------------------------------------------

cdef struct _Buffer:
    unsigned char* data
    Py_ssize_t size
    Py_ssize_t capacity


cdef int _reserve(_Buffer* buffer, Py_ssize_t extra) except -1:
    cdef Py_ssize_t need = buffer.size + extra
    if need <= buffer.capacity:
        return 0
    cdef Py_ssize_t capacity = buffer.capacity * 2 if buffer.capacity else 256
    while capacity < need:
        capacity *= 2
    cdef void* grown = PyMem_Realloc(buffer.data, capacity)
    if grown is NULL:
        raise MemoryError()
    buffer.data = <unsigned char*>grown
    buffer.capacity = capacity
    return 0


cdef inline int _put_u8(_Buffer* buffer, uint64_t value) except -1:
    _reserve(buffer, 1)
    buffer.data[buffer.size] = <unsigned char>value
    buffer.size += 1
    return 0


cdef int _put_big_endian(_Buffer* buffer, uint64_t value, int width) except -1:
    _reserve(buffer, width)
    cdef int position
    for position in range(width):
        buffer.data[buffer.size + position] = <unsigned char>(value >> (8 * (width - 1 - position)))
    buffer.size += width
    return 0


cdef int _put_varint(_Buffer* buffer, uint64_t value) except -1:
    while value >= 0x80:
        _put_u8(buffer, (value & 0x7F) | 0x80)
        value >>= 7
    return _put_u8(buffer, value)


cdef int _put_bytes(_Buffer* buffer, const void* data, Py_ssize_t size) except -1:
    _reserve(buffer, size)
    memcpy(buffer.data + buffer.size, data, size)
    buffer.size += size
    return 0


cdef int _put_text(_Buffer* buffer, object text, str field) except -1:
    """A varint length and the UTF-8 bytes (ASCII strings are written without encoding a copy)."""
    cdef Py_ssize_t size
    cdef const char* data
    if not isinstance(text, str):
        raise TypeError(f"{field} must be a str, not {type(text).__name__}")
    if PyUnicode_IS_ASCII(text):
        data = PyUnicode_AsUTF8AndSize(text, &size)
        _put_varint(buffer, size)
        return _put_bytes(buffer, data, size)
    try:
        encoded = (<str>text).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRegistration(field, f"{field} {text!r} cannot be encoded as UTF-8") from None
    _put_varint(buffer, len(encoded))
    return _put_bytes(buffer, PyBytes_AS_STRING(encoded), len(encoded))


cdef bytes _finish(_Buffer* buffer):
    return PyBytes_FromStringAndSize(<char*>buffer.data, buffer.size)


cdef struct _Cursor:
    const unsigned char* position
    const unsigned char* end


cdef const unsigned char* _take(_Cursor* cursor, Py_ssize_t size, str what) except NULL:
    if cursor.end - cursor.position < size:
        raise ValueError(f"registry data truncated in {what}")
    cdef const unsigned char* start = cursor.position
    cursor.position += size
    return start


cdef inline uint64_t _big_endian(const unsigned char* data, int width) noexcept nogil:
    cdef uint64_t value = 0
    cdef int position
    for position in range(width):
        value = (value << 8) | data[position]
    return value


cdef uint64_t _take_varint(_Cursor* cursor, str what) except? 0xFFFFFFFFFFFFFFFF:
    cdef uint64_t value = 0
    cdef int shift = 0
    cdef unsigned char byte
    while True:
        byte = _take(cursor, 1, what)[0]
        value |= <uint64_t>(byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift > 28:
            raise ValueError(f"registry data: oversized number in {what}")
    return value


cdef Py_ssize_t _take_count(_Cursor* cursor, str what) except -1:
    """A varint that counts (or sizes) what follows: each item takes a byte at least, so it cannot exceed
    the bytes left, and a corrupt count fails here rather than after a long loop."""
    cdef uint64_t value = _take_varint(cursor, what)
    if value > <uint64_t>(cursor.end - cursor.position):
        raise ValueError(f"registry data truncated in {what}")
    return <Py_ssize_t>value


cdef str _label(str field, object item):
    if item is None:
        return field
    if isinstance(item, str):
        return f"{field}[{item!r}]"
    return f"{field}[{item}]"


cdef str _take_text(_Cursor* cursor, str field, object item, Py_ssize_t limit, bint required):
    cdef Py_ssize_t size = _take_count(cursor, field)
    if size > limit:
        raise InvalidRegistration(field, f"{_label(field, item)} is {size} bytes; the limit is {limit}")
    if size == 0:
        if required:
            raise InvalidRegistration(field, f"{_label(field, item)} is empty")
        return ""
    cdef const unsigned char* data = _take(cursor, size, field)
    try:
        return PyUnicode_DecodeUTF8(<const char*>data, size, "strict")
    except UnicodeDecodeError:
        raise InvalidRegistration(field, f"{_label(field, item)} is not valid UTF-8") from None


cdef int _check_count(Py_ssize_t count, Py_ssize_t limit, str field, str unit) except -1:
    if count > limit:
        raise InvalidRegistration(field, f"{field}: {count} {unit} given; the limit is {limit}")
    return 0


cdef int _expect_end(_Cursor* cursor) except -1:
    if cursor.position != cursor.end:
        raise ValueError(f"registry data has {cursor.end - cursor.position} trailing bytes")
    return 0


# --- commands ---------------------------------------------------------------------------------------

cdef tuple _parse_address(object address):
    """(family, packed) of an IPv4 or IPv6 literal; InvalidRegistration naming ``address`` otherwise."""
    if not address:
        raise InvalidRegistration("address", "address is missing")
    if not isinstance(address, str):
        raise TypeError(f"address must be a str, not {type(address).__name__}")
    cdef unsigned char packed[16]
    try:
        encoded = (<str>address).encode("ascii")
    except UnicodeEncodeError:
        encoded = None
    if encoded is not None and b"\0" not in encoded:
        if inet_pton(AF_INET, encoded, packed) == 1:
            return 4, PyBytes_FromStringAndSize(<char*>packed, 4)
        if inet_pton(AF_INET6, encoded, packed) == 1:
            return 6, PyBytes_FromStringAndSize(<char*>packed, 16)
    raise InvalidRegistration("address", f"address {address!r} is not an IPv4 or IPv6 literal")


cdef uint64_t _check_integer(object value, str field, uint64_t low, uint64_t high) except? 0xFFFFFFFFFFFFFFFF:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{field} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidRegistration(field, f"{field} {value} is outside {low}..{high}")
    return <uint64_t>value


cdef uint8_t _status_code(object status) except 0xFF:
    code = _STATUS_CODES.get(status)
    if code is None:
        raise InvalidRegistration("status", f"status {status!r} is not one of {', '.join(STATUSES)}")
    return code


cdef int _put_texts(_Buffer* buffer, object values, str field) except -1:
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{field} must be a sequence of str, not one {type(values).__name__}")
    values = list(values)
    _put_varint(buffer, len(values))
    for value in values:
        _put_text(buffer, value, field)
    return 0


cdef bytes _encode_register(object service, object instance_id, object address, object port, object version,
                            object api_versions, object weight, object max_load, object zone, object region,
                            object tags, object meta, object status, object check_ttl_ms,
                            object deregister_after_ms, bint validate):
    if not service:
        raise InvalidRegistration("service", "service name is missing")
    if port is None:
        raise InvalidRegistration("port", "port is missing")
    cdef uint64_t port_number = _check_integer(port, "port", 1, 65535)
    cdef uint64_t weight_number = _check_integer(weight, "weight", 0, MAX_WEIGHT)
    cdef uint64_t max_load_number = _check_integer(max_load, "max_load", 0, MAX_LOAD)
    cdef uint64_t ttl_number = _check_integer(check_ttl_ms, "check_ttl_ms", 0, MAX_DURATION_MS)
    cdef uint64_t deregister_number = _check_integer(deregister_after_ms, "deregister_after_ms", 0, MAX_DURATION_MS)
    cdef uint8_t status_code = _status_code(status)
    family, packed_address = _parse_address(address)
    cdef bytes packed = packed_address
    cdef bytes command
    if meta is None:
        meta = {}
    elif not hasattr(meta, "items"):
        raise TypeError(f"meta must be a mapping of str to str, not {type(meta).__name__}")
    cdef _Buffer buffer
    buffer.data = NULL
    buffer.size = buffer.capacity = 0
    try:
        _put_u8(&buffer, OP_REGISTER)
        _put_u8(&buffer, status_code)
        _put_u8(&buffer, family)
        _put_big_endian(&buffer, port_number, 2)
        _put_big_endian(&buffer, weight_number, 2)
        _put_big_endian(&buffer, max_load_number, 4)
        _put_big_endian(&buffer, ttl_number, 4)
        _put_big_endian(&buffer, deregister_number, 4)
        _put_bytes(&buffer, PyBytes_AS_STRING(packed), len(packed))
        _put_text(&buffer, service, "service")
        # Consul: a registration without an ID is identified by its service name.
        _put_text(&buffer, instance_id or service, "instance_id")
        _put_text(&buffer, version or "", "version")
        _put_text(&buffer, zone or "", "zone")
        _put_text(&buffer, region or "", "region")
        _put_texts(&buffer, api_versions, "api_versions")
        _put_texts(&buffer, tags, "tags")
        items = list(meta.items())
        _put_varint(&buffer, len(items))
        for key, value in items:
            _put_text(&buffer, key, "meta")
            _put_text(&buffer, value, "meta")
        command = _finish(&buffer)
    finally:
        PyMem_Free(buffer.data)
    if validate:
        _decode_register(<const unsigned char*>PyBytes_AS_STRING(command) + 1, len(command) - 1)
    return command


def encode_register(service, instance_id, address, port, *, version="", api_versions=(), weight=1, max_load=0,
                    zone="", region="", tags=(), meta=None, status="passing", check_ttl_ms=0,
                    deregister_after_ms=0) -> bytes:
    """The command registering (or replacing) one instance, validated: InvalidRegistration names the field.

    An empty ``instance_id`` means the service name (Consul's default). Instance ids are unique across
    services: registering an id another service holds moves the instance (Consul's agent semantics).
    ``check_ttl_ms`` > 0 gives the instance a heartbeat lease; ``deregister_after_ms`` > 0 removes it after
    that long in critical.
    """
    return _encode_register(service, instance_id, address, port, version, api_versions, weight, max_load, zone,
                            region, tags, meta, status, check_ttl_ms, deregister_after_ms, True)


cdef bytes _encode_instance_command(uint8_t op, int status, object service, object instance_id):
    if not service:
        raise InvalidRegistration("service", "service name is missing")
    if not instance_id:
        raise InvalidRegistration("instance_id", "instance_id is missing")
    cdef _Buffer buffer
    buffer.data = NULL
    buffer.size = buffer.capacity = 0
    try:
        _put_u8(&buffer, op)
        if status >= 0:
            _put_u8(&buffer, status)
        _put_text(&buffer, service, "service")
        _put_text(&buffer, instance_id, "instance_id")
        return _finish(&buffer)
    finally:
        PyMem_Free(buffer.data)


def encode_deregister(service, instance_id) -> bytes:
    """The command removing one instance (and the service with its last instance)."""
    return _encode_instance_command(OP_DEREGISTER, -1, service, instance_id)


def encode_set_status(service, instance_id, status) -> bytes:
    """The command setting one instance's health status (passing, warning or critical)."""
    return _encode_instance_command(OP_SET_STATUS, _status_code(status), service, instance_id)


cdef class _Registration:
    pass


cdef int _canonicalize(_Registration registration) except -1:
    """Tags keep their first occurrence, API versions are a sorted set, meta is sorted by key."""
    cdef list unique
    if len(registration.tags) > 1:
        unique = list(dict.fromkeys(registration.tags))
        if len(unique) != len(registration.tags):
            registration.tags = unique
    if len(registration.api_versions) > 1:
        registration.api_versions = sorted(set(registration.api_versions))
    if len(registration.meta) > 1:
        registration.meta.sort()
        for position in range(1, len(registration.meta)):
            if registration.meta[position][0] == registration.meta[position - 1][0]:
                key = registration.meta[position][0]
                raise InvalidRegistration("meta", f"meta[{key!r}] is given twice")
    return 0


cdef inline void _read_fixed(_Registration registration, const unsigned char* fixed) noexcept:
    """The fixed part of a register command and of a snapshot's instance (REGISTER_HEADER_BYTES)."""
    registration.status = fixed[0]
    registration.family = fixed[1]
    registration.port = <uint16_t>_big_endian(fixed + 2, 2)
    registration.weight = <uint16_t>_big_endian(fixed + 4, 2)
    registration.max_load = <uint32_t>_big_endian(fixed + 6, 4)
    registration.check_ttl_ms = <uint32_t>_big_endian(fixed + 10, 4)
    registration.deregister_after_ms = <uint32_t>_big_endian(fixed + 14, 4)
    registration.create_index = registration.modify_index = 0


cdef _Registration _decode_register(const unsigned char* data, Py_ssize_t size):
    """Decode and validate a register command (after its op byte)."""
    cdef _Cursor cursor
    cursor.position = data
    cursor.end = data + size
    cdef _Registration registration = _Registration.__new__(_Registration)
    cdef const unsigned char* fixed = _take(&cursor, REGISTER_HEADER_BYTES, "register header")
    cdef Py_ssize_t count, position, id_size
    _read_fixed(registration, fixed)
    if registration.status > STATUS_CRITICAL:
        raise InvalidRegistration("status", f"status code {registration.status} is not one of {', '.join(STATUSES)}")
    if registration.family != 4 and registration.family != 6:
        raise InvalidRegistration("address", f"address family {registration.family} is neither 4 nor 6")
    if registration.port == 0:
        raise InvalidRegistration("port", "port 0 is outside 1..65535")
    registration.address = PyBytes_FromStringAndSize(
        <char*>_take(&cursor, 4 if registration.family == 4 else 16, "address"),
        4 if registration.family == 4 else 16)
    registration.service = _take_text(&cursor, "service", None, LIMIT_NAME_BYTES, True)
    id_size = _take_count(&cursor, "instance_id")
    if id_size == 0 or id_size > LIMIT_NAME_BYTES:
        raise InvalidRegistration("instance_id", f"instance_id is {id_size} bytes; it must be 1..{LIMIT_NAME_BYTES}")
    registration.instance_id = PyBytes_FromStringAndSize(<char*>_take(&cursor, id_size, "instance_id"), id_size)
    try:
        registration.instance_id.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRegistration("instance_id", "instance_id is not valid UTF-8") from None
    registration.version = _take_text(&cursor, "version", None, LIMIT_NAME_BYTES, False)
    registration.version_key = None
    if registration.version:
        try:
            registration.version_key = _parse_semver(registration.version)[0]
        except ValueError as error:
            raise InvalidRegistration("version", str(error)) from None
    registration.zone = _take_text(&cursor, "zone", None, LIMIT_NAME_BYTES, False)
    registration.region = _take_text(&cursor, "region", None, LIMIT_NAME_BYTES, False)
    count = _take_count(&cursor, "api_versions")
    _check_count(count, LIMIT_API_VERSIONS, "api_versions", "versions")
    registration.api_versions = [_take_text(&cursor, "api_versions", position, LIMIT_NAME_BYTES, True)
                                 for position in range(count)]
    count = _take_count(&cursor, "tags")
    _check_count(count, LIMIT_TAGS, "tags", "tags")
    registration.tags = [_take_text(&cursor, "tags", position, LIMIT_TAG_BYTES, True) for position in range(count)]
    count = _take_count(&cursor, "meta")
    _check_count(count, LIMIT_META_PAIRS, "meta", "pairs")
    registration.meta = []
    for position in range(count):
        key = _take_text(&cursor, "meta", position, LIMIT_META_KEY_BYTES, True)
        registration.meta.append((key, _take_text(&cursor, "meta", key, LIMIT_META_VALUE_BYTES, False)))
    _expect_end(&cursor)
    _canonicalize(registration)
    return registration


# --- the string table ---------------------------------------------------------------------------------

cdef class _StringTable:

    def __cinit__(self):
        self._ids = {"": 0}
        self._strings = [""]
        self._free_ids = []
        self._prereleases = {}
        self._capacity = 0
        self._refcounts = NULL
        self._versions = NULL
        self._grow(64)

    def __dealloc__(self):
        PyMem_Free(self._refcounts)
        PyMem_Free(self._versions)

    cdef int _grow(self, Py_ssize_t need) except -1:
        cdef Py_ssize_t capacity = self._capacity or 64
        while capacity < need:
            capacity += capacity >> 1
        cdef void* refcounts = PyMem_Realloc(self._refcounts, capacity * sizeof(uint32_t))
        if refcounts is NULL:
            raise MemoryError()
        self._refcounts = <uint32_t*>refcounts
        cdef void* versions = PyMem_Realloc(self._versions, capacity * sizeof(SemVer))
        if versions is NULL:
            raise MemoryError()
        self._versions = <SemVer*>versions
        memset(self._refcounts + self._capacity, 0, (capacity - self._capacity) * sizeof(uint32_t))
        memset(self._versions + self._capacity, 0, (capacity - self._capacity) * sizeof(SemVer))
        self._capacity = capacity
        return 0

    cdef uint32_t find(self, str text):
        found = self._ids.get(text)
        return NO_STRING if found is None else <uint32_t>found

    cdef uint32_t acquire(self, str text) except? NO_STRING:
        if not text:
            return 0
        found = self._ids.get(text)
        cdef uint32_t string_id
        if found is not None:
            string_id = found
            self._refcounts[string_id] += 1
            return string_id
        if self._free_ids:
            string_id = self._free_ids.pop()
            self._strings[string_id] = text
        else:
            string_id = len(self._strings)
            if string_id >= self._capacity:
                self._grow(string_id + 1)
            self._strings.append(text)
        self._ids[text] = string_id
        self._refcounts[string_id] = 1
        return string_id

    cdef int release(self, uint32_t string_id) except -1:
        if string_id == 0:
            return 0
        self._refcounts[string_id] -= 1
        if self._refcounts[string_id]:
            return 0
        del self._ids[self._strings[string_id]]
        self._strings[string_id] = None
        self._free_ids.append(string_id)
        if self._versions[string_id].kind == VERSION_PRERELEASE:
            del self._prereleases[string_id]
        self._versions[string_id].kind = VERSION_NONE
        return 0

    cdef void set_version(self, uint32_t string_id, tuple key) noexcept:
        # Parsed once per distinct version string, not once per instance.
        if self._versions[string_id].kind != VERSION_NONE:
            return
        _fill_semver(&self._versions[string_id], key)
        if not key[3]:
            self._prereleases[string_id] = key[4]

    cdef inline str text(self, uint32_t string_id):
        return <str>PyList_GET_ITEM(self._strings, string_id)

    cdef Py_ssize_t memory_bytes(self) noexcept:
        return self._capacity * (sizeof(uint32_t) + sizeof(SemVer))


# --- one service's instances ----------------------------------------------------------------------------

cdef inline uint32_t _id_words(const Instance* instance) noexcept nogil:
    return (instance.id_length + 3) >> 2


cdef inline uint32_t _tags_at(const Instance* instance) noexcept nogil:
    return _id_words(instance) + (4 if instance.family == 6 else 0)


cdef inline uint32_t _variable_words(const Instance* instance) noexcept nogil:
    return _tags_at(instance) + instance.tag_count + 2 * <uint32_t>instance.meta_count + instance.api_count


cdef inline uint32_t _grown(uint32_t capacity, uint32_t need) noexcept nogil:
    # Grow by a quarter: a typical service holds a handful of instances, and doubling would waste up
    # to half of every array; a quarter still keeps appends amortized O(1).
    while capacity < need:
        capacity += (capacity >> 2) + 2
    return capacity


cdef inline int _compare_ids(const unsigned char* left, Py_ssize_t left_length,
                             const unsigned char* right, Py_ssize_t right_length) noexcept nogil:
    cdef int order = memcmp(left, right, left_length if left_length < right_length else right_length)
    if order:
        return order
    return (left_length > right_length) - (left_length < right_length)


cdef int _realloc_array(void** array, Py_ssize_t size) except -1:
    cdef void* grown = PyMem_Realloc(array[0], size if size > 0 else 1)
    if grown is NULL:
        raise MemoryError()
    array[0] = grown
    return 0


cdef class _Service:

    def __dealloc__(self):
        PyMem_Free(self.instances)
        PyMem_Free(self.words)
        PyMem_Free(self.tags)

    cdef Py_ssize_t find(self, const unsigned char* instance_id, Py_ssize_t length, bint* found) noexcept:
        cdef Py_ssize_t low = 0, high = self.count, middle
        cdef const Instance* instance
        cdef int order
        while low < high:
            middle = (low + high) >> 1
            instance = &self.instances[middle]
            order = _compare_ids(<const unsigned char*>(self.words + instance.var_offset), instance.id_length,
                                 instance_id, length)
            if order < 0:
                low = middle + 1
            elif order > 0:
                high = middle
            else:
                found[0] = True
                return middle
        found[0] = False
        return low

    cdef uint32_t tag_instances(self, uint32_t tag) noexcept:
        cdef Py_ssize_t low = 0, high = self.tag_kinds, middle
        while low < high:
            middle = (low + high) >> 1
            if self.tags[middle].tag < tag:
                low = middle + 1
            elif self.tags[middle].tag > tag:
                high = middle
            else:
                return self.tags[middle].count
        return 0

    cdef bint count_tags(self, const uint32_t* tags, uint32_t tag_count, int delta) except -1:
        """Add (+1) or remove (-1) one instance's tags; True when the service's set of tags changed."""
        cdef bint changed = False
        cdef uint32_t position, tag
        cdef Py_ssize_t low, high, middle
        for position in range(tag_count):
            tag = tags[position]
            low, high = 0, self.tag_kinds
            while low < high:
                middle = (low + high) >> 1
                if self.tags[middle].tag < tag:
                    low = middle + 1
                else:
                    high = middle
            if low < self.tag_kinds and self.tags[low].tag == tag:
                if delta > 0:
                    self.tags[low].count += 1
                else:
                    self.tags[low].count -= 1
                    if self.tags[low].count == 0:
                        memmove(&self.tags[low], &self.tags[low + 1], (self.tag_kinds - low - 1) * sizeof(TagCount))
                        self.tag_kinds -= 1
                        changed = True
            elif delta > 0:
                if self.tag_kinds == self.tag_capacity:
                    self.tag_capacity = _grown(self.tag_capacity, self.tag_kinds + 1)
                    _realloc_array(<void**>&self.tags, self.tag_capacity * sizeof(TagCount))
                memmove(&self.tags[low + 1], &self.tags[low], (self.tag_kinds - low) * sizeof(TagCount))
                self.tags[low].tag = tag
                self.tags[low].count = 1
                self.tag_kinds += 1
                changed = True
        if self.tag_capacity > 8 and self.tag_kinds * 2 < self.tag_capacity:
            self.tag_capacity = _grown(0, self.tag_kinds)
            _realloc_array(<void**>&self.tags, self.tag_capacity * sizeof(TagCount))
        return changed

    cdef int _reserve_instances(self, uint32_t extra) except -1:
        if self.count + extra > self.capacity:
            self.capacity = _grown(self.capacity, self.count + extra)
            _realloc_array(<void**>&self.instances, self.capacity * sizeof(Instance))
        return 0

    cdef uint32_t _append_words(self, const uint32_t* words, uint32_t count) except? 0xFFFFFFFF:
        if self.words_used + count > self.words_capacity:
            self.words_capacity = _grown(self.words_capacity, self.words_used + count)
            _realloc_array(<void**>&self.words, self.words_capacity * sizeof(uint32_t))
        cdef uint32_t offset = self.words_used
        memcpy(self.words + offset, words, count * sizeof(uint32_t))
        self.words_used += count
        return offset

    cdef int insert_at(self, Py_ssize_t position, Draft* draft) except -1:
        self._reserve_instances(1)
        cdef uint32_t offset = self._append_words(draft.words, draft.word_count)
        memmove(&self.instances[position + 1], &self.instances[position], (self.count - position) * sizeof(Instance))
        memcpy(&self.instances[position], &draft.instance, sizeof(Instance))
        self.instances[position].var_offset = offset
        self.count += 1
        return 0

    cdef int replace_at(self, Py_ssize_t position, Draft* draft) except -1:
        cdef uint32_t old_words = _variable_words(&self.instances[position])
        cdef uint32_t offset = self.instances[position].var_offset
        if draft.word_count <= old_words:
            memcpy(self.words + offset, draft.words, draft.word_count * sizeof(uint32_t))
            self.words_dead += old_words - draft.word_count
        else:
            offset = self._append_words(draft.words, draft.word_count)
            self.words_dead += old_words
        memcpy(&self.instances[position], &draft.instance, sizeof(Instance))
        self.instances[position].var_offset = offset
        if self.words_dead >= 16 and self.words_dead * 4 > self.words_used:
            self._compact_words()
        return 0

    cdef int remove_at(self, Py_ssize_t position) except -1:
        self.words_dead += _variable_words(&self.instances[position])
        memmove(&self.instances[position], &self.instances[position + 1],
                (self.count - position - 1) * sizeof(Instance))
        self.count -= 1
        if self.count == 0:
            self.words_used = self.words_dead = 0
        if self.capacity > 8 and self.count * 2 < self.capacity:
            self.capacity = _grown(0, self.count)
            _realloc_array(<void**>&self.instances, self.capacity * sizeof(Instance))
        if self.words_dead >= 16 and self.words_dead * 4 > self.words_used:
            self._compact_words()
        return 0

    cdef int _compact_words(self) except -1:
        """Copy the live variable parts into a fresh arena sized to them (plus a quarter)."""
        cdef uint32_t live = 0, position = 0, size, slot
        for slot in range(self.count):
            live += _variable_words(&self.instances[slot])
        cdef uint32_t capacity = live + (live >> 2) + 2
        cdef uint32_t* fresh = <uint32_t*>PyMem_Malloc(capacity * sizeof(uint32_t))
        if fresh is NULL:
            raise MemoryError()
        for slot in range(self.count):
            size = _variable_words(&self.instances[slot])
            memcpy(fresh + position, self.words + self.instances[slot].var_offset, size * sizeof(uint32_t))
            self.instances[slot].var_offset = position
            position += size
        PyMem_Free(self.words)
        self.words = fresh
        self.words_used = live
        self.words_capacity = capacity
        self.words_dead = 0
        return 0

    cdef int shrink_to_fit(self) except -1:
        self._compact_words()
        self.words_capacity = self.words_used
        _realloc_array(<void**>&self.words, self.words_capacity * sizeof(uint32_t))
        self.capacity = self.count
        _realloc_array(<void**>&self.instances, self.capacity * sizeof(Instance))
        self.tag_capacity = self.tag_kinds
        _realloc_array(<void**>&self.tags, self.tag_capacity * sizeof(TagCount))
        return 0

    cdef Py_ssize_t memory_bytes(self) noexcept:
        return (self.capacity * sizeof(Instance) + self.words_capacity * sizeof(uint32_t)
                + self.tag_capacity * sizeof(TagCount))


cdef int _compare_matches(const void* left, const void* right) noexcept nogil:
    cdef const Match* a = <const Match*>left
    cdef const Match* b = <const Match*>right
    if a.order != b.order:
        return -1 if a.order < b.order else 1
    return (a.slot > b.slot) - (a.slot < b.slot)


cdef tuple _texts(_StringTable table, const uint32_t* ids, Py_ssize_t count):
    cdef tuple result = PyTuple_New(count)
    cdef Py_ssize_t position
    cdef str text
    for position in range(count):
        text = table.text(ids[position])
        Py_INCREF(text)
        PyTuple_SET_ITEM(result, position, text)
    return result


@cython.freelist(64)
@cython.no_gc     # it holds only strings and a tuple of strings: it can never be part of a reference cycle
cdef class InstanceView:
    """One instance as answered by a query: a copy built on demand, unaffected by later changes."""

    @property
    def packed_address(self) -> bytes:
        """The address and port as ``pack_address`` gives them: what an A/AAAA record and SRV port carry."""
        cdef bytes packed = PyBytes_FromStringAndSize(NULL, self._address_size + 2)
        cdef unsigned char* raw = <unsigned char*>PyBytes_AS_STRING(packed)
        memcpy(raw, self._address, self._address_size)
        raw[self._address_size] = self.port >> 8
        raw[self._address_size + 1] = self.port & 0xFF
        return packed

    @property
    def address(self) -> str:
        cdef char text[64]
        if inet_ntop(AF_INET if self._address_size == 4 else AF_INET6, self._address, text, sizeof(text)) is NULL:
            raise ValueError("cannot format the address")
        return text[:strlen(text)].decode("ascii")

    @property
    def tags(self) -> tuple:
        return self._texts[:self._tag_count]

    @property
    def meta(self) -> dict:
        cdef dict meta = {}
        cdef Py_ssize_t position
        for position in range(self._tag_count, self._tag_count + 2 * self._meta_count, 2):
            meta[self._texts[position]] = self._texts[position + 1]
        return meta

    @property
    def api_versions(self) -> tuple:
        return self._texts[self._tag_count + 2 * self._meta_count:]

    @property
    def free_capacity(self) -> int:
        return self.max_load - self.load if self.max_load > self.load else 0

    def __repr__(self) -> str:
        return (f"InstanceView({self.service!r}, {self.instance_id!r}, {self.address}:{self.port}, "
                f"status={self.status!r}, version={self.version!r}, zone={self.zone!r})")


# --- the store -------------------------------------------------------------------------------------------------

cdef class RegistryStore:
    """Service instances by service, compact, with the queries discovery needs; a Raft state machine.

    Writes (``register``, ``deregister``, ``set_status`` or ``apply`` of an encoded command) take the Raft
    index they were committed at; each returns whether anything changed, and a change sets the service's
    modify index. ``report_load`` is leader-local: it is neither indexed, snapshotted nor hashed.
    """

    def __cinit__(self):
        self._table = _StringTable()
        self._services = {}
        self._sorted_names = None
        self._catalog_tags = {}
        self._matches = NULL
        self._matches_capacity = 0
        self._instance_count = 0
        self.index = 0
        self.removed_index = 0
        self._changed = set()
        self._owners = NULL
        self._owner_capacity = 0
        self._owner_count = 0

    def __dealloc__(self):
        PyMem_Free(self._matches)
        PyMem_Free(self._owners)

    # --- instance id -> service (ids are unique across services) ----------------------------------------

    cdef uint32_t _owner_of(self, const unsigned char* instance_id, Py_ssize_t length) except? NO_STRING:
        """The string id of the service holding ``instance_id``, or NO_STRING."""
        if self._owner_capacity == 0:
            return NO_STRING
        cdef uint32_t hash = _hash_id(instance_id, length)
        cdef Py_ssize_t mask = self._owner_capacity - 1
        cdef Py_ssize_t slot = hash & mask
        cdef _Service candidate
        cdef bint found
        while self._owners[slot].service != 0:
            if self._owners[slot].hash == hash:
                candidate = self._services.get(self._table.text(self._owners[slot].service))
                if candidate is not None:
                    candidate.find(instance_id, length, &found)
                    if found:
                        return self._owners[slot].service
            slot = (slot + 1) & mask
        return NO_STRING

    cdef int _owner_grow(self) except -1:
        cdef Py_ssize_t capacity = self._owner_capacity * 2 if self._owner_capacity else 64
        cdef OwnerSlot* old = self._owners
        cdef Py_ssize_t old_capacity = self._owner_capacity, position, slot
        cdef OwnerSlot* fresh = <OwnerSlot*>PyMem_Malloc(capacity * sizeof(OwnerSlot))
        if fresh is NULL:
            raise MemoryError()
        memset(fresh, 0, capacity * sizeof(OwnerSlot))
        for position in range(old_capacity):
            if old[position].service != 0:
                slot = old[position].hash & (capacity - 1)
                while fresh[slot].service != 0:
                    slot = (slot + 1) & (capacity - 1)
                fresh[slot] = old[position]
        self._owners = fresh
        self._owner_capacity = capacity
        PyMem_Free(old)
        return 0

    cdef int _owner_add(self, const unsigned char* instance_id, Py_ssize_t length, uint32_t service) except -1:
        # Linear probing stays short below a load of 3/4.
        if (self._owner_count + 1) * 4 > self._owner_capacity * 3:
            self._owner_grow()
        cdef uint32_t hash = _hash_id(instance_id, length)
        cdef Py_ssize_t mask = self._owner_capacity - 1
        cdef Py_ssize_t slot = hash & mask
        while self._owners[slot].service != 0:
            slot = (slot + 1) & mask
        self._owners[slot].hash = hash
        self._owners[slot].service = service
        self._owner_count += 1
        return 0

    cdef int _owner_remove(self, const unsigned char* instance_id, Py_ssize_t length, uint32_t service) except -1:
        # Two ids of one service with the same hash have identical slots: removing either one is right.
        cdef uint32_t hash = _hash_id(instance_id, length)
        cdef Py_ssize_t mask = self._owner_capacity - 1
        cdef Py_ssize_t slot = hash & mask, hole, home
        while self._owners[slot].service != 0:
            if self._owners[slot].hash == hash and self._owners[slot].service == service:
                break
            slot = (slot + 1) & mask
        else:
            raise ValueError("registry owner table lost an instance id")
        # Backward-shift deletion: pull later entries of the probe run into the hole so lookups never
        # stop early at it.
        hole = slot
        slot = (slot + 1) & mask
        while self._owners[slot].service != 0:
            home = self._owners[slot].hash & mask
            if ((slot - home) & mask) >= ((slot - hole) & mask):
                self._owners[hole] = self._owners[slot]
                hole = slot
            slot = (slot + 1) & mask
        self._owners[hole].service = 0
        self._owners[hole].hash = 0
        self._owner_count -= 1
        return 0

    def owner_of(self, str instance_id not None):
        """The name of the service holding ``instance_id``, or None."""
        cdef bytes encoded = instance_id.encode("utf-8")
        cdef uint32_t service = self._owner_of(<const unsigned char*>PyBytes_AS_STRING(encoded), len(encoded))
        return None if service == NO_STRING else self._table.text(service)

    def take_changed(self) -> list:
        """Names of the services changed (or removed) since the last call, for waking their watchers."""
        changed, self._changed = self._changed, set()
        return sorted(changed)

    # --- writes (called by the Raft state machine in log order) ------------------------------------------

    cdef int _check_index(self, uint64_t index) except -1:
        if index == 0:
            raise ValueError("index 0: Raft indexes start at 1")
        if index < self.index:
            raise ValueError(f"index {index} is older than the registry's last change at {self.index}")
        return 0

    def apply(self, uint64_t index, const unsigned char[:] command not None) -> bool:
        """Apply one command committed at ``index``; True when the registry changed."""
        cdef Py_ssize_t size = command.shape[0]
        if size == 0:
            raise ValueError("empty registry command")
        self._check_index(index)
        cdef const unsigned char* data = &command[0]
        cdef _Cursor cursor
        cdef uint8_t op = data[0], status = 0
        if op == OP_REGISTER:
            return self._put(index, _decode_register(data + 1, size - 1))
        if op != OP_DEREGISTER and op != OP_SET_STATUS:
            raise ValueError(f"unknown registry op {op}")
        cursor.position = data + 1
        cursor.end = data + size
        if op == OP_SET_STATUS:
            status = _take(&cursor, 1, "status")[0]
            if status > STATUS_CRITICAL:
                raise InvalidRegistration("status", f"status code {status} is not one of {', '.join(STATUSES)}")
        service = _take_text(&cursor, "service", None, LIMIT_NAME_BYTES, True)
        cdef Py_ssize_t id_size = _take_count(&cursor, "instance_id")
        cdef const unsigned char* instance_id = _take(&cursor, id_size, "instance_id")
        _expect_end(&cursor)
        if op == OP_DEREGISTER:
            return self._remove(index, service, instance_id, id_size)
        return self._set_status(index, service, instance_id, id_size, status)

    def register(self, uint64_t index, service, instance_id, address, port, *, version="", api_versions=(),
                 weight=1, max_load=0, zone="", region="", tags=(), meta=None, status="passing", check_ttl_ms=0,
                 deregister_after_ms=0) -> bool:
        """Insert or replace one instance (by instance id); see ``encode_register``."""
        return self.apply(index, _encode_register(service, instance_id, address, port, version, api_versions,
                                                  weight, max_load, zone, region, tags, meta, status, check_ttl_ms,
                                                  deregister_after_ms, False))

    def deregister(self, uint64_t index, str service not None, str instance_id not None) -> bool:
        self._check_index(index)
        cdef bytes encoded = instance_id.encode("utf-8")
        return self._remove(index, service, <const unsigned char*>PyBytes_AS_STRING(encoded), len(encoded))

    def set_status(self, uint64_t index, str service not None, str instance_id not None, str status not None) -> bool:
        cdef uint8_t code = _status_code(status)
        self._check_index(index)
        cdef bytes encoded = instance_id.encode("utf-8")
        return self._set_status(index, service, <const unsigned char*>PyBytes_AS_STRING(encoded), len(encoded), code)

    def report_load(self, str service not None, str instance_id not None, load) -> bool:
        """Record an instance's current load (leader-local, from heartbeats); False for an unknown instance."""
        cdef uint32_t value = <uint32_t>_check_integer(load, "load", 0, MAX_LOAD)
        cdef _Service found = self._services.get(service)
        cdef Py_ssize_t position = _position_of(found, instance_id) if found is not None else -1
        if position < 0:
            return False
        found.instances[position].load = value
        return True

    cdef int _fill_draft(self, Draft* draft, _Registration registration) except -1:
        """Lay out one instance's fixed and variable parts, acquiring its strings in the table."""
        cdef Instance* instance = &draft.instance
        cdef Py_ssize_t id_length = len(registration.instance_id)
        cdef Py_ssize_t tag_count = len(registration.tags), meta_count = len(registration.meta)
        cdef Py_ssize_t api_count = len(registration.api_versions)
        # Guards for data that did not come through _decode_register (a snapshot): the counts are
        # stored in bytes and the words in a fixed array.
        if not 0 < id_length <= LIMIT_NAME_BYTES or tag_count > LIMIT_TAGS or meta_count > LIMIT_META_PAIRS \
                or api_count > LIMIT_API_VERSIONS:
            raise ValueError("registry data: an instance exceeds the registration limits")
        memset(instance, 0, sizeof(Instance))
        instance.id_length = <uint8_t>id_length
        instance.family = registration.family
        instance.status = registration.status
        instance.port = registration.port
        instance.weight = registration.weight
        instance.max_load = registration.max_load
        instance.check_ttl_ms = registration.check_ttl_ms
        instance.deregister_after_ms = registration.deregister_after_ms
        instance.tag_count = <uint8_t>tag_count
        instance.meta_count = <uint8_t>meta_count
        instance.api_count = <uint8_t>api_count
        cdef uint32_t position = _id_words(instance)
        memset(draft.words, 0, position * sizeof(uint32_t))
        memcpy(draft.words, PyBytes_AS_STRING(registration.instance_id), id_length)
        if registration.family == 6:
            memcpy(draft.words + position, PyBytes_AS_STRING(registration.address), 16)
            position += 4
        else:
            memcpy(instance.ipv4, PyBytes_AS_STRING(registration.address), 4)
        cdef _StringTable table = self._table
        if registration.version:
            instance.version = table.acquire(registration.version)
            table.set_version(instance.version, registration.version_key)
        instance.zone = table.acquire(registration.zone)
        instance.region = table.acquire(registration.region)
        for tag in registration.tags:
            draft.words[position] = table.acquire(tag)
            position += 1
        for key, value in registration.meta:
            draft.words[position] = table.acquire(key)
            draft.words[position + 1] = table.acquire(value)
            position += 2
        for api_version in registration.api_versions:
            draft.words[position] = table.acquire(api_version)
            position += 1
        draft.word_count = position
        return 0

    cdef int _release_words(self, const Instance* instance, const uint32_t* words) except -1:
        """Release the strings of one instance; ``words`` is its variable part."""
        cdef _StringTable table = self._table
        cdef uint32_t position
        cdef uint32_t start = _tags_at(instance)
        cdef uint32_t end = _variable_words(instance)
        table.release(instance.version)
        table.release(instance.zone)
        table.release(instance.region)
        for position in range(start, end):
            table.release(words[position])
        return 0

    cdef bint _put(self, uint64_t index, _Registration registration) except -1:
        cdef const unsigned char* instance_id = <const unsigned char*>PyBytes_AS_STRING(registration.instance_id)
        cdef Py_ssize_t id_length = len(registration.instance_id)
        cdef uint32_t owner = self._owner_of(instance_id, id_length)
        cdef str owner_name
        if owner != NO_STRING:
            owner_name = self._table.text(owner)
            if owner_name != registration.service:
                # Consul: the id names the instance; registering it under another service moves it.
                self._remove(index, owner_name, instance_id, id_length)
        cdef Draft draft
        self._fill_draft(&draft, registration)
        cdef _Service service = self._services.get(registration.service)
        cdef _StringTable table = self._table
        cdef bint found, tags_changed
        cdef Py_ssize_t position
        cdef Instance* held
        cdef const uint32_t* held_words
        draft.instance.create_index = registration.create_index or index
        draft.instance.modify_index = registration.modify_index or index
        if service is None:
            service = _Service.__new__(_Service)
            service.name = table.acquire(registration.service)
            self._services[table.text(service.name)] = service
            self._sorted_names = None
        position = service.find(<const unsigned char*>PyBytes_AS_STRING(registration.instance_id),
                                len(registration.instance_id), &found)
        if found:
            held = &service.instances[position]
            held_words = service.words + held.var_offset
            if _same_instance(held, held_words, &draft.instance, draft.words, draft.word_count):
                self._release_words(&draft.instance, draft.words)
                return False
            draft.instance.load = held.load
            draft.instance.create_index = held.create_index
            tags_changed = service.count_tags(draft.words + _tags_at(&draft.instance), draft.instance.tag_count, 1)
            tags_changed |= service.count_tags(held_words + _tags_at(held), held.tag_count, -1)
            self._release_words(held, held_words)
            service.replace_at(position, &draft)
        else:
            service.insert_at(position, &draft)
            tags_changed = service.count_tags(draft.words + _tags_at(&draft.instance), draft.instance.tag_count, 1)
            self._instance_count += 1
            self._owner_add(instance_id, id_length, service.name)
        if tags_changed:
            self._catalog_tags.pop(registration.service, None)
        service.modify_index = index
        self.index = index
        self._changed.add(table.text(service.name))
        return True

    cdef bint _remove(self, uint64_t index, str name, const unsigned char* instance_id, Py_ssize_t length) except -1:
        cdef _Service service = self._services.get(name)
        if service is None:
            return False
        cdef bint found
        cdef Py_ssize_t position = service.find(instance_id, length, &found)
        if not found:
            return False
        cdef Instance* held = &service.instances[position]
        cdef const uint32_t* held_words = service.words + held.var_offset
        if service.count_tags(held_words + _tags_at(held), held.tag_count, -1):
            self._catalog_tags.pop(name, None)
        self._owner_remove(instance_id, length, service.name)
        self._release_words(held, held_words)
        service.remove_at(position)
        self._instance_count -= 1
        if service.count == 0:
            del self._services[name]
            self._table.release(service.name)
            self._sorted_names = None
            self._catalog_tags.pop(name, None)
            # A blocking query on a service that is gone must still see its index move.
            self.removed_index = index
        else:
            service.modify_index = index
        self.index = index
        self._changed.add(name)
        return True

    cdef bint _set_status(self, uint64_t index, str name, const unsigned char* instance_id, Py_ssize_t length,
                          uint8_t status) except -1:
        cdef _Service service = self._services.get(name)
        if service is None:
            return False
        cdef bint found
        cdef Py_ssize_t position = service.find(instance_id, length, &found)
        if not found or service.instances[position].status == status:
            return False
        service.instances[position].status = status
        service.instances[position].modify_index = index
        service.modify_index = index
        self.index = index
        self._changed.add(name)
        return True

    # --- reads ------------------------------------------------------------------------------------------------

    cdef InstanceView _view(self, _Service service, str name, const Instance* instance):
        # ``name`` is the caller's (equal) string: the table's copy would be one more cache miss per answer.
        cdef InstanceView view = InstanceView.__new__(InstanceView)
        cdef _StringTable table = self._table
        cdef const uint32_t* words = service.words + instance.var_offset
        if instance.family == 4:
            memcpy(view._address, instance.ipv4, 4)
            view._address_size = 4
        else:
            memcpy(view._address, words + _id_words(instance), 16)
            view._address_size = 16
        view.service = name
        view.instance_id = PyUnicode_DecodeUTF8(<const char*>words, instance.id_length, NULL)
        view.port = instance.port
        view.create_index = instance.create_index
        view.modify_index = instance.modify_index
        view.check_ttl_ms = instance.check_ttl_ms
        view.deregister_after_ms = instance.deregister_after_ms
        view.version = table.text(instance.version)
        view.weight = instance.weight
        view.max_load = instance.max_load
        view.load = instance.load
        view.zone = table.text(instance.zone)
        view.region = table.text(instance.region)
        view.status = <str>_STATUS_NAMES[instance.status]
        view._tag_count = instance.tag_count
        view._meta_count = instance.meta_count
        view._texts = _texts(table, words + _tags_at(instance), _variable_words(instance) - _tags_at(instance))
        return view

    cdef int _reserve_matches(self, Py_ssize_t count) except -1:
        if count > self._matches_capacity:
            _realloc_array(<void**>&self._matches, count * sizeof(Match))
            self._matches_capacity = count
        return 0

    def instances(self, str service not None, *, str health="any", tags=(), version=None, str api_version=None,
                  str near_zone=None, str near_region=None, bint by_load=False, Py_ssize_t limit=0) -> list:
        """Instances of ``service`` that pass every filter given, in a stable order.

        Filters: ``health`` ("any", "healthy" = passing or warning, "passing"), ``tags`` (all of them),
        ``version`` (a range string or VersionRange), ``api_version`` (one the instance supports).
        Order: by instance id; with ``near_zone`` / ``near_region`` same zone first, then same region,
        then the rest; with ``by_load`` most weighted free capacity first, ``max(max_load - load, 0) *
        weight`` (within each proximity tier when both are given); ties by instance id. ``limit`` > 0
        keeps the first ``limit``.
        """
        mask = _HEALTH_MASKS.get(health)
        if mask is None:
            raise ValueError(f"health {health!r} is not one of any, healthy, passing")
        if limit < 0:
            raise ValueError(f"limit {limit} is negative")
        if isinstance(tags, (str, bytes)):
            raise TypeError("tags must be a sequence of str, not one str")
        cdef VersionRange version_range = _as_range(version) if version is not None else None
        cdef _Service found = self._services.get(service)
        if found is None:
            return []
        cdef _StringTable table = self._table
        cdef uint32_t required[LIMIT_TAGS]
        cdef Py_ssize_t required_count = 0, position, slot, count = 0
        cdef uint32_t tag_id, carriers
        for tag in tags:
            tag_id = table.find(tag)
            carriers = found.tag_instances(tag_id) if tag_id != NO_STRING else 0
            if carriers == 0:
                return []
            if carriers == found.count:
                continue           # every instance carries it: nothing to check
            for position in range(required_count):
                if required[position] == tag_id:
                    break
            else:
                if required_count == LIMIT_TAGS:
                    return []      # no instance carries more than MAX_TAGS distinct tags
                required[required_count] = tag_id
                required_count += 1
        cdef uint32_t api_id = NO_STRING
        if api_version:
            api_id = table.find(api_version)
            if api_id == NO_STRING:
                return []
        cdef uint32_t zone_id = table.find(near_zone) if near_zone else NO_STRING
        cdef uint32_t region_id = table.find(near_region) if near_region else NO_STRING
        cdef bint proximity = bool(near_zone) or bool(near_region)
        cdef uint32_t accepted = mask
        cdef const Instance* instance
        cdef const uint32_t* words
        cdef uint32_t tier, start, end, probe
        cdef uint64_t free, score
        self._reserve_matches(found.count)
        for slot in range(found.count):
            instance = &found.instances[slot]
            if not (accepted >> instance.status) & 1:
                continue
            if version_range is not None and not version_range._admits(table, instance.version):
                continue
            words = found.words + instance.var_offset + _tags_at(instance)
            if required_count and not _has_all(words, instance.tag_count, required, required_count):
                continue
            if api_id != NO_STRING:
                start = instance.tag_count + 2 * <uint32_t>instance.meta_count
                end = start + instance.api_count
                for probe in range(start, end):
                    if words[probe] == api_id:
                        break
                else:
                    continue
            tier = 0
            if proximity:
                tier = 0 if instance.zone == zone_id else 1 if instance.region == region_id else 2
            score = 0
            if by_load:
                free = instance.max_load - instance.load if instance.max_load > instance.load else 0
                score = free * instance.weight
            self._matches[count].order = (<uint64_t>tier << SCORE_BITS) | (_SCORE_MASK - score)
            self._matches[count].slot = <uint32_t>slot
            count += 1
        if (proximity or by_load) and count > 1:
            qsort(self._matches, count, sizeof(Match), _compare_matches)
        if limit and limit < count:
            count = limit
        return [self._view(found, service, &found.instances[self._matches[position].slot])
                for position in range(count)]

    def get(self, str service not None, str instance_id not None):
        cdef _Service found = self._services.get(service)
        cdef Py_ssize_t position = _position_of(found, instance_id) if found is not None else -1
        return self._view(found, service, &found.instances[position]) if position >= 0 else None

    def services(self) -> dict:
        """Every service with the sorted union of its instances' tags, by name (Consul /v1/catalog/services)."""
        if self._sorted_names is None:
            self._sorted_names = tuple(sorted(self._services))
        cdef dict catalog = {}
        cdef _Service found
        cdef uint32_t position
        for name in self._sorted_names:
            tags = self._catalog_tags.get(name)
            if tags is None:
                found = self._services[name]
                tags = tuple(sorted([self._table.text(found.tags[position].tag)
                                     for position in range(found.tag_kinds)]))
                self._catalog_tags[name] = tags
            catalog[name] = tags
        return catalog

    def service_index(self, str service not None) -> int:
        """Raft index of the last change to ``service``; for a service that does not exist (any more), the
        index of the last change that removed a service. Never goes backwards for any name."""
        cdef _Service found = self._services.get(service)
        return found.modify_index if found is not None else self.removed_index

    @property
    def service_count(self) -> int:
        return len(self._services)

    def __len__(self) -> int:
        return self._instance_count

    def memory_bytes(self) -> int:
        """Bytes of the store's C buffers (instance arrays, arenas, tag indexes, string-table arrays)."""
        cdef Py_ssize_t total = self._table.memory_bytes() + self._matches_capacity * sizeof(Match)
        cdef _Service found
        for found in self._services.values():
            total += found.memory_bytes()
        return total

    # --- heartbeat leases (leader-local: never replicated, hashed or snapshotted) --------------------------------

    cdef Instance* _find(self, str service, str instance_id):
        cdef _Service found = self._services.get(service)
        if found is None:
            return NULL
        cdef Py_ssize_t position = _position_of(found, instance_id)
        return &found.instances[position] if position >= 0 else NULL

    def touch(self, str service not None, str instance_id not None, uint64_t now_ms, str status not None,
              load=None):
        """A heartbeat reaching the leader at ``now_ms``: passing/warning renews the lease for the instance's
        TTL, critical starts its critical time (unless it is already running); ``load`` is recorded.

        Returns the instance's replicated status as it was (the caller proposes a change if it differs),
        or None for an unknown instance.
        """
        cdef uint8_t code = _status_code(status)
        cdef uint32_t load_value = <uint32_t>_check_integer(load, "load", 0, MAX_LOAD) if load is not None else 0
        cdef Instance* instance = self._find(service, instance_id)
        if instance is NULL:
            return None
        if load is not None:
            instance.load = load_value
        if code == STATUS_CRITICAL:
            if instance.status != STATUS_CRITICAL or instance.lease_deadline > now_ms or instance.lease_deadline == 0:
                instance.lease_deadline = now_ms
        else:
            instance.lease_deadline = now_ms + instance.check_ttl_ms
        return _STATUS_NAMES[instance.status]

    def reset_leases(self, uint64_t now_ms) -> None:
        """Start every lease afresh at ``now_ms``: what a new leader does, since leases are leader-local."""
        cdef _Service found
        cdef Instance* instance
        cdef uint32_t slot
        for found in self._services.values():
            for slot in range(found.count):
                instance = &found.instances[slot]
                instance.lease_deadline = now_ms if instance.status == STATUS_CRITICAL \
                    else now_ms + instance.check_ttl_ms

    def expired(self, uint64_t now_ms) -> list:
        """The staged transitions due at ``now_ms``: [(service, instance_id, "critical" | "deregister")].

        A passing or warning instance whose TTL lease ran out becomes critical; one critical for its
        ``deregister_after_ms`` is removed. Leases not yet started start now.
        """
        cdef list due = []
        cdef _Service found
        cdef Instance* instance
        cdef uint32_t slot
        for name, found in self._services.items():
            for slot in range(found.count):
                instance = &found.instances[slot]
                if instance.lease_deadline == 0:
                    instance.lease_deadline = now_ms if instance.status == STATUS_CRITICAL \
                        else now_ms + instance.check_ttl_ms
                elif instance.status != STATUS_CRITICAL:
                    if instance.check_ttl_ms and now_ms >= instance.lease_deadline:
                        due.append((name, PyUnicode_DecodeUTF8(<const char*>(found.words + instance.var_offset),
                                                               instance.id_length, NULL), "critical"))
                elif instance.deregister_after_ms and now_ms >= instance.lease_deadline + instance.deregister_after_ms:
                    due.append((name, PyUnicode_DecodeUTF8(<const char*>(found.words + instance.var_offset),
                                                           instance.id_length, NULL), "deregister"))
        return due

    # --- snapshot ----------------------------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The replicated state in a canonical binary form: equal states give equal bytes (load is left out)."""
        cdef _StringTable table = self._table
        cdef list live = sorted([text for text in table._strings if text])
        cdef uint32_t* remap = <uint32_t*>PyMem_Malloc(len(table._strings) * sizeof(uint32_t) + 1)
        if remap is NULL:
            raise MemoryError()
        cdef _Buffer buffer
        buffer.data = NULL
        buffer.size = buffer.capacity = 0
        cdef _Service found
        cdef const Instance* instance
        cdef const uint32_t* words
        cdef uint32_t slot, position, word, reference = 0
        try:
            remap[0] = 0
            for text in live:
                reference += 1
                remap[<uint32_t>table._ids[text]] = reference
            _put_bytes(&buffer, PyBytes_AS_STRING(_SNAPSHOT_MAGIC), 4)
            _put_u8(&buffer, SNAPSHOT_FORMAT)
            _put_big_endian(&buffer, self.index, 8)
            _put_big_endian(&buffer, self.removed_index, 8)
            _put_varint(&buffer, len(live))
            for text in live:
                _put_text(&buffer, text, "string")
            names = sorted(self._services)
            _put_varint(&buffer, len(names))
            for name in names:
                found = self._services[name]
                _put_varint(&buffer, remap[found.name])
                _put_big_endian(&buffer, found.modify_index, 8)
                _put_varint(&buffer, found.count)
                for slot in range(found.count):
                    instance = &found.instances[slot]
                    words = found.words + instance.var_offset
                    _put_varint(&buffer, instance.id_length)
                    _put_bytes(&buffer, words, instance.id_length)
                    _put_u8(&buffer, instance.status)
                    _put_u8(&buffer, instance.family)
                    _put_big_endian(&buffer, instance.port, 2)
                    _put_big_endian(&buffer, instance.weight, 2)
                    _put_big_endian(&buffer, instance.max_load, 4)
                    _put_big_endian(&buffer, instance.check_ttl_ms, 4)
                    _put_big_endian(&buffer, instance.deregister_after_ms, 4)
                    _put_big_endian(&buffer, instance.create_index, 8)
                    _put_big_endian(&buffer, instance.modify_index, 8)
                    if instance.family == 4:
                        _put_bytes(&buffer, instance.ipv4, 4)
                    else:
                        _put_bytes(&buffer, words + _id_words(instance), 16)
                    _put_varint(&buffer, remap[instance.version])
                    _put_varint(&buffer, remap[instance.zone])
                    _put_varint(&buffer, remap[instance.region])
                    position = _tags_at(instance)
                    _put_varint(&buffer, instance.tag_count)
                    for word in range(instance.tag_count):
                        _put_varint(&buffer, remap[words[position]])
                        position += 1
                    _put_varint(&buffer, instance.meta_count)
                    for word in range(2 * <uint32_t>instance.meta_count):
                        _put_varint(&buffer, remap[words[position]])
                        position += 1
                    _put_varint(&buffer, instance.api_count)
                    for word in range(instance.api_count):
                        _put_varint(&buffer, remap[words[position]])
                        position += 1
            return _finish(&buffer)
        finally:
            PyMem_Free(remap)
            PyMem_Free(buffer.data)

    cdef int _load(self, const unsigned char* data, Py_ssize_t size) except -1:
        cdef _Cursor cursor
        cursor.position = data
        cursor.end = data + size
        if memcmp(_take(&cursor, 5, "snapshot header"), PyBytes_AS_STRING(_SNAPSHOT_MAGIC), 4) != 0 \
                or data[4] != SNAPSHOT_FORMAT:
            raise ValueError(f"not a registry snapshot (format {SNAPSHOT_FORMAT})")
        cdef uint64_t index = _big_endian(_take(&cursor, 8, "snapshot index"), 8)
        cdef uint64_t removed_index = _big_endian(_take(&cursor, 8, "snapshot index"), 8)
        cdef Py_ssize_t count = _take_count(&cursor, "snapshot strings"), position, service_count, instance_count
        cdef list texts = [""]
        for position in range(count):
            texts.append(_take_text(&cursor, "string", position, 0x7FFFFFFF, True))
        cdef _Registration registration
        cdef const unsigned char* fixed
        cdef Py_ssize_t id_size, item, items
        cdef _Service found
        service_count = _take_count(&cursor, "snapshot services")
        for position in range(service_count):
            name = _snapshot_text(&cursor, texts)
            if not name or name in self._services:
                raise ValueError(f"snapshot: service name {name!r} is empty or repeated")
            modify_index = _big_endian(_take(&cursor, 8, "modify index"), 8)
            instance_count = _take_count(&cursor, "instances")
            if instance_count == 0:
                raise ValueError(f"snapshot: service {name!r} has no instances")
            for item in range(instance_count):
                registration = _Registration.__new__(_Registration)
                registration.service = name
                id_size = _take_count(&cursor, "instance_id")
                registration.instance_id = PyBytes_FromStringAndSize(
                    <char*>_take(&cursor, id_size, "instance_id"), id_size)
                fixed = _take(&cursor, REGISTER_HEADER_BYTES + 16, "instance")
                _read_fixed(registration, fixed)
                registration.create_index = _big_endian(fixed + REGISTER_HEADER_BYTES, 8)
                registration.modify_index = _big_endian(fixed + REGISTER_HEADER_BYTES + 8, 8)
                if registration.create_index == 0 or registration.modify_index < registration.create_index:
                    raise ValueError(f"snapshot: instance of {name!r} has bad create/modify indexes")
                if registration.status > STATUS_CRITICAL or (registration.family != 4 and registration.family != 6):
                    raise ValueError(f"snapshot: instance of {name!r} has a bad status or address family")
                registration.address = PyBytes_FromStringAndSize(
                    <char*>_take(&cursor, 4 if registration.family == 4 else 16, "address"),
                    4 if registration.family == 4 else 16)
                registration.version = _snapshot_text(&cursor, texts)
                registration.version_key = _parse_semver(registration.version)[0] if registration.version else None
                registration.zone = _snapshot_text(&cursor, texts)
                registration.region = _snapshot_text(&cursor, texts)
                items = _take_count(&cursor, "tags")
                registration.tags = [_snapshot_text(&cursor, texts) for _ in range(items)]
                items = _take_count(&cursor, "meta")
                registration.meta = [(_snapshot_text(&cursor, texts), _snapshot_text(&cursor, texts))
                                     for _ in range(items)]
                items = _take_count(&cursor, "api_versions")
                registration.api_versions = [_snapshot_text(&cursor, texts) for _ in range(items)]
                _canonicalize(registration)
                before = self._instance_count
                self._put(modify_index, registration)
                if self._instance_count == before:
                    raise ValueError(f"snapshot: instance {registration.instance_id!r} of {name!r} is repeated")
            found = self._services[name]
            found.shrink_to_fit()
        _expect_end(&cursor)
        self.index = index
        self.removed_index = removed_index
        return 0

    def restore(self, const unsigned char[:] data not None) -> None:
        """Replace the whole state with a snapshot's; on a bad snapshot (ValueError) nothing changes."""
        cdef RegistryStore fresh = RegistryStore()
        if data.shape[0] == 0:
            raise ValueError("not a registry snapshot (empty)")
        fresh._load(&data[0], data.shape[0])
        self._table, fresh._table = fresh._table, self._table
        self._services, fresh._services = fresh._services, self._services
        self._owners, fresh._owners = fresh._owners, self._owners
        self._owner_capacity, fresh._owner_capacity = fresh._owner_capacity, self._owner_capacity
        self._owner_count, fresh._owner_count = fresh._owner_count, self._owner_count
        # Every watcher must look again: any service may have changed.
        self._changed = set(fresh._services) | set(self._services)
        self._instance_count = fresh._instance_count
        self._sorted_names = None
        self._catalog_tags = {}
        self.index = fresh.index
        self.removed_index = fresh.removed_index

    def state_hash(self) -> str:
        """A digest of the replicated state, equal on every node that applied the same log."""
        return hashlib.sha256(self.snapshot()).hexdigest()


cdef inline uint32_t _hash_id(const unsigned char* data, Py_ssize_t length) noexcept nogil:
    # FNV-1a: instance ids are short, and a collision only costs one more probe.
    cdef uint32_t hash = 2166136261u
    cdef Py_ssize_t position
    for position in range(length):
        hash = (hash ^ data[position]) * 16777619u
    return hash


cdef Py_ssize_t _position_of(_Service service, str instance_id) except -2:
    """The slot of ``instance_id`` in ``service``, or -1."""
    cdef bytes encoded = instance_id.encode("utf-8")
    cdef bint exists
    cdef Py_ssize_t position = service.find(<const unsigned char*>PyBytes_AS_STRING(encoded), len(encoded), &exists)
    return position if exists else -1


cdef str _snapshot_text(_Cursor* cursor, list texts):
    cdef uint64_t reference = _take_varint(cursor, "string reference")
    if reference >= <uint64_t>len(texts):
        raise ValueError(f"snapshot: string reference {reference} is not in the table")
    return texts[reference]


cdef inline bint _has_all(const uint32_t* tags, uint32_t tag_count, const uint32_t* required,
                          Py_ssize_t required_count) noexcept nogil:
    cdef Py_ssize_t wanted
    cdef uint32_t position
    cdef bint present
    for wanted in range(required_count):
        present = False
        for position in range(tag_count):
            if tags[position] == required[wanted]:
                present = True
                break
        if not present:
            return False
    return True


cdef bint _same_instance(const Instance* held, const uint32_t* held_words, const Instance* draft,
                         const uint32_t* draft_words, uint32_t draft_word_count) noexcept:
    """Whether a re-registration changes nothing replicated (load is leader-local and not compared)."""
    if (held.version != draft.version or held.zone != draft.zone or held.region != draft.region
            or held.max_load != draft.max_load or held.port != draft.port or held.weight != draft.weight
            or held.id_length != draft.id_length or held.family != draft.family or held.status != draft.status
            or held.tag_count != draft.tag_count or held.meta_count != draft.meta_count
            or held.api_count != draft.api_count or memcmp(held.ipv4, draft.ipv4, 4) != 0
            or held.check_ttl_ms != draft.check_ttl_ms or held.deregister_after_ms != draft.deregister_after_ms):
        return False
    return memcmp(held_words, draft_words, draft_word_count * sizeof(uint32_t)) == 0


# --- the first building blocks, kept for their callers ---------------------------------------------------------

cdef class Interner:
    """Maps equal strings to one shared object."""

    def __cinit__(self):
        self._strings = {}
        self.hits = 0

    def intern(self, str value not None) -> str:
        cdef object shared = self._strings.get(value)
        if shared is None:
            self._strings[value] = value
            return value
        self.hits += 1
        return <str>shared

    def __len__(self) -> int:
        return len(self._strings)

    def __contains__(self, value) -> bool:
        return value in self._strings


def pack_address(str host not None, int port) -> bytes:
    """Pack an IP literal and port into 6 (IPv4) or 18 (IPv6) bytes.

    Raises ValueError naming the problem for a host that is not an IP literal or a port outside 0..65535.
    """
    if port < 0 or port > 65535:
        raise ValueError(f"port {port} is outside 0..65535")
    try:
        raw = ipaddress.ip_address(host).packed
    except ValueError:
        raise ValueError(f"address {host!r} is not an IPv4 or IPv6 literal") from None
    cdef Py_ssize_t size = len(raw)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size + 2)
    cdef unsigned char* buf = <unsigned char*>PyBytes_AS_STRING(out)
    memcpy(buf, PyBytes_AS_STRING(raw), size)
    buf[size] = (port >> 8) & 0xFF
    buf[size + 1] = port & 0xFF
    return out


def unpack_address(const unsigned char[:] packed not None) -> tuple:
    """Inverse of pack_address: (host, port)."""
    cdef Py_ssize_t size = packed.shape[0]
    if size != 6 and size != 18:
        raise ValueError(f"a packed address is 6 or 18 bytes, got {size}")
    cdef int port = (packed[size - 2] << 8) | packed[size - 1]
    host = str(ipaddress.ip_address(bytes(packed[:size - 2])))
    return host, port
